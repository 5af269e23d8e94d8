"""A client transport that talks to a simulator in the same process, without sockets.

:class:`LoopbackTransport` has the interface the session uses of
``fleet.vsphere.transport.SoapTransport`` (``open``, ``negotiate``, ``post``,
``close``; :class:`fleet.vsphere.transport.Transport`) and serves each exchange
with the simulator's own endpoint (``fleet.sim.dispatch.SoapEndpoint``), which is
also what the simulator's HTTP server calls. Nothing is short-cut:

- the request is the bytes pyVmomi's serializer made, with the ``SOAPAction``,
  ``Cookie`` and ``User-Agent`` the HTTP transport sends; the reply is the bytes
  the simulator encoded, read by pyVmomi's deserializer;
- the session cookie travels as a ``Cookie`` header and comes back as the
  simulator's ``Set-Cookie``, read by the same function as over HTTP;
- a failed exchange raises what ``SoapTransport`` raises for it, made by the same
  translation (``transport_error``; docs/transport.md): an injected connection
  reset or lost reply is ``ConnectionFailed``, HTTP 503 ``NotDelivered``, a passed
  deadline ``RequestTimeout``, another status ``ConnectionFailed``.

The simulator's work for a request runs as a task of its own, as a server's
handler does: a client that gives up (its deadline, its cancellation) leaves
the call running in vCenter, and its effects land all the same. A
:class:`LoopbackServer` owns that work and cancels what is left when it closes,
as a server shutting down does.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Coroutine
from typing import Any

import aiohttp
import anyio

from fleet.errors import NotDelivered
from fleet.sim.dispatch import VERSIONS_PATH, SoapEndpoint, SoapReply
from fleet.vsphere.transport import (
    MAX_REPLY_BYTES,
    USER_AGENT,
    BadReply,
    Reply,
    check_reply,
    cookie_header,
    session_key_of,
    transport_error,
    version_of_reply,
)

#: What logs and errors show as the endpoint of a loopback client.
LOOPBACK_URL = "http://loopback.invalid/sdk"


class LoopbackServer:
    """Serves requests of loopback transports with one simulator endpoint."""

    def __init__(self, endpoint: SoapEndpoint) -> None:
        self.endpoint = endpoint
        self._work: set[asyncio.Task[Any]] = set()
        self.closed = False

    def transport(self, url: str = LOOPBACK_URL, *,
                  max_reply_bytes: int = MAX_REPLY_BYTES) -> LoopbackTransport:
        return LoopbackTransport(self, url, max_reply_bytes=max_reply_bytes)

    def serve(self, work: Coroutine[Any, Any, SoapReply]) -> asyncio.Task[SoapReply]:
        """Run one request's work as the server's own task."""
        task = asyncio.get_running_loop().create_task(work)
        self._work.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._work.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a client that gave up does not read it

    async def aclose(self) -> None:
        """Stop serving: work still running is cancelled, as by a server shutting down."""
        self.closed = True
        work = list(self._work)
        for task in work:
            task.cancel()
        if work:
            await asyncio.gather(*work, return_exceptions=True)


class LoopbackTransport:
    """``SoapTransport``'s interface over a :class:`LoopbackServer`; see the module."""

    def __init__(self, server: LoopbackServer, url: str = LOOPBACK_URL, *,
                 max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self.server = server
        self.url = url
        self.max_reply_bytes = max_reply_bytes
        self._open = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    async def _exchange(self, work: Coroutine[Any, Any, SoapReply], timeout_s: float | None,
                        method: str, obj: str | None) -> SoapReply:
        if not self._open:
            work.close()
            raise RuntimeError("the transport is not open")
        if self.server.closed:
            work.close()
            # as a refused connection: nothing reached the simulator
            raise NotDelivered(f"{method}: cannot connect to {self.url}: the simulator has "
                               "stopped", method=method, obj=obj)
        task = self.server.serve(work)
        try:
            with anyio.fail_after(timeout_s):
                # shield: the client giving up does not stop the server's work
                reply = await asyncio.shield(task)
        except TimeoutError as exc:
            raise transport_error(exc, method=method, obj=obj) from exc
        if reply.drop == "reset":
            raise transport_error(aiohttp.ClientOSError(errno.ECONNRESET,
                                                        "Connection reset by peer"),
                                  method=method, obj=obj)
        if reply.drop is not None:
            raise transport_error(aiohttp.ServerDisconnectedError(), method=method, obj=obj)
        if len(reply.body) > self.max_reply_bytes:
            raise transport_error(BadReply(
                f"the reply from {self.url} has more than {self.max_reply_bytes} bytes"),
                method=method, obj=obj)
        return reply

    async def get(self, path: str, timeout_s: float | None) -> tuple[int, bytes]:
        endpoint = self.server.endpoint

        async def work() -> SoapReply:
            return endpoint.get(path)

        reply = await self._exchange(work(), timeout_s, path.rsplit("/", 1)[-1], None)
        return reply.status, reply.body

    async def post(self, body: bytes, *, action: str, session_key: str | None,
                   timeout_s: float | None, method: str, obj: str | None = None) -> Reply:
        work = self.server.endpoint.post(
            body, soap_action=action,
            cookie=cookie_header(session_key) if session_key is not None else None,
            remote="127.0.0.1", user_agent=USER_AGENT)
        reply = await self._exchange(work, timeout_s, method, obj)
        check_reply(reply.status, reply.body, method=method, obj=obj)
        return Reply(reply.status, reply.body, session_key_of(reply.headers.get("Set-Cookie")))

    async def negotiate(self, timeout_s: float = 30.0) -> str | None:
        status, body = await self.get(VERSIONS_PATH, timeout_s)
        return version_of_reply(status, body)

