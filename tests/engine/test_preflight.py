"""``plan``'s preflight (docs/preflight.md): each condition a first run on a real vCenter
would meet is found before anything changes, named with its fix."""

from __future__ import annotations

from typing import Any

import pytest

from fleet.engine import plan, provision
from fleet.engine.preflight import NEEDS, Finding
from fleet.engine.spec import spec_from_dict
from fleet.sim.topology import (
    GuestConfig,
    UserConfig,
    VCenterConfig,
    VmConfig,
)
from fleet.testing.harness import PASSWORD, USER
from fleet.vsphere.model import CloneRequest
from tests.engine.conftest import (
    CLONE_ONLY,
    CREDS,
    ENV,
    FROZEN4,
    make_spec,
    spec_data,
    topology,
    vcenter,
)
from tests.engine.conftest import options as opts
from tests.engine.test_api import assert_untouched

pytestmark = pytest.mark.anyio


def found(findings: list[Finding]) -> dict[tuple[str, str], Finding]:
    return {(f.check, f.object): f for f in findings}


def denied_admin(**denied_on: list[str]) -> list[UserConfig]:
    """The login the tests' client uses, denied privileges on named entities."""
    return [UserConfig(name=USER, password=PASSWORD, denied_on=denied_on)]


async def test_plan_names_each_finding_with_its_fix_and_changes_nothing() -> None:
    stopped = VmConfig(name="tools-off", host="esx-01", folder="sources", state="running",
                       guest=GuestConfig(user=CREDS.username, password="not-the-spec's",
                                         tools_running=False))
    running = VmConfig(name="running-01", host="esx-02", folder="sources", state="running",
                       guest=GuestConfig(user=CREDS.username, password="not-the-spec's"))
    topo = topology(hosts=3, sources=[stopped, running],
                    users=denied_admin(**{"frozen-01": ["VirtualMachine.Provisioning.Clone"]}))
    spec = make_spec(count=6, sources=[*FROZEN4[:3], "tools-off", "running-01"])
    async with vcenter(topo) as (vs, vc):
        vc.sim.hosts["esx-03"].set_maintenance(True)
        report = await plan(spec, vs, options=opts())
        assert_untouched(vc)
    got = found(report.findings)
    privilege = got[("privileges", "source frozen-01")]
    assert privilege.severity == "error"
    assert "VirtualMachine.Provisioning.Clone" in privilege.problem
    assert privilege.fix.startswith("grant VirtualMachine.Provisioning.Clone on source frozen-01")
    tools = got[("source_tools", "source tools-off")]
    assert tools.severity == "error" and "VMware Tools is not running" in tools.problem
    assert "vmtoolsd" in tools.fix
    unfrozen = got[("source_frozen", "source running-01")]
    assert unfrozen.severity == "warning" and "fleet sources freeze running-01" in unfrozen.fix
    host = got[("host", "host esx-03")]
    assert "maintenance" in host.problem and "frozen-03" in host.problem
    assert "out of maintenance mode" in host.fix
    login = got[("guest_login", "source running-01")]
    assert login.severity == "error" and "refuses the login 'root'" in login.problem
    assert "network.guest_password_env" in login.fix
    assert "not-the-spec's" not in repr(report.to_dict())  # no secret in the report
    assert not report.feasible and report.errors
    rows = {c.source: c for c in report.sources}
    assert rows["running-01"].guest_login == "refused"
    assert rows["tools-off"].guest_login == "not checked (VMware Tools not running)"
    assert rows["frozen-01"].guest_login == "not checked (frozen)"
    # nothing else was found: the other sources and the login are fine
    assert set(got) == {("privileges", "source frozen-01"), ("source_tools", "source tools-off"),
                        ("source_frozen", "source tools-off"),
                        ("source_frozen", "source running-01"), ("host", "host esx-03"),
                        ("guest_login", "source running-01")}


async def test_a_clean_fleet_has_no_findings() -> None:
    spec = make_spec(count=8, sources=FROZEN4)
    async with vcenter(hosts=4) as (vs, vc):
        report = await plan(spec, vs, options=opts())
        assert_untouched(vc)
    assert report.findings == [] and report.feasible and report.api_version == "8.0.3.0"


async def test_privileges_on_the_folder_above_until_the_fleet_folder_exists() -> None:
    spec = make_spec(count=4, sources=FROZEN4[:2], **CLONE_ONLY)
    topo = topology(hosts=2, users=denied_admin(vm=["VirtualMachine.Config.AdvancedConfig"]))
    async with vcenter(topo) as (vs, _):
        before = await plan(spec, vs, options=opts())
        # no fleet folder yet: the datacenter's VM folder is asked, where a run would make it
        (only,) = before.findings
        assert only.object == ("folder the datacenter's VM folder (the fleet's folder "
                               "fleet/lt does not exist yet)")
        assert "VirtualMachine.Config.AdvancedConfig" in only.problem
        assert only.fix.startswith("grant VirtualMachine.Config.AdvancedConfig on folder "
                                   "the datacenter's VM folder")
    topo = topology(hosts=2, folders=["fleet/lt"],
                    users=denied_admin(lt=["VirtualMachine.Inventory.Delete"]))
    async with vcenter(topo) as (vs, _):
        after = await plan(spec, vs, options=opts())
    (only,) = after.findings
    assert only.object == "folder fleet/lt" and "VirtualMachine.Inventory.Delete" in only.problem


async def test_what_the_workflow_does_not_use_is_not_asked_for() -> None:
    """Guest operations and NIC edits are asked for only when the spec's workflow uses
    them; a running source's guest privileges (for `fleet sources freeze`) are a warning."""
    denied = denied_admin(**{"lt": ["VirtualMachine.GuestOperations.Execute"],
                             "running-01": ["VirtualMachine.GuestOperations.Query"]})
    topo = topology(hosts=2, running=1, folders=["fleet/lt"], users=denied)
    spec = make_spec(count=2, sources=["frozen-01", "running-01"], **CLONE_ONLY)
    async with vcenter(topo) as (vs, _):
        report = await plan(spec, vs, options=opts())
    got = found(report.findings)
    assert ("privileges", "folder fleet/lt") not in got
    assert got[("privileges", "source running-01")].severity == "warning"
    assert {n.privilege for n in NEEDS} >= {"VirtualMachine.GuestOperations.Execute",
                                            "VirtualMachine.Config.EditDevice"}


async def test_an_old_api_a_wrong_recipe_and_too_little_space() -> None:
    other = VmConfig(name="bsd", host="esx-01", folder="sources", state="frozen",
                     guest=GuestConfig(family="other", user="root"))
    topo = topology(hosts=1, datastores=1, sources=[other]).model_copy(
        update={"vcenter": VCenterConfig(api_version="6.5")})
    spec = make_spec(count=4, sources=["frozen-01", "bsd"], network={"refresh": "auto"})
    async with vcenter(topo) as (vs, vc):
        ds = vc.sim.datastores["ds-01"]
        ds.used = ds.capacity - 10 * 1024 ** 3
        report = await plan(spec, vs, options=opts())
        assert vc.calls["CheckInstantClone_Task"] == 0
    got = found(report.findings)
    api = got[("api_version", "vCenter")]
    assert api.severity == "error" and "6.5" in api.problem and "6.7" in api.fix
    assert report.api_version is None
    recipe = got[("guest_os", "source bsd")]
    assert recipe.severity == "error" and '"auto"' in recipe.problem
    space = got[("datastore_space", "datastore ds-01")]
    assert space.severity == "warning" and "10.0 GiB free" in space.problem


async def test_vcenter_checks_the_very_request_a_run_sends() -> None:
    """``CheckInstantClone_Task`` gets the request the run's pipeline builds for the same
    member (labels, NIC edits, the fleet's folder), not a bare one."""
    spec = make_spec(count=2, sources=["frozen-01"])
    checked: list[CloneRequest] = []
    sent: list[CloneRequest] = []
    async with vcenter(hosts=1) as (vs, _):
        await provision(make_spec(count=1, sources=["frozen-01"]), vs, options=opts())
        real_check, real_start = vs.check_instant_clone, vs.start_instant_clone

        async def check(request: CloneRequest) -> list[str]:
            checked.append(request)
            return await real_check(request)

        async def start(request: CloneRequest) -> Any:
            sent.append(request)
            return await real_start(request)

        vs.check_instant_clone = check  # type: ignore[method-assign]
        vs.start_instant_clone = start  # type: ignore[method-assign]
        report = await plan(spec, vs, options=opts())
        assert report.feasible, report.findings
        await provision(spec, vs, options=opts())
    (asked,), (made,) = checked, sent
    assert asked.name == made.name == "lt-0001"
    assert asked.folder == made.folder and asked.nic_connect == made.nic_connect == "disconnect"
    run_id = "guestinfo.fleet.run_id"
    assert {k: v for k, v in asked.extra_config.items() if k != run_id} == \
        {k: v for k, v in made.extra_config.items() if k != run_id}
    assert "guestinfo.fleet.name" in asked.extra_config


async def test_what_plan_says_is_missing_is_what_a_run_is_refused() -> None:
    topo = topology(hosts=1, folders=["fleet/lt"],
                    users=denied_admin(lt=["VirtualMachine.Config.AdvancedConfig"]))
    spec = make_spec(count=2, sources=["frozen-01"])
    async with vcenter(topo) as (vs, _):
        report = await plan(spec, vs, options=opts())
        (only,) = report.findings
        assert (only.object, only.severity) == ("folder fleet/lt", "error")
        assert "VirtualMachine.Config.AdvancedConfig" in only.problem
        summary = await provision(spec, vs, options=opts())
    assert summary.ready == 0 and summary.failed == 2
    assert summary.failures == {"permission_denied": 2}, summary.failure_messages


async def test_a_frozen_sources_login_is_checked_on_one_of_its_clones() -> None:
    """A frozen guest cannot be asked; a ready member cloned from it has its login."""
    spec = make_spec(count=2, sources=["frozen-01"])
    wrong = spec_from_dict(spec_data(count=2, sources=["frozen-01"]), source="test.toml",
                           env={**ENV, "GUEST_PW": "not-the-guest-password"})
    async with vcenter(hosts=1) as (vs, vc):
        fresh = await plan(wrong, vs, options=opts())
        assert fresh.sources[0].guest_login == "not checked (frozen)" and not fresh.findings
        await provision(spec, vs, options=opts())
        vc.sim.calls.clear()
        good = await plan(spec, vs, options=opts())
        bad = await plan(wrong, vs, options=opts())
        assert_untouched(vc)
    assert good.sources[0].guest_login == "ok (on lt-0000)" and not good.findings
    assert bad.sources[0].guest_login == "refused (on lt-0000)"
    (finding,) = bad.findings
    assert (finding.check, finding.object, finding.severity) == \
        ("guest_login", "source frozen-01", "error")
    assert "the guest of its clone lt-0000 refuses the login 'root'" in finding.problem


async def test_a_disconnected_host_is_named_with_its_sources() -> None:
    spec = make_spec(count=4, sources=FROZEN4[:2], **CLONE_ONLY)
    async with vcenter(hosts=2) as (vs, vc):
        vc.set_host_state("esx-02", "notResponding")
        report = await plan(spec, vs, options=opts())
    (finding,) = report.findings
    assert (finding.check, finding.object, finding.severity) == ("host", "host esx-02", "warning")
    assert "notResponding" in finding.problem and "frozen-02" in finding.problem
    assert "reconnect esx-02" in finding.fix
    assert report.feasible  # frozen-01 takes the clones


async def test_a_powered_off_source_and_a_recipe_for_the_other_family() -> None:
    windows = VmConfig(name="win", host="esx-01", folder="sources", state="frozen",
                       guest=GuestConfig(family="windows", user="root"))
    spec = make_spec(count=2, sources=["frozen-01", "frozen-02", "win"],
                     network={"refresh": "linux"}, readiness={"wait_for": "none"})
    async with vcenter(topology(hosts=2, sources=[windows])) as (vs, vc):
        vc.power_off_now("frozen-02")
        report = await plan(spec, vs, options=opts())
    got = found(report.findings)
    off = got[("source_power", "source frozen-02")]
    assert off.severity == "warning" and "poweredOff" in off.problem
    assert "fleet sources freeze frozen-02" in off.fix
    recipe = got[("guest_os", "source win")]
    assert recipe.severity == "error" and 'network.refresh is "linux"' in recipe.problem
    assert recipe.fix == 'set network.refresh to "auto" or "windows"'


@pytest.mark.parametrize(("over", "severity", "why"), [
    (CLONE_ONLY, "warning", None),
    ({"network": {"refresh": "none", "disconnect_at_clone": False}}, "error",
     "never report the guest IP"),
])
async def test_stopped_tools_matter_as_much_as_the_workflow_needs_them(
        over: dict[str, Any], severity: str, why: str | None) -> None:
    stopped = VmConfig(name="tools-off", host="esx-01", folder="sources", state="running",
                       guest=GuestConfig(user=CREDS.username, tools_running=False))
    spec = make_spec(count=1, sources=["tools-off"], **over)
    async with vcenter(topology(hosts=1, frozen_per_host=0, sources=[stopped])) as (vs, _):
        report = await plan(spec, vs, options=opts())
    tools = found(report.findings)[("source_tools", "source tools-off")]
    assert tools.severity == severity
    if why is None:
        assert ", so " not in tools.problem
    else:
        assert why in tools.problem
