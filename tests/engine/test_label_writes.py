"""A label write whose reply is lost (or late) but which landed is not a failure: the
engine reads the VM back before calling it one. A refused write still fails the job."""

from __future__ import annotations

import pytest

from fleet.engine import provision
from fleet.engine.events import Event, PhaseDone
from fleet.engine.reconcile import LABEL_STATE
from tests.engine.conftest import FROZEN4, assert_complete, make_spec, vcenter
from tests.engine.conftest import options as opts

pytestmark = pytest.mark.anyio


async def test_label_writes_that_landed_without_a_reply_are_not_failures() -> None:
    spec = make_spec(sources=FROZEN4[:2], count=6)
    async with vcenter(hosts=2) as (vs, vc):
        # Every reply of every reconfiguration (the NICs with the "network" label, and
        # the "ready" label) is lost, after vCenter took the change.
        vc.add_fault(method="ReconfigVM_Task", fault="http:lost_reply")
        summary = await provision(spec, vs, options=opts())
    assert summary.failed == 0 and summary.ready == 6, summary.failure_messages
    assert summary.phases["reconnect"].count == 6
    assert_complete(vc, spec)
    assert vc.network_conflicts == 0
    for vm in vc.folder_vms(spec.folder_path):
        assert all(n.connected for n in vm.nics)


@pytest.mark.parametrize(("fault", "after_phase", "left"), [
    # the "ready" label write refused (nothing written), after the reconnect went through
    ("InvalidArgument", "reconnect", "network"),
    # the reconnect (NICs and "network" label) reset before vCenter had it, every time
    ("http:reset", None, "cloned"),
])
async def test_a_label_write_that_did_not_land_still_fails_the_job(
        fault: str, after_phase: str | None, left: str) -> None:
    spec = make_spec(sources=FROZEN4[:1], count=2)
    async with vcenter(hosts=1) as (vs, vc):

        def on_event(event: Event) -> None:
            if isinstance(event, PhaseDone) and event.phase == after_phase:
                vc.add_fault(method="ReconfigVM_Task", object=event.name, fault=fault,
                             phase="call")

        if after_phase is None:
            vc.add_fault(method="ReconfigVM_Task", fault=fault)
        summary = await provision(spec, vs, on_event=on_event, options=opts())
    assert summary.ready == 0 and summary.failed == 2
    assert {vm.extra_config[LABEL_STATE] for vm in vc.folder_vms(spec.folder_path)} == {left}
