"""VirtualMachine: power, instant clone, full clone, relocate, reconfigure, destroy, guest.

Instant Clone semantics (DESIGN.md section 3):

- The source must be powered on (running or frozen); otherwise InvalidState.
- A *running* source is stunned and cloned one task at a time (the scheduler's
  ``source:`` resource); it gains a delta disk per clone, and the clone gets a
  delta on the source's previous top. A *frozen* source is unchanged and can be
  cloned concurrently. Either way the clone's chain is the source's + 1.
- A chain past 255 fails the clone with GenericVmConfigFault ("Unable to
  prepare migration"), as seen in the field. Deeper chains clone slower.
- The clone lands on the source's host with new MACs and UUIDs, extraConfig
  merged (spec wins: a clone inherits every key its spec does not set, and an
  empty value removes one), and NICs connected or not by ``migrateConnect``. A
  NIC edit that carries a ``macAddress`` sets it, as vCenter does: a source's
  MAC copied into the spec gives the clone a duplicate MAC (counted).
- Memory: a clone shares most pages with its source; the host refuses work
  past its (over-committed) memory with InsufficientResourcesFault.

Guest network: a clone's guest keeps using the *source's* MAC and IP until a
NIC refresh runs inside it. A clone whose NIC is connected while its guest
still uses another MAC is a *network conflict*; the simulator counts them.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pyVmomi import vim, vmodl

from fleet.sim import guest as guestcmd
from fleet.sim.core import CallContext
from fleet.sim.entities import (
    MB,
    Datastore,
    Folder,
    HostSystem,
    ManagedEntity,
    Network,
    ResourcePool,
    check_entity_name,
    clone_cost_mb,
)
from fleet.sim.tasks import VC, Task

if TYPE_CHECKING:
    from fleet.sim.simulator import Simulator

MAX_CHAIN = 255
DELTA_BYTES = 64 * MB  # a fresh instant-clone delta disk, roughly
NIC_KEY_BASE = 4000
DISK_KEY_BASE = 2000

GUEST_IDS = {
    "linux": ("ubuntu64Guest", "Ubuntu Linux (64-bit)", "linuxGuest"),
    "windows": ("windows2019srv_64Guest", "Microsoft Windows Server 2019 (64-bit)",
                "windowsGuest"),
}


@dataclass
class Nic:
    key: int
    mac: str
    network: Network | None
    connected: bool
    start_connected: bool

    @property
    def label(self) -> str:
        return f"Network adapter {self.key - NIC_KEY_BASE + 1}"


@dataclass
class Disk:
    key: int
    capacity_kb: int
    datastore: Datastore
    chain: list[str]  # vmdk descriptor paths, base first

    @property
    def label(self) -> str:
        return f"Hard disk {self.key - DISK_KEY_BASE + 1}"


@dataclass
class Process:
    pid: int
    name: str
    owner: str
    cmd_line: str
    start: datetime
    end: datetime | None = None
    exit_code: int | None = None
    # actions still to play: what follows a freeze runs in each clone on resume
    pending: tuple[guestcmd.Action, ...] = ()
    exit_on_finish: int = 0


@dataclass
class Guest:
    family: str
    user: str
    password: str
    tools_installed: bool
    ready_key: str | None = None
    ready_after_s: float = 1.0
    tools_running: bool = False
    macs: list[str] = field(default_factory=list)  # what the guest OS uses, per NIC
    ip: str | None = None
    processes: dict[int, Process] = field(default_factory=dict)
    next_pid: int = 1000
    generation: int = 0  # bumped on every boot, so stale timers do nothing


def _check_nic_type(device: Any, prop: str, index: int) -> None:
    """An edit names a NIC by key and keeps its adapter type (the simulator's NICs are
    all VMXNET 3): a change of type is not an edit."""
    if type(device) is not vim.vm.device.VirtualVmxnet3:
        raise vim.fault.InvalidDeviceSpec(
            msg=f"Device {device.key} is a VirtualVmxnet3; an edit cannot make it a "
                f"{type(device).__name__}.", property=prop, deviceIndex=index)


class VirtualMachine(ManagedEntity):
    vim_type = vim.VirtualMachine
    id_prefix = "vm-"
    path_getters = {"config.hardware.device": "_devices",
                    "guest.ipAddress": "_guest_ip_address"}

    def __init__(self, sim: Simulator, name: str, folder: Folder, *, pool: ResourcePool,
                 host: HostSystem, datastore: Datastore, memory_mb: int, num_cpu: int,
                 guest: Guest, nics: list[Nic], disks: list[Disk],
                 extra_config: dict[str, str], power_state: str = "poweredOff") -> None:
        super().__init__(sim, name, folder)
        self.pool = pool
        self.host = host
        self.datastore = datastore
        # What the host's memory accounting depends on (see memory_share): behind
        # properties that report each change to the host the VM is counted on.
        self.counted_on: HostSystem | None = None
        self._memory_mb = memory_mb
        self._power_state = power_state
        self._memory_parent: VirtualMachine | None = None  # pages shared with the source
        self.num_cpu = num_cpu
        self.guest = guest
        self.nics = nics
        self.disks = disks
        self.extra_config = dict(extra_config)
        self.frozen = False
        self.uuid = str(uuid.uuid4())
        self.instance_uuid = str(uuid.uuid4())
        self.clones = 0
        self.conflicted = False
        self.boot_time: datetime | None = None
        self.created = datetime.now(UTC)
        self.change_version = 1
        self.modified = self.created
        self.stunned = False

    # -- memory accounting -------------------------------------------------
    @property
    def power_state(self) -> str:
        return self._power_state

    @power_state.setter
    def power_state(self, value: str) -> None:
        self._uncount_memory()
        self._power_state = value
        self._count_memory()

    @property
    def memory_mb(self) -> int:
        return self._memory_mb

    @memory_mb.setter
    def memory_mb(self, value: int) -> None:
        self._uncount_memory()
        self._memory_mb = value
        self._count_memory()

    @property
    def memory_parent(self) -> VirtualMachine | None:
        return self._memory_parent

    @memory_parent.setter
    def memory_parent(self, value: VirtualMachine | None) -> None:
        self._uncount_memory()
        self._memory_parent = value
        self._count_memory()

    def _uncount_memory(self) -> None:
        if self.counted_on is not None:
            self.counted_on.account_memory(self.memory_share(), -1)

    def _count_memory(self) -> None:
        if self.counted_on is not None:
            self.counted_on.account_memory(self.memory_share(), 1)

    def memory_share(self) -> tuple[bool, int] | None:
        """What this VM costs its host: None when off, else (a clone?, memory MB).

        A clone costs only its unshared part (``host_memory_cost_mb``); the host
        applies the share when asked, so the share may change at any time."""
        if self._power_state != "poweredOn":
            return None
        return self._memory_parent is not None, self._memory_mb

    # -- placement bookkeeping -------------------------------------------
    def register(self) -> None:
        """Put the VM into its folder, pool, host, datastore and networks."""
        assert isinstance(self.parent, Folder)
        self.parent.attach(self)
        self.pool.vms.append(self)
        self.host.add_vm(self)
        for ds in self.datastores():
            ds.vms.append(self)
            ds.touch("vm")
        for net in self.networks():
            net.vms.append(self)
        self.sim.inventory.add(self)
        self.pool.touch("vm")
        self.host.touch("vm", "summary")

    def unregister(self) -> None:
        if isinstance(self.parent, Folder):
            self.parent.detach(self)
        if self in self.pool.vms:
            self.pool.vms.remove(self)
        self.host.remove_vm(self)
        for ds in self.datastores():
            if self in ds.vms:
                ds.vms.remove(self)
            ds.touch("vm")
        for net in self.networks():
            if self in net.vms:
                net.vms.remove(self)
        self.sim.inventory.remove(self)
        self.pool.touch("vm")
        self.host.touch("vm", "summary")

    def datastores(self) -> list[Datastore]:
        seen: dict[str, Datastore] = {self.datastore.moid: self.datastore}
        for disk in self.disks:
            seen.setdefault(disk.datastore.moid, disk.datastore)
        return list(seen.values())

    def networks(self) -> list[Network]:
        seen: dict[str, Network] = {}
        for nic in self.nics:
            if nic.network is not None:
                seen.setdefault(nic.network.moid, nic.network)
        return list(seen.values())

    def chain_depth(self) -> int:
        return max((len(d.chain) for d in self.disks), default=0)

    def host_memory_cost_mb(self) -> int:
        if self.power_state != "poweredOn":
            return 0
        if self.memory_parent is not None:
            return clone_cost_mb(self.memory_mb, self.sim.clone_memory_shared)
        return self.memory_mb

    def config_changed(self) -> None:
        self.change_version += 1
        self.modified = datetime.now(UTC)
        self.touch("config", "summary")

    # -- properties ------------------------------------------------------
    def _guest_ids(self) -> tuple[str, str, str]:
        return GUEST_IDS.get(self.guest.family, GUEST_IDS["linux"])

    def vmx_path(self) -> str:
        return f"[{self.datastore.name}] {self.name}/{self.name}.vmx"

    def prop_resourcePool(self) -> Any:
        return self.pool.ref

    def prop_datastore(self) -> Any:
        return vim.Datastore.Array([d.ref for d in self.datastores()])

    def prop_network(self) -> Any:
        return vim.Network.Array([n.ref for n in self.networks()])

    def connection_state(self) -> str:
        return "connected" if self.host.connected else "disconnected"

    def prop_runtime(self) -> Any:
        return vim.vm.RuntimeInfo(
            host=self.host.ref, connectionState=self.connection_state(),
            powerState=self.power_state, faultToleranceState="notConfigured",
            toolsInstallerMounted=False, numMksConnections=0, recordReplayState="inactive",
            onlineStandby=False, consolidationNeeded=False, bootTime=self.boot_time,
            maxMemoryUsage=self.memory_mb, maxCpuUsage=self.num_cpu * 2600,
            paused=self.stunned, snapshotInBackground=False,
            instantCloneFrozen=self.frozen, cleanPowerOff=self.power_state == "poweredOff",
            suspendedToMemory=False)

    def _devices(self) -> list[Any]:
        devices: list[Any] = []
        for disk in self.disks:
            devices.append(vim.vm.device.VirtualDisk(
                key=disk.key, controllerKey=1000, unitNumber=disk.key - DISK_KEY_BASE,
                capacityInKB=disk.capacity_kb, capacityInBytes=disk.capacity_kb * 1024,
                deviceInfo=vim.Description(label=disk.label, summary=f"{disk.capacity_kb} KB"),
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    fileName=disk.chain[-1], diskMode="persistent", thinProvisioned=True,
                    datastore=disk.datastore.ref)))
        for nic in self.nics:
            devices.append(vim.vm.device.VirtualVmxnet3(
                key=nic.key, controllerKey=100, unitNumber=7 + nic.key - NIC_KEY_BASE,
                deviceInfo=vim.Description(label=nic.label,
                                           summary=nic.network.name if nic.network else ""),
                backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                    deviceName=nic.network.name if nic.network else "",
                    network=nic.network.ref if nic.network else None),
                connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                    startConnected=nic.start_connected, allowGuestControl=True,
                    connected=nic.connected and self.power_state == "poweredOn",
                    status="ok"),
                addressType="assigned", macAddress=nic.mac, wakeOnLanEnabled=True))
        return devices

    def prop_config(self) -> Any:
        guest_id, full_name, _ = self._guest_ids()
        return vim.vm.ConfigInfo(
            changeVersion=str(self.change_version), modified=self.modified, name=self.name,
            guestFullName=full_name, version="vmx-19", uuid=self.uuid,
            instanceUuid=self.instance_uuid, template=False, guestId=guest_id,
            alternateGuestName="", createDate=self.created,
            files=vim.vm.FileInfo(vmPathName=self.vmx_path(),
                                  logDirectory=f"[{self.datastore.name}] {self.name}/"),
            flags=vim.vm.FlagInfo(), defaultPowerOps=vim.vm.DefaultPowerOpInfo(),
            tools=vim.vm.ToolsConfigInfo(toolsVersion=12352 if self.guest.tools_installed else 0),
            hardware=vim.vm.VirtualHardware(numCPU=self.num_cpu, memoryMB=self.memory_mb,
                                            numCoresPerSocket=1, device=self._devices()),
            extraConfig=[vim.option.OptionValue(key=k, value=v)
                         for k, v in self.extra_config.items()])

    def prop_layoutEx(self) -> Any:
        files: list[Any] = []
        disks: list[Any] = []
        key = 0
        files.append(vim.vm.FileLayoutEx.FileInfo(key=key, name=self.vmx_path(), type="config",
                                                  size=4096, accessible=True))
        for disk in self.disks:
            units = []
            for i, descriptor in enumerate(disk.chain):
                extent = descriptor.replace(".vmdk", "-flat.vmdk" if i == 0 else "-delta.vmdk")
                key += 1
                files.append(vim.vm.FileLayoutEx.FileInfo(key=key, name=descriptor,
                                                          type="diskDescriptor", size=512,
                                                          accessible=True))
                key += 1
                size = disk.capacity_kb * 1024 if i == 0 else DELTA_BYTES
                files.append(vim.vm.FileLayoutEx.FileInfo(key=key, name=extent,
                                                          type="diskExtent", size=size,
                                                          accessible=True))
                units.append(vim.vm.FileLayoutEx.DiskUnit(fileKey=[key - 1, key]))
            disks.append(vim.vm.FileLayoutEx.DiskLayout(key=disk.key, chain=units))
        return vim.vm.FileLayoutEx(file=files, disk=disks, timestamp=datetime.now(UTC))

    def tools_status(self) -> tuple[str, str]:
        if not self.guest.tools_installed:
            return "guestToolsNotRunning", "toolsNotInstalled"
        if self.guest.tools_running:
            return "guestToolsRunning", "toolsOk"
        return "guestToolsNotRunning", "toolsNotRunning"

    def prop_guest(self) -> Any:
        guest_id, full_name, family = self._guest_ids()
        running, status = self.tools_status()
        active = self.guest.tools_running
        nets = []
        if active:
            for i, nic in enumerate(self.nics):
                mac = self.guest.macs[i] if i < len(self.guest.macs) else nic.mac
                ips = [self.guest.ip] if i == 0 and self.guest.ip else []
                nets.append(vim.vm.GuestInfo.NicInfo(
                    network=nic.network.name if nic.network else None, ipAddress=ips,
                    macAddress=mac, connected=nic.connected, deviceConfigId=nic.key))
        return vim.vm.GuestInfo(
            toolsStatus=status, toolsRunningStatus=running,
            toolsVersionStatus2="guestToolsCurrent" if self.guest.tools_installed
            else "guestToolsNotInstalled",
            toolsVersion="12352" if self.guest.tools_installed else "0",
            guestId=guest_id if active else None, guestFamily=family if active else None,
            guestFullName=full_name if active else None,
            hostName=self.name if active else None,
            ipAddress=self.guest.ip if active else None, net=nets,
            guestState="running" if active else "notRunning",
            guestOperationsReady=active and not self.frozen,
            interactiveGuestOperationsReady=False)

    def _guest_ip_address(self) -> str | None:
        # prop_guest().ipAddress
        return self.guest.ip if self.guest.tools_running else None

    def prop_guestHeartbeatStatus(self) -> str:
        return "green" if self.guest.tools_running else "gray"

    def prop_summary(self) -> Any:
        guest_id, full_name, _ = self._guest_ids()
        running, status = self.tools_status()
        committed = sum(DELTA_BYTES for d in self.disks)
        return vim.vm.Summary(
            vm=self.ref, runtime=self.prop_runtime(),
            guest=vim.vm.Summary.GuestSummary(guestId=guest_id, guestFullName=full_name,
                                              toolsStatus=status, toolsRunningStatus=running,
                                              hostName=self.name if self.guest.tools_running
                                              else None,
                                              ipAddress=self.guest.ip if self.guest.tools_running
                                              else None),
            config=vim.vm.Summary.ConfigSummary(
                name=self.name, template=False, vmPathName=self.vmx_path(),
                memorySizeMB=self.memory_mb, numCpu=self.num_cpu,
                numEthernetCards=len(self.nics), numVirtualDisks=len(self.disks),
                uuid=self.uuid, instanceUuid=self.instance_uuid, guestId=guest_id,
                guestFullName=full_name),
            storage=vim.vm.Summary.StorageSummary(committed=committed, uncommitted=0,
                                                  unshared=committed,
                                                  timestamp=datetime.now(UTC)),
            quickStats=vim.vm.Summary.QuickStats(
                guestHeartbeatStatus=self.prop_guestHeartbeatStatus(),
                overallCpuUsage=0, guestMemoryUsage=0,
                hostMemoryUsage=self.host_memory_cost_mb(), uptimeSeconds=0),
            overallStatus="green")

    def prop_snapshot(self) -> Any:
        return None

    def prop_capability(self) -> Any:
        return vim.vm.Capability(snapshotOperationsSupported=True, multipleSnapshotsSupported=True,
                                 snapshotConfigSupported=True, poweredOffSnapshotsSupported=True,
                                 memorySnapshotsSupported=True, revertToSnapshotSupported=True,
                                 quiescedSnapshotsSupported=True,
                                 disableSnapshotsSupported=False, lockSnapshotsSupported=False,
                                 consolePreferencesSupported=False, cpuFeatureMaskSupported=True,
                                 s1AcpiManagementSupported=True,
                                 settingScreenResolutionSupported=True,
                                 toolsAutoUpdateSupported=True, vmNpivWwnSupported=True,
                                 npivWwnOnNonRdmVmSupported=True, vmNpivWwnDisableSupported=True,
                                 vmNpivWwnUpdateSupported=True, swapPlacementSupported=True,
                                 toolsSyncTimeSupported=True, virtualMmuUsageSupported=True,
                                 diskSharesSupported=True, bootOptionsSupported=True,
                                 bootRetryOptionsSupported=True, settingVideoRamSizeSupported=True,
                                 settingDisplayTopologySupported=True,
                                 recordReplaySupported=False, changeTrackingSupported=True)

    # -- guest behaviour ---------------------------------------------------
    def _touch_guest(self) -> None:
        self.touch("guest", "summary", "guestHeartbeatStatus")

    def set_mac(self, nic: Nic, mac: str) -> None:
        """Give ``nic`` the address a device edit carries. One that another VM's NIC
        already has is a duplicate MAC, which the simulator counts (vCenter takes the
        address; the network then has two machines answering to it)."""
        if mac == nic.mac:
            return
        nic.mac = mac
        if any(other is not self and any(n.mac == mac for n in other.nics)
               for other in self.sim.inventory.of_type(VirtualMachine)):
            self.sim.stats_duplicate_mac(self, mac)
        self.config_changed()

    def check_conflict(self) -> None:
        """Count a network conflict: a connected NIC whose guest uses another MAC."""
        if self.conflicted or self.power_state != "poweredOn" or self.frozen:
            return
        for i, nic in enumerate(self.nics):
            guest_mac = self.guest.macs[i] if i < len(self.guest.macs) else nic.mac
            if nic.connected and guest_mac != nic.mac:
                self.conflicted = True
                self.sim.stats_network_conflict(self)
                return

    def boot_guest(self, *, fresh: bool) -> None:
        """Power-on or reset: the guest OS starts and adopts the vNICs' MACs."""
        self.guest.generation += 1
        generation = self.guest.generation
        self.guest.tools_running = False
        self.guest.ip = None
        self.guest.processes.clear()
        if fresh:
            self.guest.macs = [nic.mac for nic in self.nics]
        self._touch_guest()
        if not self.guest.tools_installed:
            return

        def up() -> None:
            if self.guest.generation != generation or self.power_state != "poweredOn":
                return
            self.guest.tools_running = True
            self._assign_ip()
            self._touch_guest()

        self.sim.later(self.sim.latency(self.sim.topology.latency.guest_boot_s), up)

    def _assign_ip(self) -> None:
        """DHCP: a connected first NIC whose guest MAC is the vNIC's gets its own IP."""
        if not self.nics:
            return
        nic = self.nics[0]
        guest_mac = self.guest.macs[0] if self.guest.macs else nic.mac
        if nic.connected and guest_mac == nic.mac:
            self.guest.ip = self.sim.ip_for(nic.mac)
            self._maybe_ready()
        elif guest_mac != nic.mac:
            pass  # keeps whatever it had (a clone: the source's IP)
        else:
            self.guest.ip = None

    def _maybe_ready(self) -> None:
        key = self.guest.ready_key
        if not key or self.extra_config.get(key) == "1":
            return
        generation = self.guest.generation

        def ready() -> None:
            if self.guest.generation == generation and self.power_state == "poweredOn":
                self.extra_config[key] = "1"
                self.config_changed()

        self.sim.later(self.sim.latency(self.guest.ready_after_s), ready)

    def refresh_network(self) -> None:
        """The guest re-reads its NICs (unbind/bind or Restart-NetAdapter) and renews DHCP."""
        self.guest.macs = [nic.mac for nic in self.nics]
        self.guest.ip = None
        self._assign_ip()
        self._touch_guest()

    def freeze(self) -> None:
        self.frozen = True
        self.guest.tools_running = False
        self.touch("runtime", "summary")
        self._touch_guest()

    def unfreeze(self) -> None:
        if self.frozen:
            self.frozen = False
            self.touch("runtime", "summary")

    def start_process(self, program: guestcmd.Program, cmd_line: str, owner: str) -> Process:
        self.guest.next_pid += 1
        proc = Process(pid=self.guest.next_pid, name=program.name, owner=owner,
                       cmd_line=cmd_line, start=datetime.now(UTC),
                       pending=program.actions, exit_on_finish=program.exit_code)
        self.guest.processes[proc.pid] = proc
        self.sim.spawn(self.run_process(proc, self.guest.generation))
        return proc

    async def run_process(self, proc: Process, generation: int) -> None:
        """Play a process's actions; a freeze stops it here and it goes on in each clone."""
        lat = self.sim.topology.latency
        exit_code = proc.exit_on_finish
        if not proc.pending:
            await self.sim.sleep(lat.guest_program_s)
        while proc.pending:
            if self.guest.generation != generation or self.power_state != "poweredOn":
                return
            action, proc.pending = proc.pending[0], proc.pending[1:]
            if action.kind == guestcmd.FREEZE:
                await self.sim.sleep(lat.freeze_s)
                if self.guest.generation != generation or self.power_state != "poweredOn":
                    return
                self.freeze()
                return
            if action.kind == guestcmd.REFRESH:
                await self.sim.sleep(lat.guest_program_s)
                if self.guest.generation != generation:
                    return
                self.refresh_network()
            elif action.kind == guestcmd.INFO_SET and action.key:
                self.extra_config[action.key] = action.value or ""
                self.config_changed()
            elif (action.kind == guestcmd.INFO_GET and action.key
                  and not self.extra_config.get(action.key)):
                exit_code = exit_code or 1
        if self.guest.generation != generation:
            return
        proc.end = datetime.now(UTC)
        proc.exit_code = exit_code

    def resume_in_clone(self, source_processes: dict[int, Process]) -> None:
        """A clone resumes from the frozen state: frozen processes go on here."""
        generation = self.guest.generation
        for pid, proc in source_processes.items():
            if proc.end is not None:
                self.guest.processes[pid] = copy.copy(proc)
                continue
            clone_proc = copy.copy(proc)
            self.guest.processes[pid] = clone_proc
            self.sim.spawn(self.run_process(clone_proc, generation))

    # -- helpers for tasks -------------------------------------------------
    def check_host(self, host: HostSystem | None = None) -> None:
        host = host or self.host
        if not host.connected:
            raise vim.fault.InvalidHostConnectionState(
                msg=f"The operation is not allowed in the current connection state of the "
                    f"host '{host.name}' ({host.connection_state}).", host=host.ref)

    def check_memory(self, host: HostSystem, cost_mb: int) -> None:
        used = host.memory_used_mb()
        limit = host.memory_limit_mb()
        if used + cost_mb > limit:
            raise vim.fault.InsufficientHostMemoryCapacityFault(
                msg=f"The available memory resources on host '{host.name}' are insufficient "
                    f"for the operation ({limit - used} MB free, {cost_mb} MB needed).",
                host=host.ref, unreserved=max(0, limit - used) * MB, requested=cost_mb * MB)

    def _task(self, ctx: CallContext, method: str, description_id: str, body: Any, *,
              resources: tuple[str, ...] = (), cancelable: bool = False) -> Any:
        return ctx.sim.start_task(ctx, entity=self, method=method,
                                  description_id=description_id, body=body,
                                  resources=(VC, *resources), cancelable=cancelable)

    # -- power -------------------------------------------------------------
    def PowerOnVM_Task(self, ctx: CallContext, host: Any = None) -> Any:
        async def body(task: Task) -> None:
            self.check_host()
            if self.power_state == "poweredOn":
                raise vim.fault.InvalidPowerState(
                    msg="The attempted operation cannot be performed in the current state "
                        "(Powered on).", requestedState="poweredOn", existingState="poweredOn")
            self.check_memory(self.host, self.memory_mb if self.memory_parent is None else
                              clone_cost_mb(self.memory_mb, ctx.sim.clone_memory_shared))
            await task.sleep(ctx.sim.topology.latency.power_on_s)
            self.power_state = "poweredOn"
            self.boot_time = datetime.now(UTC)
            self.touch("runtime", "summary", "config")
            self.host.touch("summary")
            self.boot_guest(fresh=True)

        return self._task(ctx, "PowerOnVM_Task", "VirtualMachine.powerOn", body)

    def _power_off_now(self) -> None:
        self.power_state = "poweredOff"
        self.boot_time = None
        self.unfreeze()
        self.guest.generation += 1
        self.guest.tools_running = False
        self.guest.ip = None
        self.guest.processes.clear()
        self.touch("runtime", "summary", "config")
        self._touch_guest()
        self.host.touch("summary")

    def PowerOffVM_Task(self, ctx: CallContext) -> Any:
        async def body(task: Task) -> None:
            self.check_host()
            if self.power_state == "poweredOff":
                raise vim.fault.InvalidPowerState(
                    msg="The attempted operation cannot be performed in the current state "
                        "(Powered off).", requestedState="poweredOff",
                    existingState="poweredOff")
            await task.sleep(ctx.sim.topology.latency.power_off_s)
            self._power_off_now()

        return self._task(ctx, "PowerOffVM_Task", "VirtualMachine.powerOff", body)

    def ResetVM_Task(self, ctx: CallContext) -> Any:
        async def body(task: Task) -> None:
            self.check_host()
            if self.power_state != "poweredOn":
                raise vim.fault.InvalidPowerState(
                    msg="The attempted operation cannot be performed in the current state "
                        f"({self.power_state}).", requestedState="poweredOn",
                    existingState=self.power_state)
            await task.sleep(ctx.sim.topology.latency.reset_s)
            self.unfreeze()
            self.boot_time = datetime.now(UTC)
            self.touch("runtime", "summary")
            self.boot_guest(fresh=True)

        return self._task(ctx, "ResetVM_Task", "VirtualMachine.reset", body)

    def ShutdownGuest(self, ctx: CallContext) -> None:
        if self.power_state != "poweredOn" or not self.guest.tools_running:
            raise vim.fault.ToolsUnavailable(msg="VMware Tools is not running in the guest.")
        self._power_off_now()

    # -- destroy -----------------------------------------------------------
    def Destroy_Task(self, ctx: CallContext) -> Any:
        async def body(task: Task) -> None:
            self._check_destroyable()
            await task.sleep(ctx.sim.topology.latency.destroy_s)
            self.destroy_now(ctx)

        return self._task(ctx, "Destroy_Task", "VirtualMachine.destroy", body)

    def _check_destroyable(self) -> None:
        self.check_host()
        if self.power_state != "poweredOff":
            raise vim.fault.InvalidPowerState(
                msg="The attempted operation cannot be performed in the current state "
                    "(Powered on).", requestedState="poweredOff",
                existingState=self.power_state)

    def destroy_now(self, ctx: CallContext) -> None:
        """The VM goes, disks and all (also when its folder is destroyed); a powered-on
        VM cannot (InvalidPowerState)."""
        if self.sim.inventory.get(self.moid) is None:
            return
        self._check_destroyable()
        for disk in self.disks:
            disk.datastore.release(DELTA_BYTES if len(disk.chain) > 1
                                   else disk.capacity_kb * 1024)
        self.unregister()
        ctx.sim.vm_destroyed(self)

    def UnregisterVM(self, ctx: CallContext) -> None:
        if self.power_state != "poweredOff":
            raise vim.fault.InvalidPowerState(msg="The VM must be powered off.",
                                              requestedState="poweredOff",
                                              existingState=self.power_state)
        self.unregister()
        ctx.sim.vm_destroyed(self)

    # -- reconfigure ---------------------------------------------------------
    def _nic(self, key: int | None) -> Nic | None:
        for nic in self.nics:
            if nic.key == key:
                return nic
        return None

    def _validate_config_spec(self, spec: Any) -> None:
        for i, change in enumerate(spec.deviceChange or ()):
            device = change.device
            if change.operation != "edit" or not isinstance(
                    device, vim.vm.device.VirtualEthernetCard):
                raise vim.fault.InvalidDeviceSpec(
                    msg="The simulator supports only edits of network adapters in "
                        "deviceChange.", property="deviceChange", deviceIndex=i)
            if self._nic(device.key) is None:
                raise vim.fault.InvalidDeviceSpec(
                    msg=f"No network adapter with key {device.key}.",
                    property="deviceChange.device.key", deviceIndex=i)
            _check_nic_type(device, "deviceChange.device", i)
        if spec.name is not None:
            check_entity_name(spec.name)

    def ReconfigVM_Task(self, ctx: CallContext, spec: Any) -> Any:
        self._validate_config_spec(spec)

        async def body(task: Task) -> None:
            self.check_host()
            await task.sleep(ctx.sim.topology.latency.reconfigure_s)
            if spec.name is not None and spec.name != self.name:
                folder = self.parent
                if isinstance(folder, Folder) and folder.child_named(spec.name) is not None:
                    raise vim.fault.DuplicateName(msg=f"The name '{spec.name}' already exists.",
                                                  name=spec.name,
                                                  object=folder.child_named(spec.name).ref)  # type: ignore[union-attr]
                self.name = spec.name
                self.touch("name")
            for option in spec.extraConfig or ():
                value = option.value
                if value is None or value == "":
                    self.extra_config.pop(option.key, None)
                else:
                    self.extra_config[option.key] = str(value)
            if spec.memoryMB:
                self.memory_mb = int(spec.memoryMB)
            if spec.numCPUs:
                self.num_cpu = int(spec.numCPUs)
            connected_any = False
            for change in spec.deviceChange or ():
                nic = self._nic(change.device.key)
                if nic is not None and change.device.macAddress:
                    self.set_mac(nic, str(change.device.macAddress))
                conn = change.device.connectable
                if nic is None or conn is None:
                    continue
                if conn.startConnected is not None:
                    nic.start_connected = bool(conn.startConnected)
                if conn.connected is not None and bool(conn.connected) != nic.connected:
                    nic.connected = bool(conn.connected)
                    connected_any = connected_any or nic.connected
                    if not nic.connected and self.guest.macs and self.guest.macs[0] == nic.mac:
                        self.guest.ip = None
            self.config_changed()
            if connected_any and self.power_state == "poweredOn":
                self.check_conflict()
                self._assign_ip()
                self._touch_guest()

        return self._task(ctx, "ReconfigVM_Task", "VirtualMachine.reconfigure", body)

    # -- instant clone -------------------------------------------------------
    def _clone_target(self, ctx: CallContext, name: str, location: Any) -> tuple[
            Folder, ResourcePool, Datastore]:
        folder = self.parent
        if location is not None and location.folder is not None:
            target = ctx.sim.inventory.resolve(location.folder)
            if not isinstance(target, Folder) or "VirtualMachine" not in target.child_types:
                raise vmodl.fault.InvalidArgument(msg="location.folder is not a VM folder",
                                                  invalidProperty="location.folder")
            folder = target
        pool = self.pool
        if location is not None and location.pool is not None:
            target = ctx.sim.inventory.resolve(location.pool)
            if not isinstance(target, ResourcePool):
                raise vmodl.fault.InvalidArgument(msg="location.pool is not a resource pool",
                                                  invalidProperty="location.pool")
            pool = target
        datastore = self.datastore
        if location is not None and location.datastore is not None:
            target = ctx.sim.inventory.resolve(location.datastore)
            if not isinstance(target, Datastore):
                raise vim.fault.InvalidDatastore(msg="location.datastore is not a datastore",
                                                 datastore=location.datastore)
            datastore = target
        assert isinstance(folder, Folder)
        return folder, pool, datastore

    def _nic_edits(self, location: Any) -> tuple[dict[int, str], dict[int, str]]:
        """From the spec's deviceChange edits: NIC key -> migrateConnect, and NIC key ->
        the MAC an edit sets (vCenter takes the address it is given)."""
        plan: dict[int, str] = {}
        macs: dict[int, str] = {}
        for i, change in enumerate((location.deviceChange if location is not None else None)
                                   or ()):
            device = change.device
            if change.operation not in (None, "edit") or not isinstance(
                    device, vim.vm.device.VirtualEthernetCard):
                message = ("Instant clone allows only edits of network adapters in "
                           f"location.deviceChange (entry {i}).")
                raise vim.fault.DisallowedMigrationDeviceAttached(
                    msg=message, fault=vmodl.fault.NotSupported(msg=message))
            if self._nic(device.key) is None:
                raise vim.fault.InvalidDeviceSpec(
                    msg=f"No network adapter with key {device.key} on '{self.name}'.",
                    property="location.deviceChange.device.key", deviceIndex=i)
            _check_nic_type(device, "location.deviceChange.device", i)
            conn = device.connectable
            if conn is not None and conn.migrateConnect in ("connect", "disconnect"):
                plan[device.key] = conn.migrateConnect
            if device.macAddress:
                macs[device.key] = str(device.macAddress)
        return plan, macs

    def clone_problems(self, ctx: CallContext, name: str, folder: Folder) -> list[Any]:
        """Why an instant clone from this VM would fail now (faults, in check order)."""
        problems: list[Any] = []
        if not self.host.connected:
            try:
                self.check_host()
            except vim.fault.InvalidHostConnectionState as exc:
                problems.append(exc)
        if self.power_state != "poweredOn":
            problems.append(vim.fault.InvalidPowerState(
                msg=f"The source VM '{self.name}' must be powered on for an instant clone "
                    f"(it is {self.power_state}).", requestedState="poweredOn",
                existingState=self.power_state))
        existing = folder.child_named(name) if name else None
        if existing is not None or (name and ctx.sim.name_pending(folder, name)):
            problems.append(vim.fault.DuplicateName(
                msg=f"The name '{name}' already exists.", name=name,
                object=existing.ref if existing is not None else folder.ref))
        depth = self.chain_depth() + 1
        if depth > MAX_CHAIN:
            problems.append(vim.fault.GenericVmConfigFault(
                msg=f"Unable to prepare migration: the disk chain of '{self.name}' is already "
                    f"{self.chain_depth()} levels deep; a clone would exceed the limit of "
                    f"{MAX_CHAIN}.",
                reason="Unable to prepare migration"))
        cost = int(self.memory_mb * (1 - ctx.sim.clone_memory_shared))
        try:
            self.check_memory(self.host, cost)
        except vim.fault.InsufficientResourcesFault as exc:
            problems.append(exc)
        return problems

    def InstantClone_Task(self, ctx: CallContext, spec: Any) -> Any:
        name = check_entity_name(spec.name)
        location = spec.location
        folder, pool, datastore = self._clone_target(ctx, name, location)
        plan, macs = self._nic_edits(location)
        extra = {o.key: "" if o.value is None else str(o.value) for o in spec.config or ()}
        for key in extra:
            if not isinstance(key, str) or not key:
                raise vmodl.fault.InvalidArgument(msg="config keys must be non-empty",
                                                  invalidProperty="config")
        sim = ctx.sim
        running = self.power_state == "poweredOn" and not self.frozen
        resources: tuple[str, ...] = (f"host:{self.host.moid}",)
        if running:
            key = f"source:{self.moid}"
            sim.scheduler.capacity.setdefault(key, 1)
            if sim.topology.vcenter.running_source_busy == "fault" and sim.scheduler.busy(key):
                raise vim.fault.TaskInProgress(
                    msg=f"The source VM '{self.name}' is busy with another clone.",
                    task=None)
            resources = (*resources, key)

        async def body(task: Task) -> Any:
            problems = self.clone_problems(ctx, name, folder)
            if problems:
                raise problems[0]
            frozen_now = self.frozen
            sim.reserve_name(folder, name)
            try:
                lat = sim.topology.latency
                duration = lat.instant_clone_s + lat.per_chain_level_s * self.chain_depth()
                if not frozen_now:
                    stun = min(lat.stun_s, duration)
                    self.stunned = True
                    self.touch("runtime")
                    try:
                        await task.sleep(stun)
                    finally:
                        self.stunned = False
                        self.touch("runtime")
                    duration -= stun
                task.set_progress(50)
                await task.sleep(duration)
                # The source may have changed while we worked.
                problems = [p for p in self.clone_problems(ctx, name, folder)
                            if not isinstance(p, vim.fault.DuplicateName)]
                if problems:
                    raise problems[0]
                task.commit()
                clone = self._make_instant_clone(name, folder, pool, datastore, extra, plan,
                                                 macs, spec.biosUuid, frozen_now)
            finally:
                sim.release_name(folder, name)
            return clone.ref

        return sim.start_task(ctx, entity=self, method="InstantClone_Task",
                              description_id="VirtualMachine.instantClone", body=body,
                              resources=(VC, *resources), cancelable=True)

    def _make_instant_clone(self, name: str, folder: Folder, pool: ResourcePool,
                            datastore: Datastore, extra: dict[str, str], plan: dict[int, str],
                            macs: dict[int, str], bios_uuid: str | None,
                            frozen_source: bool) -> VirtualMachine:
        sim = self.sim
        nics = []
        for nic in self.nics:
            connect = plan.get(nic.key)
            connected = nic.connected if connect is None else connect == "connect"
            nics.append(Nic(key=nic.key, mac=sim.new_mac(), network=nic.network,
                            connected=connected, start_connected=nic.start_connected))
        disks = []
        for disk in self.disks:
            previous = list(disk.chain)
            if not frozen_source:
                disk.chain.append(self._delta_path(disk, previous))
            delta = f"[{datastore.name}] {name}/{name}-{disk.key - DISK_KEY_BASE:06d}.vmdk"
            disks.append(Disk(key=disk.key, capacity_kb=disk.capacity_kb, datastore=datastore,
                              chain=[*previous, delta]))
            datastore.allocate(DELTA_BYTES)
        guest = Guest(family=self.guest.family, user=self.guest.user,
                      password=self.guest.password, tools_installed=self.guest.tools_installed,
                      ready_key=self.guest.ready_key, ready_after_s=self.guest.ready_after_s,
                      tools_running=self.guest.tools_installed,
                      macs=list(self.guest.macs) or [n.mac for n in self.nics],
                      ip=self.guest.ip or (sim.ip_for(self.nics[0].mac) if self.nics else None),
                      next_pid=self.guest.next_pid)
        merged = dict(self.extra_config)
        merged.update({k: v for k, v in extra.items()})
        merged = {k: v for k, v in merged.items() if v != ""}
        clone = VirtualMachine(sim, name, folder, pool=pool, host=self.host,
                               datastore=datastore, memory_mb=self.memory_mb,
                               num_cpu=self.num_cpu, guest=guest, nics=nics, disks=disks,
                               extra_config=merged, power_state="poweredOn")
        if bios_uuid:
            clone.uuid = bios_uuid
        clone.memory_parent = self
        clone.boot_time = datetime.now(UTC)
        clone.register()
        for nic in clone.nics:  # an edit that carries a MAC sets it (a source's: a duplicate)
            if nic.key in macs:
                clone.set_mac(nic, macs[nic.key])
        self.clones += 1
        if not frozen_source:
            self.touch("layoutEx", "summary", "config")
        sim.clone_made(self, clone)
        clone.check_conflict()
        if self.frozen or frozen_source:
            clone.resume_in_clone(self.guest.processes)
        clone._touch_guest()
        return clone

    def _delta_path(self, disk: Disk, chain: list[str]) -> str:
        return (f"[{disk.datastore.name}] {self.name}/{self.name}-"
                f"{disk.key - DISK_KEY_BASE:02d}{len(chain):06d}.vmdk")

    # -- full clone and relocate ---------------------------------------------
    def CloneVM_Task(self, ctx: CallContext, folder: Any, name: str, spec: Any) -> Any:
        check_entity_name(name)
        sim = ctx.sim
        target_folder = sim.inventory.resolve(folder)
        if not isinstance(target_folder, Folder):
            raise vmodl.fault.InvalidArgument(msg="folder is not a VM folder",
                                              invalidProperty="folder")
        location = spec.location
        _, pool, datastore = self._clone_target(ctx, name, location)
        host = self.host
        if location is not None and location.host is not None:
            target = sim.inventory.resolve(location.host)
            if not isinstance(target, HostSystem):
                raise vmodl.fault.InvalidArgument(msg="location.host is not a host",
                                                  invalidProperty="location.host")
            host = target
        power_on = bool(spec.powerOn)
        extra = {o.key: str(o.value) for o in (spec.config.extraConfig if spec.config else None)
                 or () if o.value is not None}

        async def body(task: Task) -> Any:
            self.check_host()
            self.check_host(host)
            if target_folder.child_named(name) is not None or sim.name_pending(target_folder,
                                                                                name):
                existing = target_folder.child_named(name)
                raise vim.fault.DuplicateName(msg=f"The name '{name}' already exists.",
                                              name=name, object=(existing or target_folder).ref)
            if power_on:
                self.check_memory(host, self.memory_mb)
            sim.reserve_name(target_folder, name)
            try:
                await task.sleep(sim.topology.latency.full_clone_s)
                task.commit()
                nics = [Nic(key=n.key, mac=sim.new_mac(), network=n.network,
                            connected=n.start_connected, start_connected=n.start_connected)
                        for n in self.nics]
                disks = []
                for disk in self.disks:
                    base = f"[{datastore.name}] {name}/{name}-{disk.key - DISK_KEY_BASE}.vmdk"
                    disks.append(Disk(key=disk.key, capacity_kb=disk.capacity_kb,
                                      datastore=datastore, chain=[base]))
                    datastore.allocate(disk.capacity_kb * 1024)
                guest = Guest(family=self.guest.family, user=self.guest.user,
                              password=self.guest.password,
                              tools_installed=self.guest.tools_installed,
                              ready_key=self.guest.ready_key,
                              ready_after_s=self.guest.ready_after_s)
                config = dict(self.extra_config)
                config.update(extra)
                clone = VirtualMachine(sim, name, target_folder, pool=pool, host=host,
                                       datastore=datastore, memory_mb=self.memory_mb,
                                       num_cpu=self.num_cpu, guest=guest, nics=nics, disks=disks,
                                       extra_config=config, power_state="poweredOff")
                clone.guest.macs = [n.mac for n in nics]
                clone.register()
                if power_on:
                    clone.power_state = "poweredOn"
                    clone.boot_time = datetime.now(UTC)
                    clone.boot_guest(fresh=True)
                    clone.touch("runtime", "summary")
            finally:
                sim.release_name(target_folder, name)
            return clone.ref

        return sim.start_task(ctx, entity=self, method="CloneVM_Task",
                              description_id="VirtualMachine.clone", body=body,
                              resources=(VC, f"host:{host.moid}"), cancelable=True)

    def RelocateVM_Task(self, ctx: CallContext, spec: Any, priority: Any = None) -> Any:
        sim = ctx.sim
        host = sim.inventory.resolve(spec.host) if spec.host is not None else self.host
        if not isinstance(host, HostSystem):
            raise vmodl.fault.InvalidArgument(msg="spec.host is not a host",
                                              invalidProperty="spec.host")
        datastore = sim.inventory.resolve(spec.datastore) if spec.datastore is not None else None
        if datastore is not None and not isinstance(datastore, Datastore):
            raise vim.fault.InvalidDatastore(msg="spec.datastore is not a datastore",
                                             datastore=spec.datastore)
        pool = sim.inventory.resolve(spec.pool) if spec.pool is not None else None
        if pool is not None and not isinstance(pool, ResourcePool):
            raise vmodl.fault.InvalidArgument(msg="spec.pool is not a resource pool",
                                              invalidProperty="spec.pool")

        async def body(task: Task) -> None:
            self.check_host()
            self.check_host(host)
            if host is not self.host:
                self.check_memory(host, self.host_memory_cost_mb())
            await task.sleep(sim.topology.latency.relocate_s)
            task.commit()
            if host is not self.host:
                old = self.host
                old.remove_vm(self)
                host.add_vm(self)
                self.host = host
                old.touch("vm", "summary")
                host.touch("vm", "summary")
            if datastore is not None and datastore is not self.datastore:
                for ds in self.datastores():
                    if self in ds.vms:
                        ds.vms.remove(self)
                    ds.touch("vm")
                self.datastore = datastore
                for disk in self.disks:
                    disk.datastore = datastore
                datastore.vms.append(self)
                datastore.touch("vm")
            if pool is not None and pool is not self.pool:
                self.pool.vms.remove(self)
                pool.vms.append(self)
                self.pool = pool
            self.touch("runtime", "summary", "datastore", "resourcePool", "config", "layoutEx")

        return self._task(ctx, "RelocateVM_Task", "VirtualMachine.relocate", body,
                          resources=(f"host:{host.moid}",), cancelable=True)

    # -- guest operations (called by the GuestProcessManager) ----------------
    def guest_auth(self, auth: Any) -> None:
        if self.power_state != "poweredOn":
            raise vim.fault.InvalidPowerState(
                msg=f"The VM '{self.name}' is not powered on.", requestedState="poweredOn",
                existingState=self.power_state)
        if self.frozen or not self.guest.tools_running:
            raise vim.fault.GuestOperationsUnavailable(
                msg=f"Guest operations are not available on '{self.name}' "
                    f"({'frozen' if self.frozen else 'VMware Tools is not running'}).")
        if not isinstance(auth, vim.vm.guest.NamePasswordAuthentication) or (
                auth.username != self.guest.user or auth.password != self.guest.password):
            raise vim.fault.InvalidGuestLogin(
                msg="Failed to authenticate with the guest operating system using the "
                    "supplied credentials.")
