"""fleet's own view of vSphere: plain domain objects and the engine-facing interface.

This module is the seam between deciding (``fleet.engine``) and talking
(``fleet.vsphere.client``). It imports nothing from pyVmomi, so the engine can
use it freely; the client (``fleet.vsphere.client``) implements :class:`VSphere`,
against a vCenter or a simulator (``fleet.sim``, in process for tests:
``fleet.testing``).

All calls raise only ``fleet.errors`` types. Durations are seconds (``_s``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Protocol, TypeVar, overload, runtime_checkable

from anyio.abc import TaskStatus

PowerState = Literal["poweredOn", "poweredOff", "suspended"]
TaskState = Literal["queued", "running", "success", "error"]
NicConnect = Literal["connect", "disconnect"]
GuestFamily = Literal["linux", "windows", "other"]


@dataclass(frozen=True, order=True)
class Ref:
    """A managed object reference: vSphere type name and id (``VirtualMachine``, ``vm-42``)."""

    type: str
    id: str

    def __str__(self) -> str:
        return f"{self.type}:{self.id}"


@dataclass(frozen=True)
class ServerInfo:
    """What the endpoint says it is (``ServiceContent.about``)."""

    name: str
    version: str  # product version, e.g. "8.0.3"
    api_version: str  # e.g. "8.0.3.0"
    api_type: str  # "VirtualCenter" or "HostAgent"
    instance_uuid: str
    negotiated: str = ""  # the API version this client speaks with it (pyVmomi's name)


@dataclass(frozen=True)
class HostInfo:
    ref: Ref
    name: str
    connection_state: str  # "connected" | "disconnected" | "notResponding"
    in_maintenance: bool
    memory_mb: int  # physical memory
    memory_used_mb: int  # what the host reports in use (page sharing counted)
    cluster: str | None = None

    @property
    def connected(self) -> bool:
        return self.connection_state == "connected" and not self.in_maintenance


@dataclass(frozen=True)
class DatastoreInfo:
    ref: Ref
    name: str
    capacity_bytes: int
    free_bytes: int
    accessible: bool = True


@dataclass(frozen=True)
class NicInfo:
    key: int
    label: str
    mac: str
    connected: bool
    start_connected: bool
    network: str | None = None


@dataclass(frozen=True)
class VmInfo:
    """A VM as fleet needs to see it (sources and fleet members alike)."""

    ref: Ref
    name: str
    power_state: PowerState
    frozen: bool  # runtime.instantCloneFrozen
    host: Ref | None
    host_name: str | None
    folder: Ref | None
    datastores: tuple[Ref, ...]
    chain_depth: int  # deepest delta-disk chain over the VM's disks (layoutEx)
    memory_mb: int
    guest_family: GuestFamily
    nics: tuple[NicInfo, ...] = ()
    extra_config: Mapping[str, str] = field(default_factory=dict)
    tools_running: bool = False
    guest_ip: str | None = None
    guest_macs: tuple[str, ...] = ()  # MACs the guest OS uses, as VMware Tools reports them
    instance_uuid: str | None = None

    def listed(self, labels: Collection[str]) -> ListedVm:
        """This VM as a listing of ``labels`` would read it (this read saw every key)."""
        return ListedVm(self.ref, self.name, self.power_state, self.host, self.host_name,
                        Labels(self.extra_config, labels))

    # Cached (the fields never change): placement asks for every source at every clone.
    @cached_property
    def powered_on(self) -> bool:
        return self.power_state == "poweredOn"

    @cached_property
    def running(self) -> bool:
        """Powered on and not frozen: an instant clone of it deepens its disk chains."""
        return self.powered_on and not self.frozen


_T = TypeVar("_T")


class NotRead(LookupError):
    """A key a narrow read did not ask for was looked up: a bug in the reader's caller,
    which must name every key it decides on (docs/reads.md)."""


class Labels(Mapping[str, str]):
    """Some of a VM's ``extraConfig`` keys, read one by one (``config.extraConfig["k"]``).

    Only the keys read are known: an absent one among them is not set on the VM, and
    looking up any other raises :class:`NotRead` (rather than answer "not set", which
    would be a lie). Iterating gives the keys read that are set."""

    __slots__ = ("_read", "_values")

    def __init__(self, values: Mapping[str, str], read: Iterable[str]) -> None:
        self._read = frozenset(read)
        self._values = {k: v for k, v in values.items() if k in self._read}

    @property
    def read(self) -> frozenset[str]:
        return self._read

    def __getitem__(self, key: str) -> str:
        if key not in self._read:
            raise NotRead(f"extraConfig key {key!r} was not read (read: "
                          f"{', '.join(sorted(self._read)) or 'none'})")
        return self._values[key]

    @overload
    def get(self, key: str) -> str | None: ...

    @overload
    def get(self, key: str, default: str | _T) -> str | _T: ...

    def get(self, key: str, default: object = None) -> object:
        # Mapping.get through __getitem__ and a KeyError, without the detour: reconcile
        # asks three labels of every member.
        if key not in self._read:
            return self[key]  # NotRead
        return self._values.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Labels):
            return self._read == other._read and self._values == other._values
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._read, tuple(sorted(self._values.items()))))

    def __repr__(self) -> str:
        return f"Labels({self._values!r}, read={sorted(self._read)!r})"


@dataclass(frozen=True)
class ListedVm:
    """A VM as a folder listing reads it: what reconcile, ``status``, destroy and the
    service's scans decide on, and nothing more (docs/reads.md). No devices, no
    addresses, no chain: those are read only where needed, into a :class:`VmInfo`."""

    ref: Ref
    name: str
    power_state: PowerState
    host: Ref | None
    host_name: str | None
    labels: Labels


@dataclass(frozen=True)
class GuestNic:
    """One NIC as the guest reports it through VMware Tools (``guest.net[]``)."""

    mac: str | None  # the MAC the guest OS uses (an instant clone's: its source's until refreshed)
    ip_addresses: tuple[str, ...]  # IPv4 and IPv6, as Tools lists them
    device_key: int | None  # the virtual NIC's key (``deviceConfigId``), None if not tied to one
    connected: bool


@dataclass(frozen=True)
class VmAddresses:
    """A VM's addresses and where it runs, as :meth:`VSphere.read_addresses` reads them
    (docs/inventory.md): the listing's fields, the datastores' names, its instance
    UUID and creation time, what the guest reports of its network, and the MACs of its
    virtual NICs. Which of the guest's addresses are the VM's own (and not its
    source's, inherited by an instant clone) is the engine's call
    (``fleet.engine.members``)."""

    vm: ListedVm
    datastores: tuple[str, ...]
    instance_uuid: str | None
    created_at: float | None  # ``config.createDate``, epoch seconds (vCenter's clock)
    guest_ip: str | None  # ``guest.ipAddress``: the guest's primary address
    guest_nics: tuple[GuestNic, ...]
    #: virtual NIC key -> its MAC (``config.hardware.device[key].macAddress``), for the
    #: NICs the guest names
    nic_macs: Mapping[int, str] = field(default_factory=dict)


class FolderTree(Protocol):
    """A live view of a folder, the folders in it and the VMs in those, kept current by
    a watch (docs/watching.md, "The service's view"). Read it synchronously; run
    :meth:`run` in a task group to keep it."""

    #: the first full read is in the view
    synced: bool
    #: bumped at every change of the view
    generation: int
    #: why the watch does not work now, until it works again
    error: str | None
    #: the root folder was destroyed: the watch has ended
    root_gone: bool
    #: full reads of the tree so far (the first, and one after each lost watch)
    full_reads: int

    def folders(self) -> list[tuple[str, Ref]]:
        """(name, ref) of every folder directly in the root, sorted by name."""
        ...

    def vms_in(self, folder: Ref) -> list[ListedVm]:
        """Every VM directly in ``folder``, as a folder listing of the tree's labels
        reads it."""
        ...

    def folder_version(self, folder: Ref) -> int:
        """The view's generation when a VM in ``folder`` last entered, changed or left."""
        ...

    async def wait_changed(self, generation: int) -> None:
        """Return once the view is past ``generation`` or the watch has ended."""
        ...

    async def run(self, *, task_status: TaskStatus[None] = ...) -> None:
        """Keep the view until the root is gone; ``started`` once the first full read
        is in (or has failed: ``error`` says why, and it keeps trying)."""
        ...


@dataclass(frozen=True)
class Named:
    """An inventory entity and its name (what a report shows of it)."""

    ref: Ref
    name: str


@dataclass(frozen=True)
class CloneResources:
    """What an instant clone of ``vm`` uses of the inventory besides ``vm`` itself, when
    the request names no other place: the source's resource pool, its datastores (the
    clone's delta disks) and the networks its NICs are on (docs/preflight.md)."""

    vm: Ref
    pool: Named | None
    datastores: tuple[Named, ...]
    networks: tuple[Named, ...]


@dataclass(frozen=True)
class CloneRequest:
    """One instant clone: what to make, from what, where."""

    source: Ref
    name: str
    folder: Ref
    extra_config: Mapping[str, str] = field(default_factory=dict)
    pool: Ref | None = None
    datastore: Ref | None = None
    # migrateConnect for the clone's NICs: one value for every NIC, or NIC key ->
    # value. ``None`` (or an empty mapping) leaves every NIC as the source has it.
    nic_connect: Mapping[int, NicConnect] | NicConnect | None = None
    bios_uuid: str | None = None


@dataclass(frozen=True)
class GuestCredentials:
    """Guest OS login for guest operations. ``repr`` never shows the password."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class GuestProgram:
    """A program to run in the guest through VMware Tools."""

    path: str
    arguments: str = ""
    working_directory: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSnapshot:
    """Where a vCenter task stands, as the client last saw it."""

    ref: Ref
    state: TaskState
    queue_time: float | None = None  # epoch seconds, server clock
    start_time: float | None = None
    complete_time: float | None = None


@runtime_checkable
class TaskHandle(Protocol):
    """A vCenter task in flight. ``wait`` returns its result or raises a fleet error."""

    @property
    def ref(self) -> Ref: ...

    @property
    def snapshot(self) -> TaskSnapshot: ...

    async def wait(self, timeout_s: float | None = None) -> Any: ...

    async def cancel(self) -> None: ...


@runtime_checkable
class VSphere(Protocol):
    """The small async interface the engine drives. Implemented by the client."""

    async def server_info(self) -> ServerInfo:
        """About the endpoint; raises UnsupportedEndpoint if it cannot instant-clone."""
        ...

    # -- inventory -------------------------------------------------------
    async def find_vms(self, names_or_paths: Sequence[str]) -> list[VmInfo]:
        """Resolve VMs by name or inventory path; NotFound names every missing one."""
        ...

    async def get_vm(self, ref: Ref) -> VmInfo: ...

    async def list_hosts(self) -> list[HostInfo]: ...

    async def list_datastores(self) -> list[DatastoreInfo]: ...

    async def ensure_folder(self, path: str) -> Ref:
        """The VM folder at ``path`` (``dc/vm/a/b`` or ``a/b`` under the first
        datacenter's VM folder), created with its parents if missing."""
        ...

    async def find_folder(self, path: str) -> Ref | None: ...

    async def list_folder_vms(self, folder: Ref,
                              labels: Collection[str]) -> list[ListedVm]:
        """Every VM directly in ``folder`` with its name, power state, host and the
        ``extraConfig`` keys ``labels`` (read by key; members are recognised by their
        labels). Paged, so a large folder is read in bounded pieces."""
        ...

    async def list_child_folders(self, folder: Ref) -> list[tuple[str, Ref]]:
        """(name, ref) of every folder directly in ``folder``, sorted by name."""
        ...

    async def read_addresses(self, vms: Sequence[Ref],
                             labels: Collection[str]) -> list[VmAddresses]:
        """Where each VM of ``vms`` runs and the addresses its guest reports, with the
        ``extraConfig`` keys ``labels`` (docs/inventory.md). Paged over the refs, only
        the paths it needs; a VM gone meanwhile is left out. Costlier than a listing
        (the guest's NICs are not plain values): for callers that show addresses."""
        ...

    def folder_tree(self, root: Ref, labels: Collection[str]) -> FolderTree:
        """A :class:`FolderTree` of ``root`` whose VMs carry ``labels`` (not started)."""
        ...

    # -- folders as records: the fleet lock (docs/locking.md) -------------
    async def server_time(self) -> float:
        """vCenter's clock (``ServiceInstance.CurrentTime``), epoch seconds: the one clock
        every holder and contender of a lock compares expiries with."""
        ...

    async def new_folder(self, parent: Ref, name: str) -> Ref:
        """Make one new folder ``name`` in ``parent`` (``CreateFolder``). DuplicateName
        if the name is taken there (also by an object being made at this moment); a
        lost reply is not repeated: the caller looks to see what happened."""
        ...

    async def rename_folder(self, folder: Ref, name: str) -> None:
        """``Rename_Task``: DuplicateName if a sibling has the name, NotFound if the
        folder is gone."""
        ...

    async def destroy_folder(self, folder: Ref) -> None:
        """Destroy a folder that holds nothing but folders (``Destroy_Task``, which in
        vCenter destroys everything inside). Its subtree is read right before: anything
        else in it (a VM) raises NotEmpty and nothing is destroyed. NotFound if gone."""
        ...

    # -- clones and power ------------------------------------------------
    async def start_instant_clone(self, request: CloneRequest) -> TaskHandle:
        """Submit ``InstantClone_Task``; the handle's result is the new VM's Ref."""
        ...

    async def check_instant_clone(self, request: CloneRequest) -> list[str]:
        """Preflight (``CheckInstantClone_Task``); returns problems, empty if fine."""
        ...

    async def full_clone(self, source: Ref, name: str, folder: Ref, *, host: Ref | None = None,
                         datastore: Ref | None = None, power_on: bool = True) -> Ref: ...

    async def power_on(self, vm: Ref) -> None: ...

    async def power_off(self, vm: Ref) -> None: ...

    async def destroy(self, vm: Ref) -> None:
        """Power off if needed, then destroy. A VM already gone is not an error."""
        ...

    async def set_nics_connected(self, vm: Ref, connected: bool,
                                 nic_keys: Sequence[int] | None = None, *,
                                 extra_config: Mapping[str, str] | None = None,
                                 known_nics: Sequence[int] | None = None) -> None:
        """Connect or disconnect NICs (all, or ``nic_keys``); ``extra_config`` is set in
        the same reconfiguration, so both happen or neither does. ``known_nics``: the
        NIC keys the VM has (an instant clone's are its source's), read one by one
        instead of the whole device list; all of them are "all" (docs/reads.md)."""
        ...

    async def update_extra_config(self, vm: Ref, values: Mapping[str, str]) -> None: ...

    # -- preflight (docs/preflight.md): questions asked before anything changes -------
    async def clone_resources(self, vms: Sequence[Ref]) -> list[CloneResources]:
        """Where an instant clone of each VM would go and what it would use (same order;
        NotFound if a VM is gone)."""
        ...

    async def missing_privileges(self, wanted: Mapping[Ref, Collection[str]]
                                 ) -> dict[Ref, list[str]]:
        """Of the privileges ``wanted`` on each entity, those this login does not hold
        there (``AuthorizationManager.HasPrivilegeOnEntities`` for this session), sorted;
        entities lacking none are left out."""
        ...

    async def check_guest_login(self, vm: Ref, credentials: GuestCredentials) -> None:
        """``GuestAuthManager.ValidateCredentialsInGuest``: InvalidGuestLogin if the guest
        refuses the login, GuestOperationFailed if it cannot be asked (Tools not
        running, frozen); another VSphereError (InvalidPowerState) if the VM is off."""
        ...

    # -- guest -----------------------------------------------------------
    async def run_in_guest(self, vm: Ref, credentials: GuestCredentials, program: GuestProgram,
                           *, timeout_s: float) -> int:
        """Run a program through VMware Tools and return its exit code."""
        ...

    async def wait_for_vm(self, vm: Ref, *, timeout_s: float, guest_ip: bool = False,
                          extra_config_key: str | None = None, frozen: bool | None = None,
                          tools_running: bool = False) -> VmInfo:
        """Wait (with WaitForUpdatesEx, no polling) until every asked condition holds."""
        ...

    async def wait_for_vm_state(self, vm: Ref, *, timeout_s: float, guest_ip: bool = False,
                                extra_config_key: str | None = None,
                                frozen: bool | None = None, tools_running: bool = False) -> None:
        """``wait_for_vm`` for callers that need no :class:`VmInfo` afterwards (no read)."""
        ...
