"""The simulated vCenter as a whole: builds the inventory from a topology, serves calls.

:class:`Simulator` owns the inventory, the task scheduler, sessions, the
latency model, fault injection and the statistics ``GET /_sim/stats`` reports.
:meth:`Simulator.invoke` is the single dispatch point for SOAP calls: session
and privilege checks, API-version checks, fault injection, then the object's
method. The HTTP side lives in ``fleet.sim.server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import random
import uuid
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from pyVmomi import VmomiSupport, vim, vmodl

from fleet.sim.core import CallContext, Inventory, SimObject, current_call, resolve_path
from fleet.sim.entities import (
    GB,
    MB,
    ClusterComputeResource,
    Datacenter,
    Datastore,
    Folder,
    HostSystem,
    ManagedEntity,
    Network,
)
from fleet.sim.faults import FaultInjector, Injection
from fleet.sim.propcollector import PropertyCollector, UpdateFaults, ViewManager
from fleet.sim.service import (
    GuestOperationsManager,
    GuestProcessManager,
    ProvisioningChecker,
    SearchIndex,
    ServiceInstance,
    Session,
    SessionManager,
)
from fleet.sim.soap import FETCH_INFO, SoapRequest
from fleet.sim.tasks import Scheduler, Task, TaskBody, TaskManager
from fleet.sim.topology import Topology, VmConfig
from fleet.sim.vm import DISK_KEY_BASE, NIC_KEY_BASE, Disk, Guest, Nic, VirtualMachine

log = logging.getLogger("fleet.sim")

# Methods a client may call before Login.
ANONYMOUS = frozenset({"RetrieveServiceContent", "CurrentTime", "Login", "LoginByToken",
                       "LoginBySSPI", "LoginExtensionByCertificate", "SessionIsActive"})
# Privileges the type info leaves to the parameters; the usual ones for our methods.
PRIVILEGES = {
    "CloneVM_Task": "VirtualMachine.Provisioning.Clone",
    "Destroy_Task": "VirtualMachine.Inventory.Delete",
    "ReconfigVM_Task": "VirtualMachine.Config.Settings",
    "StartProgramInGuest": "VirtualMachine.GuestOperations.Execute",
    "ListProcessesInGuest": "VirtualMachine.GuestOperations.Query",
    "TerminateProcessInGuest": "VirtualMachine.GuestOperations.Execute",
    "CheckInstantClone_Task": "VirtualMachine.Provisioning.Clone",
}
#: Methods of ManagedEntity whose privilege depends on the entity's type.
TYPE_PRIVILEGES = {
    ("Folder", "Destroy_Task"): "Folder.Delete",
    ("Folder", "Rename_Task"): "Folder.Rename",
}
FREE_PRIVILEGES = ("System.Anonymous", "System.View", "System.Read")


class RunTimes:
    """count/mean/max of every sample and p50/p95 of the latest ``keep``: a summary that
    does not grow with the number of clones."""

    def __init__(self, keep: int = 10_000) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.recent: deque[float] = deque(maxlen=keep)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.max = max(self.max, value)
        self.recent.append(value)

    def summary(self) -> dict[str, float]:
        if not self.count:
            return {"count": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}
        ordered = sorted(self.recent)
        n = len(ordered)
        return {"count": self.count, "mean": self.total / self.count, "p50": ordered[n // 2],
                "p95": ordered[min(n - 1, int(n * 0.95))], "max": self.max}


def _product_version(api_version: str) -> str:
    parts = api_version.split(".")
    return ".".join(parts[:3]) if len(parts) >= 3 else api_version


class Simulator:
    """One simulated vCenter."""

    def __init__(self, topology: Topology, *, time_scale: float = 1.0,
                 user: str | None = None, password: str | None = None) -> None:
        self.topology = topology
        self.time_scale = time_scale
        self.rng = random.Random(topology.seed)
        self.log = log
        self.inventory = Inventory()
        self.scheduler = Scheduler(topology.vcenter.max_concurrent_operations)
        self.sessions: dict[str, Session] = {}
        self.faults = FaultInjector(self.rng)
        for rule in topology.faults:
            self.faults.add(rule)
        self.update_faults = UpdateFaults(topology.updates.withhold_initial,
                                          topology.updates.drop_fraction)
        self.counters: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.clone_memory_shared = topology.clone_memory_shared
        self.instance_uuid = str(uuid.uuid4())
        self.api_version_name = str(VmomiSupport.versionMap["vim25/" +
                                                            topology.vcenter.api_version])
        admin_user = user or topology.vcenter.user
        admin_password = password if password is not None else topology.vcenter.password
        self.users: dict[str, tuple[str, frozenset[str]]] = {
            admin_user: (admin_password, frozenset())}
        for extra in topology.users:
            self.users[extra.name] = (extra.password, frozenset(extra.denied))
        self.source_names: set[str] = set()
        self.max_clone_chain_depth = 0
        self.clone_task_s = RunTimes()  # run times of successful instant clone tasks
        self._background: set[asyncio.Task[Any]] = set()
        self._pending_names: dict[str, set[str]] = {}
        self._mac_counter = 0x800000
        self._ips: dict[str, str] = {}  # MAC -> IP, for the NICs of VMs that exist
        self._free_ips: list[str] = []  # IPs of destroyed VMs, handed out again first
        self._ip_pool = ipaddress.IPv4Network("10.0.0.0/8").hosts()
        next(self._ip_pool)
        self.started = datetime.now(UTC)
        self._build()

    # -- inventory construction ----------------------------------------------
    def _register(self, obj: SimObject) -> None:
        self.inventory.objects[obj.moid] = obj

    def _build(self) -> None:
        topo = self.topology
        self.process_manager = GuestProcessManager(self, "guestOperationsProcessManager")
        singletons: list[SimObject] = [
            ServiceInstance(self, "ServiceInstance"),
            PropertyCollector(self, "propertyCollector"),
            ViewManager(self, "ViewManager"),
            SessionManager(self, "SessionManager"),
            SearchIndex(self, "SearchIndex"),
            self.process_manager,
            GuestOperationsManager(self, "guestOperationsManager", self.process_manager),
            ProvisioningChecker(self, "VirtualMachineProvisioningChecker"),
        ]
        self.task_manager = TaskManager(self, "TaskManager")
        singletons.append(self.task_manager)
        for obj in singletons:
            self._register(obj)
        self.root_folder = Folder(self, "Datacenters", None, ["Folder", "Datacenter"],
                                  moid="group-d1")
        self._register(self.root_folder)
        dc = Datacenter(self, topo.datacenter, self.root_folder)
        self.datacenter = dc
        self.root_folder.add_child(dc)
        for obj in (dc, *dc.folders()):
            self._register(obj)
        cluster = ClusterComputeResource(self, topo.cluster, dc.host_folder)
        dc.host_folder.add_child(cluster)
        self._register(cluster)
        self._register(cluster.pool)
        self.cluster = cluster

        networks = []
        for net_cfg in topo.networks:
            net = Network(self, net_cfg.name, dc.network_folder)
            dc.network_folder.add_child(net)
            self._register(net)
            networks.append(net)
        self.networks = networks

        datastores: dict[str, Datastore] = {}
        for ds_cfg in topo.datastores:
            names = [ds_cfg.name] if ds_cfg.count is None else [
                ds_cfg.name.format(index=i + 1) for i in range(ds_cfg.count)]
            for name in names:
                capacity = int(ds_cfg.capacity_gb * GB)
                free = int((ds_cfg.free_gb if ds_cfg.free_gb is not None
                            else ds_cfg.capacity_gb) * GB)
                ds = Datastore(self, name, dc.datastore_folder, capacity, free)
                dc.datastore_folder.add_child(ds)
                self._register(ds)
                datastores[name] = ds
        self.datastores = datastores

        hosts: dict[str, HostSystem] = {}
        for host_cfg in topo.hosts:
            names = [host_cfg.name] if host_cfg.count is None else [
                host_cfg.name.format(index=i + 1) for i in range(host_cfg.count)]
            for name in names:
                host = HostSystem(self, name, cluster, slots=host_cfg.slots,
                                  memory_mb=int(host_cfg.memory_gb * 1024),
                                  overcommit=host_cfg.overcommit, cpu_cores=host_cfg.cpu_cores,
                                  connection_state=host_cfg.connection_state)
                cluster.hosts.append(host)
                self._register(host)
                self.scheduler.capacity[f"host:{host.moid}"] = host_cfg.slots
                for ds_name in host_cfg.datastores or list(datastores):
                    ds = datastores[ds_name]
                    host.datastores.append(ds)
                    ds.hosts.append(host)
                for net in networks:
                    host.networks.append(net)
                    net.hosts.append(host)
                hosts[name] = host
        self.hosts = hosts

        for name in self.topology.folders:
            self.ensure_folder(name)
        counter = 0
        for section, entries in (("sources", topo.sources), ("vms", topo.vms)):
            for cfg in entries:
                for i in range(cfg.count or 1):
                    self._create_vm(cfg, i, counter)
                    counter += 1
                    if section == "sources":
                        name = cfg.name.format(index=i + 1) if cfg.count else cfg.name
                        self.source_names.add(name)
        self.inventory.generation += 1

    def ensure_folder(self, path: str) -> Folder:
        folder = self.datacenter.vm_folder
        for part in [p for p in path.strip("/").split("/") if p]:
            child = folder.child_named(part)
            if child is None:
                child = Folder(self, part, folder, folder.child_types)
                folder.add_child(child)
                self._register(child)
            if not isinstance(child, Folder):
                raise ValueError(f"{path!r}: {part!r} is not a folder")
            folder = child
        return folder

    def _create_vm(self, cfg: VmConfig, i: int, counter: int) -> VirtualMachine:
        name = cfg.name.format(index=i + 1) if cfg.count else cfg.name
        host_names = list(self.hosts)
        if cfg.host is not None:
            host = self.hosts[cfg.host.format(index=i + 1) if cfg.count else cfg.host]
        else:
            host = self.hosts[host_names[counter % len(host_names)]]
        if cfg.datastore is not None:
            ds = self.datastores[cfg.datastore.format(index=i + 1) if cfg.count
                                 else cfg.datastore]
        else:
            candidates = host.datastores or list(self.datastores.values())
            ds = candidates[counter % len(candidates)]
        folder = self.ensure_folder(cfg.folder) if cfg.folder else self.datacenter.vm_folder
        nics = [Nic(key=NIC_KEY_BASE + n, mac=self.new_mac(),
                    network=self.networks[n % len(self.networks)] if self.networks else None,
                    connected=cfg.nic_connected, start_connected=cfg.nic_connected)
                for n in range(cfg.nics)]
        disks = []
        for d in range(cfg.disks):
            base = f"[{ds.name}] {name}/{name}{'' if d == 0 else f'_{d}'}.vmdk"
            chain = [base] + [f"[{ds.name}] {name}/{name}-{d:02d}{level:06d}.vmdk"
                              for level in range(1, cfg.chain_depth)]
            disks.append(Disk(key=DISK_KEY_BASE + d, capacity_kb=int(cfg.disk_gb * 1024 * 1024),
                              datastore=ds, chain=chain))
            ds.used += int(cfg.disk_gb * GB)
        guest = Guest(family=cfg.guest.family, user=cfg.guest.user,
                      password=cfg.guest.password, tools_installed=cfg.guest.tools,
                      ready_key=cfg.guest.ready_key, ready_after_s=cfg.guest.ready_after_s,
                      macs=[n.mac for n in nics])
        vm = VirtualMachine(self, name, folder, pool=self.cluster.pool, host=host, datastore=ds,
                            memory_mb=cfg.memory_mb, num_cpu=cfg.num_cpu, guest=guest, nics=nics,
                            disks=disks, extra_config=cfg.extra_config)
        if cfg.state in ("running", "frozen"):
            vm.power_state = "poweredOn"
            vm.boot_time = datetime.now(UTC)
            if cfg.guest.tools:
                vm.guest.tools_running = cfg.state == "running"
                if nics and nics[0].connected:
                    vm.guest.ip = self.ip_for(nics[0].mac)
            vm.frozen = cfg.state == "frozen"
        folder.add_child(vm)
        vm.pool.vms.append(vm)
        host.add_vm(vm)
        ds.vms.append(vm)
        for net in vm.networks():
            net.vms.append(vm)
        self._register(vm)
        return vm

    # -- helpers for objects ------------------------------------------------
    def latency(self, base_s: float) -> float:
        """Simulated duration of ``base_s`` (time scale 1): jittered and scaled."""
        if base_s <= 0:
            return 0.0
        jitter = self.topology.latency.jitter
        factor = 1.0 + (self.rng.uniform(-jitter, jitter) if jitter else 0.0)
        return base_s * factor * self.time_scale

    async def sleep(self, base_s: float) -> None:
        delay = self.latency(base_s)
        if delay > 0:
            await asyncio.sleep(delay)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def later(self, delay_s: float, fn: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_later(max(0.0, delay_s), fn)

    def new_mac(self) -> str:
        self._mac_counter += 1
        n = self._mac_counter
        return f"00:50:56:{(n >> 16) & 0xFF:02x}:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}"

    def ip_for(self, mac: str) -> str:
        ip = self._ips.get(mac)
        if ip is None:
            ip = self._free_ips.pop() if self._free_ips else str(next(self._ip_pool))
            self._ips[mac] = ip
        return ip

    def name_pending(self, folder: Folder, name: str) -> bool:
        return name in self._pending_names.get(folder.moid, ())

    def reserve_name(self, folder: Folder, name: str) -> None:
        self._pending_names.setdefault(folder.moid, set()).add(name)

    def release_name(self, folder: Folder, name: str) -> None:
        names = self._pending_names.get(folder.moid)
        if names is not None:
            names.discard(name)

    def authenticate(self, user: str, password: str) -> str | None:
        record = self.users.get(user)
        if record is None or record[0] != password:
            return None
        return user

    def about(self, *, esxi: bool = False) -> Any:
        vc = self.topology.vcenter
        version = _product_version(vc.api_version)
        if esxi or vc.kind == "esxi":
            return vim.AboutInfo(name="VMware ESXi", fullName=f"VMware ESXi {version} build-0",
                                 vendor="VMware, Inc.", version=version, build="0",
                                 osType="vmnix-x86", productLineId="embeddedEsx",
                                 apiType="HostAgent", apiVersion=vc.api_version,
                                 instanceUuid=self.instance_uuid, localeVersion="INTL",
                                 localeBuild="000")
        return vim.AboutInfo(name=vc.name, fullName=f"{vc.name} {version} build-0 (fleet-sim)",
                             vendor="VMware, Inc.", version=version, build="0",
                             osType="linux-x64", productLineId="vpx", apiType="VirtualCenter",
                             apiVersion=vc.api_version, instanceUuid=self.instance_uuid,
                             localeVersion="INTL", localeBuild="000")

    def service_content(self) -> Any:
        return vim.ServiceInstanceContent(
            rootFolder=self.root_folder.ref,
            propertyCollector=vmodl.query.PropertyCollector("propertyCollector"),
            viewManager=vim.view.ViewManager("ViewManager"),
            about=self.about(),
            sessionManager=vim.SessionManager("SessionManager"),
            searchIndex=vim.SearchIndex("SearchIndex"),
            taskManager=vim.TaskManager("TaskManager"),
            guestOperationsManager=vim.vm.guest.GuestOperationsManager("guestOperationsManager"),
            vmProvisioningChecker=vim.vm.check.ProvisioningChecker(
                "VirtualMachineProvisioningChecker"))

    # -- tasks ----------------------------------------------------------------
    def start_task(self, ctx: CallContext, *, entity: SimObject | None, method: str,
                   description_id: str, body: TaskBody, resources: tuple[str, ...],
                   cancelable: bool = False) -> Any:
        injection = ctx.injection
        if injection is not None and injection.phase == "task":
            body = self._inject_into_task(injection, method, entity, body)
        task = Task(self, entity=entity, method=method, description_id=description_id,
                    user=ctx.session.user or "", resources=resources, body=body,
                    cancelable=cancelable)
        self._register(task)
        self.task_manager.started(task)
        self.counters["tasks"] += 1
        self.scheduler.submit(task)
        return task.ref

    def _inject_into_task(self, injection: Injection, method: str, entity: SimObject | None,
                          body: TaskBody) -> TaskBody:
        rule = injection.rule
        name = entity.display_name if entity is not None else ""

        async def injected(task: Task) -> Any:
            await task.sleep(rule.delay_s)
            if rule.fault == "slow":
                return await body(task)
            raise injection.make_fault(method, name, entity.ref if entity is not None else None)

        return injected

    def tasks_finished(self, task: Task) -> None:
        if task.method == "InstantClone_Task" and task.state == "success" and task.start_time:
            run_s = ((task.complete_time or task.start_time) - task.start_time).total_seconds()
            self.clone_task_s.add(run_s)
        self.task_manager.completed(task)

    # -- statistics -------------------------------------------------------------
    def clone_made(self, source: VirtualMachine, clone: VirtualMachine) -> None:
        self.counters["clones_total"] += 1
        self.source_names.add(source.name)
        self.max_clone_chain_depth = max(self.max_clone_chain_depth, clone.chain_depth())

    def vm_destroyed(self, vm: VirtualMachine) -> None:
        """Let go of what the simulator kept per VM: its IPs and its slot as a source."""
        self.counters["vms_destroyed"] += 1
        for nic in vm.nics:
            ip = self._ips.pop(nic.mac, None)
            if ip is not None:
                self._free_ips.append(ip)
        key = f"source:{vm.moid}"
        if not self.scheduler.in_use.get(key):
            self.scheduler.capacity.pop(key, None)
            self.scheduler.in_use.pop(key, None)

    def stats_network_conflict(self, vm: VirtualMachine) -> None:
        self.counters["network_conflicts"] += 1
        log.info("network conflict: %s connected while its guest uses another MAC", vm.name)

    def stats_duplicate_mac(self, vm: VirtualMachine, mac: str) -> None:
        self.counters["duplicate_macs"] += 1
        log.info("duplicate MAC: %s was given %s, which another VM has", vm.name, mac)

    def stats(self) -> dict[str, Any]:
        vms = list(self.inventory.of_type(VirtualMachine))
        by_name = {vm.name: vm for vm in vms}
        sources = {}
        for name in sorted(self.source_names):
            vm = by_name.get(name)
            if vm is None:
                continue
            sources[name] = {"chain_depth": vm.chain_depth(), "frozen": vm.frozen,
                             "clones": vm.clones, "power_state": vm.power_state,
                             "host": vm.host.name}
        return {
            "vms": len(vms),
            "clones_total": self.counters["clones_total"],
            "sources": sources,
            "max_clone_chain_depth": self.max_clone_chain_depth,
            "network_conflicts": self.counters["network_conflicts"],
            "duplicate_macs": self.counters["duplicate_macs"],
            "faults_injected": self.faults.total,
            "faults_by_type": dict(self.faults.injected),
            "updates": self.update_faults.as_dict(),
            "tasks": {"queued": self.scheduler.queued, "running": self.scheduler.running,
                      "total": self.counters["tasks"]},
            "hosts": {h.name: {"connection_state": h.connection_state,
                               "running": self.scheduler.in_use.get(f"host:{h.moid}", 0),
                               "slots": h.slots, "memory_used_mb": h.memory_used_mb(),
                               "vms": len(h.vms)} for h in self.hosts.values()},
            "sessions": sum(1 for s in self.sessions.values() if s.authenticated),
            "sessions_open": len(self.sessions),  # logged in or not
            "logins": self.counters["logins"],
            "guest_programs": self.counters["guest_programs"],
            "clone_task_s": self.clone_task_s.summary(),
            "calls": sum(self.calls.values()),
            "calls_by_method": dict(self.calls),
        }

    # -- sessions ----------------------------------------------------------------
    def session_for(self, key: str | None, ip: str = "127.0.0.1", user_agent: str = "",
                    *, create: bool = True) -> tuple[Session, bool]:
        """The caller's session, or a new unauthenticated one (True when new).

        With ``create=False`` (a call that needs a login anyway) an unknown or
        expired cookie gets a throw-away session that is not kept: a client
        hammering with a dead cookie must not fill the table with sessions."""
        if key is not None:
            session = self.sessions.get(key)
            if session is not None:
                idle = self.topology.vcenter.session_idle_timeout_s
                if session.authenticated and session.idle_s() > idle:
                    log.info("session %s… expired after %.0f s idle", key[:8], session.idle_s())
                    self.expire(session)
                    session = None
                elif session.alive:
                    return session, False
        session = Session(self, ip, user_agent)
        if create:
            self.sessions[session.key] = session
        return session, create

    def expire(self, session: Session) -> None:
        session.close()
        self.sessions.pop(session.key, None)
        self.counters["sessions_expired"] += 1

    def expire_all_sessions(self) -> int:
        live = [s for s in self.sessions.values() if s.authenticated]
        for session in live:
            self.expire(session)
        return len(live)

    def reap_sessions(self) -> None:
        idle = self.topology.vcenter.session_idle_timeout_s
        for session in list(self.sessions.values()):
            if session.idle_s() > max(idle, 60.0 if not session.authenticated else 0.0):
                self.expire(session)

    def may_open_session(self, call: SoapRequest) -> bool:
        """Calls allowed before Login open a session (and get a cookie); others do not."""
        return call.method in ANONYMOUS or (call.method == "Fetch" and call.this._moId == \
            "ServiceInstance")

    # -- dispatch -------------------------------------------------------------------
    def check_privilege(self, session: Session, privilege: str | None, obj: SimObject) -> None:
        if not privilege or privilege.startswith(FREE_PRIVILEGES):
            return
        record = self.users.get(session.user or "")
        if record is not None and privilege in record[1]:
            raise vim.fault.NoPermission(
                msg=f"Permission to perform this operation was denied: {privilege} on "
                    f"'{obj.display_name}'.", object=obj.ref, privilegeId=privilege)

    async def invoke(self, call: SoapRequest, session: Session, version: str,
                     injection: Injection | None = None) -> tuple[Any, Any, int]:
        """Run one call. Returns (value, declared result type, result flags)."""
        self.calls[call.method] += 1
        obj = self.inventory.resolve(call.this)
        info = call.info
        if info is None:
            raise vmodl.fault.MethodNotFound(msg=f"Method {call.method} not found.",
                                             receiver=call.this, method=call.method)
        anonymous = call.method in ANONYMOUS or (
            call.method == "Fetch" and isinstance(obj, ServiceInstance))
        if not anonymous and not session.authenticated:
            raise vim.fault.NotAuthenticated(msg="The session is not authenticated.",
                                             object=call.this, privilegeId="System.View")
        session.touch()
        ctx = CallContext(self, session, version, injection)
        token = current_call.set(ctx)
        try:
            if info is FETCH_INFO:
                path = call.args.get("prop")
                if not path:
                    raise vmodl.fault.InvalidArgument(msg="prop is required",
                                                      invalidProperty="prop")
                from fleet.sim.core import property_type

                result_type = property_type(obj.vim_type, path)
                value = resolve_path(obj, path)
                return value, result_type, 4
            if not VmomiSupport.IsChildVersion(self.api_version_name, info.version):
                raise vmodl.fault.MethodNotFound(
                    msg=f"Method {call.method} is not supported by API "
                        f"{self.topology.vcenter.api_version}.",
                    receiver=call.this, method=call.method)
            if not isinstance(obj.ref, VmomiSupport.GetVmodlType(info.typeName)):
                raise vmodl.fault.MethodNotFound(
                    msg=f"{obj.vim_type.__name__} has no method {call.method}.",
                    receiver=call.this, method=call.method)
            handler = getattr(obj, call.method, None)
            if handler is None:
                raise vmodl.fault.NotImplemented(
                    msg=f"The simulator does not implement {call.method}.")
            if self.topology.vcenter.kind == "esxi" and call.method in (
                    "InstantClone_Task", "CheckInstantClone_Task"):
                raise vmodl.fault.NotSupported(
                    msg="Instant clone needs vCenter; this is a standalone ESXi host.")
            privilege = TYPE_PRIVILEGES.get((obj.vim_type.__name__.rsplit(".", 1)[-1],
                                             call.method)) or \
                PRIVILEGES.get(call.method, info.privId)
            self.check_privilege(session, privilege, obj)
            if injection is not None and injection.phase == "call":
                await self.sleep(injection.rule.delay_s)
                if injection.rule.fault != "slow":
                    raise injection.make_fault(call.method, obj.display_name, obj.ref)
            result = handler(ctx, **call.args)
            if inspect.isawaitable(result):
                result = await result
            return result, info.result, info.resultFlags
        finally:
            current_call.reset(token)

    def object_name(self, moid: str) -> str:
        obj = self.inventory.get(moid)
        if isinstance(obj, ManagedEntity):
            return obj.name
        return moid

    async def close(self) -> None:
        self.task_manager.close()
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task


__all__ = ["MB", "Simulator"]
