"""The Python API (``import fleet``, docs/python-api.md) as a load-test script uses it:
on the built-in simulator it starts itself, and on a simulator process whose VMs the
test reads with pyVmomi, so what the API says is checked against vCenter's own view."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import fleet
from fleet.engine.spec import SpecError
from fleet.errors import ConfigError
from tests.simproc import SimProcess
from tests.specs import ENV, spec_data, to_toml
from tests.test_cli_inventory import sim_vms

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(time_scale=0.02) as proc:
        yield proc


def sim_spec(sim: SimProcess, name: str, count: int) -> fleet.FleetSpec:
    return fleet.load_spec(spec_data(sim, name, count), env=ENV)


async def test_import_fleet_loads_no_engine() -> None:
    code = ("import sys, fleet; heavy = [m for m in sys.modules if m.startswith("
            "('fleet.engine', 'fleet.vsphere', 'pydantic', 'anyio', 'pyVmomi'))]; "
            "print(heavy)")
    with anyio.fail_after(60):
        out = await anyio.run_process([sys.executable, "-c", code])
    assert out.stdout.decode().strip() == "[]"


async def test_builtin_simulator_provision_members_status_destroy(
        capsys: pytest.CaptureFixture[str]) -> None:
    said: list[str] = []
    async with fleet.open(fleet.demo_spec(5, "api"), announce=said.append,
                          sim_time_scale=0.05) as f:
        assert f.simulated
        summary = await f.provision()
        assert summary.complete and summary.ready == 5
        members = await f.members()
        assert [m.index for m in members] == [0, 1, 2, 3, 4]
        ips = [m.ip for m in members]
        assert None not in ips and len(set(ips)) == 5
        assert all(m.address_status == "ok" and m.fleet == "api" for m in members)
        assert (await f.status()).ready == 5
        removed = await f.destroy()
        assert removed.failed == 0
        assert await f.members() == []
    assert any("built-in simulator" in line for line in said)
    assert capsys.readouterr().out == ""  # a library prints nothing


async def test_members_match_the_simulators_vms_and_destroy_leaves_none(
        sim: SimProcess) -> None:
    async with fleet.open(sim_spec(sim, "apimatch", 2)) as f:
        assert not f.simulated
        assert (await f.provision(count=5)).complete
        members = await f.members()
        vms = sim_vms(sim, "fleet/apimatch")
        assert {m.name: m.ip for m in members} == {n: vm["ip"] for n, vm in vms.items()}
        assert len({m.ip for m in members}) == 5
        assert {m.name: m.host for m in members} == {n: vm["host"] for n, vm in vms.items()}
        await f.destroy()
    assert sim_vms(sim, "fleet/apimatch") == {}


async def test_provisioned_destroys_when_the_body_raises(sim: SimProcess) -> None:
    seen: list[str] = []
    with pytest.raises(RuntimeError, match="load test failed"):
        async with fleet.provisioned(sim_spec(sim, "apiraise", 3)) as members:
            seen = [m.name for m in members]
            assert set(sim_vms(sim, "fleet/apiraise")) == set(seen)
            raise RuntimeError("load test failed")
    assert len(seen) == 3
    assert sim_vms(sim, "fleet/apiraise") == {}


async def test_provisioned_destroys_when_cancelled(sim: SimProcess) -> None:
    seen: list[str] = []
    with anyio.CancelScope() as scope:
        async with fleet.provisioned(sim_spec(sim, "apicancel", 3)) as members:
            seen = [m.name for m in members]
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert len(seen) == 3
    assert sim_vms(sim, "fleet/apicancel") == {}


async def test_provisioned_keep_keeps_the_fleet(sim: SimProcess) -> None:
    spec = sim_spec(sim, "apikeep", 3)
    async with fleet.provisioned(spec, keep=True) as members:
        names = {m.name for m in members}
    assert set(sim_vms(sim, "fleet/apikeep")) == names
    async with fleet.open(spec, simulator=False) as f:
        assert {m.name for m in await f.members()} == names
        await f.destroy()
    assert sim_vms(sim, "fleet/apikeep") == {}


async def test_load_spec_from_a_file_with_overrides_and_its_errors(
        sim: SimProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "lt.toml"
    path.write_text(to_toml(spec_data(sim, "lt", 4)))
    spec = fleet.load_spec(path, count=7, name="lt2")
    assert (spec.count, spec.name) == (7, "lt2")
    with pytest.raises(SpecError) as bad:
        fleet.load_spec(path, count=-1)
    assert "lt.toml" in str(bad.value) and "count" in str(bad.value)
    path.write_text(to_toml(spec_data(sim, "lt", 4, limits={"per_host": "lots"})))
    with pytest.raises(SpecError, match=r"lt\.toml.*limits\.per_host"):
        fleet.load_spec(path)
    with pytest.raises(SpecError, match=r"missing\.toml"):
        fleet.load_spec(tmp_path / "missing.toml")


async def test_a_vcenter_named_in_the_environment_is_never_replaced_by_the_simulator(
        ) -> None:
    # GOVC_URL without a user: the user evidently meant a vCenter; refused, not simulated.
    with pytest.raises(ConfigError, match="GOVC_"):
        async with fleet.open(fleet.demo_spec(1), env={"GOVC_URL": "127.0.0.1:9"}):
            pytest.fail("opened a target")
    # A script reading a fleet that exists gets no fresh simulator either.
    with pytest.raises(ConfigError, match="no vCenter"):
        async with fleet.open(fleet.demo_spec(1), env={}, simulator=False):
            pytest.fail("opened a target")


async def test_bad_arguments_name_themselves(sim: SimProcess) -> None:
    with pytest.raises(ConfigError, match="sim_time_scale"):
        async with fleet.open(fleet.demo_spec(1), env={}, sim_time_scale=0):
            pass
    async with fleet.open(sim_spec(sim, "apibad", 1)) as f:
        for count in (0, 10**9, True):
            with pytest.raises(ConfigError, match="count"):
                await f.provision(count=count)
        with pytest.raises(ConfigError, match="ttl"):
            await f.provision(ttl="soon")
        assert await f.members() == []


async def test_a_ttl_is_stamped_on_every_member_and_kept_by_a_run_without_one() -> None:
    """provision(ttl=...) records the fleet's expiry on the members it finds and on
    those it makes; a later provision() without a ttl keeps it, as the CLI does."""
    async with fleet.open(fleet.demo_spec(2, "api-ttl"), sim_time_scale=0.05) as f:
        await f.provision()
        assert {m.expires_at for m in await f.members()} == {None}
        before = time.time()
        await f.provision(3, ttl="1h")
        expiries = {m.expires_at for m in await f.members()}
        assert len(expiries) == 1
        [expiry] = expiries
        assert expiry is not None and before + 3600 <= expiry <= time.time() + 3601
        await f.provision(3)
        assert {m.expires_at for m in await f.members()} == {expiry}
        await f.destroy()
