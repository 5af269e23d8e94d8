"""One provisioning run, from reading the fleet to its summary: :class:`Provisioner`.

A run reads the inventory (sources, hosts, the fleet's folder and its VMs),
reconciles what exists with the spec (removing extras first), then brings
every missing or unfinished member to ``ready``. The work is done by parts with
one job each, which share a :class:`~fleet.engine.runstate.RunContext`:

- :class:`~fleet.engine.dispatch.Dispatcher` chooses which queued job starts
  next, on which source, under the limiters;
- :class:`~fleet.engine.pipeline.Pipeline` takes a job through ``clone`` ->
  ``network`` -> ``reconnect`` -> ``ready``, each timed, with retries;
- :class:`~fleet.engine.recovery.Recovery` settles clones whose outcome is
  unknown (lost replies, timeouts) by name and labels: adopts or destroys;
- :class:`~fleet.engine.refresher.Refresher` keeps the view of sources and
  hosts current;
- :class:`~fleet.engine.stopping.StopClock` bounds a stop, and
  :class:`~fleet.engine.summary.Tally` counts for the summary.

Stopping (:meth:`Provisioner.stop`, or cancelling the task running
:meth:`Provisioner.run`) dispatches nothing more, gives clones already handed
to vCenter ``timeouts.cancel_grace_s`` to finish their pipeline in a shielded
scope, and destroys whatever did not finish, so no half-made VM is left. Work
before the first clone (reading the inventory, removing extras) gets the grace
period too. However much is in flight and however long the configured waits, a
stopped run ends within ``cancel_grace_s`` + ``cleanup_s`` of the stop.
How a clone flows through these parts: docs/architecture.md, "How a clone flows".
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import anyio

from fleet.engine.dispatch import Dispatcher
from fleet.engine.events import (
    Emitter,
    EventCallback,
    JobFailed,
    JobQueued,
    LimitChanged,
    MemberRemoved,
    RunFinished,
    RunStarted,
)
from fleet.engine.lifetime import FLEET_LABELS, expiry_labels, fleet_expiry
from fleet.engine.limits import AutoTuning, Limiters, LimitKey
from fleet.engine.pipeline import Pipeline
from fleet.engine.placement import ClusterView, PlacementPolicy
from fleet.engine.reconcile import Member, member_index, reconcile
from fleet.engine.recovery import Recovery
from fleet.engine.refresher import Refresher, load_view
from fleet.engine.runstate import NEXT_PHASE, Job, JobQueue, RunContext, Signal
from fleet.engine.shared import SharedLimits
from fleet.engine.spec import FleetSpec
from fleet.engine.stopping import StopClock
from fleet.engine.summary import RemovalSummary, Summary, Tally
from fleet.errors import ConfigError, FleetError
from fleet.vsphere.model import VSphere


@dataclass(frozen=True)
class EngineOptions:
    """Engine knobs that are not spec keys."""

    refresh_interval_s: float = 5.0  # inventory refresh (hosts, sources) during a run
    tuning: AutoTuning = field(default_factory=AutoTuning)
    policy: PlacementPolicy = field(default_factory=PlacementPolicy)
    seed: int | None = None  # placement tie-breaks and jitter; None: random
    removal_concurrency: int = 16
    #: limiters shared with other runs (``fleet serve``); None: the run makes its own from
    #: the spec's ``limits``
    shared_limits: SharedLimits | None = None
    #: more ``guestinfo.fleet.*`` labels for every new clone (e.g. the fleet's expiry);
    #: the engine's own labels win a clash
    labels: Mapping[str, str] = field(default_factory=dict)
    #: label new clones with the expiry the fleet's members already have (read in the
    #: run's own listing of the folder; ``Provisioner.expires_at`` says what it was)
    keep_expiry: bool = False
    #: an open-ended run (a warm pool's refills, docs/pools.md): no reconcile, nothing
    #: removed; it clones what :meth:`Provisioner.add` hands it until
    #: :meth:`Provisioner.close` (or a stop), and forgets jobs once they end
    stream: bool = False


#: stream mode: ended jobs are forgotten once more than twice this many are kept
STREAM_JOBS_KEPT = 1000

#: how old a view of sources and hosts may be to start a run with (``use_view``): the
#: run's refresher reads them again every ``refresh_interval_s`` anyway
VIEW_FRESH_S = 5.0


class Provisioner:
    """One provisioning run. ``await Provisioner(spec, vs).run()`` returns a :class:`Summary`.

    ``limiters`` (statistics for gauges) and ``view`` (sources, hosts) are live
    while the run goes; ``summary`` is set when it ends, also when cancelled."""

    def __init__(self, spec: FleetSpec, vsphere: VSphere, *, on_event: EventCallback | None = None,
                 run_id: str | None = None, options: EngineOptions | None = None):
        self.spec = spec
        self.vs = vsphere
        self.options = options or EngineOptions()
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.rng = random.Random(self.options.seed)
        self._on_event = on_event
        wake = Signal()
        shared = self.options.shared_limits
        self.limiters = shared.limiters if shared is not None else \
            Limiters(spec.limits, tuning=self.options.tuning, on_change=wake.set,
                     on_limit=self._limit_changed)
        self.view: ClusterView | None = None
        self.summary: Summary | None = None
        #: with ``keep_expiry``: the fleet's expiry as its members had it at the start
        self.expires_at: float | None = None
        self._checked: tuple[ClusterView, float] | None = None
        self._stop_clock = StopClock(spec.timeouts, wake.set)
        self._ctx = RunContext(spec, vsphere, self.run_id, self.rng, self.limiters, wake,
                               self._stop_clock, Tally())
        self._queue = JobQueue(wake)
        self._jobs: list[Job] = []
        #: stream mode: open until close(); set once the dispatcher takes jobs
        self._open = self.options.stream
        self.started = anyio.Event()
        self._ended = 0  # stream mode: jobs ended and forgotten

    # -- public ------------------------------------------------------------------------
    def stop(self, reason: str = "stopped") -> None:
        """Stop dispatching; in-flight clones get the grace period, then are cleaned up.
        ``run`` then returns a summary with ``cancelled`` set."""
        self._stop_clock.stop(reason)

    def add(self, index: int) -> Job:
        """Stream mode: queue a clone of member ``index`` (once :attr:`started` is set).
        The caller hears of its end through the run's events (``JobReady``,
        ``JobFailed`` with the index)."""
        if not self.options.stream or not self.started.is_set():
            raise RuntimeError("add() needs a started stream run")
        if len(self._jobs) > 2 * STREAM_JOBS_KEPT:
            # A pool's run lives for days: keep only the jobs not yet ended.
            kept = [j for j in self._jobs if j.outcome is None]
            self._ended += len(self._jobs) - len(kept)
            self._jobs = kept
        now = anyio.current_time()
        job = Job(index, self.spec.vm_name(index), "clone", now, now)
        self._jobs.append(job)
        self._ctx.emit(JobQueued, index=job.index, name=job.name, phase=job.phase)
        self._queue.ready.append(job)
        self._ctx.wake.set()
        return job

    def close(self) -> None:
        """Stream mode: take no more jobs; :meth:`run` returns once those queued end."""
        self._open = False
        self._ctx.wake.set()

    def use_view(self, view: ClusterView, read_at: float) -> None:
        """Start with ``view`` (``check_spec``'s, read at ``anyio.current_time()``
        ``read_at``) rather than reading the sources and hosts again, if it is at most
        ``VIEW_FRESH_S`` old when the run starts (a lock wait may have been long)."""
        self._checked = (view, read_at)

    def _fresh_view(self) -> ClusterView | None:
        checked, self._checked = self._checked, None
        if checked is None or anyio.current_time() - checked[1] > VIEW_FRESH_S:
            return None
        return checked[0]

    async def run(self) -> Summary:
        ctx = self._ctx
        ctx.events = emit = Emitter(self._on_event, anyio.current_time)
        t0 = anyio.current_time()
        spec = self.spec
        stop = self._stop_clock
        with stop.stoppable() as setup:
            with anyio.fail_after(spec.timeouts.call_s):
                await self.vs.server_info()
            self.view = view = self._fresh_view() or \
                await load_view(spec, self.vs, self.options.policy)
            self._check_recipes(view)
            refresher = Refresher(ctx, view, self.options.refresh_interval_s)
            for src in view.sources.values():
                if src.clones_left == 0:
                    refresher.retire(src, "chain_budget",
                                     f"chain depth {src.info.chain_depth} is at budget "
                                     f"{src.budget}")
                refresher.report(src)
            with anyio.fail_after(spec.timeouts.call_s):
                folder = await self.vs.ensure_folder(spec.folder_path)
                # A stream's caller knows the folder's members (and owns them).
                vms = [] if self.options.stream else \
                    await self.vs.list_folder_vms(folder, FLEET_LABELS)
        if setup.cancelled_caught:  # stopped while reading the inventory
            return self._finish_run(t0)
        rec = reconcile(spec, vms)
        labels = self.options.labels
        if self.options.keep_expiry:
            # Every member of the folder, as reconcile sorted them (none twice).
            self.expires_at = fleet_expiry([*rec.ready, *rec.resume, *rec.remove])
            labels = {**expiry_labels(self.expires_at), **labels}
        ctx.tally.already_ready = len(rec.ready)
        ctx.tally.blocked = dict(rec.blocked)
        emit(RunStarted, fleet=spec.name, run_id=self.run_id, requested=spec.count,
             to_create=len(rec.create), to_resume=len(rec.resume), to_remove=len(rec.remove),
             already_ready=len(rec.ready))
        now = anyio.current_time()
        for index in () if self.options.stream else rec.create:  # a stream: add() only
            self._jobs.append(Job(index, spec.vm_name(index), "clone", now, now))
        for m in rec.resume:
            self._jobs.append(Job(m.index, m.name, NEXT_PHASE[m.state], now, now,
                                  vm=m.vm.ref, source=m.source or None, adopted=True,
                                  labelled=m.state))
        for index, why in sorted(rec.blocked.items()):
            emit(JobFailed, index=index, name=spec.vm_name(index), phase="queue",
                 reason="name_taken", message=why)
        recovery = Recovery(ctx)
        pipeline = Pipeline(ctx, refresher, recovery, self._queue, folder, labels=labels)
        dispatcher = Dispatcher(ctx, view, self._queue, pipeline.run_job,
                                on_dropped=recovery.unsettled,
                                settle_lost=pipeline.settle_lost,
                                shared=self.options.shared_limits,
                                keep_open=lambda: self._open and not stop.stopping)
        try:
            if rec.remove:
                with stop.stoppable() as removing:
                    await remove_members(spec, self.vs, rec.remove, emit,
                                         concurrency=self.options.removal_concurrency,
                                         on_removed=self._count_removed,
                                         stopped=lambda: stop.stopping)
                if removing.cancelled_caught:  # stopped while removing extras
                    self._cancel_unstarted()
                    return self._finish_run(t0)
            async with anyio.create_task_group() as tg:
                tg.start_soon(refresher.run)
                for job in self._jobs:
                    emit(JobQueued, index=job.index, name=job.name, phase=job.phase)
                    if job.phase == "clone":
                        self._queue.ready.append(job)
                    else:
                        dispatcher.spawn(tg, job, None, None)
                with dispatcher.shared_wakeups():
                    self.started.set()
                    await dispatcher.run(tg)
                tg.cancel_scope.cancel()  # the refresher; every job has finished
        except BaseException:
            self.stop("cancelled")
            dispatcher.drop_queued()
            await recovery.cleanup_unsettled()
            self.summary = self._summarise(t0)
            emit(RunFinished, fleet=spec.name, run_id=self.run_id, ready=self.summary.ready,
                 failed=self.summary.failed, cancelled=True)
            raise
        dispatcher.drop_queued()
        await recovery.cleanup_unsettled()
        return self._finish_run(t0)

    # -- helpers ---------------------------------------------------------------------
    def _cancel_unstarted(self) -> None:
        for job in self._jobs:
            self._ctx.finish(job, "cancelled", job.phase, "cancelled",
                             f"not started: {self._stop_clock.reason or 'run ended'}")

    def _finish_run(self, t0: float) -> Summary:
        self.summary = self._summarise(t0)
        self._ctx.emit(RunFinished, fleet=self.spec.name, run_id=self.run_id,
                       ready=self.summary.ready, failed=self.summary.failed,
                       cancelled=self.summary.cancelled)
        return self.summary

    def _summarise(self, t0: float) -> Summary:
        return self._ctx.tally.summary(
            self.spec, self.run_id, self._jobs, self.view.sources if self.view else {},
            self.limiters, duration_s=anyio.current_time() - t0,
            cancelled=self._stop_clock.stopping)

    def _count_removed(self) -> None:
        self._ctx.tally.removed += 1

    def _limit_changed(self, key: LimitKey, old: float, new: float) -> None:
        if self._ctx.events is not None:
            self._ctx.events(LimitChanged, limiter=str(key), old=old, new=new,
                             limiter_kind=key.kind, limiter_key=key.id)

    def _check_recipes(self, view: ClusterView) -> None:
        if self.spec.network.refresh != "auto":
            return
        for src in view.sources.values():
            if src.info.guest_family not in ("linux", "windows"):
                raise ConfigError(
                    f'"auto" has no NIC refresh recipe for source {src.name} (guest family '
                    f'{src.info.guest_family}); use "linux", "windows" or "custom"',
                    key="network.refresh", source=self.spec.origin)


async def remove_members(spec: FleetSpec, vs: VSphere, members: list[Member] | tuple[Member, ...],
                         emit: Emitter, *, concurrency: int = 16,
                         on_removed: Callable[[], None] | None = None,
                         stopped: Callable[[], bool] | None = None) -> RemovalSummary:
    """Destroy members (never anything else), highest index first, a few at a time.
    ``on_removed`` counts them as they go (the caller may cancel the rest); once
    ``stopped()`` is true (the run lost its fleet's lock) no more are started."""
    t0 = anyio.current_time()
    limiter = anyio.CapacityLimiter(max(1, concurrency))
    failures: Counter[str] = Counter()
    removed = 0

    async def one(member: Member) -> None:
        nonlocal removed
        async with limiter:
            if stopped is not None and stopped():
                failures["stopped"] += 1
                return
            try:
                with anyio.fail_after(spec.timeouts.cleanup_s):
                    await vs.destroy(member.vm.ref)
            except (FleetError, TimeoutError) as exc:
                reason = exc.reason if isinstance(exc, FleetError) else "timeout"
                failures[reason] += 1
                return
            removed += 1
            if on_removed is not None:
                on_removed()
            emit(MemberRemoved, index=member.index, name=member.name, vm=member.vm.ref.id)

    async with anyio.create_task_group() as tg:
        for member in sorted(members, key=lambda m: m.index, reverse=True):
            if member_index(member.vm.labels, spec.name) is None:
                continue  # defensive: only labelled members are ever destroyed
            tg.start_soon(one, member)
    return RemovalSummary(spec.name, removed, sum(failures.values()),
                          round(anyio.current_time() - t0, 6), dict(failures))
