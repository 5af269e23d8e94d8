"""The service refuses a fleet that names one source VM twice (a name and a path), as the
CLI does, and clones nothing for it (in process, against a simulator in process)."""

from __future__ import annotations

import itertools
from pathlib import Path

import anyio
import pytest

from fleet.api.config import config_from_dict
from fleet.api.requests import fleet_request
from fleet.api.service import FleetService
from fleet.metrics import FleetMetrics
from tests.engine.conftest import vcenter

pytestmark = pytest.mark.anyio

ENV = {"TOKEN": "in-process-token-0123456789"}


async def test_a_fleet_naming_one_source_twice_fails_naming_both(tmp_path: Path) -> None:
    config = config_from_dict({
        "state_dir": str(tmp_path), "scan_interval_s": 0.05, "api": {"token_env": "TOKEN"},
        "defaults": {"network": {"refresh": "none", "disconnect_at_clone": False},
                     "readiness": {"wait_for": "none"}}}, env=ENV)
    body = {"name": "dup", "count": 6, "chain_budget": 4,
            "sources": ["running-01", "dc1/vm/sources/running-01"]}
    async with vcenter(hosts=2, frozen_per_host=0, running=1) as (vs, fake), \
            FleetService(config, vs, FleetMetrics()) as service:
        rec, _ = await service.apply(fleet_request(body, service.config))
        with anyio.fail_after(10):
            for _ in itertools.count():
                if rec.status not in ("pending", "provisioning", "retrying"):
                    break
                await anyio.sleep(0.01)
        assert rec.status == "failed"
        vm_id = fake.vm("running-01").moid
        assert rec.error is not None
        assert f'sources[1]: "dc1/vm/sources/running-01" is the same VM ({vm_id}) as ' \
            f'sources[0] "running-01"' in rec.error
    assert fake.folder_vms("fleet/dup") == []
    assert fake.vm("running-01").chain_depth() == 1
