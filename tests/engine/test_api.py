"""plan / status / destroy and the sources helpers."""

from __future__ import annotations

import json

import pytest

from fleet.engine import (
    destroy,
    freeze_sources,
    list_sources,
    plan,
    prepare_sources,
    provision,
    status,
)
from fleet.engine.reconcile import labels
from fleet.errors import ConfigError, InvalidGuestLogin
from fleet.testing.harness import SimVCenter
from tests.engine.conftest import CLONE_ONLY, FROZEN4, guest, make_spec, vcenter
from tests.engine.conftest import options as opts

pytestmark = pytest.mark.anyio

#: vCenter calls that change something (what a dry run must never send)
MUTATING = ("InstantClone_Task", "CloneVM_Task", "Destroy_Task", "PowerOnVM_Task",
            "PowerOffVM_Task", "ResetVM_Task", "ShutdownGuest", "ReconfigVM_Task",
            "StartProgramInGuest", "CreateFolder", "RelocateVM_Task", "Rename_Task",
            "UnregisterVM")


def assert_untouched(vc: SimVCenter) -> None:
    assert not {m: n for m, n in vc.calls.items() if m in MUTATING}


async def test_plan_is_a_dry_run_with_a_placement_table() -> None:
    spec = make_spec(count=100, sources=[*FROZEN4, {"name": "running-01", "chain_budget": 8}],
                     limits={"per_host": 4})
    async with vcenter(hosts=4, running=1, running_depth=5) as (vs, vc):
        vc.power_off_now("frozen-04")
        report = await plan(spec, vs, options=opts())
    assert_untouched(vc)
    rows = {r.source: r for r in report.rows}
    assert report.create == 100 and report.unplaced == 0 and report.feasible
    assert rows["frozen-04"].planned == 0 and rows["frozen-04"].status == "source is poweredOff"
    assert sum(r.planned for r in report.rows) == 100
    # the running source shares esx-01 with frozen-01, so it only gets clones when that
    # host is full: never more than its budget allows
    run = rows["running-01"]
    assert run.planned <= 3 and run.final_depth == 5 + run.planned <= 8
    assert rows["frozen-01"].clones_left is None and run.clones_left == 3
    assert all(r.preflight == [] for r in report.rows)
    assert json.loads(json.dumps(report.to_dict()))["feasible"] is True


async def test_plan_reports_what_cannot_be_placed() -> None:
    spec = make_spec(count=20, sources=["running-01"], chain_budget=15)
    async with vcenter(hosts=1, frozen_per_host=0, running=1, running_depth=10) as (vs, _):
        report = await plan(spec, vs, options=opts())
    assert report.unplaced == 15 and not report.feasible
    assert report.unplaced_reasons == {
        "running-01": ["chain depth 15 leaves no room in budget 15"]}
    assert report.rows[0].planned == 5 and report.rows[0].final_depth == 15


async def test_plan_runs_preflight_and_counts_existing_members() -> None:
    spec = make_spec(count=10, sources=FROZEN4[:2], **CLONE_ONLY)
    async with vcenter(hosts=2) as (vs, vc):
        await provision(make_spec(count=4, sources=FROZEN4[:2], **CLONE_ONLY), vs,
                        options=opts())
        vc.sim.calls.clear()
        vc.set_host_state("esx-02", "disconnected")
        report = await plan(spec, vs, options=opts())
    assert_untouched(vc)
    assert (report.create, report.ready) == (6, 4)
    rows = {r.source: r for r in report.rows}
    assert rows["frozen-02"].status == "host esx-02 is disconnected"
    assert rows["frozen-01"].planned == 6


async def test_status_counts_members_by_state() -> None:
    spec = make_spec(count=6, sources=FROZEN4[:2], **CLONE_ONLY)
    async with vcenter(hosts=2) as (vs, vc):
        vc.add_vm("lt-0005", host="esx-01", folder=spec.folder_path,
                  extra_config=labels(fleet="lt", index=5, run_id="x", source="frozen-01",
                                      state="network"))
        vc.add_vm("stranger", host="esx-01", folder=spec.folder_path)
        vc.add_vm("lt-0009", host="esx-01", folder=spec.folder_path,
                  extra_config=labels(fleet="lt", index=9, run_id="x", source="frozen-01",
                                      state="ready"))
        st = await status(spec, vs)
        assert_untouched(vc)
        assert (st.members, st.ready, st.foreign) == (1, 0, 1)
        assert st.by_state == {"network": 1} and st.missing == [0, 1, 2, 3, 4]
        assert st.extra == [9] and not st.complete
        await provision(spec, vs, options=opts())
        st = await status(spec, vs)
    assert st.complete and st.ready == 6 and st.to_dict()["complete"]


async def test_destroy_removes_members_only() -> None:
    spec = make_spec(count=12, sources=FROZEN4[:2], **CLONE_ONLY)
    other = make_spec(name="other", count=3, folder=spec.folder_path, sources=FROZEN4[:2],
                      **CLONE_ONLY)
    async with vcenter(hosts=2) as (vs, vc):
        stranger = vc.add_vm("stranger", host="esx-01", folder=spec.folder_path)
        await provision(spec, vs, options=opts())
        await provision(other, vs, options=opts())
        result = await destroy(spec, vs)
        assert result.removed == 12 and result.failed == 0
        assert result.untouched == 4  # the stranger and the other fleet's three
        names = sorted(vm.name for vm in vc.folder_vms(spec.folder_path))
        assert names == ["other-0000", "other-0001", "other-0002", "stranger"]
        assert stranger.extra_config == {}
        again = await destroy(spec, vs)
        assert again.removed == 0
        st = await status(spec, vs)
    assert st.members == 0 and st.foreign == 4


async def test_destroy_of_a_fleet_that_never_existed() -> None:
    async with vcenter(hosts=1) as (vs, vc):
        result = await destroy(make_spec(sources=FROZEN4[:1]), vs)
    assert result.removed == 0 and vc.destroyed == 0


async def test_list_sources() -> None:
    spec = make_spec(sources=["frozen-01", {"name": "running-01", "chain_budget": 40}])
    async with vcenter(hosts=2, running=1, running_depth=30) as (vs, _):
        rows = await list_sources(spec, vs)
        assert [(r.name, r.frozen, r.chain_depth, r.clones_left, r.host) for r in rows] == [
            ("frozen-01", True, 2, None, "esx-01"), ("running-01", False, 30, 10, "esx-01")]
        assert rows[1].to_dict()["power_state"] == "poweredOn"
        with pytest.raises(ConfigError) as info:
            await list_sources(make_spec(sources=["ghost"]), vs)
    assert info.value.key == "sources"


async def test_freeze_sources() -> None:
    spec = make_spec(sources=["running-01", "running-02", "win"])
    async with vcenter(hosts=2, frozen_per_host=0, running=2) as (vs, vc):
        vc.add_vm("win", host="esx-02", state="running", guest=guest(family="windows"))
        rows = await freeze_sources(spec, vs)
        assert all(r.frozen and r.clones_left is None for r in rows)
        assert vc.vm("win").frozen
        again = await freeze_sources(spec, vs)  # already frozen: nothing to do
        assert vc.calls["StartProgramInGuest"] == 3 and all(r.frozen for r in again)
        with pytest.raises(ConfigError) as info:
            await freeze_sources(make_spec(network={"refresh": "none", "guest_user": None,
                                                    "guest_password_env": None}), vs)
    assert info.value.key == "network.guest_user"


async def test_freeze_with_wrong_guest_password_fails() -> None:
    async with vcenter(hosts=1, frozen_per_host=0, running=1,
                       guest_password="something-else") as (vs, vc):
        with pytest.raises(InvalidGuestLogin):
            await freeze_sources(make_spec(sources=["running-01"]), vs)
        assert not vc.vm("running-01").frozen


async def test_prepare_sources_per_host() -> None:
    spec = make_spec(sources=["golden"])
    async with vcenter(hosts=4, frozen_per_host=0) as (vs, vc):
        vc.add_vm("golden", host="esx-01", folder="sources", state="running", guest=guest())
        vc.set_host_state("esx-04", "disconnected")
        made = await prepare_sources(spec, vs, "golden")
        # esx-01 has the golden VM itself (a powered-on source); esx-04 is down
        assert [s.name for s in made] == ["golden-esx-02", "golden-esx-03"]
        for s in made:
            vm = vc.vm(s.name)
            assert vm.frozen and vm.host.name == s.host
            assert vm.parent is vc.vm("golden").parent
        # running it again makes nothing new
        spec2 = make_spec(sources=["golden", "golden-esx-02", "golden-esx-03"])
        assert await prepare_sources(spec2, vs, "golden") == []
        # the prepared sources are usable right away
        summary = await provision(make_spec(count=30, sources=["golden-esx-02",
                                                               "golden-esx-03"]),
                                  vs, options=opts())
    assert summary.ready == 30
