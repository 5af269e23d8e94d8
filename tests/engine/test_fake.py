"""The in-memory fake plays DESIGN.md section 3; the engine tests rely on it, so test it."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import anyio
import pytest

from fleet.errors import (
    ChainTooDeep,
    ConnectionFailed,
    DuplicateName,
    GuestOperationFailed,
    HostUnavailable,
    InsufficientResources,
    InvalidGuestLogin,
    NotFound,
    RequestTimeout,
    SourceNotPoweredOn,
    TaskCancelled,
)
from fleet.vsphere import recipes
from fleet.vsphere.fake import FakeLatency, FakeVSphere, FaultRule, make_fake
from fleet.vsphere.model import CloneRequest, GuestCredentials, Ref, TaskHandle, VSphere
from tests.engine.conftest import CREDS

pytestmark = pytest.mark.anyio


def test_fake_implements_the_protocol() -> None:
    assert isinstance(FakeVSphere(), VSphere)


async def _clone(fake: FakeVSphere, source: str, name: str, folder: Ref, **kw: object) -> Ref:
    task = await fake.start_instant_clone(
        CloneRequest(fake.vm(source).ref, name, folder, **kw))  # type: ignore[arg-type]
    assert isinstance(task, TaskHandle)
    result: Ref = await task.wait(timeout_s=5)
    return result


async def test_task_times_are_vcenters_not_the_callers_lost_time() -> None:
    """vCenter's task times do not stretch when the caller's process stalls: a clone runs
    its modelled duration, the next in line starts when it ends, and a slot whose clone
    has ended by then is free to a new request (the auto limits read these times)."""
    fake = make_fake(hosts=1, slots=1,
                     latency=FakeLatency(clone_s=0.01, clone_per_depth_s=0.0))
    async with fake:
        folder = await fake.ensure_folder("f")
        src = fake.vm("frozen-01").ref
        a = await fake.start_instant_clone(CloneRequest(src, "a", folder))
        b = await fake.start_instant_clone(CloneRequest(src, "b", folder))
        time.sleep(0.1)  # noqa: ASYNC251 - the caller stalls; vCenter's clock runs on
        c = await fake.start_instant_clone(CloneRequest(src, "c", folder))
        for t in (a, b, c):
            await t.wait(timeout_s=5)
        sa, sb, sc = a.snapshot, b.snapshot, c.snapshot
        assert sa.queue_time is not None and sb.queue_time is not None
        assert sc.queue_time is not None and sa.complete_time is not None
        assert sa.start_time == sa.queue_time  # a free slot: started on arrival
        assert sa.complete_time - sa.start_time == pytest.approx(0.01)
        assert sb.start_time == max(sb.queue_time, sa.complete_time)  # a's slot
        assert sb.complete_time is not None and sb.start_time is not None
        assert sb.complete_time - sb.start_time == pytest.approx(0.01)
        # b had ended 0.08 s before c came (0.1 s of stall): c found the slot free.
        assert sc.start_time == sc.queue_time


async def test_slots_queue_tasks_beyond_them() -> None:
    fake = make_fake(hosts=1, slots=2, latency=FakeLatency(clone_s=0.05))
    async with fake:
        folder = await fake.ensure_folder("f")
        src = fake.vm("frozen-01").ref
        tasks = [await fake.start_instant_clone(CloneRequest(src, f"c{i}", folder))
                 for i in range(5)]
        states = [t.snapshot.state for t in tasks]
        assert states == ["running", "running", "queued", "queued", "queued"]
        for t in tasks:
            await t.wait(timeout_s=5)
        assert all(t.snapshot.state == "success" for t in tasks)
        assert fake.stats.max_running_per_host["esx-01"] == 2
        assert fake.stats.max_in_flight_per_host["esx-01"] == 5
        assert fake.stats.tasks_queued == 3
        snap = tasks[4].snapshot
        assert snap.start_time is not None and snap.queue_time is not None
        assert snap.start_time - snap.queue_time >= 0.09  # waited for two clones


async def test_vcenter_cap_queues_across_hosts() -> None:
    fake = make_fake(hosts=4, latency=FakeLatency(clone_s=0.02), max_concurrent_operations=3)
    async with fake:
        folder = await fake.ensure_folder("f")
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(_clone, fake, f"frozen-0{i % 4 + 1}", f"c{i}", folder)
        assert fake.stats.max_running_total == 3
        assert fake.stats.clones_made == 12


async def test_running_source_serialised_and_deepens() -> None:
    fake = make_fake(hosts=1, frozen_per_host=1, running=1, running_depth=5,
                     latency=FakeLatency(clone_s=0.01))
    # How many clones of each source are being made at once, seen from inside the fake.
    # A frozen source's clones wait at a barrier until all four are in: they only get
    # through if the fake lets them run together (no clock involved).
    inside: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    all_frozen_in = anyio.Event()
    do_clone = fake._do_clone

    async def counting(task: Any, request: Any, source: Any, host: Any, ds: Any) -> None:
        inside[source.name] += 1
        peak[source.name] = max(peak[source.name], inside[source.name])
        try:
            if source.frozen:
                if inside[source.name] == 4:
                    all_frozen_in.set()
                with anyio.fail_after(5):
                    await all_frozen_in.wait()
            await do_clone(task, request, source, host, ds)
        finally:
            inside[source.name] -= 1

    fake._do_clone = counting  # type: ignore[method-assign]
    async with fake:
        folder = await fake.ensure_folder("f")
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(_clone, fake, "running-01", f"r{i}", folder)
        assert peak["running-01"] == 1  # one at a time
        assert fake.vm("running-01").chain_depth == 9
        assert sorted(fake.vm(f"r{i}").chain_depth for i in range(4)) == [6, 7, 8, 9]
        # a frozen source clones concurrently and does not deepen
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(_clone, fake, "frozen-01", f"f{i}", folder)
        assert peak["frozen-01"] == 4
        assert fake.vm("frozen-01").chain_depth == 2
        assert {fake.vm(f"f{i}").chain_depth for i in range(4)} == {3}


async def test_chain_limit_is_255() -> None:
    fake = make_fake(hosts=1, running=1, running_depth=254)
    async with fake:
        folder = await fake.ensure_folder("f")
        await _clone(fake, "running-01", "ok", folder)
        assert fake.vm("ok").chain_depth == 255
        with pytest.raises(ChainTooDeep):
            await _clone(fake, "running-01", "too-deep", folder)
        assert fake.vm("running-01").chain_depth == 255


async def test_refusals() -> None:
    fake = make_fake(hosts=2, host_memory_mb=24 * 1024)
    async with fake:
        folder = await fake.ensure_folder("f")
        await _clone(fake, "frozen-01", "a", folder)
        with pytest.raises(DuplicateName) as dup:
            await _clone(fake, "frozen-02", "a", folder)
        assert dup.value.existing == fake.vm("a").ref.id
        fake.power_off_now("frozen-01")
        with pytest.raises(SourceNotPoweredOn):
            await _clone(fake, "frozen-01", "b", folder)
        fake.set_host_state("esx-02", "disconnected")
        with pytest.raises(HostUnavailable):
            await _clone(fake, "frozen-02", "c", folder)
        fake.set_host_state("esx-02", "connected")
        # 24 GB host, 16 GB base use, 4 GB source: clones cost 10% of 4 GB each
        made = 0
        with pytest.raises(InsufficientResources):
            for i in range(20):
                await _clone(fake, "frozen-02", f"m{i}", folder)
                made += 1
        assert 0 < made < 20


async def test_lost_reply_makes_the_vm_but_raises() -> None:
    fake = make_fake(hosts=1)
    fake.add_fault(FaultRule("instant_clone", ConnectionFailed, lost_reply=True, count=1))
    fake.add_fault(FaultRule("start_instant_clone", ConnectionFailed, lost_reply=True,
                             count=1, match="second"))
    async with fake:
        folder = await fake.ensure_folder("f")
        with pytest.raises(ConnectionFailed):
            await _clone(fake, "frozen-01", "first", folder)
        assert fake.vm("first").extra_config == {}
        with pytest.raises(ConnectionFailed):
            await _clone(fake, "frozen-01", "second", folder)
        await fake.wait_idle()
        assert fake.stats.clones_made == 2
        assert fake.vm("second")
        assert fake.stats.faults_injected == {"instant_clone": 1, "start_instant_clone": 1}


async def test_fault_probability_and_count() -> None:
    fake = make_fake(hosts=1, seed=3)
    rule = fake.add_fault(FaultRule("get_vm", NotFound, probability=0.5, count=3))
    async with fake:
        ref = fake.vm("frozen-01").ref
        failures = 0
        for _ in range(40):
            try:
                await fake.get_vm(ref)
            except NotFound:
                failures += 1
        assert failures == 3 == rule.fired


async def test_network_conflict_and_refresh() -> None:
    fake = make_fake(hosts=1, credentials=CREDS)
    async with fake:
        folder = await fake.ensure_folder("f")
        src = fake.vm("frozen-01")
        # connected at clone time: the guest talks with its source's MAC
        await _clone(fake, "frozen-01", "bad", folder, nic_connect="connect")
        assert fake.stats.network_conflicts == 1
        assert fake.vm("bad").guest_ip == src.guest_ip
        # the documented workflow: disconnected, refresh, reconnect
        vm = await _clone(fake, "frozen-01", "good", folder, nic_connect="disconnect")
        info = await fake.get_vm(vm)
        assert not info.nics[0].connected
        assert info.guest_macs == (src.nics[0].mac,) != (info.nics[0].mac,)
        code = await fake.run_in_guest(vm, CREDS, recipes.linux_refresh(), timeout_s=1)
        assert code == 0
        await fake.set_nics_connected(vm, True)
        info = await fake.wait_for_vm(vm, timeout_s=1, guest_ip=True)
        assert info.guest_macs == (info.nics[0].mac,)
        assert info.guest_ip not in (None, src.guest_ip)
        assert fake.stats.network_conflicts == 1
        # connecting before the refresh is a conflict
        vm2 = await _clone(fake, "frozen-01", "hasty", folder, nic_connect="disconnect")
        await fake.set_nics_connected(vm2, True)
        assert fake.stats.network_conflicts == 2
        assert fake.stats.conflicted_vms == {"bad", "hasty"}


async def test_guest_operations() -> None:
    fake = make_fake(hosts=1, credentials=CREDS)
    async with fake:
        ref = fake.vm("frozen-01").ref
        with pytest.raises(InvalidGuestLogin):
            await fake.run_in_guest(ref, GuestCredentials("root", "wrong"),
                                    recipes.linux_refresh(), timeout_s=1)
        assert await fake.run_in_guest(ref, CREDS, recipes.windows_refresh(), timeout_s=1) == 127
        fake.guest_program_handler = lambda vm, p: 3
        assert await fake.run_in_guest(ref, CREDS, recipes.custom_program("/x"), timeout_s=1) == 3
        fake.power_off_now("frozen-01")
        with pytest.raises(GuestOperationFailed):
            await fake.run_in_guest(ref, CREDS, recipes.linux_refresh(), timeout_s=1)


async def test_freeze_and_wait_for_vm() -> None:
    fake = make_fake(hosts=1, frozen_per_host=0, running=1, credentials=CREDS)
    async with fake:
        ref = fake.vm("running-01").ref
        with pytest.raises(RequestTimeout):
            await fake.wait_for_vm(ref, timeout_s=0.01, frozen=True)

        async def later() -> None:
            await anyio.sleep(0.01)
            await fake.run_in_guest(ref, CREDS, recipes.freeze_program("linux"), timeout_s=1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(later)
            info = await fake.wait_for_vm(ref, timeout_s=1, frozen=True)
        assert info.frozen and info.powered_on
        await fake.reset(ref)
        assert not (await fake.get_vm(ref)).frozen


async def test_cancel_queued_task_and_destroy() -> None:
    fake = make_fake(hosts=1, slots=1, latency=FakeLatency(clone_s=0.02))
    async with fake:
        folder = await fake.ensure_folder("f")
        src = fake.vm("frozen-01").ref
        t1 = await fake.start_instant_clone(CloneRequest(src, "a", folder))
        t2 = await fake.start_instant_clone(CloneRequest(src, "b", folder))
        await t2.cancel()
        with pytest.raises(TaskCancelled):
            await t2.wait(1)
        await t1.cancel()  # running: vCenter carries on
        vm = await t1.wait(1)
        assert [v.name for v in fake.folder_vms("f")] == ["a"]
        await fake.destroy(vm)
        await fake.destroy(vm)  # already gone is fine
        assert fake.folder_vms("f") == [] and fake.stats.destroyed == 1
        with pytest.raises(NotFound):
            await fake.get_vm(vm)


async def test_find_by_name_and_path() -> None:
    fake = make_fake(hosts=2)
    async with fake:
        by_name, by_path, by_dc_path = await fake.find_vms(
            ["frozen-01", "sources/frozen-02", "dc1/vm/sources/frozen-02"])
        assert by_name.name == "frozen-01" and by_path.ref == by_dc_path.ref
        with pytest.raises(NotFound, match="nope, sources/nope"):
            await fake.find_vms(["frozen-01", "nope", "sources/nope"])
        assert await fake.find_folder("dc1/vm/sources") == await fake.find_folder("sources")
        assert await fake.find_folder("missing") is None
