"""FleetService in-process against a simulator in process (the real client over the
loopback transport): restarts, discovery, lifetimes, shared limits and the metrics it
feeds. A controllable wall clock makes TTLs instant."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from fleet.api.config import ServiceConfig, config_from_dict
from fleet.api.requests import fleet_request, scale_request
from fleet.api.service import FleetRecord, FleetService
from fleet.engine.lifetime import LABEL_EXPIRES_AT
from fleet.engine.operations import provision
from fleet.engine.reconcile import LABEL_NAME
from fleet.engine.run import EngineOptions
from fleet.engine.spec import spec_from_dict
from fleet.metrics import FleetMetrics
from fleet.testing.harness import SimVCenter
from fleet.vsphere.client import VSphereClient
from fleet.vsphere.model import VSphere
from tests.engine.conftest import vcenter

pytestmark = pytest.mark.anyio

TOKEN = "in-process-token-0123456789"
ENV = {"TOKEN": TOKEN, "GUEST_PW": "pw"}
FROZEN4 = ["frozen-01", "frozen-02", "frozen-03", "frozen-04"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def folder_fake(**kw: Any) -> AbstractAsyncContextManager[tuple[VSphereClient, SimVCenter]]:
    """The client on a four-host simulator in process (``kw``: ``topology``'s)."""
    return vcenter(hosts=4, **kw)


def make_config(state: Path, **over: Any) -> ServiceConfig:
    data: dict[str, Any] = {
        "state_dir": str(state), "scan_interval_s": 0.05, "shutdown_grace_s": 5.0,
        "api": {"token_env": "TOKEN"},
        "limits": {"in_flight": 8, "per_host": 2},
        "defaults": {
            "sources": FROZEN4,
            "network": {"refresh": "none", "disconnect_at_clone": False},
            "readiness": {"wait_for": "none"},
            "retries": {"backoff_base_s": 0.001, "backoff_max_s": 0.005},
            "timeouts": {"cancel_grace_s": 5.0, "call_s": 5.0, "cleanup_s": 5.0},
        },
    }
    data.update(over)
    return config_from_dict(data, env=ENV)


@asynccontextmanager
async def running(config: ServiceConfig, fake: VSphere, clock: Clock,
                  metrics: FleetMetrics | None = None) -> AsyncIterator[FleetService]:
    async with FleetService(config, fake, metrics or FleetMetrics(), clock=clock) as service:
        yield service


async def until(predicate: Any, timeout_s: float = 10.0) -> None:
    """Poll the service's state (records have no event for every condition a test wants)."""
    with anyio.fail_after(timeout_s):
        for _ in itertools.count():
            if predicate():
                return
            await anyio.sleep(0.01)


def members_of(fake: SimVCenter, name: str) -> list[Any]:
    return [vm for vm in fake.folder_vms(f"fleet/{name}")
            if vm.extra_config.get(LABEL_NAME) == name]


async def apply(service: FleetService, body: dict[str, Any]) -> FleetRecord:
    rec, _ = await service.apply(fleet_request(body, service.config))
    return rec


async def test_a_restart_resumes_a_build_and_loses_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    clock = Clock()
    async with folder_fake(latency={"instant_clone_s": 0.03}) as (vs, fake):
        async with running(config, vs, clock) as service:
            rec = await apply(service, {"name": "big", "count": 120, "ttl_s": 3600})
            small = await apply(service, {"name": "small", "count": 3})
            await until(lambda: small.status == "ready" and
                        sum(1 for m in rec.members.values() if m.state == "ready") >= 10)
            assert rec.status == "provisioning"
        # Stopped mid-build: in-flight clones finished or were cleaned up, nothing half-made.
        made = members_of(fake, "big")
        assert 10 <= len(made) < 120
        assert all(vm.extra_config[LABEL_EXPIRES_AT] == str(int(clock.now + 3600))
                   for vm in made)
        saved = (tmp_path / "big.json").read_text()
        assert '"status": "provisioning"' in saved and "GUEST_PW" not in saved

        async with running(config, vs, clock) as service:
            assert set(service.fleets) == {"big", "small"}
            rec = service.fleets["big"]
            await until(lambda: rec.status == "ready")
            assert rec.requested == 120 and rec.expires_at == pytest.approx(clock.now + 3600)
            assert service.fleets["small"].status == "ready"
        vms = members_of(fake, "big")
        assert sorted(int(vm.extra_config["guestinfo.fleet.index"]) for vm in vms) == \
            list(range(120))
        assert len({vm.name for vm in vms}) == 120


async def test_fleets_made_elsewhere_are_discovered_and_their_ttl_enforced(
        tmp_path: Path) -> None:
    clock = Clock()
    cli_spec = spec_from_dict({"name": "fromcli", "count": 4, "sources": FROZEN4,
                               "network": {"refresh": "none", "disconnect_at_clone": False},
                               "readiness": {"wait_for": "none"}}, env=ENV)
    async with folder_fake() as (vs, fake):
        labels = {LABEL_EXPIRES_AT: str(int(clock.now + 60))}
        summary = await provision(cli_spec, vs, options=EngineOptions(labels=labels))
        assert summary.complete
        # A VM in the folder without the label is not a member and is never touched.
        fake.add_vm("stranger", host="esx-01", folder="fleet/fromcli")
        async with running(make_config(tmp_path), vs, clock) as service:
            rec = service.fleets["fromcli"]
            assert rec.status == "discovered" and rec.requested is None
            assert rec.expires_at == clock.now + 60
            assert len(rec.members) == 4
            clock.now += 61
            await until(lambda: "fromcli" not in service.fleets)
            assert service.metrics.expired._value.get() == 1
        assert members_of(fake, "fromcli") == []
        assert [vm.name for vm in fake.folder_vms("fleet/fromcli")] == ["stranger"]


async def test_a_fleet_whose_ttl_ended_while_the_service_was_down_is_destroyed(
        tmp_path: Path) -> None:
    clock = Clock()
    config = make_config(tmp_path)
    async with folder_fake() as (vs, fake):
        async with running(config, vs, clock) as service:
            rec = await apply(service, {"name": "lab", "count": 5, "ttl_s": 600})
            keep = await apply(service, {"name": "keep", "count": 2})
            await until(lambda: rec.status == "ready" and keep.status == "ready")
        clock.now += 601
        async with running(config, vs, clock) as service:
            # gone from the table, then its state file (the last step of a destroy)
            await until(lambda: "lab" not in service.fleets
                        and not (tmp_path / "lab.json").exists())
            assert service.fleets["keep"].status == "ready"
        assert members_of(fake, "lab") == [] and len(members_of(fake, "keep")) == 2
        assert not (tmp_path / "lab.json").exists()


async def test_ttl_changes_relabel_members_and_unlabelled_members_keep_a_fleet(
        tmp_path: Path) -> None:
    clock = Clock()
    async with folder_fake() as (vs, fake), running(make_config(tmp_path), vs, clock) as service:
        rec = await apply(service, {"name": "relabel", "count": 3})
        await until(lambda: rec.status == "ready")
        assert rec.expires_at is None
        assert rec.spec_data is not None
        current = rec.spec_data
        await service.scale("relabel", lambda _: scale_request(
            {"ttl_s": 100, "count": 4}, current, service.config))
        await until(lambda: rec.status == "ready" and rec.generation == 2)
        vms = members_of(fake, "relabel")
        assert len(vms) == 4
        assert {vm.extra_config[LABEL_EXPIRES_AT] for vm in vms} == {str(int(clock.now
                                                                             + 100))}
        # Someone strips the label from one member: the fleet no longer expires
        # (conservative: never destroy before every member says so).
        del vms[0].extra_config[LABEL_EXPIRES_AT]
        vms[0].config_changed()
        await until(lambda: rec.expires_at is None)
        clock.now += 200
        # Two more scans: the second began after the clock moved, and every scan ends
        # by enforcing lifetimes (a sleep would pass without one on a loaded machine).
        scans = service.scans
        await until(lambda: service.scans >= scans + 2)
        assert "relabel" in service.fleets and not service.fleets["relabel"].want_destroy
        assert len(members_of(fake, "relabel")) == 4


async def test_fleets_share_the_limits_and_feed_one_metrics_object(tmp_path: Path) -> None:
    clock = Clock()
    metrics = FleetMetrics()
    async with folder_fake(latency={"instant_clone_s": 0.01}) as (vs, fake):
        async with running(make_config(tmp_path), vs, clock, metrics) as service:
            recs = [await apply(service, {"name": f"f{i}", "count": 30}) for i in range(3)]
            await until(lambda: all(r.status == "ready" for r in recs))
            service.update_gauges()
        assert fake.clones.max_in_flight[""] <= 8  # [limits] in_flight, across all fleets
        assert max(fake.clones.peak("host").values()) <= 2
        sample = metrics.registry.get_sample_value
        for i in range(3):
            assert sample("fleet_members", {"fleet": f"f{i}", "state": "ready"}) == 30
            assert sample("fleet_clones_total", {"fleet": f"f{i}", "outcome": "ready"}) == 30
        assert sample("fleet_queue_length", {}) == 0
        for host in fake.sim.hosts:
            assert sample("fleet_clones_in_flight", {"host": host}) in (0, None)
        assert sample("fleet_fleets", {"state": "ready"}) == 3


async def test_destroy_stops_a_run_and_removes_everything(tmp_path: Path) -> None:
    clock = Clock()
    async with folder_fake(latency={"instant_clone_s": 0.03}) as (vs, fake):
        async with running(make_config(tmp_path), vs, clock) as service:
            rec = await apply(service, {"name": "doomed", "count": 100})
            await until(lambda: any(m.state == "ready" for m in rec.members.values()))
            await service.remove("doomed")
            await until(lambda: "doomed" not in service.fleets)
        assert members_of(fake, "doomed") == []
        assert fake.folder_vms("fleet/doomed") == []


async def test_a_delete_of_a_discovered_fleet_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    config = make_config(tmp_path)
    spec = spec_from_dict({"name": "found", "count": 3, "sources": FROZEN4,
                           "network": {"refresh": "none", "disconnect_at_clone": False},
                           "readiness": {"wait_for": "none"}}, env=ENV)
    async with folder_fake() as (vs, fake):
        assert (await provision(spec, vs)).complete
        # vCenter refuses to destroy every member (NoPermission: PermissionDenied)
        rule = fake.add_fault(method="Destroy_Task", object="found-*", fault="NoPermission",
                              phase="call")
        async with running(config, vs, clock) as service:
            assert service.fleets["found"].status == "discovered"
            await service.remove("found")
            # vCenter refuses every destroy; the delete says so once it has let go of
            # the fleet's lock
            await until(lambda: rule.fired >= 3 and service.fleets["found"].error is not None)
            assert service.fleets["found"].error is not None
        assert '"destroying"' in (tmp_path / "found.json").read_text()
        fake.sim.faults.clear()
        async with running(config, vs, clock) as service:
            # The record's file goes after a wait (its lock is busy): the fleet stays in
            # the table until its file is gone, and a stop meanwhile does not keep it.
            plain = service.store.delete

            async def slow_delete(name: str) -> None:
                await anyio.sleep(0.3)
                await plain(name)

            service.store.delete = slow_delete  # type: ignore[method-assign]
            await until(lambda: "found" not in service.fleets)
        assert members_of(fake, "found") == []
        assert not (tmp_path / "found.json").exists()
