"""An in-memory :class:`~fleet.vsphere.model.VSphere` for engine tests.

It owns a tiny vCenter: hosts, datastores, folders, VMs and clone tasks, and
plays DESIGN.md section 3 faithfully enough that the engine's scheduling is
tested against the real rules:

- every host has provisioning *slots*; clone tasks beyond them, or beyond the
  vCenter-wide cap, wait in state ``queued`` (``TaskHandle.snapshot.state``);
- a clone from a *running* source is serialised with the source's other clones
  and deepens the source's chain by one at its start (the stun), even if the
  clone then fails; a *frozen* source is unchanged and
  clones concurrently; a clone's depth is its source's + 1, and a clone that
  would pass 255 fails with ``ChainTooDeep``;
- powered-off source -> ``SourceNotPoweredOn``; a name taken in the folder ->
  ``DuplicateName`` (with the holder's id); host memory -> ``InsufficientResources``;
  disconnected host -> ``HostUnavailable``;
- clone latency is configurable (tiny by default) and grows with chain depth;
- a clone task's queue, start and complete times are vCenter's: the receipt of the
  request, the moment a slot freed, and the start plus the clone's modelled
  duration. They never include time the caller's own process lost (a loaded event
  loop, a GC pause between two statements), which vCenter could not see either; a
  slot is free again once its clone's modelled end has passed, on the same timeline;
- guest network: a clone's guest keeps its source's MACs until a NIC refresh
  recipe (``fleet.vsphere.recipes``) runs in it; connecting a NIC while the guest
  MAC differs from the vNIC MAC is a *network conflict* and is counted;
- declarative fault injection (:class:`FaultRule`), including lost replies
  (the work is done, the caller gets a transient error);
- counters in :class:`FakeStats` that tests assert on.

Clone tasks run in the fake's own task group, so they carry on when the caller
stops waiting, as they do in vCenter: use it as ``async with FakeVSphere() as vs``.
Nothing here imports pyVmomi.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from fleet.errors import (
    ChainTooDeep,
    ConnectionFailed,
    DuplicateName,
    GuestOperationFailed,
    HostUnavailable,
    InsufficientResources,
    InvalidGuestLogin,
    NotEmpty,
    NotFound,
    RequestTimeout,
    SourceNotPoweredOn,
    TaskCancelled,
    TransientFault,
    UnsupportedEndpoint,
    VSphereError,
    some_of,
)
from fleet.vsphere import recipes
from fleet.vsphere.model import (
    CloneRequest,
    DatastoreInfo,
    GuestCredentials,
    GuestFamily,
    GuestProgram,
    HostInfo,
    NicInfo,
    PowerState,
    Ref,
    ServerInfo,
    TaskSnapshot,
    TaskState,
    VmInfo,
)

MAX_CHAIN_DEPTH = 255

ErrorFactory = Callable[[str], VSphereError]


@dataclass
class FaultRule:
    """Make ``method`` fail. ``method`` is a VSphere method name (``start_instant_clone``,
    ``run_in_guest``, ...), ``instant_clone`` for the clone task itself (the error
    comes out of ``TaskHandle.wait``), ``task.wait`` for the wait call, or ``*``.

    ``match`` is a glob on the object's name (the clone's name for clones).
    With ``lost_reply`` the work is done first and then the call raises: a clone
    made whose caller never hears of it. ``count`` caps how often the rule fires.
    """

    method: str
    error: type[VSphereError] | ErrorFactory = TransientFault
    probability: float = 1.0
    count: int | None = None
    lost_reply: bool = False
    match: str = "*"
    fired: int = field(default=0, init=False)

    def applies(self, method: str, name: str, rng: random.Random) -> bool:
        if self.method not in ("*", method):
            return False
        if self.count is not None and self.fired >= self.count:
            return False
        if not fnmatch.fnmatchcase(name, self.match):
            return False
        return self.probability >= 1.0 or rng.random() < self.probability

    def make(self, method: str, name: str) -> VSphereError:
        message = f"injected fault in {method} ({name})"
        if self.lost_reply:
            message = f"reply lost after {method} ({name})"
        if isinstance(self.error, type):
            error: VSphereError = self.error(message, method=method, obj=name)
            return error
        return self.error(message)


@dataclass
class FakeLatency:
    """Seconds each kind of work takes. Defaults keep thousands of clones under a second."""

    clone_s: float = 0.001
    clone_per_depth_s: float = 0.00001  # deeper chains clone slower
    full_clone_s: float = 0.002
    call_s: float = 0.0  # every other call (0 still yields to the event loop)
    reconfig_s: float = 0.0
    guest_op_s: float = 0.0
    power_s: float = 0.0
    destroy_s: float = 0.0
    dhcp_s: float = 0.0  # NIC up with the right MAC -> guest IP
    folder_s: float = 0.0  # new_folder holds its name this long before the folder exists


@dataclass
class FakeStats:
    """What happened, for assertions. ``max_*`` are high-water marks."""

    clones_submitted: int = 0
    clones_made: int = 0
    clones_failed: int = 0
    task_errors: Counter[str] = field(default_factory=Counter)  # clone task errors by reason
    tasks_queued: int = 0  # clone tasks that had to wait for a slot
    in_flight_total: int = 0
    max_in_flight_total: int = 0
    running_total: int = 0
    max_running_total: int = 0
    max_in_flight_per_host: Counter[str] = field(default_factory=Counter)
    max_running_per_host: Counter[str] = field(default_factory=Counter)
    max_in_flight_per_source: Counter[str] = field(default_factory=Counter)
    max_in_flight_per_datastore: Counter[str] = field(default_factory=Counter)
    clones_per_source: Counter[str] = field(default_factory=Counter)
    max_clone_depth_per_source: Counter[str] = field(default_factory=Counter)
    network_conflicts: int = 0
    conflicted_vms: set[str] = field(default_factory=set)
    faults_injected: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    destroyed: int = 0
    destroyed_names: list[str] = field(default_factory=list)


@dataclass
class FakeHost:
    ref: Ref
    name: str
    slots: int = 8
    memory_mb: int = 512 * 1024
    base_used_mb: int = 16 * 1024
    connection_state: str = "connected"
    in_maintenance: bool = False
    cluster: str | None = "cluster1"
    used_mb: int = 0  # by powered-on VMs on the host
    running: int = 0
    in_flight: int = 0
    # Admitted clone tasks not yet ended here; one whose ``ends_at`` has passed holds
    # no slot any more on vCenter's timeline, even if this process has not run it out.
    occupants: set[FakeTask] = field(default_factory=set)

    def busy_slots(self, at: float) -> int:
        return sum(1 for t in self.occupants if t.ends_at is None or t.ends_at > at)

    def take_slot(self, task: FakeTask, at: float) -> float:
        """Give ``task`` a slot (one is free as of ``at``); returns when it freed: ``at``
        for a slot nobody held, else when the clone holding it ended (that clone's
        task is still winding down in this process; it leaves the slot to ``task``)."""
        free_at = at
        if len(self.occupants) >= self.slots:
            ended = min((t for t in self.occupants if t.ends_at is not None and t.ends_at <= at),
                        key=lambda t: t.ends_at or 0.0)
            self.occupants.discard(ended)
            assert ended.ends_at is not None
            free_at = ended.ends_at
        self.occupants.add(task)
        return free_at

    @property
    def connected(self) -> bool:
        return self.connection_state == "connected" and not self.in_maintenance


@dataclass
class FakeDatastore:
    ref: Ref
    name: str
    capacity_bytes: int = 8 << 40
    free_bytes: int = 8 << 40
    in_flight: int = 0


@dataclass
class FakeNic:
    key: int
    label: str
    mac: str
    connected: bool
    start_connected: bool = True
    network: str | None = "VM Network"


@dataclass(eq=False)
class FakeVm:
    ref: Ref
    name: str
    folder: Ref
    host: FakeHost | None
    datastores: list[FakeDatastore]
    power_state: PowerState
    frozen: bool
    chain_depth: int
    memory_mb: int
    guest_family: GuestFamily
    nics: list[FakeNic]
    guest_macs: list[str]
    extra_config: dict[str, str] = field(default_factory=dict)
    tools_running: bool = False
    guest_ip: str | None = None
    instance_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    credentials: GuestCredentials | None = None
    charged_mb: int = 0  # what this VM costs its host's memory while powered on
    source: FakeVm | None = None  # for clones
    in_flight_clones: int = 0
    busy: anyio.Lock | None = None  # serialises clones of a running source
    stunned_until: float = 0.0  # when the running source's last clone ends (task timeline)
    changed: anyio.Event | None = None  # set (and dropped) on every change

    def touch(self) -> None:
        if self.changed is not None:
            self.changed.set()
            self.changed = None

    @property
    def powered_on(self) -> bool:
        return self.power_state == "poweredOn"


@dataclass
class _Folder:
    ref: Ref
    path: str
    vms: dict[str, FakeVm] = field(default_factory=dict)


class FakeTask:
    """A clone task: ``queued`` -> ``running`` -> ``success | error``."""

    def __init__(self, fake: FakeVSphere, ref: Ref, name: str):
        self._fake = fake
        self._ref = ref
        self.name = name
        self.state: TaskState = "queued"
        self.queue_time = time.time()
        self.start_time: float | None = None
        self.complete_time: float | None = None
        # When the clone ends on vCenter's timeline (start + modelled duration), once it runs.
        self.ends_at: float | None = None
        self.result: Ref | None = None
        self.error: VSphereError | None = None
        self.cancel_requested = False
        self.done = anyio.Event()
        self.admitted = anyio.Event()

    @property
    def ref(self) -> Ref:
        return self._ref

    @property
    def snapshot(self) -> TaskSnapshot:
        return TaskSnapshot(self._ref, self.state, self.queue_time, self.start_time,
                            self.complete_time)

    async def wait(self, timeout_s: float | None = None) -> Any:
        with anyio.move_on_after(timeout_s):
            await self.done.wait()
            self._fake._inject("task.wait", self.name, lost_reply=False)
            self._fake._inject("task.wait", self.name, lost_reply=True)
            if self.error is not None:
                raise self.error
            return self.result
        raise RequestTimeout(f"task {self._ref.id} still {self.state} after {timeout_s}s",
                             method="WaitForTask", obj=self._ref.id)

    async def cancel(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.cancel_requested = True
        # vCenter can cancel a queued task; a running instant clone runs on.
        if self.state == "queued":
            self._fake._dequeue(self)
            self._fake._finish(self, error=TaskCancelled(f"task {self._ref.id} cancelled"))
            self.admitted.set()  # lets the task's worker see it is done and leave

    def __repr__(self) -> str:
        return f"<FakeTask {self._ref.id} {self.name} {self.state}>"


class FakeVSphere:
    """In-memory vCenter; see the module docstring. Build the inventory with
    :meth:`add_host`, :meth:`add_datastore` and :meth:`add_vm` (or :func:`make_fake`)."""

    def __init__(self, *, latency: FakeLatency | None = None, seed: int = 0,
                 max_concurrent_operations: int = 640, datacenter: str = "dc1",
                 clone_memory_share: float = 0.1, guest_ready_key: str | None = None,
                 api_type: str = "VirtualCenter") -> None:
        self.latency = latency or FakeLatency()
        self.rng = random.Random(seed)
        self.max_concurrent_operations = max_concurrent_operations
        self.datacenter = datacenter
        # Instant clones share their source's memory pages; they cost this fraction.
        self.clone_memory_share = clone_memory_share
        # When set, the guest writes this guestinfo key once it has an IP (a
        # readiness flag as an agent inside the clone would).
        self.guest_ready_key = guest_ready_key
        self.api_type = api_type
        self.faults: list[FaultRule] = []
        self.stats = FakeStats()
        #: called for guest programs the fake does not recognise; returns the exit code
        self.guest_program_handler: Callable[[VmInfo, GuestProgram], int] = lambda vm, p: 0
        self._ids = itertools.count(1)
        self._macs = itertools.count(1)
        self._ips = itertools.count(10)
        self.hosts: dict[str, FakeHost] = {}
        self.datastores: dict[str, FakeDatastore] = {}
        self._vms: dict[Ref, FakeVm] = {}
        self._folders: dict[str, _Folder] = {}
        self._folders_by_ref: dict[Ref, _Folder] = {}
        self._pending: deque[FakeTask] = deque()
        self._task_host: dict[FakeTask, FakeHost] = {}
        self._tg: TaskGroup | None = None
        self._idle: anyio.Event | None = None
        self._root = self._add_folder("")
        #: vCenter's clock is the local clock plus this (tests skew it: the lock must not
        #: care, docs/locking.md)
        self.clock_offset_s = 0.0
        self._pending_names: set[tuple[Ref, str]] = set()

    # -- lifecycle -------------------------------------------------------------
    async def __aenter__(self) -> FakeVSphere:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        tg, self._tg = self._tg, None
        assert tg is not None
        tg.cancel_scope.cancel()  # clone tasks still running die with their vCenter
        await tg.__aexit__(None, None, None)
        return None  # an error from the body propagates as it is, not in a group

    # -- building the inventory ------------------------------------------------
    def _new_ref(self, kind: str, prefix: str) -> Ref:
        return Ref(kind, f"{prefix}-{next(self._ids)}")

    def _new_mac(self) -> str:
        n = next(self._macs)
        return f"00:50:56:{(n >> 16) & 0xFF:02x}:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}"

    def _new_ip(self) -> str:
        n = next(self._ips)
        return f"10.{(n >> 16) & 0xFF}.{(n >> 8) & 0xFF}.{n & 0xFF}"

    def add_host(self, name: str, *, slots: int = 8, memory_mb: int = 512 * 1024,
                 base_used_mb: int = 16 * 1024) -> FakeHost:
        host = FakeHost(self._new_ref("HostSystem", "host"), name, slots=slots,
                        memory_mb=memory_mb, base_used_mb=base_used_mb)
        self.hosts[name] = host
        return host

    def add_datastore(self, name: str) -> FakeDatastore:
        ds = FakeDatastore(self._new_ref("Datastore", "datastore"), name)
        self.datastores[name] = ds
        return ds

    def _add_folder(self, path: str) -> _Folder:
        folder = _Folder(self._new_ref("Folder", "group-v"), path)
        self._folders[path] = folder
        self._folders_by_ref[folder.ref] = folder
        return folder

    def add_vm(self, name: str, *, host: str, datastore: str | None = None, folder: str = "",
               state: str = "running", chain_depth: int = 1, memory_mb: int = 4096,
               guest_family: GuestFamily = "linux", nics: int = 1,
               credentials: GuestCredentials | None = None,
               extra_config: Mapping[str, str] | None = None) -> FakeVm:
        """A VM (typically a source). ``state`` is ``running``, ``frozen`` or ``poweredOff``."""
        h = self.hosts[host]
        ds = self.datastores[datastore] if datastore else self._default_datastore()
        macs = [self._new_mac() for _ in range(nics)]
        powered = state != "poweredOff"
        vm = FakeVm(
            ref=self._new_ref("VirtualMachine", "vm"), name=name,
            folder=self._folder_for(folder).ref, host=h, datastores=[ds],
            power_state="poweredOn" if powered else "poweredOff", frozen=state == "frozen",
            chain_depth=chain_depth, memory_mb=memory_mb, guest_family=guest_family,
            nics=[FakeNic(4000 + i, f"Network adapter {i + 1}", mac, connected=powered)
                  for i, mac in enumerate(macs)],
            guest_macs=list(macs), extra_config=dict(extra_config or {}),
            tools_running=powered, guest_ip=self._new_ip() if powered else None,
            credentials=credentials, charged_mb=memory_mb)
        self._register(vm)
        if powered:
            h.used_mb += vm.charged_mb
        return vm

    def _default_datastore(self) -> FakeDatastore:
        if not self.datastores:
            self.add_datastore("ds-01")
        return next(iter(self.datastores.values()))

    def _folder_for(self, path: str) -> _Folder:
        path = self._norm_path(path)
        folder = self._folders.get(path)
        if folder is None:
            parent = path.rpartition("/")[0]
            if parent:
                self._folder_for(parent)
            folder = self._add_folder(path)
        return folder

    def _norm_path(self, path: str) -> str:
        path = path.strip("/")
        prefix = f"{self.datacenter}/vm"
        if path == prefix:
            return ""
        if path.startswith(prefix + "/"):
            path = path[len(prefix) + 1:]
        return path

    def _register(self, vm: FakeVm) -> None:
        self._vms[vm.ref] = vm
        self._folders_by_ref[vm.folder].vms[vm.name] = vm

    # -- test controls -----------------------------------------------------------
    def vm(self, name: str) -> FakeVm:
        """The first VM called ``name`` (test helper)."""
        for vm in self._vms.values():
            if vm.name == name:
                return vm
        raise KeyError(name)

    def all_vms(self) -> list[FakeVm]:
        return list(self._vms.values())

    def folder_vms(self, path: str) -> list[FakeVm]:
        folder = self._folders.get(self._norm_path(path))
        return list(folder.vms.values()) if folder else []

    def set_host_state(self, name: str, connection_state: str) -> None:
        """Disconnect (or reconnect) a host; clones on it fail from now on."""
        self.hosts[name].connection_state = connection_state

    def power_off_now(self, name: str) -> None:
        """Power a VM off at once (a source pulled from under the engine)."""
        self._set_power(self.vm(name), "poweredOff")

    def add_fault(self, rule: FaultRule) -> FaultRule:
        self.faults.append(rule)
        return rule

    async def wait_idle(self, timeout_s: float = 5.0) -> None:
        """Wait until no clone task is queued or running (RequestTimeout if it takes longer)."""
        with anyio.move_on_after(timeout_s):
            while self.stats.in_flight_total:
                if self._idle is None:
                    self._idle = anyio.Event()
                await self._idle.wait()
            return
        raise RequestTimeout(f"{self.stats.in_flight_total} clone tasks still in flight")

    # -- internals ---------------------------------------------------------------
    def _inject(self, method: str, name: str, *, lost_reply: bool) -> None:
        for rule in self.faults:
            if rule.lost_reply == lost_reply and rule.applies(method, name, self.rng):
                rule.fired += 1
                self.stats.faults_injected[method] += 1
                raise rule.make(method, name)

    async def _call(self, method: str, name: str = "", delay_s: float | None = None) -> None:
        self.stats.calls[method] += 1
        await anyio.sleep(self.latency.call_s if delay_s is None else delay_s)
        self._inject(method, name, lost_reply=False)

    def _vm(self, ref: Ref, method: str) -> FakeVm:
        vm = self._vms.get(ref)
        if vm is None:
            raise NotFound(f"{ref} does not exist", fault="ManagedObjectNotFound",
                           method=method, obj=ref.id)
        return vm

    def _info(self, vm: FakeVm) -> VmInfo:
        return VmInfo(
            ref=vm.ref, name=vm.name, power_state=vm.power_state, frozen=vm.frozen,
            host=vm.host.ref if vm.host else None, host_name=vm.host.name if vm.host else None,
            folder=vm.folder, datastores=tuple(d.ref for d in vm.datastores),
            chain_depth=vm.chain_depth, memory_mb=vm.memory_mb, guest_family=vm.guest_family,
            nics=tuple(NicInfo(n.key, n.label, n.mac, n.connected, n.start_connected, n.network)
                       for n in vm.nics),
            extra_config=dict(vm.extra_config), tools_running=vm.tools_running,
            guest_ip=vm.guest_ip, guest_macs=tuple(vm.guest_macs),
            instance_uuid=vm.instance_uuid)

    def _set_power(self, vm: FakeVm, state: PowerState) -> None:
        if vm.power_state == state:
            return
        on = state == "poweredOn"
        if vm.host is not None:
            vm.host.used_mb += vm.charged_mb if on else -vm.charged_mb
        vm.power_state = state
        vm.frozen = False
        vm.tools_running = on
        vm.guest_ip = None
        if on:
            self._maybe_dhcp(vm)
        vm.touch()

    def _network_ok(self, vm: FakeVm) -> bool:
        return vm.powered_on and all(n.connected for n in vm.nics) and \
            [n.mac for n in vm.nics] == vm.guest_macs

    def _maybe_dhcp(self, vm: FakeVm) -> None:
        if not self._network_ok(vm) or vm.guest_ip is not None:
            return
        if self.latency.dhcp_s > 0 and self._tg is not None:
            self._tg.start_soon(self._dhcp_later, vm)
        else:
            self._give_ip(vm)

    async def _dhcp_later(self, vm: FakeVm) -> None:
        await anyio.sleep(self.latency.dhcp_s)
        if self._vms.get(vm.ref) is vm and self._network_ok(vm):
            self._give_ip(vm)

    def _give_ip(self, vm: FakeVm) -> None:
        vm.guest_ip = self._new_ip()
        if self.guest_ready_key:
            vm.extra_config[self.guest_ready_key] = "1"
        vm.touch()

    def _connect_nic(self, vm: FakeVm, index: int) -> None:
        nic = vm.nics[index]
        if nic.connected:
            return
        guest_mac = vm.guest_macs[index] if index < len(vm.guest_macs) else None
        if vm.powered_on and guest_mac != nic.mac:
            # The guest answers on the wire with its source's MAC (and IP).
            self.stats.network_conflicts += 1
            self.stats.conflicted_vms.add(vm.name)
        nic.connected = True

    # -- VSphere: about and inventory ---------------------------------------------
    async def server_info(self) -> ServerInfo:
        await self._call("server_info")
        if self.api_type != "VirtualCenter":
            raise UnsupportedEndpoint("instant clone needs vCenter, this is a bare host")
        return ServerInfo("VMware vCenter Server (fleet fake)", "8.0.3", "8.0.3.0",
                          self.api_type, "00000000-0000-0000-0000-00000000fake")

    async def find_vms(self, names_or_paths: Sequence[str]) -> list[VmInfo]:
        await self._call("find_vms", ",".join(names_or_paths))
        found: list[VmInfo] = []
        missing: list[str] = []
        for item in names_or_paths:
            vm = self._lookup(item)
            if vm is None:
                missing.append(item)
            else:
                found.append(self._info(vm))
        if missing:
            raise NotFound(f"no VM called {some_of(missing)}", method="find_vms")
        return found

    def _lookup(self, name_or_path: str) -> FakeVm | None:
        if "/" in name_or_path:
            folder_path, _, name = self._norm_path(name_or_path).rpartition("/")
            folder = self._folders.get(folder_path)
            return folder.vms.get(name) if folder else None
        for vm in self._vms.values():
            if vm.name == name_or_path:
                return vm
        return None

    async def get_vm(self, ref: Ref) -> VmInfo:
        await self._call("get_vm", ref.id)
        return self._info(self._vm(ref, "get_vm"))

    async def list_hosts(self) -> list[HostInfo]:
        await self._call("list_hosts")
        return [HostInfo(h.ref, h.name, h.connection_state, h.in_maintenance, h.memory_mb,
                         h.base_used_mb + h.used_mb, h.cluster) for h in self.hosts.values()]

    async def list_datastores(self) -> list[DatastoreInfo]:
        await self._call("list_datastores")
        return [DatastoreInfo(d.ref, d.name, d.capacity_bytes, d.free_bytes)
                for d in self.datastores.values()]

    async def ensure_folder(self, path: str) -> Ref:
        await self._call("ensure_folder", path)
        return self._folder_for(path).ref

    async def find_folder(self, path: str) -> Ref | None:
        await self._call("find_folder", path)
        folder = self._folders.get(self._norm_path(path))
        return folder.ref if folder else None

    async def list_folder_vms(self, folder: Ref) -> list[VmInfo]:
        await self._call("list_folder_vms", folder.id)
        f = self._folders_by_ref.get(folder)
        if f is None:
            raise NotFound(f"{folder} does not exist", method="list_folder_vms")
        return [self._info(vm) for vm in f.vms.values()]

    async def list_child_folders(self, folder: Ref) -> list[tuple[str, Ref]]:
        await self._call("list_child_folders", folder.id)
        f = self._folders_by_ref.get(folder)
        if f is None:
            raise NotFound(f"{folder} does not exist", method="list_child_folders")
        return sorted((path.rpartition("/")[2], child.ref) for path, child in self._folders.items()
                      if path and path.rpartition("/")[0] == f.path)

    # -- VSphere: folders as records (the fleet lock) ------------------------------
    async def server_time(self) -> float:
        await self._call("server_time")
        return time.time() + self.clock_offset_s

    def _folder(self, ref: Ref, method: str) -> _Folder:
        f = self._folders_by_ref.get(ref)
        if f is None or self._folders.get(f.path) is not f:
            raise NotFound(f"{ref} does not exist", method=method, obj=ref.id)
        return f

    def _name_taken(self, parent: _Folder, name: str) -> Ref | None:
        path = f"{parent.path}/{name}" if parent.path else name
        child = self._folders.get(path)
        if child is not None:
            return child.ref
        if name in parent.vms:
            return parent.vms[name].ref
        return parent.ref if (parent.ref, name) in self._pending_names else None

    async def new_folder(self, parent: Ref, name: str) -> Ref:
        """CreateFolder: the name is held from the start, so a concurrent create of the
        same name gets DuplicateName (as vCenter and the simulator do)."""
        await self._call("new_folder", name)
        f = self._folder(parent, "new_folder")
        existing = self._name_taken(f, name)
        if existing is not None:
            raise DuplicateName(f"the name {name!r} already exists", name=name,
                                existing=existing.id, method="new_folder")
        self._pending_names.add((f.ref, name))
        try:
            await anyio.sleep(self.latency.folder_s)
            self._folder(parent, "new_folder")
            made = self._add_folder(f"{f.path}/{name}" if f.path else name)
        finally:
            self._pending_names.discard((f.ref, name))
        self._inject("new_folder", name, lost_reply=True)
        return made.ref

    async def rename_folder(self, folder: Ref, name: str) -> None:
        await self._call("rename_folder", name)
        f = self._folder(folder, "rename_folder")
        parent_path, _, old = f.path.rpartition("/")
        if not f.path:
            raise VSphereError("the root folder cannot be renamed", method="rename_folder")
        if name != old:
            parent = self._folders[parent_path]
            existing = self._name_taken(parent, name)
            if existing is not None:
                raise DuplicateName(f"the name {name!r} already exists", name=name,
                                    existing=existing.id, method="rename_folder")
            new_path = f"{parent_path}/{name}" if parent_path else name
            for path in [p for p in self._folders if p == f.path or
                         p.startswith(f.path + "/")]:
                moved = self._folders.pop(path)
                moved.path = new_path + path[len(f.path):]
                self._folders[moved.path] = moved
        self._inject("rename_folder", name, lost_reply=True)

    async def destroy_folder(self, folder: Ref) -> None:
        await self._call("destroy_folder", folder.id)
        f = self._folder(folder, "destroy_folder")
        if not f.path:
            raise VSphereError("the root folder cannot be destroyed", method="destroy_folder")
        subtree = [p for p in self._folders if p == f.path or p.startswith(f.path + "/")]
        vms = [vm.name for p in subtree for vm in self._folders[p].vms.values()]
        if vms:
            raise NotEmpty(f"folder {folder.id} holds VMs {', '.join(sorted(vms)[:5])}; "
                           "not destroyed", method="destroy_folder", obj=folder.id)
        for path in subtree:
            del self._folders_by_ref[self._folders.pop(path).ref]
        self._inject("destroy_folder", folder.id, lost_reply=True)

    # -- VSphere: clones ---------------------------------------------------------
    async def start_instant_clone(self, request: CloneRequest) -> FakeTask:
        if self._tg is None:
            raise RuntimeError("use FakeVSphere as `async with FakeVSphere() as vs`")
        await self._call("start_instant_clone", request.name)
        source = self._vm(request.source, "start_instant_clone")
        task = FakeTask(self, self._new_ref("Task", "task"), request.name)
        host = source.host
        assert host is not None
        ds = source.datastores[0]
        s = self.stats
        s.clones_submitted += 1
        s.in_flight_total += 1
        s.max_in_flight_total = max(s.max_in_flight_total, s.in_flight_total)
        host.in_flight += 1
        s.max_in_flight_per_host[host.name] = max(s.max_in_flight_per_host[host.name],
                                                  host.in_flight)
        ds.in_flight += 1
        s.max_in_flight_per_datastore[ds.name] = max(s.max_in_flight_per_datastore[ds.name],
                                                     ds.in_flight)
        source.in_flight_clones += 1
        s.max_in_flight_per_source[source.name] = max(s.max_in_flight_per_source[source.name],
                                                      source.in_flight_clones)
        self._task_host[task] = host
        self._pending.append(task)
        self._pump(at=task.queue_time)
        if task.state == "queued":
            s.tasks_queued += 1
        self._tg.start_soon(self._clone_work, task, request, source, host, ds)
        self._inject("start_instant_clone", request.name, lost_reply=True)
        return task

    def _pump(self, *, at: float) -> None:
        """Admit queued tasks, first come first served, while slots and the cap allow.
        ``at``: when the slot freed (or the request arrived) on vCenter's timeline: a
        task admitted now started then, not whenever this process got round to it."""
        if not self._pending:
            return
        waiting: deque[FakeTask] = deque()
        for task in self._pending:
            host = self._task_host[task]
            busy = host.busy_slots(at)
            if self.stats.running_total < self.max_concurrent_operations and \
                    busy < host.slots:
                host.running += 1
                freed = host.take_slot(task, at)
                s = self.stats
                s.running_total += 1
                s.max_running_total = max(s.max_running_total, s.running_total)
                s.max_running_per_host[host.name] = max(s.max_running_per_host[host.name],
                                                        busy + 1)
                task.state = "running"
                task.start_time = max(task.queue_time, freed)
                task.admitted.set()
            else:
                waiting.append(task)
        self._pending = waiting

    def _dequeue(self, task: FakeTask) -> None:
        with contextlib.suppress(ValueError):
            self._pending.remove(task)

    def _finish(self, task: FakeTask, *, result: Ref | None = None,
                error: VSphereError | None = None) -> None:
        if task.done.is_set():
            return
        task.state = "error" if error is not None else "success"
        task.result, task.error = result, error
        task.complete_time = task.ends_at if task.ends_at is not None else time.time()
        task.done.set()

    def _clone_problem(self, request: CloneRequest, source: FakeVm, host: FakeHost, *,
                       growing: bool = False) -> VSphereError | None:
        """Why this clone cannot be made right now, or None. ``growing``: the source's
        chain already holds this clone's new level."""
        if self._vms.get(source.ref) is not source:
            return NotFound(f"source {source.name} no longer exists", obj=source.ref.id)
        if not host.connected:
            return HostUnavailable(f"host {host.name} is {host.connection_state}",
                                   fault="HostNotConnected", obj=host.ref.id)
        if not source.powered_on:
            return SourceNotPoweredOn(f"source {source.name} is {source.power_state}",
                                      fault="InvalidState", obj=source.ref.id)
        if source.chain_depth + (0 if growing else 1) > MAX_CHAIN_DEPTH:
            return ChainTooDeep(
                f"Unable to prepare migration: {source.name} is at chain depth "
                f"{source.chain_depth}", fault="GenericVmConfigFault", obj=source.ref.id)
        charge = int(source.memory_mb * self.clone_memory_share)
        if host.base_used_mb + host.used_mb + charge > host.memory_mb:
            return InsufficientResources(f"host {host.name} is out of memory",
                                         fault="InsufficientResourcesFault", obj=host.ref.id)
        folder = self._folders_by_ref.get(request.folder)
        if folder is None:
            return NotFound(f"folder {request.folder} does not exist")
        holder = folder.vms.get(request.name)
        if holder is not None:
            return DuplicateName(f"the name '{request.name}' already exists",
                                 name=request.name, existing=holder.ref.id,
                                 fault="DuplicateName")
        return None

    async def _clone_work(self, task: FakeTask, request: CloneRequest, source: FakeVm,
                          host: FakeHost, ds: FakeDatastore) -> None:
        try:
            await task.admitted.wait()
            if task.done.is_set():  # cancelled while queued
                return
            try:
                problem = self._clone_problem(request, source, host)
                if problem is not None:
                    raise problem
                if not source.frozen:
                    # A running source is stunned for each clone: one at a time.
                    if source.busy is None:
                        source.busy = anyio.Lock()
                    async with source.busy:
                        await self._do_clone(task, request, source, host, ds)
                else:
                    await self._do_clone(task, request, source, host, ds)
            finally:
                host.running -= 1
                host.occupants.discard(task)
                self.stats.running_total -= 1
                self._pump(at=task.ends_at if task.ends_at is not None else time.time())
        except VSphereError as exc:
            self.stats.clones_failed += 1
            self.stats.task_errors[exc.reason] += 1
            self._finish(task, error=exc)
        finally:
            host.in_flight -= 1
            ds.in_flight -= 1
            source.in_flight_clones -= 1
            self.stats.in_flight_total -= 1
            if not self.stats.in_flight_total and self._idle is not None:
                self._idle.set()
                self._idle = None
            self._task_host.pop(task, None)
            if not task.done.is_set():  # the fake itself is shutting down
                self._finish(task, error=TaskCancelled("vCenter went away"))

    async def _do_clone(self, task: FakeTask, request: CloneRequest, source: FakeVm,
                        host: FakeHost, ds: FakeDatastore) -> None:
        self._inject("instant_clone", request.name, lost_reply=False)
        lat = self.latency
        start_depth = source.chain_depth
        depth = start_depth + 1
        if not source.frozen:
            # The stun comes first: the running source gets its new delta disk at once,
            # and keeps it even if the clone then fails.
            source.chain_depth = depth
            source.touch()
        duration = lat.clone_s + lat.clone_per_depth_s * start_depth
        assert task.start_time is not None
        begin = task.start_time if source.frozen else max(task.start_time, source.stunned_until)
        task.ends_at = begin + duration
        if not source.frozen:
            source.stunned_until = task.ends_at
        await anyio.sleep(duration)
        # The world may have changed while the clone ran.
        problem = self._clone_problem(request, source, host, growing=not source.frozen)
        if problem is not None:
            raise problem
        vm = self._make_clone(request, source, host, depth)
        self.stats.clones_made += 1
        self.stats.clones_per_source[source.name] += 1
        s = self.stats.max_clone_depth_per_source
        s[source.name] = max(s[source.name], depth)
        # A lost reply: the VM exists, the task says otherwise.
        try:
            self._inject("instant_clone", request.name, lost_reply=True)
        except VSphereError as exc:
            self._finish(task, error=exc)
            return
        self._finish(task, result=vm.ref)

    def _make_clone(self, request: CloneRequest, source: FakeVm, host: FakeHost,
                    depth: int) -> FakeVm:
        connect = request.nic_connect
        # Every NIC starts disconnected; those migrateConnect (or the source) wants
        # connected are connected below, where a stale guest MAC counts as a conflict.
        nics = [FakeNic(nic.key, nic.label, self._new_mac(), connected=False,
                        start_connected=nic.start_connected, network=nic.network)
                for nic in source.nics]
        extra = dict(source.extra_config)
        extra.update(request.extra_config)
        clone = FakeVm(
            ref=self._new_ref("VirtualMachine", "vm"), name=request.name, folder=request.folder,
            host=host, datastores=list(source.datastores), power_state="poweredOn",
            frozen=False, chain_depth=depth, memory_mb=source.memory_mb,
            guest_family=source.guest_family, nics=nics, guest_macs=list(source.guest_macs),
            extra_config={k: v for k, v in extra.items() if v != ""}, tools_running=True,
            credentials=source.credentials,
            charged_mb=int(source.memory_mb * self.clone_memory_share), source=source)
        self._register(clone)
        host.used_mb += clone.charged_mb
        # migrateConnect: NICs asked to connect come up with the guest's stale MAC.
        for i, nic in enumerate(source.nics):
            if isinstance(connect, str):
                want = connect == "connect"
            elif connect and nic.key in connect:
                want = connect[nic.key] == "connect"
            else:
                want = nic.connected
            if want:
                self._connect_nic(clone, i)
        if all(n.connected for n in clone.nics) and source.guest_ip is not None:
            clone.guest_ip = source.guest_ip  # the guest believes it is its source
        return clone

    async def check_instant_clone(self, request: CloneRequest) -> list[str]:
        await self._call("check_instant_clone", request.name)
        source = self._vms.get(request.source)
        if source is None:
            return [f"source {request.source} does not exist"]
        assert source.host is not None
        problem = self._clone_problem(request, source, source.host)
        return [str(problem)] if problem else []

    async def full_clone(self, source: Ref, name: str, folder: Ref, *, host: Ref | None = None,
                         datastore: Ref | None = None, power_on: bool = True) -> Ref:
        await self._call("full_clone", name, self.latency.full_clone_s)
        src = self._vm(source, "full_clone")
        target = src.host
        if host is not None:
            target = next((h for h in self.hosts.values() if h.ref == host), None)
            if target is None:
                raise NotFound(f"{host} does not exist")
        assert target is not None
        if not target.connected:
            raise HostUnavailable(f"host {target.name} is {target.connection_state}")
        f = self._folders_by_ref.get(folder)
        if f is None:
            raise NotFound(f"{folder} does not exist")
        if name in f.vms:
            raise DuplicateName(f"the name '{name}' already exists", name=name,
                                existing=f.vms[name].ref.id)
        ds = src.datastores
        if datastore is not None:
            ds = [d for d in self.datastores.values() if d.ref == datastore]
        macs = [self._new_mac() for _ in src.nics]
        vm = FakeVm(
            ref=self._new_ref("VirtualMachine", "vm"), name=name, folder=folder, host=target,
            datastores=list(ds), power_state="poweredOff", frozen=False, chain_depth=1,
            memory_mb=src.memory_mb, guest_family=src.guest_family,
            nics=[FakeNic(n.key, n.label, mac, connected=False, network=n.network)
                  for n, mac in zip(src.nics, macs, strict=True)],
            # A full clone boots afresh: its guest learns its own MACs.
            guest_macs=list(macs), extra_config=dict(src.extra_config),
            credentials=src.credentials, charged_mb=src.memory_mb)
        self._register(vm)
        if power_on:
            for nic in vm.nics:
                nic.connected = True
            self._set_power(vm, "poweredOn")
        return vm.ref

    async def relocate(self, vm: Ref, *, host: Ref | None = None,
                       datastore: Ref | None = None) -> None:
        await self._call("relocate", vm.id)
        v = self._vm(vm, "relocate")
        if host is not None:
            target = next((h for h in self.hosts.values() if h.ref == host), None)
            if target is None:
                raise NotFound(f"{host} does not exist")
            if v.host is not None and v.powered_on:
                v.host.used_mb -= v.charged_mb
                target.used_mb += v.charged_mb
            v.host = target
        if datastore is not None:
            v.datastores = [d for d in self.datastores.values() if d.ref == datastore]
        v.touch()

    # -- VSphere: power and config ------------------------------------------------
    async def power_on(self, vm: Ref) -> None:
        await self._call("power_on", vm.id, self.latency.power_s)
        v = self._vm(vm, "power_on")
        if v.host is not None and not v.host.connected:
            raise HostUnavailable(f"host {v.host.name} is {v.host.connection_state}")
        self._set_power(v, "poweredOn")

    async def power_off(self, vm: Ref) -> None:
        await self._call("power_off", vm.id, self.latency.power_s)
        self._set_power(self._vm(vm, "power_off"), "poweredOff")

    async def reset(self, vm: Ref) -> None:
        await self._call("reset", vm.id, self.latency.power_s)
        v = self._vm(vm, "reset")
        v.frozen = False
        v.touch()

    async def destroy(self, vm: Ref) -> None:
        await self._call("destroy", vm.id, self.latency.destroy_s)
        v = self._vms.get(vm)
        if v is None:
            return
        self._set_power(v, "poweredOff")  # Destroy_Task needs it off; the client does this
        del self._vms[vm]
        folder = self._folders_by_ref[v.folder]
        if folder.vms.get(v.name) is v:
            del folder.vms[v.name]
        self.stats.destroyed += 1
        self.stats.destroyed_names.append(v.name)
        v.touch()
        self._inject("destroy", v.name, lost_reply=True)

    async def set_nics_connected(self, vm: Ref, connected: bool,
                                 nic_keys: Sequence[int] | None = None, *,
                                 extra_config: Mapping[str, str] | None = None) -> None:
        await self._call("set_nics_connected", vm.id, self.latency.reconfig_s)
        v = self._vm(vm, "set_nics_connected")
        self._set_extra_config(v, extra_config or {})
        for i, nic in enumerate(v.nics):
            if nic_keys is not None and nic.key not in nic_keys:
                continue
            if connected:
                self._connect_nic(v, i)
            else:
                nic.connected = False
                v.guest_ip = None
        self._maybe_dhcp(v)
        v.touch()
        self._inject("set_nics_connected", v.name, lost_reply=True)

    async def update_extra_config(self, vm: Ref, values: Mapping[str, str]) -> None:
        await self._call("update_extra_config", vm.id, self.latency.reconfig_s)
        v = self._vm(vm, "update_extra_config")
        self._set_extra_config(v, values)
        v.touch()
        self._inject("update_extra_config", v.name, lost_reply=True)

    @staticmethod
    def _set_extra_config(v: FakeVm, values: Mapping[str, str]) -> None:
        for key, value in values.items():
            if value == "":
                v.extra_config.pop(key, None)  # vSphere: an empty value removes the key
            else:
                v.extra_config[key] = value

    # -- VSphere: guest -------------------------------------------------------------
    async def run_in_guest(self, vm: Ref, credentials: GuestCredentials, program: GuestProgram,
                           *, timeout_s: float) -> int:
        v = self._vm(vm, "run_in_guest")
        with anyio.move_on_after(timeout_s):
            await self._call("run_in_guest", v.name, self.latency.guest_op_s)
            return self._run_program(v, credentials, program)
        raise RequestTimeout(f"guest program on {v.name} still running after {timeout_s}s",
                             method="run_in_guest", obj=vm.id)

    def _run_program(self, v: FakeVm, credentials: GuestCredentials,
                     program: GuestProgram) -> int:
        if self._vms.get(v.ref) is not v:
            raise NotFound(f"{v.name} no longer exists")
        if not v.powered_on or not v.tools_running:
            raise GuestOperationFailed(f"VMware Tools not running in {v.name}",
                                       fault="GuestOperationsUnavailable")
        if v.credentials is not None and credentials != v.credentials:
            raise InvalidGuestLogin(f"guest login refused on {v.name}", fault="InvalidGuestLogin")
        refresh = recipes.is_refresh(program)
        freeze = recipes.is_freeze(program)
        if refresh is not None or freeze is not None:
            if (refresh or freeze) != v.guest_family:
                return 127  # a Linux command line in a Windows guest, or vice versa
            if refresh is not None:
                v.guest_macs = [n.mac for n in v.nics]
                v.guest_ip = None
                self._maybe_dhcp(v)
            else:
                v.frozen = True
            v.touch()
            return 0
        return self.guest_program_handler(self._info(v), program)

    async def wait_for_vm_state(self, vm: Ref, *, timeout_s: float, guest_ip: bool = False,
                                extra_config_key: str | None = None,
                                frozen: bool | None = None, tools_running: bool = False) -> None:
        await self.wait_for_vm(vm, timeout_s=timeout_s, guest_ip=guest_ip,
                               extra_config_key=extra_config_key, frozen=frozen,
                               tools_running=tools_running)

    async def wait_for_vm(self, vm: Ref, *, timeout_s: float, guest_ip: bool = False,
                          extra_config_key: str | None = None, frozen: bool | None = None,
                          tools_running: bool = False) -> VmInfo:
        await self._call("wait_for_vm", vm.id)
        with anyio.move_on_after(timeout_s):
            while True:
                v = self._vm(vm, "wait_for_vm")
                if (not guest_ip or v.guest_ip is not None) and \
                        (extra_config_key is None or extra_config_key in v.extra_config) and \
                        (frozen is None or v.frozen == frozen) and \
                        (not tools_running or v.tools_running):
                    return self._info(v)
                if v.changed is None:
                    v.changed = anyio.Event()
                await v.changed.wait()
        raise RequestTimeout(f"{vm.id} did not reach the wanted state in {timeout_s}s",
                             method="wait_for_vm", obj=vm.id)


def make_fake(*, hosts: int = 4, slots: int = 8, frozen_per_host: int = 1,
              running: int = 0, running_depth: int = 1, frozen_depth: int = 2,
              datastores: int = 2, credentials: GuestCredentials | None = None,
              latency: FakeLatency | None = None, seed: int = 0,
              host_memory_mb: int = 512 * 1024, **kw: Any) -> FakeVSphere:
    """A ready-made topology: ``hosts`` hosts ``esx-NN``, ``frozen_per_host`` frozen sources
    ``frozen-NN[-k]`` on each, and ``running`` running sources ``running-NN`` spread over
    the hosts, all in folder ``sources``."""
    fake = FakeVSphere(latency=latency, seed=seed, **kw)
    for d in range(datastores):
        fake.add_datastore(f"ds-{d + 1:02d}")
    ds_names = list(fake.datastores)
    for h in range(hosts):
        fake.add_host(f"esx-{h + 1:02d}", slots=slots, memory_mb=host_memory_mb)
    host_names = list(fake.hosts)
    for h, host in enumerate(host_names):
        for k in range(frozen_per_host):
            name = f"frozen-{h + 1:02d}" + (f"-{k + 1}" if frozen_per_host > 1 else "")
            fake.add_vm(name, host=host, datastore=ds_names[h % len(ds_names)],
                        folder="sources", state="frozen", chain_depth=frozen_depth,
                        credentials=credentials)
    for r in range(running):
        fake.add_vm(f"running-{r + 1:02d}", host=host_names[r % len(host_names)],
                    datastore=ds_names[r % len(ds_names)], folder="sources", state="running",
                    chain_depth=running_depth, credentials=credentials)
    return fake


__all__ = [
    "ConnectionFailed",  # re-exported: the usual lost-reply error in tests
    "FakeLatency",
    "FakeStats",
    "FakeTask",
    "FakeVSphere",
    "FaultRule",
    "make_fake",
]
