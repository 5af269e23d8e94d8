"""Stopping a run (Ctrl-C, a deadline, ``stop()``) leaves no half-made VM behind."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from fleet.engine.events import Event, JobCleanedUp, JobReady, JobRetried, PhaseDone
from fleet.engine.reconcile import LABEL_NAME, LABEL_STATE
from fleet.engine.run import Provisioner
from fleet.testing.harness import SimVCenter
from tests.engine.conftest import FROZEN4, make_spec, vcenter
from tests.engine.conftest import options as opts

pytestmark = pytest.mark.anyio

SLOW = {"instant_clone_s": 0.03, "guest_program_s": 0.01, "reconfigure_s": 0.005}


class CancelAt:
    """Cancel the run's scope the moment its events show a given point of progress (not
    after a wall-clock delay, which on a loaded machine can come before the run has
    started anything, or after it has finished what the test means to interrupt).

    ``scope`` is the ``move_on_after`` scope around ``run()``: its deadline is set to
    now, so the run is cancelled exactly as by a deadline that expires."""

    def __init__(self, when: Callable[[Event], bool]) -> None:
        self.when = when
        self.scope: anyio.CancelScope | None = None
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if self.scope is not None and self.when(event):
            self.scope.deadline = anyio.current_time()

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


def nth(kind: type[Event], n: int, **fields: object) -> Callable[[Event], bool]:
    """True at the ``n``-th event of ``kind`` whose fields match."""
    seen = 0

    def check(event: Event) -> bool:
        nonlocal seen
        if isinstance(event, kind) and all(getattr(event, k) == v for k, v in fields.items()):
            seen += 1
            return seen == n
        return False

    return check


def folder_states(vc: SimVCenter, path: str) -> list[str]:
    """The state label of every VM in the folder ("" for one without our labels)."""
    return [vm.extra_config.get(LABEL_STATE, "") if vm.extra_config.get(LABEL_NAME) == "lt"
            else "" for vm in vc.folder_vms(path)]


async def test_deadline_with_no_grace_destroys_everything_unfinished() -> None:
    spec = make_spec(count=200, timeouts={"cancel_grace_s": 0.0})
    # The deadline comes with 20 members ready: the other 180 are queued, cloning (up to
    # 32 at once) or in their guest phases.
    cancel = CancelAt(nth(JobReady, 20))
    async with vcenter(hosts=4, latency=SLOW) as (vs, vc):
        p = Provisioner(spec, vs, on_event=cancel, options=opts())
        with anyio.move_on_after(60) as scope:
            cancel.scope = scope
            await p.run()
        assert scope.cancelled_caught
        await vc.wait_idle()
        states = folder_states(vc, spec.folder_path)
    cleaned = cancel.of(JobCleanedUp)
    assert set(states) <= {"ready"}, states
    assert p.summary is not None and p.summary.cancelled
    assert p.summary.ready == len(states) < 200
    assert p.summary.failures.get("cancelled") == 200 - p.summary.ready
    assert cleaned  # there were clones in flight, and they were destroyed
    assert vc.destroyed == len(cleaned)
    assert vc.network_conflicts == 0


async def test_deadline_with_grace_lets_in_flight_clones_finish() -> None:
    spec = make_spec(count=200, timeouts={"cancel_grace_s": 5.0})
    cancel = CancelAt(nth(JobReady, 20))
    async with vcenter(hosts=4, latency=SLOW) as (vs, vc):
        p = Provisioner(spec, vs, on_event=cancel, options=opts())
        with anyio.move_on_after(60) as scope:
            cancel.scope = scope
            await p.run()
        assert scope.cancelled_caught
        await vc.wait_idle()
        states = folder_states(vc, spec.folder_path)
    assert set(states) == {"ready"}
    assert p.summary is not None and p.summary.cancelled
    assert vc.destroyed == 0  # everything in flight finished
    assert vc.sim.counters["clones_total"] == len(states) == p.summary.ready
    assert 20 <= p.summary.ready < 200


async def test_stop_returns_a_summary() -> None:
    spec = make_spec(count=300)
    ready = 0

    def on_event(event: Event) -> None:
        nonlocal ready
        if isinstance(event, JobReady):
            ready += 1
            if ready == 20:
                p.stop("operator pressed Ctrl-C")

    async with vcenter(hosts=4, latency=SLOW) as (vs, vc):
        p = Provisioner(spec, vs, on_event=on_event, options=opts())
        summary = await p.run()
        await vc.wait_idle()
        states = folder_states(vc, spec.folder_path)
    assert summary.cancelled and not summary.complete
    assert set(states) == {"ready"} and len(states) == summary.ready >= 20
    assert summary.failures == {"cancelled": 300 - summary.ready}
    assert summary.failed == 300 - summary.ready


async def test_cancel_while_lost_replies_are_pending_leaks_nothing() -> None:
    spec = make_spec(count=40, sources=FROZEN4[:2], network={"refresh": "none",
                                                             "disconnect_at_clone": False},
                     readiness={"wait_for": "none"},
                     retries={"attempts": 5, "backoff_base_s": 0.2, "backoff_max_s": 0.2,
                              "jitter": 0.0},
                     timeouts={"cancel_grace_s": 0.0, "clone_s": 0.5})
    # Cancelled as soon as a submit's reply is lost: that job waits out its backoff
    # (0.2 s) with a clone it may have made, while others are in flight.
    cancel = CancelAt(nth(JobRetried, 1))
    async with vcenter(hosts=2, latency={"instant_clone_s": 0.03}, seed=5) as (vs, vc):
        # every other submit "fails" although vCenter got it and is cloning
        rule = vc.add_fault(method="InstantClone_Task", fault="http:lost_reply",
                              probability=0.5)
        p = Provisioner(spec, vs, on_event=cancel, options=opts())
        with anyio.move_on_after(60) as scope:
            cancel.scope = scope
            await p.run()
        assert scope.cancelled_caught
        await vc.wait_idle()
        names = sorted(vm.name for vm in vc.folder_vms(spec.folder_path))
    assert rule.fired > 0
    assert p.summary is not None
    # whatever a lost reply made was found and destroyed: only ready members remain
    assert len(names) == p.summary.ready
    assert vc.sim.counters["clones_total"] == p.summary.ready + vc.destroyed


async def test_cancel_during_guest_phases_cleans_up_resumed_members_too() -> None:
    spec = make_spec(count=10, sources=FROZEN4[:2], timeouts={"cancel_grace_s": 0.01})
    # Cancelled when the tenth clone has landed: every member is in its guest phase
    # (0.2 s per guest operation, clones 1 ms).
    cancel = CancelAt(nth(PhaseDone, 10, phase="clone"))
    async with vcenter(hosts=2, latency={"instant_clone_s": 0.001,
                                         "guest_program_s": 0.2}) as (vs, vc):
        p = Provisioner(spec, vs, on_event=cancel, options=opts())
        with anyio.move_on_after(60) as scope:
            cancel.scope = scope
            await p.run()
        assert scope.cancelled_caught
        await vc.wait_idle()
        assert vc.folder_vms(spec.folder_path) == []  # all were in the slow guest phase
        assert vc.destroyed == 10
        assert p.summary is not None and p.summary.ready == 0
