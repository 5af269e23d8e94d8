"""The real vCenter client: :class:`VSphereClient` implements ``fleet.vsphere.model.VSphere``.

Layers, bottom up (each its own module):

- ``transport``: SOAP over aiohttp with pyVmomi's serializer/deserializer, TLS,
  proxy, pool, deadlines, reply caps, version negotiation, and the translation of
  transport failures (docs/transport.md);
- ``session``: login, keep-alive, single-flight re-login, the retry rule;
- ``watch``: one property collector and one ``WaitForUpdatesEx`` loop for all
  tasks in flight and all VM waits;
- ``inventory`` / ``vim_specs``: property paths, conversions, spec builders;
- ``faults``: the one translation of vim faults into ``fleet.errors``.

Use it as an async context manager (entered and left in the same task)::

    async with VSphereClient(url, user, password, tls=TlsOptions(ca_file=...)) as vs:
        info = await vs.server_info()
        task = await vs.start_instant_clone(CloneRequest(...))
        vm = await task.wait(timeout_s=300)

Task-starting operations other than ``start_instant_clone`` wait for their
task (through the same loop) and raise its translated fault. Operations that
converge to an absolute end state (power on/off, destroy, NIC and extraConfig
edits) are idempotent by construction, so the session may repeat them after a
lost reply; their "already there" answers (``InvalidPowerState`` with the wanted
state, ``ManagedObjectNotFound`` on destroy) count as success.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import UTC
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from pyVmomi import VmomiSupport, vim, vmodl

from fleet.errors import (
    ConfigError,
    GuestOperationFailed,
    NotAuthenticated,
    NotEmpty,
    NotFound,
    RequestTimeout,
    UnsupportedEndpoint,
    VSphereError,
    some_of,
)
from fleet.urls import redact_url
from fleet.vsphere import inventory as inv
from fleet.vsphere import vim_specs
from fleet.vsphere.faults import translate
from fleet.vsphere.model import (
    CloneRequest,
    DatastoreInfo,
    GuestCredentials,
    GuestProgram,
    HostInfo,
    NicConnect,
    Ref,
    ServerInfo,
    TaskHandle,
    VmInfo,
    VSphere,
)
from fleet.vsphere.session import CallObserver, RetryPolicy, Secret, Session, method_info
from fleet.vsphere.tasks import VCenterTask
from fleet.vsphere.tls import TlsOptions
from fleet.vsphere.transport import MAX_REPLY_BYTES, MIN_VERSION, SoapTransport, Transport
from fleet.vsphere.watch import PropertyWatcher, Watch

log = logging.getLogger("fleet.vsphere")
PC = vmodl.query.PropertyCollector

#: Faults after which an instant clone's source chain is re-read (docs/vsphere.md).
_CHAIN_SUSPECTS = ("GenericVmConfigFault", "SystemError")
_NIC_CACHE_S = 30.0


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


class VSphereClient:
    """An asyncio vCenter client; see the module docstring."""

    def __init__(self, url: str, user: str, password: str | Secret, *,
                 tls: TlsOptions | None = None, ca_file: str | Path | None = None,
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
        self._unsupported: str | None = None
        self._views: dict[tuple[str, ...], tuple[int, Any]] = {}
        self._host_names: dict[str, str] = {}
        self._datacenters: list[tuple[str, Any, Any]] | None = None
        self._nic_cache: dict[str, tuple[float, list[Any]]] = {}
        self._nic_edits: dict[str, tuple[list[Any], Any, list[Any]]] = {}
        self._clone_bodies = vim_specs.CloneBodies()
        self._process_manager: Any = None
        self._folder_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"VSphereClient({redact_url(self.transport.url)!r})"

    @property
    def url(self) -> str:
        return self.transport.url

    # -- lifecycle --------------------------------------------------------------
    async def __aenter__(self) -> VSphereClient:
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
                                  instance_uuid=str(about.instanceUuid or ""))
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

    def _check_instant_clone_supported(self) -> None:
        if self._stack is None:
            raise RuntimeError("use VSphereClient as `async with VSphereClient(...) as vs`")
        if self._unsupported:
            raise UnsupportedEndpoint(f"{redact_url(self.url)}: {self._unsupported}")

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

    async def retrieve(self, make_specs: Callable[[], Awaitable[list[Any]]] | list[Any]
                       ) -> list[Any]:
        """``RetrievePropertiesEx`` continued until vCenter has no more pages.

        ``make_specs`` may be a coroutine function so session-scoped objects (views)
        are recreated when a re-login happens mid-way; the read then starts over."""
        pc = self.content.propertyCollector
        options = PC.RetrieveOptions(maxObjects=self.page_size)
        for attempt in range(3):
            try:
                spec_set = make_specs if isinstance(make_specs, list) else await make_specs()
                result = await self.session.call(pc, "RetrievePropertiesEx", spec_set, options,
                                                 session_bound=True)
                objects: list[Any] = []
                while result is not None:
                    objects.extend(result.objects or ())
                    if not result.token:
                        break
                    result = await self.session.call(pc, "ContinueRetrievePropertiesEx",
                                                     result.token, session_bound=True)
                return objects
            except NotAuthenticated:
                if attempt == 2:
                    raise
            except NotFound as exc:
                # A cached view may have gone with an old session: make new ones once.
                if attempt == 2 or not any(v[1]._moId == exc.obj for v in self._views.values()):
                    raise
                self._views.clear()
        raise AssertionError("unreachable")

    async def _retrieve_view(self, type_name: str, paths: Sequence[str]) -> list[Any]:
        async def make() -> list[Any]:
            view = await self._view((type_name,))
            return [inv.filter_spec([inv.object_spec_view(view, type_name)], inv_type(type_name),
                                    paths)]

        return await self.retrieve(make)

    async def _retrieve_objects(self, mos: Sequence[Any], paths: Sequence[str]) -> list[Any]:
        if not mos:
            return []
        spec = inv.filter_spec([PC.ObjectSpec(obj=m, skip=False) for m in mos], type(mos[0]),
                               paths)
        return await self.retrieve([spec])

    async def _host_name_map(self, refresh: bool = False) -> dict[str, str]:
        if refresh or not self._host_names:
            contents = await self._retrieve_view("HostSystem", ["name"])
            self._host_names = {c.obj._moId: str(inv.props(c).get("name")) for c in contents}
        return self._host_names

    async def _vm_infos(self, contents: list[Any]) -> list[VmInfo]:
        names = await self._host_name_map()
        for c in contents:
            host = inv.props(c).get("runtime.host")
            if host is not None and host._moId not in names:
                names = await self._host_name_map(refresh=True)
                break
        return [inv.vm_info(c, names) for c in contents]

    # -- inventory: server, datacenters, resolution ------------------------------------
    async def server_info(self) -> ServerInfo:
        """About the endpoint; raises UnsupportedEndpoint if it cannot instant-clone."""
        if self._server is None:
            raise RuntimeError("the client is not open")
        if self._unsupported:
            raise UnsupportedEndpoint(f"{redact_url(self.url)}: {self._unsupported}")
        return self._server

    async def datacenters(self) -> list[tuple[str, Ref, Ref]]:
        """(name, datacenter, its VM folder) for every datacenter, in inventory order."""
        if self._datacenters is None:
            contents = await self._retrieve_view("Datacenter", ["name", "vmFolder"])
            self._datacenters = [(str(inv.props(c)["name"]), c.obj, inv.props(c)["vmFolder"])
                                 for c in contents]
        return [(name, inv.ref_of(dc), inv.ref_of(folder))
                for name, dc, folder in self._datacenters]

    async def _inventory_paths(self, path: str, under: str = "vm") -> list[str]:
        """Candidate full inventory paths for ``path`` (``dc/vm/a/b`` or ``a/b``)."""
        clean = path.strip("/")
        dcs = await self.datacenters()
        first = clean.split("/", 1)[0]
        if any(name == first for name, _, _ in dcs):
            return [clean]
        if not dcs:
            return [clean]
        return [f"{dcs[0][0]}/{under}/{clean}" if clean else f"{dcs[0][0]}/{under}", clean]

    async def find_by_path(self, path: str, under: str = "vm") -> Ref | None:
        """The entity at an inventory path; relative paths start below the first
        datacenter's ``under`` folder (``vm``, ``host``, ``datastore``, ``network``)."""
        index = self.content.searchIndex
        for candidate in await self._inventory_paths(path, under):
            found = await self.session.call(index, "FindByInventoryPath", candidate)
            if found is not None:
                return inv.ref_of(found)
        return None

    async def resolve(self, type_name: str, name_or_path: str) -> Ref:
        """A Datacenter, ClusterComputeResource, HostSystem, Datastore, Folder, ResourcePool
        or VirtualMachine by inventory path (contains ``/``) or unique name."""
        if "/" in name_or_path:
            under = {"VirtualMachine": "vm", "Folder": "vm", "Datastore": "datastore",
                     "Network": "network"}.get(type_name, "host")
            ref = await self.find_by_path(name_or_path, under)
            if ref is None or ref.type != type_name:
                raise NotFound(f"no {type_name} at inventory path {name_or_path!r}",
                               method="FindByInventoryPath")
            return ref
        contents = await self._retrieve_view(type_name, ["name"])
        hits = [c.obj for c in contents if inv.props(c).get("name") == name_or_path]
        if not hits:
            raise NotFound(f"no {type_name} named {name_or_path!r}", method="resolve")
        if len(hits) > 1:
            ids = ", ".join(h._moId for h in hits)
            raise ConfigError(f"{len(hits)} objects of type {type_name} are named "
                              f"{name_or_path!r} ({ids}); give an inventory path")
        return inv.ref_of(hits[0])

    async def default_pool(self, cluster: Ref) -> Ref:
        """A cluster's (or standalone host's compute resource's) root resource pool."""
        contents = await self._retrieve_objects([self.mo(cluster)], ["resourcePool"])
        pool = inv.props(contents[0]).get("resourcePool") if contents else None
        if pool is None:
            raise NotFound(f"{cluster} has no resource pool")
        return inv.ref_of(pool)

    # -- inventory: VMs, hosts, datastores, folders -------------------------------------
    async def find_vms(self, names_or_paths: Sequence[str]) -> list[VmInfo]:
        """Resolve VMs by name or inventory path; NotFound names every missing one."""
        found: dict[str, Any] = {}
        missing: list[str] = []
        names = [n for n in names_or_paths if "/" not in n]
        by_name: dict[str, list[Any]] = {}
        if names:
            for c in await self._retrieve_view("VirtualMachine", ["name"]):
                by_name.setdefault(str(inv.props(c).get("name")), []).append(c.obj)
        for item in names_or_paths:
            if "/" in item:
                ref = await self.find_by_path(item)
                if ref is None or ref.type != "VirtualMachine":
                    missing.append(item)
                else:
                    found[item] = self.mo(ref)
                continue
            hits = by_name.get(item, [])
            if not hits:
                missing.append(item)
            elif len(hits) > 1:
                ids = ", ".join(h._moId for h in hits)
                raise ConfigError(f"{len(hits)} VMs are named {item!r} ({ids}); give the "
                                  "inventory path")
            else:
                found[item] = hits[0]
        if missing:
            raise NotFound(f"no VM called {some_of(missing)}", method="find_vms")
        infos = {i.ref.id: i for i in await self._vm_infos(
            await self._retrieve_objects(list({m._moId: m for m in found.values()}.values()),
                                         inv.VM_PATHS))}
        try:
            return [infos[found[item]._moId] for item in names_or_paths]
        except KeyError as exc:
            raise NotFound(f"VM {exc.args[0]} vanished while being read",
                           method="find_vms") from None

    async def get_vm(self, ref: Ref) -> VmInfo:
        contents = await self._retrieve_objects([self.mo(ref)], inv.VM_PATHS)
        if not contents:
            raise NotFound(f"{ref} does not exist", obj=ref.id)
        return (await self._vm_infos(contents))[0]

    async def get_vms(self, refs: Sequence[Ref]) -> list[VmInfo]:
        """Several VMs in one read (same order; NotFound if any is gone)."""
        infos = {i.ref: i for i in await self._vm_infos(
            await self._retrieve_objects([self.mo(r) for r in refs], inv.VM_PATHS))}
        missing = [str(r) for r in refs if r not in infos]
        if missing:
            raise NotFound(f"{', '.join(missing)} do not exist")
        return [infos[r] for r in refs]

    async def chain_depth(self, ref: Ref) -> int:
        """A VM's deepest delta-disk chain, read now (``layoutEx.disk[].chain[]``)."""
        contents = await self._retrieve_objects([self.mo(ref)], ["layoutEx.disk"])
        if not contents:
            raise NotFound(f"{ref} does not exist", obj=ref.id)
        return inv.chain_depth(inv.props(contents[0]).get("layoutEx.disk"))

    async def list_vms(self, paths: Sequence[str] = inv.VM_PATHS) -> list[Any]:
        """Raw ObjectContent of every VM (bulk, paged) with the given property paths."""
        return await self._retrieve_view("VirtualMachine", paths)

    async def list_hosts(self) -> list[HostInfo]:
        async def make() -> list[Any]:
            view = await self._view(("HostSystem", "ClusterComputeResource"))
            return [PC.FilterSpec(
                objectSet=[inv.object_spec_view(view, "HostSystem")],
                propSet=[PC.PropertySpec(type=vim.HostSystem, pathSet=list(inv.HOST_PATHS)),
                         PC.PropertySpec(type=vim.ClusterComputeResource, pathSet=["name"])])]

        contents = await self.retrieve(make)
        clusters = {c.obj._moId: str(inv.props(c).get("name")) for c in contents
                    if c.obj._wsdlName == "ClusterComputeResource"}
        hosts = [inv.host_info(c, clusters) for c in contents
                 if c.obj._wsdlName == "HostSystem"]
        self._host_names = {h.ref.id: h.name for h in hosts}
        return hosts

    async def list_datastores(self) -> list[DatastoreInfo]:
        return [inv.datastore_info(c)
                for c in await self._retrieve_view("Datastore", inv.DATASTORE_PATHS)]

    async def _folder_path(self, path: str) -> tuple[Any, list[str]]:
        """(VM folder to start from, names below it) for ``dc/vm/a/b`` or ``a/b``."""
        parts = [p for p in path.strip("/").split("/") if p]
        dcs = await self.datacenters()
        if not dcs:
            raise NotFound("the inventory has no datacenter")
        for name, _, vm_folder in dcs:
            if parts[:2] == [name, "vm"]:
                return self.mo(vm_folder), parts[2:]
        return self.mo(dcs[0][2]), parts

    async def find_folder(self, path: str) -> Ref | None:
        start, parts = await self._folder_path(path)
        node = start
        for name in parts:
            node = await self.session.call(self.content.searchIndex, "FindChild", node, name)
            if node is None or node._wsdlName != "Folder":
                return None
        return inv.ref_of(node)

    async def ensure_folder(self, path: str) -> Ref:
        """The VM folder at ``path``, created with its parents if missing."""
        async with self._folder_lock:
            start, parts = await self._folder_path(path)
            node = start
            for name in parts:
                node = await self._child_folder(node, name)
            return inv.ref_of(node)

    async def create_folder(self, parent: Ref, name: str) -> Ref:
        """A folder ``name`` under ``parent`` (the existing one if it is already there)."""
        return inv.ref_of(await self._child_folder(self.mo(parent), name))

    async def _child_folder(self, parent: Any, name: str) -> Any:
        index = self.content.searchIndex
        child = await self.session.call(index, "FindChild", parent, name)
        attempt = 0
        while child is None:
            try:
                child = await self.session.call(parent, "CreateFolder", name)
                log.info("created folder %s under %s", name, parent._moId)
            except VSphereError as exc:
                # Someone made it first, or our reply was lost after it was made, or the
                # request was lost before (a reset): look, and ask again if it is not there.
                if exc.reason not in ("duplicate_name", "connection", "timeout"):
                    raise
                child = await self.session.call(index, "FindChild", parent, name)
                if child is None and (exc.reason == "duplicate_name"
                                      or attempt >= self.session.retry.max_retries):
                    raise
                attempt += 1
                if child is None:
                    await anyio.sleep(self.session.retry.pause_s(attempt))
        if child._wsdlName != "Folder":
            raise ConfigError(f"{name!r} under {parent._moId} is a {child._wsdlName}, "
                              "not a folder")
        return child

    async def list_folder_vms(self, folder: Ref) -> list[VmInfo]:
        """Every VM directly in ``folder``."""
        spec = inv.filter_spec([inv.object_spec_children(self.mo(folder))], vim.VirtualMachine,
                               inv.VM_PATHS)
        return await self._vm_infos(await self.retrieve([spec]))

    async def list_child_folders(self, folder: Ref) -> list[tuple[str, Ref]]:
        """(name, ref) of every folder directly in ``folder``, sorted by name."""
        spec = inv.filter_spec([inv.object_spec_children(self.mo(folder))], vim.Folder, ["name"])
        found = []
        for content in await self.retrieve([spec]):
            ref = inv.ref_of(content.obj)
            if ref.type == "Folder":
                found.append((str(inv.props(content).get("name", "")), ref))
        return sorted(found)

    # -- folders as records: the fleet lock (docs/locking.md) ---------------------------
    async def server_time(self) -> float:
        """vCenter's clock (``ServiceInstance.CurrentTime``), epoch seconds."""
        value = await self.session.call(self.session.mo("ServiceInstance", "ServiceInstance"),
                                        "CurrentTime")
        if value.tzinfo is None:  # xsd:dateTime without a zone is UTC in vim25
            value = value.replace(tzinfo=UTC)
        return float(value.timestamp())

    async def new_folder(self, parent: Ref, name: str) -> Ref:
        """One new folder (``CreateFolder``); DuplicateName if the name is taken. Not
        repeated after a lost reply (the session never repeats CreateFolder)."""
        return inv.ref_of(await self.session.call(self.mo(parent), "CreateFolder", name))

    async def rename_folder(self, folder: Ref, name: str) -> None:
        """``Rename_Task``; DuplicateName if a sibling has the name, NotFound if gone.
        Repeating it after a lost reply converges (the same name again)."""
        await self._run_task(self.mo(folder), "Rename_Task", name, safe=True)

    async def destroy_folder(self, folder: Ref) -> None:
        """Destroy a folder holding folders only. vCenter's Destroy_Task destroys a
        folder's whole subtree, VMs included, so the subtree is read first and anything
        but a folder in it refuses the call (NotEmpty)."""
        mo = self.mo(folder)
        tree = PC.TraversalSpec(name="tree", type=vim.Folder, path="childEntity", skip=False,
                                selectSet=[PC.SelectionSpec(name="tree")])
        spec = inv.filter_spec([PC.ObjectSpec(obj=mo, skip=False, selectSet=[tree])],
                               vim.ManagedEntity, ["name"])
        contents = await self.retrieve([spec])
        if not any(c.obj._moId == mo._moId for c in contents):
            raise NotFound(f"{folder} does not exist", obj=folder.id, method="Destroy_Task")
        others = [f"{c.obj._wsdlName} {inv.props(c).get('name', c.obj._moId)!r}"
                  for c in contents if c.obj._wsdlName != "Folder"]
        if others:
            raise NotEmpty(f"folder {folder.id} holds {', '.join(sorted(others)[:5])}"
                           + (f" and {len(others) - 5} more" if len(others) > 5 else "")
                           + "; not destroyed", obj=folder.id, method="Destroy_Task")
        await self._run_task(mo, "Destroy_Task", safe=True)
        log.info("destroyed folder %s", folder.id)

    # -- instant clones -----------------------------------------------------------------
    async def _source_nics(self, source: Any, fresh: bool = False) -> list[Any]:
        cached = self._nic_cache.get(source._moId)
        now = time.monotonic()
        if cached is not None and not fresh and now - cached[0] < _NIC_CACHE_S:
            return cached[1]
        contents = await self._retrieve_objects([source], ["config.hardware.device"])
        if not contents:
            raise NotFound(f"VirtualMachine {source._moId} does not exist", obj=source._moId)
        nics = inv.nic_devices(inv.props(contents[0]).get("config.hardware.device"))
        self._nic_cache[source._moId] = (now, nics)
        return nics

    async def _clone_where(self, request: CloneRequest, source: Any) -> dict[str, Any]:
        """Where the clone goes and its NIC edits: ``instant_clone_spec``'s keywords."""
        edits: list[Any] = []
        if request.nic_connect:
            nics = await self._source_nics(source)
            edits = self._migrate_edits(source._moId, nics, request.nic_connect)
        return {"folder": self.mo(request.folder),
                "pool": self.mo(request.pool) if request.pool else None,
                "datastore": self.mo(request.datastore) if request.datastore else None,
                "nic_edits": edits}

    async def _clone_spec(self, request: CloneRequest, source: Any) -> Any:
        return vim_specs.instant_clone_spec(request, **await self._clone_where(request, source))

    def _migrate_edits(self, source_id: str, nics: list[Any],
                       connect: Mapping[int, NicConnect] | NicConnect) -> list[Any]:
        """The NIC edits of a clone of the source: the same (read-only) objects for every
        clone while the source's NIC list is cached, as they cost more to build than
        to send."""
        cached = self._nic_edits.get(source_id)
        if cached is not None and cached[0] is nics and cached[1] == connect:
            edits: list[Any] = cached[2]
            return edits
        plan = vim_specs.migrate_plan([n.key for n in nics], connect)
        edits = vim_specs.migrate_connect_edits(nics, plan)
        self._nic_edits[source_id] = (nics, connect if isinstance(connect, str)
                                      else dict(connect), edits)
        return edits

    async def _clone_fault(self, fault: Any, source: Ref, method: str) -> VSphereError:
        """Translate an instant-clone fault, re-reading the source's chain when the fault
        is the generic one vCenter gives for a chain at its limit."""
        depth = None
        if type(fault).__name__.rsplit(".", 1)[-1] in _CHAIN_SUSPECTS:
            with contextlib.suppress(VSphereError):
                depth = await self.chain_depth(source)
        error = translate(fault, method=method, obj=source.id, source_chain_depth=depth)
        if error.reason == "unsupported_endpoint":
            self._unsupported = str(error)
        return error

    async def _clone_call(self, mo: Any, method: str, source: Ref, *args: Any,
                          body: bytes | None = None) -> Any:
        try:
            return await self.session.call(mo, method, *args, body=body)
        except VSphereError as exc:
            cause = exc.__cause__
            if isinstance(cause, vmodl.MethodFault):
                raise await self._clone_fault(cause, source, method) from cause
            raise

    async def start_instant_clone(self, request: CloneRequest) -> VCenterTask:
        """Submit ``InstantClone_Task``; the handle's result is the new VM's Ref."""
        self._check_instant_clone_supported()
        source = self.mo(request.source)
        where = await self._clone_where(request, source)
        method = "InstantClone_Task"
        body = self._clone_bodies.render(self.session.stub, source,
                                         method_info(source, method), request, **where)
        if body is not None:
            task_mo = await self._clone_call(source, method, request.source, body=body)
        else:
            spec = vim_specs.instant_clone_spec(request, **where)
            task_mo = await self._clone_call(source, method, request.source, spec)

        async def translate_error(fault: Any) -> VSphereError:
            return await self._clone_fault(fault, request.source, "InstantClone_Task")

        handle = self.task(task_mo, "InstantClone_Task", translate_error=translate_error)
        log.debug("instant clone %s from %s submitted as %s", request.name, request.source.id,
                  handle.ref.id)
        return handle

    async def check_instant_clone(self, request: CloneRequest) -> list[str]:
        """Preflight (``CheckInstantClone_Task``); returns problems, empty if fine."""
        self._check_instant_clone_supported()
        source = self.mo(request.source)
        spec = await self._clone_spec(request, source)
        checker = self.content.vmProvisioningChecker
        method = "CheckInstantClone_Task"
        task_mo = await self._clone_call(checker, method, request.source, source, spec, None)

        async def translate_error(fault: Any) -> VSphereError:
            return await self._clone_fault(fault, request.source, method)

        results = await self.task(task_mo, method, convert=lambda r: r,
                                  translate_error=translate_error).wait(self.task_timeout_s)
        problems = []
        for result in results or ():
            for fault in result.error or ():
                problems.append(str(await self._clone_fault(fault, request.source,
                                                            "InstantClone_Task")))
            for warning in result.warning or ():
                log.info("instant clone preflight warning for %s: %s", request.name,
                         getattr(warning, "msg", warning))
        return problems

    # -- other VM operations --------------------------------------------------------------
    async def full_clone(self, source: Ref, name: str, folder: Ref, *, host: Ref | None = None,
                         datastore: Ref | None = None, power_on: bool = True) -> Ref:
        spec = vim_specs.clone_spec(host=self.mo(host) if host else None,
                                datastore=self.mo(datastore) if datastore else None,
                                power_on=power_on)
        result: Ref = await self._run_task(self.mo(source), "CloneVM_Task", self.mo(folder),
                                           name, spec)
        return result

    async def _power(self, vm: Ref, method: str, wanted: str) -> None:
        try:
            await self._run_task(self.mo(vm), method, safe=True)
        except VSphereError as exc:
            cause = exc.__cause__
            if exc.fault == "InvalidPowerState" and \
                    getattr(cause, "existingState", None) == wanted:
                return
            raise

    async def _power_state(self, vm: Ref) -> str:
        contents = await self._retrieve_objects([self.mo(vm)], ["runtime.powerState"])
        if not contents:
            raise NotFound(f"{vm} does not exist", obj=vm.id)
        return str(inv.props(contents[0]).get("runtime.powerState"))

    async def power_on(self, vm: Ref) -> None:
        """Power on; a VM already on is fine."""
        await self._power(vm, "PowerOnVM_Task", "poweredOn")

    async def power_off(self, vm: Ref) -> None:
        """Power off (hard); a VM already off is fine."""
        await self._power(vm, "PowerOffVM_Task", "poweredOff")

    async def destroy(self, vm: Ref) -> None:
        """Power off if needed, then destroy. A VM already gone is not an error."""
        try:
            for attempt in range(3):
                if await self._power_state(vm) != "poweredOff":
                    await self.power_off(vm)
                try:
                    await self._run_task(self.mo(vm), "Destroy_Task", safe=True)
                    log.info("destroyed %s", vm.id)
                    return
                except VSphereError as exc:
                    # Powered on again behind our back: once more, from the top.
                    if exc.fault != "InvalidPowerState" or attempt == 2:
                        raise
        except NotFound:
            return

    async def set_nics_connected(self, vm: Ref, connected: bool,
                                 nic_keys: Sequence[int] | None = None, *,
                                 extra_config: Mapping[str, str] | None = None) -> None:
        """Connect or disconnect NICs; ``extra_config`` goes in the same ReconfigVM_Task."""
        mo = self.mo(vm)
        contents = await self._retrieve_objects([mo], ["config.hardware.device"])
        if not contents:
            raise NotFound(f"{vm} does not exist", obj=vm.id)
        nics = inv.nic_devices(inv.props(contents[0]).get("config.hardware.device"))
        if nic_keys is not None:
            unknown = set(nic_keys) - {n.key for n in nics}
            if unknown:
                raise NotFound(f"{vm} has no NIC with key {', '.join(map(str, sorted(unknown)))}",
                               obj=vm.id)
        edits = vim_specs.nic_edits(nics, connected, nic_keys)
        if edits or extra_config:
            await self._run_task(mo, "ReconfigVM_Task",
                                 vim_specs.device_change_spec(edits, extra_config), safe=True)

    async def update_extra_config(self, vm: Ref, values: Mapping[str, str]) -> None:
        """Set extraConfig keys (an empty value removes the key)."""
        if values:
            await self._run_task(self.mo(vm), "ReconfigVM_Task",
                                 vim_specs.extra_config_spec(values), safe=True)

    # -- guest ----------------------------------------------------------------------------
    async def _processes(self) -> Any:
        if self._process_manager is None:
            contents = await self._retrieve_objects([self.content.guestOperationsManager],
                                                    ["processManager"])
            self._process_manager = inv.props(contents[0])["processManager"]
        return self._process_manager

    async def run_in_guest(self, vm: Ref, credentials: GuestCredentials, program: GuestProgram,
                           *, timeout_s: float) -> int:
        """Run a program through VMware Tools and return its exit code.

        vSphere has no update for a guest process, so its end is polled with
        ``ListProcessesInGuest`` at a gentle backoff (``guest_poll_s``). A program
        that freezes the VM (``instantclone.freeze``) never ends inside it: once
        the VM is frozen, 0 is returned."""
        manager = await self._processes()
        mo = self.mo(vm)
        auth = vim.vm.guest.NamePasswordAuthentication(
            username=credentials.username, password=credentials.password,
            interactiveSession=False)
        deadline = anyio.current_time() + timeout_s
        with anyio.move_on_after(timeout_s):
            pid = await self.session.call(manager, "StartProgramInGuest", mo, auth,
                                          vim_specs.program_spec(program))
            log.debug("started %s in %s as pid %s", program.path, vm.id, pid)
            delay, max_delay = self.guest_poll_s
            while True:
                await anyio.sleep(min(delay, max(0.0, deadline - anyio.current_time())))
                delay = min(delay * 1.5, max_delay)
                try:
                    listed = await self.session.call(manager, "ListProcessesInGuest", mo, auth,
                                                     [pid])
                except GuestOperationFailed as exc:
                    if exc.fault == "GuestOperationsUnavailable" and await self._frozen(vm):
                        return 0
                    raise
                for proc in listed or ():
                    if proc.pid == pid and proc.endTime is not None:
                        return int(proc.exitCode if proc.exitCode is not None else 0)
        raise RequestTimeout(f"{program.path} in {vm.id} still running after {timeout_s} s",
                             method="ListProcessesInGuest", obj=vm.id)

    async def _frozen(self, vm: Ref) -> bool:
        contents = await self._retrieve_objects([self.mo(vm)], ["runtime.instantCloneFrozen"])
        return bool(contents and inv.props(contents[0]).get("runtime.instantCloneFrozen"))

    async def wait_for_vm(self, vm: Ref, *, timeout_s: float, guest_ip: bool = False,
                          extra_config_key: str | None = None, frozen: bool | None = None,
                          tools_running: bool = False) -> VmInfo:
        """Wait (with WaitForUpdatesEx, no polling) until every asked condition holds."""
        if guest_ip or extra_config_key is not None or frozen is not None or tools_running:
            await self.wait_for_vm_state(vm, timeout_s=timeout_s, guest_ip=guest_ip,
                                         extra_config_key=extra_config_key, frozen=frozen,
                                         tools_running=tools_running)
        return await self.get_vm(vm)

    async def wait_for_vm_state(self, vm: Ref, *, timeout_s: float, guest_ip: bool = False,
                                extra_config_key: str | None = None,
                                frozen: bool | None = None, tools_running: bool = False) -> None:
        """``wait_for_vm`` without the read of the whole VM afterwards."""
        paths: list[str] = []
        if guest_ip:
            paths.append("guest.ipAddress")
        if extra_config_key is not None:
            paths.append("config.extraConfig")
        if frozen is not None:
            paths.append("runtime.instantCloneFrozen")
        if tools_running:
            paths.append("guest.toolsRunningStatus")
        if not paths:
            await self.get_vm(vm)  # it must exist (NotFound otherwise)
            return

        def ready(w: Watch) -> bool:
            values = w.values
            if guest_ip and not values.get("guest.ipAddress"):
                return False
            if extra_config_key is not None and not any(
                    o.key == extra_config_key and o.value not in (None, "")
                    for o in values.get("config.extraConfig") or ()):
                return False
            if frozen is not None and values.get("runtime.instantCloneFrozen") is not frozen:
                return False
            return not tools_running or \
                values.get("guest.toolsRunningStatus") == "guestToolsRunning"

        wanted = ", ".join(paths)
        w = self.watcher.watch(self.mo(vm), paths)
        try:
            await w.wait_for(ready, timeout_s=timeout_s, what=f"wanted {wanted}")
        finally:
            w.release()


def inv_type(type_name: str) -> Any:
    return VmomiSupport.GetWsdlType("urn:vim25", type_name)


def _convert(result: Any) -> Any:
    """Task results as fleet values: references become Refs."""
    if isinstance(result, VmomiSupport.ManagedObject):
        return inv.ref_of(result)
    return result


if TYPE_CHECKING:
    # mypy proves the client and its task handles implement the engine's interface.
    def _implements(client: VSphereClient, task: VCenterTask) -> tuple[VSphere, TaskHandle]:
        return client, task


__all__ = ["RetryPolicy", "Secret", "TlsOptions", "VSphereClient", "endpoint_problem"]
