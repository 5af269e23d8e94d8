"""A clone whose submit got no reply keeps its tokens until it can no longer be running.

``http:lost_reply`` on ``InstantClone_Task`` is vCenter taking the clone and the
connection dropping before the reply (docs/testing.md): the engine has no task,
and the clone runs in vCenter all the same. What vCenter saw is read from the
simulator's own high-water marks (clones in flight, queued ones, per host and
source), never from timings. Clones take :data:`CLONE_S` here, so that, were the
lost clone's tokens handed back at once, the next clones would reach vCenter
while it runs (what makes these tests fail without the fix; the assertions hold
whatever the timing with it).
"""

from __future__ import annotations

import anyio
import pytest

from fleet.engine import provision
from fleet.engine.events import JobAdopted, JobRetried
from fleet.engine.run import Provisioner
from fleet.sim.topology import VmConfig
from fleet.testing.harness import SimVCenter
from tests.engine.conftest import CLONE_ONLY, assert_complete, guest, make_spec, topology, vcenter
from tests.engine.conftest import options as opts
from tests.engine.test_cancel import folder_states
from tests.engine.test_provision import Recorder

pytestmark = pytest.mark.anyio

#: how long a clone takes (vCenter's is about 1 s)
CLONE_S = 0.2
SLOW = {"instant_clone_s": CLONE_S}


def lose_first_reply(vc: SimVCenter, *, fails: bool = False) -> None:
    """vCenter takes lt-0000's first clone and the reply never comes back; ``fails``:
    that clone then fails in vCenter after :data:`CLONE_S`, no VM made."""
    vc.add_fault(method="InstantClone_Task", object="lt-0000", fault="http:lost_reply",
                 max_count=1)
    if fails:
        vc.add_fault(method="InstantClone_Task", object="lt-0000", fault="InvalidDatastore",
                     delay_s=CLONE_S, max_count=1)


async def test_lost_submit_keeps_the_running_source_one_at_a_time() -> None:
    """A running source is cloned one at a time (each clone stuns it and deepens its
    chain): a clone whose reply was lost still holds it."""
    topo = topology(hosts=1, frozen_per_host=0, latency=SLOW,
                    sources=[VmConfig(name="golden", host="esx-01", state="running",
                                      chain_depth=1, guest=guest())])
    spec = make_spec(count=3, sources=[{"name": "golden", "chain_budget": 20}],
                     timeouts={"clone_s": 10.0}, **CLONE_ONLY)
    rec = Recorder()
    async with vcenter(topo) as (vs, vc):
        lose_first_reply(vc)
        summary = await provision(spec, vs, on_event=rec, options=opts())
        await vc.wait_idle()
    assert vc.clones.peak("source") == {"golden": 1}
    assert summary.ready == 3 and summary.adopted == 1 and summary.created == 2
    assert [e.index for e in rec.of(JobAdopted)] == [0]
    # the job adopted the lost clone's VM: where it landed, or when its retry was refused
    # the name the lost clone held
    assert set(vc.clones.faults) <= {"DuplicateName"} and vc.clones.faults["DuplicateName"] <= 1
    assert_complete(vc, spec)
    assert vc.vm("golden").clones == 3
    assert vc.vm("golden").chain_depth() == summary.sources["golden"].chain_depth == 4


@pytest.mark.parametrize("limit", ["per_host", "in_flight", "per_datastore"])
async def test_lost_submit_keeps_its_host_datastore_and_overall_tokens(limit: str) -> None:
    """Two at a time (a host's two slots, or a limit of two overall or per datastore):
    the clone whose reply was lost is one of them until it lands."""
    spec = make_spec(count=4, sources=["frozen-01"], limits={limit: 2},
                     timeouts={"clone_s": 10.0}, **CLONE_ONLY)
    async with vcenter(hosts=1, slots=2 if limit == "per_host" else 8, latency=SLOW) as (vs, vc):
        lose_first_reply(vc)
        summary = await provision(spec, vs, options=opts())
        await vc.wait_idle()
    assert vc.clones.max_in_flight[""] == 2
    assert vc.clones.peak("host") == {"esx-01": 2}
    assert max(vc.clones.peak("datastore").values()) == 2
    assert vc.clones.queued == 0  # vCenter never had to queue one
    assert summary.ready == 4 and summary.adopted == 1 and summary.created == 3
    assert set(vc.clones.faults) <= {"DuplicateName"} and vc.clones.faults["DuplicateName"] <= 1
    assert_complete(vc, spec)


async def test_run_held_only_by_a_lost_submit_that_never_lands_still_finishes() -> None:
    """The only token is held by a clone whose reply was lost and which fails in vCenter:
    no VM ever says it ended, so its token is held for the clone timeout after the reply
    was given up on; the job's retry waits for it, then makes the member."""
    spec = make_spec(count=3, sources=["frozen-01"], limits={"in_flight": 1},
                     timeouts={"clone_s": 2 * CLONE_S}, **CLONE_ONLY)
    rec = Recorder()
    async with vcenter(hosts=1) as (vs, vc):
        lose_first_reply(vc, fails=True)
        with anyio.fail_after(30):  # a hang guard, not a timing
            summary = await provision(spec, vs, on_event=rec, options=opts())
        await vc.wait_idle()
    assert vc.clones.max_in_flight[""] == 1
    assert vc.clones.faults == {"InvalidDatastore": 1}
    assert summary.ready == 3 and summary.adopted == 0 and summary.created == 3
    assert [e.index for e in rec.of(JobRetried)] == [0]
    assert_complete(vc, spec)


async def test_a_reset_submit_does_not_hold_the_job_for_the_clone_timeout() -> None:
    """A submit whose connection was reset before vCenter got it looks the same as one
    whose reply was lost. The job retries at once; once its retry's VM holds the name
    the first submit cannot be cloning, and its token goes: the run does not wait out
    the clone timeout (an hour here)."""
    spec = make_spec(count=4, sources=["frozen-01"], limits={"in_flight": 2},
                     timeouts={"clone_s": 3600.0}, **CLONE_ONLY)
    rec = Recorder()
    async with vcenter(hosts=1) as (vs, vc):
        rule = vc.add_fault(method="InstantClone_Task", object="lt-0000", fault="http:reset",
                            max_count=1)
        with anyio.fail_after(60):  # a hang guard, not a timing
            summary = await provision(spec, vs, on_event=rec, options=opts())
    assert rule.fired == 1
    assert summary.ready == 4 and summary.created == 4 and summary.adopted == 0
    assert [e.index for e in rec.of(JobRetried)] == [0]
    assert vc.clones.max_in_flight[""] <= 2
    assert_complete(vc, spec)


@pytest.mark.parametrize("grace_s", [0.0, 3600.0])
async def test_stop_does_not_wait_for_a_lost_submit(grace_s: float) -> None:
    """A stop while a lost submit holds the only token ends the run within its grace
    period and cleanup: the clone timeout (an hour here) is not waited out, whether the
    grace period cuts the wait off (none) or the stop ends it (an hour), and whatever the
    lost submit made is destroyed or was made a ready member."""
    spec = make_spec(count=3, sources=["frozen-01"], limits={"in_flight": 1},
                     timeouts={"clone_s": 3600.0, "cancel_grace_s": grace_s, "cleanup_s": 1.0},
                     **CLONE_ONLY)
    async with vcenter(hosts=1) as (vs, vc):
        lose_first_reply(vc)
        lost = vc.sim.faults.rules[0]
        p = Provisioner(spec, vs, options=opts())

        def stop_once_lost(obj: object) -> None:
            # the engine looks the lost clone's name up: it knows the reply was lost
            if lost.fired:
                p.stop("test")

        vc.before_call("FindByInventoryPath", stop_once_lost)
        with anyio.fail_after(60):  # a hang guard, not a timing
            await p.run()
        await vc.wait_idle()
        states = folder_states(vc, spec.folder_path)
    assert lost.fired == 1
    assert p.summary is not None and p.summary.cancelled
    assert states == ["ready"] * p.summary.ready
    assert p.summary.ready <= 1  # at most the lost submit's clone, adopted in the grace
    assert vc.sim.counters["clones_total"] == p.summary.ready + vc.destroyed
    assert vc.clones.max_in_flight[""] == 1


async def test_a_refused_submit_is_not_a_lost_one() -> None:
    """vCenter answering the submit with a fault (TaskInProgress: ResourceBusy) made no
    task: nothing is cloning, so no token is held for it and a running source's budget
    does not count it. Here the budget is exactly the three clones asked for."""
    topo = topology(hosts=1, frozen_per_host=0,
                    sources=[VmConfig(name="golden", host="esx-01", state="running",
                                      chain_depth=1, guest=guest())])
    spec = make_spec(count=3, sources=[{"name": "golden", "chain_budget": 4}],
                     timeouts={"clone_s": 3600.0, "queue_s": 2.0}, **CLONE_ONLY)
    async with vcenter(topo) as (vs, vc):
        rule = vc.add_fault(method="InstantClone_Task", object="lt-0000",
                            fault="TaskInProgress", phase="call", max_count=1)
        with anyio.fail_after(60):  # a hang guard, not a timing
            summary = await provision(spec, vs, options=opts())
    assert rule.fired == 1
    assert summary.ready == 3, summary.failures
    assert_complete(vc, spec)
    assert vc.vm("golden").chain_depth() == 4


async def test_a_lost_clone_that_uses_the_last_of_the_budget_is_adopted() -> None:
    """The lost clone lands and takes the running source to its budget: the source is
    retired and no source can take the job's retry, but the job has its member (that
    clone), and adopts it instead of failing as unschedulable."""
    topo = topology(hosts=1, frozen_per_host=0, latency=SLOW,
                    sources=[VmConfig(name="golden", host="esx-01", state="running",
                                      chain_depth=1, guest=guest())])
    spec = make_spec(count=1, sources=[{"name": "golden", "chain_budget": 2}],
                     timeouts={"clone_s": 4 * CLONE_S}, **CLONE_ONLY)
    rec = Recorder()
    async with vcenter(topo) as (vs, vc):
        lose_first_reply(vc)
        summary = await provision(spec, vs, on_event=rec, options=opts())
        await vc.wait_idle()
    assert summary.ready == 1 and summary.adopted == 1, summary.failures
    assert [e.index for e in rec.of(JobAdopted)] == [0]
    assert vc.calls["InstantClone_Task"] == 1  # adopted where it landed, not re-submitted
    assert_complete(vc, spec)
    assert vc.vm("golden").chain_depth() == summary.sources["golden"].chain_depth == 2
