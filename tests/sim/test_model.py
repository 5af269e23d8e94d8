"""Simulator behaviour the engine's tests rely on, through the real client in process
(fleet.testing): concurrency of frozen and running sources, the chain growing at the
stun, watermarks, DHCP time, vCenter's own clock, fault rules aimed at what a call
makes, and VMs that appear while it runs."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from itertools import pairwise

import anyio
import pytest

from fleet import errors
from fleet.sim.topology import GuestConfig
from fleet.testing.harness import sim_vsphere, small_topology
from fleet.vsphere import recipes
from fleet.vsphere.model import CloneRequest, GuestCredentials, Ref

pytestmark = pytest.mark.anyio

GUEST = GuestCredentials("root", "fleet-guest")


async def eventually(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll a condition of the simulator's objects (they have no event for it)."""
    with anyio.fail_after(timeout_s):
        for _ in itertools.count():
            if predicate():
                return
            await anyio.sleep(0.01)


async def clone(vs: object, source: str, name: str, folder: Ref, **kw: object) -> object:
    from fleet.vsphere.client import VSphereClient

    assert isinstance(vs, VSphereClient)
    (src,) = await vs.find_vms([source])
    return await vs.start_instant_clone(CloneRequest(source=src.ref, name=name,
                                                     folder=folder, **kw))  # type: ignore[arg-type]


async def test_frozen_clones_run_together_running_ones_one_at_a_time() -> None:
    topo = small_topology(hosts=1, running=1, latency={"instant_clone_s": 0.05})
    async with sim_vsphere(topo) as (vs, vc):
        folder = await vs.ensure_folder("t")
        tasks = [await clone(vs, "frozen-01", f"f{i}", folder) for i in range(4)]
        tasks += [await clone(vs, "running-01", f"r{i}", folder) for i in range(4)]
        for task in tasks:
            await task.wait(10)  # type: ignore[attr-defined]
    # What the simulator guarantees, whatever the pace of the submissions (a slow
    # client may submit a clone after another has ended): a clone of the frozen source
    # never waits for another one, those of the running one run one at a time, each a
    # level deeper.
    snaps = [t.snapshot for t in tasks]  # type: ignore[attr-defined]
    frozen, running = snaps[:4], snaps[4:]
    for i, a in enumerate(frozen):
        for b in frozen[i + 1:]:
            if b.queue_time < a.complete_time:  # submitted while a was in flight
                assert b.start_time < a.complete_time, (a, b)
    for a, b in pairwise(running):
        assert b.start_time >= a.complete_time, (a, b)
    assert vc.vm("frozen-01").chain_depth() == 2
    assert {vc.vm(f"f{i}").chain_depth() for i in range(4)} == {3}
    assert vc.vm("running-01").chain_depth() == 5
    assert sorted(vc.vm(f"r{i}").chain_depth() for i in range(4)) == [2, 3, 4, 5]
    assert vc.clones.max_depth_by_source == {"frozen-01": 3, "running-01": 5}


async def test_a_running_source_deepens_at_the_stun_and_keeps_the_level() -> None:
    topo = small_topology(hosts=1, frozen_per_host=0, running=1,
                          latency={"instant_clone_s": 1.0})
    async with sim_vsphere(topo) as (vs, vc):
        folder = await vs.ensure_folder("t")
        task = await clone(vs, "running-01", "r0", folder)
        # the stun is over: the source has its new delta, long before the clone ends
        await eventually(lambda: vc.vm("running-01").chain_depth() == 2)
        (source,) = await vs.find_vms(["running-01"])
        assert source.chain_depth == 2  # what a client reads (layoutEx) says so too
        vc.set_host_state("esx-01", "notResponding")  # the clone fails at its end
        with pytest.raises(errors.HostUnavailable):
            await task.wait(10)  # type: ignore[attr-defined]
    assert vc.vm("running-01").chain_depth() == 2
    assert vc.clones.faults == {"InvalidHostConnectionState": 1}


async def test_a_chain_raised_to_the_limit_during_the_stun_never_grows_past_it() -> None:
    """Another tool deepens a running source to vSphere's limit (255) while a clone of it
    is in its stun: the clone fails with the chain fault, and the source's chain, which
    vSphere cannot make deeper than 255, stays at 255 (the stun adds no delta)."""
    topo = small_topology(hosts=1, frozen_per_host=0, running=1,
                          latency={"stun_s": 0.5, "instant_clone_s": 1.0})
    async with sim_vsphere(topo) as (vs, vc):
        folder = await vs.ensure_folder("t")
        source = vc.vm("running-01")
        task = await clone(vs, "running-01", "r0", folder)
        await eventually(lambda: source.stunned)
        source.set_chain_depth(255)
        with pytest.raises(errors.ChainTooDeep):
            await task.wait(10)  # type: ignore[attr-defined]
        assert source.chain_depth() == 255 and not source.stunned
    assert vc.clones.faults == {"GenericVmConfigFault": 1}


async def test_clones_beyond_the_slots_queue_and_are_counted() -> None:
    # A clone takes 0.3 s: on a quiet machine all six are handed over before the first
    # ends, and four queue. On a loaded one a clone may end before the last is handed
    # over, and then fewer queue, rightly: what the simulator guarantees is that a
    # clone queues exactly when it arrives at a host whose slots are all taken.
    topo = small_topology(hosts=1, slots=2, latency={"instant_clone_s": 0.3})
    async with sim_vsphere(topo) as (vs, vc):
        host_slots = f"host:{vc.sim.hosts['esx-01'].moid}"
        full_at_arrival: list[bool] = []
        vc.before_call("InstantClone_Task", lambda _source: full_at_arrival.append(
            vc.sim.scheduler.busy(host_slots)))
        folder = await vs.ensure_folder("t")
        tasks = [await clone(vs, "frozen-01", f"q{i}", folder) for i in range(6)]
        for task in tasks:
            await task.wait(30)  # type: ignore[attr-defined]
    assert len(full_at_arrival) == 6 and full_at_arrival[:2] == [False, False]
    assert vc.clones.submitted == 6 and vc.clones.queued == sum(full_at_arrival) >= 1
    assert vc.max_running("esx-01") == 2
    assert vc.clones.peak("host") == {"esx-01": 6}
    assert vc.clones.in_flight[""] == 0 and not vc.clones.faults


async def test_dhcp_answers_after_its_latency() -> None:
    for dhcp_s, lease_now in ((3600.0, False), (0.0, True)):
        topo = small_topology(hosts=1, latency={"dhcp_s": dhcp_s})
        async with sim_vsphere(topo) as (vs, _):
            folder = await vs.ensure_folder("t")
            task = await clone(vs, "frozen-01", "d", folder, nic_connect="disconnect")
            ref = await task.wait(10)  # type: ignore[attr-defined]
            code = await vs.run_in_guest(ref, GUEST, recipes.linux_refresh(), timeout_s=10)
            assert code == 0
            await vs.set_nics_connected(ref, True)
            ip = (await vs.get_vm(ref)).guest_ip
            assert (ip is not None) is lease_now, (dhcp_s, ip)


async def test_vcenter_s_clock_may_differ_from_this_machine_s() -> None:
    async with sim_vsphere(small_topology(hosts=1)) as (vs, vc):
        vc.clock_offset_s = 7200.0
        skew = await vs.server_time() - time.time()
    assert 7200 - 60 < skew < 7200 + 60


async def test_fault_rules_aim_at_what_a_call_makes_and_the_guest_a_program_runs_in(
        ) -> None:
    async with sim_vsphere(small_topology(hosts=1)) as (vs, vc):
        folder = await vs.ensure_folder("t")
        rule = vc.add_fault(method="InstantClone_Task", object="bad-*", fault="InvalidDatastore")
        good = await clone(vs, "frozen-01", "good-1", folder)
        bad = await clone(vs, "frozen-01", "bad-1", folder)
        ref = await good.wait(10)  # type: ignore[attr-defined]
        with pytest.raises(errors.VSphereFault):
            await bad.wait(10)  # type: ignore[attr-defined]
        assert rule.fired == 1
        vc.add_fault(method="StartProgramInGuest", object="good-1",
                     fault="GuestOperationsUnavailable")
        with pytest.raises(errors.GuestOperationFailed):
            await vs.run_in_guest(ref, GUEST, recipes.custom_program("/bin/true"),
                                  timeout_s=10)


async def test_a_vm_that_appears_while_it_runs_is_seen() -> None:
    async with sim_vsphere(small_topology(hosts=1)) as (vs, vc):
        assert await vs.find_folder("late") is None
        vc.add_vm("bsd", host="esx-01", folder="late", guest=GuestConfig(family="other"))
        (vm,) = await vs.find_vms(["bsd"])
        folder = await vs.find_folder("late")
        assert folder is not None
        assert [v.name for v in await vs.list_folder_vms(folder, ())] == ["bsd"]
    assert vm.guest_family == "other" and vm.powered_on
