"""Capacity limits: how many operations fleet hands vCenter at once, overall and per
host, datastore and running source, and the ``auto`` limits that learn them.

Each limit is an :class:`anyio.CapacityLimiter`. A clone holds one token from
every limiter that applies to it, always acquired in the fixed order overall ->
host -> datastore -> source, so two jobs can never hold tokens the other waits
for. The dispatcher places a job and takes its tokens without awaiting in
between (:meth:`Limiters.try_acquire`), so what placement saw is what it gets.

``auto`` limits follow TCP congestion control (AIMD, :class:`AimdController`):
slow start (one more operation per prompt completion, so the limit doubles per
round trip) until vCenter first pushes back, then one more operation per window of
prompt completions, and a multiplicative cut when a task sat ``queued`` or
its run time jumped. A limit grows only while it is at least half used
(TCP's congestion window validation), so an idle limit never inflates. A cut
caused by queueing goes straight to the concurrency vCenter was running when it
queued (that is the slot count it revealed), and
the limit then creeps toward that ceiling slowly instead of probing it every
window. A task that queued is the signal; fleet never keeps more than one
window's worth of probing outstanding.

What vCenter revealed is read on vCenter's own clock, from the times its tasks
report (queued, started, completed), never from when this process got round to
noticing: a loaded client (a starved event loop, a GC pause) hears of finished
tasks late and of started ones later still, and counting its own leases then
sees tasks vCenter already finished as still running, and tasks it already
started as still queued. So the slot count a queued task revealed is how many of
ours vCenter was running just before that task started (each lease's task times,
kept a while after it is released), and a sibling counts as stuck only if vCenter
itself said it was queued, for longer than the threshold as of this task's
completion time.

Slow start grows by at most one window per round trip, as TCP's does: a prompt
completion is evidence only for the window vCenter was running when it started
that task, so it may take the limit to at most twice what vCenter then ran of
ours (on vCenter's clock; our own count at hand-over where the task has no
times). Counting our leases instead let a loaded client overshoot by several
windows: it hands tasks over late and hears of their ends late, so vCenter ran 8
of ours at once, each batch ending before the next arrived, while our leases
said 15 and were all "limit used"; a backlog of those prompt completions then
grew the limit far past anything vCenter had been shown, and the first task that
queued long enough to count came after we had handed it that many. A task that
queued a moment (under the threshold) counts as prompt, but only for the slots
vCenter ran when it started it, not for the queue it waited in. For the same
reason the ceiling a queued task revealed is passed (and forgotten) only once
vCenter ran that many of ours at once: a lagging client's extra task arriving as
a slot freed proves nothing about one slot more.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Literal

import anyio

from fleet.engine.spec import LimitsSpec
from fleet.vcenter import DATASTORE_COST_UNITS, HOST_PROVISIONING_SLOTS, MAX_CONCURRENT_OPERATIONS
from fleet.vsphere.model import TaskHandle, TaskSnapshot

LimitKind = Literal["overall", "host", "datastore", "source"]
_ORDER: dict[str, int] = {"overall": 0, "host": 1, "datastore": 2, "source": 3}


@dataclass(frozen=True, order=True)
class LimitKey:
    """One limiter: its kind and the id of what it limits (``""`` for overall)."""

    rank: int
    kind: LimitKind
    id: str

    @classmethod
    def of(cls, kind: LimitKind, id: str = "") -> LimitKey:
        return cls(_ORDER[kind], kind, id)

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}" if self.id else self.kind


@dataclass(frozen=True)
class AutoTuning:
    """Knobs of the ``auto`` limits (not spec keys: the defaults suit vCenter)."""

    # The initial window: vSphere's documented 8 provisioning operations per host. A
    # host with fewer slots queues the excess for one round trip and the first queued
    # task cuts the limit to the slots it revealed; starting at 2 cost three round
    # trips of slow start on every host (0.88 of the true limit's throughput over a
    # 1,000-clone burst on 16-slot hosts, benchmark scenario 5).
    host_initial: int = HOST_PROVISIONING_SLOTS
    host_max: int = 64
    # Where a host's slow start ends without push-back (TCP's ssthresh); None: at the
    # first push-back only. Stopping at vSphere's documented 8 slots made a host with
    # 16 take ~8 round trips of additive growth to be found (0.80 of the true limit's
    # throughput over a 1,000-clone burst, benchmark scenario 5), while overshooting an
    # 8-slot host costs only a few tasks queued at vCenter for one round trip: the
    # queue keeps its slots busy, and the cut goes straight to the revealed count.
    host_slow_start_until: int | None = None
    datastore_initial: int = 8
    datastore_max: int = DATASTORE_COST_UNITS
    # a tenth of the operations vCenter runs at once
    overall_initial: int = MAX_CONCURRENT_OPERATIONS // 10
    overall_max: int = MAX_CONCURRENT_OPERATIONS
    decrease: float = 0.7  # multiplicative cut on a latency spike (CUBIC's beta)
    # A task counts as queued when it waited longer than this before vCenter started
    # it, and longer than queued_fraction of the usual run time.
    queued_min_s: float = 0.25
    queued_fraction: float = 0.25
    # A run time above latency_factor x the baseline (and latency_floor_s more) is a spike.
    latency_factor: float = 3.0
    latency_floor_s: float = 0.5
    # Near a known ceiling, grow this many times slower (a plateau, as in CUBIC).
    plateau_slowdown: int = 8


class AimdController:
    """The arithmetic of one ``auto`` limit. Pure: it never awaits, never sleeps."""

    def __init__(self, initial: int, minimum: int, maximum: int, tuning: AutoTuning,
                 slow_start_until: int | None = None):
        self.minimum = minimum
        self.maximum = maximum
        self.tuning = tuning
        self.limit = max(minimum, min(initial, maximum))
        self.slow_start_until = slow_start_until if slow_start_until is not None else maximum
        self.slow_start = self.limit < self.slow_start_until
        self.ceiling: int | None = None
        self.increases = 0
        self.decreases = 0
        self._credit = 0.0
        self._hold = 0  # completions before another cut may happen (one cut per window)
        self.baseline_s: float | None = None

    def queued_threshold_s(self) -> float:
        base = self.baseline_s or 0.0
        return max(self.tuning.queued_min_s, self.tuning.queued_fraction * base)

    def is_spike(self, run_s: float) -> bool:
        base = self.baseline_s
        if base is None:
            return False
        return run_s > base * self.tuning.latency_factor and \
            run_s > base + self.tuning.latency_floor_s

    def classify(self, *, queue_s: float, run_s: float) -> Literal["queued", "spike", "ok"]:
        """What one finished task says about vCenter's load."""
        if queue_s > self.queued_threshold_s():
            return "queued"
        if self.is_spike(run_s):
            return "spike"
        return "ok"

    def completed(self, *, queue_s: float, run_s: float, in_flight_before: int,
                  was_limited: bool) -> int:
        """Feed one finished task; returns the new limit.

        ``in_flight_before`` is how many of ours vCenter had when this one was
        handed over; ``was_limited`` says whether the limit was full then (we only
        grow a limit that is actually what holds us back)."""
        verdict = self.classify(queue_s=queue_s, run_s=run_s)
        if verdict == "queued":
            return self.congested(capacity=in_flight_before)
        if verdict == "spike":
            return self.congested(capacity=None)
        return self.prompt(run_s=run_s, was_limited=was_limited)

    @property
    def needs_shown(self) -> bool:
        """Whether :meth:`prompt` would use ``shown`` now (counting it costs a scan)."""
        return self.slow_start or (self.ceiling is not None and self.limit >= self.ceiling)

    def prompt(self, *, run_s: float, was_limited: bool, shown: int | None = None) -> int:
        """A task that started at once and ran as usual: grow (if the limit binds).

        ``shown``: how many of ours vCenter was running when it started this task (its
        clock), when known. Slow start grows only below twice that, and a known ceiling
        is passed only once vCenter ran that many (module docstring)."""
        # Track the usual run time from unremarkable tasks only.
        self.baseline_s = run_s if self.baseline_s is None else \
            0.8 * self.baseline_s + 0.2 * run_s
        if self._hold > 0:
            self._hold -= 1
        elif was_limited:
            self._grow(shown)
        return self.limit

    def _grow(self, shown: int | None) -> None:
        if self.limit >= self.maximum:
            return
        if self.slow_start:
            if shown is not None and self.limit >= 2 * shown:
                return  # evidence for a window of ``shown`` only: it has doubled already
            self.limit += 1
            self.increases += 1
            if self.limit >= self.slow_start_until:
                self.slow_start = False
            return
        if self.ceiling is not None and self.limit >= self.ceiling:
            if shown is not None and shown < self.ceiling:
                return  # vCenter never ran that many: the ceiling is not passed yet
            self.ceiling = None  # we passed the old ceiling without push-back: it moved
        step = 1.0 / self.limit
        if self.ceiling is not None and self.limit + 1 >= self.ceiling:
            step /= self.tuning.plateau_slowdown
        self._credit += step
        if self._credit >= 1.0:
            self._credit = 0.0
            self.limit += 1
            self.increases += 1

    def congested(self, *, capacity: int | None) -> int:
        """vCenter pushed back. ``capacity`` is what it was running, when known."""
        if self._hold > 0:
            return self.limit
        self.slow_start = False
        if capacity is not None:
            new = min(self.limit - 1, capacity)
            self.ceiling = capacity + 1
        else:
            new = math.floor(self.limit * self.tuning.decrease)
        new = max(self.minimum, new)
        if new < self.limit:
            self.decreases += 1
        self.limit = new
        self._credit = 0.0
        self._hold = self.limit  # the rest of this window's completions are old news
        return self.limit


@dataclass(frozen=True)
class LimiterStats:
    """One limiter's gauges."""

    key: str
    kind: LimitKind
    limit: float
    in_use: int
    waiting: int
    auto: bool
    peak: int
    increases: int = 0
    decreases: int = 0


class Limiter:
    """A named CapacityLimiter, with an optional AIMD controller moving its size."""

    def __init__(self, key: LimitKey, limit: float, controller: AimdController | None):
        self.key = key
        self.controller = controller
        self.capacity = anyio.CapacityLimiter(
            controller.limit if controller else _tokens(limit))
        self.peak = 0
        self.holders: dict[int, Lease] = {}  # by id(lease): who holds tokens now
        # (queue, start, complete) on vCenter's clock of tasks whose leases were released:
        # what vCenter had a moment ago, which a completion still needs to count.
        self.finished: deque[_Times] = deque(maxlen=_FINISHED_KEPT)
        self.released = 0  # how many were ever appended to ``finished``

    def running_before(self, lease: Lease, t: float) -> int:
        """How many tasks of this limiter's leases vCenter was running just before the
        slot that ``t`` (its clock, a moment of ``lease``'s task) followed was freed: the
        last completion at or before ``t``, or ``t`` itself if none came before.

        vCenter stamps a queued task's start a moment after the completion that freed
        its slot (two events, two clock reads), so "running just before ``t``" would
        miss the very task that held the slot, and a queued task would reveal one slot
        fewer than vCenter has."""
        ran = [(start, end) for _, start, end in self._recent(lease) if start is not None]
        freed = max((end for _, end in ran if end <= t), default=t)
        return sum(1 for start, end in ran if start < freed <= end)

    def running_at(self, lease: Lease, t: float) -> int:
        """How many tasks of this limiter's leases vCenter was running at ``t`` (its
        clock, a moment of ``lease``'s task): started by then and not yet completed (one
        that ended at ``t`` left its slot to whatever started then)."""
        return sum(1 for _, start, end in self._recent(lease)
                   if start is not None and start <= t < end)

    def _recent(self, lease: Lease) -> Iterator[_Times]:
        """The vCenter times of the tasks this limiter holds and of those released while
        ``lease`` was held: a task that ran at any moment of ``lease``'s task ended after
        vCenter received it, so after ``lease`` was taken, and we heard of that end later
        still. A task vCenter has told us nothing about yet is left out."""
        since = self.released - lease.released_before.get(self.key, self.released)
        yield from islice(reversed(self.finished), min(since, len(self.finished)))
        for holder in self.holders.values():
            snap = _times(holder)
            if snap is not None and snap.queue_time is not None:
                yield (snap.queue_time, snap.start_time,
                       math.inf if snap.complete_time is None else snap.complete_time)

    @property
    def limit(self) -> float:
        return self.capacity.total_tokens

    @property
    def in_use(self) -> int:
        return self.capacity.borrowed_tokens

    @property
    def free(self) -> float:
        return self.capacity.total_tokens - self.capacity.borrowed_tokens

    def stats(self) -> LimiterStats:
        s = self.capacity.statistics()
        c = self.controller
        return LimiterStats(str(self.key), self.key.kind, s.total_tokens, s.borrowed_tokens,
                            s.tasks_waiting, c is not None, self.peak,
                            c.increases if c else 0, c.decreases if c else 0)


#: A task's (queue, start, complete) times on vCenter's clock; start None: never ran.
_Times = tuple[float, float | None, float]

#: Released tasks' times kept per limiter: more than any limit runs at once (host_max,
#: and the overall limit's 640 is never the narrowest when it matters). A count reads
#: only those released while the lease it is for was held, about a limit's worth.
_FINISHED_KEPT = 1024


def _times(lease: Lease) -> TaskSnapshot | None:
    """The snapshot of the lease's task, or None before it was submitted."""
    return lease.task.snapshot if lease.task is not None else None


def _tokens(limit: float) -> float:
    return limit if math.isinf(limit) else int(limit)


@dataclass
class Lease:
    """Tokens one job holds. Release exactly once (:meth:`Limiters.release`)."""

    owner: object  # who the tokens are for (a job), for the reader
    limiters: tuple[Limiter, ...]
    in_flight_before: dict[LimitKey, int] = field(default_factory=dict)
    was_limited: dict[LimitKey, bool] = field(default_factory=dict)
    #: each limiter's count of released tasks' times when this lease was taken
    released_before: dict[LimitKey, int] = field(default_factory=dict)
    released: bool = False
    #: the vCenter task this lease covers, once submitted (its snapshot shows "queued")
    task: TaskHandle | None = None
    submitted_at: float = 0.0
    #: the limiters' borrower: one per lease, not its owner, so that one owner may
    #: hold two leases (a job's retry while the clone of its lost submit keeps its own)
    borrower: object = field(default_factory=object, repr=False, compare=False)

    def submitted(self, task: TaskHandle, now: float) -> None:
        self.task = task
        self.submitted_at = now


def _seen_queued(snapshot: TaskSnapshot) -> bool:
    """vCenter said the task is queued. A task it has not reported yet (the client's
    first update of it is still to come: no queue time) only looks queued, and under
    client load that lag alone would read as push-back."""
    return snapshot.state == "queued" and snapshot.queue_time is not None


class Limiters:
    """Every limiter of a run, created on first use, plus the ``changed`` callback the
    dispatcher uses to wake up when capacity frees or a limit moves."""

    def __init__(self, spec: LimitsSpec, *, tuning: AutoTuning | None = None,
                 on_change: Callable[[], None] | None = None,
                 on_limit: Callable[[LimitKey, float, float], None] | None = None):
        self.spec = spec
        self.tuning = tuning or AutoTuning()
        self._on_change = on_change or (lambda: None)
        self._on_limit = on_limit or (lambda key, old, new: None)
        self._limiters: dict[LimitKey, Limiter] = {}

    def keys_for(self, *, host: str, datastore: str | None, running_source: str | None
                 ) -> tuple[LimitKey, ...]:
        """The limiters a clone needs, in acquisition order."""
        keys = [LimitKey.of("overall"), LimitKey.of("host", host)]
        if datastore is not None:
            keys.append(LimitKey.of("datastore", datastore))
        if running_source is not None:
            keys.append(LimitKey.of("source", running_source))
        return tuple(sorted(keys))

    def get(self, key: LimitKey) -> Limiter:
        limiter = self._limiters.get(key)
        if limiter is None:
            limiter = self._make(key)
            self._limiters[key] = limiter
        return limiter

    def _make(self, key: LimitKey) -> Limiter:
        t = self.tuning
        setting = {"overall": self.spec.in_flight, "host": self.spec.per_host,
                   "datastore": self.spec.per_datastore,
                   "source": self.spec.per_running_source}[key.kind]
        if setting != "auto":
            return Limiter(key, setting, None)
        if key.kind == "source":
            # vCenter serialises clones of a running source: more would only queue.
            return Limiter(key, 1, None)
        initial, maximum = {"overall": (t.overall_initial, t.overall_max),
                            "host": (t.host_initial, t.host_max),
                            "datastore": (t.datastore_initial, t.datastore_max)}[key.kind]
        until = t.host_slow_start_until if key.kind == "host" else None
        return Limiter(key, initial, AimdController(initial, 1, maximum, t, until))

    def free(self, key: LimitKey) -> float:
        return self.get(key).free

    def blocked_by(self, keys: Sequence[LimitKey]) -> str | None:
        """Why these tokens cannot all be had now (e.g. ``host:esx-01 8/8``), or None."""
        for key in keys:
            lim = self.get(key)
            if lim.free < 1 or lim.capacity.statistics().tasks_waiting:
                return f"{key} {lim.in_use}/{_fmt(lim.limit)} in flight"
        return None

    def try_acquire(self, keys: Sequence[LimitKey], owner: object) -> Lease | None:
        """All of ``keys`` for ``owner`` at once, or None (and nothing held). Never awaits."""
        lease = Lease(owner, ())
        taken: list[Limiter] = []
        for key in sorted(keys):
            lim = self.get(key)
            try:
                lim.capacity.acquire_on_behalf_of_nowait(lease.borrower)
            except anyio.WouldBlock:
                for got in reversed(taken):
                    got.holders.pop(id(lease), None)
                    got.capacity.release_on_behalf_of(lease.borrower)
                return None
            taken.append(lim)
            self._note(lease, lim)
        lease.limiters = tuple(taken)
        return lease

    async def acquire(self, keys: Sequence[LimitKey], owner: object) -> Lease:
        """Wait for all of ``keys`` in the fixed order. Callers bound the wait
        (``anyio.fail_after``); on cancellation nothing stays held."""
        lease = Lease(owner, ())
        taken: list[Limiter] = []
        try:
            for key in sorted(keys):
                lim = self.get(key)
                await lim.capacity.acquire_on_behalf_of(lease.borrower)
                taken.append(lim)
                self._note(lease, lim)
        except BaseException:
            for got in reversed(taken):
                got.holders.pop(id(lease), None)
                got.capacity.release_on_behalf_of(lease.borrower)
            if taken:
                self._on_change()
            raise
        lease.limiters = tuple(taken)
        return lease

    def _note(self, lease: Lease, lim: Limiter) -> None:
        lim.holders[id(lease)] = lease
        in_use = lim.in_use
        lim.peak = max(lim.peak, in_use)
        lease.in_flight_before[lim.key] = in_use - 1
        lease.released_before[lim.key] = lim.released
        # "Limited" as in TCP's congestion window validation (RFC 7661): the limit was at
        # least half used. Requiring it full would count only the last job of each burst
        # of dispatches, and slow start would add half a window per round trip, not one.
        lease.was_limited[lim.key] = 2 * in_use >= lim.limit

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        snap = _times(lease)
        ran: _Times | None = None
        if snap is not None and snap.queue_time is not None and snap.complete_time is not None:
            ran = (snap.queue_time, snap.start_time, snap.complete_time)
        for lim in reversed(lease.limiters):
            lim.holders.pop(id(lease), None)
            if ran is not None and lim.controller is not None:
                lim.finished.append(ran)
                lim.released += 1
            lim.capacity.release_on_behalf_of(lease.borrower)
        self._on_change()

    def completed(self, lease: Lease, *, queue_s: float, run_s: float,
                  now: float | None = None) -> None:
        """Feed a finished clone's timings (from the task's queue/start/complete times)
        to the ``auto`` limiters it held. Push-back is blamed on the narrowest one
        (host, else datastore, else overall); a prompt task lets each of them grow.

        Besides this task's own queue time, any sibling holding the same limiter
        whose task vCenter reported ``queued`` for longer than the threshold as of this
        task's completion counts as push-back: waiting for those to finish would let a
        slow start overshoot. When the task reports vCenter's times, the slot count
        revealed and the stuck siblings are read on vCenter's clock (module docstring);
        ``now`` (this process's clock) is used only for a task without times."""
        autos = [lim for kind in ("host", "datastore", "overall") for lim in lease.limiters
                 if lim.key.kind == kind and lim.controller is not None]
        if not autos:
            return
        narrow = autos[0]
        first = narrow.controller
        assert first is not None
        verdict = first.classify(queue_s=queue_s, run_s=run_s)
        capacity = lease.in_flight_before.get(narrow.key, 0)
        snap = _times(lease)
        started = snap.start_time if snap is not None else None
        ended = snap.complete_time if snap is not None else None
        if verdict == "queued" and started is not None:
            # It started the moment one of the tasks ahead of it ended: just before, vCenter
            # ran its full slot count (what we had in flight when we handed it over also
            # counts tasks vCenter had finished and we had not yet heard of).
            capacity = max(1, narrow.running_before(lease, started))
        if verdict == "ok" and ended is not None:
            threshold = first.queued_threshold_s()
            stuck = sum(1 for other in narrow.holders.values()
                        if other is not lease and (o := _times(other)) is not None
                        and _seen_queued(o) and o.queue_time is not None
                        and ended - o.queue_time > threshold)
            if stuck:
                verdict = "queued"
                # vCenter's slots were full until this one ended (someone was waiting).
                capacity = max(1, narrow.running_before(lease, ended))
        elif verdict == "ok" and now is not None:
            threshold = first.queued_threshold_s()
            stuck = sum(1 for other in narrow.holders.values()
                        if other is not lease and other.task is not None
                        and _seen_queued(other.task.snapshot)
                        and now - other.submitted_at > threshold)
            if stuck:
                verdict = "queued"
                # What vCenter runs now: our holders minus this one and the stuck ones.
                capacity = max(1, narrow.in_use - 1 - stuck)
        for lim in autos if verdict == "ok" else autos[:1]:
            c = lim.controller
            assert c is not None
            old = c.limit
            if verdict == "ok":
                limited = lease.was_limited.get(lim.key, False)
                shown = None
                if limited and c.needs_shown and snap is not None and \
                        snap.start_time is not None:
                    shown = lim.running_at(lease, snap.start_time)
                new = c.prompt(run_s=run_s, was_limited=limited, shown=shown)
            else:
                new = c.congested(capacity=capacity if verdict == "queued" else None)
            if new != old:
                lim.capacity.total_tokens = new
                self._on_limit(lim.key, old, new)
                self._on_change()

    def statistics(self) -> list[LimiterStats]:
        """Gauges for every limiter in use, in acquisition order."""
        return [self._limiters[k].stats() for k in sorted(self._limiters)]


def _fmt(limit: float) -> str:
    return "inf" if math.isinf(limit) else str(int(limit))
