"""A label write whose reply is lost (or late) but which landed is not a failure: the
engine reads the VM back before calling it one. A refused write still fails the job."""

from __future__ import annotations

import pytest

from fleet.engine import provision
from fleet.engine.reconcile import LABEL_STATE
from fleet.errors import ConnectionFailed, VSphereFault
from fleet.vsphere.fake import FaultRule, make_fake
from tests.engine.conftest import CREDS, FROZEN4, assert_complete, make_spec
from tests.engine.conftest import options as opts

pytestmark = pytest.mark.anyio


async def test_label_writes_that_landed_without_a_reply_are_not_failures() -> None:
    fake = make_fake(hosts=2, credentials=CREDS)
    # Every reply of every label write is lost, after the write was made.
    fake.add_fault(FaultRule("set_nics_connected", ConnectionFailed, lost_reply=True))
    fake.add_fault(FaultRule("update_extra_config", ConnectionFailed, lost_reply=True))
    spec = make_spec(sources=FROZEN4[:2], count=6)
    async with fake:
        summary = await provision(spec, fake, options=opts())
    assert summary.failed == 0 and summary.ready == 6, summary.failure_messages
    assert summary.phases["reconnect"].count == 6
    assert_complete(fake, spec)
    assert fake.stats.network_conflicts == 0
    for vm in fake.folder_vms(spec.folder_path):
        assert all(n.connected for n in vm.nics)


@pytest.mark.parametrize(("method", "error", "left"), [
    ("update_extra_config", VSphereFault, "network"),  # refused: nothing written
    ("set_nics_connected", ConnectionFailed, "cloned"),  # lost before vCenter had it
])
async def test_a_label_write_that_did_not_land_still_fails_the_job(
        method: str, error: type[Exception], left: str) -> None:
    fake = make_fake(hosts=1, credentials=CREDS)
    fake.add_fault(FaultRule(method, error))  # type: ignore[arg-type]
    spec = make_spec(sources=FROZEN4[:1], count=2)
    async with fake:
        summary = await provision(spec, fake, options=opts())
    assert summary.ready == 0 and summary.failed == 2
    assert {vm.extra_config[LABEL_STATE] for vm in fake.folder_vms(spec.folder_path)} == {left}
