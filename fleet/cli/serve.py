"""``fleet serve``: load the service config, connect to vCenter, serve the REST API.

Prints ``listening on http://HOST:PORT`` (``https://`` with TLS) on stdout once
the API answers (the tests and scripts wait for that line). SIGINT or SIGTERM
stops it: the HTTP side closes, runs in progress get their grace period and are
cleaned up, and their requests stay on record so the next start resumes them.

TLS and where the service may listen (docs/service-tls.md): ``--tls-cert`` and
``--tls-key`` (or ``api.tls_cert``/``api.tls_key``) serve HTTPS, TLS 1.2 or
newer; the files are read and checked (a certificate, an unencrypted key that
belongs to it) before anything listens. Without TLS the service listens on
loopback only, since every request carries the bearer token: another address
is refused unless ``--insecure-listen`` is given, which is logged as a warning
at every start.

Exit status: 0 after a clean stop, 1 when vCenter cannot be reached at start,
2 for a bad config or option (the message names the key or flag).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from fleet.errors import ConfigError, FleetError
from fleet.urls import redact_url

if TYPE_CHECKING:
    from fleet.api.config import ServiceConfig
    from fleet.metrics import FleetMetrics
    from fleet.vsphere.model import VSphere

# The service's own modules (config, metrics, API) are imported when it runs: every
# ``fleet`` command builds the parser, which only needs ``add_arguments``.

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PAGE_SIZE = 100
#: how long a --listen host name may take to resolve (it is resolved to tell whether
#: it is loopback; a resolver that hangs must not hang the start)
RESOLVE_TIMEOUT_S = 10.0

log = logging.getLogger("fleet.api")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="service config (TOML); see config/serve.example.toml")
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="address to serve on (overrides the config's listen; port 0 "
                             "picks a free one). Without TLS only a loopback address")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="serve HTTPS (TLS 1.2+) with this PEM certificate, the "
                             "server's first if it is a chain; needs --tls-key; both "
                             "override api.tls_cert/api.tls_key (docs/service-tls.md)")
    parser.add_argument("--tls-key", metavar="FILE",
                        help="the certificate's private key (PEM, not encrypted)")
    parser.add_argument("--insecure-listen", action="store_true",
                        help="allow plain HTTP on an address other machines reach: the "
                             "bearer token then crosses the network in clear (logged as "
                             "a warning at every start)")


def _eprint(message: str) -> None:
    print(f"fleet serve: {message}", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def connect(config: ServiceConfig, metrics: FleetMetrics,
                  announce: Callable[[str], Any] = _eprint, *,
                  max_connections: int | None = None) -> AsyncIterator[VSphere]:
    """The service's one vCenter client (or a built-in simulator's)."""
    from fleet.target import open_vcenter

    # Small pages: the API shares the event loop with inventory reads, and decoding a
    # 1,000-VM page blocks it for ~0.8 s; 100 VMs a page keeps each pause near 0.15 s.
    options: dict[str, Any] = {"observer": metrics, "page_size": PAGE_SIZE}
    if max_connections is not None:
        options["max_connections"] = max_connections
    sim = config.simulator
    async with open_vcenter(config.vcenter, announce=announce, sim_time_scale=sim.time_scale,
                            sim_topology=sim.topology, **options) as target:
        if not target.simulated:
            announce(f"connected to {target.url} (from {config.vcenter_origin})")
        yield target.client


# -- TLS and the listening address (docs/service-tls.md) ------------------------------

@dataclass(frozen=True)
class TlsFiles:
    """The certificate and key to serve HTTPS with, and the flags or keys that named them."""

    cert: Path
    key: Path
    cert_name: str = "--tls-cert"
    key_name: str = "--tls-key"
    source: str | None = None  # the config file, when they come from it

    def error(self, which: str, message: str) -> ConfigError:
        name = self.cert_name if which == "cert" else self.key_name
        return ConfigError(message, key=name, source=self.source)


def tls_files(args: argparse.Namespace, config: ServiceConfig) -> TlsFiles | None:
    """The flags' pair if either flag is given (the config's keys are then not read),
    else the config's, else None (plain HTTP)."""
    cert, key = args.tls_cert, args.tls_key
    if cert is None and key is None:
        files = config.tls_files
        return None if files is None else TlsFiles(
            *files, cert_name="api.tls_cert", key_name="api.tls_key", source=config.origin)
    for flag, value, other in (("--tls-cert", cert, "--tls-key"),
                               ("--tls-key", key, "--tls-cert")):
        if value is None:
            raise ConfigError(f"is missing: {other} is given, and HTTPS needs both the "
                              "certificate and its key", key=flag)
    return TlsFiles(Path(cert), Path(key))


def server_tls_context(files: TlsFiles, *, now: dt.datetime | None = None
                       ) -> ssl.SSLContext:
    """A server-side context, TLS 1.2 or newer, with the certificate (chain) and key.

    Read as every named file is (fleet.files: a regular file, capped; a FIFO or
    /dev/zero refused) and judged before OpenSSL sees them, so each problem is a
    :class:`ConfigError` naming the flag or key and the path: not PEM, an encrypted
    key (OpenSSL would prompt for its passphrase on the terminal), a key that is not
    the certificate's, a certificate that has expired."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    from fleet.files import PEM_MAX_BYTES, FileProblem, read_user_file
    from fleet.sim.certs import Certificate

    def read(which: str, path: Path) -> bytes:
        try:
            return read_user_file(path, PEM_MAX_BYTES)
        except FileProblem as exc:
            raise files.error(which, f"cannot read {path}: {exc.reason}") from None

    cert_pem, key_pem = read("cert", files.cert), read("key", files.key)
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise files.error("cert", f"{files.cert} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise files.error("key", f"{files.key} is encrypted; fleet serve takes a key "
                                 "without a passphrase (`openssl pkey -in KEY -out "
                                 "PLAIN`, readable by the service's user only)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise files.error("key", f"{files.key} holds no PEM private key fleet can "
                                 "use") from None

    def spki(public_key: Any) -> bytes:
        return public_key.public_bytes(  # type: ignore[no-any-return]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    if spki(key.public_key()) != spki(leaf.public_key()):
        raise files.error("key", f"{files.key} is not the key of the certificate in "
                                 f"{files.cert} (their public keys differ)")
    expires = leaf.not_valid_after_utc
    if expires <= (now or dt.datetime.now(dt.UTC)):
        raise files.error("cert", f"the certificate in {files.cert} expired on "
                                  f"{expires:%Y-%m-%d %H:%M} UTC")
    try:
        context = Certificate(cert_pem, key_pem).server_context()
    except ssl.SSLError as exc:
        raise files.error("cert", f"OpenSSL refuses {files.cert} with {files.key}: "
                                  f"{exc.reason or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def resolve_host(host: str, timeout_s: float = RESOLVE_TIMEOUT_S) -> list[str]:
    """The addresses a listen host stands for: itself if it is an IP address, else what
    the resolver says (within ``timeout_s``). ConfigError if it does not resolve."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    found: list[Any] = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM,
                                            flags=socket.AI_PASSIVE))
        except (OSError, UnicodeError) as exc:
            found.append(exc)

    # A daemon thread: a resolver that never answers is left behind, not waited for.
    worker = threading.Thread(target=lookup, name="fleet-serve-resolve", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not found:
        raise ConfigError(f"{host!r} did not resolve within {timeout_s:g} s")
    if isinstance(found[0], Exception):
        exc = found[0]
        raise ConfigError(f"{host!r} does not resolve: "
                          f"{getattr(exc, 'strerror', None) or exc}")
    return sorted({info[4][0] for info in found[0]})


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def off_loopback(host: str, resolve: Callable[[str], Sequence[str]] = resolve_host
                 ) -> str | None:
    """None if every address ``host`` stands for is loopback; else, in words, what
    other machines could reach."""
    addresses = list(resolve(host))
    others = [a for a in addresses if not _is_loopback(a)]
    if not others:
        return None
    if any(ipaddress.ip_address(a.split("%", 1)[0]).is_unspecified for a in others):
        what = "every interface"
    else:
        what = "an address that is not loopback"
    if addresses != [host]:
        what += f" ({host} resolves to {', '.join(others)})"
    return what


def check_listen(host: str, *, tls: bool, insecure: bool, key: str = "--listen",
                 source: str | None = None,
                 resolve: Callable[[str], Sequence[str]] = resolve_host) -> str | None:
    """May the service listen on ``host``? With TLS anywhere; without it, loopback
    only, unless ``insecure`` (``--insecure-listen``). Raises ConfigError naming
    ``key`` when not; returns the warning to log when ``insecure`` is what allows it."""
    if tls:
        return None
    try:
        what = off_loopback(host, resolve)
    except ConfigError as exc:
        if insecure:
            return (f"plain HTTP on {host} (--insecure-listen; {exc}): the bearer token "
                    "may cross the network in clear")
        raise ConfigError(f"cannot tell whether it is loopback: {exc}", key=key,
                          source=source) from None
    if what is None:
        return None
    if insecure:
        return (f"INSECURE: plain HTTP on {host}, {what}, because of --insecure-listen: "
                "every request's bearer token crosses the network in clear. Serve HTTPS "
                "with --tls-cert and --tls-key (docs/service-tls.md)")
    raise ConfigError(f"{host} is {what}, and without TLS the bearer token would cross "
                      "the network in clear: give --tls-cert and --tls-key (or "
                      "api.tls_cert/api.tls_key), listen on loopback (127.0.0.1) behind "
                      "a TLS proxy, or accept the risk with --insecure-listen",
                      key=key, source=source)


async def serve(config: ServiceConfig, host: str, port: int, *,
                on_listening: Callable[[str], Any] | None = None,
                stop: anyio.Event | None = None,
                ssl_context: ssl.SSLContext | None = None) -> None:
    """Run the service until SIGINT/SIGTERM (or ``stop`` is set); HTTPS with
    ``ssl_context``."""
    from fleet.api.app import make_app
    from fleet.api.edge import fd_budget, serve_http
    from fleet.api.service import FleetService
    from fleet.metrics import FleetMetrics

    # Before connecting: the fd limit sizes the vCenter client's pool too.
    budget = fd_budget(config.api.max_connections)
    metrics = FleetMetrics()
    with contextlib.ExitStack() as stack:
        state_path = None
        if config.vcenter is None and config.state_dir is None:
            # A built-in simulator starts empty: requests from an earlier one mean nothing.
            state_path = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="fleet-serve-")))
        async with connect(config, metrics, max_connections=budget.vcenter_connections) as vs, \
                FleetService(config, vs, metrics, state_path=state_path) as service:
            app = make_app(service, config, metrics)
            async with serve_http(app, config.api, budget, host, port,
                                  ssl_context=ssl_context) as url:
                if on_listening is not None:
                    on_listening(url)
                async with anyio.create_task_group() as tg:
                    async def signals() -> None:
                        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                            async for signum in sigs:
                                _eprint(f"{signal.Signals(signum).name}: stopping")
                                break
                        tg.cancel_scope.cancel()

                    async def stopped() -> None:
                        if stop is not None:
                            await stop.wait()
                            tg.cancel_scope.cancel()

                    tg.start_soon(signals)
                    tg.start_soon(stopped)


def main(args: argparse.Namespace) -> int:
    from fleet.api.config import config_from_dict, parse_listen
    from fleet.engine.spec import read_toml
    from fleet.target import SIM_GUEST_ENV, SIM_GUEST_PASSWORD

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A service logs its state changes (accepted, run ended, expired) by default.
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    env = dict(os.environ)
    try:
        # Read once (fleet.files: a regular file, capped), then judged.
        path = Path(args.config)
        data = read_toml(path, "config")
        if "vcenter" not in data:
            # The built-in simulator's guest password is no secret; defaults may name it.
            env.setdefault(SIM_GUEST_ENV, SIM_GUEST_PASSWORD)
        config = config_from_dict(data, source=path.name, env=env,
                                  base_dir=path.resolve().parent)
        host, port = parse_listen(args.listen, "--listen") if args.listen \
            else config.listen_address
        # Before anything connects or listens (docs/service-tls.md).
        files = tls_files(args, config)
        context = server_tls_context(files) if files is not None else None
        key, source = ("--listen", None) if args.listen else ("listen", config.origin)
        warning = check_listen(host, tls=context is not None, insecure=args.insecure_listen,
                               key=key, source=source)
    except ConfigError as exc:
        _eprint(f"error: {exc}")
        return EXIT_USAGE
    if warning is not None:
        log.warning(warning)

    def listening(url: str) -> None:
        print(f"listening on {redact_url(url)}", flush=True)

    try:
        anyio.run(lambda: serve(config, host, port, on_listening=listening,
                                ssl_context=context))
    except ConfigError as exc:
        _eprint(f"error: {exc}")
        return EXIT_USAGE
    except FleetError as exc:
        _eprint(f"error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK
