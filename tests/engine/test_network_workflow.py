"""The guest network workflow's calls per member, and what a stop mid-way leaves behind."""

from __future__ import annotations

import pytest

from fleet.engine import provision
from fleet.engine.reconcile import LABEL_STATE
from tests.engine.conftest import FROZEN4, Counted, assert_complete, make_spec, vcenter
from tests.engine.conftest import options as opts

pytestmark = pytest.mark.anyio


async def test_reconnect_and_network_label_are_one_reconfiguration() -> None:
    spec = make_spec(count=40)
    async with vcenter(hosts=4) as (vs, vc):
        counted = Counted(vs)
        summary = await provision(spec, counted,  # type: ignore[arg-type]
                                  options=opts(refresh_interval_s=60))
    assert summary.ready == 40
    assert_complete(vc, spec)
    calls = counted.calls
    assert calls["set_nics_connected"] == 40  # connect + "network" label together
    assert calls["update_extra_config"] == 40  # the "ready" label only
    assert calls["wait_for_vm"] + calls["wait_for_vm_state"] == 40
    assert calls["get_vm"] <= 5  # the readiness wait reads nothing back
    assert summary.phases["reconnect"].count == 40
    # on the wire: two reconfigurations per member, one guest program
    assert vc.calls["ReconfigVM_Task"] == 2 * 40
    assert vc.calls["StartProgramInGuest"] == 40
    assert vc.network_conflicts == 0


async def test_failed_reconnect_leaves_nics_down_and_the_label_unchanged() -> None:
    spec = make_spec(sources=FROZEN4[:1], count=3)
    async with vcenter(hosts=1) as (vs, vc):
        # vCenter refuses the reconnect (a fault fleet cannot retry)
        rule = vc.add_fault(method="ReconfigVM_Task", fault="InvalidArgument", phase="call")
        first = await provision(spec, vs, options=opts())
        assert first.failures == {"fault": 3}
        for vm in vc.folder_vms(spec.folder_path):
            assert vm.extra_config[LABEL_STATE] == "cloned"
            assert not any(n.connected for n in vm.nics)
        vc.remove_fault(rule)
        second = await provision(spec, vs, options=opts())
    assert second.created == 0 and second.ready == 3 and second.adopted == 3
    assert vc.calls["StartProgramInGuest"] == 6  # refreshed again before connecting
    assert_complete(vc, spec)
    assert vc.network_conflicts == 0
