"""Fault handling the chaos runs rely on, pinned down one fault at a time.

Fast tests: the engine and the client against a simulator in process, the client
against a small simulator served over HTTP.
"""

from __future__ import annotations

import anyio
import pytest

from fleet.engine import provision
from tests.chaos.conftest import client
from tests.engine.conftest import CLONE_ONLY, FROZEN4, make_spec, vcenter
from tests.engine.conftest import options as opts
from tests.simproc import SimProcess

pytestmark = pytest.mark.anyio


async def test_a_submit_that_never_reached_vcenter_is_not_waited_for() -> None:
    """A clone submit that provably never reached vCenter (connection refused, 503) made
    nothing: the job is retried and failed without waiting out the clone timeout for a
    clone that cannot land."""
    # Waiting out the clone timeout once would take an hour; the run takes milliseconds,
    # so a bound of a minute tells the two apart on any machine.
    spec = make_spec(sources=FROZEN4[:2], count=4, retries={"attempts": 3},
                     timeouts={"clone_s": 3600.0}, **CLONE_ONLY)
    async with vcenter(hosts=2) as (vs, vc):
        # every submit of lt-0001 answered 503 by a proxy or balancer: never delivered
        rule = vc.add_fault(method="InstantClone_Task", object="lt-0001", fault="http:503")
        with anyio.fail_after(60):
            summary = await provision(spec, vs, options=opts())
    # the session repeats a call that provably never ran: each engine attempt is
    # 1 + max_retries submits
    assert rule.fired == 3 * (1 + vs.session.retry.max_retries)
    assert summary.failures == {"connection": 1} and summary.ready == 3


async def test_login_survives_resets_503s_and_a_lost_reply() -> None:
    """The first Login meets a 503, a reset and a lost reply: the client logs in anyway
    (each attempt on a fresh session), and so does a re-login after an expiry."""
    with SimProcess(time_scale=0.05) as sim:
        sim.add_faults({"method": "Login", "fault": "http:503", "max_count": 1},
                       {"method": "Login", "fault": "http:reset", "max_count": 1},
                       {"method": "Login", "fault": "http:lost_reply", "max_count": 1})
        async with client(sim) as vs:
            assert (await vs.find_vms(["frozen-01"]))[0].name == "frozen-01"
            assert vs.stats["retries"]["Login"] == 3
            sim.add_faults({"method": "Login", "fault": "http:reset", "max_count": 2})
            await anyio.to_thread.run_sync(sim.expire_sessions)
            assert (await vs.find_vms(["frozen-02"]))[0].name == "frozen-02"
            assert vs.stats["relogins"] == 1
            assert vs.stats["retries"]["Login"] == 5


async def test_folder_creation_survives_resets_and_a_lost_reply() -> None:
    """CreateFolder is not safe to repeat blindly (a lost reply made the folder), so the
    client looks before asking again; a reset (nothing made) must not end the run."""
    with SimProcess(time_scale=0.05) as sim:
        sim.add_faults({"method": "CreateFolder", "fault": "http:reset", "max_count": 2},
                       {"method": "CreateFolder", "fault": "http:lost_reply", "max_count": 2})
        async with client(sim) as vs:
            made = await vs.ensure_folder("fleet/a/b")
            assert await vs.find_folder("fleet/a/b") == made
            assert await vs.ensure_folder("fleet/a/b") == made
        assert sim.stats()["faults_by_type"] == {"http:reset": 2, "http:lost_reply": 2}
