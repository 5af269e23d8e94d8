"""How fleet trusts a vCenter's certificate.

Verified by default against the system's CAs. A self-signed vCenter is trusted
explicitly, one of two ways: a CA file (PEM; the certificate or the CA that
signed it, host name checked) or a pinned SHA-256 thumbprint of the server
certificate (``AA:BB:...`` or plain hex; only that certificate is accepted,
whatever its name; aiohttp's ``Fingerprint`` checks it after the handshake,
before a byte of the request is sent). ``insecure=True`` turns checking off and
says so loudly in the log on every connect.

SHA-1 thumbprints (what older vCenter screens show) are refused with a clear
error: aiohttp's ``Fingerprint`` accepts SHA-256 only, and so does fleet.

Users set these as ``vcenter.ca_file``, ``vcenter.thumbprint`` and
``vcenter.insecure`` (the fleet spec and ``fleet serve``'s config use the same
names), so every error here names those keys.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from fleet.errors import ConfigError
from fleet.files import PEM_MAX_BYTES, FileProblem, decode_utf8, read_user_file
from fleet.urls import redact_url

log = logging.getLogger("fleet.vsphere")

#: The config keys (fleet spec and ``fleet serve`` config) behind each option.
KEYS = {"ca_file": "vcenter.ca_file", "thumbprint": "vcenter.thumbprint",
        "insecure": "vcenter.insecure"}


@dataclass(frozen=True)
class TlsOptions:
    #: one CA file, or several (govc's GOVC_TLS_CA_CERTS lists them: docs/connecting.md)
    ca_file: str | Path | tuple[str | Path, ...] | None = None
    thumbprint: str | None = None  # SHA-256 of the DER certificate
    insecure: bool = False
    #: the setting behind ``insecure``, named by its warning (GOVC_INSECURE, a flag...)
    insecure_from: str = KEYS["insecure"]

    def __post_init__(self) -> None:
        chosen = [KEYS[n] for n, v in (("ca_file", self.ca_file),
                                       ("thumbprint", self.thumbprint),
                                       ("insecure", self.insecure)) if v]
        if len(chosen) > 1:
            raise ConfigError(f"choose one way to trust the server, not {' and '.join(chosen)}",
                              key=chosen[1])
        if self.thumbprint is not None:
            normalize_thumbprint(self.thumbprint)


def normalize_thumbprint(thumbprint: str) -> bytes:
    """The 32 digest bytes of a SHA-256 thumbprint written with or without colons."""
    text = thumbprint.replace(":", "").replace(" ", "").strip().lower()
    if len(text) == 40:
        raise ConfigError(f"{thumbprint!r} looks like a SHA-1 thumbprint; pin the SHA-256 one",
                          key=KEYS["thumbprint"])
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ConfigError(f"{thumbprint!r} is not a SHA-256 thumbprint (64 hex digits)",
                          key=KEYS["thumbprint"])
    return digest


def ssl_for(options: TlsOptions, url: str) -> ssl.SSLContext | aiohttp.Fingerprint | bool:
    """What aiohttp's connector takes as ``ssl=`` for ``url`` under ``options``.

    A verifying context (system CAs, or the CA file), a ``Fingerprint`` for a pinned
    thumbprint, or False: no verification (``insecure``, or plain http, which is
    only ever a simulator). Reads files: call it off the event loop."""
    if not url.lower().startswith("https:"):
        return False
    if options.insecure:
        log.warning("TLS certificate verification is OFF for %s (%s): anyone on the path can "
                    "read and change this session, credentials included", redact_url(url),
                    options.insecure_from)
        return False
    if options.thumbprint is not None:
        return aiohttp.Fingerprint(normalize_thumbprint(options.thumbprint))
    if options.ca_file is not None:
        files = options.ca_file if isinstance(options.ca_file, tuple) else (options.ca_file,)
        pems: list[str] = []
        for name in files:
            path = Path(name)
            try:
                # Read as every user's file is (fleet.files): regular, capped, no FIFO wait.
                pems.append(decode_utf8(read_user_file(path, PEM_MAX_BYTES)))
            except FileProblem as exc:
                raise ConfigError(f"{str(path)!r}: {exc.reason}", key=KEYS["ca_file"]) from None
        if not "".join(pems).strip():
            # An empty cadata would load the system's CAs instead of none.
            raise ConfigError(f"{', '.join(repr(str(f)) for f in files)} holds no PEM "
                              "certificate", key=KEYS["ca_file"])
        try:
            return ssl.create_default_context(cadata="\n".join(pems))
        except ssl.SSLError as exc:
            raise ConfigError(f"{', '.join(repr(str(f)) for f in files)} is not a PEM "
                              f"certificate file ({exc})", key=KEYS["ca_file"]) from exc
    return ssl.create_default_context()


def unverified_context() -> ssl.SSLContext:
    """A client context that checks nothing: only for asking whether a server speaks
    TLS at all (``fleet.vsphere.transport.speaks_tls``), never for a request."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
