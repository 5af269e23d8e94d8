"""Provisioning: reconcile, dispatch under limits, and the per-clone pipeline.

:class:`Provisioner` owns one run. It reads the fleet's folder, reconciles it
with the spec (removing extras first), then dispatches one job per missing or
unfinished member through an anyio task group:

``queue`` (wait for placement and limiter tokens) -> ``clone`` (InstantClone,
NICs disconnected) -> ``network`` (NIC refresh recipe in the guest) ->
``reconnect`` (NICs connected) -> ``ready`` (guest IP or guestinfo flag).

Each phase is timed and has a deadline (``anyio.fail_after``). Transient faults
are retried with exponential backoff and jitter; permanent ones are reported.
A fault whose scope is ``source`` or ``host`` takes that source or host out of
the run and sends the job back to placement, as does a clone that did not find
the fleet's folder (vCenter lost it: the folder is looked up again, once). After
any clone attempt whose outcome is unknown (a timeout, a lost reply, a task
vCenter forgot) the engine looks the name up and adopts the VM if it carries
this job's labels, so it never makes a second VM for one index and never leaks
the first; a ``DuplicateName`` is adopted the same way, or reported (never
touched) if the holder is not a member. A label write that failed is checked
on the VM before the job is called failed: it may have landed without a reply.

Stopping (:meth:`Provisioner.stop`, or cancelling the task running
:meth:`Provisioner.run`) dispatches nothing more, gives clones already handed
to vCenter ``timeouts.cancel_grace_s`` to finish their pipeline in a shielded
scope, and destroys whatever did not finish, so no half-made VM is left. Work
before the first clone (reading the inventory, removing extras) gets the grace
period too. However much is in flight and however long the configured waits, a
stopped run ends within ``cancel_grace_s`` + ``cleanup_s`` of the stop: every
shielded cleanup scope is registered and clamped to that moment
(:meth:`Provisioner._bounded`).
"""

from __future__ import annotations

import contextlib
import math
import random
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from fleet.engine.events import (
    Emitter,
    EventCallback,
    HostExcluded,
    JobAdopted,
    JobCleanedUp,
    JobFailed,
    JobQueued,
    JobReady,
    JobReplaced,
    JobRetried,
    JobStarted,
    LimitChanged,
    MemberRemoved,
    PhaseDone,
    RunFinished,
    RunStarted,
    SourceRetired,
    SourceStateChanged,
)
from fleet.engine.limits import AutoTuning, Lease, Limiters, LimitKey
from fleet.engine.placement import (
    ClusterView,
    HostState,
    NoFit,
    PlacementPolicy,
    SourceState,
    place,
)
from fleet.engine.reconcile import (
    LABEL_STATE,
    Member,
    MemberState,
    as_member,
    labels,
    member_index,
    reconcile,
)
from fleet.engine.shared import SharedLimits
from fleet.engine.sources import clone_config, resolve_sources
from fleet.engine.spec import FleetSpec
from fleet.engine.summary import PHASES, PhaseStats, RemovalSummary, Summary, source_summary
from fleet.errors import (
    ConfigError,
    DuplicateName,
    FleetError,
    NotAuthenticated,
    NotDelivered,
    NotFound,
    RequestTimeout,
    VSphereError,
)
from fleet.vsphere import recipes
from fleet.vsphere.model import CloneRequest, GuestProgram, Ref, TaskHandle, VmInfo, VSphere

Phase = Literal["clone", "network", "ready", "done"]
Outcome = Literal["ready", "failed", "cancelled"]
_NEXT_PHASE: dict[MemberState, Phase] = {"cloned": "network", "network": "ready",
                                         "ready": "done"}


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


@dataclass(eq=False)
class Job:
    """One member to bring to ``ready``."""

    index: int
    name: str
    phase: Phase
    queued_at: float
    started_at: float
    vm: Ref | None = None
    source: str | None = None
    attempt: int = 0  # attempts in the current phase
    replaced: int = 0  # trips back to placement after a source/host was taken out
    not_before: float = 0.0
    queue_s: float = 0.0
    task: TaskHandle | None = None
    adopted: bool = False
    labelled: MemberState = "cloned"  # the state label the VM carries now
    submit_started: float | None = None  # a submit call is under way since then
    lost_submit_at: float | None = None  # a submit whose reply never came (it may yet clone)
    outcome: Outcome | None = None
    reason: str | None = None


class _PhaseFailed(Exception):
    def __init__(self, phase: str, reason: str, message: str, error: VSphereError | None = None):
        super().__init__(message)
        self.phase = phase
        self.reason = reason
        self.message = message
        self.error = error


class _Signal:
    """Wake the dispatcher: set from anywhere (synchronously), awaited with a timeout."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self._pending = False

    def set(self) -> None:
        self._pending = True
        if self._event is not None:
            self._event.set()

    async def wait(self, timeout_s: float) -> None:
        if self._pending:
            self._pending = False
            await anyio.lowlevel.checkpoint()
            return
        self._event = anyio.Event()
        with anyio.move_on_after(max(0.0, timeout_s)):
            await self._event.wait()
        self._event = None
        self._pending = False


def _backoff_s(spec: FleetSpec, attempt: int, rng: random.Random) -> float:
    r = spec.retries
    delay: float = min(r.backoff_max_s, r.backoff_base_s * 2.0 ** max(0, attempt - 1))
    return delay * (1.0 - r.jitter * rng.random())


async def load_view(spec: FleetSpec, vs: VSphere, policy: PlacementPolicy | None = None
                    ) -> ClusterView:
    """Resolve the spec's sources and the hosts into a placement view.

    A source vCenter does not know, or one VM named twice, is a :class:`ConfigError`
    naming the entries (:func:`~fleet.engine.sources.resolve_sources`)."""
    infos = await resolve_sources(spec, vs)
    with anyio.fail_after(spec.timeouts.call_s):
        hosts = await vs.list_hosts()
        datastores = await vs.list_datastores()
    sources = {s.name: SourceState(s.name, info, spec.budget_for(s.name))
               for s, info in zip(spec.sources, infos, strict=True)}
    return ClusterView(sources, {h.ref: HostState(h) for h in hosts},
                       policy or PlacementPolicy(),
                       datastore_names={d.ref: d.name for d in datastores})


class _PlacementCapacity:
    """The limiters as placement's ``FreeSlots`` sees them during one dispatch round.

    Each limiter is asked once per round, not once per source and placement: asking
    reads its statistics, which copy the list of its holders, and a round places
    dozens of clones (every task the last update finished frees a slot) over dozens
    of sources. Between awaits only the dispatcher's own leases change the limiters,
    so :meth:`fresh` forgets every answer at the start of a round and :meth:`took`
    those of the limiters a lease just took tokens from."""

    def __init__(self, limiters: Limiters,
                 keys: Callable[[SourceState], tuple[LimitKey, ...]]) -> None:
        self._limiters = limiters
        self._keys = keys  # interned: one object per limiter
        self._known: dict[int, str | None] = {}  # by id(key)

    def fresh(self) -> None:
        self._known.clear()

    def took(self, keys: tuple[LimitKey, ...]) -> None:
        for key in keys:
            self._known.pop(id(key), None)

    def blocked(self, source: SourceState) -> str | None:
        # What Limiters.blocked_by(keys) answers: the first key without a free token.
        known = self._known
        for key in self._keys(source):
            kid = id(key)
            if kid in known:
                why = known[kid]
            else:
                why = known[kid] = self._limiters.blocked_by((key,))
            if why is not None:
                return why
        return None


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
        self._wake = _Signal()
        shared = self.options.shared_limits
        self.limiters = shared.limiters if shared is not None else \
            Limiters(spec.limits, tuning=self.options.tuning, on_change=self._wake.set,
                     on_limit=self._limit_changed)
        self.view: ClusterView | None = None
        self.summary: Summary | None = None
        self._emit: Emitter | None = None
        self._folder: Ref | None = None
        self._queue: deque[Job] = deque()
        self._delayed: list[Job] = []
        self._jobs: list[Job] = []
        self._active = 0
        self._shields: set[anyio.CancelScope] = set()
        self._cleanups: set[anyio.CancelScope] = set()  # clamped to _end_by on stop
        self._setup: anyio.CancelScope | None = None  # before dispatch: gets the grace
        self._end_by = math.inf  # a stopped run is over by then (grace + cleanup)
        self._stopping = False
        self._stop_reason = ""
        self._phase_s: dict[str, list[float]] = {p: [] for p in PHASES}
        self._created = 0
        self._removed = 0
        self._already_ready = 0
        self._blocked: dict[int, str] = {}
        self._failure_messages: dict[str, str] = {}  # reason -> the first message given
        self._unsettled: list[Job] = []
        self._key_cache: dict[str, tuple[VmInfo, tuple[LimitKey, ...]]] = {}
        self._interned_keys: dict[LimitKey, LimitKey] = {}
        self._folder_lock = anyio.Lock()
        self._lost_folders: set[str] = set()  # ids of the fleet's folder vCenter lost

    # -- public ------------------------------------------------------------------------
    def stop(self, reason: str = "stopped") -> None:
        """Stop dispatching; in-flight clones get the grace period, then are cleaned up.
        ``run`` then returns a summary with ``cancelled`` set."""
        if not self._stopping:
            self._stopping = True
            self._stop_reason = reason
            t = self.spec.timeouts
            self._end_by = anyio.current_time() + t.cancel_grace_s + t.cleanup_s
            self._arm_grace()
            self._wake.set()

    async def run(self) -> Summary:
        self._emit = emit = Emitter(self._on_event, anyio.current_time)
        t0 = anyio.current_time()
        spec = self.spec
        with self._stoppable() as setup:
            with anyio.fail_after(spec.timeouts.call_s):
                await self.vs.server_info()
            self.view = view = await load_view(spec, self.vs, self.options.policy)
            self._check_recipes(view)
            for src in view.sources.values():
                if src.clones_left == 0:
                    self._retire(src, "chain_budget",
                                 f"chain depth {src.info.chain_depth} is at budget {src.budget}")
                self._source_state(src)
            with anyio.fail_after(spec.timeouts.call_s):
                self._folder = await self.vs.ensure_folder(spec.folder_path)
                vms = await self.vs.list_folder_vms(self._folder)
        if setup.cancelled_caught:  # stopped while reading the inventory
            return self._finish_run(t0)
        rec = reconcile(spec, vms)
        self._already_ready = len(rec.ready)
        self._blocked = dict(rec.blocked)
        emit(RunStarted, fleet=spec.name, run_id=self.run_id, requested=spec.count,
             to_create=len(rec.create), to_resume=len(rec.resume), to_remove=len(rec.remove),
             already_ready=len(rec.ready))
        now = anyio.current_time()
        for index in rec.create:
            self._jobs.append(Job(index, spec.vm_name(index), "clone", now, now))
        for m in rec.resume:
            self._jobs.append(Job(m.index, m.name, _NEXT_PHASE[m.state], now, now,
                                  vm=m.vm.ref, source=m.source or None, adopted=True,
                                  labelled=m.state))
        for index, why in sorted(rec.blocked.items()):
            emit(JobFailed, index=index, name=spec.vm_name(index), phase="queue",
                 reason="name_taken", message=why)
        try:
            if rec.remove:
                with self._stoppable() as removing:
                    await remove_members(spec, self.vs, rec.remove, emit,
                                         concurrency=self.options.removal_concurrency,
                                         on_removed=self._count_removed,
                                         stopped=lambda: self._stopping)
                if removing.cancelled_caught:  # stopped while removing extras
                    self._cancel_unstarted()
                    return self._finish_run(t0)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._refresher)
                for job in self._jobs:
                    emit(JobQueued, index=job.index, name=job.name, phase=job.phase)
                    if job.phase == "clone":
                        self._queue.append(job)
                    else:
                        self._spawn(tg, job, None, None)
                with self._shared_wakeups():
                    await self._dispatch(tg)
                tg.cancel_scope.cancel()  # the refresher; every job has finished
        except BaseException:
            self.stop("cancelled")
            self._drop_queued()
            await self._cleanup_unsettled()
            self.summary = self._summarise(t0)
            emit(RunFinished, fleet=spec.name, run_id=self.run_id, ready=self.summary.ready,
                 failed=self.summary.failed, cancelled=True)
            raise
        self._drop_queued()
        await self._cleanup_unsettled()
        return self._finish_run(t0)

    def _cancel_unstarted(self) -> None:
        for job in self._jobs:
            self._finish(job, "cancelled", job.phase, "cancelled",
                         f"not started: {self._stop_reason or 'run ended'}")

    def _finish_run(self, t0: float) -> Summary:
        self.summary = self._summarise(t0)
        self.emit(RunFinished, fleet=self.spec.name, run_id=self.run_id,
                  ready=self.summary.ready, failed=self.summary.failed,
                  cancelled=self.summary.cancelled)
        return self.summary

    def _count_removed(self) -> None:
        self._removed += 1

    @contextlib.contextmanager
    def _stoppable(self) -> Iterator[anyio.CancelScope]:
        """A scope for work before dispatch: a stop gives it the grace period, then
        cancels it (``cancelled_caught``: the run ends there)."""
        scope = anyio.CancelScope()
        if self._stopping:
            scope.cancel()
        self._setup = scope
        try:
            with scope:
                yield scope
        finally:
            self._setup = None

    @contextlib.contextmanager
    def _bounded(self, timeout_s: float, *, shield: bool = False
                 ) -> Iterator[anyio.CancelScope]:
        """A scope for cleanup (``shield``: not cancelled with its caller): at most
        ``timeout_s``, and never past the end of a stopped run (stop time +
        ``cancel_grace_s`` + ``cleanup_s``), whenever the stop comes."""
        scope = anyio.CancelScope(shield=shield,
                                  deadline=min(anyio.current_time() + timeout_s, self._end_by))
        self._cleanups.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._cleanups.discard(scope)

    # -- helpers ---------------------------------------------------------------------
    @property
    def emit(self) -> Emitter:
        assert self._emit is not None
        return self._emit

    def _shared_wakeups(self) -> contextlib.AbstractContextManager[None]:
        """While dispatching, capacity other runs free wakes this one too (fairly)."""
        shared = self.options.shared_limits
        if shared is None:
            return contextlib.nullcontext()
        assert self.view is not None
        view = self.view
        return shared.attach(self._wake.set,
                             lambda: sum(s.in_flight for s in view.sources.values()))

    def _limit_changed(self, key: LimitKey, old: float, new: float) -> None:
        if self._emit is not None:
            self._emit(LimitChanged, limiter=str(key), old=old, new=new)

    def _check_recipes(self, view: ClusterView) -> None:
        if self.spec.network.refresh != "auto":
            return
        for src in view.sources.values():
            if src.info.guest_family not in ("linux", "windows"):
                raise ConfigError(
                    f'"auto" has no NIC refresh recipe for source {src.name} (guest family '
                    f'{src.info.guest_family}); use "linux", "windows" or "custom"',
                    key="network.refresh", source=self.spec.origin)

    def _arm_grace(self) -> None:
        deadline = anyio.current_time() + self.spec.timeouts.cancel_grace_s
        for scope in self._shields:
            scope.deadline = min(scope.deadline, deadline)
        if self._setup is not None:
            self._setup.deadline = min(self._setup.deadline, deadline)
        for scope in self._cleanups:
            scope.deadline = min(scope.deadline, self._end_by)

    def _retire(self, src: SourceState, reason: str, message: str) -> None:
        assert self.view is not None
        if self.view.retire(src.name, f"{reason}: {message}"):
            self.emit(SourceRetired, source=src.name, reason=reason,
                      chain_depth=src.info.chain_depth, message=message)
            self._wake.set()

    def _source_state(self, src: SourceState) -> None:
        self.emit(SourceStateChanged, source=src.name, host=src.info.host_name or "",
                  chain_depth=src.info.chain_depth, clones_left=src.clones_left,
                  frozen=src.info.frozen, powered_on=src.info.powered_on)

    def _update_source(self, src: SourceState, info: VmInfo, *,
                       before: VmInfo | None = None) -> None:
        """Take a new view of a source (and retire it if its chain is at the budget)."""
        old = before or src.info
        src.info = info
        if (old.chain_depth, old.frozen, old.power_state) != \
                (info.chain_depth, info.frozen, info.power_state):
            self._source_state(src)
        if src.info.chain_depth + 1 > src.budget:  # chains only grow: this is final
            self._retire(src, "chain_budget", f"chain budget {src.budget} reached")

    def _keys(self, src: SourceState) -> tuple[LimitKey, ...]:
        """The limiters a clone of ``src`` needs. Placement asks for every source at every
        placement, so they are worked out again only when the source's view changes."""
        cached = self._key_cache.get(src.name)
        if cached is not None and cached[0] is src.info:
            return cached[1]
        assert self.view is not None
        host = src.info.host
        ds = src.datastore
        # Names, not ids: these keys label gauges and the summary's limits.
        keys = self.limiters.keys_for(
            host=src.info.host_name or (host.id if host else "?"),
            datastore=self.view.datastore_names.get(ds, ds.id) if ds else None,
            running_source=src.name if src.running else None)
        # One object per limiter, so _PlacementCapacity can tell them apart by identity.
        keys = tuple(self._interned_keys.setdefault(k, k) for k in keys)
        self._key_cache[src.name] = (src.info, keys)
        return keys

    def _record(self, job: Job, phase: str, duration_s: float) -> None:
        self._phase_s[phase].append(duration_s)
        self.emit(PhaseDone, index=job.index, name=job.name, phase=phase,
                  duration_s=round(duration_s, 6))

    def _finish(self, job: Job, outcome: Outcome, phase: str, reason: str = "",
                message: str = "") -> None:
        if job.outcome is not None:
            return
        job.outcome = outcome
        job.reason = reason or None
        if outcome == "ready":
            self.emit(JobReady, index=job.index, name=job.name, source=job.source or "",
                      duration_s=round(anyio.current_time() - job.started_at, 6))
        else:
            self._failure_messages.setdefault(reason or "unfinished", message)
            self.emit(JobFailed, index=job.index, name=job.name, phase=phase, reason=reason,
                      message=message)
        self._wake.set()

    def _drop_queued(self) -> None:
        for job in list(self._queue) + self._delayed:
            if job.outcome is None:
                if job.lost_submit_at is not None:
                    self._unsettled.append(job)
                self._finish(job, "cancelled", "queue", "cancelled",
                             f"not started: {self._stop_reason or 'run ended'}")
        self._queue.clear()
        self._delayed.clear()

    async def _cleanup_unsettled(self) -> None:
        """Jobs dropped while waiting to retry an attempt whose reply was lost: a VM it
        made after all is found by name and destroyed (shielded, bounded)."""
        jobs, self._unsettled = self._unsettled, []
        if not jobs:
            return
        with self._bounded(math.inf, shield=True):
            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(self._destroy_found, job)

    async def _destroy_found(self, job: Job) -> None:
        with self._bounded(self.spec.timeouts.cleanup_s), contextlib.suppress(VSphereError):
            await self._reap(job)

    def _requeue(self, job: Job, delay_s: float) -> None:
        job.phase = "clone"
        job.task = None
        job.queued_at = anyio.current_time()
        job.not_before = job.queued_at + delay_s
        if delay_s > 0:
            self._delayed.append(job)
        else:
            self._queue.appendleft(job)  # it has waited its turn already
        self._wake.set()

    # -- dispatch ----------------------------------------------------------------------
    async def _dispatch(self, tg: TaskGroup) -> None:
        """Place queued jobs while limiters have room; return when every job is done."""
        assert self.view is not None
        capacity = _PlacementCapacity(self.limiters, self._keys)
        while True:
            capacity.fresh()  # tokens came back, limits moved, others took some meanwhile
            now = anyio.current_time()
            self.view.prune_phantoms(now)
            if self._stopping:
                self._drop_queued()
            if self._delayed:
                due = [j for j in self._delayed if j.not_before <= now]
                if due:
                    self._delayed = [j for j in self._delayed if j.not_before > now]
                    self._queue.extend(due)
            while self._queue and not self._stopping:
                job = self._queue[0]
                if now - job.queued_at > self.spec.timeouts.queue_s:
                    self._queue.popleft()
                    self._finish(job, "failed", "queue", "queue_timeout",
                                 f"no source could take it for {self.spec.timeouts.queue_s}s")
                    continue
                try:
                    decision = place(self.view, capacity, self.rng)
                except NoFit as exc:
                    if exc.may_fit_later:
                        break
                    self._queue.popleft()
                    self._finish(job, "failed", "queue", "unschedulable", str(exc))
                    continue
                src = decision.source
                keys = self._keys(src)
                lease = self.limiters.try_acquire(keys, job)
                if lease is None:  # someone is already waiting for these tokens
                    break
                capacity.took(keys)
                self._queue.popleft()
                job.queue_s += now - job.queued_at
                self.view.reserve(src)
                self._spawn(tg, job, src, lease)
            if not self._queue and not self._delayed and self._active == 0:
                return
            timeout = 1.0
            if self._delayed:
                timeout = min(timeout, min(j.not_before for j in self._delayed) - now)
            if self._queue:
                timeout = min(timeout, self._queue[0].queued_at + self.spec.timeouts.queue_s
                              - now + 0.001)
            try:
                await self._wake.wait(timeout)
            except anyio.get_cancelled_exc_class():
                # Ctrl-C or the caller's deadline: in-flight clones get the grace period.
                self.stop("cancelled")
                raise

    def _spawn(self, tg: TaskGroup, job: Job, src: SourceState | None, lease: Lease | None
               ) -> None:
        self._active += 1
        scope = anyio.CancelScope(shield=True)
        if self._stopping:
            scope.deadline = anyio.current_time() + self.spec.timeouts.cancel_grace_s
        self._shields.add(scope)
        tg.start_soon(self._run_job, job, src, lease, scope)

    async def _run_job(self, job: Job, src: SourceState | None, lease: Lease | None,
                       scope: anyio.CancelScope) -> None:
        try:
            with scope:
                if src is not None and lease is not None:
                    await self._clone_phase(job, src, lease)
                if job.outcome is None and job.phase in ("network", "ready", "done"):
                    await self._post_clone(job)
            if scope.cancelled_caught or (self._stopping and job.outcome is None
                                          and job.phase != "clone"):
                await self._cleanup(job)
        finally:
            self._shields.discard(scope)
            self._active -= 1
            self._wake.set()

    # -- the clone phase -----------------------------------------------------------
    def _clone_request(self, job: Job, src: SourceState) -> CloneRequest:
        assert self._folder is not None
        spec = self.spec
        state: MemberState = "ready" if self._no_post_phases() else "cloned"
        extra = spec.guestinfo_for(index=job.index, name=job.name, source=src.name,
                                   run_id=self.run_id)
        extra.update(self.options.labels)
        extra.update(labels(fleet=spec.name, index=job.index, run_id=self.run_id,
                            source=src.name, state=state))
        # Exactly this fleet's labels: nothing inherited from a source that is a VM of
        # another fleet (its expiry!), nor a readiness flag its guest did not set.
        readiness = spec.readiness.guestinfo_key if spec.readiness.wait_for == "guestinfo" \
            else None
        extra = clone_config(extra, src.info, readiness_key=readiness)
        connect: Literal["connect", "disconnect"] = \
            "disconnect" if spec.network.disconnect_at_clone else "connect"
        return CloneRequest(source=src.ref, name=job.name, folder=self._folder,
                            extra_config=extra, nic_connect=connect)

    def _no_post_phases(self) -> bool:
        net = self.spec.network
        return net.refresh == "none" and not (net.disconnect_at_clone and net.reconnect) and \
            self.spec.readiness.wait_for == "none"

    async def _clone_phase(self, job: Job, src: SourceState, lease: Lease) -> None:
        assert self.view is not None
        job.attempt += 1
        host = self.view.host_of(src)
        self.emit(JobStarted, index=job.index, name=job.name, source=src.name,
                  host=host.info.name if host else "?", attempt=job.attempt)
        t0 = anyio.current_time()
        made: Ref | None = None
        error: BaseException | None = None
        if self._stopping:  # stopped between placement and here: hand vCenter nothing
            self.limiters.release(lease)
            self.view.unreserve(src, made=False)
            self._finish(job, "cancelled", "queue", "cancelled", "not started: stopping")
            return
        try:
            with anyio.fail_after(self.spec.timeouts.clone_s):
                job.submit_started = anyio.current_time()
                job.task = await self.vs.start_instant_clone(self._clone_request(job, src))
                job.submit_started = None
                lease.submitted(job.task, anyio.current_time())
                made = await job.task.wait()
        except (VSphereError, TimeoutError) as exc:
            error = exc
            if job.task is None:
                if (not isinstance(exc, VSphereError) or exc.transient) and \
                        not isinstance(exc, NotDelivered | NotAuthenticated):
                    # The request may have reached vCenter and be cloning without us.
                    job.lost_submit_at = job.submit_started
                job.submit_started = None
            if job.task is not None and not (isinstance(exc, VSphereError)
                                             and not exc.transient):
                # The task may still be running in vCenter: keep its tokens until it ends,
                # or fleet would hand vCenter more than the limits allow.
                with self._bounded(math.inf, shield=True):
                    await self._settle_task(job.task)
        finally:
            self._feed_limiters(job, lease, made is not None)
            info: VmInfo | None = None
            before = src.info
            if src.running and made is None:
                # A failed attempt may or may not have deepened the chain (the stun comes
                # first; a lost reply hides a made clone): read it while this attempt
                # still holds the source's token and its reservation, which placement
                # counts, so the read sees no other clone of the source (one at a time)
                # and none can slip past the budget meanwhile. Shielded: the depth must
                # be right even if this job is being cancelled.
                with self._bounded(math.inf, shield=True):
                    info = await self._read_source(src)
                if job.lost_submit_at is not None or (
                        job.task is not None and job.task.snapshot.state != "error"):
                    # It may land later still: count it until it must have.
                    src.phantoms.append(anyio.current_time() + self.spec.timeouts.clone_s)
            # A clone made from a running source deepened its chain by exactly one:
            # unreserve counts it, with no need to read the chain back.
            self.view.unreserve(src, made=made is not None)
            self._update_source(src, info or src.info, before=before)
            self.limiters.release(lease)
        if made is not None:
            self._created += 1
            job.vm, job.source = made, src.name
            job.labelled = "ready" if self._no_post_phases() else "cloned"
            job.phase = "done" if self._no_post_phases() else "network"
            self._record(job, "queue", job.queue_s)
            self._record(job, "clone", anyio.current_time() - t0)
            job.attempt = 0
            if job.phase == "done":
                self._finish(job, "ready", "clone")
            return
        assert error is not None
        await self._clone_failed(job, src, host, error)

    def _feed_limiters(self, job: Job, lease: Lease, ok: bool) -> None:
        """Tell the ``auto`` limits how this clone went: vCenter's own queue and run times
        when the task reports them, else the time we waited (all of it counted as run)."""
        if not ok or job.task is None:
            return
        now = anyio.current_time()
        snap = job.task.snapshot
        if snap.queue_time is not None and snap.start_time is not None and \
                snap.complete_time is not None:
            queue_s = max(0.0, snap.start_time - snap.queue_time)
            run_s = max(0.0, snap.complete_time - snap.start_time)
        else:
            queue_s, run_s = 0.0, max(0.0, now - lease.submitted_at)
        self.limiters.completed(lease, queue_s=queue_s, run_s=run_s, now=now)

    async def _read_source(self, src: SourceState) -> VmInfo | None:
        try:
            with anyio.fail_after(self.spec.timeouts.call_s):
                return await self.vs.get_vm(src.ref)
        except (VSphereError, TimeoutError):
            return None  # the periodic refresh will try again

    async def _clone_failed(self, job: Job, src: SourceState, host: HostState | None,
                            error: BaseException) -> None:
        assert self.view is not None
        spec = self.spec
        if isinstance(error, DuplicateName):
            holder = await self._holder(job, error)
            if holder is None:
                # vCenter holds the name for a clone still in flight (our own submit whose
                # reply was lost, or one of a run that died) and no VM has it yet: wait for
                # it to land, then judge it like any holder.
                holder = await self._await_holder(job)
            if holder is not None and member_index(holder.extra_config, spec.name) == job.index:
                self._adopt(job, holder)
                return
            if holder is not None:
                self._finish(job, "failed", "clone", "name_taken",
                             f"the name {job.name} is taken by {holder.ref.id}, which is not a "
                             f"member of fleet {spec.name}; it was left alone")
                return
            # No VM took the name: the clone that held it failed, and the name is free.
            await self._retry_clone(job, error.reason,
                                    f"{error} (no VM took the name within "
                                    f"{spec.timeouts.clone_s}s)")
            return
        if isinstance(error, NotFound) and await self._folder_lost(error):
            # Not the job's fault: place it again, into the folder found anew.
            job.replaced += 1
            job.attempt -= 1
            if job.replaced > len(self.view.sources) + len(self.view.hosts):
                self._finish(job, "failed", "clone", error.reason, str(error))
                return
            self.emit(JobReplaced, index=job.index, name=job.name, reason="folder_lost")
            self._requeue(job, 0.0)
            return
        if isinstance(error, VSphereError) and not error.transient and error.scope != "call":
            if error.scope == "source":
                self._retire(src, error.reason, str(error))  # before any await: no new job
                # Re-read it (its chain, its power): the summary and the gauges then show
                # the source as vCenter has it, not as fleet believed it was.
                info = None
                with self._bounded(math.inf, shield=True):
                    info = await self._read_source(src)
                if info is not None:
                    self._update_source(src, info)
            elif host is not None and self.view.exclude_host(host.info.ref,
                                                              f"{error.reason}: {error}"):
                self.emit(HostExcluded, host=host.info.name, reason=error.reason,
                          message=str(error))
            job.replaced += 1
            job.attempt -= 1  # not the job's fault
            if job.replaced > len(self.view.sources) + len(self.view.hosts):
                self._finish(job, "failed", "clone", error.reason, str(error))
                return
            self.emit(JobReplaced, index=job.index, name=job.name, reason=error.reason)
            self._requeue(job, 0.0)
            return
        vanished = isinstance(error, NotFound) and job.task is not None and \
            error.obj == job.task.ref.id  # vCenter forgot the task: its outcome is unknown
        if isinstance(error, VSphereError) and not error.transient and not vanished:
            self._finish(job, "failed", "clone", error.reason, str(error))
            return
        # Transient, a timeout or a task vCenter forgot: the clone may exist. Settle that
        # before trying again.
        reason = error.reason if isinstance(error, VSphereError) else "timeout"
        message = str(error) or f"clone did not finish in {spec.timeouts.clone_s}s"
        found = None
        with self._bounded(math.inf, shield=True):
            found = await self._settle(job)
        if found is not None:
            self._adopt(job, found)
            return
        await self._retry_clone(job, reason, message)

    async def _folder_lost(self, error: NotFound) -> bool:
        """Whether the object a clone did not find is the fleet's folder, which the run
        looked up once at its start: vCenter lost it (it lost its state, or someone
        removed the folder). If so it is looked up (made) again, once per lost folder
        whatever the number of clones that failed on it, and True is returned."""
        lost = error.obj
        if lost is None or self._folder is None:
            return False
        if lost in self._lost_folders:
            return True  # found anew already; this clone was submitted before
        if lost != self._folder.id:
            return False
        async with self._folder_lock:
            if lost != self._folder.id:
                return True
            try:
                with anyio.fail_after(self.spec.timeouts.call_s):
                    fresh = await self.vs.ensure_folder(self.spec.folder_path)
            except (VSphereError, TimeoutError):
                return False
            if fresh == self._folder:
                return False
            self._lost_folders.add(lost)
            self._folder = fresh
        return True

    async def _retry_clone(self, job: Job, reason: str, message: str) -> None:
        """Back to the queue after a backoff, or failed when out of attempts."""
        spec = self.spec
        if job.attempt >= spec.retries.attempts:
            if job.lost_submit_at is not None:
                # A submit whose reply was lost may still land (each retry's reply may have
                # been lost too): give it the clone timeout before calling the job failed,
                # or a member would appear that the summary says is missing.
                found = await self._await_holder(
                    job, deadline=job.lost_submit_at + spec.timeouts.clone_s)
                if found is not None and \
                        member_index(found.extra_config, spec.name) == job.index:
                    self._adopt(job, found)
                    return
            self._finish(job, "failed", "clone", reason,
                         f"{message} (after {job.attempt} attempts)")
            return
        delay = _backoff_s(spec, job.attempt, self.rng)
        self.emit(JobRetried, index=job.index, name=job.name, phase="clone",
                  attempt=job.attempt, reason=reason, delay_s=round(delay, 6), message=message)
        self._requeue(job, delay)

    async def _await_holder(self, job: Job, *, deadline: float | None = None) -> VmInfo | None:
        """The VM that lands under ``job.name`` by ``deadline`` (default: the clone timeout
        from now; a clone in flight holds its name before its VM exists), or None; looked
        up at least once, with backoff, given up early when the run stops."""
        if deadline is None:
            deadline = anyio.current_time() + self.spec.timeouts.clone_s
        delay = 0.01
        while True:
            try:
                with anyio.fail_after(self.spec.timeouts.call_s):
                    found = await self._lookup(job.name)
            except (VSphereError, TimeoutError):
                found = None
            if found is not None:
                return found
            now = anyio.current_time()
            if now >= deadline or self._stopping:
                return None
            await anyio.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 1.0)

    async def _holder(self, job: Job, error: DuplicateName) -> VmInfo | None:
        try:
            with anyio.fail_after(self.spec.timeouts.call_s):
                if error.existing:
                    return await self.vs.get_vm(Ref("VirtualMachine", error.existing))
                return await self._lookup(job.name)
        except (VSphereError, TimeoutError):
            return None

    async def _lookup(self, name: str) -> VmInfo | None:
        """The VM called ``name`` in the fleet's folder, or None."""
        try:
            found = await self.vs.find_vms([f"{self.spec.folder_path}/{name}"])
        except NotFound:
            return None
        return found[0] if found else None

    async def _settle(self, job: Job) -> VmInfo | None:
        """After an attempt with an unknown outcome: let its task end (cancelling it if
        vCenter will), then return the VM it made if it carries this job's labels."""
        with self._bounded(self.spec.timeouts.cleanup_s):
            if job.task is not None:
                await self._settle_task(job.task)
            try:
                with anyio.fail_after(self.spec.timeouts.call_s):
                    vm = await self._lookup(job.name)
            except (VSphereError, TimeoutError):
                return None
            if vm is not None and member_index(vm.extra_config, self.spec.name) == job.index:
                return vm
        return None

    async def _reap(self, job: Job) -> None:
        """Destroy every VM this job's attempts made. After a lost submit reply a clone
        may still be on its way, so keep looking (with backoff) until the clone
        timeout has passed since that submit, destroying what lands. Callers bound
        the whole wait; a failed destroy raises."""
        vm = job.vm
        if vm is None:
            found = await self._settle(job)
            vm = found.ref if found is not None else None
        if vm is not None:
            await self.vs.destroy(vm)
            job.vm = None
            self.emit(JobCleanedUp, index=job.index, name=job.name, vm=vm.id)
        since = job.lost_submit_at
        if since is None:
            return
        deadline = since + self.spec.timeouts.clone_s
        delay = 0.01
        while anyio.current_time() < deadline:
            await anyio.sleep(min(delay, max(0.0, deadline - anyio.current_time())))
            delay = min(delay * 2, 1.0)
            try:
                with anyio.fail_after(self.spec.timeouts.call_s):
                    info = await self._lookup(job.name)
            except (VSphereError, TimeoutError):
                continue
            if info is not None and member_index(info.extra_config, self.spec.name) == job.index:
                await self.vs.destroy(info.ref)
                self.emit(JobCleanedUp, index=job.index, name=job.name, vm=info.ref.id)

    async def _settle_task(self, task: TaskHandle) -> None:
        """Cancel a task if vCenter will, and wait (bounded) until it has ended."""
        if task.snapshot.state in ("success", "error"):
            return
        cleanup_s = self.spec.timeouts.cleanup_s
        with self._bounded(cleanup_s):
            with contextlib.suppress(VSphereError):
                await task.cancel()
            with contextlib.suppress(VSphereError, TimeoutError):
                await task.wait(timeout_s=cleanup_s)

    def _adopt(self, job: Job, vm: VmInfo) -> None:
        member = as_member(vm, self.spec.name)
        assert member is not None
        job.vm, job.adopted, job.attempt = vm.ref, True, 0
        job.labelled = member.state
        job.source = member.source or job.source
        job.phase = _NEXT_PHASE[member.state]
        self.emit(JobAdopted, index=job.index, name=job.name, vm=vm.ref.id, state=member.state)
        if job.phase == "done":
            self._finish(job, "ready", "clone")

    # -- after the clone -----------------------------------------------------------
    def _refresh_program(self, family: str) -> GuestProgram:
        net = self.spec.network
        if net.refresh == "custom":
            assert net.command is not None
            return recipes.custom_program(net.command, net.arguments)
        if net.refresh == "linux" or (net.refresh == "auto" and family == "linux"):
            return recipes.linux_refresh()
        return recipes.windows_refresh()

    async def _post_clone(self, job: Job) -> None:
        """network -> reconnect -> ready, each retried and timed. Failures leave the VM
        labeled with the last phase it finished, for the next run to resume."""
        assert job.vm is not None and self.view is not None
        vm = job.vm
        spec = self.spec
        net = spec.network
        wait_ready = spec.readiness.wait_for != "none"
        try:
            if job.phase == "network":
                if net.refresh != "none":
                    creds = net.credentials
                    assert creds is not None  # the spec requires them with a refresh
                    src = self.view.sources.get(job.source or "")
                    family = src.info.guest_family if src else (await self._vm(vm)).guest_family
                    program = self._refresh_program(family)
                    timeout = spec.timeouts.network_s

                    async def refresh() -> None:
                        code = await self.vs.run_in_guest(vm, creds, program, timeout_s=timeout)
                        if code != 0:
                            raise _PhaseFailed("network", "network_refresh_failed",
                                               f"{program.path} exited with {code}")

                    await self._phase(job, "network", timeout, refresh)
                reconnect = net.disconnect_at_clone and net.reconnect
                if net.refresh != "none" or reconnect:
                    # With a reconnect, one ReconfigVM_Task connects the NICs and labels
                    # the member: the label never says more (or less) than was done.
                    await self._label(job, "network" if wait_ready else "ready",
                                      reconnect=reconnect)
                    job.phase = "ready" if wait_ready else "done"
                else:
                    job.phase = "ready"
            if job.phase == "ready":
                if wait_ready:
                    await self._phase(job, "ready", spec.readiness.timeout_s, self._ready_wait(vm),
                                      retry_timeouts=False)
                job.phase = "done"
            if job.labelled != "ready":
                await self._label(job, "ready")
            self._finish(job, "ready", "ready")
        except _PhaseFailed as exc:
            if exc.error is not None and exc.error.scope == "host":
                await self._exclude_vm_host(vm, exc.error)
            self._finish(job, "failed", exc.phase, exc.reason, exc.message)

    def _ready_wait(self, vm: Ref) -> Callable[[], Awaitable[object]]:
        r = self.spec.readiness
        if r.wait_for == "guest_ip":
            return lambda: self.vs.wait_for_vm_state(vm, timeout_s=r.timeout_s, guest_ip=True)
        return lambda: self.vs.wait_for_vm_state(vm, timeout_s=r.timeout_s,
                                                 extra_config_key=r.guestinfo_key)

    async def _vm(self, vm: Ref) -> VmInfo:
        with anyio.fail_after(self.spec.timeouts.call_s):
            return await self.vs.get_vm(vm)

    async def _label(self, job: Job, state: MemberState, *, reconnect: bool = False) -> None:
        """Label the member with the phase it finished. ``reconnect``: connect its NICs in
        the same reconfiguration (the timed ``reconnect`` phase), so a run that stops at
        any point leaves NICs connected exactly when the label says the network is done."""
        assert job.vm is not None
        vm = job.vm
        values = {LABEL_STATE: state}

        async def write() -> None:
            lease = await self.limiters.acquire([LimitKey.of("overall")], (job, "label"))
            try:
                if reconnect:
                    await self.vs.set_nics_connected(vm, True, extra_config=values)
                else:
                    await self.vs.update_extra_config(vm, values)
            finally:
                self.limiters.release(lease)

        t0 = anyio.current_time()
        try:
            if reconnect:
                await self._phase(job, "reconnect", self.spec.timeouts.reconnect_s, write)
            else:
                await self._phase(job, None, self.spec.timeouts.call_s, write)
        except _PhaseFailed as exc:
            # The write is absolute (these labels, NICs connected): one whose reply was lost
            # or came too late may have landed all the same. Look before calling it failed.
            refused = exc.error is not None and not exc.error.transient
            if refused or not await self._labelled(vm, values, reconnect):
                raise
            if reconnect:
                self._record(job, "reconnect", anyio.current_time() - t0)
        job.labelled = state

    async def _labelled(self, vm: Ref, values: Mapping[str, str], nics_connected: bool) -> bool:
        """Whether ``vm`` carries ``values`` (and, if asked, has every NIC connected)."""
        try:
            info = await self._vm(vm)
        except (VSphereError, TimeoutError):
            return False
        if any(info.extra_config.get(k, "") != v for k, v in values.items()):
            return False
        return not nics_connected or all(n.connected for n in info.nics)

    async def _phase(self, job: Job, phase: str | None, timeout_s: float,
                     fn: Callable[[], Awaitable[object]], *, retry_timeouts: bool = True) -> None:
        """Run one phase step with a deadline and retries of transient faults.
        ``phase`` None is bookkeeping (labels): retried but not timed."""
        name = phase or "label"
        t0 = anyio.current_time()
        for attempt in range(1, self.spec.retries.attempts + 1):
            try:
                with anyio.fail_after(timeout_s):
                    await fn()
            except (TimeoutError, RequestTimeout) as exc:
                reason, message = "timeout", f"{name} did not finish in {timeout_s}s"
                if not retry_timeouts:
                    raise _PhaseFailed(name, f"{name}_timeout", message) from exc
                err: VSphereError | None = exc if isinstance(exc, VSphereError) else None
            except VSphereError as exc:
                if not exc.transient:
                    raise _PhaseFailed(name, exc.reason, str(exc), exc) from exc
                reason, message, err = exc.reason, str(exc), exc
            else:
                if phase is not None:
                    self._record(job, phase, anyio.current_time() - t0)
                return
            if attempt >= self.spec.retries.attempts:
                raise _PhaseFailed(name, reason, f"{message} (after {attempt} attempts)", err)
            delay = _backoff_s(self.spec, attempt, self.rng)
            self.emit(JobRetried, index=job.index, name=job.name, phase=name, attempt=attempt,
                      reason=reason, delay_s=round(delay, 6), message=message)
            await anyio.sleep(delay)

    async def _exclude_vm_host(self, vm: Ref, error: VSphereError) -> None:
        assert self.view is not None
        try:
            info = await self._vm(vm)
        except (VSphereError, TimeoutError):
            return
        if info.host is not None and self.view.exclude_host(info.host,
                                                            f"{error.reason}: {error}"):
            self.emit(HostExcluded, host=info.host_name or info.host.id, reason=error.reason,
                      message=str(error))

    # -- stopping --------------------------------------------------------------------
    async def _cleanup(self, job: Job) -> None:
        """Destroy what a job that did not finish made (shielded, bounded)."""
        if job.outcome == "ready":
            return
        if job.submit_started is not None:  # cut off mid-submit: it may have gone through
            job.lost_submit_at, job.submit_started = job.submit_started, None
        with self._bounded(self.spec.timeouts.cleanup_s, shield=True):
            try:
                await self._reap(job)
            except VSphereError as exc:
                self._finish(job, "failed", job.phase, "cleanup_failed",
                             f"could not destroy half-made {job.name}: {exc}")
                return
        self._finish(job, "cancelled", job.phase, "cancelled",
                     f"{self._stop_reason or 'stopped'} before it was ready")

    # -- inventory refresh -----------------------------------------------------------
    async def _refresher(self) -> None:
        """Refresh hosts and sources every ``refresh_interval_s``: memory use, connection
        state, power and freeze state, chain depth."""
        assert self.view is not None
        view = self.view
        while True:
            await anyio.sleep(self.options.refresh_interval_s)
            try:
                with anyio.fail_after(self.spec.timeouts.call_s):
                    for info in await self.vs.list_hosts():
                        state = view.hosts.get(info.ref)
                        if state is None:
                            view.hosts[info.ref] = HostState(info)
                        else:
                            state.info = info
                    for src in view.sources.values():
                        if src.retired is not None:
                            continue
                        busy, made = bool(src.in_flight or src.phantoms), src.clones
                        vm_info = await self.vs.get_vm(src.ref)
                        if src.running and (busy or src.in_flight or src.phantoms
                                            or src.clones != made):
                            # vCenter counts an in-flight clone in the chain from its stun
                            # on, and placement adds it too: keep our own count of the
                            # depth until the source is idle; take power and freeze state.
                            # Idle for the whole read: a clone that started and landed
                            # while the reply was on its way is missing from it.
                            vm_info = replace(vm_info, chain_depth=src.info.chain_depth)
                        self._update_source(src, vm_info)
            except (VSphereError, TimeoutError):
                continue  # a refresh is an optimisation; the next one may work
            self._wake.set()

    # -- summary -------------------------------------------------------------------
    def _summarise(self, t0: float) -> Summary:
        spec = self.spec
        duration = max(anyio.current_time() - t0, 1e-9)
        ready = self._already_ready + sum(1 for j in self._jobs if j.outcome == "ready")
        failures: Counter[str] = Counter()
        failed_indexes: list[int] = []
        for job in self._jobs:
            if job.outcome != "ready":
                failures[job.reason or "unfinished"] += 1
                failed_indexes.append(job.index)
        for index, why in self._blocked.items():
            failures["name_taken"] += 1
            failed_indexes.append(index)
            self._failure_messages.setdefault("name_taken", why)
        sources = {name: source_summary(s) for name, s in self.view.sources.items()} \
            if self.view else {}
        return Summary(
            fleet=spec.name, run_id=self.run_id, requested=spec.count, ready=ready,
            failed=spec.count - ready, created=self._created,
            adopted=sum(1 for j in self._jobs if j.adopted), removed=self._removed,
            duration_s=round(duration, 6),
            clones_per_s=round(self._created / duration, 3),
            phases={p: PhaseStats.of(v) for p, v in self._phase_s.items()},
            sources=sources, failures=dict(failures), failed_indexes=sorted(failed_indexes),
            failure_messages={r: self._failure_messages.get(r, "") for r in failures},
            cancelled=self._stopping,
            limits={s.key: s.limit for s in self.limiters.statistics()
                    if not math.isinf(s.limit)})


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
            if member_index(member.vm.extra_config, spec.name) is None:
                continue  # defensive: only labelled members are ever destroyed
            tg.start_soon(one, member)
    return RemovalSummary(spec.name, removed, sum(failures.values()),
                          round(anyio.current_time() - t0, 6), dict(failures))
