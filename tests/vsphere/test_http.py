"""fleet's small HTTP/1.1 client against a scripted local server."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from fleet.vsphere.http import ConnectFailed, HttpPool, ProtocolError

pytestmark = pytest.mark.anyio

Reply = Callable[[bytes], bytes | None]  # request -> raw reply (None: close without a reply)


def request(body: bytes = b"<x/>") -> bytes:
    return (b"POST /sdk HTTP/1.1\r\nHost: t\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


async def _serve(reply: Reply, stats: dict[str, int]) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats["connections"] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                stats["requests"] += 1
                out = reply(head + body)
                if out is None:
                    break
                if not out:  # a server that never answers (for a while)
                    await asyncio.sleep(1.0)
                    break
                for piece in (out[:7], out[7:]):  # split writes exercise the parser
                    writer.write(piece)
                    await writer.drain()
                if b"Connection: close" in out or (b"Content-Length" not in out and \
                        b"chunked" not in out):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Reply], asyncio.Future[tuple[HttpPool,
                                                                            dict[str, int]]]]]:
    servers: list[asyncio.Server] = []
    pools: list[HttpPool] = []

    async def start(reply: Reply, **kw: float) -> tuple[HttpPool, dict[str, int]]:
        stats = {"connections": 0, "requests": 0}
        server, port = await _serve(reply, stats)
        servers.append(server)
        pool = HttpPool("127.0.0.1", port, ssl_context=None, **kw)  # type: ignore[arg-type]
        pools.append(pool)
        return pool, stats

    yield start  # type: ignore[misc]
    for pool in pools:
        await pool.close()
    for server in servers:
        server.close()
        await server.wait_closed()


def fixed(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/xml\r\n{extra}Content-Length: {len(body)}"
            f"\r\n\r\n").encode() + body


async def test_keep_alive_reuses_one_connection(serve) -> None:  # type: ignore[no-untyped-def]
    pool, stats = await serve(lambda req: fixed(b"<ok/>", extra="Set-Cookie: a=1\r\n"))
    for _ in range(5):
        response = await pool.request(request(), 5.0)
        assert response.status == 200 and response.body == b"<ok/>"
        assert response.headers["set-cookie"] == "a=1"
    assert stats["connections"] == 1 and stats["requests"] == 5


async def test_chunked_and_gzip(serve) -> None:  # type: ignore[no-untyped-def]
    payload = b"<big>" + b"x" * 70000 + b"</big>"
    packed = gzip.compress(payload)
    chunks = b"".join(f"{len(packed[i:i + 1000]):x}\r\n".encode() + packed[i:i + 1000] + b"\r\n"
                      for i in range(0, len(packed), 1000))
    raw = (b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n"
           b"Content-Encoding: gzip\r\n\r\n" + chunks + b"0\r\n\r\n")
    pool, stats = await serve(lambda req: raw)
    for _ in range(2):
        response = await pool.request(request(), 5.0)
        assert response.status == 500 and response.body == payload
    assert stats["connections"] == 1


async def test_connection_close_and_close_delimited_body(serve) -> None:  # type: ignore[no-untyped-def]
    pool, stats = await serve(lambda req: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n<eof/>")
    for _ in range(2):
        assert (await pool.request(request(), 5.0)).body == b"<eof/>"
    assert stats["connections"] == 2


async def test_server_closes_without_reply(serve) -> None:  # type: ignore[no-untyped-def]
    pool, _ = await serve(lambda req: None)
    with pytest.raises(ProtocolError):
        await pool.request(request(), 5.0)


async def test_deadline(serve) -> None:  # type: ignore[no-untyped-def]
    pool, _ = await serve(lambda req: b"")  # never a reply, connection kept
    with pytest.raises(TimeoutError):
        await pool.request(request(), 0.2)
    assert pool._count == 0  # the connection was thrown away


async def test_refused_is_a_connect_failure() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = HttpPool("127.0.0.1", port, ssl_context=None)
    with pytest.raises(ConnectFailed):
        await pool.request(request(), 2.0)
    await pool.close()


async def test_pool_limit_queues_requests(serve) -> None:  # type: ignore[no-untyped-def]
    pool, stats = await serve(lambda req: fixed(b"<ok/>"), limit=3)
    results = await asyncio.gather(*(pool.request(request(), 5.0) for _ in range(30)))
    assert all(r.body == b"<ok/>" for r in results)
    assert stats["connections"] <= 3 and stats["requests"] == 30


async def test_idle_connections_expire(serve) -> None:  # type: ignore[no-untyped-def]
    pool, stats = await serve(lambda req: fixed(b"<ok/>"), keepalive_s=0.05)
    await pool.request(request(), 5.0)
    await asyncio.sleep(0.1)
    await pool.request(request(), 5.0)
    assert stats["connections"] == 2
