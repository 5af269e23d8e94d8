"""The aiohttp transport against scripted loopback servers (and the simulator): keep-alive,
bodies, deadlines, the reply cap, headers, the environment's proxy, and the one
translation of transport failures into fleet errors."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import logging
import socket
import ssl
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from fleet import __version__, errors
from fleet.api.config import config_from_dict
from fleet.cli.serve import connect
from fleet.engine.spec import SpecError
from fleet.metrics import FleetMetrics
from fleet.target import open_target
from fleet.vsphere.session import RetryPolicy
from fleet.vsphere.transport import (
    USER_AGENT,
    BadReply,
    HttpStatusError,
    SoapTransport,
    transport_error,
)
from tests import specs
from tests.simproc import SimProcess
from tests.vsphere.conftest import client_for

pytestmark = pytest.mark.anyio

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # -> keep the connection?


def fixed(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/xml\r\n{extra}Content-Length: {len(body)}"
            f"\r\n\r\n").encode() + body


def chunked(payload: bytes, size: int = 1000) -> bytes:
    return b"".join(f"{len(payload[i:i + size]):x}\r\n".encode() + payload[i:i + size] + b"\r\n"
                    for i in range(0, len(payload), size)) + b"0\r\n\r\n"


class Server:
    """A loopback HTTP/1.1 server whose replies a test scripts, counting connections and
    keeping every request it read."""

    def __init__(self, reply: Callable[[bytes], bytes | None] | Handler) -> None:
        self.reply = reply
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self.handlers: set[asyncio.Task[Any]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if asyncio.iscoroutinefunction(self.reply):
                    if not await self.reply(request, writer):
                        break
                    continue
                out = self.reply(request)  # type: ignore[call-arg]
                if out is None:
                    break  # close without a reply
                if not out:  # never answer (for a while)
                    await asyncio.sleep(5.0)
                    break
                for piece in (out[:7], out[7:]):  # split writes exercise the parser
                    writer.write(piece)
                    await writer.drain()
                if b"Connection: close" in out or (b"Content-Length" not in out
                                                   and b"chunked" not in out):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self.handlers.discard(task)

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await _stop(self.server, self.handlers)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/sdk"


async def _stop(server: asyncio.Server | None, handlers: set[asyncio.Task[Any]]) -> None:
    """Stop listening and end every connection's handler (a scripted server may still
    be sleeping or streaming in one)."""
    assert server is not None
    server.close()
    for task in list(handlers):
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    await server.wait_closed()


@contextlib.asynccontextmanager
async def serving(reply: Any, **kw: Any) -> AsyncIterator[tuple[Server, SoapTransport]]:
    async with Server(reply) as server:
        transport = SoapTransport(server.url, **kw)
        await transport.open()
        try:
            yield server, transport
        finally:
            await transport.close()


async def post(transport: SoapTransport, timeout_s: float = 5.0,
               session_key: str | None = None) -> Any:
    return await transport.post(b"<x/>", action='"urn:vim25/8.0.3.0"', session_key=session_key,
                                timeout_s=timeout_s, method="RetrievePropertiesEx",
                                obj="propertyCollector")


# -- the exchange ------------------------------------------------------------------------

async def test_keep_alive_reuses_one_connection_and_reads_the_cookie() -> None:
    cookie = 'Set-Cookie: vmware_soap_session="52a1"; Path=/; HttpOnly\r\n'
    async with serving(lambda req: fixed(b"<ok/>", extra=cookie)) as (server, transport):
        for _ in range(5):
            reply = await post(transport)
            assert reply.status == 200 and reply.body == b"<ok/>"
            assert reply.session_key == "52a1"
    assert server.connections == 1 and len(server.requests) == 5


async def test_request_headers_are_fleets_own() -> None:
    async with serving(lambda req: fixed(b"<ok/>")) as (server, transport):
        await post(transport, session_key="52a1")
        await post(transport)
    with_cookie, without = (r.split(b"\r\n\r\n")[0].decode().lower() for r in server.requests)
    assert f"user-agent: fleet/{__version__}\r\n" in with_cookie
    assert f"fleet/{__version__}" == USER_AGENT
    assert "aiohttp" not in with_cookie  # no "over aiohttp", no aiohttp default agent
    assert 'soapaction: "urn:vim25/8.0.3.0"' in with_cookie
    assert "content-type: text/xml; charset=utf-8" in with_cookie
    assert "accept-encoding: identity" in with_cookie
    assert 'cookie: vmware_soap_session="52a1"' in with_cookie
    assert "cookie:" not in without  # a cached header set never leaks another call's cookie
    assert "\r\naccept:" not in with_cookie


async def test_chunked_and_gzip_when_asked_for() -> None:
    payload = b"<big>" + b"x" * 70000 + b"</big>"
    raw = (b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n"
           b"Content-Encoding: gzip\r\n\r\n" + chunked(gzip.compress(payload)))
    async with serving(lambda req: raw, compress=True) as (server, transport):
        for _ in range(2):
            reply = await post(transport)
            assert reply.status == 500 and reply.body == payload
    assert server.connections == 1
    assert b"accept-encoding: gzip, deflate" in server.requests[0].lower()


async def test_a_compressed_reply_nobody_asked_for_is_refused() -> None:
    raw = fixed(gzip.compress(b"<ok/>"), extra="Content-Encoding: gzip\r\n")
    async with serving(lambda req: raw) as (_, transport):
        with pytest.raises(errors.ConnectionFailed, match="gzip-encoded"):
            await post(transport)


async def test_close_delimited_body() -> None:
    async with serving(lambda req: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n<eof/>"
                       ) as (server, transport):
        for _ in range(2):
            assert (await post(transport)).body == b"<eof/>"
    assert server.connections == 2


async def test_server_closes_without_reply_is_maybe_delivered() -> None:
    async with serving(lambda req: None) as (_, transport):
        transport.scheme_checked = True  # no wrong-scheme probe: this is about the error
        with pytest.raises(errors.ConnectionFailed) as info:
            await post(transport)
    assert not isinstance(info.value, errors.NotDelivered)
    assert "RetrievePropertiesEx on propertyCollector" in str(info.value)


async def test_deadline_is_a_request_timeout() -> None:
    async with serving(lambda req: b"") as (_, transport):  # never a reply
        with pytest.raises(errors.RequestTimeout):
            await post(transport, timeout_s=0.2)


async def test_refused_is_not_delivered() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    transport = SoapTransport(f"http://127.0.0.1:{port}/sdk")
    await transport.open()
    try:
        with pytest.raises(errors.NotDelivered) as info:
            await post(transport, timeout_s=2.0)
        assert f"cannot connect to 127.0.0.1:{port}" in str(info.value)
    finally:
        await transport.close()


@pytest.mark.parametrize(("status", "expected"), [("503 Service Unavailable", errors.NotDelivered),
                                                  ("502 Bad Gateway", errors.ConnectionFailed)])
async def test_http_statuses(status: str, expected: type[errors.VSphereError]) -> None:
    async with serving(lambda req: fixed(b"busy", status=status)) as (_, transport):
        with pytest.raises(expected) as info:
            await post(transport)
    assert type(info.value) is expected and status.split()[0] in str(info.value)


async def test_500_without_soap_is_unreadable() -> None:
    async with serving(lambda req: fixed(b"oops", status="500 Internal Server Error")
                       ) as (_, transport):
        with pytest.raises(errors.ConnectionFailed, match="without a SOAP body"):
            await post(transport)


async def test_pool_limit_queues_requests() -> None:
    async with serving(lambda req: fixed(b"<ok/>"), max_connections=3) as (server, transport):
        replies = await asyncio.gather(*(post(transport) for _ in range(30)))
    assert all(r.body == b"<ok/>" for r in replies)
    assert server.connections <= 3 and len(server.requests) == 30


# -- the reply cap ----------------------------------------------------------------------------

CAP = 1 << 20  # 1 MiB
BOMB_BYTES = 256 << 20  # what the bomb decompresses to


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """~256 KiB of gzip that inflates to 256 MiB of zeros (built without holding them)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    return b"".join([*(packer.compress(zeros) for _ in range(BOMB_BYTES >> 20)),
                     packer.flush()])


@contextlib.contextmanager
def peak_allocation() -> Iterator[list[int]]:
    """The peak of Python allocations inside the block, in bytes (in the list)."""
    out: list[int] = []
    tracemalloc.start()
    try:
        yield out
    finally:
        out.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


def _assert_names_endpoint_and_cap(error: BaseException, transport: SoapTransport) -> None:
    text = str(error)
    assert f"127.0.0.1:{transport.port}/sdk" in text
    assert f"the cap is {CAP} bytes" in text
    assert text.startswith("RetrievePropertiesEx on propertyCollector: ")


async def test_gzip_bomb_is_cut_at_the_cap(gzip_bomb: bytes) -> None:
    raw = fixed(gzip_bomb, extra="Content-Encoding: gzip\r\n")
    async with serving(lambda req: raw, compress=True, max_reply_bytes=CAP) as (_, transport):
        with peak_allocation() as peak, pytest.raises(errors.ConnectionFailed) as info:
            await post(transport, timeout_s=60)
    _assert_names_endpoint_and_cap(info.value, transport)
    assert peak[0] < 16 * CAP, f"{peak[0]} bytes allocated for a {CAP} byte cap"


async def test_endless_chunked_body_is_cut_at_the_cap() -> None:
    async def endless(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        block = b"%x\r\n%s\r\n" % (1 << 16, b"x" * (1 << 16))
        with contextlib.suppress(ConnectionError):
            for _ in range(BOMB_BYTES >> 16):  # 256 MiB, unless the client hangs up
                writer.write(block)
                await writer.drain()
        return False

    async with serving(endless, max_reply_bytes=CAP) as (_, transport):
        with peak_allocation() as peak, pytest.raises(errors.ConnectionFailed) as info:
            await post(transport, timeout_s=60)
    _assert_names_endpoint_and_cap(info.value, transport)
    assert peak[0] < 16 * CAP, f"{peak[0]} bytes allocated for a {CAP} byte cap"


async def test_announced_length_over_the_cap_is_refused_unread() -> None:
    async def huge(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n<x>" % (CAP + 1))
        await writer.drain()
        await asyncio.sleep(5)  # the rest never comes: the client must not wait for it
        return False

    async with serving(huge, max_reply_bytes=CAP) as (_, transport):
        with pytest.raises(errors.ConnectionFailed) as info:
            await post(transport, timeout_s=30)
    _assert_names_endpoint_and_cap(info.value, transport)
    assert f"announces {CAP + 1} bytes" in str(info.value)


async def test_a_reply_at_the_cap_is_read() -> None:
    body = b"<" + b"x" * (CAP - 3) + b"/>"
    async with serving(lambda req: fixed(body), max_reply_bytes=CAP) as (_, transport):
        assert (await post(transport)).body == body


# -- the environment's proxy, only when the spec says so ------------------------------------

_PROXY_VARIABLES = ("https_proxy", "http_proxy", "no_proxy", "all_proxy")


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


class ConnectProxy:
    """A loopback HTTP proxy that only tunnels (``CONNECT``), recording each target."""

    def __init__(self, refuse: str | None = None) -> None:
        self.refuse = refuse
        self.targets: list[str] = []
        self.heads: list[str] = []
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[Any]] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            verb, target, _ = head.split("\r\n", 1)[0].split(" ", 2)
            self.targets.append(f"{verb} {target}")
            self.heads.append(head)
            if verb != "CONNECT" or self.refuse:
                writer.write(f"HTTP/1.1 {self.refuse or '405 Method Not Allowed'}\r\n"
                             "Content-Length: 0\r\n\r\n".encode())
                await writer.drain()
                writer.close()
                return
            host, port = target.rsplit(":", 1)
            assert host == "127.0.0.1"  # loopback only
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()
        finally:
            self.handlers.discard(task)

    async def __aenter__(self) -> ConnectProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await _stop(self.server, self.handlers)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


async def test_env_proxy_is_used_when_the_spec_says_so(sim: SimProcess,
                                                       clean_proxy_env: pytest.MonkeyPatch
                                                       ) -> None:
    async with ConnectProxy() as proxy:
        clean_proxy_env.setenv("HTTPS_PROXY", proxy.url)
        async with client_for(sim, use_env_proxy=True) as vs:
            assert (await vs.find_vms(["frozen-01"]))[0].name == "frozen-01"
    assert proxy.targets and set(proxy.targets) == {f"CONNECT 127.0.0.1:{sim.port}"}


async def test_env_proxy_is_ignored_by_default(sim: SimProcess,
                                               clean_proxy_env: pytest.MonkeyPatch) -> None:
    async with ConnectProxy() as proxy:
        clean_proxy_env.setenv("HTTPS_PROXY", proxy.url)
        clean_proxy_env.setenv("https_proxy", proxy.url)
        async with client_for(sim) as vs:
            await vs.server_info()
    assert proxy.targets == []


async def test_no_proxy_exempts_the_host(sim: SimProcess,
                                         clean_proxy_env: pytest.MonkeyPatch) -> None:
    async with ConnectProxy() as proxy:
        clean_proxy_env.setenv("HTTPS_PROXY", proxy.url)
        clean_proxy_env.setenv("NO_PROXY", "localhost,127.0.0.1")
        async with client_for(sim, use_env_proxy=True) as vs:
            await vs.server_info()
    assert proxy.targets == []


async def test_a_proxy_that_refuses_the_tunnel_is_not_delivered(
        sim: SimProcess, clean_proxy_env: pytest.MonkeyPatch) -> None:
    async with ConnectProxy(refuse="403 Forbidden") as proxy:
        clean_proxy_env.setenv("HTTPS_PROXY", proxy.url)
        with pytest.raises(errors.NotDelivered, match="proxy refused"):
            async with client_for(sim, use_env_proxy=True,
                                  retry=RetryPolicy(max_retries=0)):
                pass
    assert proxy.targets


async def test_an_https_proxy_url_names_the_key(sim: SimProcess,
                                                clean_proxy_env: pytest.MonkeyPatch) -> None:
    clean_proxy_env.setenv("HTTPS_PROXY", "https://user:s3cret@127.0.0.1:1")
    with pytest.raises(errors.ConfigError) as info:
        async with client_for(sim, use_env_proxy=True):
            pass
    assert info.value.key == "vcenter.use_env_proxy"
    assert "s3cret" not in str(info.value)


async def test_spec_key_reaches_the_client(sim: SimProcess,
                                           clean_proxy_env: pytest.MonkeyPatch) -> None:
    async with ConnectProxy() as proxy:
        clean_proxy_env.setenv("HTTPS_PROXY", proxy.url)
        spec = specs.make_spec(sim, "proxied", 1, vcenter={"use_env_proxy": True})
        async with open_target(spec) as target:
            await target.client.server_info()
    assert proxy.targets == [f"CONNECT 127.0.0.1:{sim.port}"]


async def test_serve_config_key_reaches_the_client(sim: SimProcess,
                                                   clean_proxy_env: pytest.MonkeyPatch) -> None:
    data = {"vcenter": {**specs.spec_data(sim, "serve", 1)["vcenter"], "use_env_proxy": True},
            "api": {"token_env": "API_TOKEN"}}
    config = config_from_dict(data, env={**specs.ENV, "API_TOKEN": "t" * 32})
    async with ConnectProxy() as proxy:
        clean_proxy_env.setenv("HTTPS_PROXY", proxy.url)
        async with connect(config, FleetMetrics(), lambda _: None) as vs:
            await vs.server_info()
    assert proxy.targets == [f"CONNECT 127.0.0.1:{sim.port}"]


async def test_proxy_credentials_go_to_the_proxy_only(sim: SimProcess,
                                                      clean_proxy_env: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    async with ConnectProxy() as proxy:
        clean_proxy_env.setenv("HTTPS_PROXY", proxy.url.replace("://", "://squid:pr0xy-pw@"))
        with caplog.at_level(logging.DEBUG, logger="fleet"):
            async with client_for(sim, use_env_proxy=True) as vs:
                await vs.server_info()
    expected = "Proxy-Authorization: Basic " + base64.b64encode(b"squid:pr0xy-pw").decode()
    assert proxy.heads and all(expected in h for h in proxy.heads)
    assert all(f"User-Agent: {USER_AGENT}\r\n" in h for h in proxy.heads)
    assert "pr0xy-pw" not in caplog.text and "squid" not in caplog.text
    assert any("through the proxy" in r.getMessage() for r in caplog.records)


def test_spec_key_is_validated(sim: SimProcess) -> None:
    with pytest.raises(SpecError) as info:
        specs.make_spec(sim, "proxied", 1, vcenter={"use_env_proxy": "yes"})
    assert info.value.problems == [("vcenter.use_env_proxy", '"yes" must be true or false')]


# -- the one translation of transport failures -----------------------------------------------

_KEY = ConnectionKey("127.0.0.1", 443, True, True, None, None, None, None)


@pytest.mark.parametrize(("exc", "expected"), [
    (aiohttp.ClientConnectorError(_KEY, ConnectionRefusedError(111, "refused")),
     errors.NotDelivered),
    (aiohttp.ConnectionTimeoutError("no connection"), errors.NotDelivered),
    (aiohttp.ClientHttpProxyError(None, (), status=407, message="Proxy Auth Required"),
     errors.NotDelivered),
    (HttpStatusError(503, "Service Unavailable"), errors.NotDelivered),
    (HttpStatusError(502, "Bad Gateway"), errors.ConnectionFailed),
    (aiohttp.ClientPayloadError("closed mid-reply"), errors.ConnectionFailed),
    (ConnectionResetError(104, "reset"), errors.ConnectionFailed),
    (BadReply("junk"), errors.ConnectionFailed),
    (TimeoutError(), errors.RequestTimeout),
    (aiohttp.ServerDisconnectedError(), errors.ConnectionFailed),
    (aiohttp.ServerFingerprintMismatch(b"a" * 32, b"b" * 32, "127.0.0.1", 443),
     errors.TlsVerificationFailed),
    (ssl.SSLCertVerificationError("self-signed certificate"), errors.TlsVerificationFailed),
])
def test_transport_failures(exc: BaseException, expected: type[errors.VSphereError]) -> None:
    error = transport_error(exc, method="RetrievePropertiesEx", obj="propertyCollector")
    assert type(error) is expected
    assert isinstance(error, errors.VSphereError)
    if expected is errors.NotDelivered:
        assert isinstance(error, errors.ConnectionFailed) and error.transient
