"""Label writes whose replies vCenter sends but fleet never gets (``http:lost_reply`` on
every ReconfigVM_Task of a real ``fleet sim``): the writes landed, so the members are
ready, not failed; fleet reads each VM back before calling a write failed."""

from __future__ import annotations

import pytest

from fleet.engine.operations import provision, status
from fleet.vsphere.client import VSphereClient
from tests.simproc import PASSWORD, USER, SimProcess
from tests.specs import make_spec

pytestmark = pytest.mark.anyio


async def test_label_writes_that_landed_without_a_reply_leave_ready_members() -> None:
    with SimProcess(time_scale=0.02) as sim:
        sim.add_faults({"method": "ReconfigVM_Task", "fault": "http:lost_reply"})
        spec = make_spec(sim, "lostlabel", 4, sources=["frozen-01", "frozen-02"],
                         retries={"attempts": 2})
        async with VSphereClient(sim.url, USER, PASSWORD, thumbprint=sim.thumbprint) as vs:
            summary = await provision(spec, vs)
            assert summary.ready == 4 and summary.failed == 0, summary.failure_messages
            now = await status(spec, vs)
        assert now.by_state == {"ready": 4}
        stats = sim.stats()
        # Every label write lost its reply (the network one and the final one, each
        # member), and none made a member look other than it is.
        assert stats["faults_by_type"]["http:lost_reply"] >= 2 * 4
        assert stats["network_conflicts"] == 0
