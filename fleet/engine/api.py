"""The engine's front door: what the CLI and the REST service call.

- :func:`provision` brings the fleet to the spec (create, resume, adopt, scale down).
- :func:`destroy` removes every member (and nothing else).
- :func:`plan` is a dry run: reconciliation, a placement table, preflight checks.
- :func:`status` reports the members and the sources as vCenter has them.

Everything takes a validated :class:`~fleet.engine.spec.FleetSpec` and any
:class:`~fleet.vsphere.model.VSphere` (the real client, or the in-memory fake).
Results are dataclasses with ``to_dict()`` for ``--json``.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio

from fleet.engine.events import Emitter, EventCallback, RemovalSummary, Summary
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
from fleet.engine.reconcile import as_member, reconcile
from fleet.engine.run import EngineOptions, Provisioner, load_view, remove_members
from fleet.engine.spec import FleetSpec
from fleet.vsphere.model import CloneRequest, Ref, VSphere


async def provision(spec: FleetSpec, vsphere: VSphere, *, on_event: EventCallback | None = None,
                    run_id: str | None = None, options: EngineOptions | None = None) -> Summary:
    """Bring the fleet to ``spec.count`` ready members; returns the run's summary.

    To stop it gracefully from elsewhere (Ctrl-C), build a :class:`Provisioner`
    and call its ``stop()``; cancelling this call also stops it cleanly (in-flight
    clones finish within ``timeouts.cancel_grace_s`` or are destroyed) and leaves
    the summary on ``Provisioner.summary`` before the cancellation propagates."""
    return await Provisioner(spec, vsphere, on_event=on_event, run_id=run_id,
                             options=options).run()


async def destroy(spec: FleetSpec, vsphere: VSphere, *, on_event: EventCallback | None = None,
                  concurrency: int = 16) -> RemovalSummary:
    """Power off and destroy every member of the fleet. VMs without the fleet's
    labels, in its folder or anywhere else, are never touched."""
    emit = Emitter(on_event, anyio.current_time)
    with anyio.fail_after(spec.timeouts.call_s):
        folder = await vsphere.find_folder(spec.folder_path)
        vms = await vsphere.list_folder_vms(folder) if folder is not None else []
    members = [m for m in (as_member(vm, spec.name) for vm in vms) if m is not None]
    summary = await remove_members(spec, vsphere, members, emit, concurrency=concurrency)
    summary.untouched = len(vms) - len(members)
    return summary


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
    """A dry run: what provisioning would do. No change was made to vCenter."""

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

    @property
    def feasible(self) -> bool:
        return self.unplaced == 0 and not self.blocked and \
            all(not r.preflight for r in self.rows if r.planned)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["feasible"] = self.feasible
        return d


async def plan(spec: FleetSpec, vsphere: VSphere, *,
               options: EngineOptions | None = None) -> Plan:
    """Reconcile and place every clone that provisioning would make, without making
    any; run vCenter's preflight (``CheckInstantClone``) once per source used.

    Placement is simulated in waves: each wave fills every host up to
    ``limits.per_host`` (8 if ``auto``), then its clones "land" (a running source
    deepens by one per clone) before the next wave, as dispatch would do."""
    opts = options or EngineOptions()
    with anyio.fail_after(spec.timeouts.call_s):
        await vsphere.server_info()
    view = await load_view(spec, vsphere, opts.policy)
    with anyio.fail_after(spec.timeouts.call_s):
        folder = await vsphere.find_folder(spec.folder_path)
        vms = await vsphere.list_folder_vms(folder) if folder is not None else []
    rec = reconcile(spec, vms)
    statuses = explain(view, Unlimited())
    start_depth = {name: s.info.chain_depth for name, s in view.sources.items()}
    planned: Counter[str] = Counter()
    first_name: dict[str, str] = {}
    unplaced, reasons = _simulate(spec, view, list(rec.create), planned, first_name,
                                  random.Random(opts.seed))
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
        if planned[name]:
            request = CloneRequest(source=src.ref, name=first_name[name],
                                   folder=folder or src.info.folder or Ref("Folder", "?"))
            with anyio.fail_after(spec.timeouts.call_s):
                row.preflight = await vsphere.check_instant_clone(request)
        rows.append(row)
    return Plan(spec.name, spec.count, len(rec.create), len(rec.resume), len(rec.remove),
                len(rec.ready), dict(rec.blocked), len(rec.foreign), unplaced, reasons, rows)


def _simulate(spec: FleetSpec, view: ClusterView, indexes: list[int], planned: Counter[str],
              first_name: dict[str, str], rng: random.Random
              ) -> tuple[int, dict[str, list[str]]]:
    per_host = spec.limits.per_host if isinstance(spec.limits.per_host, int) else 8
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
        first_name.setdefault(src.name, spec.vm_name(index))
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
        vms = await vsphere.list_folder_vms(folder) if folder is not None else []
    rec = reconcile(spec, vms)
    by_state: Counter[str] = Counter(m.state for m in rec.ready + rec.resume)
    return FleetStatus(
        fleet=spec.name, folder=spec.folder_path, requested=spec.count,
        members=rec.members, by_state=dict(by_state),
        missing=sorted(list(rec.create) + list(rec.blocked)),
        extra=sorted({m.index for m in rec.remove if m.index >= spec.count}),
        foreign=len(rec.foreign), blocked=dict(rec.blocked))
