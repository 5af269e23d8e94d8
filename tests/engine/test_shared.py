"""Several runs sharing one set of limiters (``fleet serve``): the bounds hold for all of
them together, a small burst is not starved behind a big one, and extra labels land."""

from __future__ import annotations

import anyio
import pytest

from fleet.engine.run import Provisioner
from fleet.engine.shared import SharedLimits
from fleet.engine.spec import LimitsSpec
from tests.engine.conftest import CLONE_ONLY, assert_complete, make_spec, options, vcenter

pytestmark = pytest.mark.anyio


async def test_two_runs_stay_within_the_shared_limits() -> None:
    shared = SharedLimits(LimitsSpec(in_flight=6, per_host=2))
    a = make_spec(name="a", count=40, **CLONE_ONLY)
    b = make_spec(name="b", count=40, **CLONE_ONLY)
    async with vcenter(hosts=4, latency={"instant_clone_s": 0.003}) as (vs, vc):
        runs = [Provisioner(s, vs, options=options(seed=i, shared_limits=shared))
                for i, s in enumerate((a, b))]
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for run in runs:
                    tg.start_soon(run.run)
    assert all(r.summary is not None and r.summary.complete for r in runs)
    assert vc.clones.max_in_flight[""] <= 6
    assert max(vc.clones.peak("host").values()) <= 2
    assert_complete(vc, a)
    assert_complete(vc, b)
    assert shared.runs == 0  # both detached


async def test_a_small_burst_is_not_starved_behind_a_big_one() -> None:
    shared = SharedLimits(LimitsSpec(in_flight=4, per_host=1))
    big = make_spec(name="big", count=300, **CLONE_ONLY)
    small = make_spec(name="small", count=12, **CLONE_ONLY)
    big_ready_when_small_done = -1
    big_ready_when_small_queued = -1
    big_ready = 0
    under_way = anyio.Event()

    def small_queued(event: object) -> None:
        # Fairness starts when the small burst's jobs compete for slots; before that
        # (reading its sources and folder) the big one rightly has them all, for as
        # long as a loaded machine makes that take.
        nonlocal big_ready_when_small_queued
        if getattr(event, "kind", "") == "job_queued" and big_ready_when_small_queued < 0:
            big_ready_when_small_queued = big_ready

    def count_big(event: object) -> None:
        nonlocal big_ready
        if getattr(event, "kind", "") == "job_ready":
            big_ready += 1
            if big_ready >= 20:  # the big burst is well under way
                under_way.set()

    async with vcenter(hosts=4, latency={"instant_clone_s": 0.004}) as (vs, vc):
        big_run = Provisioner(big, vs, on_event=count_big,
                              options=options(seed=1, shared_limits=shared))
        small_run = Provisioner(small, vs, on_event=small_queued,
                                options=options(seed=2, shared_limits=shared))

        async def small_later() -> None:
            nonlocal big_ready_when_small_done
            await under_way.wait()
            await small_run.run()
            big_ready_when_small_done = big_ready

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(big_run.run)
                tg.start_soon(small_later)
    assert small_run.summary is not None and small_run.summary.complete
    assert big_run.summary is not None and big_run.summary.complete
    # Fair share: the small burst gets about half the capacity while both compete, so
    # the big one finishes ~12 more clones meanwhile (at most 12 * 3 allowed), not its
    # remaining ~280.
    assert big_ready_when_small_queued >= 20
    during = big_ready_when_small_done - big_ready_when_small_queued
    assert 0 <= during < 12 * 3, (big_ready_when_small_queued, big_ready_when_small_done)
    assert vc.clones.max_in_flight[""] <= 4


async def test_extra_labels_go_on_new_clones_and_never_override_the_engine_s() -> None:
    spec = make_spec(name="ttl", count=3, **CLONE_ONLY)
    labels = {"guestinfo.fleet.expires_at": "1999999999",
              "guestinfo.fleet.name": "not-this-one"}
    async with vcenter(hosts=4) as (vs, vc):
        summary = await Provisioner(spec, vs, options=options(labels=labels)).run()
    assert summary.complete
    assert_complete(vc, spec)
    for vm in vc.folder_vms(spec.folder_path):
        assert vm.extra_config["guestinfo.fleet.expires_at"] == "1999999999"
        assert vm.extra_config["guestinfo.fleet.name"] == "ttl"
