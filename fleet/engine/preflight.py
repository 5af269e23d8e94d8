"""The checks ``fleet plan`` makes before anything is changed, each finding with its fix.

A first run on a real vCenter should not be where a user learns that the login lacks
a privilege, that a source's VMware Tools are stopped or that the guest password is
wrong. :func:`preflight` asks vCenter (reads and the provisioning checker only) and
returns :class:`Finding` values: a severity (``error``: a run would fail or could not
finish; ``warning``: it would work, worse), the object, what is wrong and the fix.
docs/preflight.md lists every check and :data:`NEEDS`, the privileges fleet needs
and where.

The checks, cheapest first: the API version; each source's power state, frozen or
running, VMware Tools, guest OS family and (when the workflow runs programs in the
guest) whether the guest login works (``ValidateCredentialsInGuest``); the hosts the
sources are on (maintenance, disconnected); the datastores' free space against the
fleet's estimate; the privileges the login holds on the fleet's folder (or the
nearest folder above it that exists), the sources, their resource pools, datastores
and networks (one ``HasPrivilegeOnEntities``). ``CheckInstantClone_Task`` with the
request a run sends is :func:`fleet.engine.operations.plan`'s, since it needs the
placement.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import anyio

from fleet.engine.placement import ClusterView, SourceState
from fleet.engine.reconcile import Member
from fleet.engine.spec import FleetSpec
from fleet.errors import (
    GuestOperationFailed,
    InvalidGuestLogin,
    PermissionDenied,
    VSphereError,
)
from fleet.vsphere.model import CloneResources, Ref, VSphere

Severity = Literal["error", "warning"]
Where = Literal["folder", "source", "running source", "pool", "datastore", "network"]

#: an instant clone's datastore use, estimated (docs/preflight.md, "Free space"): its
#: delta disks start near empty and grow with what the guest writes; this is the
#: growth allowed for per clone, on top of a swap file as large as its memory
DELTA_ALLOWANCE_BYTES = 1024 ** 3
MB = 1024 ** 2


@dataclass(frozen=True)
class Finding:
    """One thing ``fleet plan`` found, and what to do about it."""

    severity: Severity
    check: str  # which check found it: "privileges", "source_tools", "guest_login", ...
    object: str  # what it is about: "source frozen-01", "host esx-02", "vCenter"
    problem: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Need:
    """A privilege fleet needs, where it is checked, and why (docs/preflight.md)."""

    privilege: str
    on: Where
    why: str
    #: needed only when the spec's workflow runs programs in the guest
    guest_ops: bool = False
    #: needed only when the spec's workflow reconnects the NICs after the refresh
    reconnect: bool = False
    #: a missing one is a warning (an optional step fails), not an error
    optional: bool = False


NEEDS: tuple[Need, ...] = (
    Need("VirtualMachine.Provisioning.Clone", "source",
         "InstantClone_Task is called on the source"),
    Need("VirtualMachine.GuestOperations.Execute", "running source",
         "`fleet sources freeze` runs the freeze in the source's guest", optional=True),
    Need("VirtualMachine.GuestOperations.Query", "running source",
         "`fleet sources freeze` and this check ask the guest (ValidateCredentialsInGuest)",
         optional=True),
    Need("VirtualMachine.Inventory.CreateFromExisting", "folder",
         "each clone is made in the fleet's folder"),
    Need("Resource.AssignVMToPool", "pool", "each clone joins its source's resource pool"),
    Need("Datastore.AllocateSpace", "datastore",
         "each clone's delta disks are made on its source's datastores"),
    Need("Network.Assign", "network", "each clone's NICs are on its source's networks"),
    Need("Folder.Create", "folder",
         "the fleet's folder is made when missing, and the lock's claims are folders in "
         "it (docs/locking.md)"),
    Need("Folder.Rename", "folder", "the lock is taken and renewed by renaming a folder"),
    Need("Folder.Delete", "folder",
         "the lock is released by destroying its folder; `fleet destroy` removes the "
         "emptied fleet folder"),
    Need("VirtualMachine.Config.AdvancedConfig", "folder",
         "members' guestinfo.fleet.* labels are extraConfig, rewritten at each phase and "
         "when the fleet's expiry changes"),
    Need("VirtualMachine.Config.EditDevice", "folder",
         "the NICs of each clone are connected after the refresh", reconnect=True),
    Need("VirtualMachine.GuestOperations.Execute", "folder",
         "the NIC refresh runs in each clone's guest", guest_ops=True),
    Need("VirtualMachine.GuestOperations.Query", "folder",
         "the refresh program is followed to its end (ListProcessesInGuest)", guest_ops=True),
    Need("VirtualMachine.Interact.PowerOff", "folder",
         "members are powered off before they are destroyed (scale-down, destroy, cleanup)"),
    Need("VirtualMachine.Inventory.Delete", "folder",
         "members are destroyed (scale-down, destroy, cleanup of a failed clone)"),
)


def uses_guest_ops(spec: FleetSpec) -> bool:
    """Whether a run starts programs in the guests (the NIC refresh)."""
    return spec.network.refresh != "none"


def needs_for(spec: FleetSpec) -> list[Need]:
    """The privileges this spec's workflow needs."""
    net = spec.network
    return [n for n in NEEDS
            if (not n.guest_ops or uses_guest_ops(spec))
            and (not n.reconnect or (net.disconnect_at_clone and net.reconnect))]


@dataclass
class SourceCheck:
    """A source as the guest side of the preflight saw it."""

    source: str
    power_state: str
    frozen: bool
    tools_running: bool
    guest_family: str
    guest_login: str  # "ok", "refused", "not checked (<why>)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Preflight:
    findings: list[Finding]
    sources: list[SourceCheck]


async def fleet_folder_or_above(spec: FleetSpec, vs: VSphere) -> tuple[Ref | None, str]:
    """The fleet's folder, or the nearest folder above it that exists (privileges set
    there propagate to the folder a run makes), and its path."""
    parts = [p for p in spec.folder_path.strip("/").split("/") if p]
    for end in range(len(parts), -1, -1):
        path = "/".join(parts[:end])
        try:
            with anyio.fail_after(spec.timeouts.call_s):
                found = await vs.find_folder(path)
        except VSphereError:
            found = None
        if found is not None:
            return found, path or "the datacenter's VM folder"
    return None, spec.folder_path


async def preflight(spec: FleetSpec, vs: VSphere, view: ClusterView, *,
                    planned: Mapping[str, int],
                    members: Sequence[Member] = ()) -> Preflight:
    """Every check but the provisioning checker's (see the module docstring). ``planned``:
    clones the dry run placed on each source; ``members``: the fleet's ready members (a
    frozen source's guest login is checked on one of its clones)."""
    findings: list[Finding] = []
    sources = await _check_sources(spec, vs, view, members, findings)
    _check_hosts(view, findings)
    resources: list[CloneResources] = []
    try:
        with anyio.fail_after(spec.timeouts.call_s):
            resources = await vs.clone_resources([s.ref for s in view.sources.values()])
    except VSphereError as exc:
        findings.append(Finding("warning", "privileges", "vCenter",
                                f"could not read the sources' pools and networks: {exc}",
                                "check that the login may read the inventory (System.Read)"))
    await _check_space(spec, vs, view, planned, findings)
    await _check_privileges(spec, vs, view, resources, findings)
    return Preflight(findings, sources)


# -- sources --------------------------------------------------------------------------

async def _check_sources(spec: FleetSpec, vs: VSphere, view: ClusterView,
                         members: Sequence[Member], findings: list[Finding]
                         ) -> list[SourceCheck]:
    clones: dict[str, Member] = {}
    for member in members:
        if member.vm.power_state == "poweredOn":
            clones.setdefault(member.source, member)
    guest = uses_guest_ops(spec)
    refresh = spec.network.refresh
    out = []
    for src in view.sources.values():
        info = src.info
        what = f"source {src.name}"
        if not info.powered_on:
            findings.append(Finding(
                "warning", "source_power", what,
                f"it is {info.power_state}: instant clones need a running or frozen source, "
                "so it takes no clones",
                f"power it on and freeze it (`fleet sources freeze {src.name}`), or take it "
                "out of the spec's sources"))
        elif info.running:
            findings.append(Finding(
                "warning", "source_frozen", what,
                f"it is running, not frozen: each clone stuns it and adds a delta disk to its "
                f"chain (depth {info.chain_depth} now, budget {src.budget}), and its clones "
                "are made one at a time",
                f"freeze it: `fleet sources freeze {src.name}`"
                + ("" if info.tools_running else ", once VMware Tools runs in it")
                + " (frozen sources clone in parallel and their chains do not grow)"))
            if not info.tools_running:
                # Its clones' Tools are stopped too: no refresh, no guest IP reported.
                needs_tools = [why for why, used in (
                    ("their NIC refresh cannot run", guest),
                    ("they never report the guest IP readiness waits for",
                     spec.readiness.wait_for == "guest_ip")) if used]
                findings.append(Finding(
                    "error" if needs_tools else "warning", "source_tools", what,
                    "VMware Tools is not running in its guest: it cannot be frozen, and its "
                    "clones start with Tools stopped too"
                    + "".join(f", so {why}" for why in needs_tools[:1])
                    + "".join(f", and {why}" for why in needs_tools[1:]),
                    "start VMware Tools in the guest (e.g. `systemctl start vmtoolsd` for "
                    "open-vm-tools, or the VMware Tools service on Windows), or reboot it"))
        family = info.guest_family
        if refresh == "auto" and family not in ("linux", "windows"):
            findings.append(Finding(
                "error", "guest_os", what,
                f'its guest OS family is {family}: network.refresh "auto" has no NIC refresh '
                "recipe for it",
                'set network.refresh to "linux", "windows" or "custom" (with '
                "network.command), or \"none\""))
        elif refresh in ("linux", "windows") and family != refresh:
            known = family in ("linux", "windows")
            findings.append(Finding(
                "error" if known else "warning", "guest_os", what,
                f'its guest OS family is {family}, but network.refresh is "{refresh}"'
                + ("" if known else f": the {refresh} recipe may not work there"),
                f'set network.refresh to "auto" or "{family}"' if known else
                'set network.refresh to "custom" (with network.command) if the recipe '
                "fails there"))
        login = await _check_login(spec, vs, src, guest, findings, clones.get(src.name))
        out.append(SourceCheck(src.name, info.power_state, info.frozen, info.tools_running,
                               family, login))
    return out


async def _check_login(spec: FleetSpec, vs: VSphere, src: SourceState, guest: bool,
                       findings: list[Finding], clone: Member | None) -> str:
    creds = spec.network.credentials
    info = src.info
    if not guest or creds is None:
        return "not checked (the workflow runs nothing in the guest)"
    if not info.powered_on:
        return f"not checked ({info.power_state})"
    target, where, on = src.ref, "its guest", ""
    if info.frozen:
        # A frozen guest cannot be asked; a clone of it, resumed, has the same login.
        # Without one, the first run's network phase is where a wrong login shows.
        if clone is None:
            return "not checked (frozen)"
        target, where, on = clone.vm.ref, f"the guest of its clone {clone.name}", \
            f" (on {clone.name})"
    elif not info.tools_running:
        return "not checked (VMware Tools not running)"
    try:
        with anyio.fail_after(spec.timeouts.call_s):
            await vs.check_guest_login(target, creds)
    except InvalidGuestLogin:
        findings.append(Finding(
            "error", "guest_login", f"source {src.name}",
            f"{where} refuses the login {creds.username!r} with the spec's password: "
            "every clone's NIC refresh would fail",
            "set network.guest_user and network.guest_password_env (or "
            "network.guest_password_file) to a login of the guest"))
        return f"refused{on}"
    except PermissionDenied as exc:
        return f"not checked ({exc.privilege or 'a privilege'} missing{on})"
    except GuestOperationFailed as exc:
        return f"not checked ({exc.fault or exc.reason}{on})"
    return f"ok{on}"


# -- hosts and datastores --------------------------------------------------------------

def _check_hosts(view: ClusterView, findings: list[Finding]) -> None:
    on_host: dict[Ref, list[str]] = defaultdict(list)
    for src in view.sources.values():
        if src.info.host is not None:
            on_host[src.info.host].append(src.name)
    for ref, names in on_host.items():
        host = view.hosts.get(ref)
        if host is None:
            continue
        info = host.info
        listed = ", ".join(sorted(names))
        if info.in_maintenance:
            findings.append(Finding(
                "warning", "host", f"host {info.name}",
                f"it is in maintenance mode: its sources ({listed}) take no clones",
                f"take {info.name} out of maintenance mode, or make a frozen source on "
                "another host (`fleet sources prepare --per-host --golden VM`)"))
        elif info.connection_state != "connected":
            findings.append(Finding(
                "warning", "host", f"host {info.name}",
                f"it is {info.connection_state}: its sources ({listed}) take no clones",
                f"reconnect {info.name} in vCenter, or make a frozen source on another host "
                "(`fleet sources prepare --per-host --golden VM`)"))


def clone_bytes(memory_mb: int) -> int:
    """The datastore space one instant clone is counted to need (see DELTA_ALLOWANCE)."""
    return memory_mb * MB + DELTA_ALLOWANCE_BYTES


async def _check_space(spec: FleetSpec, vs: VSphere, view: ClusterView,
                       planned: Mapping[str, int], findings: list[Finding]) -> None:
    need: dict[Ref, int] = defaultdict(int)
    users: dict[Ref, list[str]] = defaultdict(list)
    for src in view.sources.values():
        count = planned.get(src.name, 0)
        if count and src.datastore is not None:
            need[src.datastore] += count * clone_bytes(src.info.memory_mb)
            users[src.datastore].append(f"{count} from {src.name}")
    if not need:
        return
    with anyio.fail_after(spec.timeouts.call_s):
        datastores = {d.ref: d for d in await vs.list_datastores()}
    for ref, nbytes in need.items():
        ds = datastores.get(ref)
        if ds is None:
            continue
        if ds.free_bytes < nbytes:
            findings.append(Finding(
                "warning", "datastore_space", f"datastore {ds.name}",
                f"{ds.free_bytes / 1024 ** 3:.1f} GiB free, the planned clones "
                f"({', '.join(users[ref])}) are estimated at {nbytes / 1024 ** 3:.1f} GiB "
                "(each its memory as swap plus 1 GiB of delta growth)",
                "free space there, lower count, or use sources on another datastore"))


# -- privileges ------------------------------------------------------------------------

async def _check_privileges(spec: FleetSpec, vs: VSphere, view: ClusterView,
                            resources: Sequence[CloneResources],
                            findings: list[Finding]) -> None:
    folder, folder_path = await fleet_folder_or_above(spec, vs)
    where: dict[Where, list[tuple[Ref, str]]] = defaultdict(list)
    if folder is not None:
        label = (f"folder {folder_path}" if folder_path == spec.folder_path else
                 f"folder {folder_path} (the fleet's folder {spec.folder_path} does not "
                 "exist yet)")
        where["folder"].append((folder, label))
    for src in view.sources.values():
        where["source"].append((src.ref, f"source {src.name}"))
        if src.info.running:
            where["running source"].append((src.ref, f"source {src.name}"))
    seen: set[Ref] = set()
    for res in resources:
        items: list[tuple[Where, Any]] = [("datastore", d) for d in res.datastores]
        items += [("network", n) for n in res.networks]
        if res.pool is not None:
            items.append(("pool", res.pool))
        for kind, named in items:
            if named.ref not in seen:
                seen.add(named.ref)
                where[kind].append((named.ref, f"{'resource pool' if kind == 'pool' else kind} "
                                               f"{named.name}"))
    wanted: dict[Ref, set[str]] = defaultdict(set)
    why: dict[tuple[Ref, str], Need] = {}
    labels: dict[Ref, str] = {}
    for need in needs_for(spec):
        for ref, label in where.get(need.on, ()):
            wanted[ref].add(need.privilege)
            labels[ref] = label
            why.setdefault((ref, need.privilege), need)
    try:
        with anyio.fail_after(spec.timeouts.call_s):
            lacking = await vs.missing_privileges(wanted)
    except VSphereError as exc:
        findings.append(Finding(
            "warning", "privileges", "vCenter",
            f"could not ask which privileges the login holds: {exc}",
            "check the privileges of docs/preflight.md by hand, or grant System.Read"))
        return
    for ref, privileges in lacking.items():
        for privilege in privileges:
            need = why[(ref, privilege)]
            findings.append(Finding(
                "warning" if need.optional else "error", "privileges", labels[ref],
                f"the login lacks {privilege} there: {need.why}",
                f"grant {privilege} on {labels[ref].split(' (')[0]} to the login's role "
                "(or on a parent, propagated)"))
