"""A small HTTP/1.1 client on asyncio protocols, just enough for vim25 SOAP.

Why not only aiohttp: measured on the client benchmark, a SOAP exchange
through ``aiohttp.ClientSession`` costs about 250 us of client CPU, of which
only ~110 us is the unavoidable part (asyncio TLS, sockets, event loop); the
rest is request/response machinery SOAP does not need. This client keeps the
unavoidable part: one request at a time per keep-alive connection, a bounded
pool, per-request deadlines, ``Content-Length`` and ``chunked`` bodies,
``gzip``/``deflate`` when asked for, ``Connection: close``. No redirects, no
proxies, no cookies (the session layer sends its one cookie by hand).

TLS: a verifying ``ssl.SSLContext``, or an unverified one plus a pinned
SHA-256 thumbprint that is checked right after the handshake, before any byte
of a request is written.

Failures are classified for the retry rule: :class:`ConnectFailed` (the
request was never written: connection refused, TLS handshake or verification
failed, no free connection in time) versus anything after the request was
written (the server may have acted on it). Two of them can mean the URL has
the wrong scheme, which :func:`speaks_tls` and :func:`answers_plain_http` can
then tell: :class:`TlsHandshakeFailed` (an https URL, a server that may speak
plain http) and :class:`ClosedBeforeReply` (an http URL, a server that may
speak TLS and drops the plaintext request).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
import time
import zlib
from dataclasses import dataclass

__all__ = ["ClosedBeforeReply", "ConnectFailed", "HttpPool", "HttpResponse",
           "PinnedCertificateMismatch", "ProtocolError", "TlsHandshakeFailed",
           "answers_plain_http", "speaks_tls"]

MAX_HEADER_BYTES = 64 * 1024


class ConnectFailed(ConnectionError):
    """No connection could be made; the request was not sent."""


class TlsHandshakeFailed(ConnectFailed):
    """The TLS handshake failed for another reason than the certificate (not sent)."""


class PinnedCertificateMismatch(ssl.SSLError):
    """The server's certificate is not the pinned one (the request was not sent)."""


class ProtocolError(ConnectionError):
    """The server's reply is not HTTP/1.1 we understand, or it closed mid-reply."""


class ClosedBeforeReply(ProtocolError):
    """The server closed the connection before a complete status line and headers."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with "\n"
    body: bytes


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: _Reply | None = None
        self._head: tuple[int, str, dict[str, str]] | None = None
        self._length: int | None = None  # Content-Length, or None for chunked / until close
        self._chunked = False
        self._chunks: list[bytes] = []
        self._chunk_left = -1
        self._closed = False
        self.reusable = True
        self.last_used = time.monotonic()
        self.lost = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.reusable = False
        if not self.lost.done():
            self.lost.set_result(None)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._head is not None and self._length is None and not self._chunked:
                self._finish(bytes(self._buffer))  # a body delimited by the close
            else:
                kind = ClosedBeforeReply if self._head is None else ProtocolError
                waiter.set_exception(kind(
                    "the server closed the connection before a complete reply"
                    + (f" ({exc})" if exc else "")))

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            # Bytes nobody asked for: the connection is out of step; drop it.
            self.reusable = False
            if self.transport is not None:
                self.transport.close()
            return
        self._buffer += data
        try:
            self._parse()
        except ProtocolError as exc:
            self.reusable = False
            if not self._waiter.done():
                self._waiter.set_exception(exc)
            if self.transport is not None:
                self.transport.close()

    # -- requests -----------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed or self.transport is None or self.transport.is_closing()

    def send(self, data: bytes) -> _Reply:
        assert self.transport is not None
        self._waiter = _Reply()
        self._buffer.clear()
        self._head = None
        self._length = None
        self._chunked = False
        self._chunks = []
        self._chunk_left = -1
        self.transport.write(data)
        return self._waiter

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    # -- parsing ------------------------------------------------------------------
    def _parse(self) -> None:
        buf = self._buffer
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise ProtocolError("response headers too large")
                return
            self._head = self._parse_head(bytes(buf[:end]))
            del buf[:end + 4]
            status, _, headers = self._head
            if status in (204, 304) or 100 <= status < 200:
                if 100 <= status < 200:  # an interim reply: wait for the real one
                    self._head = None
                    self._parse()
                    return
                self._finish(b"")
                return
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._chunked = True
            elif "content-length" in headers:
                try:
                    self._length = int(headers["content-length"])
                except ValueError:
                    raise ProtocolError("bad Content-Length") from None
            else:
                self.reusable = False  # body ends when the server closes
        if self._chunked:
            self._parse_chunks()
        elif self._length is not None and len(buf) >= self._length:
            body = bytes(buf[:self._length])
            extra = len(buf) - self._length
            if extra:
                self.reusable = False
            self._finish(body)

    def _parse_chunks(self) -> None:
        buf = self._buffer
        while True:
            if self._chunk_left < 0:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size_text = bytes(buf[:end]).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ProtocolError("bad chunk size") from None
                del buf[:end + 2]
                if size == 0:
                    # Trailers (usually none) end with an empty line.
                    end = buf.find(b"\r\n")
                    while end > 0:
                        del buf[:end + 2]
                        end = buf.find(b"\r\n")
                    if end < 0:
                        self._chunk_left = -2  # wait for the final CRLF
                        return
                    del buf[:2]
                    self._finish(b"".join(self._chunks))
                    return
                self._chunk_left = size
            if self._chunk_left == -2:
                return
            if len(buf) < self._chunk_left + 2:
                return
            self._chunks.append(bytes(buf[:self._chunk_left]))
            del buf[:self._chunk_left + 2]
            self._chunk_left = -1

    @staticmethod
    def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.x reply: {lines[0][:60]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            raise ProtocolError(f"bad status line {lines[0][:60]!r}") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                continue
            key = name.strip().lower()
            value = value.strip()
            headers[key] = headers[key] + "\n" + value if key in headers else value
        return status, parts[2] if len(parts) > 2 else "", headers

    def _finish(self, body: bytes) -> None:
        assert self._head is not None
        status, reason, headers = self._head
        if headers.get("connection", "").lower() == "close":
            self.reusable = False
        encoding = headers.get("content-encoding", "identity").lower()
        try:
            if encoding == "gzip":
                body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
            elif encoding == "deflate":
                body = zlib.decompress(body)
        except zlib.error as exc:
            raise ProtocolError(f"bad {encoding} body ({exc})") from None
        self.last_used = time.monotonic()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(HttpResponse(status, reason, headers, body))


class _Reply(asyncio.Future[HttpResponse]):
    """The reply future; ``expired`` tells a deadline from an outside cancellation."""

    expired = False


def _expire(fut: _Reply) -> None:
    if not fut.done():
        fut.expired = True
        fut.cancel()


class HttpPool:
    """Keep-alive connections to one ``host:port``, at most ``limit`` at once."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None,
                 pinned_sha256: bytes | None = None, limit: int = 256,
                 keepalive_s: float = 15.0, connect_timeout_s: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.pinned_sha256 = pinned_sha256
        self.limit = limit
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self._idle: collections.deque[_Connection] = collections.deque()
        self._count = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._all: set[_Connection] = set()
        self._closed = False
        self.connections_made = 0

    async def request(self, data: bytes, timeout_s: float | None) -> HttpResponse:
        """Send one complete request (head and body) and read its reply."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        conn = await self._acquire(deadline)
        fut = conn.send(data)
        timer = None
        if deadline is not None:
            # A plain timer on the reply future (cheaper than a timeout scope per call).
            timer = asyncio.get_running_loop().call_later(
                max(0.0, deadline - time.monotonic()), _expire, fut)
        done = False
        try:
            try:
                response = await fut
            except asyncio.CancelledError:
                if timer is not None and getattr(fut, "expired", False):
                    raise TimeoutError from None
                raise
            done = True
            return response
        finally:
            if timer is not None:
                timer.cancel()
            if done and conn.reusable and not conn.closed:
                self._release(conn)
            else:
                conn.close()
                self._forget()

    async def _acquire(self, deadline: float | None) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.closed or now - conn.last_used > self.keepalive_s:
                conn.close()
                self._count -= 1
                continue
            return conn
        while self._count >= self.limit:
            if self._closed:
                raise ConnectFailed("the connection pool is closed")
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                if deadline is None:
                    await waiter
                else:
                    remaining = max(0.0, deadline - time.monotonic())
                    try:
                        async with asyncio.timeout(remaining):
                            await waiter
                    except TimeoutError:
                        raise ConnectFailed("no free connection before the deadline") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
                conn.close()
                self._count -= 1
        if self._closed:
            raise ConnectFailed("the connection pool is closed")
        self._count += 1
        try:
            return await self._connect(deadline)
        except BaseException:
            self._forget()
            raise

    async def _connect(self, deadline: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        timeout = self.connect_timeout_s
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=self.ssl_context,
                    server_hostname=self.host if self.ssl_context is not None else None)
        except TimeoutError:
            raise ConnectFailed(f"no connection to {self.host}:{self.port} within "
                                f"{timeout:.1f} s") from None
        except ssl.SSLCertVerificationError:
            raise
        except ssl.SSLError as exc:
            raise TlsHandshakeFailed(f"cannot connect to {self.host}:{self.port}: TLS handshake "
                                     f"failed ({exc.reason or exc})") from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._all.add(conn)
        conn.lost.add_done_callback(lambda _: self._all.discard(conn))
        if self.pinned_sha256 is not None:
            assert conn.transport is not None
            sslobj = conn.transport.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            if der is None or hashlib.sha256(der).digest() != self.pinned_sha256:
                conn.close()
                raise PinnedCertificateMismatch(
                    "the server certificate's SHA-256 thumbprint is not the pinned one")
        self.connections_made += 1
        return conn

    def _release(self, conn: _Connection) -> None:
        conn.last_used = time.monotonic()
        if self._closed:
            conn.close()
            self._forget()
            return
        self._idle.append(conn)
        self._wake_one()

    def _forget(self) -> None:
        self._count -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self, timeout_s: float = 1.0) -> None:
        """Close every connection, idle or busy, and wait (briefly) until they are closed."""
        self._closed = True
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        conns = list(self._all)
        for conn in conns:
            conn.close()
        if conns:
            _, pending = await asyncio.wait([c.lost for c in conns], timeout=timeout_s)
            for conn in conns:
                if not conn.lost.done() and conn.transport is not None:
                    conn.transport.abort()
            if pending:
                await asyncio.wait(pending, timeout=timeout_s)


# -- what does a server speak? (asked only after a failure that suggests the wrong scheme) --

def _unverified_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def speaks_tls(host: str, port: int, timeout_s: float) -> bool:
    """True if a TLS handshake with ``host:port`` completes (the certificate unchecked:
    this only asks which protocol the server speaks, and nothing is sent over it)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(
                asyncio.Protocol, host, port, ssl=_unverified_context(), server_hostname=host)
    except (OSError, TimeoutError):
        return False
    transport.abort()
    return True


async def answers_plain_http(host: str, port: int, timeout_s: float) -> bool:
    """True if ``host:port`` answers a plaintext ``HEAD /`` with an HTTP status line."""
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode("latin-1"))
            return (await reader.readexactly(5)) == b"HTTP/"
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        if writer is not None:
            writer.transport.abort()
