"""The simulator's running totals and indexes agree with a count from scratch.

Per-clone costs must not grow with the inventory, so folders index their
children by name, hosts keep their memory in use as VMs change, tasks build
their ``info`` once per change and retained tasks keep only what ``info``
needs. These tests check each against the plain computation it replaces,
in-process.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from pyVmomi import vim, vmodl

from fleet.sim.calls import CallContext
from fleet.sim.core import parse_path, resolve_path
from fleet.sim.entities import Folder, HostSystem
from fleet.sim.propcollector import PropertyCollector, PropertyFilter, same
from fleet.sim.simulator import Simulator
from fleet.sim.tasks import Task
from fleet.sim.topology import load_topology
from fleet.sim.vm import VirtualMachine

PC = vmodl.query.PropertyCollector


def _sim() -> Simulator:
    return Simulator(load_topology(None), time_scale=0.0)


def _vm(sim: Simulator, name: str) -> VirtualMachine:
    return next(v for v in sim.inventory.of_type(VirtualMachine) if v.name == name)


def _scanned(folder: Folder, name: str) -> Any:
    return next((c for c in folder.children() if c.name == name), None)


def test_folder_name_index_follows_attach_detach_and_rename() -> None:
    sim = _sim()
    folder = sim.ensure_folder("index-test")
    a = Folder(sim.runtime, "a", folder, folder.child_types)
    b = Folder(sim.runtime, "b", folder, folder.child_types)
    folder.attach(a)
    folder.attach(b)
    assert folder.child_named("a") is a and folder.child_named("b") is b
    b.name = "c"
    assert folder.child_named("b") is None and folder.child_named("c") is b
    folder.detach(a)
    assert folder.child_named("a") is None
    assert [c.name for c in folder.entities] == ["c"]
    again = Folder(sim.runtime, "a", folder, folder.child_types)
    folder.attach(again)
    assert folder.child_named("a") is again
    # A rename onto a taken name (never allowed by the API) still answers the oldest.
    again.name = "c"
    assert folder.child_named("c") is b is _scanned(folder, "c")
    for name in ("a", "b", "c", "frozen-01"):
        assert folder.child_named(name) is _scanned(folder, name)
    sources = sim.ensure_folder("sources")
    assert sources.child_named("frozen-01") is _vm(sim, "frozen-01")


def _summed(host: HostSystem) -> int:
    return sum(vm.host_memory_cost_mb() for vm in host.vms)


def test_host_memory_total_follows_every_change() -> None:
    sim = _sim()
    hosts = list(sim.hosts.values())
    source = _vm(sim, "frozen-01")
    folder = sim.ensure_folder("memory-test")
    clone = VirtualMachine(sim.runtime, "clone", folder, pool=source.pool, host=source.host,
                           datastore=source.datastore, memory_mb=2048, num_cpu=1,
                           guest=source.guest, nics=[], disks=[], extra_config={},
                           power_state="poweredOn")
    clone.memory_parent = source
    clone.register()

    def check() -> None:
        for host in hosts:
            assert host.memory_used_mb() == _summed(host), host.name

    check()
    assert source.host.memory_used_mb() > 0
    clone.memory_mb = 3000
    check()
    sim.runtime.clone_memory_shared = 0.4
    check()
    clone.power_state = "poweredOff"
    check()
    clone.power_state = "poweredOn"
    clone.memory_parent = None
    check()
    source.host.remove_vm(clone)
    hosts[1].add_vm(clone)
    clone.host = hosts[1]
    check()
    clone.power_state = "poweredOff"
    clone.unregister()
    check()
    assert clone not in hosts[1].vms


def test_task_info_is_built_again_only_when_it_changes() -> None:
    sim = _sim()
    source = _vm(sim, "frozen-01")
    session = next(iter(sim.sessions.values()), None) or sim.session_for(None)[0]
    ctx = CallContext(session, "8.0.3.0")

    async def body(task: Task) -> Any:
        await asyncio.sleep(0)
        return None

    async def run() -> None:
        ref = sim.task_manager.start(ctx, entity=source, method="PowerOnVM_Task",
                             description_id="VirtualMachine.powerOn", body=body,
                             resources=())
        task = sim.inventory.get(ref._moId)
        assert isinstance(task, Task)
        first = task.prop_info()
        assert first is task.prop_info()
        assert first.state == "running" and first.progress == 0
        task.set_progress(40)
        second = task.prop_info()
        assert second is not first and second.progress == 40
        await task.done.wait()
        done = task.prop_info()
        assert done.state == "success" and done.progress == 100 and done.completeTime
        assert done is task.prop_info()
        assert isinstance(done, vim.TaskInfo)

    asyncio.run(run())


def test_finished_tasks_let_go_of_their_work_and_leave_after_retention() -> None:
    topo = load_topology(None)
    topo = topo.model_copy(update={"vcenter": topo.vcenter.model_copy(
        update={"task_retention_s": 0.2})})
    sim = Simulator(topo, time_scale=0.0)
    source = _vm(sim, "frozen-01")
    ctx = CallContext(sim.session_for(None)[0], "8.0.3.0")

    def body_after(delay_s: float) -> Any:
        async def body(task: Task) -> Any:
            await asyncio.sleep(delay_s)
            if delay_s > 0.1:
                raise vim.fault.InvalidState(msg="late")
            return None
        return body

    async def run() -> None:
        tasks = []
        for delay_s in (0.0, 0.15):
            ref = sim.task_manager.start(ctx, entity=source, method="PowerOnVM_Task",
                                 description_id="VirtualMachine.powerOn",
                                 body=body_after(delay_s), resources=())
            task = sim.inventory.get(ref._moId)
            assert isinstance(task, Task)
            tasks.append(task)
        await tasks[0].done.wait()
        assert tasks[0].body is None and tasks[1].body is not None
        await tasks[1].done.wait()
        assert tasks[1].body is None
        assert tasks[1].error.__traceback__ is None
        assert tasks[1].prop_info().error.msg == "late"
        assert all(sim.inventory.get(t.moid) is t for t in tasks)
        await asyncio.sleep(0.1)  # 0.25 s after the first finished, 0.1 s after the second
        assert sim.inventory.get(tasks[0].moid) is None
        assert sim.inventory.get(tasks[1].moid) is tasks[1]
        await asyncio.sleep(0.15)
        assert sim.inventory.get(tasks[1].moid) is None

    asyncio.run(run())


def _generic(vm: VirtualMachine, path: str) -> Any:
    top, rest = path.split(".", 1)
    value = vm.get_property(top)
    for part in rest.split("."):
        value = getattr(value, part, None)
    return value


def test_path_getters_answer_what_the_whole_property_does() -> None:
    sim = _sim()
    vm = _vm(sim, "frozen-01")
    assert VirtualMachine.path_getters
    states = []
    for tools, ip, power, frozen, host in (
            (True, "10.0.0.9", "poweredOn", True, "connected"),
            (False, "10.0.0.9", "poweredOn", False, "connected"),
            (True, None, "poweredOn", False, "disconnected"),
            (True, "10.0.0.9", "poweredOff", False, "notResponding")):
        vm.guest.tools_running, vm.guest.ip = tools, ip
        vm.power_state = power
        vm.frozen = frozen
        vm.host.set_connection_state(host)
        for path in VirtualMachine.path_getters:
            fast, slow = resolve_path(vm, path), _generic(vm, path)
            assert same(fast, slow), (path, tools, ip, power, frozen, host)
            states.append(fast)
    assert "10.0.0.9" in states and None in states
    assert {True, False, "poweredOn", "poweredOff", "connected", "disconnected",
            vm.host.ref} <= {s for s in states if not isinstance(s, list)}


def _walked(obj: Any, path: str) -> Any:
    """A path read the long way: the whole top-level property, then each step, a keyed
    step by a search of its array."""
    value: Any = obj
    for i, (name, key) in enumerate(parse_path(path).steps):
        value = obj.get_property(name) if i == 0 else getattr(value, name, None)
        if value is not None and key is not None:
            value = next((v for v in value if str(v.key) == key), None)
        if value is None:
            return None
    return value


def test_every_path_reads_what_a_walk_of_the_whole_property_reads() -> None:
    """How a class reads a path is worked out once (fleet.sim.core ``_readers``); what it
    reads is what walking the whole property reads, for plain, nested, keyed and
    missing paths, read alone or several at once (one top-level property built once),
    first or again."""
    sim = _sim()
    vm = _vm(sim, "frozen-01")
    vm.set_extra_config("guestinfo.fleet.state", "ready")
    paths = ["name", "parent", "runtime.powerState", "runtime.bootTime", "runtime.paused",
             "config.files.vmPathName", "config.hardware.memoryMB", "config.extraConfig",
             "config.hardware.device[4000].deviceInfo.label", "config.hardware.device[4000]",
             'config.extraConfig["guestinfo.fleet.state"].value',
             'config.extraConfig["nvram"]', 'config.extraConfig["no.such"].value',
             "config.hardware.device[4999].key", "guest.net", "layoutEx.disk",
             "summary.config.name", "snapshot.currentSnapshot", "guest.ipAddress"]
    host = vm.host
    for _ in range(2):
        tops: dict[str, Any] = {}
        for path in paths:
            expected = _walked(vm, path)
            assert same(resolve_path(vm, path), expected), path
            assert same(resolve_path(vm, path, tops), expected), path
        assert set(tops) <= {p.split(".")[0] for p in paths}
        for path in ("name", "runtime.connectionState", "summary.hardware.memorySize", "vm"):
            assert same(resolve_path(host, path), _walked(host, path)), path
    assert resolve_path(vm, "config.hardware.device[4000].deviceInfo.label") == \
        "Network adapter 1"
    assert resolve_path(vm, 'config.extraConfig["guestinfo.fleet.state"].value') == "ready"


def test_keyed_getters_answer_what_a_search_of_the_array_does() -> None:
    """``config.extraConfig["k"]`` and ``config.hardware.device[k]`` are answered
    without building the array: the same element a search of it finds, for every key
    there is (vmx, tools, the VM's own and set keys; every device) and none else."""
    sim = _sim()
    vm = _vm(sim, "frozen-01")
    vm.set_extra_config("guestinfo.fleet.state", "ready")
    vm.set_extra_config("svga.present", "FALSE")  # a set key wins over the vmx's
    vm.set_extra_config("hpet0.present", "")  # an empty value removes a vmx key
    assert VirtualMachine.keyed_getters
    for prefix in VirtualMachine.keyed_getters:
        items = _generic(vm, prefix)
        assert items
        for item in items:
            path = f'{prefix}["{item.key}"]' if isinstance(item.key, str) else \
                f"{prefix}[{item.key}]"
            assert same(resolve_path(vm, path), item), path
        assert resolve_path(vm, f'{prefix}["no.such.key"]') is None
        assert resolve_path(vm, f"{prefix}[999999]") is None
    options = {o.key: o.value for o in _generic(vm, "config.extraConfig")}
    assert options["svga.present"] == "FALSE" and "hpet0.present" not in options
    assert options["guestinfo.fleet.state"] == "ready"


def test_what_every_vm_of_a_shape_has_alike_is_shared_not_copied() -> None:
    """A clone costs no copy of its source's configuration: the devices and keys every
    VM of a shape has alike are one set of objects, whatever the number of VMs."""
    sim = _sim()
    a, b = _vm(sim, "frozen-01"), _vm(sim, "frozen-02")
    static = [d for d in a._devices() if not isinstance(
        d, vim.vm.device.VirtualDisk | vim.vm.device.VirtualEthernetCard)]
    assert len(static) >= 10
    assert all(x is y for x, y in zip(static, b._devices(), strict=False))
    shared = [o for o in a.extra_options() if any(o is p for p in b.extra_options())]
    assert len(shared) >= 30
    # CPython shares one key table between instances' attribute dicts only up to 30
    # attributes; past that every VM (10,000 in the inventory benchmark) holds a dict of
    # its own, about 1.3 KB more each.
    assert len(vars(a)) <= 30


# -- nothing grows with the number of clones made and destroyed -----------------------------

def test_clone_destroy_cycles_keep_every_registry_bounded() -> None:
    """``fleet serve``'s simulator held 9 VMs and 1.1 GB after 42k clones: finished tasks,
    and the destroyed VMs they pointed at, stayed for 900 s whatever their number. Now
    every registry stays within the configured retention however many cycles run."""
    retained = 40
    topo = load_topology(None)
    topo = topo.model_copy(update={"vcenter": topo.vcenter.model_copy(
        update={"max_finished_tasks": retained})})
    sim = Simulator(topo, time_scale=0.0)
    session = sim.session_for(None)[0]
    session.authenticated, session.user = True, topo.vcenter.user
    ctx = CallContext(session, "8.0.3.0")
    source = _vm(sim, "frozen-01")
    folder = sim.ensure_folder("churn")
    pc = sim.inventory.get("propertyCollector")
    assert isinstance(pc, PropertyCollector)
    # A long-lived watcher of every VM, as a monitoring tool keeps: a dynamic filter.
    view = sim.inventory.get("ViewManager").CreateContainerView(  # type: ignore[union-attr]
        ctx, sim.root_folder.ref, [vim.VirtualMachine], True)
    traverse = PC.TraversalSpec(name="view", type=vim.view.ContainerView, path="view")
    flt_ref = pc.CreateFilter(ctx, PC.FilterSpec(
        objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[traverse])],
        propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=["name"])]), False)
    flt = sim.inventory.get(flt_ref._moId)
    assert isinstance(flt, PropertyFilter)

    async def finish(ref: Any) -> Any:
        task = sim.inventory.get(ref._moId)
        assert isinstance(task, Task)
        await task.done.wait()
        assert task.state == "success", task.error
        return task.result

    async def make(i: int) -> VirtualMachine:
        clone_ref = await finish(source.InstantClone_Task(ctx, vim.vm.InstantCloneSpec(
            name=f"churn-{i}", location=vim.vm.RelocateSpec(folder=folder.ref))))
        clone = sim.inventory.get(clone_ref._moId)
        assert isinstance(clone, VirtualMachine)
        clone.refresh_network()  # what the guest does for the refresh program: its own IP
        assert clone.guest.ip is not None and clone.guest.ip != source.guest.ip
        return clone

    async def remove(clone: VirtualMachine) -> None:
        await finish(clone.PowerOffVM_Task(ctx))
        await finish(clone.Destroy_Task(ctx))

    def counts() -> dict[str, int]:
        objects = list(sim.inventory.objects.values())
        return {"objects": len(objects),
                "tasks": sum(isinstance(o, Task) for o in objects),
                "vm objects alive": sum(isinstance(o, VirtualMachine) and o.runtime is sim.runtime
                                        for o in gc.get_objects()),
                "ips": len(sim.runtime.addresses.ips),
                "left": len(flt.left), "tracked": len(flt.tracked),
                "finished": sum(isinstance(o, Task) and o.state in ("success", "error")
                                for o in objects)}

    async def run() -> list[dict[str, int]]:
        version = ""
        seen = []
        for round_ in range(6):
            clones = await asyncio.gather(*(make(round_ * 50 + i) for i in range(50)))
            for _ in range(2):  # the watcher sees them enter, then leave
                update = await pc.WaitForUpdatesEx(ctx, version,
                                                   PC.WaitOptions(maxWaitSeconds=0))
                version = update.version if update is not None else version
                await asyncio.gather(*(remove(clone) for clone in clones))
                clones = []
            del clones
            gc.collect()
            seen.append(counts())
        await sim.close()
        return seen

    gc.collect()
    before = counts()
    seen = asyncio.run(run())
    assert sim.counters["clones_total"] == 300 and sim.stats()["vms"] == before["tracked"] == 9
    for after in seen:
        assert after["tasks"] == after["finished"] == retained  # 900 of them ran
        assert after["objects"] == before["objects"] + retained
        assert after["vm objects alive"] == before["vm objects alive"]
        assert after["ips"] <= before["ips"] + 1  # a destroyed VM's address is free again
        # What left is remembered until the watcher asks past it, then forgotten.
        assert after["tracked"] == 9 and after["left"] <= 50
    assert seen[-1] == seen[1]  # a steady state, not a slow climb
    assert sim.stats()["clone_task_s"]["count"] == 300
    assert len(sim.task_manager.finished) == retained
    assert sim.clone_task_s.recent.maxlen is not None  # percentiles of the latest only
