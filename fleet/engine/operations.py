"""The engine's front door: the operations on a fleet that the CLI and the REST service call.

- :func:`provision` brings the fleet to the spec (create, resume, adopt, scale down).
- :func:`destroy` removes every member (and nothing else).
- :func:`plan` is a dry run: reconciliation, a placement table, and the checks of
  ``fleet.engine.preflight`` with a fix for each finding (docs/preflight.md).
- :func:`status` reports the members and the sources as vCenter has them.

``provision`` and ``destroy`` hold the fleet's lock while they run, so runs on one
fleet (from any machine, or the service) exclude each other; ``plan`` and
``status`` take no lock but say who holds it (docs/locking.md).

Everything takes a validated :class:`~fleet.engine.spec.FleetSpec` and any
:class:`~fleet.vsphere.model.VSphere` (the client, on a vCenter or a simulator).
Results are dataclasses with ``to_dict()`` for ``--json``.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import anyio

from fleet.engine.events import Emitter, EventCallback
from fleet.engine.lifetime import FLEET_LABELS, expiry_labels, stamp_expiry
from fleet.engine.lock import FleetLock, LockLost, LockOptions, is_claim, read_lock
from fleet.engine.pipeline import clone_request, first_state
from fleet.engine.placement import (
    ClusterView,
    Code,
    NoFit,
    SourceState,
    Unlimited,
    explain,
    make_capacity,
    place,
)
from fleet.engine.preflight import Finding, SourceCheck, preflight
from fleet.engine.reconcile import RECONCILE_LABELS, as_member, reconcile
from fleet.engine.refresher import load_view
from fleet.engine.run import EngineOptions, Provisioner, remove_members
from fleet.engine.spec import FleetSpec
from fleet.engine.summary import RemovalSummary, Summary
from fleet.errors import NotEmpty, NotFound, UnsupportedEndpoint, VSphereError
from fleet.vcenter import HOST_PROVISIONING_SLOTS
from fleet.vsphere.model import Ref, VSphere

log = logging.getLogger("fleet.engine")

#: take the fleet's lock, refuse at once if another run holds it
LOCK = LockOptions()


async def provision(spec: FleetSpec, vsphere: VSphere, *, on_event: EventCallback | None = None,
                    run_id: str | None = None, options: EngineOptions | None = None,
                    lock: LockOptions | None = LOCK,
                    expires_at: float | None = None) -> Summary:
    """Bring the fleet to ``spec.count`` ready members; returns the run's summary.

    The run holds the fleet's lock (``lock``; None: the caller holds it). LockHeld
    if another run holds it past ``lock.wait_s``; LockLost, carrying the summary,
    if the run lost it (it stopped dispatching at once: the fleet may have changed
    since, so the summary is not the fleet's state).

    ``expires_at`` (epoch seconds): the fleet's new expiry, stamped on every member
    under the lock before the run and given to every new clone; without it the
    run does what ``options.keep_expiry`` says.

    To stop it gracefully from elsewhere (Ctrl-C), build a :class:`Provisioner`
    and call its ``stop()``; cancelling this call also stops it cleanly (in-flight
    clones finish within ``timeouts.cancel_grace_s`` or are destroyed) and leaves
    the summary on ``Provisioner.summary`` before the cancellation propagates."""
    if expires_at is not None:
        opts = options or EngineOptions()
        options = replace(opts, labels={**opts.labels, **expiry_labels(expires_at)},
                          keep_expiry=False)
    provisioner = Provisioner(spec, vsphere, on_event=on_event, run_id=run_id, options=options)
    if lock is None:
        if expires_at is not None:
            await stamp_expiry(spec, vsphere, expires_at)
        return await provisioner.run()
    checked = await check_spec(spec, vsphere, options)
    checked_at = anyio.current_time()
    held = FleetLock(vsphere, spec.name, spec.folder_path, op="provision",
                     run_id=provisioner.run_id, options=lock)
    async with held:
        if expires_at is not None:
            await stamp_expiry(spec, vsphere, expires_at)
        provisioner.use_view(checked, checked_at)
        held.on_lost(lambda why: provisioner.stop(f"lost the fleet's lock: {why}"))
        summary = await provisioner.run()
    if held.lost_reason is not None:
        raise LockLost(lost_message(spec.name, held.lost_reason), summary)
    return summary


async def check_spec(spec: FleetSpec, vsphere: VSphere,
                     options: EngineOptions | None = None) -> ClusterView:
    """What a run checks before it changes anything (the endpoint can instant-clone,
    every source exists), so a wrong spec fails before the fleet's lock is taken and
    its folder made. Returns the view it read: a run that starts at once may start
    with it (``Provisioner.use_view``); a later one reads it again."""
    with anyio.fail_after(spec.timeouts.call_s):
        await vsphere.server_info()
    return await load_view(spec, vsphere, (options or EngineOptions()).policy)


def lost_message(fleet: str, reason: str) -> str:
    return (f"fleet {fleet}: this run lost the fleet's lock ({reason}); it stopped at once, "
            "and another run may have changed the fleet since")


async def destroy(spec: FleetSpec, vsphere: VSphere, *, on_event: EventCallback | None = None,
                  concurrency: int = 16, lock: LockOptions | FleetLock | None = LOCK,
                  remove_folder: bool = False) -> RemovalSummary:
    """Power off and destroy every member of the fleet. VMs without the fleet's
    labels, in its folder or anywhere else, are never touched.

    The run holds the fleet's lock: ``lock`` says how to take it, or is the lock
    the caller holds (None: no lock). With ``remove_folder`` the fleet's folder goes
    too when nothing but the lock is left in it (docs/locking.md). LockHeld and
    LockLost as for :func:`provision`."""
    emit = Emitter(on_event, anyio.current_time)
    if not isinstance(lock, LockOptions):
        return await _destroy(spec, vsphere, emit, concurrency, lock, remove_folder)
    held = FleetLock(vsphere, spec.name, spec.folder_path, op="destroy",
                     run_id=uuid.uuid4().hex[:12], options=lock, create_folder=False)
    try:
        await held.acquire()
    except NotFound:
        if held.folder is None:  # no folder, so no member: nothing to lock or destroy
            return RemovalSummary(spec.name, 0, 0, 0.0)
        raise
    async with held:
        return await _destroy(spec, vsphere, emit, concurrency, held, remove_folder)


async def _destroy(spec: FleetSpec, vsphere: VSphere, emit: Emitter, concurrency: int,
                   held: FleetLock | None, remove_folder: bool) -> RemovalSummary:
    with anyio.fail_after(spec.timeouts.call_s):
        folder = held.folder if held is not None else await vsphere.find_folder(spec.folder_path)
        vms = await vsphere.list_folder_vms(folder, FLEET_LABELS) if folder is not None else []
    members = [m for m in (as_member(vm, spec.name) for vm in vms) if m is not None]
    summary = await remove_members(
        spec, vsphere, members, emit, concurrency=concurrency,
        stopped=None if held is None else (lambda: held.lost_reason is not None))
    summary.untouched = len(vms) - len(members)
    if held is not None and held.lost_reason is not None:
        raise LockLost(lost_message(spec.name, held.lost_reason), summary)
    if remove_folder and folder is not None and not summary.failed and not summary.untouched:
        await remove_fleet_folder(spec, vsphere, folder, held)
    return summary


async def remove_fleet_folder(spec: FleetSpec, vsphere: VSphere, folder: Ref,
                              held: FleetLock | None) -> bool:
    """Destroy the fleet's (emptied) folder if it holds nothing but the lock ``held``
    (and claims of runs taking the lock).

    vCenter's Destroy_Task on a folder destroys what is inside, so: the folder's
    child folders are checked here (only our lock), and the client reads the whole
    subtree again right before the Destroy_Task (NotEmpty if a VM is there). What
    is left is one round trip in which a VM could arrive from outside the lock;
    docs/locking.md says why that VM is not lost. True when the folder is gone."""
    with anyio.fail_after(spec.timeouts.call_s):
        children = await vsphere.list_child_folders(folder)
    ours = held.lock_ref if held is not None else None
    # Claims (locks in the making, docs/locking.md) hold a record and nothing else, and
    # none can become the lock while this run holds it: they go with the folder.
    others = [name for name, ref in children
              if ref != ours and not (ours is not None and is_claim(name))]
    if others:
        log.info("fleet %s: folder %s kept: it holds %s", spec.name, spec.folder_path,
                 ", ".join(others[:5]))
        return False
    if held is not None:
        held.stop_keeping()  # the lock goes with the folder; a renewal would find it gone
        if not held.valid:
            return False
    try:
        with anyio.fail_after(spec.timeouts.call_s):
            await vsphere.destroy_folder(folder)
    except NotEmpty as exc:
        log.info("fleet %s: folder %s kept: %s", spec.name, spec.folder_path, exc)
        return False
    except NotFound:
        pass
    if held is not None:
        held.forget()
    log.info("fleet %s: folder %s removed", spec.name, spec.folder_path)
    return True


@dataclass
class PlanRow:
    """One source in the placement table."""

    source: str
    host: str | None
    frozen: bool
    power_state: str
    chain_depth: int
    budget: int
    clones_left: int | None  # None: unlimited (frozen)
    planned: int  # clones the dry run placed here
    final_depth: int  # the source's chain depth after them
    status: str  # "ok" or why placement would reject it
    preflight: list[str] = field(default_factory=list)  # CheckInstantClone problems


@dataclass
class Plan:
    """A dry run: what provisioning would do, and what would stop it (``findings``, each
    with its fix: docs/preflight.md). No change was made to vCenter."""

    fleet: str
    requested: int
    create: int
    resume: int
    remove: int
    ready: int
    blocked: dict[int, str]
    foreign: int
    unplaced: int  # clones no source could take (budgets spent, hosts down...)
    unplaced_reasons: dict[str, list[str]]
    rows: list[PlanRow]
    lock: dict[str, Any] | None = None  # who holds the fleet's lock now (LockView.to_dict)
    api_version: str | None = None  # the endpoint's (None: it cannot instant-clone)
    findings: list[Finding] = field(default_factory=list)
    sources: list[SourceCheck] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def feasible(self) -> bool:
        return self.unplaced == 0 and not self.blocked and not self.errors and \
            all(not r.preflight for r in self.rows if r.planned)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["feasible"] = self.feasible
        return d


async def plan(spec: FleetSpec, vsphere: VSphere, *,
               options: EngineOptions | None = None) -> Plan:
    """Reconcile and place every clone that provisioning would make, without making
    any; check what would stop a run (:func:`fleet.engine.preflight.preflight`), and
    have vCenter check (``CheckInstantClone_Task``) the request a run would send for
    the first clone of each source used, in the fleet's folder when it exists.

    Placement is simulated in waves: each wave fills every host up to
    ``limits.per_host`` (8 if ``auto``), then its clones "land" (a running source
    deepens by one per clone) before the next wave, as dispatch would do."""
    opts = options or EngineOptions()
    findings: list[Finding] = []
    api_version: str | None = None
    try:
        with anyio.fail_after(spec.timeouts.call_s):
            api_version = (await vsphere.server_info()).api_version
    except UnsupportedEndpoint as exc:
        findings.append(Finding(
            "error", "api_version", "vCenter", str(exc),
            "point the spec's [vcenter] at a vCenter Server 6.7 or later (not an ESXi host)"))
    view = await load_view(spec, vsphere, opts.policy)
    with anyio.fail_after(spec.timeouts.call_s):
        folder = await vsphere.find_folder(spec.folder_path)
        vms = await vsphere.list_folder_vms(folder, FLEET_LABELS) if folder is not None else []
    rec = reconcile(spec, vms)
    statuses = explain(view, Unlimited())
    start_depth = {name: s.info.chain_depth for name, s in view.sources.items()}
    planned: Counter[str] = Counter()
    first_index: dict[str, int] = {}
    unplaced, reasons = _simulate(spec, view, list(rec.create), planned, first_index,
                                  random.Random(opts.seed))
    checked = await preflight(spec, vsphere, view, planned=planned, members=rec.ready)
    findings += checked.findings
    run_id = f"plan-{uuid.uuid4().hex[:7]}"
    rows: list[PlanRow] = []
    for name, src in view.sources.items():
        status = statuses[name]
        row = PlanRow(
            source=name, host=src.info.host_name, frozen=src.info.frozen,
            power_state=src.info.power_state, chain_depth=start_depth[name],
            budget=src.budget,
            clones_left=(None if src.info.frozen and src.info.powered_on else
                         max(0, src.budget - start_depth[name])),
            planned=planned[name], final_depth=src.info.chain_depth,
            status="ok" if status.code is Code.SUCCESS else status.reason)
        if planned[name] and api_version is not None:
            index = first_index[name]
            request = clone_request(
                spec, index=index, name=spec.vm_name(index), src=src,
                folder=folder or src.info.folder or Ref("Folder", "?"), run_id=run_id,
                labels=opts.labels, state=first_state(spec))
            try:
                with anyio.fail_after(spec.timeouts.call_s):
                    row.preflight = await vsphere.check_instant_clone(request)
            except VSphereError as exc:
                row.preflight = [str(exc)]
            for problem in row.preflight:
                findings.append(Finding(
                    "error", "instant_clone", f"source {name}",
                    f"vCenter refuses a test clone with the request a run sends: {problem}",
                    "fix what vCenter names; `fleet plan` checks again"))
        rows.append(row)
    held = await read_lock(vsphere, folder) if folder is not None else None
    return Plan(spec.name, spec.count, len(rec.create), len(rec.resume), len(rec.remove),
                len(rec.ready), dict(rec.blocked), len(rec.foreign), unplaced, reasons, rows,
                lock=held.to_dict() if held is not None else None, api_version=api_version,
                findings=findings, sources=checked.sources)


def _simulate(spec: FleetSpec, view: ClusterView, indexes: list[int], planned: Counter[str],
              first_index: dict[str, int], rng: random.Random
              ) -> tuple[int, dict[str, list[str]]]:
    per_host = spec.limits.per_host if isinstance(spec.limits.per_host, int) \
        else HOST_PROVISIONING_SLOTS
    per_source = spec.limits.per_running_source \
        if isinstance(spec.limits.per_running_source, int) else 1

    def blocked(src: SourceState) -> str | None:
        host = view.host_of(src)
        if host is not None and host.in_flight >= per_host:
            return f"host {host.info.name} full"
        if src.running and src.in_flight >= per_source:
            return "source busy"
        return None

    capacity = make_capacity(blocked)
    wave: list[SourceState] = []
    pending = list(indexes)
    while pending:
        try:
            decision = place(view, capacity, rng)
        except NoFit as exc:
            if exc.may_fit_later and wave:
                for src in wave:  # the wave lands
                    view.unreserve(src, made=True)
                wave.clear()
                continue
            return len(pending), {k: list(v) for k, v in exc.reasons.items()}
        index = pending.pop(0)
        src = decision.source
        view.reserve(src)
        wave.append(src)
        planned[src.name] += 1
        first_index.setdefault(src.name, index)
    for src in wave:
        view.unreserve(src, made=True)
    return 0, {}


@dataclass
class FleetStatus:
    """The fleet as vCenter has it now."""

    fleet: str
    folder: str
    requested: int
    members: int
    by_state: dict[str, int]
    missing: list[int]
    extra: list[int]  # member indexes at or above count (a scale-down would remove them)
    foreign: int  # VMs in the folder that are not members
    blocked: dict[int, str]
    lock: dict[str, Any] | None = None  # who holds the fleet's lock now (LockView.to_dict)

    @property
    def ready(self) -> int:
        return self.by_state.get("ready", 0)

    @property
    def complete(self) -> bool:
        return self.ready == self.requested and not self.extra

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ready"] = self.ready
        d["complete"] = self.complete
        return d


async def status(spec: FleetSpec, vsphere: VSphere) -> FleetStatus:
    """Count members by state, list missing and extra indexes. Changes nothing."""
    with anyio.fail_after(spec.timeouts.call_s):
        folder = await vsphere.find_folder(spec.folder_path)
        # The labels reconciliation decides on: half the bytes of every label.
        vms = (await vsphere.list_folder_vms(folder, RECONCILE_LABELS)
               if folder is not None else [])
    rec = reconcile(spec, vms)
    held = await read_lock(vsphere, folder) if folder is not None else None
    by_state: Counter[str] = Counter(m.state for m in rec.ready + rec.resume)
    return FleetStatus(
        fleet=spec.name, folder=spec.folder_path, requested=spec.count,
        members=rec.members, by_state=dict(by_state),
        missing=sorted(list(rec.create) + list(rec.blocked)),
        extra=sorted({m.index for m in rec.remove if m.index >= spec.count}),
        foreign=len(rec.foreign), blocked=dict(rec.blocked),
        lock=held.to_dict() if held is not None else None)
