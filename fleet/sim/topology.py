"""The simulator's topology file: TOML validated into typed models.

A topology describes one simulated vCenter: its API level, limits, latency
model, datacenter/cluster, hosts, datastores, networks, VMs (sources among
them), folders and fault-injection rules. Entries with ``count`` expand a
``{index}`` template so large inventories stay short to write::

    [[hosts]]
    name = "esx-{index:02d}"
    count = 8

Every error is a :class:`fleet.errors.ConfigError` naming the file, the dotted
key and the bad value. The file is read as every file a user names is
(:mod:`fleet.files`: regular, capped, nesting bounded); durations have upper
bounds (a latency of ``1e308`` would be a task that never ends) and counts a cap.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fleet.errors import ConfigError
from fleet.files import CONFIG_MAX_BYTES, FileProblem, parse_toml, read_user_file
from fleet.vcenter import HOST_PROVISIONING_SLOTS, MAX_CHAIN_DEPTH, MAX_CONCURRENT_OPERATIONS

#: the longest simulated duration (latency, delay, readiness; at time scale 1)
MAX_LATENCY_S = 3600.0
#: the longest session idle timeout or task retention (a day, like the service's scans)
MAX_RETENTION_S = 86_400.0
#: entries one ``count`` may expand to (the 10,000-VM inventory benchmark fits ten times)
MAX_ENTRY_COUNT = 100_000

Latency = Annotated[float, Field(ge=0, le=MAX_LATENCY_S)]
Count = Annotated[int, Field(ge=1, le=MAX_ENTRY_COUNT)]


class _Model(BaseModel):
    # No inf/nan: a simulated task must end.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class VCenterConfig(_Model):
    kind: Literal["vcenter", "esxi"] = "vcenter"
    # API version advertised in /sdk/vimServiceVersions.xml and ServiceContent.about.
    api_version: str = "8.0.3.0"
    name: str = "fleet-sim vCenter"
    # Operations vCenter runs at once before queueing the rest (task state "queued").
    max_concurrent_operations: Annotated[int, Field(ge=1)] = MAX_CONCURRENT_OPERATIONS
    session_idle_timeout_s: Annotated[float, Field(gt=0, le=MAX_RETENTION_S)] = 1800.0
    user: str = "administrator@vsphere.local"
    password: str = "fleet-sim"
    # A running source already being cloned: "wait" queues the next clone behind
    # it, "fault" fails it with TaskInProgress.
    running_source_busy: Literal["wait", "fault"] = "wait"
    # How long finished tasks stay readable (real seconds): vCenter documents 10 minutes
    # for TaskManager.recentTask. Then a read of the task is ManagedObjectNotFound.
    task_retention_s: Annotated[float, Field(gt=0, le=MAX_RETENTION_S)] = 600.0
    # And at most this many finished tasks are kept (the oldest go first), so the
    # simulator's memory is bounded whatever the clone rate.
    max_finished_tasks: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000

    @field_validator("api_version")
    @classmethod
    def _known_version(cls, value: str) -> str:
        from pyVmomi import VmomiSupport

        if "vim25/" + value not in VmomiSupport.versionMap:
            raise ValueError(f"{value!r} is not a vim25 API version pyVmomi knows")
        return value


class LatencyConfig(_Model):
    """Task durations at time scale 1 (seconds). Real vCenter: ~1 s per instant clone."""

    instant_clone_s: Latency = 1.0
    # A running source is stunned (paused) while its delta disk is added.
    stun_s: Latency = 0.4
    per_chain_level_s: Latency = 0.003
    full_clone_s: Latency = 20.0
    relocate_s: Latency = 10.0
    power_on_s: Latency = 1.5
    power_off_s: Latency = 0.5
    reset_s: Latency = 1.0
    destroy_s: Latency = 0.5
    reconfigure_s: Latency = 0.2
    check_s: Latency = 0.2
    # CreateFolder, and a folder's Rename_Task and Destroy_Task.
    folder_s: Latency = 0.05
    guest_program_s: Latency = 0.5
    freeze_s: Latency = 1.0
    # Time after power-on/resume until VMware Tools runs and the guest has an IP.
    guest_boot_s: Latency = 0.5
    # Time a DHCP server takes to give a NIC that comes up with its own MAC an address
    # (after a NIC refresh or a reconnect); 0 answers at once.
    dhcp_s: Latency = 0.0
    # Relative jitter: each duration is multiplied by a factor in [1-j, 1+j].
    jitter: Annotated[float, Field(ge=0, lt=1)] = 0.1


class HostConfig(_Model):
    name: str
    count: Count | None = None
    # Provisioning operations the host runs at once; more are queued.
    slots: Annotated[int, Field(ge=1)] = HOST_PROVISIONING_SLOTS
    memory_gb: Annotated[float, Field(gt=0)] = 512.0
    # Memory the host may hand out relative to physical memory before
    # InsufficientResourcesFault (page sharing counted).
    overcommit: Annotated[float, Field(gt=0)] = 1.0
    cpu_cores: Annotated[int, Field(ge=1)] = 32
    connection_state: Literal["connected", "disconnected", "notResponding"] = "connected"
    # In maintenance mode: connected, but vCenter places and powers on nothing there.
    maintenance: bool = False
    datastores: list[str] | None = None  # default: every datastore


class DatastoreConfig(_Model):
    name: str
    count: Count | None = None
    capacity_gb: Annotated[float, Field(gt=0)] = 4096.0
    free_gb: Annotated[float, Field(ge=0)] | None = None


class NetworkConfig(_Model):
    name: str


class GuestConfig(_Model):
    # "other": a guest OS fleet has no network recipe for (FreeBSD here)
    family: Literal["linux", "windows", "other"] = "linux"
    user: str = "root"
    password: str = "fleet-guest"
    tools: bool = True
    # Tools installed but its service stopped in the running guest (until the next boot):
    # no guest operations, and a clone of the running VM has it stopped too.
    tools_running: bool = True
    # A guest agent that sets this guestinfo key to "1" once the guest is networked
    # (its own MAC, NIC connected, an IP), ``ready_after_s`` later.
    ready_key: str | None = None
    ready_after_s: Latency = 1.0

    @field_validator("ready_key")
    @classmethod
    def _guestinfo_key(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("guestinfo."):
            raise ValueError(f"{value!r} must start with 'guestinfo.'")
        return value


class VmConfig(_Model):
    """A VM in the inventory. Sources are VMs listed under ``[[sources]]``."""

    name: str
    count: Count | None = None
    host: str | None = None  # default: spread over hosts
    datastore: str | None = None  # default: spread over datastores
    folder: str | None = None  # path under the datacenter's vm folder
    state: Literal["running", "frozen", "poweredOff"] = "running"
    chain_depth: Annotated[int, Field(ge=1, le=MAX_CHAIN_DEPTH)] = 1
    memory_mb: Annotated[int, Field(ge=4)] = 4096
    num_cpu: Annotated[int, Field(ge=1)] = 2
    disk_gb: Annotated[float, Field(gt=0)] = 40.0
    disks: Annotated[int, Field(ge=1, le=16)] = 1
    nics: Annotated[int, Field(ge=0, le=10)] = 1
    nic_connected: bool = True
    guest: GuestConfig = GuestConfig()
    extra_config: dict[str, str] = {}

    @field_validator("folder")
    @classmethod
    def _folder(cls, value: str | None) -> str | None:
        return value if value is None else _check_folder(value)


class UpdatesConfig(_Model):
    """Ways the property collector's update stream fails a client (docs/watching.md)."""

    # A filter created while a WaitForUpdatesEx of its collector is pending: its objects'
    # initial state (their ``enter`` update) is never reported, only later changes.
    withhold_initial: bool = False
    # Each change of a watched object is lost (never reported) with this probability.
    drop_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0


class FaultRule(_Model):
    """Inject a fault where ``method`` and ``object`` globs match.

    ``fault`` is a vim fault name (``TaskInProgress``, ``vim.fault.InvalidState``,
    ``NotAuthenticated`` ...) or an HTTP-level failure: ``http:reset`` (drop the
    connection before doing anything), ``http:503`` or ``http:lost_reply`` (do
    the work, then drop the connection without answering), or ``slow`` (the
    task takes ``delay_s`` longer). ``phase`` decides whether a vim fault fails
    the call itself, the task it started, or the task *after* its work was done
    (``after``: the clone exists, the task says it failed, as vCenter reports a
    task whose host finished it while vpxd lost track of it).
    """

    method: str = "*"
    # glob over the object's moref id and name, the name of the VM a guest operation runs
    # in, and the name of what the call makes (an instant or full clone, a folder, a rename)
    object: str = "*"
    fault: str
    probability: Annotated[float, Field(ge=0, le=1)] = 1.0
    delay_s: Latency = 0.0  # at time scale 1, like latencies
    max_count: Annotated[int, Field(ge=0)] | None = None
    phase: Literal["call", "task", "after"] | None = None  # default: task for *_Task
    message: str | None = None

    @field_validator("fault")
    @classmethod
    def _known_fault(cls, value: str) -> str:
        if value == "slow":
            return value
        if value.startswith("http:"):
            if value not in ("http:reset", "http:503", "http:lost_reply"):
                raise ValueError(
                    f"{value!r} is not an HTTP fault (http:reset, http:503, http:lost_reply)"
                )
            return value
        resolve_fault_type(value)
        return value


Privilege = Annotated[str, Field(pattern=r"^[A-Z][A-Za-z]*(\.[A-Za-z]+)+$")]


class UserConfig(_Model):
    """An extra vCenter user, for permission tests: ``denied`` privileges fail with
    NoPermission everywhere, ``denied_on`` ones on the named entity and everything below
    it (``fleet.sim.permissions``)."""

    name: str
    password: str
    denied: list[Privilege] = []
    # entity name (a folder, host, datastore, network, VM, "Resources"...) -> privileges
    denied_on: dict[str, list[Privilege]] = {}


class Topology(_Model):
    vcenter: VCenterConfig = VCenterConfig()
    latency: LatencyConfig = LatencyConfig()
    datacenter: str = "dc1"
    cluster: str = "cluster1"
    hosts: list[HostConfig] = Field(default_factory=lambda: [HostConfig(name="esx-01")])
    datastores: list[DatastoreConfig] = Field(
        default_factory=lambda: [DatastoreConfig(name="datastore1")]
    )
    networks: list[NetworkConfig] = Field(
        default_factory=lambda: [NetworkConfig(name="VM Network")]
    )
    folders: list[str] = []
    sources: list[VmConfig] = []
    vms: list[VmConfig] = []
    faults: list[FaultRule] = []
    updates: UpdatesConfig = UpdatesConfig()
    users: list[UserConfig] = []
    # Fraction of an instant clone's memory shared with its source (page sharing).
    clone_memory_shared: Annotated[float, Field(ge=0, le=1)] = 0.75
    seed: int | None = None

    @field_validator("folders")
    @classmethod
    def _folders(cls, value: list[str]) -> list[str]:
        return [_check_folder(v) for v in value]

    @model_validator(mode="after")
    def _references(self) -> Topology:
        counted: list[HostConfig | DatastoreConfig | VmConfig] = [
            *self.hosts, *self.datastores, *self.sources, *self.vms]
        total = sum(e.count or 1 for e in counted)
        if total > MAX_ENTRY_COUNT:
            # Checked before any name is expanded: each becomes an object in memory.
            raise ValueError(f"hosts, datastores, sources and vms expand to {total} entries; "
                             f"the limit is {MAX_ENTRY_COUNT}")
        hosts = {h for h in expand_names(self.hosts)}
        datastores = set(expand_names(self.datastores))
        seen: dict[str, str] = {}
        for section in ("sources", "vms"):
            entries: list[VmConfig] = getattr(self, section)
            for i, vm in enumerate(entries):
                names = _expand(vm.name, vm.count)
                for name in names:
                    if name in seen:
                        raise ValueError(
                            f"{section}[{i}].name: {name!r} is already used by {seen[name]}"
                        )
                    seen[name] = f"{section}[{i}]"
                for field_name, known in (("host", hosts), ("datastore", datastores)):
                    value = getattr(vm, field_name)
                    if value is None:
                        continue
                    for j in range(vm.count or 1):
                        actual = value.format(index=j + 1) if vm.count else value
                        if actual not in known:
                            raise ValueError(
                                f"{section}[{i}].{field_name}: {actual!r} is not a "
                                f"{field_name} of this topology"
                            )
        entities = {self.datacenter, self.cluster, "Resources", "vm", "host", "datastore",
                    "network", *hosts, *datastores, *seen, *(n.name for n in self.networks),
                    *(part for path in [*self.folders, *(v.folder for v in
                                                         [*self.sources, *self.vms])]
                      if path for part in path.strip("/").split("/"))}
        for i, user in enumerate(self.users):
            for name in user.denied_on:
                if name not in entities:
                    raise ValueError(f"users[{i}].denied_on: {name!r} is not an entity of this "
                                     "topology (a folder, host, datastore, network, VM, the "
                                     "datacenter, the cluster or \"Resources\")")
        for i, host in enumerate(self.hosts):
            for ds in host.datastores or ():
                if ds not in datastores:
                    raise ValueError(f"hosts[{i}].datastores: {ds!r} is not a datastore")
        if not hosts:
            raise ValueError("hosts: at least one host is needed")
        if not datastores:
            raise ValueError("datastores: at least one datastore is needed")
        return self


def _check_folder(path: str) -> str:
    # Every segment is a folder's name: "." and ".." would be folders called that.
    if any(part in ("", ".", "..") for part in path.strip("/").split("/")):
        raise ValueError(f"{path!r} is not a folder path like \"sources/linux\" (no empty, "
                         "\".\" or \"..\" segments)")
    return path


def _expand(template: str, count: int | None) -> list[str]:
    if count is None:
        return [template]
    return [template.format(index=i + 1) for i in range(count)]


def expand_names(entries: list[HostConfig] | list[DatastoreConfig]) -> list[str]:
    out: list[str] = []
    for entry in entries:
        out.extend(_expand(entry.name, entry.count))
    return out


def resolve_fault_type(name: str) -> Any:
    """``InvalidState`` / ``vim.fault.InvalidState`` / ``vmodl.fault.SystemError`` -> type."""
    from pyVmomi import vim, vmodl

    candidates = [name] if "." in name else [
        f"vim.fault.{name}", f"vmodl.fault.{name}", f"vim.{name}", f"vmodl.{name}"
    ]
    for candidate in candidates:
        obj: Any = None
        root, _, rest = candidate.partition(".")
        obj = {"vim": vim, "vmodl": vmodl}.get(root)
        for part in rest.split("."):
            if obj is None:
                break
            obj = getattr(obj, part, None)
        if isinstance(obj, type) and issubclass(obj, vmodl.MethodFault):
            return obj
    raise ValueError(f"{name!r} is not a vim fault type")


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _check_templates(raw: dict[str, Any]) -> None:
    for section in ("hosts", "datastores", "sources", "vms"):
        entries = raw.get(section)
        if not isinstance(entries, list):
            continue  # the model reports the wrong type
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            count = entry.get("count")
            for key in ("name", "host", "datastore"):
                value = entry.get(key)
                if not isinstance(value, str):
                    continue
                try:
                    value.format(index=1)
                except (KeyError, IndexError, ValueError) as exc:
                    raise ConfigError(f"{value!r} is not a valid name template ({exc})",
                                      key=f"{section}[{i}].{key}") from None
                if key == "name" and count and count > 1 and "{index" not in value:
                    raise ConfigError(
                        f"{value!r} gives the same name to all {count} entries; use {{index}}",
                        key=f"{section}[{i}].name",
                    )


def parse_topology(raw: dict[str, Any], source: str = "<topology>") -> Topology:
    """Validate a parsed TOML document; errors name ``source`` and the key."""
    try:
        _check_templates(raw)
        return Topology.model_validate(raw)
    except ConfigError as exc:
        raise ConfigError(exc.message, key=exc.key, source=source) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _format_loc(tuple(err["loc"]))
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        value = err.get("input")
        shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(
            value, dict | list) else f" (got {value!r})"
        raise ConfigError(f"{msg}{shown}", key=loc or None, source=source) from None


def load_topology(path: str | Path | None = None) -> Topology:
    """Load a topology file, or the built-in default (``config/sim.toml``) when ``None``."""
    if path is None:
        raw = resources.files("fleet").joinpath("data/sim.toml").read_bytes()
        source = "default topology (fleet/data/sim.toml)"
    else:
        source = str(path)
        try:
            raw = read_user_file(path, CONFIG_MAX_BYTES)
        except FileProblem as exc:
            raise ConfigError(f"cannot read topology file: {exc.reason}",
                              source=source) from None
    try:
        data = parse_toml(raw)
    except FileProblem as exc:
        raise ConfigError(exc.reason, key=exc.key, source=source) from None
    return parse_topology(data, source)
