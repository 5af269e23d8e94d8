"""The HTTP edge of ``fleet serve``: how connections are accepted, bounded and timed out.

Everything a client can hold without a token (a socket, header bytes, a place
in the accept queue) is bounded here, so no client, slow or hostile, can stop
the service from answering ``/healthz`` and ``/v1``:

- **File descriptors.** :func:`fd_budget` raises the soft ``RLIMIT_NOFILE``
  toward the hard limit (as far as the configuration needs) and splits what
  there is between the process's own files, the accept batch, the vCenter
  client's connection pool and the API's connections.
- **Connections.** :class:`ConnectionGuard` wraps the protocol factory given
  to ``loop.create_server``. At ``api.max_connections`` (or the fd budget, if
  lower) a new connection closes the longest-idle one (no request in a
  handler: idle keep-alive, half-sent headers, an unread response); only when
  every connection is inside a handler is the new one refused with a 503.
  Serving newcomers first is what keeps ``/healthz`` answering while an
  attacker holds the limit: it costs the attacker a connection per request
  the service answers. The kernel's accept queue is made long
  (:data:`LISTEN_QUEUE`) while asyncio's accept batch stays short, so a
  connection flood delays a health check rather than dropping its SYN.
- **Time.** A connection that has not sent complete request headers within
  ``api.idle_timeout_s`` of connecting is closed (aiohttp has no header
  timeout; only its newest releases start ``keepalive_timeout`` on connecting,
  and ``pyproject.toml`` allows 3.9), as is one that leaves a response unread
  that long (aiohttp waits for the socket to drain forever). Between requests,
  aiohttp's own ``keepalive_timeout`` (the same value) closes idle and
  half-sent keep-alive connections. Request bodies have ``api.body_timeout_s``
  (:mod:`fleet.api.app`).
- **Header bytes.** aiohttp bounds each header line (``max_field_size``) and
  their number (``max_headers``), not their sum: 128 headers of 8 KiB kept
  ~1.9 MB per half-open connection. :data:`MAX_HEADERS` keeps a connection's
  worst case near 0.5 MB (so 0.5 GB at 1,024 connections, for an attacker who
  sends 256 MB of headers and holds them).
- **Logs.** A malformed request is answered 400 (431 when a line is too long)
  in the API's JSON error shape and logged in one line that echoes none of its
  bytes; repeated events (malformed requests, connections closed at the limit
  or timed out, ``accept()`` failing for lack of fds) are logged once, or a
  few times, a minute, with a count of the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong

from fleet.api.config import ApiSection
from fleet.errors import ConfigError, FleetError
from fleet.urls import host_port

log = logging.getLogger("fleet.api.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: fds the process needs besides connections: stdio, the epoll fd and self-pipe, the
#: listener, state and certificate files, a built-in simulator's pipes (9 seen idle)
BASE_FDS = 32
#: the vCenter client's pool when fds are plentiful (fleet.vsphere.transport's default)
VCENTER_CONNECTIONS = 256
#: the least that is worth serving with, for the API and for the vCenter client each
MIN_CONNECTIONS = 16
#: the least open-file limit fleet serve starts with: 40 API connections, 5 batches deep
MIN_NOFILE = 128
#: asyncio accepts up to this many sockets per wake-up before the guard sees any, so
#: twice this is kept free for them. At most 1/16 of the fds, so that the connection
#: limit stays several batches deep: a new connection needs a few loop turns to start
#: its request, while each newer one closes the longest-idle (see ConnectionGuard).
MAX_BACKLOG = 128
MIN_BACKLOG = 8
#: the kernel's accept queue (capped by net.core.somaxconn): queued connections cost
#: no fd, and one dropped for want of room waits a second for its SYN's retransmit
LISTEN_QUEUE = 4096
#: aiohttp's default is 128; an API client sends a dozen (see the module docstring)
MAX_HEADERS = 32
#: how often a repeated event is logged
LOG_EVERY_S = 60.0
_ACCEPT_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


# -- file descriptors ---------------------------------------------------------------------

@dataclass(frozen=True)
class FdBudget:
    """How the open-file limit is shared out."""

    nofile: int                 # the soft RLIMIT_NOFILE in force
    raised_from: int | None     # the soft limit before fleet raised it, if it did
    backlog: int
    api_connections: int
    vcenter_connections: int

    def describe(self) -> str:
        raised = f", raised from {self.raised_from}" if self.raised_from is not None else ""
        return (f"at most {self.api_connections} API connections and "
                f"{self.vcenter_connections} to vCenter (open-file limit {self.nofile}{raised})")


def fd_budget(max_connections: int, *, raise_limit: bool = True) -> FdBudget:
    """Raise the soft fd limit as far as needed (and allowed), then share it out."""
    wanted = BASE_FDS + 2 * MAX_BACKLOG + VCENTER_CONNECTIONS + max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised_from = None
    if raise_limit and soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                raised_from, soft = soft, target
            except (ValueError, OSError):
                pass  # not allowed here: share out what there is
    return share_fds(soft, max_connections, raised_from=raised_from)


def share_fds(nofile: int, max_connections: int, *, raised_from: int | None = None
              ) -> FdBudget:
    limit = nofile if nofile != resource.RLIM_INFINITY else 1 << 20
    if limit < MIN_NOFILE:
        raise FleetError(f"the open-file limit (RLIMIT_NOFILE, `ulimit -n`) is {limit}; "
                         f"fleet serve needs at least {MIN_NOFILE}")
    backlog = max(MIN_BACKLOG, min(MAX_BACKLOG, limit // 16))
    spare = limit - BASE_FDS - 2 * backlog
    vcenter = min(VCENTER_CONNECTIONS, spare // 2)
    api = min(max_connections, spare - vcenter)
    return FdBudget(nofile=limit, raised_from=raised_from, backlog=backlog,
                    api_connections=api, vcenter_connections=vcenter)


# -- logging ------------------------------------------------------------------------------

class Throttled:
    """Log up to ``burst`` events a window of ``every_s``; the next line counts the rest."""

    def __init__(self, level: int, *, burst: int = 1, every_s: float = LOG_EVERY_S) -> None:
        self.level = level
        self.burst = burst
        self.every_s = every_s
        self._window_end = 0.0
        self._logged = 0
        self._skipped = 0

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now >= self._window_end:
            self._window_end = now + self.every_s
            self._logged = 0
        if self._logged >= self.burst:
            self._skipped += 1
            return
        if self._skipped:
            message += f" (and {self._skipped} more like it before)"
            self._skipped = 0
        self._logged += 1
        log.log(self.level, message, *args)


@contextlib.contextmanager
def quiet_accept_errors(loop: asyncio.AbstractEventLoop, nofile: int) -> Iterator[None]:
    """asyncio logs every failed ``accept()``, up to ``backlog`` times per wake-up: with
    no fd left that was 1.8M lines in 75 s. Log it once a minute instead."""
    previous = loop.get_exception_handler()
    report = Throttled(logging.ERROR)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if "socket" in context and isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS:
            report("cannot accept connections: %s (open-file limit %d); retrying",
                   exc.strerror or exc, nofile)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)


# -- connections --------------------------------------------------------------------------

def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "message": message}}


_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s")


class _Refused(asyncio.Protocol):
    """Every connection is inside a handler: say so and hang up."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        body = json.dumps(_error_body(503, "too many connections; retry")).encode()
        assert isinstance(transport, asyncio.Transport)
        transport.write(_REFUSED % (len(body), body))
        transport.close()


class _Conn(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, the guard's bookkeeping around."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.born = guard.loop.time()
        self.requests = 0
        self.busy = False
        self.paused_since: float | None = None
        self.timer: asyncio.TimerHandle | None = guard.loop.call_at(
            self.born + guard.idle_timeout_s, self._check)

    # asyncio.Protocol: everything goes on to aiohttp
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.paused_since = self.guard.loop.time()
        if self.timer is None:
            self.timer = self.guard.loop.call_at(
                self.paused_since + self.guard.idle_timeout_s, self._check)
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.paused_since = None
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.guard._forget(self)
        if self.transport is not None:
            self.inner.connection_lost(exc)

    # the guard's side
    def close(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():
            transport.abort()  # close() would wait for the client to read it all
        else:
            transport.close()

    def _check(self) -> None:
        self.timer = None
        now = self.guard.loop.time()
        timeout = self.guard.idle_timeout_s
        deadlines = []
        if self.requests == 0 and not self.busy:
            deadlines.append(self.born + timeout)
        if self.paused_since is not None:
            deadlines.append(self.paused_since + timeout)
        if not deadlines:
            return  # between requests aiohttp's keepalive_timeout takes over
        if self.transport is None:
            self.guard._forget(self)  # accepted but never connected
            return
        due = min(deadlines)
        if now < due:
            self.timer = self.guard.loop.call_at(due, self._check)
            return
        self.guard._timed_out(self, "sent no complete request" if self.requests == 0
                              else "left a response unread")
        self.close()


class ConnectionGuard:
    """At most ``limit`` open connections; none held for long without progress."""

    def __init__(self, limit: int, idle_timeout_s: float) -> None:
        self.limit = limit
        self.idle_timeout_s = idle_timeout_s
        self.loop = asyncio.get_running_loop()
        self._open: set[_Conn] = set()
        self._idle: OrderedDict[_Conn, None] = OrderedDict()  # not in a handler, oldest first
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0
        self._at_limit = Throttled(logging.WARNING)
        self._timeouts = Throttled(logging.INFO)

    @property
    def open(self) -> int:
        return len(self._open)

    def factory(self, make: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """Wrap a protocol factory for ``loop.create_server``."""

        def guarded() -> asyncio.Protocol:
            if len(self._open) >= self.limit and not self._evict():
                self.refused += 1
                self._at_limit("at the limit of %d open connections, all busy: refusing "
                               "new ones with 503", self.limit)
                return _Refused()
            conn = _Conn(self, make())
            self._open.add(conn)
            self._idle[conn] = None
            return conn

        return guarded

    def _evict(self) -> bool:
        for victim in self._idle:
            if victim.transport is not None:
                break
        else:
            return False
        self._forget(victim)
        victim.close()
        self.evicted += 1
        self._at_limit("at the limit of %d open connections: closing the longest idle "
                       "ones to admit new ones", self.limit)
        return True

    def _forget(self, conn: _Conn) -> None:
        self._open.discard(conn)
        self._idle.pop(conn, None)

    def _timed_out(self, conn: _Conn, what: str) -> None:
        self.timed_out += 1
        self._timeouts("closed a connection that %s within %g s", what, self.idle_timeout_s)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outermost: a connection inside a handler is busy, neither idle nor evictable."""
        transport = request.transport
        conn = transport.get_protocol() if transport is not None else None
        if not isinstance(conn, _Conn):
            return await handler(request)
        conn.requests += 1
        conn.busy = True
        self._idle.pop(conn, None)
        try:
            return await handler(request)
        finally:
            conn.busy = False
            if conn in self._open:
                self._idle[conn] = None  # the newest idle one


# -- requests aiohttp refuses before any route --------------------------------------------

class _RequestHandler(web.RequestHandler):
    """aiohttp's protocol, answering unparseable requests in the API's error shape."""

    #: one log per kind of refusal, shared by every connection
    _malformed: ClassVar[dict[tuple[int, str], Throttled]] = {}

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # aiohttp's messages quote up to 100 bytes of the request: neither the log nor
        # the answer repeats them (they may be a token).
        if isinstance(exc, LineTooLong):
            status = 431
            what = f"its request line or a header is longer than {self.max_field_size} bytes"
        elif "too many headers" in exc.message.lower():
            status, what = 431, f"it has more than {self.max_headers} headers"
        elif isinstance(exc, BadHttpMethod):
            status, what = 400, "it is not HTTP (TLS to a plain-HTTP port?)"
        else:
            status, what = 400, f"it is not valid HTTP/1.1 ({type(exc).__name__})"
        report = self._malformed.setdefault((status, what),
                                            Throttled(logging.INFO, burst=5))
        report("refused a request from %s: %s (%d)", request.remote or "an unknown peer",
               what, status)
        response = web.json_response(_error_body(status, f"refused: {what}"), status=status)
        response.force_close()
        return response


def handler_options(api: ApiSection) -> dict[str, Any]:
    """aiohttp ``RequestHandler`` options (also given to the ``AppRunner``)."""
    return {
        "access_log": None,
        # Between requests: idle and half-sent keep-alive connections are closed.
        "keepalive_timeout": api.idle_timeout_s,
        "max_headers": MAX_HEADERS,
    }


def site_url(host: str, port: int, tls: bool) -> str:
    """``http(s)://HOST:PORT``, an IPv6 address in brackets."""
    return f"{'https' if tls else 'http'}://{host_port(host, port)}"


class _Site(web.BaseSite):
    """aiohttp's TCPSite, with the guard's protocol factory (and TLS, when given: the
    handshake has the idle timeout, as a client that sends no request does)."""

    __slots__ = ("_factory", "_handshake_timeout_s", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 factory: Callable[[], asyncio.Protocol], backlog: int, *,
                 ssl_context: ssl.SSLContext | None = None,
                 handshake_timeout_s: float | None = None) -> None:
        super().__init__(runner, backlog=backlog, ssl_context=ssl_context)
        self._host, self._port, self._factory = host, port, factory
        self._handshake_timeout_s = handshake_timeout_s

    @property
    def name(self) -> str:
        return site_url(self._host, self._port, self._ssl_context is not None)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        tls = self._ssl_context is not None
        self._server = await loop.create_server(
            self._factory, self._host, self._port, backlog=self._backlog,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._handshake_timeout_s if tls else None)
        # asyncio uses one number for the kernel's accept queue and for how many sockets
        # it accepts per wake-up. The batch must stay small (it costs fds, and a batch
        # larger than the limit would evict its own members), but a short queue
        # overflowing under a connection flood drops SYNs: a health check then waits for
        # the 1 s retransmit. listen() again, on a duplicate of the same socket,
        # lengthens the queue alone.
        for listener in self._server.sockets:
            with socket.socket(fileno=os.dup(listener.fileno())) as same:
                same.listen(LISTEN_QUEUE)


@contextlib.asynccontextmanager
async def serve_http(app: web.Application, api: ApiSection, budget: FdBudget, host: str,
                     port: int, *, ssl_context: ssl.SSLContext | None = None
                     ) -> AsyncIterator[str]:
    """Serve ``app`` on HOST:PORT behind a :class:`ConnectionGuard`, over TLS with
    ``ssl_context`` (docs/service-tls.md); yields the URL."""
    loop = asyncio.get_running_loop()
    guard = ConnectionGuard(budget.api_connections, api.idle_timeout_s)
    app.middlewares.insert(0, guard.middleware)  # before the app freezes, in setup()
    options = handler_options(api)
    # A client that hangs up does not cancel its handler: an accepted request is
    # recorded whole.
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=False, **options)
    with quiet_accept_errors(loop, budget.nofile):
        await runner.setup()
        try:
            server = runner.server
            assert server is not None

            def make() -> asyncio.Protocol:
                return _RequestHandler(server, loop=loop, **options)

            site = _Site(runner, host, port, guard.factory(make), budget.backlog,
                         ssl_context=ssl_context, handshake_timeout_s=api.idle_timeout_s)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                                  key="listen") from None
            log.info("serving %s", budget.describe())
            bound = runner.addresses[0]
            yield site_url(host, bound[1], ssl_context is not None)
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
