"""Provisioning end to end against the simulator: convergence, faults, re-placement, adoption."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from typing import Any

import anyio
import pytest

from fleet.engine import provision
from fleet.engine.dispatch import _PlacementCapacity
from fleet.engine.events import (
    Event,
    HostExcluded,
    JobAdopted,
    JobFailed,
    JobReady,
    JobReplaced,
    JobRetried,
    JobStarted,
    PhaseDone,
    SourceRetired,
)
from fleet.engine.limits import AutoTuning, Limiters, LimitKey
from fleet.engine.placement import SourceState
from fleet.engine.reconcile import LABEL_STATE
from fleet.engine.run import Provisioner
from fleet.engine.spec import FleetSpec, LimitsSpec
from fleet.errors import ConfigError, UnsupportedEndpoint
from fleet.sim.core import SimObject
from fleet.sim.topology import VmConfig
from fleet.sim.vm import VirtualMachine
from fleet.vsphere.model import Ref, VmInfo, VSphere
from tests.engine.conftest import (
    CLONE_ONLY,
    FROZEN4,
    GUEST_PASSWORD,
    Counted,
    add_member,
    assert_complete,
    guest,
    make_spec,
    members,
    topology,
    vcenter,
)
from tests.engine.conftest import options as opts

pytestmark = pytest.mark.anyio

#: RetrievePropertiesEx calls a clone-only run makes whatever its size (44 for 100 clones
#: and for 500, measured): the start's reads of sources, hosts, datastores, folders
READS_AT_START = 60


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, cls: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]


async def test_full_workflow_every_member_ready_without_conflicts() -> None:
    # 120: more than the 32 slots of the four hosts, so the limits and vCenter's queue
    # are exercised (300 on the in-memory model; every assertion is per member)
    spec = make_spec(count=120)
    rec = Recorder()
    async with vcenter(hosts=4) as (vs, vc):
        summary = await provision(spec, vs, on_event=rec, options=opts())
    assert_complete(vc, spec)
    assert summary.ready == summary.requested == 120 and summary.failed == 0
    # Each member made once. A clone whose task this run did not see end within
    # clone_s (a loaded machine) is looked for and adopted, never cloned again
    # (docs/cli-json.md: adopted counts lost replies): vCenter finished exactly 120
    # clone tasks, and with no earlier members every adopted one is this run's own.
    assert summary.complete and summary.created + summary.adopted == 120
    assert summary.adopted == len(rec.of(JobAdopted))
    assert vc.clones.submitted - sum(vc.clones.faults.values()) == 120, vc.clones.faults
    assert vc.network_conflicts == 0
    assert max(vc.clones.peak("host").values()) <= 8
    assert vc.clones.queued == 0  # never more than vCenter runs at once
    # An adopted clone's queue and clone times are unknown (its end was not seen), so
    # those phases count the clones made; every member went through the rest.
    for phase, count in (("queue", summary.created), ("clone", summary.created),
                         ("network", 120), ("reconnect", 120), ("ready", 120)):
        assert summary.phases[phase].count == count, phase
        p = summary.phases[phase]
        assert p.p50_s <= p.p95_s <= p.p99_s <= p.max_s
    assert sum(s.clones for s in summary.sources.values()) == summary.created
    assert len(rec.of(JobReady)) == 120
    data = json.loads(summary.to_json())
    for key in ("requested", "ready", "failed", "duration_s", "clones_per_s", "phases",
                "sources", "failures"):
        assert key in data
    assert data["sources"]["frozen-01"]["chain_depth"] == 2
    assert data["phases"]["clone"]["count"] == summary.created
    # every member got its labels, guestinfo and a real IP of its own
    ips = set()
    for vm in vc.folder_vms(spec.folder_path):
        assert vm.extra_config["guestinfo.fleet.run_id"] == summary.run_id
        assert vm.guest.ip is not None and vm.guest.macs == [n.mac for n in vm.nics]
        ips.add(vm.guest.ip)
    assert len(ips) == 120


async def test_spread_over_hosts_and_sources() -> None:
    spec = make_spec(count=200, **CLONE_ONLY)
    async with vcenter(hosts=4) as (vs, vc):
        summary = await provision(spec, vs, options=opts())
    per_source = Counter({name: vc.vm(name).clones for name in FROZEN4})
    assert all(per_source[name] > 0 for name in FROZEN4)
    assert max(per_source.values()) - min(per_source.values()) <= 20
    assert summary.sources["frozen-03"].clones == per_source["frozen-03"]


async def test_rerun_creates_nothing() -> None:
    spec = make_spec(sources=FROZEN4[:2], count=40)
    async with vcenter(hosts=2) as (vs, vc):
        first = await provision(spec, vs, options=opts())
        calls = vc.calls["InstantClone_Task"]
        second = await provision(spec, vs, options=opts())
    assert first.created == 40 and second.created == 0 and second.ready == 40
    assert vc.calls["InstantClone_Task"] == calls
    assert_complete(vc, spec)


def two(**over: Any) -> FleetSpec:
    return make_spec(sources=FROZEN4[:2], **CLONE_ONLY, **over)


async def test_scale_down_then_up() -> None:
    rec = Recorder()
    async with vcenter(hosts=2) as (vs, vc):
        await provision(two(count=30), vs, options=opts())
        down = await provision(two(count=18), vs, on_event=rec, options=opts())
        assert down.removed == 12 and down.created == 0 and down.ready == 18
        assert_complete(vc, make_spec(sources=FROZEN4[:2], count=18))
        # the twelve destroyed are the highest indexes (no VM of those names is left)
        assert vc.destroyed == 12
        assert not {vm.name for vm in vc.vms()} & {f"lt-{i:04d}" for i in range(18, 30)}
        up = await provision(two(count=30), vs, options=opts())
        assert up.created == 12 and up.ready == 30
        assert_complete(vc, make_spec(sources=FROZEN4[:2], count=30))


async def test_foreign_vm_holding_a_name_is_reported_and_left_alone() -> None:
    spec = make_spec(sources=FROZEN4[:2], count=10, **CLONE_ONLY)
    rec = Recorder()
    async with vcenter(hosts=2) as (vs, vc):
        vc.add_vm("lt-0003", host="esx-01", folder=spec.folder_path)  # not a member
        summary = await provision(spec, vs, on_event=rec, options=opts())
    assert summary.ready == 9 and summary.failed == 1
    assert summary.failures == {"name_taken": 1} and summary.failed_indexes == [3]
    assert not summary.complete
    assert vc.calls["InstantClone_Task"] == 9  # nothing was tried for it
    assert vc.vm("lt-0003").extra_config == {}
    assert [e.index for e in rec.of(JobFailed)] == [3]


async def test_duplicate_name_from_a_foreign_vm_at_clone_time() -> None:
    """A VM without the fleet's labels takes a member's name after the run looked
    (another tool made it): vCenter answers that clone with DuplicateName, and the
    VM holding the name is reported and left alone."""
    spec = make_spec(sources=FROZEN4[:2], count=6, **CLONE_ONLY)
    async with vcenter(hosts=2) as (vs, vc):

        def on_event(event: Event) -> None:
            if event.kind == "run_started":
                vc.add_vm("lt-0002", host="esx-02", folder=spec.folder_path)

        summary = await provision(spec, vs, on_event=on_event, options=opts())
    assert summary.failures == {"name_taken": 1} and summary.ready == 5
    assert vc.clones.faults == {"DuplicateName": 1}
    (other,) = [vm for vm in vc.vms() if vm.name == "lt-0002"]
    assert other.extra_config == {}
    assert vc.destroyed == 0


async def test_transient_faults_are_retried() -> None:
    spec = make_spec(count=120, retries={"attempts": 10})
    rec = Recorder()
    async with vcenter(hosts=4, seed=7) as (vs, vc):
        # vCenter busy (ResourceBusy) at the clone and the reconfiguration, the
        # connection reset under a guest program start (not safe to repeat blindly)
        vc.add_fault(method="InstantClone_Task", fault="TaskInProgress", phase="call",
                     probability=0.2)
        vc.add_fault(method="StartProgramInGuest", fault="http:reset", probability=0.1)
        vc.add_fault(method="ReconfigVM_Task", fault="TaskInProgress", probability=0.1)
        summary = await provision(spec, vs, on_event=rec, options=opts())
    assert summary.ready == 120, summary.failures
    assert_complete(vc, spec)
    retried = Counter(e.phase for e in rec.of(JobRetried))
    assert retried["clone"] > 0 and retried["network"] > 0 and retried["reconnect"] > 0
    assert vc.network_conflicts == 0


async def test_permanent_fault_is_reported_not_retried() -> None:
    spec = make_spec(sources=FROZEN4[:2], count=8, **CLONE_ONLY)
    async with vcenter(hosts=2) as (vs, vc):
        # the clone task of lt-0002 fails with a fault fleet cannot do anything about
        rule = vc.add_fault(method="InstantClone_Task", object="lt-0002",
                            fault="InvalidDatastore")
        summary = await provision(spec, vs, options=opts())
    assert summary.failures == {"fault": 1} and summary.failed_indexes == [2]
    assert rule.fired == 1  # one attempt only
    assert sorted(members(vc, spec)) == [0, 1, 3, 4, 5, 6, 7]


async def test_retries_are_bounded() -> None:
    # A submit that may have gone through is given the clone timeout to land before the
    # job is called failed: keep that short here.
    spec = make_spec(sources=FROZEN4[:2], count=4, retries={"attempts": 3},
                     timeouts={"clone_s": 0.3}, **CLONE_ONLY)
    async with vcenter(hosts=2) as (vs, vc):
        # every submit of lt-0001 has its connection reset (ConnectionFailed: it may
        # have run, so the session does not repeat it; the engine does, to its limit)
        rule = vc.add_fault(method="InstantClone_Task", object="lt-0001", fault="http:reset")
        summary = await provision(spec, vs, options=opts())
    assert rule.fired == 3
    assert summary.failures == {"connection": 1} and summary.ready == 3


async def test_lost_reply_storm_adopts_instead_of_duplicating() -> None:
    spec = make_spec(count=150, retries={"attempts": 10})
    rec = Recorder()
    async with vcenter(hosts=4, seed=11) as (vs, vc):
        # The clone is made and its task says it failed (vpxd lost track of it) ...
        vc.add_fault(method="InstantClone_Task", fault="SystemError", phase="after",
                     probability=0.25)
        # ... or the clone call's reply never comes back while its task runs.
        vc.add_fault(method="InstantClone_Task", fault="http:lost_reply", probability=0.15)
        # Update and label replies lost too (the client asks again: safe to repeat).
        vc.add_fault(method="WaitForUpdatesEx", fault="http:lost_reply", probability=0.1)
        vc.add_fault(method="ReconfigVM_Task", fault="http:lost_reply", probability=0.1)
        summary = await provision(spec, vs, on_event=rec, options=opts())
        await vc.wait_idle()  # let any straggling task land
    assert summary.ready == 150, summary.failures
    assert_complete(vc, spec)
    assert len(vc.folder_vms(spec.folder_path)) == 150  # no duplicates, no strays
    assert vc.destroyed == 0
    assert summary.adopted == len(rec.of(JobAdopted)) > 10
    assert vc.network_conflicts == 0


async def test_clone_timeout_then_adopt() -> None:
    """vCenter is slow to report: its update stream answers 0.2 s late, so every clone
    (done in milliseconds) outlives its attempt's 0.05 s deadline as far as fleet can
    tell. The clone is past cancelling by then; fleet must find the VM and adopt it."""
    spec = make_spec(sources=FROZEN4[:2], count=8, timeouts={"clone_s": 0.05}, **CLONE_ONLY)
    rec = Recorder()
    async with vcenter(hosts=2) as (vs, vc):
        vc.add_fault(method="WaitForUpdatesEx", fault="slow", phase="call", delay_s=0.2)
        summary = await provision(spec, vs, on_event=rec, options=opts())
    assert summary.ready == 8
    assert len(rec.of(JobAdopted)) == 8  # each attempt timed out, its VM was found
    assert len(vc.folder_vms(spec.folder_path)) == 8


async def test_host_lost_mid_burst_jobs_are_replaced() -> None:
    spec = make_spec(count=240, **CLONE_ONLY)
    rec = Recorder()
    async with vcenter(hosts=4, latency={"instant_clone_s": 0.004}) as (vs, vc):

        def lose_host(source: SimObject) -> None:
            # A quarter in, with members made on esx-02 and this clone going there: the
            # host goes away under it (a point in what was handed to vCenter, not in the
            # run's events, which can come after the burst on a loaded machine).
            assert isinstance(source, VirtualMachine)
            if source.host.connection_state == "connected" and source.host.name == "esx-02" \
                    and vc.calls["InstantClone_Task"] >= 60 and any(
                        vm.host is source.host for vm in vc.folder_vms(spec.folder_path)):
                vc.set_host_state("esx-02", "notResponding")

        vc.before_call("InstantClone_Task", lose_host)
        summary = await provision(spec, vs, on_event=rec, options=opts())
    assert vc.sim.hosts["esx-02"].connection_state == "notResponding"
    assert summary.ready == 240, summary.failures
    assert_complete(vc, spec)
    assert [e.host for e in rec.of(HostExcluded)] == ["esx-02"]
    on_lost = [vm for vm in vc.folder_vms(spec.folder_path) if vm.host.name == "esx-02"]
    assert 0 < len(on_lost) < 240 // 4 + 10
    if rec.of(JobReplaced):
        assert {e.reason for e in rec.of(JobReplaced)} == {"host_unavailable"}


async def test_source_powered_off_mid_burst_is_retired() -> None:
    spec = make_spec(count=200, **CLONE_ONLY)
    rec = Recorder()
    async with vcenter(hosts=4, latency={"instant_clone_s": 0.004}) as (vs, vc):

        def power_off(source: SimObject) -> None:
            # A fifth in, as a clone of frozen-03 is handed over: pulled from under it.
            assert isinstance(source, VirtualMachine)
            if source.name == "frozen-03" and source.power_state == "poweredOn" and \
                    vc.calls["InstantClone_Task"] >= 40:
                vc.power_off_now("frozen-03")

        vc.before_call("InstantClone_Task", power_off)
        summary = await provision(spec, vs, on_event=rec, options=opts())
    assert vc.vm("frozen-03").power_state == "poweredOff"
    assert summary.ready == 200
    assert_complete(vc, spec)
    retired = rec.of(SourceRetired)
    assert [e.source for e in retired] == ["frozen-03"]
    assert summary.sources["frozen-03"].retired is not None


async def test_chain_fault_retires_the_source_and_replaces_the_job() -> None:
    """Another tool deepens a source's chain to vSphere's limit while its first clone
    runs: vCenter fails that clone (GenericVmConfigFault, "Unable to prepare
    migration"), the client reads the chain back, and the engine retires the source
    and places the job again."""
    spec = make_spec(count=60, sources=["frozen-01", "frozen-02"], **CLONE_ONLY)
    rec = Recorder()
    async with vcenter(hosts=2) as (vs, vc):

        def on_event(event: Event) -> None:
            rec(event)
            if isinstance(event, JobStarted) and event.source == "frozen-01" and \
                    len([e for e in rec.of(JobStarted) if e.source == "frozen-01"]) == 1:
                vc.vm("frozen-01").set_chain_depth(255)

        summary = await provision(spec, vs, on_event=on_event,
                                  options=opts(refresh_interval_s=60))
    assert summary.ready == 60
    (retired,) = rec.of(SourceRetired)
    assert retired.source == "frozen-01" and retired.reason.startswith("chain_too_deep")
    failed = vc.clones.faults["GenericVmConfigFault"]
    # every clone the chain failed was placed again, and only those
    assert failed >= 1 and len(rec.of(JobReplaced)) == failed
    # only the clones already in flight when it failed came from it
    assert vc.vm(retired.source).clones <= 7


async def test_running_source_stops_at_its_budget() -> None:
    # the running source has a host of its own, so it is worth using when frozen ones are busy
    topo = topology(hosts=2, slots=[2, 8], frozen_per_host=0,
                    latency={"instant_clone_s": 0.003},
                    sources=[VmConfig(name="frozen-01", host="esx-01", state="frozen",
                                      chain_depth=2, guest=guest()),
                             VmConfig(name="golden", host="esx-02", state="running",
                                      chain_depth=3, guest=guest())])
    spec = make_spec(count=150, sources=["frozen-01", {"name": "golden", "chain_budget": 12}],
                     limits={"per_host": 2}, **CLONE_ONLY)
    rec = Recorder()
    async with vcenter(topo) as (vs, vc):
        summary = await provision(spec, vs, on_event=rec, options=opts())
    assert summary.ready == 150
    assert vc.vm("golden").clones == 9  # depth 3 -> 12
    assert vc.vm("golden").chain_depth() == 12
    assert vc.clones.max_depth_by_source["golden"] == 12
    assert vc.clones.peak("source")["golden"] == 1
    assert [e.source for e in rec.of(SourceRetired)] == ["golden"]
    assert summary.sources["golden"].clones_left == 0


class LateSourceRead:
    """A vCenter under load, seen through the client: the run's first read of ``source``
    is answered as the source was before the run (vCenter served it then) and arrives
    only once ``release`` is set; later reads of it never come back (the run ends
    first). Every other call goes to the client as it is."""

    def __init__(self, vs: VSphere, source: Ref, before: VmInfo) -> None:
        self._vs = vs
        self.source = source
        self.before = before
        self.release = anyio.Event()
        self.reads = 0
        self.late = False  # the late answer came back

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vs, name)

    async def get_vm(self, ref: Ref) -> VmInfo:
        if ref != self.source:
            return await self._vs.get_vm(ref)
        self.reads += 1
        if self.reads > 1:
            await anyio.sleep_forever()
        with anyio.fail_after(10):
            await self.release.wait()
        self.late = True
        return self.before


async def test_a_late_refresh_never_lowers_a_running_source_chain() -> None:
    # A refresh of a running source whose reply comes back after clones of the source
    # landed must not take the depth the reply shows: the clones' stuns came after the
    # read was served. Taking it would let the source pass its budget, and the summary
    # would show a chain shallower than vCenter has.
    topo = topology(hosts=1, frozen_per_host=0, running=0,
                    latency={"guest_program_s": 0.05},
                    sources=[VmConfig(name="golden", host="esx-01", state="running",
                                      chain_depth=1, guest=guest())])
    spec = make_spec(count=2, sources=[{"name": "golden", "chain_budget": 10}])
    p: Provisioner
    async with vcenter(topo) as (vs, vc):
        (before,) = await vs.find_vms(["golden"])
        late = LateSourceRead(vs, before.ref, before)

        def on_event(event: Event) -> None:
            # The reply arrives once both clones landed and the run counted them (nothing
            # of the source in flight), while their guest network phases go on.
            if isinstance(event, PhaseDone) and event.phase == "clone":
                assert p.view is not None
                src = p.view.sources["golden"]
                if src.clones == 2 and src.in_flight == 0:
                    late.release.set()

        p = Provisioner(spec, late, on_event=on_event,  # type: ignore[arg-type]
                        options=opts(refresh_interval_s=0.001))
        summary = await p.run()
    assert summary.ready == 2
    assert late.late  # the late answer came back while the run went on
    assert vc.vm("golden").chain_depth() == 3
    assert summary.sources["golden"].chain_depth == 3
    assert summary.sources["golden"].clones_left == 7


async def test_only_a_running_source_fails_the_rest_as_unschedulable() -> None:
    spec = make_spec(count=10, sources=["running-01"], chain_budget=254, **CLONE_ONLY)
    async with vcenter(hosts=1, frozen_per_host=0, running=1, running_depth=250) as (vs, vc):
        summary = await provision(spec, vs, options=opts())
    assert summary.ready == 4 and summary.failures == {"unschedulable": 6}
    assert vc.vm("running-01").chain_depth() == 254
    assert not vc.clones.faults  # never a failed clone (no chain fault) from vCenter


async def test_failed_guest_step_leaves_a_labelled_member_the_next_run_finishes() -> None:
    spec = make_spec(sources=FROZEN4[:2], count=6)
    async with vcenter(hosts=2) as (vs, vc):
        # guest operations unavailable in two of the clones
        rule = vc.add_fault(method="StartProgramInGuest", object="lt-000[13]",
                            fault="GuestOperationsUnavailable")
        first = await provision(spec, vs, options=opts())
        assert first.failures == {"guest_operation_failed": 2}
        states = {vm.name: vm.extra_config[LABEL_STATE]
                  for vm in vc.folder_vms(spec.folder_path)}
        assert states["lt-0001"] == states["lt-0003"] == "cloned"
        vc.remove_fault(rule)
        second = await provision(spec, vs, options=opts())
    assert second.created == 0 and second.ready == 6 and second.adopted == 2
    assert_complete(vc, spec)
    assert vc.network_conflicts == 0


async def test_resume_members_left_at_each_phase() -> None:
    spec = make_spec(sources=FROZEN4[:1], count=3)
    async with vcenter(hosts=1) as (vs, vc):
        for i, state in enumerate(("cloned", "network", "ready")):
            add_member(vc, spec, i, state, run_id="old")
        summary = await provision(spec, vs, options=opts())
    assert summary.created == 0 and summary.ready == 3 and summary.adopted == 2
    assert vc.calls["StartProgramInGuest"] == 1  # only the "cloned" one needed it
    assert vc.network_conflicts == 0
    assert_complete(vc, spec)


async def test_readiness_by_guestinfo_flag_and_timeout() -> None:
    spec = make_spec(sources=FROZEN4[:1], count=5, readiness={"wait_for": "guestinfo",
                                         "guestinfo_key": "guestinfo.app.ready"})
    async with vcenter(hosts=1, ready_key="guestinfo.app.ready") as (vs, _):
        summary = await provision(spec, vs, options=opts())
    assert summary.ready == 5

    spec = make_spec(sources=FROZEN4[:1], count=3, readiness={"timeout_s": 0.05})
    # DHCP takes 10 s to answer: no clone gets an IP in time
    async with vcenter(hosts=1, latency={"dhcp_s": 10}) as (vs, slow):
        summary = await provision(spec, vs, options=opts())
    assert summary.failures == {"ready_timeout": 3}
    assert {vm.extra_config[LABEL_STATE] for vm in slow.folder_vms(spec.folder_path)} == \
        {"network"}


async def test_guestinfo_templates_reach_the_clone() -> None:
    spec = make_spec(sources=FROZEN4[:1], count=2,
                     guestinfo={"guestinfo.hostname": "{name}.{fleet}",
                                "guestinfo.meta": "{index}/{source}/{run_id}"}, **CLONE_ONLY)
    async with vcenter(hosts=1) as (vs, vc):
        summary = await provision(spec, vs, run_id="r42", options=opts())
    vm = vc.vm("lt-0001")
    assert vm.extra_config["guestinfo.hostname"] == "lt-0001.lt"
    assert vm.extra_config["guestinfo.meta"] == "1/frozen-01/r42"
    assert vm.extra_config[LABEL_STATE] == "ready"  # no later phases: ready at clone time
    assert summary.run_id == "r42"


async def test_clone_only_makes_one_call_per_member() -> None:
    # 200 (500 on the in-memory model): the reads are the same for 100 and 500
    spec = make_spec(count=200, **CLONE_ONLY)
    async with vcenter(hosts=4) as (vs, vc):
        counted = Counted(vs)
        await provision(spec, counted, options=opts(refresh_interval_s=60))  # type: ignore[arg-type]
    assert counted.calls["start_instant_clone"] == 200
    assert counted.calls["update_extra_config"] == 0
    assert counted.calls["get_vm"] <= 5  # no per-clone reads
    # and on the wire: one clone call each, no reconfiguration, no per-clone reads
    assert vc.calls["InstantClone_Task"] == 200
    assert vc.calls["ReconfigVM_Task"] == 0
    assert vc.calls["RetrievePropertiesEx"] <= READS_AT_START


async def test_preflight_errors() -> None:
    async with vcenter(hosts=1, kind="esxi") as (bare, _):
        with pytest.raises(UnsupportedEndpoint):
            await provision(make_spec(sources=FROZEN4[:1], count=1, **CLONE_ONLY), bare,
                            options=opts())
    async with vcenter(hosts=1) as (vs, vc):
        with pytest.raises(ConfigError) as info:
            await provision(make_spec(sources=["frozen-01", "nope"]), vs, options=opts())
        assert info.value.key == "sources" and "nope" in str(info.value)
        vc.add_vm("bsd", host="esx-01", guest=guest(family="other"))
        with pytest.raises(ConfigError) as info:
            await provision(make_spec(sources=["bsd"], network={"refresh": "auto"}), vs,
                            options=opts())
        assert info.value.key == "network.refresh"
    assert vc.calls["InstantClone_Task"] == 0


async def test_event_callback_errors_do_not_break_the_run(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("progress bar bug")

    async with vcenter(hosts=1) as (vs, _):
        summary = await provision(make_spec(sources=FROZEN4[:1], count=3, **CLONE_ONLY), vs,
                                  on_event=broken, options=opts())
    assert summary.ready == 3
    assert "on_event callback failed" in caplog.text


async def test_limits_are_respected_per_host_datastore_and_overall() -> None:
    spec = make_spec(count=200, limits={"per_host": 3, "in_flight": 10, "per_datastore": 4},
                     **CLONE_ONLY)
    async with vcenter(hosts=4, latency={"instant_clone_s": 0.003}) as (vs, vc):
        p = Provisioner(spec, vs, options=opts())
        summary = await p.run()
    assert summary.ready == 200
    assert max(vc.clones.peak("host").values()) <= 3
    assert max(vc.clones.peak("datastore").values()) <= 4
    assert vc.clones.max_in_flight[""] <= 8  # 2 datastores x 4
    stats = {s.key: s for s in p.limiters.statistics()}
    assert stats["overall"].peak <= 8 and stats["overall"].limit == 10


async def test_auto_limits_find_the_host_slots() -> None:
    # A clone takes 0.3 s and a task counts as queued past 0.1 s: the client's own lag
    # (a few ms to hear of a task, on this 2-core machine under load) stays small next
    # to them, as it is next to vCenter's ~1 s clones and the 0.25 s default.
    spec = make_spec(sources=FROZEN4[:2], count=160, limits={"per_host": "auto"}, **CLONE_ONLY)
    async with vcenter(hosts=2, latency={"instant_clone_s": 0.3}) as (vs, vc):
        p = Provisioner(spec, vs, options=opts(tuning=AutoTuning(queued_min_s=0.1)))
        summary = await p.run()
    assert summary.ready == 160
    host_limits = [s.limit for s in p.limiters.statistics() if s.kind == "host"]
    assert host_limits and all(7 <= lim <= 9 for lim in host_limits), host_limits
    # Rarely handed vCenter more than it runs: slow start overshoots by at most one
    # window per host before the first queued task cuts it (16 here), then probing is
    # slow (a probe queues a task or two). The 500-clone run on an in-memory model
    # allowed 10% (50); this shorter one allows the same overshoot and probes: 20%.
    assert vc.clones.queued < 160 * 0.2
    assert max(vc.clones.peak("host").values()) <= 2 * 8


async def test_one_log_line_per_state_change_and_no_secrets(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fleet.engine")
    async with vcenter(hosts=1) as (vs, _):
        await provision(make_spec(count=3, sources=FROZEN4[:1]), vs, options=opts())
    lines = [r.getMessage() for r in caplog.records if "name=lt-0001 " in r.getMessage()]
    kinds = [line.split()[2] for line in lines]
    assert kinds == ["job_queued", "job_started", "phase_done", "phase_done", "phase_done",
                     "phase_done", "phase_done", "job_ready"]
    assert all(re.match(r"^\[ *\d+\.\d{3}s\] ", line) and "index=1 " in line for line in lines)
    phases = [re.search(r"phase=(\w+)", line).group(1)  # type: ignore[union-attr]
              for line in lines if "phase_done" in line]
    assert phases == ["queue", "clone", "network", "reconnect", "ready"]
    assert GUEST_PASSWORD not in caplog.text


async def test_duplicate_name_held_by_our_own_member_is_adopted() -> None:
    """A VM with this job's labels appears after reconciliation (a lost reply of an
    earlier attempt, another fleet process): the clone's DuplicateName adopts it."""
    spec = make_spec(count=4, sources=FROZEN4[:1])
    rec = Recorder()
    async with vcenter(hosts=1) as (vs, vc):

        def on_event(event: Event) -> None:
            rec(event)
            if event.kind == "run_started":
                add_member(vc, spec, 2, "cloned")  # a fresh clone of an earlier attempt

        summary = await provision(spec, vs, on_event=on_event, options=opts())
    assert summary.ready == 4 and summary.adopted == 1 and summary.created == 3
    assert vc.clones.faults == {"DuplicateName": 1}
    (adopted,) = rec.of(JobAdopted)
    assert (adopted.index, adopted.state) == (2, "cloned")
    assert_complete(vc, spec)
    assert vc.network_conflicts == 0  # the adopted one was refreshed too


async def test_refresh_during_a_running_clone_does_not_double_count() -> None:
    """vCenter deepens a running source's chain at the stun, before the clone ends; an
    inventory refresh in between must not make the engine count that clone twice
    (which would retire the source a clone early)."""
    topo = topology(hosts=1, frozen_per_host=0, latency={"instant_clone_s": 0.03},
                    sources=[VmConfig(name="golden", host="esx-01", state="running",
                                      chain_depth=1, guest=guest())])
    spec = make_spec(count=8, sources=[{"name": "golden", "chain_budget": 6}], **CLONE_ONLY)
    async with vcenter(topo) as (vs, vc):
        summary = await provision(spec, vs, options=opts(refresh_interval_s=0.005))
    assert vc.vm("golden").clones == 5  # depth 1 -> 6, every level used
    assert summary.ready == 5 and summary.failures == {"unschedulable": 3}
    assert vc.vm("golden").chain_depth() == 6


@pytest.mark.anyio
async def test_placement_capacity_answers_as_blocked_by_through_a_round() -> None:
    lims = Limiters(LimitsSpec(in_flight=3, per_host=2, per_datastore=128))
    interned: dict[LimitKey, LimitKey] = {}

    def src(name: str, host: str) -> SourceState:
        info = VmInfo(Ref("VirtualMachine", name), name, "poweredOn", True,
                      Ref("HostSystem", host), host, None, (), 1, 1024, "linux")
        return SourceState(name, info, 100)

    sources = [src("a", "esx-1"), src("b", "esx-1"), src("c", "esx-2")]
    keys = {s.name: tuple(interned.setdefault(k, k) for k in
                          lims.keys_for(host=s.info.host_name or "", datastore="ds",
                                        running_source=None)) for s in sources}
    capacity = _PlacementCapacity(lims, lambda s: keys[s.name])
    capacity.fresh()
    # One round: take tokens for a, a, c; every answer stays what blocked_by says.
    for name in ("a", "a", "c"):
        for s in sources:
            assert capacity.blocked(s) == lims.blocked_by(keys[s.name])
        assert lims.try_acquire(keys[name], object()) is not None
        capacity.took(keys[name])
    for s in sources:
        assert capacity.blocked(s) == lims.blocked_by(keys[s.name]) is not None
