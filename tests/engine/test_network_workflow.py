"""The guest network workflow's calls per member, and what a stop mid-way leaves behind."""

from __future__ import annotations

import pytest

from fleet.engine import provision
from fleet.engine.reconcile import LABEL_STATE
from fleet.errors import VSphereFault
from fleet.vsphere.fake import FaultRule, make_fake
from tests.engine.conftest import CREDS, FROZEN4, assert_complete, make_spec
from tests.engine.conftest import options as opts

pytestmark = pytest.mark.anyio


async def test_reconnect_and_network_label_are_one_reconfiguration() -> None:
    fake = make_fake(hosts=4, credentials=CREDS)
    spec = make_spec(count=40)
    async with fake:
        summary = await provision(spec, fake, options=opts(refresh_interval_s=60))
    assert summary.ready == 40
    assert_complete(fake, spec)
    calls = fake.stats.calls
    assert calls["set_nics_connected"] == 40  # connect + "network" label together
    assert calls["update_extra_config"] == 40  # the "ready" label only
    assert calls["wait_for_vm"] == 40
    assert calls["get_vm"] <= 5  # the readiness wait reads nothing back
    assert summary.phases["reconnect"].count == 40
    assert fake.stats.network_conflicts == 0


async def test_failed_reconnect_leaves_nics_down_and_the_label_unchanged() -> None:
    fake = make_fake(hosts=1, credentials=CREDS)
    rule = fake.add_fault(FaultRule("set_nics_connected", VSphereFault))
    spec = make_spec(sources=FROZEN4[:1], count=3)
    async with fake:
        first = await provision(spec, fake, options=opts())
        assert first.failures == {"fault": 3}
        for vm in fake.folder_vms(spec.folder_path):
            assert vm.extra_config[LABEL_STATE] == "cloned"
            assert not any(n.connected for n in vm.nics)
        fake.faults.remove(rule)
        second = await provision(spec, fake, options=opts())
    assert second.created == 0 and second.ready == 3 and second.adopted == 3
    assert fake.stats.calls["run_in_guest"] == 6  # refreshed again before connecting
    assert_complete(fake, spec)
    assert fake.stats.network_conflicts == 0
