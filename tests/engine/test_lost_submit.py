"""A clone submit: what the engine does when vCenter refuses it or its reply is lost."""

from __future__ import annotations

import anyio
import pytest

from fleet.engine import provision
from fleet.sim.topology import VmConfig
from tests.engine.conftest import CLONE_ONLY, assert_complete, guest, make_spec, topology, vcenter
from tests.engine.conftest import options as opts

pytestmark = pytest.mark.anyio


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
