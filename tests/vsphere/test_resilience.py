"""Sessions, retries and faults against a simulator with injected failures.

One simulator for the module (its own topology: sources in every state the
fault translation must recognise); every test clears the rules it added.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from fleet import errors
from fleet.errors import NotDelivered
from fleet.vsphere.client import VSphereClient
from fleet.vsphere.model import CloneRequest, Ref
from tests.simproc import SimProcess
from tests.vsphere.conftest import client_for, unique

pytestmark = pytest.mark.anyio

TOPOLOGY = """
datacenter = "dc1"
cluster = "cluster1"
folders = ["sources"]

[latency]
jitter = 0.0

[[hosts]]
name = "esx-{index:02d}"
count = 4
slots = 8

[[hosts]]
name = "tiny"
memory_gb = 4

[[datastores]]
name = "ds-{index:02d}"
count = 2

[[sources]]
name = "f-{index:02d}"
count = 4
host = "esx-{index:02d}"
folder = "sources"
state = "frozen"
chain_depth = 2

[[sources]]
name = "off-src"
host = "esx-01"
folder = "sources"
state = "poweredOff"

[[sources]]
name = "deep-src"
host = "esx-02"
folder = "sources"
state = "frozen"
chain_depth = 255

[[sources]]
name = "tiny-src"
host = "tiny"
folder = "sources"
state = "frozen"

[[users]]
name = "limited@vsphere.local"
password = "limited-pw"
denied = ["VirtualMachine.Provisioning.Clone"]
"""


@pytest.fixture(scope="module")
def fsim() -> Iterator[SimProcess]:
    with SimProcess(topology_text=TOPOLOGY, time_scale=0.05) as process:
        yield process


@pytest.fixture(autouse=True)
def _clear_faults(fsim: SimProcess) -> Iterator[None]:
    yield
    fsim.clear_faults()


async def faults(sim: SimProcess, *rules: dict[str, Any]) -> None:
    await anyio.to_thread.run_sync(lambda: sim.add_faults(*rules))


async def start(vs: VSphereClient, source: str, name: str | None = None,
                folder: str = "r/clones") -> Any:
    (src,) = await vs.find_vms([source])
    target = await vs.ensure_folder(folder)
    return await vs.start_instant_clone(CloneRequest(source=src.ref, name=name or unique("r"),
                                                     folder=target))


async def test_session_expiry_during_200_concurrent_clones(fsim: SimProcess) -> None:
    async with client_for(fsim) as vs:
        sources = await vs.find_vms([f"f-{i:02d}" for i in range(1, 5)])
        folder = await vs.ensure_folder(unique("expiry"))
        submitted = done = 0
        results: list[Ref] = []
        sixty_submitted, first_expired = anyio.Event(), anyio.Event()
        hundred_done = anyio.Event()

        async def one(i: int) -> None:
            nonlocal submitted, done
            if i >= 60:
                # The other 140 are submitted on the expired session: they all meet
                # NotAuthenticated at once, and at least 40 of them are made (on the new
                # session) before the second expiry.
                await first_expired.wait()
            task = await vs.start_instant_clone(CloneRequest(
                source=sources[i % 4].ref, name=f"e-{i:03d}", folder=folder))
            submitted += 1
            if submitted == 60:
                sixty_submitted.set()
            results.append(await task.wait(timeout_s=120))
            done += 1
            if done == 100:
                hundred_done.set()

        async def expire_twice() -> None:
            # Once with 60 clones awaited and 140 still to submit, once with 100 done and
            # the rest submitted or awaited. Each time the client holds a live session:
            # the first since its login, the second since the re-login every submit
            # after the first expiry needed.
            await sixty_submitted.wait()
            assert await anyio.to_thread.run_sync(fsim.expire_sessions) >= 1
            first_expired.set()
            await hundred_done.wait()
            assert await anyio.to_thread.run_sync(fsim.expire_sessions) >= 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(expire_twice)
            for i in range(200):
                tg.start_soon(one, i)
        assert len(set(results)) == 200
        assert len(await vs.list_folder_vms(folder, ())) == 200
        stats = vs.stats
        assert stats["relogins"] >= 2, stats
        # First collector, then at least one more after the re-logins (two re-logins in a
        # row may share a rebuild when the loop is slow to notice the first).
        assert stats["rebuilds"] >= 2, stats
        assert stats["logins"] == stats["relogins"] + 1, stats  # single-flight re-login
        assert stats["live_watches"] == 0, stats


async def test_injected_not_authenticated_relogs_in(fsim: SimProcess) -> None:
    async with client_for(fsim) as vs:
        await faults(fsim, {"method": "RetrievePropertiesEx", "fault": "NotAuthenticated",
                            "max_count": 1})
        (vm,) = await vs.find_vms(["f-01"])
        assert vm.name == "f-01" and vs.stats["relogins"] == 1


@pytest.mark.parametrize("fault", ["http:reset", "http:lost_reply", "http:503"])
async def test_reads_survive_http_faults(fsim: SimProcess, fault: str) -> None:
    async with client_for(fsim) as vs:
        (vm,) = await vs.find_vms(["f-02"])
        await faults(fsim, {"method": "RetrievePropertiesEx", "fault": fault, "max_count": 2},
                     {"method": "FindByInventoryPath", "fault": fault, "max_count": 1})
        assert (await vs.get_vm(vm.ref)).name == "f-02"
        assert (await vs.find_vms(["sources/f-02"]))[0].ref == vm.ref
        assert vs.stats["retries"]["RetrievePropertiesEx"] >= 2
        assert vs.stats["retries"]["FindByInventoryPath"] == 1


async def test_503_before_a_clone_is_retried(fsim: SimProcess) -> None:
    async with client_for(fsim) as vs:
        await faults(fsim, {"method": "InstantClone_Task", "object": "f-03", "fault": "http:503",
                            "max_count": 2})
        task = await start(vs, "f-03")
        assert (await task.wait(timeout_s=30)).type == "VirtualMachine"
        assert vs.stats["retries"]["InstantClone_Task"] == 2


async def test_lost_reply_of_a_clone_is_not_repeated(fsim: SimProcess) -> None:
    async with client_for(fsim) as vs:
        name = unique("lost")
        await faults(fsim, {"method": "InstantClone_Task", "object": "f-04",
                            "fault": "http:lost_reply", "max_count": 1})
        with pytest.raises(errors.ConnectionFailed) as info:
            await start(vs, "f-04", name)
        assert not isinstance(info.value, NotDelivered)
        assert vs.stats["calls"]["InstantClone_Task"] == 1  # never sent twice
        # The work was done: the VM appears; asking again says whose the name is.
        with anyio.fail_after(10):
            while True:
                try:
                    (made,) = await vs.find_vms([f"r/clones/{name}"])
                    break
                except errors.NotFound:
                    await anyio.sleep(0.02)
        again = await start(vs, "f-04", name)
        with pytest.raises(errors.DuplicateName) as dup:
            await again.wait(timeout_s=30)
        assert dup.value.existing == made.ref.id and dup.value.name == name


async def test_reset_of_a_clone_call_raises(fsim: SimProcess) -> None:
    async with client_for(fsim) as vs:
        name = unique("reset")
        await faults(fsim, {"method": "InstantClone_Task", "object": "f-01",
                            "fault": "http:reset", "max_count": 1})
        with pytest.raises(errors.ConnectionFailed):
            await start(vs, "f-01", name)
        await anyio.sleep(0.3)
        with pytest.raises(errors.NotFound):  # the reset came before any work
            await vs.find_vms([f"r/clones/{name}"])


async def test_wait_loop_survives_lost_replies_and_resets(fsim: SimProcess) -> None:
    async with client_for(fsim) as vs:
        await faults(fsim, {"method": "WaitForUpdatesEx", "fault": "http:lost_reply",
                            "max_count": 3},
                     {"method": "CreateFilter", "fault": "http:reset", "max_count": 1},
                     {"method": "WaitForUpdatesEx", "fault": "http:503", "max_count": 1})
        tasks = [await start(vs, f"f-{i % 4 + 1:02d}") for i in range(12)]
        with anyio.fail_after(30):
            refs = [await t.wait(timeout_s=30) for t in tasks]
        assert len(set(refs)) == 12
        assert vs.stats["retries"].get("WaitForUpdatesEx", 0) >= 3


async def test_truncated_update_sets(fsim: SimProcess) -> None:
    async with client_for(fsim, max_object_updates=1) as vs:
        made: dict[str, Ref] = {}  # task id -> the clone it made
        handles: list[Any] = []

        async def one(i: int) -> None:
            task = await start(vs, f"f-{i % 4 + 1:02d}")
            handles.append(task)
            made[task.ref.id] = await task.wait(timeout_s=30)

        # A burst: whether its answers need cutting depends on how many tasks change
        # between two of the watcher's calls, which is up to the scheduler.
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(one, i)
        assert len(set(made.values())) == 30
        # Watching the 30 finished tasks again, all at once (no await in between), puts
        # them in one filter whose first answer holds 30 objects: with one object per
        # answer the server must cut it 29 times, on any machine, and every task's
        # result must still come through the series.
        before = vs.stats["truncated"]
        again = [vs.task(vs.mo(h.ref), "InstantClone_Task") for h in handles]
        assert {h.ref.id: await h.wait(timeout_s=30) for h in again} == made
        assert vs.stats["truncated"] - before >= 29, vs.stats


async def test_cancel_and_task_timeout(fsim: SimProcess) -> None:
    async with client_for(fsim) as vs:
        await faults(fsim, {"method": "InstantClone_Task", "object": "f-02", "fault": "slow",
                            "delay_s": 200, "max_count": 1})
        task = await start(vs, "f-02")
        with pytest.raises(errors.RequestTimeout) as info:
            await task.wait(timeout_s=0.2)
        assert task.ref.id in str(info.value)
        await task.cancel()
        with pytest.raises(errors.TaskCancelled):
            await task.wait(timeout_s=10)
        assert task.snapshot.state == "error"
        await task.cancel()  # finished: nothing to do


async def test_chain_too_deep(fsim: SimProcess) -> None:
    async with client_for(fsim) as vs:
        task = await start(vs, "deep-src")
        with pytest.raises(errors.ChainTooDeep) as info:
            await task.wait(timeout_s=30)
        assert info.value.scope == "source" and info.value.fault == "GenericVmConfigFault"
        (src,) = await vs.find_vms(["deep-src"])
        folder = await vs.ensure_folder("r/clones")
        problems = await vs.check_instant_clone(CloneRequest(source=src.ref, name=unique("x"),
                                                             folder=folder))
        assert any("255" in p for p in problems)


async def test_generic_fault_on_a_shallow_source_is_not_chain_too_deep(
        fsim: SimProcess) -> None:
    async with client_for(fsim) as vs:
        await faults(fsim, {"method": "InstantClone_Task", "object": "f-03",
                            "fault": "GenericVmConfigFault", "max_count": 1,
                            "message": "Unable to prepare migration"})
        task = await start(vs, "f-03")
        with pytest.raises(errors.VSphereFault) as info:
            await task.wait(timeout_s=30)
        assert not isinstance(info.value, errors.ChainTooDeep)


async def test_source_not_powered_on(fsim: SimProcess) -> None:
    async with client_for(fsim) as vs:
        task = await start(vs, "off-src")
        with pytest.raises(errors.SourceNotPoweredOn) as info:
            await task.wait(timeout_s=30)
        assert info.value.scope == "source"


async def test_insufficient_resources(fsim: SimProcess) -> None:
    async with client_for(fsim) as vs:
        task = await start(vs, "tiny-src")
        with pytest.raises(errors.InsufficientResources) as info:
            await task.wait(timeout_s=30)
        assert info.value.scope == "host"


async def test_host_unavailable(fsim: SimProcess) -> None:
    async with client_for(fsim) as vs:
        await anyio.to_thread.run_sync(lambda: fsim.set_host("esx-04", "disconnected"))
        try:
            task = await start(vs, "f-04")
            with pytest.raises(errors.HostUnavailable) as info:
                await task.wait(timeout_s=30)
            assert info.value.scope == "host"
            hosts = {h.name: h for h in await vs.list_hosts()}
            assert not hosts["esx-04"].connected
        finally:
            await anyio.to_thread.run_sync(lambda: fsim.set_host("esx-04", "connected"))


async def test_duplicate_name(fsim: SimProcess) -> None:
    async with client_for(fsim) as vs:
        first = await start(vs, "f-01")
        made = await first.wait(timeout_s=30)
        info = await vs.get_vm(made)
        second = await start(vs, "f-02", info.name)
        with pytest.raises(errors.DuplicateName) as dup:
            await second.wait(timeout_s=30)
        assert dup.value.existing == made.id


async def test_busy_and_injected_call_faults(fsim: SimProcess) -> None:
    async with client_for(fsim) as vs:
        await faults(fsim, {"method": "InstantClone_Task", "object": "f-01",
                            "fault": "TaskInProgress", "phase": "call", "max_count": 1})
        with pytest.raises(errors.ResourceBusy) as info:
            await start(vs, "f-01")
        assert info.value.transient


async def test_permission_denied_names_the_privilege(fsim: SimProcess) -> None:
    async with client_for(fsim, user="limited@vsphere.local", password="limited-pw") as vs:
        with pytest.raises(errors.PermissionDenied) as info:
            await start(vs, "f-01")
        assert info.value.privilege == "VirtualMachine.Provisioning.Clone"
        assert "VirtualMachine.Provisioning.Clone" in str(info.value)


async def test_invalid_login(fsim: SimProcess) -> None:
    with pytest.raises(errors.InvalidLogin):
        async with client_for(fsim, password="not-the-password"):
            pass


async def test_unreachable_endpoint_is_not_delivered() -> None:
    client = VSphereClient("https://127.0.0.1:9/sdk", "u", "p", call_timeout_s=2.0)
    with pytest.raises(NotDelivered):
        async with client:
            pass
