"""VirtualMachine: power, instant clone, full clone, relocate, reconfigure, destroy.

Instant Clone semantics (docs/vsphere.md):

- The source must be powered on (running or frozen); otherwise InvalidState.
- A *running* source is stunned and cloned one task at a time (the scheduler's
  ``source:`` resource); it gains a delta disk per clone at the stun (kept if
  the clone then fails), and the clone gets a delta on the source's previous
  top. A *frozen* source is unchanged and can be cloned concurrently. Either
  way the clone's chain is the source's + 1.
- A chain past 255 fails the clone with GenericVmConfigFault ("Unable to
  prepare migration"), as seen in the field. Deeper chains clone slower.
- The clone lands on the source's host with new MACs and UUIDs, extraConfig
  merged (spec wins: a clone inherits every key its spec does not set, and an
  empty value removes one), and NICs connected or not by ``migrateConnect``. A
  NIC edit that carries a ``macAddress`` sets it, as vCenter does: a source's
  MAC copied into the spec gives the clone a duplicate MAC (counted).
- Memory: a clone shares most pages with its source; the host refuses work
  past its (over-committed) memory with InsufficientResourcesFault.

What a VM is and reports (memory, properties, guest OS) is ``fleet.sim.machine``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pyVmomi import vim, vmodl

from fleet.sim.calls import CallContext
from fleet.sim.entities import (
    MB,
    Datastore,
    Folder,
    HostSystem,
    ResourcePool,
    check_entity_name,
    clone_cost_mb,
)
from fleet.sim.hardware import (
    DELTA_BYTES,
    DISK_KEY_BASE,
    NIC_KEY_BASE,
    Disk,
    Guest,
    Nic,
    check_nic_type,
)
from fleet.sim.machine import Machine
from fleet.sim.tasks import VC, Task
from fleet.vcenter import MAX_CHAIN_DEPTH

__all__ = ["DISK_KEY_BASE", "NIC_KEY_BASE", "Disk", "Guest", "Nic", "VirtualMachine"]


class VirtualMachine(Machine):
    """A VM, with the vSphere methods a client calls on one."""

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
        return self.runtime.tasks.start(ctx, entity=self, method=method,
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
                              clone_cost_mb(self.memory_mb, self.runtime.clone_memory_shared))
            await task.sleep(self.runtime.latency.power_on_s)
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
            await task.sleep(self.runtime.latency.power_off_s)
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
            await task.sleep(self.runtime.latency.reset_s)
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
            await task.sleep(self.runtime.latency.destroy_s)
            self.destroy_now()

        return self._task(ctx, "Destroy_Task", "VirtualMachine.destroy", body)

    def _check_destroyable(self) -> None:
        self.check_host()
        if self.power_state != "poweredOff":
            raise vim.fault.InvalidPowerState(
                msg="The attempted operation cannot be performed in the current state "
                    "(Powered on).", requestedState="poweredOff",
                existingState=self.power_state)

    def destroy_now(self) -> None:
        """The VM goes, disks and all (also when its folder is destroyed); a powered-on
        VM cannot (InvalidPowerState)."""
        if self.inventory.get(self.moid) is None:
            return
        self._check_destroyable()
        for disk in self.disks:
            disk.datastore.release(DELTA_BYTES if len(disk.chain) > 1
                                   else disk.capacity_kb * 1024)
        self.unregister()
        self.forget()

    def UnregisterVM(self, ctx: CallContext) -> None:
        if self.power_state != "poweredOff":
            raise vim.fault.InvalidPowerState(msg="The VM must be powered off.",
                                              requestedState="poweredOff",
                                              existingState=self.power_state)
        self.unregister()
        self.forget()

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
            check_nic_type(device, self.shape.nic_type, "deviceChange.device", i)
        if spec.name is not None:
            check_entity_name(spec.name)

    def ReconfigVM_Task(self, ctx: CallContext, spec: Any) -> Any:
        self._validate_config_spec(spec)

        async def body(task: Task) -> None:
            self.check_host()
            await task.sleep(self.runtime.latency.reconfigure_s)
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
                self.set_extra_config(option.key, None if value is None else str(value))
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
    def _clone_target(self, location: Any) -> tuple[
            Folder, ResourcePool, Datastore]:
        folder = self.parent
        if location is not None and location.folder is not None:
            target = self.inventory.resolve(location.folder)
            if not isinstance(target, Folder) or "VirtualMachine" not in target.child_types:
                raise vmodl.fault.InvalidArgument(msg="location.folder is not a VM folder",
                                                  invalidProperty="location.folder")
            folder = target
        pool = self.pool
        if location is not None and location.pool is not None:
            target = self.inventory.resolve(location.pool)
            if not isinstance(target, ResourcePool):
                raise vmodl.fault.InvalidArgument(msg="location.pool is not a resource pool",
                                                  invalidProperty="location.pool")
            pool = target
        datastore = self.datastore
        if location is not None and location.datastore is not None:
            target = self.inventory.resolve(location.datastore)
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
            check_nic_type(device, self.shape.nic_type, "location.deviceChange.device", i)
            conn = device.connectable
            if conn is not None and conn.migrateConnect in ("connect", "disconnect"):
                plan[device.key] = conn.migrateConnect
            if device.macAddress:
                macs[device.key] = str(device.macAddress)
        return plan, macs

    def clone_problems(self, name: str, folder: Folder, *, grown: bool = False) -> list[Any]:
        """Why an instant clone from this VM would fail now (faults, in check order).
        ``grown``: the source's chain already holds the clone's level (after the stun)."""
        problems: list[Any] = []
        if not self.host.connected:
            try:
                self.check_host()
            except vim.fault.InvalidHostConnectionState as exc:
                problems.append(exc)
        elif self.host.maintenance:
            problems.append(vim.fault.InvalidHostState(
                msg=f"The host '{self.host.name}' is in maintenance mode: no VM can be created "
                    "or powered on there.", host=self.host.ref))
        if self.power_state != "poweredOn":
            problems.append(vim.fault.InvalidPowerState(
                msg=f"The source VM '{self.name}' must be powered on for an instant clone "
                    f"(it is {self.power_state}).", requestedState="poweredOn",
                existingState=self.power_state))
        existing = folder.child_named(name) if name else None
        if existing is not None or (name and self.runtime.names.pending(folder.moid, name)):
            problems.append(vim.fault.DuplicateName(
                msg=f"The name '{name}' already exists.", name=name,
                object=existing.ref if existing is not None else folder.ref))
        depth = self.chain_depth() + (0 if grown else 1)
        if depth > MAX_CHAIN_DEPTH:
            problems.append(vim.fault.GenericVmConfigFault(
                msg=f"Unable to prepare migration: the disk chain of '{self.name}' is already "
                    f"{depth - 1} levels deep; a clone would exceed the limit of "
                    f"{MAX_CHAIN_DEPTH}.",
                reason="Unable to prepare migration"))
        cost = int(self.memory_mb * (1 - self.runtime.clone_memory_shared))
        try:
            self.check_memory(self.host, cost)
        except vim.fault.InsufficientResourcesFault as exc:
            problems.append(exc)
        return problems

    def InstantClone_Task(self, ctx: CallContext, spec: Any) -> Any:
        name = check_entity_name(spec.name)
        location = spec.location
        folder, pool, datastore = self._clone_target(location)
        plan, macs = self._nic_edits(location)
        extra = {o.key: "" if o.value is None else str(o.value) for o in spec.config or ()}
        for key in extra:
            if not isinstance(key, str) or not key:
                raise vmodl.fault.InvalidArgument(msg="config keys must be non-empty",
                                                  invalidProperty="config")
        rt = self.runtime
        running = self.power_state == "poweredOn" and not self.frozen
        resources: tuple[str, ...] = (f"host:{self.host.moid}",)
        if running:
            key = f"source:{self.moid}"
            rt.scheduler.capacity.setdefault(key, 1)
            if rt.vcenter.running_source_busy == "fault" and rt.scheduler.busy(key):
                raise vim.fault.TaskInProgress(
                    msg=f"The source VM '{self.name}' is busy with another clone.",
                    task=None)
            resources = (*resources, key)

        async def body(task: Task) -> Any:
            problems = self.clone_problems(name, folder)
            if problems:
                raise problems[0]
            frozen_now = self.frozen
            rt.names.hold(folder.moid, name)
            try:
                lat = rt.latency
                duration = lat.instant_clone_s + lat.per_chain_level_s * self.chain_depth()
                chains = None  # the source's chains before the stun (a running source)
                if not frozen_now:
                    stun = min(lat.stun_s, duration)
                    self.stunned = True
                    self.touch("runtime")
                    try:
                        await task.sleep(stun)
                    finally:
                        self.stunned = False
                        self.touch("runtime")
                    # No chain grows past vSphere's limit: one made deeper during the stun
                    # (another tool's snapshots) fails the clone before any new delta.
                    problems = [p for p in self.clone_problems(name, folder)
                                if isinstance(p, vim.fault.GenericVmConfigFault)]
                    if problems:
                        raise problems[0]
                    # The stun moved the source onto a new delta disk: its chain is one
                    # level deeper from now on, whatever becomes of the clone.
                    chains = self._add_deltas()
                    duration -= stun
                task.set_progress(50)
                await task.sleep(duration)
                # The source may have changed while we worked.
                problems = [p for p in self.clone_problems(name, folder,
                                                           grown=chains is not None)
                            if not isinstance(p, vim.fault.DuplicateName)]
                if problems:
                    raise problems[0]
                task.commit()
                clone = self._make_instant_clone(name, folder, pool, datastore, extra, plan,
                                                 macs, spec.biosUuid, chains)
            finally:
                rt.names.release(folder.moid, name)
            return clone.ref

        ref = rt.tasks.start(ctx, entity=self, method="InstantClone_Task",
                             description_id="VirtualMachine.instantClone", body=body,
                             resources=(VC, *resources), cancelable=True)
        task = rt.inventory.get(ref._moId)
        rt.stats.clones.submitted_task(ref._moId, host=self.host.name, datastore=datastore.name,
                                       source=self.name,
                                       queued=getattr(task, "state", None) == "queued")
        return ref

    def _add_deltas(self) -> list[list[str]]:
        """A running source's stun: each disk gets a new top delta. Returns the chains
        as they were (what the clone's deltas sit on)."""
        before = [list(disk.chain) for disk in self.disks]
        for disk in self.disks:
            disk.chain.append(self._delta_path(disk, disk.chain))
        self.touch("layoutEx", "summary", "config")
        return before

    def _make_instant_clone(self, name: str, folder: Folder, pool: ResourcePool,
                            datastore: Datastore, extra: dict[str, str], plan: dict[int, str],
                            macs: dict[int, str], bios_uuid: str | None,
                            chains: list[list[str]] | None) -> VirtualMachine:
        """The clone; ``chains``: the source's chains before its stun (None: frozen)."""
        rt = self.runtime
        nics = []
        for nic in self.nics:
            connect = plan.get(nic.key)
            connected = nic.connected if connect is None else connect == "connect"
            nics.append(Nic(key=nic.key, mac=rt.addresses.new_mac(), network=nic.network,
                            connected=connected, start_connected=nic.start_connected))
        disks = []
        for i, disk in enumerate(self.disks):
            previous = chains[i] if chains is not None else list(disk.chain)
            delta = f"[{datastore.name}] {name}/{name}-{disk.key - DISK_KEY_BASE:06d}.vmdk"
            disks.append(Disk(key=disk.key, capacity_kb=disk.capacity_kb, datastore=datastore,
                              chain=[*previous, delta]))
            datastore.allocate(DELTA_BYTES)
        guest = Guest(family=self.guest.family, user=self.guest.user,
                      password=self.guest.password, tools_installed=self.guest.tools_installed,
                      ready_key=self.guest.ready_key, ready_after_s=self.guest.ready_after_s,
                      # a running source's stopped Tools are stopped in its clone too
                      tools_running=self.guest.tools_installed and not (
                          self.guest.tools_stopped and not self.frozen),
                      tools_stopped=self.guest.tools_stopped and not self.frozen,
                      macs=list(self.guest.macs) or [n.mac for n in self.nics],
                      ip=self.guest.ip or (rt.addresses.ip_for(self.nics[0].mac) if self.nics
                                           else None),
                      next_pid=self.guest.next_pid)
        merged, removed = self.inherited_config(extra)
        clone = VirtualMachine(rt, name, folder, pool=pool, host=self.host,
                               datastore=datastore, memory_mb=self.memory_mb,
                               num_cpu=self.num_cpu, guest=guest, nics=nics, disks=disks,
                               extra_config=merged, power_state="poweredOn",
                               tools_published=self.tools_published, vmx_removed=removed)
        if bios_uuid:
            clone.uuid = bios_uuid
        clone.memory_parent = self
        clone.boot_time = datetime.now(UTC)
        clone.register()
        for nic in clone.nics:  # an edit that carries a MAC sets it (a source's: a duplicate)
            if nic.key in macs:
                clone.set_mac(nic, macs[nic.key])
        self.clones += 1
        rt.stats.clone_made(self.name, clone.chain_depth())
        clone.check_conflict()
        if self.frozen or chains is None:
            clone.resume_in_clone(self.guest.processes)
        clone._touch_guest()
        return clone

    def inherited_config(self, spec: dict[str, str]) -> tuple[dict[str, str], frozenset[str]]:
        """A clone's extraConfig: this VM's, with the clone spec's keys set (an empty
        value removes one). Returns the keys set through the API and the vmx keys
        removed (the clone's own vmx keys, its file names, are its own)."""
        merged = dict(self.extra_config)
        removed = self.vmx_removed
        for key, value in spec.items():
            if value == "":
                merged.pop(key, None)
                if key in self.shape.keys:
                    removed = removed | {key}
            else:
                merged[key] = value
                if key in removed:
                    removed = removed - {key}
        return merged, removed

    def _delta_path(self, disk: Disk, chain: list[str]) -> str:
        return (f"[{disk.datastore.name}] {self.name}/{self.name}-"
                f"{disk.key - DISK_KEY_BASE:02d}{len(chain):06d}.vmdk")

    # -- full clone and relocate ---------------------------------------------
    def CloneVM_Task(self, ctx: CallContext, folder: Any, name: str, spec: Any) -> Any:
        check_entity_name(name)
        rt = self.runtime
        target_folder = self.inventory.resolve(folder)
        if not isinstance(target_folder, Folder):
            raise vmodl.fault.InvalidArgument(msg="folder is not a VM folder",
                                              invalidProperty="folder")
        location = spec.location
        _, pool, datastore = self._clone_target(location)
        host = self.host
        if location is not None and location.host is not None:
            target = self.inventory.resolve(location.host)
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
            if (target_folder.child_named(name) is not None
                    or rt.names.pending(target_folder.moid, name)):
                existing = target_folder.child_named(name)
                raise vim.fault.DuplicateName(msg=f"The name '{name}' already exists.",
                                              name=name, object=(existing or target_folder).ref)
            if power_on:
                self.check_memory(host, self.memory_mb)
            rt.names.hold(target_folder.moid, name)
            try:
                await task.sleep(rt.latency.full_clone_s)
                task.commit()
                nics = [Nic(key=n.key, mac=rt.addresses.new_mac(), network=n.network,
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
                config, removed = self.inherited_config(extra)
                clone = VirtualMachine(rt, name, target_folder, pool=pool, host=host,
                                       datastore=datastore, memory_mb=self.memory_mb,
                                       num_cpu=self.num_cpu, guest=guest, nics=nics, disks=disks,
                                       extra_config=config, power_state="poweredOff",
                                       tools_published=self.tools_published,
                                       vmx_removed=removed)
                clone.guest.macs = [n.mac for n in nics]
                clone.register()
                if power_on:
                    clone.power_state = "poweredOn"
                    clone.boot_time = datetime.now(UTC)
                    clone.boot_guest(fresh=True)
                    clone.touch("runtime", "summary")
            finally:
                rt.names.release(target_folder.moid, name)
            return clone.ref

        return rt.tasks.start(ctx, entity=self, method="CloneVM_Task",
                              description_id="VirtualMachine.clone", body=body,
                              resources=(VC, f"host:{host.moid}"), cancelable=True)

    def RelocateVM_Task(self, ctx: CallContext, spec: Any, priority: Any = None) -> Any:
        rt = self.runtime
        host = self.inventory.resolve(spec.host) if spec.host is not None else self.host
        if not isinstance(host, HostSystem):
            raise vmodl.fault.InvalidArgument(msg="spec.host is not a host",
                                              invalidProperty="spec.host")
        datastore = self.inventory.resolve(spec.datastore) if spec.datastore is not None else None
        if datastore is not None and not isinstance(datastore, Datastore):
            raise vim.fault.InvalidDatastore(msg="spec.datastore is not a datastore",
                                             datastore=spec.datastore)
        pool = self.inventory.resolve(spec.pool) if spec.pool is not None else None
        if pool is not None and not isinstance(pool, ResourcePool):
            raise vmodl.fault.InvalidArgument(msg="spec.pool is not a resource pool",
                                              invalidProperty="spec.pool")

        async def body(task: Task) -> None:
            self.check_host()
            self.check_host(host)
            if host is not self.host:
                self.check_memory(host, self.host_memory_cost_mb())
            await task.sleep(rt.latency.relocate_s)
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

    def forget(self) -> None:
        """The VM is gone: let go of what was kept for it, its IPs and its slot as a
        source (``source:<id>``, unless a clone of it still runs)."""
        rt = self.runtime
        rt.stats.counters["vms_destroyed"] += 1
        rt.addresses.release(nic.mac for nic in self.nics)
        rt.scheduler.forget(f"source:{self.moid}")
