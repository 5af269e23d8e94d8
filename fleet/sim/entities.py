"""Inventory entities other than VMs: folders, datacenter, cluster, resource pools,
hosts, datastores and networks.

Hosts own the two resources instant clones compete for: provisioning slots
(see ``fleet.sim.tasks``) and memory, accounted with page sharing: an instant
clone initially shares most of its memory with its source, so it costs the host
only its unshared part (``Runtime.clone_memory_shared``).

Entities are given the simulator's narrow services (``fleet.sim.runtime``); they
see VMs only through :class:`PlacedVm`, what a host, pool, datastore or network
needs of one, so this module does not depend on ``fleet.sim.vm``.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from pyVmomi import vim, vmodl

from fleet.sim.calls import CallContext
from fleet.sim.core import SimObject
from fleet.sim.runtime import Runtime
from fleet.sim.soap import share

GREEN = "green"
MB = 1024 * 1024
GB = 1024 * MB
# vCenter refuses these characters in entity names (it escapes '%', '/' and '\').
_BAD_NAME = re.compile(r"[/\\%]")


def check_entity_name(name: str | None, what: str = "name") -> str:
    if not name or not name.strip():
        raise vim.fault.InvalidName(msg=f"The {what} must not be empty.", name=name or "")
    if len(name) > 80:
        raise vim.fault.InvalidName(msg=f"The {what} '{name}' is longer than 80 characters.",
                                    name=name)
    if _BAD_NAME.search(name):
        raise vim.fault.InvalidName(msg=f"The {what} '{name}' contains '/', '\\' or '%'.",
                                    name=name)
    return name


class PlacedVm(Protocol):
    """What the entities a VM is placed on (host, pool, datastore, network) use of it."""

    moid: str
    ref: Any
    counted_on: HostSystem | None

    def memory_share(self) -> tuple[bool, int] | None: ...

    def touch(self, *props: str) -> None: ...


class ManagedEntity(SimObject):
    vim_type = vim.ManagedEntity

    def __init__(self, runtime: Runtime, name: str, parent: ManagedEntity | None,
                 moid: str | None = None) -> None:
        super().__init__(runtime.inventory, moid)
        self.runtime = runtime
        self._name = name
        self.parent = parent

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        old, self._name = self._name, value
        if old != value and isinstance(self.parent, Folder):
            self.parent.renamed(self, old)  # keep the folder's name index right

    @property
    def display_name(self) -> str:
        return self.name

    def children(self) -> list[ManagedEntity]:
        return []

    def prop_name(self) -> str:
        return self.name

    def prop_parent(self) -> Any:
        return self.parent.ref if self.parent is not None else None

    def prop_overallStatus(self) -> str:
        return GREEN

    def prop_configStatus(self) -> str:
        return GREEN

    def prop_alarmActionsEnabled(self) -> bool:
        return True

    def prop_effectiveRole(self) -> list[int]:
        return [-1]

    def inventory_path(self) -> str:
        parts: list[str] = []
        node: ManagedEntity | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/".join(reversed(parts))


class Folder(ManagedEntity):
    vim_type = vim.Folder
    id_prefix = "group-v"

    def __init__(self, runtime: Runtime, name: str, parent: ManagedEntity | None,
                 child_types: Iterable[str], moid: str | None = None) -> None:
        super().__init__(runtime, name, parent, moid)
        self.child_types = tuple(child_types)
        # Children in the order they came, by id, and by name: a clone's name check and
        # a destroy must not cost a scan of a folder that holds thousands of VMs.
        self._children: dict[str, ManagedEntity] = {}
        self._by_name: dict[str, list[ManagedEntity]] = {}

    @property
    def entities(self) -> Sequence[ManagedEntity]:
        """The children, oldest first (change them with add_child, attach and detach)."""
        return list(self._children.values())

    def children(self) -> list[ManagedEntity]:
        return list(self._children.values())

    def prop_childEntity(self) -> Any:
        return vim.ManagedEntity.Array([c.ref for c in self._children.values()])

    def prop_childType(self) -> list[str]:
        return list(self.child_types)

    def child_named(self, name: str) -> ManagedEntity | None:
        """The oldest child called ``name``."""
        named = self._by_name.get(name)
        return named[0] if named else None

    def add_child(self, entity: ManagedEntity) -> None:
        """Put ``entity`` in this folder, with no change event (building the inventory)."""
        entity.parent = self
        if entity.moid in self._children:
            return
        self._children[entity.moid] = entity
        self._by_name.setdefault(entity.name, []).append(entity)

    def attach(self, entity: ManagedEntity) -> None:
        self.add_child(entity)
        self.touch("childEntity")

    def detach(self, entity: ManagedEntity) -> None:
        if self._children.get(entity.moid) is entity:
            del self._children[entity.moid]
            self._unindex(entity, entity.name)
            self.touch("childEntity")

    def renamed(self, entity: ManagedEntity, old: str) -> None:
        if self._children.get(entity.moid) is not entity:
            return
        self._unindex(entity, old)
        named = self._by_name.setdefault(entity.name, [])
        named.append(entity)
        if len(named) > 1:  # keep the oldest first, as a scan of the children would
            named.sort(key=list(self._children.values()).index)

    def _unindex(self, entity: ManagedEntity, name: str) -> None:
        named = self._by_name.get(name)
        if named is not None and entity in named:
            named.remove(entity)
            if not named:
                del self._by_name[name]

    def _check_free(self, name: str) -> None:
        """DuplicateName if ``name`` is taken here, or is being taken by a call or task
        still in progress (vCenter holds a name from the start of a create or rename)."""
        existing = self.child_named(name)
        if existing is not None or self.runtime.names.pending(self.moid, name):
            raise vim.fault.DuplicateName(
                msg=f"The name '{name}' already exists.", name=name,
                object=(existing or self).ref)

    async def CreateFolder(self, ctx: CallContext, name: str) -> Any:
        """Synchronous in vCenter, but not instant: the name is held while the folder is
        made, so a concurrent CreateFolder (or clone, or rename) of that name in this
        folder gets DuplicateName, never a second object. Fleet's lock relies on it
        (docs/locking.md)."""
        check_entity_name(name)
        if "Folder" not in self.child_types:
            raise vmodl.fault.NotSupported(msg=f"Folder '{self.name}' cannot hold folders.")
        self._check_free(name)
        rt = self.runtime
        rt.names.hold(self.moid, name)
        try:
            await rt.clock.sleep(rt.latency.folder_s)
            if self.inventory.get(self.moid) is not self:
                raise vmodl.fault.ManagedObjectNotFound(
                    msg=f"The object '{self.ref}' has already been deleted", obj=self.ref)
            folder = Folder(rt, name, self, self.child_types)
            self.attach(folder)
            self.inventory.add(folder)
        finally:
            rt.names.release(self.moid, name)
        return folder.ref

    def _undeletable(self) -> bool:
        """The root folder and a datacenter's own folders (vm, host...) cannot go."""
        return self.parent is None or not isinstance(self.parent, Folder)

    def Rename_Task(self, ctx: CallContext, newName: str) -> Any:
        """``ManagedEntity.Rename_Task`` for a folder: DuplicateName if a sibling has (or
        is being given) the name; the new name is held while the task runs."""
        check_entity_name(newName)
        if self._undeletable():
            raise vmodl.fault.NotSupported(msg=f"The folder '{self.name}' cannot be renamed.")
        parent = self.parent
        assert isinstance(parent, Folder)
        held = newName != self.name
        if held:
            parent._check_free(newName)
            self.runtime.names.hold(parent.moid, newName)

        async def body(task: Any) -> None:
            try:
                await task.sleep(self.runtime.latency.folder_s)
                if self.inventory.get(self.moid) is not self:
                    raise vmodl.fault.ManagedObjectNotFound(
                        msg=f"The object '{self.ref}' has already been deleted", obj=self.ref)
                self.name = newName
                self.touch("name")
            finally:
                if held:
                    self.runtime.names.release(parent.moid, newName)

        return self.runtime.tasks.start(ctx, entity=self, method="Rename_Task",
                                        description_id="Folder.rename", body=body, resources=())

    def Destroy_Task(self, ctx: CallContext) -> Any:
        """Destroy this folder and, as vCenter does, everything in it: each descendant is
        destroyed in turn and the first that cannot be (a powered-on VM:
        InvalidPowerState) ends the task with its fault, leaving the rest in place."""
        if self._undeletable():
            raise vmodl.fault.NotSupported(msg=f"The folder '{self.name}' cannot be destroyed.")

        async def body(task: Any) -> None:
            await task.sleep(self.runtime.latency.folder_s)
            if self.inventory.get(self.moid) is not self:
                # Another Destroy_Task of it ran first: this one fails, as in vCenter.
                raise vmodl.fault.ManagedObjectNotFound(
                    msg=f"The object '{self.ref}' has already been deleted", obj=self.ref)
            self.destroy_tree()

        return self.runtime.tasks.start(ctx, entity=self, method="Destroy_Task",
                                        description_id="Folder.destroy", body=body, resources=())

    def destroy_tree(self) -> None:
        if self.inventory.get(self.moid) is not self:
            return  # already gone: destroying it again changes nothing
        for child in self.children():
            if isinstance(child, Folder):
                child.destroy_tree()
            elif hasattr(child, "destroy_now"):
                child.destroy_now()
            else:
                raise vmodl.fault.NotSupported(
                    msg=f"'{child.name}' in folder '{self.name}' cannot be destroyed.")
        parent = self.parent
        if isinstance(parent, Folder):
            parent.detach(self)
        self.inventory.remove(self)


class Datacenter(ManagedEntity):
    vim_type = vim.Datacenter
    id_prefix = "datacenter-"

    def __init__(self, runtime: Runtime, name: str, parent: Folder) -> None:
        super().__init__(runtime, name, parent)
        ids = runtime.inventory
        self.vm_folder = Folder(runtime, "vm", self, ["Folder", "VirtualMachine", "VirtualApp"])
        self.host_folder = Folder(runtime, "host", self, ["Folder", "ComputeResource"],
                                  moid=ids.next_id("group-h"))
        self.datastore_folder = Folder(runtime, "datastore", self, ["Folder", "Datastore"],
                                       moid=ids.next_id("group-s"))
        self.network_folder = Folder(runtime, "network", self, ["Folder", "Network"],
                                     moid=ids.next_id("group-n"))

    def folders(self) -> list[Folder]:
        return [self.vm_folder, self.host_folder, self.datastore_folder, self.network_folder]

    def children(self) -> list[ManagedEntity]:
        return list(self.folders())

    def prop_vmFolder(self) -> Any:
        return self.vm_folder.ref

    def prop_hostFolder(self) -> Any:
        return self.host_folder.ref

    def prop_datastoreFolder(self) -> Any:
        return self.datastore_folder.ref

    def prop_networkFolder(self) -> Any:
        return self.network_folder.ref

    def prop_datastore(self) -> Any:
        return vim.Datastore.Array([d.ref for d in self.datastore_folder.entities])

    def prop_network(self) -> Any:
        return vim.Network.Array([n.ref for n in self.network_folder.entities])


class ResourcePool(ManagedEntity):
    vim_type = vim.ResourcePool
    id_prefix = "resgroup-"

    def __init__(self, runtime: Runtime, name: str, parent: ManagedEntity,
                 owner: ClusterComputeResource) -> None:
        super().__init__(runtime, name, parent)
        self.owner = owner
        self.vms: list[PlacedVm] = []

    def prop_owner(self) -> Any:
        return self.owner.ref

    def prop_vm(self) -> Any:
        return vim.VirtualMachine.Array([v.ref for v in self.vms])

    def prop_resourcePool(self) -> Any:
        return vim.ResourcePool.Array()

    def prop_summary(self) -> Any:
        alloc = vim.ResourceAllocationInfo(reservation=0, expandableReservation=True, limit=-1,
                                           shares=vim.SharesInfo(shares=4000, level="normal"))
        usage = vim.ResourcePool.ResourceUsage(
            reservationUsed=0, reservationUsedForVm=0, unreservedForPool=0, unreservedForVm=0,
            overallUsage=0, maxUsage=0)
        return vim.ResourcePool.Summary(
            name=self.name,
            config=vim.ResourceConfigSpec(cpuAllocation=alloc, memoryAllocation=alloc),
            runtime=vim.ResourcePool.RuntimeInfo(memory=usage, cpu=usage, overallStatus=GREEN))


def clone_cost_mb(memory_mb: int, shared: float) -> int:
    """What a powered-on instant clone costs its host: the part of its memory it does
    not share with its source (``shared`` is the shared fraction)."""
    return int(memory_mb * (1.0 - shared))


class HostSystem(ManagedEntity):
    vim_type = vim.HostSystem
    id_prefix = "host-"

    def __init__(self, runtime: Runtime, name: str, parent: ManagedEntity, *, slots: int,
                 memory_mb: int, overcommit: float, cpu_cores: int, connection_state: str,
                 maintenance: bool = False) -> None:
        super().__init__(runtime, name, parent)
        self.maintenance = maintenance
        self.slots = slots
        self.memory_mb = memory_mb
        self.overcommit = overcommit
        self.cpu_cores = cpu_cores
        self.connection_state = connection_state
        self.uuid = str(uuid.uuid4())
        self._vms: dict[str, PlacedVm] = {}
        self.datastores: list[Datastore] = []
        self.networks: list[Network] = []
        self.boot_time = datetime.now(UTC)
        # Memory of the VMs here, kept as they come, go and change (VirtualMachine
        # reports it): a clone's memory check must not sum over every VM on the host.
        self._full_mb = 0  # powered-on VMs that share nothing
        self._clones_by_mb: Counter[int] = Counter()  # powered-on clones, by memory size

    @property
    def connected(self) -> bool:
        return self.connection_state == "connected"

    @property
    def vms(self) -> Sequence[PlacedVm]:
        """The VMs on this host, oldest first (change them with add_vm and remove_vm)."""
        return list(self._vms.values())

    def add_vm(self, vm: PlacedVm) -> None:
        if vm.moid not in self._vms:
            self._vms[vm.moid] = vm
            vm.counted_on = self
            self.account_memory(vm.memory_share(), 1)

    def remove_vm(self, vm: PlacedVm) -> None:
        if self._vms.get(vm.moid) is vm:
            del self._vms[vm.moid]
            vm.counted_on = None
            self.account_memory(vm.memory_share(), -1)

    def account_memory(self, share: tuple[bool, int] | None, sign: int) -> None:
        """Count (``sign`` 1) or uncount (-1) one VM's ``VirtualMachine.memory_share``."""
        if share is None:
            return
        clone, memory_mb = share
        if clone:
            self._clones_by_mb[memory_mb] += sign
            if not self._clones_by_mb[memory_mb]:
                del self._clones_by_mb[memory_mb]
        else:
            self._full_mb += sign * memory_mb

    def memory_used_mb(self) -> int:
        """Host memory in use: powered-on VMs, clones counted by their unshared part."""
        shared = self.runtime.clone_memory_shared
        return self._full_mb + sum(count * clone_cost_mb(memory_mb, shared)
                                   for memory_mb, count in self._clones_by_mb.items())

    def memory_limit_mb(self) -> int:
        return int(self.memory_mb * self.overcommit)

    def set_connection_state(self, state: str) -> None:
        self.connection_state = state
        self.touch("runtime", "summary")
        for vm in self._vms.values():
            vm.touch("runtime", "summary")

    def set_maintenance(self, on: bool) -> None:
        """Enter or leave maintenance mode (the VMs stay: the simulator does not evacuate)."""
        self.maintenance = on
        self.touch("runtime", "summary")

    def prop_runtime(self) -> Any:
        return vim.host.RuntimeInfo(connectionState=self.connection_state,
                                    powerState="poweredOn", inMaintenanceMode=self.maintenance,
                                    bootTime=self.boot_time)

    def _hardware_summary(self) -> Any:
        return vim.host.Summary.HardwareSummary(
            vendor="fleet-sim", model="Simulated host", uuid=self.uuid,
            memorySize=self.memory_mb * MB, cpuModel="Simulated CPU", cpuMhz=2600,
            numCpuPkgs=2, numCpuCores=self.cpu_cores, numCpuThreads=self.cpu_cores * 2,
            numNics=2, numHBAs=1)

    def prop_summary(self) -> Any:
        return vim.host.Summary(
            host=self.ref,
            hardware=self._hardware_summary(),
            runtime=self.prop_runtime(),
            config=vim.host.Summary.ConfigSummary(name=self.name, port=443,
                                                  vmotionEnabled=True,
                                                  faultToleranceEnabled=False,
                                                  product=self.runtime.about(esxi=True)),
            quickStats=vim.host.Summary.QuickStats(overallMemoryUsage=self.memory_used_mb(),
                                                   overallCpuUsage=0, uptime=0),
            overallStatus=GREEN if self.connected else "gray",
            rebootRequired=False,
            managementServerIp="127.0.0.1")

    def prop_hardware(self) -> Any:
        return vim.host.HardwareInfo(
            systemInfo=vim.host.SystemInfo(vendor="fleet-sim", model="Simulated host",
                                           uuid=self.uuid),
            cpuInfo=vim.host.CpuInfo(numCpuPackages=2, numCpuCores=self.cpu_cores,
                                     numCpuThreads=self.cpu_cores * 2, hz=2_600_000_000),
            cpuPkg=[], memorySize=self.memory_mb * MB, smcPresent=False)

    def prop_vm(self) -> Any:
        return vim.VirtualMachine.Array([v.ref for v in self._vms.values()])

    def prop_datastore(self) -> Any:
        return vim.Datastore.Array([d.ref for d in self.datastores])

    def prop_network(self) -> Any:
        return vim.Network.Array([n.ref for n in self.networks])


class ClusterComputeResource(ManagedEntity):
    vim_type = vim.ClusterComputeResource
    id_prefix = "domain-c"

    def __init__(self, runtime: Runtime, name: str, parent: Folder) -> None:
        super().__init__(runtime, name, parent)
        self.hosts: list[HostSystem] = []
        self.pool = ResourcePool(runtime, "Resources", self, self)

    def children(self) -> list[ManagedEntity]:
        return [*self.hosts, self.pool]

    def prop_host(self) -> Any:
        return vim.HostSystem.Array([h.ref for h in self.hosts])

    def prop_resourcePool(self) -> Any:
        return self.pool.ref

    def prop_datastore(self) -> Any:
        seen: dict[str, Datastore] = {}
        for host in self.hosts:
            for ds in host.datastores:
                seen.setdefault(ds.moid, ds)
        return vim.Datastore.Array([d.ref for d in seen.values()])

    def prop_network(self) -> Any:
        seen: dict[str, Network] = {}
        for host in self.hosts:
            for net in host.networks:
                seen.setdefault(net.moid, net)
        return vim.Network.Array([n.ref for n in seen.values()])

    def prop_summary(self) -> Any:
        hosts = [h for h in self.hosts if h.connected]
        memory = sum(h.memory_mb for h in self.hosts) * MB
        cores = sum(h.cpu_cores for h in self.hosts)
        return vim.ClusterComputeResource.Summary(
            totalCpu=cores * 2600, totalMemory=memory, numCpuCores=cores,
            numCpuThreads=cores * 2, effectiveCpu=cores * 2600,
            effectiveMemory=sum(h.memory_mb for h in hosts), numHosts=len(self.hosts),
            numEffectiveHosts=len(hosts), overallStatus=GREEN)


class Datastore(ManagedEntity):
    vim_type = vim.Datastore
    id_prefix = "datastore-"

    def __init__(self, runtime: Runtime, name: str, parent: Folder, capacity_bytes: int,
                 free_bytes: int) -> None:
        super().__init__(runtime, name, parent)
        self.capacity = capacity_bytes
        self.used = capacity_bytes - free_bytes
        self.url = f"ds:///vmfs/volumes/{uuid.uuid4().hex[:8]}-{name}/"
        self.vms: list[PlacedVm] = []
        self.hosts: list[HostSystem] = []

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.used)

    def allocate(self, nbytes: int) -> None:
        self.used += nbytes
        self.touch("summary", "info")

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)
        self.touch("summary", "info")

    def prop_summary(self) -> Any:
        return vim.Datastore.Summary(datastore=self.ref, name=self.name, url=self.url,
                                     capacity=self.capacity, freeSpace=self.free,
                                     accessible=True, type="VMFS", multipleHostAccess=True,
                                     maintenanceMode="normal")

    def prop_info(self) -> Any:
        return vim.host.VmfsDatastoreInfo(name=self.name, url=self.url, freeSpace=self.free,
                                          maxFileSize=62 * 1024 * GB,
                                          maxMemoryFileSize=62 * 1024 * GB)

    def prop_vm(self) -> Any:
        return vim.VirtualMachine.Array([v.ref for v in self.vms])

    def prop_host(self) -> Any:
        return [vim.Datastore.HostMount(key=h.ref, mountInfo=vim.host.MountInfo(
            accessMode="readWrite", mounted=True, accessible=True)) for h in self.hosts]


class Network(ManagedEntity):
    vim_type = vim.Network
    id_prefix = "network-"

    def __init__(self, runtime: Runtime, name: str, parent: Folder) -> None:
        super().__init__(runtime, name, parent)
        self.vms: list[PlacedVm] = []
        self.hosts: list[HostSystem] = []
        self._nic_backing: Any = None

    def nic_backing(self) -> Any:
        """What a NIC on this network reports as its backing: one object, shared by
        every NIC (the reply serializer only reads it)."""
        backing = self._nic_backing
        if backing is None or backing.deviceName != self.name:
            backing = self._nic_backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                deviceName=self.name, network=self.ref, useAutoDetect=False)
            share(backing)
        return backing

    def prop_summary(self) -> Any:
        return vim.Network.Summary(network=self.ref, name=self.name, accessible=True,
                                   ipPoolName="")

    def prop_vm(self) -> Any:
        return vim.VirtualMachine.Array([v.ref for v in self.vms])

    def prop_host(self) -> Any:
        return vim.HostSystem.Array([h.ref for h in self.hosts])
