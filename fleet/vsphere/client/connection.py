"""The client's connection: transport, session and update loop, and paged reads.

:class:`Connection` is the base every part of :class:`~fleet.vsphere.client.VSphereClient`
builds on. It owns what they share: the layers below (``transport``, ``session``,
``watcher``), the client's lifecycle (``open``/``close``, entered and left in one
task), a call with the session's retry rule (:meth:`Connection.call`), a task run
to its end through the shared update loop (:meth:`Connection.task`), and
``RetrievePropertiesEx`` read to its last page over cached container views
(:meth:`Connection.retrieve`). The parts' own caches are declared here too, so an
instance's whole state is in one ``__init__``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
from pyVmomi import VmomiSupport, vmodl

from fleet.errors import ConfigError, NotAuthenticated, NotFound, VSphereError
from fleet.urls import redact_url
from fleet.vsphere import inventory as inv
from fleet.vsphere import vim_specs
from fleet.vsphere.faults import translate
from fleet.vsphere.model import Ref, ServerInfo
from fleet.vsphere.session import CallObserver, RetryPolicy, Secret, Session
from fleet.vsphere.tasks import VCenterTask
from fleet.vsphere.tls import TlsOptions
from fleet.vsphere.transport import MAX_REPLY_BYTES, MIN_VERSION, SoapTransport, Transport
from fleet.vsphere.watch import PropertyWatcher

log = logging.getLogger("fleet.vsphere")
PC = vmodl.query.PropertyCollector


def _api_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def endpoint_problem(api_type: str, api_version: str, negotiated: str) -> str | None:
    """Why an endpoint cannot instant-clone, or None (pure; see ``server_info``)."""
    if api_type == "HostAgent":
        return ("the endpoint is a standalone ESXi host (API type HostAgent); instant clones "
                "need vCenter Server 6.7 or later")
    if api_type and api_type != "VirtualCenter":
        return f"the endpoint's API type is {api_type!r}, not a vCenter Server"
    if api_version and _api_tuple(api_version) < (6, 7):
        return (f"the endpoint speaks vSphere API {api_version}; instant clones need vCenter "
                "Server 6.7 or later")
    if not VmomiSupport.IsChildVersion(negotiated, MIN_VERSION):
        return (f"the negotiated API ({negotiated}) predates vSphere 6.7 and has no "
                "InstantClone_Task")
    return None


class Connection:
    """What every part of the client shares; see the module docstring."""

    def __init__(self, url: str, user: str, password: str | Secret, *,
                 tls: TlsOptions | None = None,
                 ca_file: str | Path | tuple[str | Path, ...] | None = None,
                 thumbprint: str | None = None, insecure: bool = False,
                 max_connections: int = 256, call_timeout_s: float = 60.0,
                 task_timeout_s: float = 1800.0, keepalive_s: float = 600.0,
                 wait_max_s: int = 30, max_object_updates: int | None = None,
                 page_size: int = 1000, retry: RetryPolicy | None = None,
                 observer: CallObserver | None = None,
                 guest_poll_s: tuple[float, float] = (0.1, 2.0),
                 compress: bool = False, use_env_proxy: bool = False,
                 max_reply_bytes: int = MAX_REPLY_BYTES,
                 transport: Transport | None = None) -> None:
        if tls is None:
            tls = TlsOptions(ca_file=ca_file, thumbprint=thumbprint, insecure=insecure)
        elif ca_file or thumbprint or insecure:
            raise ConfigError("give either tls= or ca_file/thumbprint/insecure", key="tls")
        # ``transport`` replaces the HTTP one (a simulator in the same process,
        # fleet.testing); ``url`` and the HTTP options are then unused.
        self.transport: Transport = transport if transport is not None else SoapTransport(
            url, tls=tls, max_connections=max_connections, compress=compress,
            use_env_proxy=use_env_proxy, max_reply_bytes=max_reply_bytes)
        self.session = Session(self.transport, user, password, call_timeout_s=call_timeout_s,
                               retry=retry, observer=observer)
        self.watcher = PropertyWatcher(self.session, max_wait_s=wait_max_s,
                                       max_object_updates=max_object_updates)
        self.task_timeout_s = task_timeout_s
        self.keepalive_s = keepalive_s
        self.page_size = page_size
        self.guest_poll_s = guest_poll_s
        self._stack: AsyncExitStack | None = None
        self._server: ServerInfo | None = None
        #: why the endpoint cannot instant-clone: found at open, or told by a clone's fault
        self._unsupported: str | None = None
        self._views: dict[tuple[str, ...], tuple[int, Any]] = {}
        # The parts' caches, declared here so an instance's whole state is in one place.
        # reads: host names for VmInfo, the datacenters and their VM folders
        self._host_names: dict[str, str] = {}
        # addresses: datastore names for the members' records
        self._datastore_names: dict[str, str] = {}
        self._datacenters: list[tuple[str, Any, Any]] | None = None
        # clones: a source's NICs, the NIC edits made from them, rendered request bodies
        self._nic_cache: dict[str, tuple[float, list[Any]]] = {}
        self._nic_edits: dict[str, tuple[list[Any], Any, list[Any]]] = {}
        self._clone_bodies = vim_specs.CloneBodies()
        # guest_ops: the guest process manager; folders: one folder maker at a time
        self._process_manager: Any = None
        self._folder_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.transport.url)!r})"

    @property
    def url(self) -> str:
        return self.transport.url

    # -- lifecycle --------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect, negotiate, log in and start the update loop (same task as ``close``)."""
        if self._stack is not None:
            return
        stack = AsyncExitStack()
        try:
            stack.push_async_callback(self.session.close)
            await self.session.open()
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            await tg.start(self.watcher.run)
            tg.start_soon(self.session.keepalive, self.keepalive_s)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        about = self.session.content.about
        self._server = ServerInfo(name=str(about.fullName or about.name or ""),
                                  version=str(about.version or ""),
                                  api_version=str(about.apiVersion or ""),
                                  api_type=str(about.apiType or ""),
                                  instance_uuid=str(about.instanceUuid or ""),
                                  negotiated=str(self.session.stub.version))
        self._unsupported = endpoint_problem(self._server.api_type, self._server.api_version,
                                             self.session.stub.version)
        if self._unsupported:
            log.warning("%s: %s", redact_url(self.url), self._unsupported)

    async def close(self) -> None:
        """Stop the update loop, log out and close connections."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    # -- helpers ---------------------------------------------------------------------
    def mo(self, ref: Ref) -> Any:
        """The pyVmomi reference for ``ref``, bound to this client's session."""
        return self.session.mo(ref.type, ref.id)

    @property
    def content(self) -> Any:
        return self.session.content

    @property
    def stats(self) -> dict[str, Any]:
        s, w = self.session.stats, self.watcher.stats
        return {"calls": dict(s.calls), "total_calls": s.total_calls, "retries": dict(s.retries),
                "faults": dict(s.faults), "logins": s.logins, "relogins": s.relogins,
                "wait_calls": w.wait_calls, "updates": w.updates, "truncated": w.truncated,
                "filters_created": w.filters_created, "rebuilds": w.rebuilds,
                "watches": w.watches, "live_watches": self.watcher.live,
                "direct_reads": w.direct_reads, "direct_read_objects": w.direct_read_objects,
                "missed_updates": w.missed_updates}

    async def call(self, mo: Any, method: str, *args: Any, **kw: Any) -> Any:
        """Any vim25 method, with the session's re-login and retry rule."""
        return await self.session.call(mo, method, *args, **kw)

    def task(self, task_mo: Any, method: str, *,
             convert: Callable[[Any], Any] | None = None,
             translate_error: Callable[[Any], Awaitable[VSphereError]] | None = None,
             obj: str | None = None) -> VCenterTask:
        """A handle for a task started elsewhere (watched by the shared loop)."""

        async def default_translate(fault: Any) -> VSphereError:
            return translate(fault, method=method, obj=obj)

        return VCenterTask(self.session, self.watcher, task_mo, method=method,
                           convert=convert or _convert, translate_error=translate_error
                           or default_translate)

    async def _run_task(self, mo: Any, method: str, *args: Any, safe: bool = False,
                        timeout_s: float | None = None) -> Any:
        task_mo = await self.session.call(mo, method, *args, safe=safe)
        handle = self.task(task_mo, method, obj=mo._moId)
        return await handle.wait(self.task_timeout_s if timeout_s is None else timeout_s)

    # -- retrieval -------------------------------------------------------------------
    async def _view(self, types: tuple[str, ...]) -> Any:
        cached = self._views.get(types)
        generation = self.session.generation
        if cached is not None and cached[0] == generation:
            return cached[1]
        view = await self.session.call(
            self.content.viewManager, "CreateContainerView", self.content.rootFolder,
            [inv_type(t) for t in types], True, session_bound=True)
        self._views[types] = (generation, view)
        return view

    async def retrieve(self, make_specs: Callable[[], Awaitable[list[Any]]] | list[Any],
                       *, plain: bool = False) -> list[Any]:
        """``RetrievePropertiesEx`` continued until vCenter has no more pages.

        ``make_specs`` may be a coroutine function so session-scoped objects (views)
        are recreated when a re-login happens mid-way; the read then starts over.
        ``plain``: every path read is a plain value (``fleet.vsphere.plain``)."""
        options = PC.RetrieveOptions(maxObjects=self.page_size)
        for attempt in range(3):
            try:
                spec_set = make_specs if isinstance(make_specs, list) else await make_specs()
                return await self.session.retrieve_all(spec_set, options, session_bound=True,
                                                       plain=plain)
            except NotAuthenticated:
                if attempt == 2:
                    raise
            except NotFound as exc:
                # A cached view may have gone with an old session: make new ones once.
                if attempt == 2 or not any(v[1]._moId == exc.obj for v in self._views.values()):
                    raise
                self._views.clear()
        raise AssertionError("unreachable")

    async def _retrieve_view(self, type_name: str, paths: Sequence[str], *,
                             plain: bool = False) -> list[Any]:
        async def make() -> list[Any]:
            view = await self._view((type_name,))
            return [inv.filter_spec([inv.object_spec_view(view, type_name)], inv_type(type_name),
                                    paths)]

        return await self.retrieve(make, plain=plain)

    async def _retrieve_objects(self, mos: Sequence[Any], paths: Sequence[str]) -> list[Any]:
        if not mos:
            return []
        spec = inv.filter_spec([PC.ObjectSpec(obj=m, skip=False) for m in mos], type(mos[0]),
                               paths)
        return await self.retrieve([spec])


def inv_type(type_name: str) -> Any:
    return VmomiSupport.GetWsdlType("urn:vim25", type_name)


def _convert(result: Any) -> Any:
    """Task results as fleet values: references become Refs."""
    if isinstance(result, VmomiSupport.ManagedObject):
        return inv.ref_of(result)
    return result
