"""What fleet's clone specs carry, against a real ``fleet sim`` (which copies a source's
extraConfig into its clone, and takes a MAC a NIC edit carries, as vCenter does):

- exactly the clone's own fleet's labels: the CLI and the expiry sweep;
- no source MAC: every clone keeps the address generated for it.
"""

from __future__ import annotations

import itertools
import json
import ssl
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from fleet.api.config import config_from_dict
from fleet.api.service import FleetService
from fleet.engine.lifetime import LABEL_EXPIRES_AT, LABEL_LEASE, LABEL_OWNER, LABEL_POOL
from fleet.engine.operations import provision
from fleet.engine.reconcile import LABEL_NAME, LABEL_READY_AT, LABEL_RUN_ID, LABEL_SOURCE
from fleet.engine.sources import FLEET_LABELS
from fleet.metrics import FleetMetrics
from fleet.vsphere.client import VSphereClient
from tests.simproc import PASSWORD, USER, SimProcess
from tests.specs import make_spec, run_fleet, write_spec

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(time_scale=0.05) as proc:
        yield proc


async def until(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Poll the service's records (no event tells when a fleet has gone)."""
    with anyio.fail_after(timeout_s):
        for _ in itertools.count():
            if predicate():
                return
            await anyio.sleep(0.02)


def read_vms(sim: SimProcess, folder: str, read: Callable[[Any], Any]) -> dict[str, Any]:
    """VM name -> ``read(vm)`` for every VM in ``dc1/vm/<folder>``, with pyVmomi."""
    ctx = ssl.create_default_context(cafile=str(sim.cert_path))
    si = SmartConnect(host=sim.host, port=sim.port, user=USER, pwd=PASSWORD, sslContext=ctx)
    try:
        found = si.content.searchIndex.FindByInventoryPath(f"dc1/vm/{folder}")
        vms = [e for e in (found.childEntity if found else []) if isinstance(e, vim.VirtualMachine)]
        return {vm.name: read(vm) for vm in vms}
    finally:
        Disconnect(si)


def member_labels(sim: SimProcess, folder: str) -> dict[str, dict[str, str]]:
    return read_vms(sim, folder, lambda vm: {o.key: o.value for o in vm.config.extraConfig})


def nic_macs(sim: SimProcess, folder: str) -> dict[str, list[str]]:
    return read_vms(sim, folder, lambda vm: [
        d.macAddress for d in vm.config.hardware.device
        if isinstance(d, vim.vm.device.VirtualEthernetCard)])


async def test_a_fleet_sourcing_a_ttl_members_clone_neither_inherits_nor_dies_of_its_ttl(
        sim: SimProcess, tmp_path: Path) -> None:
    spec_a = write_spec(tmp_path / "a.toml", sim, "ttla", 1, sources=["frozen-01"])
    made = run_fleet("provision", "--spec", str(spec_a), "--ttl", "1h", "--json",
                     "--no-progress")
    assert made.returncode == 0, made.stderr
    expires_at = json.loads(made.stdout)["expires_at"]
    assert expires_at is not None
    assert member_labels(sim, "fleet/ttla")["ttla-0000"][LABEL_EXPIRES_AT] == str(expires_at)

    source = "fleet/ttla/ttla-0000"
    spec_b = write_spec(tmp_path / "b.toml", sim, "plainb", 3, sources=[source])
    made = run_fleet("provision", "--spec", str(spec_b), "--json", "--no-progress")
    assert made.returncode == 0, made.stderr
    summary = json.loads(made.stdout)
    assert summary["ready"] == 3 and summary["expires_at"] is None
    members = member_labels(sim, "fleet/plainb")
    assert sorted(members) == ["plainb-0000", "plainb-0001", "plainb-0002"]
    for labels in members.values():
        # Its own labels, and the time it became ready (docs/inventory.md), no expiry
        # (and no owner: only fleet serve's clients own fleets).
        assert {k for k in labels if k.startswith("guestinfo.fleet.")} == \
            (set(FLEET_LABELS) | {LABEL_READY_AT}) - {LABEL_EXPIRES_AT, LABEL_OWNER, LABEL_POOL,
                                                      LABEL_LEASE}
        assert labels[LABEL_NAME] == "plainb" and labels[LABEL_SOURCE] == source
        assert labels[LABEL_RUN_ID] == summary["run_id"]

    # The expiry sweep (fleet serve's) after ttla's expiry: ttla goes, plainb stays.
    with tempfile.TemporaryDirectory(prefix="fleet-sweep-") as state:
        config = config_from_dict({"state_dir": state, "scan_interval_s": 0.05,
                                   "api": {"token_env": "TOKEN"}},
                                  env={"TOKEN": "sweep-token-0123456789abcdef"})
        async with VSphereClient(sim.url, USER, PASSWORD, thumbprint=sim.thumbprint) as vs, \
                FleetService(config, vs, FleetMetrics(),
                             clock=lambda: expires_at + 1.0) as service:
            await until(lambda: "ttla" not in service.fleets)
            rec = service.fleets["plainb"]
            assert rec.expires_at is None and not rec.want_destroy
    assert member_labels(sim, "fleet/ttla") == {}
    assert sorted(member_labels(sim, "fleet/plainb")) == sorted(members)


def test_the_simulator_copies_the_source_extra_config_into_a_clone(sim: SimProcess) -> None:
    # What makes the test above real: a clone spec that sets nothing inherits everything.
    ctx = ssl.create_default_context(cafile=str(sim.cert_path))
    si = SmartConnect(host=sim.host, port=sim.port, user=USER, pwd=PASSWORD, sslContext=ctx)
    try:
        source: Any = si.content.searchIndex.FindByInventoryPath("dc1/vm/sources/frozen-02")
        WaitForTask(source.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
            vim.option.OptionValue(key="guestinfo.fleet.expires_at", value="1"),
            vim.option.OptionValue(key="guestinfo.keep", value="k")])))
        spec = vim.vm.InstantCloneSpec(name="inherits", location=vim.vm.RelocateSpec(),
                                       config=[vim.option.OptionValue(
                                           key="guestinfo.fleet.expires_at", value="")])
        WaitForTask(source.InstantClone_Task(spec))
        clone = si.content.searchIndex.FindByInventoryPath("dc1/vm/sources/inherits")
        extra = {o.key: o.value for o in clone.config.extraConfig}
        assert extra["guestinfo.keep"] == "k"  # inherited
        assert "guestinfo.fleet.expires_at" not in extra  # an empty value removes it
        WaitForTask(clone.PowerOffVM_Task())
        WaitForTask(clone.Destroy_Task())
    finally:
        Disconnect(si)


async def test_every_clone_keeps_the_mac_generated_for_it(sim: SimProcess) -> None:
    # The whole network workflow (NICs disconnected at clone, refreshed, reconnected)
    # through fleet's client.
    before = sim.stats()
    spec = make_spec(sim, "macs", 8, sources=["frozen-03"])
    async with VSphereClient(sim.url, USER, PASSWORD, thumbprint=sim.thumbprint) as vs:
        summary = await provision(spec, vs)
    assert summary.ready == 8, summary.failures
    after = sim.stats()
    assert after["duplicate_macs"] == before["duplicate_macs"]
    assert after["network_conflicts"] == before["network_conflicts"]
    clone_macs = [mac for macs in nic_macs(sim, "fleet/macs").values() for mac in macs]
    source_macs = {mac for macs in nic_macs(sim, "sources").values() for mac in macs}
    assert len(clone_macs) == 8 and len(set(clone_macs)) == 8
    assert not set(clone_macs) & source_macs
