"""Dispatch: which queued job starts next, on which source, under the limiters.

:class:`Dispatcher` is the run's loop. Each round it takes the jobs whose
backoff is over, fails those that waited past ``timeouts.queue_s`` or that no
source can ever take, and for the rest asks placement for a source and the
limiters for that source's tokens (host, datastore, running source, overall),
starting one job per placement until either says no. Placement never awaits,
so a round is one consistent decision. Then it sleeps until something may have
changed: a token came back, a limit moved, a job ended or was queued again, a
backoff ran out, the refresh saw the inventory change, or the run stopped
(which drops what is queued). It returns once no job is queued or running.

Each started job runs its pipeline (given as ``run_job``) as its own task in
a shielded scope from the stop clock, so a stop gives it the grace period
rather than cutting it off mid-clone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskGroup

from fleet.engine.limits import Lease, Limiters, LimitKey
from fleet.engine.placement import ClusterView, NoFit, SourceState, place
from fleet.engine.runstate import Job, JobQueue, RunContext
from fleet.engine.shared import SharedLimits
from fleet.vsphere.model import VmInfo

#: a job's pipeline: the clone (given a placed source and its lease) and what follows
RunJob = Callable[[Job, SourceState | None, Lease | None, anyio.CancelScope], Awaitable[None]]
#: a job about to fail in the queue after a submit without reply: ``(job, reason,
#: message)``; it adopts its member if that landed after all, or fails as said
SettleLost = Callable[[Job, str, str], Awaitable[None]]


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


class Dispatcher:
    """Starts one run's jobs under its limiters; :meth:`run` returns when all are done.

    ``on_dropped`` hears of every queued job a stop dropped whose last submit got no
    reply (what it made after all must still be destroyed)."""

    def __init__(self, ctx: RunContext, view: ClusterView, queue: JobQueue, run_job: RunJob,
                 *, on_dropped: Callable[[Job], None],
                 settle_lost: SettleLost | None = None,
                 shared: SharedLimits | None = None,
                 keep_open: Callable[[], bool] | None = None) -> None:
        self._ctx = ctx
        self._view = view
        self._queue = queue
        self._run_job = run_job
        self._on_dropped = on_dropped
        self._settle_lost = settle_lost
        self._shared = shared
        #: an open-ended run (docs/pools.md) waits for more jobs while this says so
        self._keep_open = keep_open or (lambda: False)
        self._active = 0  # jobs started and not yet ended
        self._key_cache: dict[str, tuple[VmInfo, tuple[LimitKey, ...]]] = {}
        self._interned_keys: dict[LimitKey, LimitKey] = {}

    def shared_wakeups(self) -> contextlib.AbstractContextManager[None]:
        """While dispatching, capacity other runs free wakes this one too (fairly)."""
        if self._shared is None:
            return contextlib.nullcontext()
        view = self._view
        return self._shared.attach(self._ctx.wake.set,
                                   lambda: sum(s.in_flight for s in view.sources.values()))

    def drop_queued(self) -> None:
        """End every job still waiting for placement (the run stops or is over)."""
        ctx = self._ctx
        for job in self._queue.drain():
            if job.outcome is None:
                if job.lost_submit_at is not None:
                    self._on_dropped(job)
                ctx.finish(job, "cancelled", "queue", "cancelled",
                           f"not started: {ctx.stop.reason or 'run ended'}")

    def _keys(self, src: SourceState) -> tuple[LimitKey, ...]:
        """The limiters a clone of ``src`` needs. Placement asks for every source at every
        placement, so they are worked out again only when the source's view changes."""
        cached = self._key_cache.get(src.name)
        if cached is not None and cached[0] is src.info:
            return cached[1]
        host = src.info.host
        ds = src.datastore
        # Names, not ids: these keys label gauges and the summary's limits.
        keys = self._ctx.limiters.keys_for(
            host=src.info.host_name or (host.id if host else "?"),
            datastore=self._view.datastore_names.get(ds, ds.id) if ds else None,
            running_source=src.name if src.running else None)
        # One object per limiter, so _PlacementCapacity can tell them apart by identity.
        keys = tuple(self._interned_keys.setdefault(k, k) for k in keys)
        self._key_cache[src.name] = (src.info, keys)
        return keys

    async def run(self, tg: TaskGroup) -> None:
        """Place queued jobs while limiters have room; return when every job is done."""
        ctx = self._ctx
        view, queue, stop = self._view, self._queue, ctx.stop
        queue_s = ctx.spec.timeouts.queue_s
        capacity = _PlacementCapacity(ctx.limiters, self._keys)
        while True:
            capacity.fresh()  # tokens came back, limits moved, others took some meanwhile
            now = anyio.current_time()
            view.prune_phantoms(now)
            if stop.stopping:
                self.drop_queued()
            queue.promote_due(now)
            ready = queue.ready
            while ready and not stop.stopping:
                job = ready[0]
                if now - job.queued_at > queue_s:
                    ready.popleft()
                    if not self._await_lost_clone(job, now):
                        self._fail_queued(tg, job, "queue_timeout",
                                          f"no source could take it for {queue_s}s")
                    continue
                try:
                    decision = place(view, capacity, ctx.rng)
                except NoFit as exc:
                    if exc.may_fit_later:
                        break
                    ready.popleft()
                    if not self._await_lost_clone(job, now):
                        self._fail_queued(tg, job, "unschedulable", str(exc))
                    continue
                src = decision.source
                keys = self._keys(src)
                lease = ctx.limiters.try_acquire(keys, job)
                if lease is None:  # someone is already waiting for these tokens
                    break
                capacity.took(keys)
                ready.popleft()
                job.queue_s += now - job.queued_at
                view.reserve(src)
                self.spawn(tg, job, src, lease)
            if not queue and self._active == 0 and not self._keep_open():
                return
            timeout = 1.0
            if queue.delayed:
                timeout = min(timeout, min(j.not_before for j in queue.delayed) - now)
            if queue.ready:
                timeout = min(timeout, queue.ready[0].queued_at + queue_s - now + 0.001)
            try:
                await ctx.wake.wait(timeout)
            except anyio.get_cancelled_exc_class():
                # Ctrl-C or the caller's deadline: in-flight clones get the grace period.
                stop.stop("cancelled")
                raise

    def _await_lost_clone(self, job: Job, now: float) -> bool:
        """A job about to fail in the queue whose last submit got no reply may have its
        member on the way (that clone may land, and take the last of a running source's
        budget as it does): it waits, out of the way, until the clone can no longer land.
        If it lands, the pipeline adopts the job from there (docs/architecture.md,
        unknown outcomes); else the job fails then. True if it waits."""
        since = job.lost_submit_at
        if since is None or now >= since + self._ctx.spec.timeouts.clone_s:
            return False
        job.not_before = since + self._ctx.spec.timeouts.clone_s
        self._queue.delayed.append(job)
        return True

    def _fail_queued(self, tg: TaskGroup, job: Job, reason: str, message: str) -> None:
        """Fail a job that leaves the queue unplaced. If its last submit got no reply,
        the clone may have landed after the last look for it (its holder polls with a
        backoff, and a loaded vCenter is late): it is looked for once more, and adopted
        if there (docs/architecture.md, unknown outcomes)."""
        if job.lost_submit_at is None or self._settle_lost is None:
            self._ctx.finish(job, "failed", "queue", reason, message)
            return
        self._active += 1
        settle = self._settle_lost

        async def settle_then_fail() -> None:
            try:
                await settle(job, reason, message)
            finally:
                self._active -= 1
                self._ctx.wake.set()

        tg.start_soon(settle_then_fail)

    def spawn(self, tg: TaskGroup, job: Job, src: SourceState | None, lease: Lease | None
              ) -> None:
        """Start ``job``'s pipeline (``src`` and ``lease``: from its clone on)."""
        self._active += 1
        tg.start_soon(self._job, job, src, lease, self._ctx.stop.job_scope())

    async def _job(self, job: Job, src: SourceState | None, lease: Lease | None,
                   scope: anyio.CancelScope) -> None:
        try:
            await self._run_job(job, src, lease, scope)
        finally:
            self._ctx.stop.job_done(scope)
            self._active -= 1
            self._ctx.wake.set()
