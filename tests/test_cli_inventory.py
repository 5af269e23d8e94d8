"""``fleet inventory``, ``fleet status --members`` and ``fleet provision --inventory`` as
users run them, against a simulator process; what they say is checked against the
simulator's own VMs, read with pyVmomi."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from tests.cli_json import assert_documented
from tests.simproc import PASSWORD, USER, SimProcess
from tests.specs import run_fleet, write_spec

COUNT = 200


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(time_scale=0.02) as proc:
        yield proc


def sim_vms(sim: SimProcess, folder: str) -> dict[str, dict[str, Any]]:
    """VM name -> its guest IP and its NICs' MACs, for every VM in ``dc1/vm/<folder>``."""
    ctx = ssl.create_default_context(cafile=str(sim.cert_path))
    si = SmartConnect(host=sim.host, port=sim.port, user=USER, pwd=PASSWORD, sslContext=ctx)
    try:
        found = si.content.searchIndex.FindByInventoryPath(f"dc1/vm/{folder}")
        vms = [e for e in (found.childEntity if found else []) if isinstance(e, vim.VirtualMachine)]
        return {vm.name: {"ip": vm.guest.ipAddress,
                          "macs": [d.macAddress for d in vm.config.hardware.device
                                   if isinstance(d, vim.vm.device.VirtualEthernetCard)],
                          "host": vm.runtime.host.name} for vm in vms}
    finally:
        Disconnect(si)


def ansible_inventory() -> str | None:
    return shutil.which("ansible-inventory") or shutil.which(
        "ansible-inventory", path=os.path.dirname(sys.executable))


@pytest.fixture(scope="module")
def provisioned(sim: SimProcess, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[Path, Path]:
    """A fleet of COUNT made with ``--inventory``: (its spec, the inventory written)."""
    tmp = tmp_path_factory.mktemp("inventory")
    spec = write_spec(tmp / "fleet.toml", sim, "inv", COUNT)
    out = tmp / "inv.yml"
    made = run_fleet("provision", "--spec", str(spec), "--json", "--no-progress",
                     "--inventory", str(out), timeout=600)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["inventory"] == str(out)
    return spec, out


def test_provision_writes_an_ansible_inventory_of_every_member_with_its_own_ip(
        sim: SimProcess, provisioned: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = provisioned
    vms = sim_vms(sim, "fleet/inv")
    assert len(vms) == COUNT
    data = yaml.safe_load(out.read_text())
    hosts = data["all"]["children"]["fleet_inv"]["hosts"]
    assert sorted(hosts) == sorted(vms)
    assert {name: h["ansible_host"] for name, h in hosts.items()} == \
        {name: vm["ip"] for name, vm in vms.items()}
    assert len({h["ansible_host"] for h in hosts.values()}) == COUNT
    assert all(h["member_macs"] == vms[name]["macs"] for name, h in hosts.items())
    command = ansible_inventory()
    if command is None:
        pytest.skip("ansible-inventory is not installed (the dev extra installs ansible-core)")
    listed = subprocess.run([command, "-i", str(out), "--list"], capture_output=True,
                            text=True, timeout=300, check=False,
                            env=dict(os.environ, ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"),
                                     ANSIBLE_HOME=str(tmp_path / "home")))
    assert listed.returncode == 0, listed.stderr
    seen = json.loads(listed.stdout)
    assert sorted(seen["fleet_inv"]["hosts"]) == sorted(vms)
    hostvars = seen["_meta"]["hostvars"]
    assert {n: hostvars[n]["ansible_host"] for n in vms} == {n: v["ip"] for n, v in vms.items()}
    by_host = {g: set(v["hosts"]) for g, v in seen.items() if g.startswith("host_")}
    for name, vm in vms.items():
        assert name in by_host["host_" + vm["host"].replace("-", "_")]


def test_inventory_and_status_members_say_the_same_in_every_format(
        sim: SimProcess, provisioned: tuple[Path, Path], tmp_path: Path) -> None:
    spec, _ = provisioned
    ips = {name: vm["ip"] for name, vm in sim_vms(sim, "fleet/inv").items()}
    got = run_fleet("inventory", "--spec", str(spec), "--format", "json")
    assert got.returncode == 0, got.stderr
    members = json.loads(got.stdout)["members"]
    assert {m["name"]: m["ip"] for m in members} == ips
    assert all(m["address_status"] == "ok" and m["state"] == "ready" for m in members)
    assert all(m["ip_addresses"][0] == m["ip"] and len(m["ip_addresses"]) == 2
               for m in members)

    got = run_fleet("inventory", "--spec", str(spec), "--output", str(tmp_path / "m.csv"))
    assert got.returncode == 0, got.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "m.csv").read_text(), newline="")))
    assert {r["name"]: r["ip"] for r in rows} == ips

    got = run_fleet("inventory", "--spec", str(spec), "--format", "hosts")
    assert got.returncode == 0, got.stderr
    lines = [line.split() for line in got.stdout.splitlines() if not line.startswith("#")]
    assert {name: ip for ip, name in lines} == ips

    got = run_fleet("status", "--spec", str(spec), "--members", "--json")
    assert got.returncode == 0, got.stderr
    status = json.loads(got.stdout)
    assert {m["name"]: m["ip"] for m in status["member_list"]} == ips
    assert_documented(status, "`fleet status --json`")
    got = run_fleet("status", "--spec", str(spec), "--members")
    assert got.returncode == 0, got.stderr
    assert "inv-0199" in got.stdout and ips["inv-0199"] in got.stdout


def test_bad_inventory_input_is_refused_with_rc_2_naming_it_before_anything_changes(
        sim: SimProcess, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "fleet.toml", sim, "badinv", 2)
    vms_before = sim.stats()["vms"]
    cases: list[tuple[list[str], str]] = [
        (["inventory", "--spec", str(spec), "--format", "xml"],
         "--format: 'xml' is not an inventory format"),
        (["inventory", "--spec", str(spec), "--output", str(tmp_path)], "is a directory"),
        (["inventory", "--spec", str(spec), "--output", str(tmp_path / "no" / "x.yml")],
         "does not exist"),
        (["provision", "--spec", str(spec), "--inventory", str(tmp_path / "no" / "x.yml")],
         "--inventory: "),
        (["provision", "--spec", str(spec), "--inventory", str(tmp_path / "x"),
          "--inventory-format", "yaml"], "--inventory-format: 'yaml' is not"),
        (["provision", "--spec", str(spec), "--format", "csv"], "--inventory-format: an "
         "inventory format without --inventory FILE"),
    ]
    for args, message in cases:
        got = run_fleet(*args, "--no-progress" if args[0] == "provision" else "--name",
                        *([] if args[0] == "provision" else ["badinv"]))
        assert got.returncode == 2, (args, got.stderr)
        assert message in got.stderr, (args, got.stderr)
    assert sim.stats()["vms"] == vms_before  # nothing was made
    # No vCenter named: a fresh built-in simulator has no fleet to list.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLEET_VCENTER_", "GOVC_"))}
    got = subprocess.run([sys.executable, "-m", "fleet", "inventory", "--name", "x"],
                         capture_output=True, text=True, timeout=120, env=env,
                         stdin=subprocess.DEVNULL, check=False)
    assert got.returncode == 2, got.stderr
    assert "`fleet inventory` reads fleets that already exist" in got.stderr
