"""Limiters: fixed acquisition order, all-or-nothing, and the AIMD arithmetic of ``auto``."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.engine.limits import AimdController, AutoTuning, Lease, Limiters, LimitKey
from fleet.engine.spec import LimitsSpec
from fleet.vsphere.model import Ref, TaskSnapshot, TaskState

# A small initial host window keeps the arithmetic below short (the default is 8).
T = AutoTuning(host_initial=2, queued_min_s=0.01, queued_fraction=0.0, latency_floor_s=0.05)


def test_keys_are_in_fixed_order() -> None:
    lim = Limiters(LimitsSpec())
    keys = lim.keys_for(host="h1", datastore="ds1", running_source="vm-1")
    assert [k.kind for k in keys] == ["overall", "host", "datastore", "source"]
    assert [k.kind for k in lim.keys_for(host="h1", datastore=None, running_source=None)] == \
        ["overall", "host"]
    assert str(keys[1]) == "host:h1" and str(keys[0]) == "overall"


@pytest.mark.anyio
async def test_try_acquire_is_all_or_nothing() -> None:
    changes: list[int] = []
    lim = Limiters(LimitsSpec(in_flight=3, per_host=2, per_running_source=1),
                   on_change=lambda: changes.append(1))
    a = lim.keys_for(host="h1", datastore="d", running_source="src")
    b = lim.keys_for(host="h1", datastore="d", running_source=None)
    first = lim.try_acquire(a, "job1")
    assert first is not None
    assert lim.try_acquire(a, "job2") is None  # the running source is busy...
    assert lim.get(LimitKey.of("host", "h1")).in_use == 1  # ...and nothing stayed held
    assert lim.get(LimitKey.of("overall")).in_use == 1
    second = lim.try_acquire(b, "job3")
    assert second is not None
    assert lim.try_acquire(b, "job4") is None  # host h1 is full (2)
    assert lim.blocked_by(b) == "host:h1 2/2 in flight"
    c = lim.keys_for(host="h2", datastore="d", running_source=None)
    third = lim.try_acquire(c, "job5")
    assert third is not None
    assert lim.blocked_by(c) == "overall 3/3 in flight"
    lim.release(first)
    lim.release(first)  # idempotent
    assert lim.get(LimitKey.of("overall")).in_use == 2
    assert changes
    stats = {s.key: s for s in lim.statistics()}
    assert stats["host:h1"].in_use == 1 and stats["host:h1"].peak == 2
    assert stats["source:src"].limit == 1 and not stats["overall"].auto


@pytest.mark.anyio
async def test_waiting_acquire_releases_everything_when_cancelled() -> None:
    lim = Limiters(LimitsSpec(in_flight=5, per_host=1))
    keys = lim.keys_for(host="h", datastore=None, running_source=None)
    held = lim.try_acquire(keys, "holder")
    assert held is not None
    with anyio.move_on_after(0.01):
        await lim.acquire(keys, "waiter")
    assert lim.get(LimitKey.of("overall")).in_use == 1  # the waiter's overall token is back
    lim.release(held)
    got = await lim.acquire(keys, "waiter")
    assert lim.get(LimitKey.of("host", "h")).in_use == 1
    lim.release(got)


def test_aimd_slow_start_then_cut_to_revealed_capacity() -> None:
    c = AimdController(2, 1, 64, T)
    for _ in range(7):
        c.completed(queue_s=0.0, run_s=0.1, in_flight_before=c.limit - 1, was_limited=True)
    assert c.limit == 9 and c.slow_start
    # a task that sat queued while 8 other of ours ran: vCenter runs 8
    c.completed(queue_s=0.5, run_s=0.1, in_flight_before=8, was_limited=True)
    assert c.limit == 8 and not c.slow_start and c.ceiling == 9
    c.limit = 12
    c._hold = 0
    c.completed(queue_s=0.5, run_s=0.1, in_flight_before=8, was_limited=True)
    assert c.limit == 8 and c.decreases == 2


def test_aimd_one_cut_per_window() -> None:
    c = AimdController(20, 1, 64, T)
    c.congested(capacity=None)
    assert c.limit == 14  # 20 * 0.7
    for _ in range(5):
        c.completed(queue_s=1.0, run_s=0.1, in_flight_before=3, was_limited=True)
    assert c.limit == 14  # the rest of the window's push-back is old news


def test_aimd_additive_increase_and_plateau() -> None:
    c = AimdController(4, 1, 64, T)
    c.congested(capacity=4)  # ceiling 5, limit 3
    assert c.limit == 3
    n = 0
    while c.limit < 4:
        c.completed(queue_s=0, run_s=0.1, in_flight_before=3, was_limited=True)
        n += 1
    assert 3 <= n <= 3 + 3 + 1  # one window to wait out, one window of +1/limit
    n = 0
    while c.limit < 5:
        c.completed(queue_s=0, run_s=0.1, in_flight_before=4, was_limited=True)
        n += 1
    assert n >= 4 * T.plateau_slowdown  # probing the known ceiling is slow
    for _ in range(200):
        c.completed(queue_s=0, run_s=0.1, in_flight_before=4, was_limited=False)
    assert c.limit == 5  # a limit that does not bind does not grow


def test_aimd_latency_spike_is_multiplicative() -> None:
    c = AimdController(10, 1, 64, T)
    c.slow_start = False
    for _ in range(20):
        c.completed(queue_s=0, run_s=0.1, in_flight_before=9, was_limited=False)
    assert c.baseline_s == pytest.approx(0.1)
    c.completed(queue_s=0, run_s=0.2, in_flight_before=9, was_limited=False)
    assert c.limit == 10  # twice the baseline is not a spike
    c.completed(queue_s=0, run_s=1.0, in_flight_before=9, was_limited=False)
    assert c.limit == 7 and c.decreases == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 2), st.floats(0.01, 3), st.integers(0, 100),
                          st.booleans()), max_size=300),
       st.integers(1, 10), st.integers(10, 100))
def test_property_aimd_stays_in_bounds(events: list[tuple[float, float, int, bool]],
                                       initial: int, maximum: int) -> None:
    c = AimdController(initial, 1, maximum, T)
    for queue_s, run_s, before, limited in events:
        old = c.limit
        new = c.completed(queue_s=queue_s, run_s=run_s, in_flight_before=before,
                          was_limited=limited)
        assert 1 <= new <= maximum
        assert new <= old + 1  # never more than one step up at a time
        if queue_s > c.queued_threshold_s() and new < old:
            assert new <= max(1, before)  # a cut lands at most at what vCenter ran


@pytest.mark.anyio
async def test_auto_limiter_feeds_the_narrowest_and_grows_the_rest() -> None:
    changed: list[tuple[str, float, float]] = []
    lim = Limiters(LimitsSpec(in_flight="auto", per_host="auto"), tuning=T,
                   on_limit=lambda k, o, n: changed.append((str(k), o, n)))
    keys = lim.keys_for(host="h", datastore=None, running_source=None)
    host = lim.get(LimitKey.of("host", "h"))
    overall = lim.get(LimitKey.of("overall"))
    assert host.limit == T.host_initial and overall.limit == T.overall_initial
    a = lim.try_acquire(keys, "a")
    b = lim.try_acquire(keys, "b")
    assert a is not None and b is not None
    assert lim.try_acquire(keys, "c") is None  # host auto starts at 2
    lim.completed(a, queue_s=0.0, run_s=0.1)  # a found the host limit half used: slow start
    assert host.limit == 3
    lim.completed(b, queue_s=0.0, run_s=0.1)  # b filled it: +1 again
    lim.release(b)
    assert host.limit == 4
    # The overall limit was never half used (1 or 2 of 64): it does not grow.
    assert overall.limit == T.overall_initial
    lim.completed(a, queue_s=1.0, run_s=0.1)  # a sat queued with nobody else ahead
    lim.release(a)
    assert host.limit == 1 and overall.limit == T.overall_initial
    assert changed == [("host:h", 2, 3), ("host:h", 3, 4), ("host:h", 4, 1)]


def test_auto_host_limit_starts_at_vspheres_eight_slots_and_probes_beyond() -> None:
    tuning = AutoTuning()
    assert tuning.host_initial == 8 and tuning.host_slow_start_until is None
    c = AimdController(tuning.host_initial, 1, tuning.host_max, tuning,
                       tuning.host_slow_start_until)
    for _ in range(8):  # one round trip of prompt completions on a 16-slot host
        c.prompt(run_s=1.0, was_limited=True)
    assert c.limit == 16 and c.slow_start
    c.prompt(run_s=1.0, was_limited=True)
    c.congested(capacity=16)  # the 17th queued: the host showed its slots
    assert c.limit == 16 and not c.slow_start and c.ceiling == 17


def test_host_slow_start_stops_at_vspheres_eight_slots() -> None:
    c = AimdController(2, 1, 64, AutoTuning(), slow_start_until=8)
    for _ in range(6):
        c.prompt(run_s=1.0, was_limited=True)
    assert c.limit == 8 and not c.slow_start
    for _ in range(8):  # congestion avoidance: one window of completions for one step
        c.prompt(run_s=1.0, was_limited=True)
    assert c.limit == 9


class _Task:
    """A vCenter task as the client last saw it: a state and vCenter's own times."""

    def __init__(self, state: TaskState, queued: float | None = None,
                 started: float | None = None, ended: float | None = None):
        self.ref = Ref("Task", f"task-{id(self)}")
        self.snapshot = TaskSnapshot(self.ref, state, queued, started, ended)

    async def wait(self, timeout_s: float | None = None) -> Any:
        raise NotImplementedError

    async def cancel(self) -> None:
        raise NotImplementedError


@pytest.mark.anyio
@pytest.mark.parametrize(("reported", "cut"), [(False, False), (True, True)])
async def test_a_sibling_vcenter_has_said_nothing_of_is_not_push_back(reported: bool,
                                                                       cut: bool) -> None:
    """A sibling long submitted whose task vCenter has not reported yet (the client's
    first update of it is still to come: its snapshot says "queued", with no queue
    time) is no evidence that vCenter queued it, and must not cut the host limit
    below what it runs; one vCenter reported queued is."""
    lim = Limiters(LimitsSpec(in_flight=64, per_host="auto"), tuning=T)
    keys = lim.keys_for(host="h", datastore=None, running_source=None)
    host = lim.get(LimitKey.of("host", "h"))
    a = lim.try_acquire(keys, "a")
    b = lim.try_acquire(keys, "b")
    assert a is not None and b is not None and host.limit == 2
    a.submitted(_Task("running", 100.0, 100.0), 0.0)
    b.submitted(_Task("queued", 100.0 if reported else None), 0.0)
    lim.completed(a, queue_s=0.0, run_s=0.1, now=1.0)
    assert (host.limit < 2) is cut, host.limit


def _hold(lim: Limiters, n: int, name: str) -> list[Lease]:
    keys = lim.keys_for(host="h", datastore=None, running_source=None)
    leases = [lim.try_acquire(keys, f"{name}{i}") for i in range(n)]
    assert all(lease is not None for lease in leases)
    return [lease for lease in leases if lease is not None]


@pytest.mark.anyio
async def test_queued_task_reveals_the_slots_vcenter_ran_not_our_lagging_count() -> None:
    """A loaded client hears of finished tasks late: when it handed a task over, its
    leases still counted three that vCenter had finished. vCenter queued the task behind
    its 8 slots; the cut goes to 8 (what vCenter ran just before starting it, on
    vCenter's clock), not to the 11 leases we held."""
    lim = Limiters(LimitsSpec(per_host="auto"), tuning=AutoTuning(host_initial=15))
    host = lim.get(LimitKey.of("host", "h"))
    done = _hold(lim, 3, "done")  # finished at 99.9, not yet heard of
    running = _hold(lim, 8, "run")  # vCenter's 8 slots from 100.0; 4 free at 101.0
    queued = _hold(lim, 4, "q")  # arrived at 100.1, waited for those slots
    for lease in done:
        lease.submitted(_Task("success", 99.0, 99.0, 99.9), 0.0)
    for i, lease in enumerate(running):
        lease.submitted(_Task("success", 100.0, 100.0, 101.0) if i < 4
                        else _Task("running", 100.0, 100.0), 0.0)
    for lease in queued:
        lease.submitted(_Task("success", 100.1, 101.0, 102.0), 0.0)
    first = queued[0]
    assert first.in_flight_before[host.key] == 11
    lim.completed(first, queue_s=0.9, run_s=1.0, now=10.0)
    assert host.limit == 8


@pytest.mark.anyio
async def test_a_queued_task_that_started_a_moment_after_its_slot_freed_reveals_them_all(
        ) -> None:
    """vCenter starts a queued task a moment after the completion that freed its slot
    (its own clock, read twice: 100.9 then 100.9002). The task queued behind 3 slots;
    the cut goes to 3, not to the 2 still running at its start."""
    lim = Limiters(LimitsSpec(per_host="auto"), tuning=AutoTuning(host_initial=4))
    host = lim.get(LimitKey.of("host", "h"))
    running = _hold(lim, 3, "run")  # vCenter's 3 slots from 100.0
    queued = _hold(lim, 1, "q")  # arrived at 100.1, waited for the first slot to free
    running[0].submitted(_Task("success", 100.0, 100.0, 100.9), 0.0)
    for lease in running[1:]:
        lease.submitted(_Task("running", 100.0, 100.0), 0.0)
    queued[0].submitted(_Task("success", 100.1, 100.9002, 101.9), 0.0)
    lim.release(running[0])  # heard of: its completion is history the count reads
    lim.completed(queued[0], queue_s=0.8002, run_s=1.0, now=10.0)
    assert host.limit == 3


@pytest.mark.anyio
async def test_a_sibling_is_stuck_only_if_vcenter_said_queued_long_enough() -> None:
    """A completion counts a sibling as push-back only on vCenter's word and clock: not
    a task the client has had no update for yet (it shows ``queued`` by default), nor
    one vCenter queued a moment before this one ended, however long this process took
    to get round to it (a stalled event loop: ``now`` is seconds after submission)."""
    def run(sibling: _Task) -> int:
        lim = Limiters(LimitsSpec(per_host="auto"), tuning=T)
        host = lim.get(LimitKey.of("host", "h"))
        # vCenter ran a peer beside this task: a window of 2, which slow start may
        # double. We heard of the peer's end and handed the sibling over in its place.
        peer, me = _hold(lim, 2, "x")
        peer.submitted(_Task("success", 100.0, 100.0, 100.05), 0.0)
        me.submitted(_Task("success", 100.0, 100.0, 100.1), 0.0)
        lim.release(peer)
        other, = _hold(lim, 1, "o")
        other.submitted(sibling, 0.0)
        lim.completed(me, queue_s=0.0, run_s=0.1, now=5.0)
        return int(host.limit)

    assert T.host_initial == 2
    assert run(_Task("queued")) == 3  # never heard of: prompt, slow start grows
    assert run(_Task("queued", queued=100.095)) == 3  # queued 5 ms before 100.1
    # Queued 40 ms (threshold 10 ms) when this one ended: the slot count is what
    # vCenter ran just before 100.1, this task alone.
    assert run(_Task("queued", queued=100.06)) == 1


def _rounds(lim: Limiters, *, slots: int, gap_s: float, rounds: int, t0: float = 100.0
            ) -> list[int]:
    """The host limit after each of ``rounds`` rounds on a host with ``slots``, where
    10 ms clones start first come first served. Each round fills the limit; a loaded
    client hands the tasks over ``gap_s`` apart on vCenter's clock, and hears of all
    their ends afterwards in one backlog (its leases counted them all in flight)."""
    host = lim.get(LimitKey.of("host", "h"))
    limits = []
    for r in range(rounds):
        leases = _hold(lim, int(host.limit), f"{t0}-{r}-")
        starts: list[float] = []
        for i, lease in enumerate(leases):
            arrived = t0 + r + i * gap_s
            start = arrived if i < slots else max(arrived, starts[i - slots] + 0.01)
            starts.append(start)
            lease.submitted(_Task("success", arrived, start, start + 0.01), 0.0)
        for lease, start in zip(leases, starts, strict=True):
            snap = lease.task.snapshot if lease.task is not None else None
            assert snap is not None and snap.queue_time is not None
            lim.completed(lease, queue_s=start - snap.queue_time, run_s=0.01, now=1e4)
            lim.release(lease)
        limits.append(int(host.limit))
    return limits


def _auto_host() -> Limiters:
    return Limiters(LimitsSpec(per_host="auto"), tuning=AutoTuning(queued_min_s=0.005))


@pytest.mark.anyio
async def test_slow_start_doubles_at_most_the_window_vcenter_ran() -> None:
    """A prompt completion is evidence only for the window vCenter ran of ours when it
    started the task. A loaded client hands tasks over slower than 8 slots run them
    (2.5 ms apart: vCenter runs 4 at once), or a little faster (1 ms apart: each waits
    a few ms, under the 5 ms threshold): our leases count the whole limit in flight,
    but slow start must not take the limit past twice what vCenter ran, round after
    round. It went 13, 20, 31, 47, 64 at 2.5 ms, and 13, 20, 31 at 1 ms before a task
    at last waited past the threshold. Shown a whole window at once, it grows on."""
    for gap_s in (0.0025, 0.001):
        limits = _rounds(_auto_host(), slots=8, gap_s=gap_s, rounds=6)
        assert max(limits) <= 2 * 8, (gap_s, limits)
    limits = _rounds(_auto_host(), slots=64, gap_s=0.0001, rounds=3)
    assert limits[-1] > 2 * 8, limits


@pytest.mark.anyio
async def test_a_ceiling_is_passed_only_once_vcenter_ran_that_many() -> None:
    """After a cut to the 8 slots a queued task revealed, the limit probes 9 (its
    ceiling). A loaded client's 9th task arrives as a slot frees and waits a moment, under
    the threshold: a prompt completion, but vCenter still ran only 8, so the ceiling
    stands. Before, the limit passed it on our own count and grew on (10, 11, ...)."""
    lim = _auto_host()
    # All at once: slow start past 8, then the tasks past 8 wait 10 ms: cut to 8.
    assert _rounds(lim, slots=8, gap_s=0.0, rounds=2)[-1] == 8
    limits = _rounds(lim, slots=8, gap_s=0.001, rounds=40, t0=200.0)
    assert 9 in limits and max(limits) == 9, limits
