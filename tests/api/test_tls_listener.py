"""``fleet serve`` over TLS, and where it may listen without it (docs/service-tls.md).

One real service is started with a certificate generated here (``api.tls_cert`` and
``api.tls_key``) and spoken to as clients would. Everything else is judged before the
service connects or listens, so it runs in-process with ``serve`` replaced by a
recorder: a test that passed because something bound a port cannot happen, and no
test ever binds anything but loopback.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import ssl
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from fleet.cli import build_parser
from fleet.cli import serve as serve_cli
from fleet.cli.serve import TlsFiles, check_listen, off_loopback, server_tls_context
from fleet.errors import ConfigError
from fleet.sim.certs import generate
from tests.api.serveproc import TOKEN, ServeProcess, service_config, to_toml
from tests.simproc import SimProcess

TOKEN_ENV = "FLEET_TLS_TEST_TOKEN"


@pytest.fixture(scope="module")
def pems() -> Iterator[dict[str, Path]]:
    """A certificate for 127.0.0.1 and its key, a second pair's key, an encrypted key."""
    with tempfile.TemporaryDirectory(prefix="fleet-tls-test-") as tmp:
        d = Path(tmp)
        ours, theirs = generate("fleet serve test"), generate("someone else")
        (d / "cert.pem").write_bytes(ours.cert_pem)
        (d / "key.pem").write_bytes(ours.key_pem)
        (d / "other-key.pem").write_bytes(theirs.key_pem)
        key = serialization.load_pem_private_key(ours.key_pem, password=None)
        (d / "encrypted-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase")))
        (d / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
        yield {p.stem: p for p in d.iterdir()}


# -- a real HTTPS listener ----------------------------------------------------------------

def get(port: int, path: str, context: ssl.SSLContext, token: str | None = None
        ) -> tuple[int, Any]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def client(cafile: Path, *, lowest: ssl.TLSVersion | None = None,
           highest: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client that trusts ``cafile`` only, limited to the given protocol versions."""
    context = ssl.create_default_context(cafile=str(cafile))
    if lowest is not None or highest is not None:
        # The system's OpenSSL policy (security level 2) would stop a TLS 1.1 client
        # before it sent a byte; level 0 lets it ask, so the refusal is the server's.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():  # asking for TLS 1.1 is deprecated: that's the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = lowest or ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = highest or ssl.TLSVersion.MAXIMUM_SUPPORTED
    return context


@pytest.fixture(scope="module")
def https_service(sim: SimProcess, pems: dict[str, Path]) -> Iterator[ServeProcess]:
    with tempfile.TemporaryDirectory(prefix="fleet-serve-tls-") as state:
        config = service_config(sim, state, api={"tls_cert": str(pems["cert"]),
                                                 "tls_key": str(pems["key"])})
        with ServeProcess(config) as proc:
            yield proc


def test_the_listener_speaks_https_with_the_configured_certificate(
        https_service: ServeProcess, pems: dict[str, Path]) -> None:
    assert https_service.url == f"https://127.0.0.1:{https_service.port}"
    trusting = client(pems["cert"])
    status, body = get(https_service.port, "/readyz", trusting)
    assert status == 200 and body["status"] == "ready"
    status, body = get(https_service.port, "/v1/fleets", trusting, TOKEN)
    assert status == 200 and "fleets" in body
    # TLS 1.2 is enough, too.
    status, _ = get(https_service.port, "/readyz",
                    client(pems["cert"], highest=ssl.TLSVersion.TLSv1_2))
    assert status == 200


def test_a_client_older_than_tls_1_2_is_refused_by_the_server(
        https_service: ServeProcess, pems: dict[str, Path]) -> None:
    old = client(pems["cert"], lowest=ssl.TLSVersion.TLSv1, highest=ssl.TLSVersion.TLSv1_1)
    with pytest.raises(ssl.SSLError) as caught:
        get(https_service.port, "/readyz", old)
    # The server's refusal (an alert, or asyncio closing before it sends one), not the
    # client failing to offer anything (NO_PROTOCOLS_AVAILABLE): the same client allowed
    # TLS 1.2 is served (above).
    assert caught.value.reason in ("TLSV1_ALERT_PROTOCOL_VERSION",
                                   "UNEXPECTED_EOF_WHILE_READING"), caught.value


def test_plain_http_gets_no_http_answer(https_service: ServeProcess,
                                        pems: dict[str, Path]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", https_service.port, timeout=30)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("GET", "/readyz")
            conn.getresponse().read()
    finally:
        conn.close()
    # ... and the service goes on answering HTTPS.
    status, _ = get(https_service.port, "/healthz", client(pems["cert"]))
    assert status == 200


# -- the certificate and key, judged before anything listens ------------------------------

def test_the_context_is_server_side_and_tls_1_2_or_newer(pems: dict[str, Path]) -> None:
    context = server_tls_context(TlsFiles(pems["cert"], pems["key"]))
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_an_expired_certificate_is_refused(pems: dict[str, Path]) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    with pytest.raises(ConfigError, match=r"^--tls-cert: the certificate in .*cert\.pem "
                                          r"expired on "):
        server_tls_context(TlsFiles(pems["cert"], pems["key"]), now=later)


class Recorder:
    """Stands in for ``serve``: records what it would have served, binds nothing."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, config: Any, host: str, port: int, **kwargs: Any) -> None:
        self.calls.append({"host": host, "port": port, **kwargs})


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
        ) -> Any:
    """``run(*flags, **config)`` -> (exit status, stderr, the recorder)."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)

    def go(*flags: str, **config: Any) -> tuple[int, str, Recorder]:
        recorder = Recorder()
        monkeypatch.setattr(serve_cli, "serve", recorder)
        data = {"listen": "127.0.0.1:0", "api": {"token_env": TOKEN_ENV}}
        for key, value in config.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) else value
        (tmp_path / "serve.toml").write_text(to_toml(data))
        args = build_parser().parse_args(["serve", "--config", str(tmp_path / "serve.toml"),
                                          *flags])
        status = serve_cli.main(args)
        err = capsys.readouterr().err
        if status != 0:
            assert not recorder.calls, "refused, yet it went on to serve"
        return status, err, recorder

    return go


def test_the_flags_serve_https_and_override_the_config(run: Any, pems: dict[str, Path]
                                                       ) -> None:
    # The config's files are not even read when the flags name a pair.
    status, err, recorder = run("--tls-cert", str(pems["cert"]), "--tls-key", str(pems["key"]),
                                api={"tls_cert": "/dev/zero", "tls_key": "/dev/zero"})
    assert status == 0, err
    [call] = recorder.calls
    assert isinstance(call["ssl_context"], ssl.SSLContext)


def test_config_paths_are_relative_to_the_config_file(run: Any, pems: dict[str, Path],
                                                      tmp_path: Path) -> None:
    for name in ("cert", "key"):
        (tmp_path / f"{name}.pem").write_bytes(pems[name].read_bytes())
    status, err, recorder = run(api={"tls_cert": "cert.pem", "tls_key": "key.pem"})
    assert status == 0, err
    assert isinstance(recorder.calls[0]["ssl_context"], ssl.SSLContext)
    status, err, recorder = run()
    assert status == 0 and recorder.calls[0]["ssl_context"] is None


BAD_FLAGS = [
    # (cert, key, what stderr says)
    ("missing", "key", "--tls-cert: cannot read {missing}: No such file or directory"),
    ("/dev/zero", "key", "--tls-cert: cannot read /dev/zero: it is a character device, "
                         "not a regular file"),
    ("cert", "/dev/zero", "--tls-key: cannot read /dev/zero: it is a character device"),
    ("cert", "fifo", "--tls-key: cannot read {fifo}: it is a FIFO, not a regular file"),
    ("cert", "other-key", "--tls-key: {other-key} is not the key of the certificate in "
                          "{cert} (their public keys differ)"),
    ("junk", "key", "--tls-cert: {junk} holds no PEM certificate"),
    ("cert", "cert", "--tls-key: {cert} holds no PEM private key"),
    ("cert", "encrypted-key", "--tls-key: {encrypted-key} is encrypted; fleet serve takes "
                              "a key without a passphrase"),
    ("cert", None, "--tls-key: is missing: --tls-cert is given, and HTTPS needs both"),
    (None, "key", "--tls-cert: is missing: --tls-key is given, and HTTPS needs both"),
]


@pytest.mark.parametrize(("cert", "key", "expected"), BAD_FLAGS)
def test_bad_certificate_or_key_flags_exit_2_naming_the_flag_and_file(
        run: Any, pems: dict[str, Path], tmp_path: Path, cert: str | None, key: str | None,
        expected: str) -> None:
    paths = {**{k: str(v) for k, v in pems.items()},
             "missing": str(tmp_path / "missing.pem"), "fifo": str(tmp_path / "fifo")}
    os.mkfifo(paths["fifo"])  # no writer: opening it must not wait for one
    flags = [*(["--tls-cert", paths.get(cert, cert)] if cert else []),
             *(["--tls-key", paths.get(key, key)] if key else [])]
    status, err, _ = run(*flags)
    assert status == 2
    assert expected.format_map(paths) in err


@pytest.mark.parametrize(("api", "expected"), [
    ({"tls_cert": "cert.pem"}, "serve.toml: api.tls_key: is missing: api.tls_cert is set"),
    ({"tls_key": "key.pem"}, "serve.toml: api.tls_cert: is missing: api.tls_key is set"),
    ({"tls_cert": "/dev/zero", "tls_key": "key.pem"},
     "serve.toml: api.tls_cert: cannot read /dev/zero: it is a character device"),
    ({"tls_cert": "cert.pem", "tls_key": "nope.pem"},
     "serve.toml: api.tls_key: cannot read {dir}/nope.pem: No such file or directory"),
])
def test_bad_certificate_or_key_config_keys_exit_2_naming_the_key(
        run: Any, pems: dict[str, Path], tmp_path: Path, api: dict[str, str],
        expected: str) -> None:
    for name in ("cert", "key"):
        (tmp_path / f"{name}.pem").write_bytes(pems[name].read_bytes())
    status, err, _ = run(api=api)
    assert status == 2
    assert expected.format(dir=tmp_path) in err


# -- where plain HTTP may listen ----------------------------------------------------------

def test_plain_http_off_loopback_is_refused_before_binding(run: Any) -> None:
    status, err, _ = run("--listen", "0.0.0.0:0")
    assert status == 2
    assert ("--listen: 0.0.0.0 is every interface, and without TLS the bearer token would "
            "cross the network in clear") in err
    status, err, _ = run(listen="[::]:8080")
    assert status == 2
    assert "serve.toml: listen: :: is every interface" in err


def test_insecure_listen_allows_it_and_warns(run: Any, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    status, err, recorder = run("--listen", "0.0.0.0:0", "--insecure-listen")
    assert status == 0, err
    assert recorder.calls[0]["host"] == "0.0.0.0" and recorder.calls[0]["ssl_context"] is None
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "INSECURE: plain HTTP on 0.0.0.0, every interface" in warning.getMessage()
    assert "bearer token crosses the network in clear" in warning.getMessage()


def test_with_tls_any_address_is_allowed(run: Any, pems: dict[str, Path],
                                         caplog: pytest.LogCaptureFixture) -> None:
    status, err, recorder = run("--listen", "0.0.0.0:0", "--tls-cert", str(pems["cert"]),
                                "--tls-key", str(pems["key"]))
    assert status == 0, err
    assert isinstance(recorder.calls[0]["ssl_context"], ssl.SSLContext)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1",
                                  "127.1", "localhost"])
def test_loopback_hosts_are_allowed(host: str) -> None:
    assert off_loopback(host) is None
    assert check_listen(host, tls=False, insecure=False) is None


@pytest.mark.parametrize(("host", "what"), [
    ("0.0.0.0", "every interface"), ("::", "every interface"),
    ("0", "every interface (0 resolves to 0.0.0.0)"),
    ("192.168.1.10", "an address that is not loopback"),
    ("10.1.2.3", "an address that is not loopback"),
    ("2001:db8::1", "an address that is not loopback"),
])
def test_other_addresses_are_off_loopback(host: str, what: str) -> None:
    assert off_loopback(host) == what


def fake_dns(answer: list[str] | None) -> Any:
    def resolve(host: str) -> list[str]:
        if answer is None:
            raise ConfigError(f"{host!r} does not resolve: Name or service not known")
        return answer
    return resolve


def test_a_name_is_judged_by_every_address_it_resolves_to() -> None:
    split = fake_dns(["127.0.0.1", "10.0.0.7"])
    with pytest.raises(ConfigError, match=r"^--listen: build\.example is an address that is "
                                          r"not loopback \(build\.example resolves to "
                                          r"10\.0\.0\.7\)"):
        check_listen("build.example", tls=False, insecure=False, resolve=split)
    warning = check_listen("build.example", tls=False, insecure=True, resolve=split)
    assert warning is not None and warning.startswith("INSECURE: plain HTTP on build.example")
    assert check_listen("build.example", tls=False, insecure=False,
                        resolve=fake_dns(["127.0.0.1", "::1"])) is None


def test_a_name_that_does_not_resolve_is_refused_without_tls() -> None:
    with pytest.raises(ConfigError, match=r"^listen: cannot tell whether it is loopback: "
                                          r"'nowhere\.invalid' does not resolve"):
        check_listen("nowhere.invalid", tls=False, insecure=False, key="listen",
                     resolve=fake_dns(None))


def test_with_tls_the_host_is_not_even_resolved() -> None:
    def resolve(host: str) -> list[str]:
        raise AssertionError("resolved")

    assert check_listen("0.0.0.0", tls=True, insecure=False, resolve=resolve) is None
    assert check_listen("ci.example", tls=True, insecure=True, resolve=resolve) is None
