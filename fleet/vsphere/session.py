"""A vCenter session: login, keep-alive, transparent re-login, retries, logout.

Every call goes through :meth:`Session.invoke`. The rule for repeating a call
on its own (everything else surfaces to the caller, which decides):

1. **Never executed -> repeat anything.** A ``NotAuthenticated`` fault is
   vCenter refusing the call at the door (the session check comes before any
   work), so after a re-login the call is sent again, task-starting calls
   included. The same holds for :class:`~fleet.errors.NotDelivered`
   (the TCP/TLS connection was never made, or a proxy answered HTTP 503).
2. **Maybe executed -> repeat only what is safe to repeat.** After a reset, a
   dropped or unreadable reply or a deadline, the call may have run. Reads and
   waits (:data:`SAFE_TO_REPEAT`) are sent again after a short backoff; a
   task-starting or creating call (``InstantClone_Task``, ``CreateFolder``,
   ``StartProgramInGuest`` ...) is *not*: its ``ConnectionFailed`` /
   ``RequestTimeout`` reaches the caller, which must find out what happened
   (the engine reconciles by name: a repeated clone answers DuplicateName with
   the existing VM's id). A caller may pass ``safe=True`` for a task-starting
   call that is idempotent by construction: the client does so for power on/off,
   destroy and reconfigurations to absolute values, whose repeat
   converges to the same end state (and treats "already so" as success).
   Each call is repeated at most ``RetryPolicy.max_retries`` times, with
   exponential backoff and jitter.
3. vCenter's own verdicts (faults other than NotAuthenticated) are never
   retried here.

Calls tied to the session's server-side state (a property collector's
``WaitForUpdatesEx``, ``CreateFilter``, a retrieval's continuation token) are
*session-bound*: after a re-login they raise ``NotAuthenticated`` instead of
being repeated, and their owner rebuilds that state.

Re-login is single-flight: the first call that sees ``NotAuthenticated`` logs in
again under a lock and bumps :attr:`Session.generation`; the others wait and
reuse the new session. A refused password is remembered for that generation,
so two hundred calls never become two hundred failed logins. The session
cookie is only taken from our own login exchange, never from other replies
(vCenter sets a fresh, unauthenticated cookie on every call made with an
expired one).

The password lives in a :class:`Secret` whose ``repr`` and ``str`` are masked;
it is revealed only while serializing ``Login``. Neither it, the user name nor
the session cookie is ever logged or put in an error message.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from pyVmomi import vim

from fleet.errors import (
    InvalidLogin,
    NotAuthenticated,
    NotDelivered,
    PermanentVSphereError,
    TransientVSphereError,
    VSphereError,
    VSphereFault,
)
from fleet.urls import redact_url
from fleet.vsphere.faults import map_vsphere_faults, translate
from fleet.vsphere.plain import NotPlain, RawPage, decode_retrieve_result
from fleet.vsphere.transport import MIN_VERSION, Transport, VimStub, version_name

log = logging.getLogger("fleet.vsphere")

#: Calls that change nothing on the server (or nothing that matters when done twice).
_NOT_DECODED = object()

SAFE_TO_REPEAT = frozenset({
    "RetrieveServiceContent", "CurrentTime", "SessionIsActive", "Fetch",
    "RetrieveProperties", "RetrievePropertiesEx", "ContinueRetrievePropertiesEx",
    "CancelRetrievePropertiesEx", "RetrieveContents",
    "WaitForUpdatesEx", "WaitForUpdates", "CheckForUpdates", "CancelWaitForUpdates",
    # A duplicate filter or view only repeats updates we dispatch by object anyway.
    "CreateFilter", "CreatePropertyCollector", "CreateContainerView",
    "DestroyPropertyFilter", "DestroyView", "DestroyPropertyCollector",
    "FindByInventoryPath", "FindChild", "FindByUuid", "FindAllByUuid", "FindByIp",
    "FindByDnsName", "ListProcessesInGuest", "CancelTask", "Logout",
})


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "********"

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")


class CallObserver(Protocol):
    """Told about every SOAP exchange, every task that ended in a fault, and every
    re-login (``fleet.metrics.FleetMetrics`` is one).

    ``method`` is the WSDL name, ``fault`` the vim fault's name (or fleet's reason
    for transport failures) when the exchange failed. Never anything else."""

    def observe_request(self, method: str, duration_s: float,
                        fault: str | None = None) -> None: ...

    def observe_task_fault(self, method: str, fault: str) -> None:
        """A task ended in error: ``method`` is the WSDL name of the call that started it
        (``InstantClone_Task``), ``fault`` the vim fault's name (``FileNotFound``). Told
        once per task, by ``fleet.vsphere.tasks.VCenterTask``; a ``RequestCanceled`` that
        answers fleet's own ``CancelTask`` is no fault and is not told."""

    def relogin(self) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 4  # repeats of one call after transient failures
    backoff_s: float = 0.05  # first pause; doubles, with jitter, up to max_backoff_s
    max_backoff_s: float = 2.0
    max_relogins: int = 2  # re-logins one call may trigger

    def pause_s(self, attempt: int) -> float:
        base: float = min(self.max_backoff_s, self.backoff_s * 2.0 ** max(0, attempt - 1))
        return base * random.uniform(0.5, 1.0)


@dataclass
class SessionStats:
    calls: Counter[str] = field(default_factory=Counter)  # SOAP exchanges by method
    retries: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)  # fleet error reason
    logins: int = 0
    relogins: int = 0

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


class Session:
    """One authenticated vCenter session over one transport."""

    def __init__(self, transport: Transport, user: str, password: str | Secret, *,
                 call_timeout_s: float = 60.0, retry: RetryPolicy | None = None,
                 observer: CallObserver | None = None) -> None:
        self.transport = transport
        self._user = user
        self._password = password if isinstance(password, Secret) else Secret(password)
        self.call_timeout_s = call_timeout_s
        self.retry = retry or RetryPolicy()
        self.observer = observer
        self.stats = SessionStats()
        self.stub = VimStub(MIN_VERSION, self.invoke)
        self.content: Any = None
        self.generation = 0  # bumped by every successful login
        self._key: str | None = None
        self._login_lock = anyio.Lock()
        self._login_refused: tuple[int, str] | None = None
        self._closed = False
        self.last_call = time.monotonic()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"login {self.generation}"
        return f"Session({redact_url(self.transport.url)!r}, {state})"

    # -- references ------------------------------------------------------------
    def mo(self, type_name: str, moid: str) -> Any:
        """A managed object reference bound to this session (``mo("VirtualMachine", "vm-7")``)."""
        return _mo_type(type_name)(moid, self.stub)

    # -- login -----------------------------------------------------------------
    async def open(self) -> None:
        """Negotiate the API version, read the service content and log in."""
        await self.transport.open()
        version = await self.transport.negotiate(self.call_timeout_s)
        if version is None:
            # No usable vimServiceVersions.xml: believe about.apiVersion if pyVmomi knows it.
            about = (await self._service_content()).about
            version = version_name(str(about.apiVersion or "")) or MIN_VERSION
        self.stub = VimStub(version, self.invoke)
        async with self._login_lock:
            await self._login_retrying()
            self.generation += 1

    async def _service_content(self, *, adopt_cookie: bool = False) -> Any:
        si = vim.ServiceInstance("ServiceInstance", self.stub)
        info = si._GetMethodInfo("RetrieveContent")
        value, key = await self._exchange(si, info, [], None, self.call_timeout_s)
        if adopt_cookie and key is not None:
            self._key = key
        return value

    async def _login(self) -> None:
        started = time.monotonic()
        # A fresh cookie first, as every vSphere client does, then Login on it.
        self._key = None
        self.content = await self._service_content(adopt_cookie=True)
        manager = self.content.sessionManager
        info = manager._GetMethodInfo("Login")
        args = [self._user, self._password.reveal(), None]
        try:
            _, key = await self._exchange(manager, info, args, self._key, self.call_timeout_s)
        finally:
            args.clear()
        if key is not None:
            self._key = key
        if self._key is None:
            raise VSphereFault("Login: the server set no session cookie", method="Login")
        self.stats.logins += 1
        log.info("logged in to %s (API %s) in %.2f s", redact_url(self.transport.url),
                 self.stub.versionId.strip('"').rsplit("/", 1)[-1], time.monotonic() - started)

    async def _login_retrying(self) -> None:
        """:meth:`_login`, repeated after transient failures (a reset, a 503, a lost reply).

        Each attempt starts over on a fresh cookie, so repeating is safe; a Login whose
        reply was lost leaves one unused session behind, which vCenter drops when it
        idles out. vCenter's verdicts (a refused password) are not repeated."""
        attempt = 0
        while True:
            try:
                await self._login()
                return
            except TransientVSphereError as exc:
                if self._closed or attempt >= self.retry.max_retries:
                    raise
                attempt += 1
                self.stats.retries["Login"] += 1
                log.info("login to %s failed (%s); retry %d", redact_url(self.transport.url),
                         exc.reason, attempt)
                await anyio.sleep(self.retry.pause_s(attempt))

    async def relogin(self, seen_generation: int) -> None:
        """Log in again unless someone already did since ``seen_generation``."""
        async with self._login_lock:
            if self.generation != seen_generation:
                return
            if self._closed:
                raise NotAuthenticated("the session is closed")
            refused = self._login_refused
            if refused is not None and refused[0] == seen_generation:
                raise InvalidLogin(refused[1], fault="InvalidLogin", method="Login")
            started = time.monotonic()
            try:
                await self._login_retrying()
            except InvalidLogin as exc:
                self._login_refused = (seen_generation, str(exc))
                raise
            self.generation += 1
            self.stats.relogins += 1
            if self.observer is not None:
                self.observer.relogin()
            log.warning("session expired: logged in again (login %d) in %.2f s",
                        self.generation, time.monotonic() - started)

    async def close(self) -> None:
        """Log out (best effort, a few seconds at most) and close the transport."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._key is not None and self.content is not None:
                with anyio.move_on_after(5.0, shield=True):
                    manager = self.content.sessionManager
                    await self._exchange(manager, manager._GetMethodInfo("Logout"), [],
                                         self._key, 5.0)
                    log.info("logged out of %s", redact_url(self.transport.url))
        except VSphereError as exc:
            log.info("logout from %s failed (%s); the session will time out",
                     redact_url(self.transport.url), exc.reason)
        finally:
            self._key = None
            await self.transport.close()

    # -- calls -----------------------------------------------------------------
    async def call(self, mo: Any, method: str, *args: Any, timeout_s: float | None = None,
                   safe: bool | None = None, session_bound: bool = False,
                   body: bytes | None = None) -> Any:
        """Call ``method`` (pyVmomi's Python name or the WSDL name) on ``mo``.

        ``body``, if given, is the request already serialized (exactly what
        serializing ``mo``, ``method`` and ``args`` would give)."""
        info = method_info(mo, method)
        return await self.invoke(mo, info, list(args), timeout_s=timeout_s, safe=safe,
                                 session_bound=session_bound, body=body)

    async def retrieve_all(self, spec_set: list[Any], options: Any, *,
                           safe: bool | None = None, session_bound: bool = False,
                           plain: bool = False) -> list[Any]:
        """``RetrievePropertiesEx`` and its ``ContinueRetrievePropertiesEx`` pages until
        vCenter has no more: every ObjectContent of ``spec_set``. ``plain``: the paths
        read are plain values, decoded fast (``fleet.vsphere.plain``), and each page is
        decoded (in a worker thread) while vCenter makes the next one."""
        pc = self.content.propertyCollector
        info = method_info(pc, "RetrievePropertiesEx")
        more = method_info(pc, "ContinueRetrievePropertiesEx")
        peek = RawPage.of if plain else None

        async def fetch(call_info: Any, args: list[Any]) -> Any:
            return await self.invoke(pc, call_info, args, safe=safe,
                                     session_bound=session_bound, decode=peek)

        result = await fetch(info, [spec_set, options])
        objects: list[Any] = []
        while result is not None:
            ahead: list[Any] = []
            if isinstance(result, RawPage):
                page = result
                async with anyio.create_task_group() as tg:
                    if page.token:
                        async def next_page(token: str, into: list[Any]) -> None:
                            into.append(await fetch(more, [token]))

                        tg.start_soon(next_page, page.token, ahead)
                    result = await self._decode_page(page, info)
                token = None if result is None else result.token
                if result is not None:
                    objects.extend(result.objects or ())
                if ahead:
                    result = ahead[0]
                elif token:  # a token the head did not show (not where the WSDL puts it)
                    result = await fetch(more, [token])
                else:
                    result = None
            else:
                objects.extend(result.objects or ())
                if not result.token:
                    break
                result = await fetch(more, [result.token])
            info = more
        return objects

    async def _decode_page(self, page: RawPage, info: Any) -> Any:
        """A page peeked at (``RawPage``), decoded: plainly in a worker thread, or by
        pyVmomi if it is not plain after all."""
        try:
            return await anyio.to_thread.run_sync(decode_retrieve_result, page.body)
        except NotPlain:
            with map_vsphere_faults(method=info.wsdlName):
                return self.stub.deserialize(page.body, info.result)

    async def invoke(self, mo: Any, info: Any, args: list[Any], *,
                     timeout_s: float | None = None, safe: bool | None = None,
                     session_bound: bool = False, body: bytes | None = None,
                     decode: Callable[[bytes], Any] | None = None) -> Any:
        """One logical call with the retry rule of the module docstring. ``decode``
        reads a successful reply instead of pyVmomi unless it raises NotPlain."""
        method = info.wsdlName
        repeatable = method in SAFE_TO_REPEAT if safe is None else safe
        deadline = self.call_timeout_s if timeout_s is None else timeout_s
        attempt = relogins = 0
        while True:
            generation, key = self.generation, self._key
            if self._closed:
                raise NotAuthenticated(f"{method}: the client is closed", method=method)
            try:
                value, _ = await self._exchange(mo, info, args, key, deadline, body, decode)
                return value
            except NotAuthenticated:
                if relogins >= self.retry.max_relogins or self._closed:
                    raise
                relogins += 1
                await self.relogin(generation)
                if session_bound:
                    raise
            except TransientVSphereError as exc:
                if not (repeatable or isinstance(exc, NotDelivered)) or \
                        attempt >= self.retry.max_retries:
                    raise
                attempt += 1
                self.stats.retries[method] += 1
                log.debug("%s on %s: %s; retry %d", method, getattr(mo, "_moId", "?"),
                          exc.reason, attempt)
                await anyio.sleep(self.retry.pause_s(attempt))

    async def _exchange(self, mo: Any, info: Any, args: list[Any], key: str | None,
                        timeout_s: float | None, prepared: bytes | None = None,
                        decode: Callable[[bytes], Any] | None = None
                        ) -> tuple[Any, str | None]:
        """One request and its reply; returns (value, Set-Cookie session key)."""
        method = info.wsdlName
        obj = getattr(mo, "_moId", None)
        self.stats.calls[method] += 1
        started = time.perf_counter()
        error: VSphereError | None = None
        try:
            if prepared is not None:
                body = prepared
            else:
                with map_vsphere_faults(method=method, obj=obj):
                    body = self.stub.serialize(mo, info, args)
            reply = await self.transport.post(body, action=self.stub.versionId, session_key=key,
                                              timeout_s=timeout_s, method=method, obj=obj)
            del body
            value = _NOT_DECODED
            if decode is not None and reply.status == 200:
                with contextlib.suppress(NotPlain):  # pyVmomi reads it below
                    value = decode(reply.body)
            if value is _NOT_DECODED:
                with map_vsphere_faults(method=method, obj=obj):
                    value = self.stub.deserialize(reply.body, info.result)
            if reply.status == 500:
                if isinstance(value, BaseException):
                    raise translate(value, method=method, obj=obj) from value
                raise VSphereFault(f"{method} on {obj}: HTTP 500 without a fault",
                                   method=method, obj=obj)
            self.last_call = time.monotonic()
            return value, reply.session_key
        except VSphereError as exc:
            error = exc
            self.stats.faults[exc.reason] += 1
            raise
        finally:
            if self.observer is not None:
                fault = None if error is None else (error.fault or error.reason)
                self.observer.observe_request(method, time.perf_counter() - started, fault)

    # -- keep-alive --------------------------------------------------------------
    async def keepalive(self, interval_s: float) -> None:
        """Run forever: a cheap call whenever the session was idle for ``interval_s``."""
        while not self._closed:
            idle = time.monotonic() - self.last_call
            if idle < interval_s:
                await anyio.sleep(interval_s - idle)
                continue
            try:
                si = vim.ServiceInstance("ServiceInstance", self.stub)
                await self.call(si, "CurrentTime")
            except PermanentVSphereError as exc:
                log.warning("keep-alive failed: %s", exc)
                await anyio.sleep(interval_s)
            except TransientVSphereError as exc:
                log.info("keep-alive failed (%s); trying again later", exc.reason)
                await anyio.sleep(min(interval_s, 30.0))


_types: dict[str, Any] = {}


def _mo_type(type_name: str) -> Any:
    cls = _types.get(type_name)
    if cls is None:
        from pyVmomi import VmomiSupport

        cls = _types[type_name] = VmomiSupport.GetWsdlType("urn:vim25", type_name)
    return cls


_infos: dict[tuple[type, str], Any] = {}


def method_info(mo: Any, method: str) -> Any:
    """pyVmomi's method info for ``method`` on ``mo``: WSDL name (``DestroyPropertyFilter``,
    ``InstantClone_Task``) or pyVmomi's Python name (``Destroy``, ``InstantClone``)."""
    key = (type(mo), method)
    info = _infos.get(key)
    if info is None:
        methods = type(mo)._GetMethodList()
        info = next((m for m in methods if m.wsdlName == method), None) or \
            next((m for m in methods if m.name == method), None)
        if info is None:
            raise AttributeError(f"{type(mo).__name__} has no method {method}")
        _infos[key] = info
    return info
