"""Every client operation against ``fleet sim`` over https (the shared simulator)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from fleet import errors
from fleet.vsphere import recipes
from fleet.vsphere.client import VSphereClient
from fleet.vsphere.model import (
    CloneRequest,
    GuestCredentials,
    GuestProgram,
    NotRead,
    TaskHandle,
    VmInfo,
    VSphere,
)
from tests.simproc import SimProcess
from tests.vsphere.conftest import client_for, unique

pytestmark = pytest.mark.anyio
GUEST = GuestCredentials("root", "fleet-guest")


async def clone(vs: VSphereClient, source: str = "frozen-01", folder: str = "t/clones",
                **kw: object) -> VmInfo:
    (src,) = await vs.find_vms([source])
    target = await vs.ensure_folder(folder)
    task = await vs.start_instant_clone(CloneRequest(source=src.ref, name=unique("ic"),
                                                     folder=target, **kw))  # type: ignore[arg-type]
    return await vs.get_vm(await task.wait(timeout_s=30))


async def test_server_info_and_protocols(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        assert isinstance(vs, VSphere)
        info = await vs.server_info()
        assert info.api_type == "VirtualCenter" and info.api_version == "8.0.3.0"
        assert vs.session.stub.version == "vim.version.v8_0_3_0"  # negotiated
        assert vs.session.stub.versionId == '"urn:vim25/8.0.3.0"'


async def test_inventory_lists_and_resolution(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        hosts = await vs.list_hosts()
        assert sorted(h.name for h in hosts) == [f"esx-{i:02d}" for i in range(1, 9)]
        assert all(h.connected and h.cluster == "cluster1" and h.memory_mb == 512 * 1024
                   for h in hosts)
        datastores = await vs.list_datastores()
        assert sorted(d.name for d in datastores) == ["ds-01", "ds-02", "ds-03", "ds-04"]
        assert all(d.free_bytes <= d.capacity_bytes for d in datastores)
        ((dc_name, dc, vm_folder),) = await vs.datacenters()
        assert dc_name == "dc1" and dc.type == "Datacenter" and vm_folder.type == "Folder"

        assert await vs.resolve("Datacenter", "dc1") == dc
        cluster = await vs.resolve("ClusterComputeResource", "cluster1")
        assert await vs.resolve("ClusterComputeResource", "dc1/host/cluster1") == cluster
        esx = await vs.resolve("HostSystem", "esx-01")
        assert esx == next(h.ref for h in hosts if h.name == "esx-01")
        assert await vs.resolve("Datastore", "ds-02") == next(
            d.ref for d in datastores if d.name == "ds-02")
        assert await vs.resolve("Datastore", "dc1/datastore/ds-02") == next(
            d.ref for d in datastores if d.name == "ds-02")
        sources = await vs.resolve("Folder", "sources")
        assert await vs.resolve("Folder", "dc1/vm/sources") == sources
        pool = await vs.default_pool(cluster)
        assert pool.type == "ResourcePool"
        assert await vs.resolve("ResourcePool", "dc1/host/cluster1/Resources") == pool
        vm = await vs.resolve("VirtualMachine", "sources/frozen-02")
        assert vm.type == "VirtualMachine"
        with pytest.raises(errors.NotFound):
            await vs.resolve("HostSystem", "esx-99")
        with pytest.raises(errors.NotFound):
            await vs.resolve("VirtualMachine", "sources/none-such")


async def test_find_vms_and_source_facts(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        frozen, running, by_path = await vs.find_vms(
            ["frozen-03", "golden-running", "dc1/vm/sources/frozen-04"])
        assert frozen.name == "frozen-03" and frozen.frozen and frozen.powered_on
        assert frozen.host_name == "esx-03" and frozen.chain_depth == 2
        assert frozen.folder is not None and frozen.datastores
        assert frozen.guest_family == "linux" and frozen.memory_mb == 4096
        assert len(frozen.nics) == 1 and frozen.nics[0].key == 4000
        assert not running.frozen and running.host_name == "esx-01" and running.chain_depth >= 1
        assert by_path.name == "frozen-04"
        assert await vs.get_vm(frozen.ref) == frozen
        assert [v.name for v in await vs.get_vms([by_path.ref, frozen.ref])] == [
            "frozen-04", "frozen-03"]
        assert await vs.chain_depth(frozen.ref) == 2
        with pytest.raises(errors.NotFound) as info:
            await vs.find_vms(["frozen-01", "nope-1", "sources/nope-2"])
        assert "nope-1" in str(info.value) and "sources/nope-2" in str(info.value)


async def test_bulk_retrieval_pages(sim: SimProcess) -> None:
    async with client_for(sim, page_size=3) as vs:
        contents = await vs.list_vms(["name", "runtime.powerState"])
        names = {c.propSet[0].val for c in contents}
        assert {f"frozen-{i:02d}" for i in range(1, 9)} | {"golden-running"} <= names
        assert vs.stats["calls"]["ContinueRetrievePropertiesEx"] >= 2


async def test_folders(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        base = unique("f")
        assert await vs.find_folder(f"{base}/a/b") is None
        made = await vs.ensure_folder(f"{base}/a/b")
        assert made.type == "Folder"
        assert await vs.ensure_folder(f"dc1/vm/{base}/a/b") == made  # idempotent, full path
        assert await vs.find_folder(f"/{base}/a/b") == made
        parent = await vs.find_folder(f"{base}/a")
        assert parent is not None
        assert await vs.create_folder(parent, "c") == await vs.ensure_folder(f"{base}/a/c")
        assert await vs.list_folder_vms(made, ()) == []
        # concurrent ensure of one path makes one folder
        again = unique("f")
        refs = []
        async with anyio.create_task_group() as tg:
            async def one() -> None:
                refs.append(await vs.ensure_folder(f"{again}/x"))
            for _ in range(5):
                tg.start_soon(one)
        assert len(set(refs)) == 1


async def test_folder_listing_reads_the_labels_asked_by_key(sim: SimProcess) -> None:
    """A listing reads each asked label by its keyed path: a set one has its value, an
    unset one is absent, and one not asked for is NotRead, never "not set", even when
    the VM has it (docs/reads.md)."""
    async with client_for(sim) as vs:
        folder = await vs.ensure_folder(unique("t/labels"))
        odd = 'guestinfo.fleet.odd "key" \\ [1]'
        made = await clone(vs, "frozen-05", "t/x", extra_config={
            "guestinfo.fleet.name": "lt", odd: "v"})
        await vs.full_clone(made.ref, unique("full"), folder, power_on=False)
        src = (await vs.find_vms(["frozen-05"]))[0]
        task = await vs.start_instant_clone(CloneRequest(
            source=src.ref, name=unique("ic"), folder=folder,
            extra_config={"guestinfo.fleet.name": "lt", "guestinfo.fleet.index": "3", odd: "v"}))
        ref = await task.wait(timeout_s=30)
        asked = ("guestinfo.fleet.name", "guestinfo.fleet.index", "guestinfo.fleet.state", odd)
        listed = {v.ref: v for v in await vs.list_folder_vms(folder, asked)}
        full = await vs.get_vm(ref)
        vm = listed[ref]
        assert (vm.name, vm.power_state, vm.host, vm.host_name) == \
            (full.name, full.power_state, full.host, full.host_name)
        assert dict(vm.labels) == {"guestinfo.fleet.name": "lt", "guestinfo.fleet.index": "3",
                                   odd: "v"}
        assert vm.labels.get("guestinfo.fleet.state") is None  # asked, not set
        assert "guestinfo.vmtools.versionString" in full.extra_config
        with pytest.raises(NotRead, match="versionString"):
            vm.labels.get("guestinfo.vmtools.versionString")  # set, but not asked
        assert vm == full.listed(asked)
        other = next(v for r, v in listed.items() if r != ref)
        assert "guestinfo.fleet.index" not in other.labels


async def test_instant_clone(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        (src,) = await vs.find_vms(["frozen-05"])
        folder = await vs.ensure_folder("t/ic")
        name = unique("ic")
        request = CloneRequest(source=src.ref, name=name, folder=folder,
                               extra_config={"guestinfo.fleet.index": "7"},
                               nic_connect="disconnect",
                               bios_uuid="4211a2b3-0000-0000-0000-000000000001")
        task = await vs.start_instant_clone(request)
        assert isinstance(task, TaskHandle)
        assert task.ref.type == "Task" and task.snapshot.state in ("queued", "running",
                                                                    "success")
        ref = await task.wait(timeout_s=30)
        snap = task.snapshot
        assert snap.state == "success" and snap.complete_time is not None
        assert snap.queue_time is not None and snap.queue_time <= snap.complete_time
        vm = await vs.get_vm(ref)
        assert vm.name == name and vm.folder == folder and vm.host == src.host
        assert vm.extra_config["guestinfo.fleet.index"] == "7"
        assert vm.chain_depth == src.chain_depth + 1
        assert [n.connected for n in vm.nics] == [False]
        assert vm.powered_on and not vm.frozen
        assert [v.ref for v in await vs.list_folder_vms(folder, ())].count(ref) == 1
        # The same task awaited again gives the same answer.
        assert await task.wait(timeout_s=1) == ref
        # Per-NIC mapping, connect.
        other = await clone(vs, "frozen-05", "t/ic", nic_connect={4000: "connect"})
        assert [n.connected for n in other.nics] == [True]
        # The watches were released: nothing left to watch.
        assert vs.watcher.live == 0


async def test_running_source_chain_grows(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        (src,) = await vs.find_vms(["golden-running"])
        made = await clone(vs, "golden-running")
        assert made.chain_depth == src.chain_depth + 1
        assert await vs.chain_depth(src.ref) == src.chain_depth + 1


async def test_check_instant_clone(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        (src,) = await vs.find_vms(["frozen-06"])
        folder = await vs.ensure_folder("t/check")
        ok = CloneRequest(source=src.ref, name=unique("chk"), folder=folder,
                          nic_connect="disconnect")
        assert await vs.check_instant_clone(ok) == []
        existing = await clone(vs, "frozen-06", "t/check")
        problems = await vs.check_instant_clone(CloneRequest(source=src.ref, name=existing.name,
                                                             folder=folder))
        assert len(problems) == 1 and existing.name in problems[0]


async def test_full_clone_power_destroy(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        (src,) = await vs.find_vms(["frozen-07"])
        folder = await vs.ensure_folder("t/full")
        host = await vs.resolve("HostSystem", "esx-02")
        ds = await vs.resolve("Datastore", "ds-03")
        name = unique("full")
        ref = await vs.full_clone(src.ref, name, folder, host=host, datastore=ds,
                                  power_on=False)
        vm = await vs.get_vm(ref)
        assert vm.name == name and vm.host == host and vm.datastores == (ds,)
        assert vm.power_state == "poweredOff" and vm.chain_depth == 1
        await vs.power_on(ref)
        await vs.power_on(ref)  # already on: fine
        assert (await vs.get_vm(ref)).powered_on
        await vs.power_off(ref)
        await vs.power_off(ref)  # already off: fine
        assert (await vs.get_vm(ref)).power_state == "poweredOff"
        await vs.destroy(ref)
        await vs.destroy(ref)  # gone already: fine
        with pytest.raises(errors.NotFound):
            await vs.get_vm(ref)
        # A clone that is running is powered off first.
        running = await clone(vs, "frozen-07", "t/full")
        await vs.destroy(running.ref)
        with pytest.raises(errors.NotFound):
            await vs.get_vm(running.ref)


async def test_nics_and_extra_config(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        vm = await clone(vs, "frozen-08", nic_connect="disconnect")
        await vs.set_nics_connected(vm.ref, True)
        assert [n.connected for n in (await vs.get_vm(vm.ref)).nics] == [True]
        await vs.set_nics_connected(vm.ref, False, [4000])
        assert [n.connected for n in (await vs.get_vm(vm.ref)).nics] == [False]
        with pytest.raises(errors.NotFound):
            await vs.set_nics_connected(vm.ref, True, [4999])
        # NICs read by key, as the pipeline reconnects a clone (its source's keys)...
        await vs.set_nics_connected(vm.ref, True, known_nics=[4000])
        assert [n.connected for n in (await vs.get_vm(vm.ref)).nics] == [True]
        # ...and a key the VM lacks sends the client back to the whole device list
        await vs.set_nics_connected(vm.ref, False, known_nics=[4000, 4999])
        assert [n.connected for n in (await vs.get_vm(vm.ref)).nics] == [False]
        await vs.update_extra_config(vm.ref, {"guestinfo.a": "1", "guestinfo.b": "2"})
        await vs.update_extra_config(vm.ref, {"guestinfo.a": ""})  # removes
        extra = (await vs.get_vm(vm.ref)).extra_config
        assert "guestinfo.a" not in extra and extra["guestinfo.b"] == "2"
        # NICs and extraConfig in one ReconfigVM_Task
        before = vs.stats["calls"].get("ReconfigVM_Task", 0)
        await vs.set_nics_connected(vm.ref, True, extra_config={"guestinfo.b": "3"})
        after = await vs.get_vm(vm.ref)
        assert [n.connected for n in after.nics] == [True]
        assert after.extra_config["guestinfo.b"] == "3"
        assert vs.stats["calls"]["ReconfigVM_Task"] == before + 1


async def test_run_in_guest(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        vm = await clone(vs, "frozen-02")
        assert await vs.run_in_guest(vm.ref, GUEST, GuestProgram("/bin/true"), timeout_s=10) == 0
        assert await vs.run_in_guest(vm.ref, GUEST, GuestProgram("/bin/false"),
                                     timeout_s=10) == 1
        script = GuestProgram("/bin/sh", "-c 'vmware-rpctool \"info-set guestinfo.x 1\"; exit 3'",
                              env={"A": "1"}, working_directory="/tmp")
        assert await vs.run_in_guest(vm.ref, GUEST, script, timeout_s=10) == 3
        assert (await vs.get_vm(vm.ref)).extra_config["guestinfo.x"] == "1"
        with pytest.raises(errors.InvalidGuestLogin):
            await vs.run_in_guest(vm.ref, GuestCredentials("root", "wrong"),
                                  GuestProgram("/bin/true"), timeout_s=10)
        with pytest.raises(errors.GuestOperationFailed):
            await vs.run_in_guest(vm.ref, GUEST, GuestProgram(r"C:\Windows\x.exe"),
                                  timeout_s=10)


async def test_wait_for_vm(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        vm = await clone(vs, "frozen-03")
        ready = await vs.wait_for_vm(vm.ref, timeout_s=10, guest_ip=True, tools_running=True)
        assert ready.guest_ip and ready.tools_running
        key = "guestinfo.ready"

        async def later() -> None:
            await anyio.sleep(0.1)
            await vs.update_extra_config(vm.ref, {key: "yes"})

        async with anyio.create_task_group() as tg:
            tg.start_soon(later)
            seen = await vs.wait_for_vm(vm.ref, timeout_s=10, extra_config_key=key)
        assert seen.extra_config[key] == "yes"
        with pytest.raises(errors.RequestTimeout):
            await vs.wait_for_vm(vm.ref, timeout_s=0.2, extra_config_key="guestinfo.never")
        assert vs.stats["calls"].get("ListProcessesInGuest", 0) == 0  # no polling here
        assert vs.watcher.live == 0


async def test_freeze_through_guest_operations(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        vm = await clone(vs, "frozen-04")
        program = recipes.freeze_program("linux")
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: vs.run_in_guest(vm.ref, GUEST, program, timeout_s=10))
            frozen = await vs.wait_for_vm(vm.ref, timeout_s=10, frozen=True)
        assert frozen.frozen
        with pytest.raises(errors.GuestOperationFailed, match="frozen"):
            await vs.run_in_guest(vm.ref, GUEST, program, timeout_s=10)
        child = await clone(vs, frozen.name, "t/clones")
        assert child.chain_depth == frozen.chain_depth + 1
        assert (await vs.get_vm(frozen.ref)).chain_depth == frozen.chain_depth


async def test_task_handles_many_at_once(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        sources = await vs.find_vms([f"frozen-{i:02d}" for i in range(1, 9)])
        folder = await vs.ensure_folder("t/many")
        made: dict[str, object] = {}  # task id -> result
        handles: list[Any] = []

        async def one(i: int) -> None:
            task = await vs.start_instant_clone(CloneRequest(
                source=sources[i % 8].ref, name=unique("many"), folder=folder))
            handles.append(task)
            made[task.ref.id] = await task.wait(timeout_s=60)

        async with anyio.create_task_group() as tg:
            for i in range(120):
                tg.start_soon(one, i)
        assert len(set(made.values())) == 120
        assert vs.stats["calls"]["CreatePropertyCollector"] == 1
        assert vs.stats["live_watches"] == 0
        # How many filters and answers the burst took depends on how the submits' replies
        # spread over time. Watches registered together are batched on any machine: the
        # 120 tasks watched again at once cost one CreateFilter and one answer, not 120.
        before = vs.stats
        again = [vs.task(vs.mo(h.ref), "InstantClone_Task") for h in handles]
        assert {h.ref.id: await h.wait(timeout_s=60) for h in again} == made
        stats = vs.stats
        assert stats["calls"]["CreateFilter"] - before["calls"]["CreateFilter"] == 1
        assert stats["wait_calls"] - before["wait_calls"] <= 2, (before, stats)
        assert stats["calls"]["CreatePropertyCollector"] == 1
        assert stats["live_watches"] == 0


async def test_pyvmomi_style_calls_on_references(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        (src,) = await vs.find_vms(["frozen-01"])
        mo = vs.mo(src.ref)
        assert await mo.name == "frozen-01"  # a Fetch through the session
        now = await vs.content.sessionManager.currentSession
        assert now is not None


async def test_list_child_folders(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        top = unique("lcf")
        root = await vs.ensure_folder(top)
        for name in ("b", "a", "c"):
            await vs.ensure_folder(f"{top}/{name}")
        found = await vs.list_child_folders(root)
        assert [name for name, _ in found] == ["a", "b", "c"]
        assert all(ref.type == "Folder" for _, ref in found)
        assert await vs.list_child_folders(found[0][1]) == []
