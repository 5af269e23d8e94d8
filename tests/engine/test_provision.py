"""Provisioning end to end against the fake: convergence, faults, re-placement, adoption."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable
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
    PhaseDone,
    SourceRetired,
)
from fleet.engine.limits import Limiters, LimitKey
from fleet.engine.placement import SourceState
from fleet.engine.reconcile import LABEL_STATE, labels
from fleet.engine.run import Provisioner
from fleet.engine.spec import FleetSpec, LimitsSpec
from fleet.errors import (
    ChainTooDeep,
    ConfigError,
    ConnectionFailed,
    DuplicateName,
    GuestOperationFailed,
    ResourceBusy,
    UnsupportedEndpoint,
    VSphereFault,
)
from fleet.vsphere.fake import FakeLatency, FakeTask, FakeVm, FakeVSphere, FaultRule, make_fake
from fleet.vsphere.model import CloneRequest, Ref, VmInfo
from tests.engine.conftest import (
    CLONE_ONLY,
    CREDS,
    FROZEN4,
    GUEST_PASSWORD,
    assert_complete,
    make_spec,
    members,
)
from tests.engine.conftest import options as opts

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, cls: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]


async def test_full_workflow_every_member_ready_without_conflicts() -> None:
    fake = make_fake(hosts=4, credentials=CREDS)
    spec = make_spec(count=300)
    rec = Recorder()
    async with fake:
        summary = await provision(spec, fake, on_event=rec, options=opts())
    assert_complete(fake, spec)
    assert summary.ready == summary.requested == 300 and summary.failed == 0
    assert summary.complete and summary.created == 300 and summary.adopted == 0
    assert fake.stats.network_conflicts == 0
    assert max(fake.stats.max_in_flight_per_host.values()) <= 8
    assert fake.stats.tasks_queued == 0  # never more than vCenter runs at once
    for phase in ("queue", "clone", "network", "reconnect", "ready"):
        assert summary.phases[phase].count == 300, phase
        p = summary.phases[phase]
        assert p.p50_s <= p.p95_s <= p.p99_s <= p.max_s
    assert sum(s.clones for s in summary.sources.values()) == 300
    assert len(rec.of(JobReady)) == 300
    data = json.loads(summary.to_json())
    for key in ("requested", "ready", "failed", "duration_s", "clones_per_s", "phases",
                "sources", "failures"):
        assert key in data
    assert data["sources"]["frozen-01"]["chain_depth"] == 2
    assert data["phases"]["clone"]["count"] == 300
    # every member got its labels, guestinfo and a real IP of its own
    ips = set()
    for vm in fake.folder_vms(spec.folder_path):
        assert vm.extra_config["guestinfo.fleet.run_id"] == summary.run_id
        assert vm.guest_ip is not None and vm.guest_macs == [n.mac for n in vm.nics]
        ips.add(vm.guest_ip)
    assert len(ips) == 300


async def test_spread_over_hosts_and_sources() -> None:
    fake = make_fake(hosts=4)
    spec = make_spec(count=200, **CLONE_ONLY)
    async with fake:
        summary = await provision(spec, fake, options=opts())
    per_source = Counter(fake.stats.clones_per_source)
    assert set(per_source) == set(FROZEN4)
    assert max(per_source.values()) - min(per_source.values()) <= 20
    assert summary.sources["frozen-03"].clones == per_source["frozen-03"]


async def test_rerun_creates_nothing() -> None:
    fake = make_fake(hosts=2, credentials=CREDS)
    spec = make_spec(sources=FROZEN4[:2], count=40)
    async with fake:
        first = await provision(spec, fake, options=opts())
        calls = fake.stats.calls["start_instant_clone"]
        second = await provision(spec, fake, options=opts())
    assert first.created == 40 and second.created == 0 and second.ready == 40
    assert fake.stats.calls["start_instant_clone"] == calls
    assert_complete(fake, spec)


def two(**over: Any) -> FleetSpec:
    return make_spec(sources=FROZEN4[:2], **CLONE_ONLY, **over)


async def test_scale_down_then_up() -> None:
    fake = make_fake(hosts=2)
    rec = Recorder()
    async with fake:
        await provision(two(count=30), fake, options=opts())
        down = await provision(two(count=18), fake, on_event=rec, options=opts())
        assert down.removed == 12 and down.created == 0 and down.ready == 18
        assert_complete(fake, make_spec(sources=FROZEN4[:2], count=18))
        assert sorted(fake.stats.destroyed_names) == [f"lt-{i:04d}" for i in range(18, 30)]
        up = await provision(two(count=30), fake, options=opts())
        assert up.created == 12 and up.ready == 30
        assert_complete(fake, make_spec(sources=FROZEN4[:2], count=30))


async def test_foreign_vm_holding_a_name_is_reported_and_left_alone() -> None:
    fake = make_fake(hosts=2)
    spec = make_spec(sources=FROZEN4[:2], count=10, **CLONE_ONLY)
    fake.add_vm("lt-0003", host="esx-01", folder=spec.folder_path)  # not a member
    rec = Recorder()
    async with fake:
        summary = await provision(spec, fake, on_event=rec, options=opts())
    assert summary.ready == 9 and summary.failed == 1
    assert summary.failures == {"name_taken": 1} and summary.failed_indexes == [3]
    assert not summary.complete
    assert fake.stats.calls["start_instant_clone"] == 9  # nothing was tried for it
    assert fake.vm("lt-0003").extra_config == {}
    assert [e.index for e in rec.of(JobFailed)] == [3]


async def test_duplicate_name_from_a_foreign_vm_at_clone_time() -> None:
    fake = make_fake(hosts=2)
    spec = make_spec(sources=FROZEN4[:2], count=6, **CLONE_ONLY)
    other = fake.add_vm("elsewhere", host="esx-02")

    def dup(message: str) -> DuplicateName:
        return DuplicateName(message, name="lt-0002", existing=other.ref.id)

    fake.add_fault(FaultRule("instant_clone", dup, match="lt-0002"))
    async with fake:
        summary = await provision(spec, fake, options=opts())
    assert summary.failures == {"name_taken": 1} and summary.ready == 5
    assert fake.all_vms().count(other) == 1 and other.extra_config == {}
    assert fake.stats.destroyed == 0


async def test_transient_faults_are_retried() -> None:
    fake = make_fake(hosts=4, credentials=CREDS, seed=7)
    fake.add_fault(FaultRule("start_instant_clone", ResourceBusy, probability=0.2))
    fake.add_fault(FaultRule("run_in_guest", ConnectionFailed, probability=0.1))
    fake.add_fault(FaultRule("set_nics_connected", ConnectionFailed, probability=0.1))
    spec = make_spec(count=120, retries={"attempts": 10})
    rec = Recorder()
    async with fake:
        summary = await provision(spec, fake, on_event=rec, options=opts())
    assert summary.ready == 120, summary.failures
    assert_complete(fake, spec)
    retried = Counter(e.phase for e in rec.of(JobRetried))
    assert retried["clone"] > 0 and retried["network"] > 0 and retried["reconnect"] > 0
    assert fake.stats.network_conflicts == 0


async def test_permanent_fault_is_reported_not_retried() -> None:
    fake = make_fake(hosts=2)
    fake.add_fault(FaultRule("instant_clone", VSphereFault, match="lt-0002"))
    spec = make_spec(sources=FROZEN4[:2], count=8, **CLONE_ONLY)
    async with fake:
        summary = await provision(spec, fake, options=opts())
    assert summary.failures == {"fault": 1} and summary.failed_indexes == [2]
    assert fake.faults[0].fired == 1  # one attempt only
    assert sorted(members(fake, spec)) == [0, 1, 3, 4, 5, 6, 7]


async def test_retries_are_bounded() -> None:
    fake = make_fake(hosts=2)
    rule = fake.add_fault(FaultRule("start_instant_clone", ConnectionFailed, match="lt-0001"))
    # A submit that may have gone through is given the clone timeout to land before the
    # job is called failed: keep that short here.
    spec = make_spec(sources=FROZEN4[:2], count=4, retries={"attempts": 3},
                     timeouts={"clone_s": 0.3}, **CLONE_ONLY)
    async with fake:
        summary = await provision(spec, fake, options=opts())
    assert rule.fired == 3
    assert summary.failures == {"connection": 1} and summary.ready == 3


async def test_lost_reply_storm_adopts_instead_of_duplicating() -> None:
    fake = make_fake(hosts=4, credentials=CREDS, seed=11)
    fake.add_fault(FaultRule("instant_clone", ConnectionFailed, lost_reply=True,
                             probability=0.25))
    fake.add_fault(FaultRule("start_instant_clone", ConnectionFailed, lost_reply=True,
                             probability=0.15))
    fake.add_fault(FaultRule("task.wait", ConnectionFailed, lost_reply=True, probability=0.1))
    fake.add_fault(FaultRule("update_extra_config", ConnectionFailed, lost_reply=True,
                             probability=0.1))
    spec = make_spec(count=150, retries={"attempts": 10})
    rec = Recorder()
    async with fake:
        summary = await provision(spec, fake, on_event=rec, options=opts())
        await fake.wait_idle()  # let any straggling task land
    assert summary.ready == 150, summary.failures
    assert_complete(fake, spec)
    assert len(fake.folder_vms(spec.folder_path)) == 150  # no duplicates, no strays
    assert fake.stats.destroyed == 0
    assert summary.adopted == len(rec.of(JobAdopted)) > 10
    assert fake.stats.network_conflicts == 0


async def test_clone_timeout_then_adopt() -> None:
    fake = make_fake(hosts=2, latency=FakeLatency(clone_s=0.03))
    spec = make_spec(sources=FROZEN4[:2], count=8, timeouts={"clone_s": 0.01}, **CLONE_ONLY)
    rec = Recorder()
    async with fake:
        summary = await provision(spec, fake, on_event=rec, options=opts())
    assert summary.ready == 8
    assert len(rec.of(JobAdopted)) == 8  # each attempt timed out, its VM was found
    assert len(fake.folder_vms(spec.folder_path)) == 8


def before_each_clone(fake: FakeVSphere, hook: Callable[[FakeVm], None]) -> None:
    """Call ``hook(source)`` as each clone is handed to the fake, before it is.

    "Mid-burst" is a point in what was handed to vCenter: the run's own count of
    finished members can lag every clone on a loaded machine (all were made, only
    their labels were still to write), and an event then comes after the burst."""
    submit = fake.start_instant_clone

    async def start(request: CloneRequest) -> FakeTask:
        hook(next(vm for vm in fake.all_vms() if vm.ref == request.source))
        return await submit(request)

    fake.start_instant_clone = start  # type: ignore[method-assign]


async def test_host_lost_mid_burst_jobs_are_replaced() -> None:
    fake = make_fake(hosts=4, latency=FakeLatency(clone_s=0.004))
    spec = make_spec(count=240, **CLONE_ONLY)
    rec = Recorder()

    def lose_host(source: FakeVm) -> None:
        # A quarter in, with members made on esx-02 and this clone going there: the
        # host goes away under it.
        assert source.host is not None
        if source.host.connected and source.host.name == "esx-02" and \
                fake.stats.clones_submitted >= 60 and any(
                    vm.host is source.host for vm in fake.folder_vms(spec.folder_path)):
            fake.set_host_state("esx-02", "notResponding")

    before_each_clone(fake, lose_host)
    async with fake:
        summary = await provision(spec, fake, on_event=rec, options=opts())
    assert not fake.hosts["esx-02"].connected
    assert summary.ready == 240, summary.failures
    assert_complete(fake, spec)
    assert [e.host for e in rec.of(HostExcluded)] == ["esx-02"]
    on_lost = [vm for vm in fake.folder_vms(spec.folder_path)
               if vm.host is not None and vm.host.name == "esx-02"]
    assert 0 < len(on_lost) < 240 // 4 + 10
    if rec.of(JobReplaced):
        assert {e.reason for e in rec.of(JobReplaced)} == {"host_unavailable"}


async def test_source_powered_off_mid_burst_is_retired() -> None:
    fake = make_fake(hosts=4, latency=FakeLatency(clone_s=0.004))
    spec = make_spec(count=200, **CLONE_ONLY)
    rec = Recorder()

    def power_off(source: FakeVm) -> None:
        # A fifth in, as a clone of frozen-03 is handed over: pulled from under it.
        if source.name == "frozen-03" and source.powered_on and \
                fake.stats.clones_submitted >= 40:
            fake.power_off_now("frozen-03")

    before_each_clone(fake, power_off)
    async with fake:
        summary = await provision(spec, fake, on_event=rec, options=opts())
    assert not fake.vm("frozen-03").powered_on
    assert summary.ready == 200
    assert_complete(fake, spec)
    retired = rec.of(SourceRetired)
    assert [e.source for e in retired] == ["frozen-03"]
    assert summary.sources["frozen-03"].retired is not None


async def test_chain_fault_retires_the_source_and_replaces_the_job() -> None:
    fake = make_fake(hosts=2)
    fake.add_fault(FaultRule("instant_clone", ChainTooDeep, count=1))
    spec = make_spec(count=60, sources=["frozen-01", "frozen-02"], **CLONE_ONLY)
    rec = Recorder()
    async with fake:
        summary = await provision(spec, fake, on_event=rec, options=opts())
    assert summary.ready == 60
    (retired,) = rec.of(SourceRetired)
    assert retired.reason.startswith("chain_too_deep")
    assert len(rec.of(JobReplaced)) == 1
    # only the clones already in flight when it failed came from it
    assert fake.stats.clones_per_source[retired.source] <= 7


async def test_running_source_stops_at_its_budget() -> None:
    # the running source has a host of its own, so it is worth using when frozen ones are busy
    fake = FakeVSphere(latency=FakeLatency(clone_s=0.003))
    fake.add_host("esx-01", slots=2)
    fake.add_host("esx-02", slots=8)
    fake.add_vm("frozen-01", host="esx-01", state="frozen", chain_depth=2)
    fake.add_vm("golden", host="esx-02", state="running", chain_depth=3)
    spec = make_spec(count=150, sources=["frozen-01", {"name": "golden", "chain_budget": 12}],
                     limits={"per_host": 2}, **CLONE_ONLY)
    rec = Recorder()
    async with fake:
        summary = await provision(spec, fake, on_event=rec, options=opts())
    assert summary.ready == 150
    assert fake.stats.clones_per_source["golden"] == 9  # depth 3 -> 12
    assert fake.vm("golden").chain_depth == 12
    assert fake.stats.max_clone_depth_per_source["golden"] == 12
    assert fake.stats.max_in_flight_per_source["golden"] == 1
    assert [e.source for e in rec.of(SourceRetired)] == ["golden"]
    assert summary.sources["golden"].clones_left == 0


class LateSourceRead(FakeVSphere):
    """A vCenter under load: the run's first read of ``source`` is answered as the source
    was before the run (vCenter served it then) and arrives only once ``release`` is set;
    later reads of it never come back (the run ends first)."""

    def __init__(self, source: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.source = source
        self.before: VmInfo | None = None
        self.release = anyio.Event()
        self.reads = 0
        self.late = False  # the late answer came back

    async def get_vm(self, ref: Ref) -> VmInfo:
        if ref != self.vm(self.source).ref:
            return await super().get_vm(ref)
        self.reads += 1
        if self.reads > 1:
            await anyio.sleep_forever()
        assert self.before is not None
        with anyio.fail_after(10):
            await self.release.wait()
        self.late = True
        return self.before


async def test_a_late_refresh_never_lowers_a_running_source_chain() -> None:
    # A refresh of a running source whose reply comes back after clones of the source
    # landed must not take the depth the reply shows: the clones' stuns came after the
    # read was served. Taking it would let the source pass its budget, and the summary
    # would show a chain shallower than vCenter has.
    fake = LateSourceRead("golden", latency=FakeLatency(guest_op_s=0.05))
    fake.add_host("esx-01")
    fake.add_vm("golden", host="esx-01", state="running", chain_depth=1, credentials=CREDS)
    fake.before = fake._info(fake.vm("golden"))
    spec = make_spec(count=2, sources=[{"name": "golden", "chain_budget": 10}])
    p: Provisioner

    def on_event(event: Event) -> None:
        # The reply arrives once both clones landed and the run counted them (nothing of
        # the source in flight), while their guest network phases go on.
        if isinstance(event, PhaseDone) and event.phase == "clone":
            assert p.view is not None
            src = p.view.sources["golden"]
            if src.clones == 2 and src.in_flight == 0:
                fake.release.set()

    async with fake:
        p = Provisioner(spec, fake, on_event=on_event, options=opts(refresh_interval_s=0.001))
        summary = await p.run()
    assert summary.ready == 2
    assert fake.late  # the late answer came back while the run went on
    assert fake.vm("golden").chain_depth == 3
    assert summary.sources["golden"].chain_depth == 3
    assert summary.sources["golden"].clones_left == 7


async def test_only_a_running_source_fails_the_rest_as_unschedulable() -> None:
    fake = make_fake(hosts=1, frozen_per_host=0, running=1, running_depth=250)
    spec = make_spec(count=10, sources=["running-01"], chain_budget=254, **CLONE_ONLY)
    async with fake:
        summary = await provision(spec, fake, options=opts())
    assert summary.ready == 4 and summary.failures == {"unschedulable": 6}
    assert fake.vm("running-01").chain_depth == 254
    assert fake.stats.clones_failed == 0  # never a ChainTooDeep from vCenter


async def test_failed_guest_step_leaves_a_labelled_member_the_next_run_finishes() -> None:
    fake = make_fake(hosts=2, credentials=CREDS)
    rule = fake.add_fault(FaultRule("run_in_guest", GuestOperationFailed, match="lt-000[13]"))
    spec = make_spec(sources=FROZEN4[:2], count=6)
    async with fake:
        first = await provision(spec, fake, options=opts())
        assert first.failures == {"guest_operation_failed": 2}
        states = {vm.name: vm.extra_config[LABEL_STATE]
                  for vm in fake.folder_vms(spec.folder_path)}
        assert states["lt-0001"] == states["lt-0003"] == "cloned"
        fake.faults.remove(rule)
        second = await provision(spec, fake, options=opts())
    assert second.created == 0 and second.ready == 6 and second.adopted == 2
    assert_complete(fake, spec)
    assert fake.stats.network_conflicts == 0


async def test_resume_members_left_at_each_phase() -> None:
    fake = make_fake(hosts=1, credentials=CREDS)
    spec = make_spec(sources=FROZEN4[:1], count=3)
    async with fake:
        src = fake.vm("frozen-01")
        for i, state in enumerate(("cloned", "network", "ready")):
            vm = fake.add_vm(spec.vm_name(i), host="esx-01", folder=spec.folder_path,
                             credentials=CREDS,
                             extra_config=labels(fleet="lt", index=i, run_id="old",
                                                 source="frozen-01",
                                                 state=state))  # type: ignore[arg-type]
            if state == "cloned":  # as a fresh clone: stale MAC, NIC down
                vm.guest_macs = list(src.guest_macs)
                vm.nics[0].connected = False
                vm.guest_ip = None
        summary = await provision(spec, fake, options=opts())
    assert summary.created == 0 and summary.ready == 3 and summary.adopted == 2
    assert fake.stats.calls["run_in_guest"] == 1  # only the "cloned" one needed it
    assert fake.stats.network_conflicts == 0
    assert_complete(fake, spec)


async def test_readiness_by_guestinfo_flag_and_timeout() -> None:
    fake = make_fake(hosts=1, credentials=CREDS, guest_ready_key="guestinfo.app.ready")
    spec = make_spec(sources=FROZEN4[:1], count=5, readiness={"wait_for": "guestinfo",
                                         "guestinfo_key": "guestinfo.app.ready"})
    async with fake:
        summary = await provision(spec, fake, options=opts())
    assert summary.ready == 5

    slow = make_fake(hosts=1, credentials=CREDS, latency=FakeLatency(dhcp_s=10))
    spec = make_spec(sources=FROZEN4[:1], count=3, readiness={"timeout_s": 0.05})
    async with slow:
        summary = await provision(spec, slow, options=opts())
    assert summary.failures == {"ready_timeout": 3}
    assert {vm.extra_config[LABEL_STATE] for vm in slow.folder_vms(spec.folder_path)} == \
        {"network"}


async def test_guestinfo_templates_reach_the_clone() -> None:
    fake = make_fake(hosts=1)
    spec = make_spec(sources=FROZEN4[:1], count=2,
                     guestinfo={"guestinfo.hostname": "{name}.{fleet}",
                                "guestinfo.meta": "{index}/{source}/{run_id}"}, **CLONE_ONLY)
    async with fake:
        summary = await provision(spec, fake, run_id="r42", options=opts())
    vm = fake.vm("lt-0001")
    assert vm.extra_config["guestinfo.hostname"] == "lt-0001.lt"
    assert vm.extra_config["guestinfo.meta"] == "1/frozen-01/r42"
    assert vm.extra_config[LABEL_STATE] == "ready"  # no later phases: ready at clone time
    assert summary.run_id == "r42"


async def test_clone_only_makes_one_call_per_member() -> None:
    fake = make_fake(hosts=4)
    spec = make_spec(count=500, **CLONE_ONLY)
    async with fake:
        await provision(spec, fake, options=opts(refresh_interval_s=60))
    assert fake.stats.calls["start_instant_clone"] == 500
    assert fake.stats.calls["update_extra_config"] == 0
    assert fake.stats.calls["get_vm"] <= 5  # no per-clone reads


async def test_preflight_errors() -> None:
    bare = make_fake(hosts=1, api_type="HostAgent")
    async with bare:
        with pytest.raises(UnsupportedEndpoint):
            await provision(make_spec(sources=FROZEN4[:1], count=1, **CLONE_ONLY), bare,
                            options=opts())
    fake = make_fake(hosts=1)
    async with fake:
        with pytest.raises(ConfigError) as info:
            await provision(make_spec(sources=["frozen-01", "nope"]), fake, options=opts())
        assert info.value.key == "sources" and "nope" in str(info.value)
        fake.add_vm("bsd", host="esx-01", guest_family="other")
        with pytest.raises(ConfigError) as info:
            await provision(make_spec(sources=["bsd"], network={"refresh": "auto"}), fake,
                            options=opts())
        assert info.value.key == "network.refresh"
    assert fake.stats.calls["start_instant_clone"] == 0


async def test_event_callback_errors_do_not_break_the_run(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("progress bar bug")

    fake = make_fake(hosts=1)
    async with fake:
        summary = await provision(make_spec(sources=FROZEN4[:1], count=3, **CLONE_ONLY), fake,
                                  on_event=broken, options=opts())
    assert summary.ready == 3
    assert "on_event callback failed" in caplog.text


async def test_limits_are_respected_per_host_datastore_and_overall() -> None:
    fake = make_fake(hosts=4, latency=FakeLatency(clone_s=0.003))
    spec = make_spec(count=200, limits={"per_host": 3, "in_flight": 10, "per_datastore": 4},
                     **CLONE_ONLY)
    async with fake:
        p = Provisioner(spec, fake, options=opts())
        summary = await p.run()
    assert summary.ready == 200
    assert max(fake.stats.max_in_flight_per_host.values()) <= 3
    assert max(fake.stats.max_in_flight_per_datastore.values()) <= 4
    assert fake.stats.max_in_flight_total <= 8  # 2 datastores x 4
    stats = {s.key: s for s in p.limiters.statistics()}
    assert stats["overall"].peak <= 8 and stats["overall"].limit == 10


async def test_auto_limits_find_the_host_slots() -> None:
    fake = make_fake(hosts=2, latency=FakeLatency(clone_s=0.01))
    spec = make_spec(sources=FROZEN4[:2], count=500, limits={"per_host": "auto"}, **CLONE_ONLY)
    async with fake:
        p = Provisioner(spec, fake, options=opts())
        summary = await p.run()
    assert summary.ready == 500
    host_limits = [s.limit for s in p.limiters.statistics() if s.kind == "host"]
    assert host_limits and all(7 <= lim <= 9 for lim in host_limits), host_limits
    # Rarely handed vCenter more than it runs: slow start overshoots by at most one
    # window per host before the first queued task cuts it, then probing is slow.
    assert fake.stats.tasks_queued < 500 * 0.1
    assert max(fake.stats.max_in_flight_per_host.values()) <= 2 * 8


async def test_one_log_line_per_state_change_and_no_secrets(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fleet.engine")
    fake = make_fake(hosts=1, credentials=CREDS)
    async with fake:
        await provision(make_spec(count=3, sources=FROZEN4[:1]), fake, options=opts())
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
    fake = make_fake(hosts=1, credentials=CREDS)
    spec = make_spec(count=4, sources=FROZEN4[:1])
    rec = Recorder()

    def on_event(event: Event) -> None:
        rec(event)
        if event.kind == "run_started":
            vm = fake.add_vm("lt-0002", host="esx-01", folder=spec.folder_path,
                             credentials=CREDS,
                             extra_config=labels(fleet="lt", index=2, run_id="earlier",
                                                 source="frozen-01", state="cloned"))
            vm.guest_macs = list(fake.vm("frozen-01").guest_macs)  # a fresh clone's guest
            vm.nics[0].connected = False
            vm.guest_ip = None

    async with fake:
        summary = await provision(spec, fake, on_event=on_event, options=opts())
    assert summary.ready == 4 and summary.adopted == 1 and summary.created == 3
    assert fake.stats.task_errors == {"duplicate_name": 1}
    (adopted,) = rec.of(JobAdopted)
    assert (adopted.index, adopted.state) == (2, "cloned")
    assert_complete(fake, spec)
    assert fake.stats.network_conflicts == 0  # the adopted one was refreshed too


async def test_refresh_during_a_running_clone_does_not_double_count() -> None:
    """vCenter deepens a running source's chain at the stun, before the clone ends; an
    inventory refresh in between must not make the engine count that clone twice
    (which would retire the source a clone early)."""
    fake = FakeVSphere(latency=FakeLatency(clone_s=0.03))
    fake.add_host("esx-01")
    fake.add_vm("golden", host="esx-01", state="running", chain_depth=1)
    spec = make_spec(count=8, sources=[{"name": "golden", "chain_budget": 6}], **CLONE_ONLY)
    async with fake:
        summary = await provision(spec, fake, options=opts(refresh_interval_s=0.005))
    assert fake.stats.clones_per_source["golden"] == 5  # depth 1 -> 6, every level used
    assert summary.ready == 5 and summary.failures == {"unschedulable": 3}
    assert fake.vm("golden").chain_depth == 6


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
