"""A virtual machine's state and what it reports: memory on its host, placement in the
inventory, its properties, and its guest OS (boot, DHCP, processes, freeze).

The vSphere methods called on a VM (power, destroy, reconfigure, clones,
relocate) are in ``fleet.sim.vm``, whose ``VirtualMachine`` extends this class:
what a VM *is* reads apart from what can be *done* to one. Guest network: a
clone's guest keeps using the *source's* MAC and IP until a NIC refresh runs
inside it; a clone whose NIC is connected while its guest still uses another MAC
is a *network conflict*, which the simulator counts.
"""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from pyVmomi import vim

from fleet.sim import guest as guestcmd
from fleet.sim import shapes
from fleet.sim.entities import (
    Datastore,
    Folder,
    HostSystem,
    ManagedEntity,
    Network,
    ResourcePool,
    clone_cost_mb,
)
from fleet.sim.hardware import (
    DELTA_BYTES,
    DISK_KEY_BASE,
    Disk,
    Guest,
    Nic,
    Process,
)
from fleet.sim.names import ipv6_for
from fleet.sim.runtime import Runtime
from fleet.sim.shapes import TOOLS_VERSION, Shape, shape_for
from fleet.sim.soap import share
from fleet.vmomi import trusted

_DEV = vim.vm.device


OptionValue = vim.option.OptionValue


def _option(key: str, value: str) -> Any:
    """``OptionValue(key=key, value=value)``: a VM's own and set keys are built on every
    read of them (by the ten thousand for a fleet's listing), so without pyVmomi's field
    checks; keys and values are strings the simulator holds."""
    return trusted(OptionValue, key=key, value=value)


@lru_cache(maxsize=4096)
def _nic_info(label: str, network: str) -> Any:
    info = vim.Description(label=label, summary=network)
    share(info)
    return info


def _nic_backing(network: Network | None) -> Any:
    return _NO_NETWORK if network is None else network.nic_backing()


_NO_NETWORK = _DEV.VirtualEthernetCard.NetworkBackingInfo(deviceName="", useAutoDetect=False)
share(_NO_NETWORK)


class Machine(ManagedEntity):
    """A VM's state, its memory on its host, its properties and its guest OS."""

    vim_type = vim.VirtualMachine
    id_prefix = "vm-"
    path_getters = {"config.hardware.device": "_devices",
                    "config.extraConfig": "extra_options",
                    "config.hardware.memoryMB": "_config_memory_mb",
                    "config.guestId": "_config_guest_id",
                    "config.instanceUuid": "_config_instance_uuid",
                    "config.createDate": "_config_create_date",
                    "guest.ipAddress": "_guest_ip_address",
                    # what listings and reconcile read of every VM (docs/reads.md)
                    "runtime.powerState": "_runtime_power_state",
                    "runtime.host": "_runtime_host",
                    "runtime.connectionState": "connection_state",
                    "runtime.instantCloneFrozen": "_runtime_frozen"}
    keyed_getters = {"config.hardware.device": "_device_by_key",
                     "config.extraConfig": "_extra_option"}
    #: vmx or Tools keys an empty value removed (docs/simulator-vms.md); set on the
    #: instance only when there are some. Python shares one key table between the
    #: attribute dicts of a class's instances only up to 30 attributes: past that,
    #: each VM's dict costs about 1.3 KB more.
    vmx_removed: frozenset[str] = frozenset()

    def __init__(self, runtime: Runtime, name: str, folder: Folder, *, pool: ResourcePool,
                 host: HostSystem, datastore: Datastore, memory_mb: int, num_cpu: int,
                 guest: Guest, nics: list[Nic], disks: list[Disk],
                 extra_config: dict[str, str], power_state: str = "poweredOff",
                 tools_published: bool = False,
                 vmx_removed: frozenset[str] = frozenset()) -> None:
        super().__init__(runtime, name, folder)
        self.pool = pool
        self.host = host
        self.datastore = datastore
        # What the host's memory accounting depends on (see memory_share): behind
        # properties that report each change to the host the VM is counted on.
        self.counted_on: HostSystem | None = None
        self._memory_mb = memory_mb
        self._power_state = power_state
        self._memory_parent: Machine | None = None  # pages shared with the source
        self.num_cpu = num_cpu
        self.guest = guest
        self.nics = nics
        self.disks = disks
        # extraConfig (docs/simulator-vms.md): what its shape and the VM itself put in
        # the vmx, the keys VMware Tools published once it ran in the guest, and the
        # keys set through the API, the topology and the guest (``extra_config``,
        # which wins over the others).
        self.extra_config = dict(extra_config)
        self.tools_published = tools_published
        if vmx_removed:
            self.vmx_removed = vmx_removed
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
    def memory_parent(self) -> Machine | None:
        return self._memory_parent

    @memory_parent.setter
    def memory_parent(self, value: Machine | None) -> None:
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
        self.inventory.add(self)
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
        self.inventory.remove(self)
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

    def set_chain_depth(self, depth: int) -> None:
        """Every disk's chain becomes ``depth`` levels deep, as if another tool had made
        snapshots or clones of this VM behind fleet's back."""
        for disk in self.disks:
            disk.chain = [disk.chain[0]] + [
                f"[{disk.datastore.name}] {self.name}/{self.name}-ext-"
                f"{disk.key - DISK_KEY_BASE:02d}{level:06d}.vmdk" for level in range(1, depth)]
        self.touch("layoutEx", "config")

    def host_memory_cost_mb(self) -> int:
        if self.power_state != "poweredOn":
            return 0
        if self.memory_parent is not None:
            return clone_cost_mb(self.memory_mb, self.runtime.clone_memory_shared)
        return self.memory_mb

    def config_changed(self) -> None:
        self.change_version += 1
        self.modified = datetime.now(UTC)
        self.touch("config", "summary")

    # -- properties ------------------------------------------------------
    @property
    def shape(self) -> Shape:
        """Its devices' and vmx keys' shape, by its guest (fleet.sim.shapes)."""
        return shape_for(self.guest.family)

    def _guest_ids(self) -> tuple[str, str, str]:
        shape = self.shape
        return shape.guest_id, shape.guest_full_name, shape.guest_family

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

    def _runtime_power_state(self) -> str:
        return self.power_state  # prop_runtime().powerState

    def _runtime_host(self) -> Any:
        return self.host.ref  # prop_runtime().host

    def _runtime_frozen(self) -> bool:
        return self.frozen  # prop_runtime().instantCloneFrozen

    def _devices(self) -> list[Any]:
        """``config.hardware.device``: the shape's devices (shared, built once) and this
        VM's disks and NICs (built now)."""
        devices = list(shapes.static_devices(self.shape, len(self.disks), len(self.nics)))
        devices.extend(self._disk_device(i, disk) for i, disk in enumerate(self.disks))
        devices.extend(self._nic_device(i, nic) for i, nic in enumerate(self.nics))
        return devices

    def _device_by_key(self, key: str) -> Any:
        """``config.hardware.device[key]``, building only that device."""
        try:
            number = int(key)
        except ValueError:
            return None
        for i, disk in enumerate(self.disks):
            if disk.key == number:
                return self._disk_device(i, disk)
        for i, nic in enumerate(self.nics):
            if nic.key == number:
                return self._nic_device(i, nic)
        return shapes.static_by_key(self.shape, len(self.disks), len(self.nics)).get(number)

    def _disk_device(self, index: int, disk: Disk) -> Any:
        controller, unit = shapes.disk_place(disk.key)
        return _DEV.VirtualDisk(
            key=disk.key, deviceInfo=shapes.disk_info(index, disk.capacity_kb),
            backing=_DEV.VirtualDisk.FlatVer2BackingInfo(
                fileName=disk.chain[-1], datastore=disk.datastore.ref, diskMode="persistent",
                split=False, writeThrough=False, thinProvisioned=True, eagerlyScrub=False,
                uuid=shapes.disk_uuid(self.instance_uuid, disk.key),
                contentId=self.instance_uuid.replace("-", ""), digestEnabled=False,
                sharing="sharingNone",
                deltaDiskFormat="redoLogFormat" if len(disk.chain) > 1 else None),
            controllerKey=controller, unitNumber=unit, capacityInKB=disk.capacity_kb,
            capacityInBytes=disk.capacity_kb * 1024, shares=shapes.NORMAL_DISK_SHARES,
            storageIOAllocation=shapes.DISK_IO, diskObjectId=f"{self.moid[3:]}-{disk.key}",
            nativeUnmanagedLinkedClone=False)

    def _nic_device(self, index: int, nic: Nic) -> Any:
        network = nic.network
        return self.shape.nic_type(
            key=nic.key, deviceInfo=_nic_info(nic.label, network.name if network else ""),
            backing=_nic_backing(network), connectable=_DEV.VirtualDevice.ConnectInfo(
                startConnected=nic.start_connected, allowGuestControl=True,
                connected=nic.connected and self.power_state == "poweredOn", status="ok"),
            slotInfo=shapes.nic_slot_info(index), controllerKey=shapes.PCI_KEY,
            unitNumber=shapes.NIC_PCI_UNIT + index, addressType="assigned",
            macAddress=nic.mac, wakeOnLanEnabled=True, resourceAllocation=shapes.NIC_ALLOCATION,
            uptCompatibilityEnabled=True if self.shape.nic_type is _DEV.VirtualVmxnet3
            else None)

    # -- extraConfig (docs/simulator-vms.md) ------------------------------------
    def _own_options(self) -> list[tuple[str, str]]:
        return shapes.own_options(self.shape, name=self.name, instance_uuid=self.instance_uuid,
                                  datastore_url=self.datastore.url, num_cpu=self.num_cpu)

    def extra_options(self) -> list[Any]:
        """``config.extraConfig``: OptionValues of the vmx, the tools' keys and the keys
        set through the API; the shared ones are shared objects."""
        shape = self.shape
        shared = shapes.vmx_options(shape, len(self.nics))
        tools = shapes.tools_options(shape) if self.tools_published else ()
        own = self._own_options()
        user = self.extra_config
        removed = self.vmx_removed
        if removed or any(key in shape.keys for key in user):
            hidden = removed | user.keys()
            out = [o for o in (*shared, *tools) if o.key not in hidden]
            out.extend(_option(k, v) for k, v in own if k not in hidden)
        else:
            out = [*shared, *tools]
            out.extend(_option(k, v) for k, v in own)
        out.extend(_option(k, v) for k, v in user.items())
        return out

    def _extra_option(self, key: str) -> Any:
        """``config.extraConfig["key"]``: that OptionValue, or None."""
        value = self.extra_config.get(key)
        if value is not None:
            return _option(key, value)
        if key not in self.shape.keys or key in self.vmx_removed:
            return None
        for option in shapes.vmx_options(self.shape, len(self.nics)):
            if option.key == key:
                return option
        if self.tools_published:
            for option in shapes.tools_options(self.shape):
                if option.key == key:
                    return option
        for own_key, own_value in self._own_options():
            if own_key == key:
                return _option(key, own_value)
        return None

    def reported_extra_config(self) -> dict[str, str]:
        """What ``config.extraConfig`` reports, as a dict (for tests and tools)."""
        return {str(o.key): str(o.value) for o in self.extra_options()}

    def set_extra_config(self, key: str, value: str | None) -> None:
        """Set an extraConfig key as ReconfigVM_Task does: an empty value removes it,
        whichever part of the configuration holds it."""
        if value is None or value == "":
            self.extra_config.pop(key, None)
            if key in self.shape.keys and key not in self.vmx_removed:
                self.vmx_removed = self.vmx_removed | {key}
        else:
            self.extra_config[key] = value
            if key in self.vmx_removed:
                self.vmx_removed = self.vmx_removed - {key}

    def publish_tools_info(self) -> None:
        """VMware Tools runs in the guest and publishes its guestinfo keys (once: they
        stay, as vCenter keeps reporting what the vmx holds)."""
        if not self.tools_published:
            self.tools_published = True
            self.config_changed()

    def prop_config(self) -> Any:
        guest_id, full_name, _ = self._guest_ids()
        return vim.vm.ConfigInfo(
            changeVersion=str(self.change_version), modified=self.modified, name=self.name,
            guestFullName=full_name, version="vmx-19", uuid=self.uuid, firmware=self.shape.firmware,
            instanceUuid=self.instance_uuid, template=False, guestId=guest_id,
            alternateGuestName="", createDate=self.created,
            files=vim.vm.FileInfo(vmPathName=self.vmx_path(),
                                  logDirectory=f"[{self.datastore.name}] {self.name}/"),
            flags=vim.vm.FlagInfo(), defaultPowerOps=vim.vm.DefaultPowerOpInfo(),
            tools=vim.vm.ToolsConfigInfo(toolsVersion=TOOLS_VERSION if self.guest.tools_installed
                                         else 0),
            hardware=vim.vm.VirtualHardware(numCPU=self.num_cpu, memoryMB=self.memory_mb,
                                            numCoresPerSocket=1, device=self._devices()),
            extraConfig=self.extra_options())

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
                # A guest with an IPv4 lease also has a SLAAC IPv6 address, derived
                # from the MAC it uses (an instant clone's: its source's until refreshed).
                ips = [self.guest.ip, ipv6_for(mac)] if i == 0 and self.guest.ip else []
                nets.append(vim.vm.GuestInfo.NicInfo(
                    network=nic.network.name if nic.network else None, ipAddress=ips,
                    macAddress=mac, connected=nic.connected, deviceConfigId=nic.key))
        return vim.vm.GuestInfo(
            toolsStatus=status, toolsRunningStatus=running,
            toolsVersionStatus2="guestToolsCurrent" if self.guest.tools_installed
            else "guestToolsNotInstalled",
            toolsVersion=str(TOOLS_VERSION) if self.guest.tools_installed else "0",
            guestId=guest_id if active else None, guestFamily=family if active else None,
            guestFullName=full_name if active else None,
            hostName=self.name if active else None,
            ipAddress=self.guest.ip if active else None, net=nets,
            guestState="running" if active else "notRunning",
            guestOperationsReady=active and not self.frozen,
            interactiveGuestOperationsReady=False)

    def _config_memory_mb(self) -> int:
        return self.memory_mb  # prop_config().hardware.memoryMB

    def _config_guest_id(self) -> str:
        return self.shape.guest_id  # prop_config().guestId

    def _config_instance_uuid(self) -> str:
        return self.instance_uuid  # prop_config().instanceUuid

    def _config_create_date(self) -> datetime:
        return self.created  # prop_config().createDate

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
               for other in self.inventory.of_type(Machine)):
            self.runtime.stats.duplicate_mac(self.name, mac)
        self.config_changed()

    def check_conflict(self) -> None:
        """Count a network conflict: a connected NIC whose guest uses another MAC."""
        if self.conflicted or self.power_state != "poweredOn" or self.frozen:
            return
        for i, nic in enumerate(self.nics):
            guest_mac = self.guest.macs[i] if i < len(self.guest.macs) else nic.mac
            if nic.connected and guest_mac != nic.mac:
                self.conflicted = True
                self.runtime.stats.network_conflict(self.name)
                return

    def boot_guest(self, *, fresh: bool) -> None:
        """Power-on or reset: the guest OS starts and adopts the vNICs' MACs."""
        self.guest.generation += 1
        generation = self.guest.generation
        self.guest.tools_running = False
        self.guest.tools_stopped = False  # the service starts with the guest
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
            self.publish_tools_info()
            self._assign_ip()
            self._touch_guest()

        clock = self.runtime.clock
        clock.later(clock.latency(self.runtime.latency.guest_boot_s), up)

    def _assign_ip(self) -> None:
        """DHCP: a connected first NIC whose guest MAC is the vNIC's gets its own IP."""
        if not self.nics:
            return
        nic = self.nics[0]
        guest_mac = self.guest.macs[0] if self.guest.macs else nic.mac
        if nic.connected and guest_mac == nic.mac:
            ip = self.runtime.addresses.ip_for(nic.mac)
            clock = self.runtime.clock
            delay = clock.latency(self.runtime.latency.dhcp_s)
            if delay > 0 and self.guest.ip != ip:
                self._dhcp_later(delay)
                return
            self.guest.ip = ip
            self._maybe_ready()
        elif guest_mac != nic.mac:
            pass  # keeps whatever it had (a clone: the source's IP)
        else:
            self.guest.ip = None

    def _dhcp_later(self, delay_s: float) -> None:
        """A DHCP server that takes ``delay_s`` to answer: the IP comes then, if the guest
        still runs and its first NIC is still up with the guest's MAC."""
        self.guest.ip = None
        generation = self.guest.generation

        def lease() -> None:
            nic = self.nics[0]
            guest_mac = self.guest.macs[0] if self.guest.macs else nic.mac
            if self.guest.generation != generation or self.power_state != "poweredOn" or \
                    not nic.connected or guest_mac != nic.mac or self.guest.ip is not None:
                return
            self.guest.ip = self.runtime.addresses.ip_for(nic.mac)
            self._maybe_ready()
            self._touch_guest()

        self.runtime.clock.later(delay_s, lease)

    def _maybe_ready(self) -> None:
        key = self.guest.ready_key
        if not key or self.extra_config.get(key) == "1":
            return
        generation = self.guest.generation

        def ready() -> None:
            if self.guest.generation == generation and self.power_state == "poweredOn":
                self.extra_config[key] = "1"
                self.config_changed()

        clock = self.runtime.clock
        clock.later(clock.latency(self.guest.ready_after_s), ready)

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
        self.runtime.clock.spawn(self.run_process(proc, self.guest.generation))
        return proc

    async def run_process(self, proc: Process, generation: int) -> None:
        """Play a process's actions; a freeze stops it here and it goes on in each clone."""
        lat = self.runtime.latency
        exit_code = proc.exit_on_finish
        if not proc.pending:
            await self.runtime.clock.sleep(lat.guest_program_s)
        while proc.pending:
            if self.guest.generation != generation or self.power_state != "poweredOn":
                return
            action, proc.pending = proc.pending[0], proc.pending[1:]
            if action.kind == guestcmd.FREEZE:
                await self.runtime.clock.sleep(lat.freeze_s)
                if self.guest.generation != generation or self.power_state != "poweredOn":
                    return
                self.freeze()
                return
            if action.kind == guestcmd.REFRESH:
                await self.runtime.clock.sleep(lat.guest_program_s)
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
            self.runtime.clock.spawn(self.run_process(clone_proc, generation))

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
