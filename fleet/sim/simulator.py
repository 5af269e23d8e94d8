"""The simulated vCenter as a whole: builds the inventory from a topology, serves calls.

:class:`Simulator` is the composition root: it makes the services objects are
given (``fleet.sim.runtime``: registry, clock, task manager, name holds,
addresses, statistics), the session table and fault injection, builds the
inventory from the topology, and reports ``GET /_sim/stats``. No object holds
the simulator. :meth:`Simulator.invoke` is the single dispatch point for SOAP
calls: session and privilege checks, API-version checks, fault injection, then
the object's method. The HTTP side lives in ``fleet.sim.server``.
"""

from __future__ import annotations

import inspect
import logging
import random
import uuid
from datetime import UTC, datetime
from typing import Any

from pyVmomi import VmomiSupport, vim, vmodl

from fleet.sim.calls import CallContext, Sessions, UserSession, current_call
from fleet.sim.clock import Clock
from fleet.sim.content import (
    GuestAuthManager,
    GuestOperationsManager,
    GuestProcessManager,
    ProvisioningChecker,
    SearchIndex,
    ServiceInstance,
    SessionManager,
)
from fleet.sim.core import Inventory, SimObject, property_type, resolve_path
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
from fleet.sim.injection import FaultInjector, Injection, UpdateFaults
from fleet.sim.names import Addresses, NameHolds
from fleet.sim.permissions import (
    FREE_PRIVILEGES,
    AuthorizationManager,
    Grants,
    Permissions,
    required_privileges,
)
from fleet.sim.propcollector import PropertyCollector
from fleet.sim.runtime import Runtime, about_info
from fleet.sim.shapes import disk_key
from fleet.sim.soap import FETCH_INFO, SoapRequest
from fleet.sim.stats import Stats
from fleet.sim.tasks import Scheduler, TaskManager
from fleet.sim.topology import Topology, VmConfig
from fleet.sim.views import ViewManager
from fleet.sim.vm import NIC_KEY_BASE, Disk, Guest, Nic, VirtualMachine

log = logging.getLogger("fleet.sim")

# Methods a client may call before Login.
ANONYMOUS = frozenset({"RetrieveServiceContent", "CurrentTime", "Login", "LoginByToken",
                       "LoginBySSPI", "LoginExtensionByCertificate", "SessionIsActive"})
# Privileges the type info leaves to the parameters; the usual ones for our methods.
PRIVILEGES = {
    "CloneVM_Task": "VirtualMachine.Provisioning.Clone",
    "Destroy_Task": "VirtualMachine.Inventory.Delete",
}
#: Methods of ManagedEntity whose privilege depends on the entity's type.
TYPE_PRIVILEGES = {
    ("Folder", "Destroy_Task"): "Folder.Delete",
    ("Folder", "Rename_Task"): "Folder.Rename",
}
__all__ = ["FREE_PRIVILEGES", "MB", "Simulator"]


class Simulator:
    """One simulated vCenter."""

    def __init__(self, topology: Topology, *, time_scale: float = 1.0,
                 user: str | None = None, password: str | None = None) -> None:
        self.topology = topology
        self.time_scale = time_scale
        # One generator for jitter, fault rules and dropped updates, seeded by the
        # topology: a run is repeatable.
        self.rng = random.Random(topology.seed)
        self.inventory = Inventory()
        self.clock = Clock(self.rng, time_scale=time_scale, jitter=topology.latency.jitter)
        self.scheduler = Scheduler(topology.vcenter.max_concurrent_operations)
        stats = Stats()
        self.counters = stats.counters
        self.calls = stats.calls
        self.clone_task_s = stats.clone_task_s
        self.faults = FaultInjector(self.rng)
        for rule in topology.faults:
            self.faults.add(rule)
        self.update_faults = UpdateFaults(self.rng, topology.updates.withhold_initial,
                                          topology.updates.drop_fraction)
        self.instance_uuid = str(uuid.uuid4())
        self.api_version_name = str(VmomiSupport.versionMap["vim25/" +
                                                            topology.vcenter.api_version])
        admin_user = user or topology.vcenter.user
        admin_password = password if password is not None else topology.vcenter.password
        users = {admin_user: Grants(admin_password)}
        for extra in topology.users:
            users[extra.name] = Grants(
                extra.password, frozenset(extra.denied),
                {name: frozenset(privs) for name, privs in extra.denied_on.items()})
        self.permissions = Permissions(users)
        self.session_table = Sessions(
            self.inventory, stats, authenticate=self.permissions.authenticate,
            idle_timeout_s=topology.vcenter.session_idle_timeout_s)
        self.sessions: dict[str, UserSession] = self.session_table.by_key
        vc = topology.vcenter
        self.task_manager = TaskManager(
            self.inventory, "TaskManager", clock=self.clock, scheduler=self.scheduler,
            stats=stats, retention_s=vc.task_retention_s, max_finished=vc.max_finished_tasks)
        self.runtime = Runtime(
            inventory=self.inventory, clock=self.clock, tasks=self.task_manager,
            scheduler=self.scheduler, names=NameHolds(), addresses=Addresses(), stats=stats,
            latency=topology.latency, vcenter=vc,
            clone_memory_shared=topology.clone_memory_shared, instance_uuid=self.instance_uuid)
        self.started = datetime.now(UTC)
        self._build()

    # -- inventory construction ----------------------------------------------
    def _register(self, obj: SimObject) -> None:
        self.inventory.objects[obj.moid] = obj

    def _build(self) -> None:
        topo = self.topology
        rt = self.runtime
        inv = self.inventory
        stats = rt.stats
        self.root_folder = Folder(rt, "Datacenters", None, ["Folder", "Datacenter"],
                                  moid="group-d1")
        self.process_manager = GuestProcessManager(inv, "guestOperationsProcessManager",
                                                   stats=stats)
        auth_manager = GuestAuthManager(inv, "guestOperationsAuthManager")
        singletons: list[SimObject] = [
            ServiceInstance(inv, "ServiceInstance", content=self.service_content,
                            now=self.clock.now),
            PropertyCollector(inv, self.update_faults, "propertyCollector"),
            ViewManager(inv, "ViewManager"),
            SessionManager(inv, "SessionManager", sessions=self.session_table, stats=stats),
            SearchIndex(inv, "SearchIndex", root=self.root_folder),
            self.process_manager,
            auth_manager,
            GuestOperationsManager(inv, "guestOperationsManager", self.process_manager,
                                   auth_manager),
            AuthorizationManager(inv, "AuthorizationManager", permissions=self.permissions,
                                 sessions=self.session_table.by_key),
            ProvisioningChecker(inv, "VirtualMachineProvisioningChecker",
                                tasks=self.task_manager, latency=topo.latency),
            self.task_manager,
        ]
        for obj in singletons:
            self._register(obj)
        self._register(self.root_folder)
        dc = Datacenter(rt, topo.datacenter, self.root_folder)
        self.datacenter = dc
        self.root_folder.add_child(dc)
        for obj in (dc, *dc.folders()):
            self._register(obj)
        cluster = ClusterComputeResource(rt, topo.cluster, dc.host_folder)
        dc.host_folder.add_child(cluster)
        self._register(cluster)
        self._register(cluster.pool)
        self.cluster = cluster

        networks = []
        for net_cfg in topo.networks:
            net = Network(rt, net_cfg.name, dc.network_folder)
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
                ds = Datastore(rt, name, dc.datastore_folder, capacity, free)
                dc.datastore_folder.add_child(ds)
                self._register(ds)
                datastores[name] = ds
        self.datastores = datastores

        hosts: dict[str, HostSystem] = {}
        for host_cfg in topo.hosts:
            names = [host_cfg.name] if host_cfg.count is None else [
                host_cfg.name.format(index=i + 1) for i in range(host_cfg.count)]
            for name in names:
                host = HostSystem(rt, name, cluster, slots=host_cfg.slots,
                                  memory_mb=int(host_cfg.memory_gb * 1024),
                                  overcommit=host_cfg.overcommit, cpu_cores=host_cfg.cpu_cores,
                                  connection_state=host_cfg.connection_state,
                                  maintenance=host_cfg.maintenance)
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
                        stats.source_names.add(name)
        self.inventory.generation += 1

    def ensure_folder(self, path: str) -> Folder:
        folder = self.datacenter.vm_folder
        for part in [p for p in path.strip("/").split("/") if p]:
            child = folder.child_named(part)
            if child is None:
                child = Folder(self.runtime, part, folder, folder.child_types)
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
        nics = [Nic(key=NIC_KEY_BASE + n, mac=self.runtime.addresses.new_mac(),
                    network=self.networks[n % len(self.networks)] if self.networks else None,
                    connected=cfg.nic_connected, start_connected=cfg.nic_connected)
                for n in range(cfg.nics)]
        disks = []
        for d in range(cfg.disks):
            base = f"[{ds.name}] {name}/{name}{'' if d == 0 else f'_{d}'}.vmdk"
            chain = [base] + [f"[{ds.name}] {name}/{name}-{d:02d}{level:06d}.vmdk"
                              for level in range(1, cfg.chain_depth)]
            disks.append(Disk(key=disk_key(d), capacity_kb=int(cfg.disk_gb * 1024 * 1024),
                              datastore=ds, chain=chain))
            ds.used += int(cfg.disk_gb * GB)
        guest = Guest(family=cfg.guest.family, user=cfg.guest.user,
                      password=cfg.guest.password, tools_installed=cfg.guest.tools,
                      ready_key=cfg.guest.ready_key, ready_after_s=cfg.guest.ready_after_s,
                      macs=[n.mac for n in nics])
        vm = VirtualMachine(self.runtime, name, folder, pool=self.cluster.pool, host=host,
                            datastore=ds, memory_mb=cfg.memory_mb, num_cpu=cfg.num_cpu,
                            guest=guest, nics=nics, disks=disks, extra_config=cfg.extra_config,
                            # a powered-on guest with Tools has published its keys
                            tools_published=cfg.guest.tools and cfg.state != "poweredOff")
        if cfg.state in ("running", "frozen"):
            vm.power_state = "poweredOn"
            vm.boot_time = datetime.now(UTC)
            if cfg.guest.tools:
                vm.guest.tools_running = cfg.state == "running" and cfg.guest.tools_running
                vm.guest.tools_stopped = not cfg.guest.tools_running
                if nics and nics[0].connected:
                    vm.guest.ip = self.runtime.addresses.ip_for(nics[0].mac)
            vm.frozen = cfg.state == "frozen"
        folder.add_child(vm)
        vm.pool.vms.append(vm)
        host.add_vm(vm)
        ds.vms.append(vm)
        for net in vm.networks():
            net.vms.append(vm)
        self._register(vm)
        return vm

    def add_vm(self, cfg: VmConfig, *, source: bool = False) -> VirtualMachine:
        """A VM that appears while the simulator runs (another tool made it), placed as
        the topology's are and announced to views and property collectors."""
        if cfg.count is not None:
            raise ValueError("add_vm makes one VM: no count")
        vm = self._create_vm(cfg, 0, sum(1 for _ in self.inventory.of_type(VirtualMachine)))
        self.inventory.add(vm)
        if isinstance(vm.parent, Folder):
            vm.parent.touch("childEntity")
        vm.host.touch("vm", "summary")
        if source:
            self.runtime.stats.source_names.add(vm.name)
        return vm

    # -- what the server and tests use ----------------------------------------------
    def about(self, *, esxi: bool = False) -> Any:
        return about_info(self.topology.vcenter, self.instance_uuid, esxi=esxi)

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
            authorizationManager=vim.AuthorizationManager("AuthorizationManager"),
            vmProvisioningChecker=vim.vm.check.ProvisioningChecker(
                "VirtualMachineProvisioningChecker"))

    # -- statistics -------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        vms = list(self.inventory.of_type(VirtualMachine))
        by_name = {vm.name: vm for vm in vms}
        sources = {}
        stats = self.runtime.stats
        for name in sorted(stats.source_names):
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
            "max_clone_chain_depth": stats.max_clone_chain_depth,
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
            "clones": self.runtime.stats.clones.as_dict(),
            "calls": sum(self.calls.values()),
            "calls_by_method": dict(self.calls),
        }

    # -- sessions ----------------------------------------------------------------
    def session_for(self, key: str | None, ip: str = "127.0.0.1", user_agent: str = "",
                    *, create: bool = True) -> tuple[UserSession, bool]:
        return self.session_table.session_for(key, ip, user_agent, create=create)

    def expire_all_sessions(self) -> int:
        return self.session_table.expire_all()

    def reap_sessions(self) -> None:
        self.session_table.reap()

    def may_open_session(self, call: SoapRequest) -> bool:
        """Calls allowed before Login open a session (and get a cookie); others do not."""
        return call.method in ANONYMOUS or (call.method == "Fetch" and call.this._moId == \
            "ServiceInstance")

    # -- dispatch -------------------------------------------------------------------
    def check_privilege(self, session: UserSession, privilege: str | None, obj: SimObject) -> None:
        self.permissions.check(session.user, privilege, obj)

    async def invoke(self, call: SoapRequest, session: UserSession, version: str,
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
        ctx = CallContext(session, version, injection)
        token = current_call.set(ctx)
        try:
            if info is FETCH_INFO:
                path = call.args.get("prop")
                if not path:
                    raise vmodl.fault.InvalidArgument(msg="prop is required",
                                                      invalidProperty="prop")
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
            for needed, target in required_privileges(call.method, info, obj, call.args,
                                                      self.inventory):
                self.check_privilege(session, needed, target)
            if injection is not None and injection.phase == "call":
                await self.clock.sleep(injection.rule.delay_s)
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
        await self.clock.close()

