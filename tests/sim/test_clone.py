"""Instant Clone semantics in the simulator, driven through unmodified pyVmomi."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from pyVim.task import WaitForTask, WaitForTasks
from pyVmomi import vim, vmodl

from tests.sim.conftest import connect, find_vm, vm_folder
from tests.simproc import SimProcess


def clone_spec(name: str, folder: Any = None, *, extra: dict[str, str] | None = None,
               nic: tuple[Any, str] | None = None) -> Any:
    """``nic``: the source's NIC as read and its migrateConnect; the edit has the NIC's
    own type (VMXNET 3 on a Linux VM, E1000e on a Windows one) and key."""
    location = vim.vm.RelocateSpec(folder=folder)
    if nic is not None:
        source_nic, mode = nic
        device = type(source_nic)(
            key=source_nic.key, connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                migrateConnect=mode, startConnected=True, allowGuestControl=True,
                connected=mode == "connect"))
        location.deviceChange = [vim.vm.device.VirtualDeviceSpec(operation="edit",
                                                                 device=device)]
    return vim.vm.InstantCloneSpec(name=name, location=location, config=[
        vim.option.OptionValue(key=k, value=v) for k, v in (extra or {}).items()])


def chain(vm: Any) -> int:
    return max(len(d.chain) for d in vm.layoutEx.disk)


def nic_of(vm: Any) -> Any:
    return next(d for d in vm.config.hardware.device
                if isinstance(d, vim.vm.device.VirtualEthernetCard))


def test_frozen_clone_lands_on_source_host_with_new_identity(si: Any) -> None:
    source = find_vm(si, "frozen-02")
    before = chain(source)
    task = source.InstantClone_Task(clone_spec("ic-identity", vm_folder(si),
                                               extra={"guestinfo.fleet.index": "7"}))
    WaitForTask(task)
    info = task.info
    assert info.descriptionId == "VirtualMachine.instantClone"
    assert info.entity == source and info.entityName == "frozen-02"
    assert info.queueTime <= info.startTime <= info.completeTime
    clone = info.result
    assert clone.name == "ic-identity"
    assert clone.runtime.host == source.runtime.host
    assert clone.runtime.powerState == "poweredOn"
    assert clone.runtime.instantCloneFrozen is False
    assert clone.config.uuid != source.config.uuid
    assert clone.config.instanceUuid != source.config.instanceUuid
    assert nic_of(clone).macAddress != nic_of(source).macAddress
    assert {o.key: o.value for o in clone.config.extraConfig}["guestinfo.fleet.index"] == "7"
    assert chain(source) == before  # frozen source unchanged
    assert chain(clone) == before + 1


def test_bios_uuid_is_taken(si: Any) -> None:
    source = find_vm(si, "frozen-03")
    spec = clone_spec("ic-bios", vm_folder(si))
    spec.biosUuid = "4210aaaa-bbbb-cccc-dddd-eeeeffff0000"
    task = source.InstantClone_Task(spec)
    WaitForTask(task)
    assert task.info.result.config.uuid == spec.biosUuid


def test_running_source_chain_grows_and_clones_serialise(sim: SimProcess, si: Any) -> None:
    source = find_vm(si, "golden-running")
    start = chain(source)
    # The first clone holds the source until cancelled (not for its 50 ms, which a
    # loaded machine can spend between two calls): the next ones are queued for sure.
    sim.add_faults({"method": "InstantClone_Task", "object": "golden-running",
                    "fault": "slow", "delay_s": 3600, "max_count": 1})
    blocker, *tasks = [source.InstantClone_Task(clone_spec(f"ic-run-{i}", vm_folder(si)))
                       for i in range(5)]
    # one clone at a time: the rest wait behind the first
    assert [t.info.state for t in [blocker, *tasks]] == ["running"] + ["queued"] * 4
    blocker.CancelTask()  # before its stun: it adds nothing to the chain
    WaitForTasks(tasks)
    assert blocker.info.state == "error"
    assert chain(source) == start + 4
    depths = sorted(chain(t.info.result) for t in tasks)
    assert depths == [start + 1, start + 2, start + 3, start + 4]
    spans = sorted((t.info.startTime, t.info.completeTime) for t in [blocker, *tasks])
    for (_, end), (begin, _) in itertools.pairwise(spans):
        assert begin >= end  # never two clones of the running source at once


def test_powered_off_source_gives_invalid_state(si: Any) -> None:
    folder = vm_folder(si)
    source = find_vm(si, "frozen-04")
    full = source.CloneVM_Task(folder, "ic-off-source", vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(), powerOn=False))
    WaitForTask(full)
    off = full.info.result
    assert off.runtime.powerState == "poweredOff"
    task = off.InstantClone_Task(clone_spec("ic-from-off", folder))
    with pytest.raises(vim.fault.InvalidState):
        WaitForTask(task)
    assert task.info.state == "error"
    assert isinstance(task.info.error, vim.fault.InvalidPowerState)


def test_taken_name_gives_duplicate_name(si: Any) -> None:
    folder = vm_folder(si)
    source = find_vm(si, "frozen-05")
    WaitForTask(source.InstantClone_Task(clone_spec("ic-dup", folder)))
    task = source.InstantClone_Task(clone_spec("ic-dup", folder))
    with pytest.raises(vim.fault.DuplicateName) as err:
        WaitForTask(task)
    assert err.value.name == "ic-dup"
    assert err.value.object.name == "ic-dup"


def test_migrate_connect_disconnect_leaves_nic_disconnected(si: Any) -> None:
    source = find_vm(si, "frozen-06")
    task = source.InstantClone_Task(clone_spec("ic-disc", vm_folder(si),
                                               nic=(nic_of(source), "disconnect")))
    WaitForTask(task)
    clone = task.info.result
    nic = nic_of(clone)
    assert nic.connectable.connected is False
    assert nic.connectable.migrateConnect is None  # used at clone time, then unset


def test_a_nic_edit_that_carries_a_mac_sets_it_and_a_copied_one_is_a_duplicate(
        si: Any, sim: SimProcess) -> None:
    source = find_vm(si, "frozen-06")
    device = nic_of(source)  # the source's own NIC, MAC and all, as a careless tool sends it
    device.connectable = vim.vm.device.VirtualDevice.ConnectInfo(
        migrateConnect="disconnect", connected=False, startConnected=True,
        allowGuestControl=True)
    spec = clone_spec("ic-copied-mac", vm_folder(si))
    spec.location.deviceChange = [vim.vm.device.VirtualDeviceSpec(operation="edit",
                                                                  device=device)]
    before = sim.stats()["duplicate_macs"]
    task = source.InstantClone_Task(spec)
    WaitForTask(task)
    assert nic_of(task.info.result).macAddress == nic_of(source).macAddress
    assert sim.stats()["duplicate_macs"] == before + 1
    # An edit without a MAC: the clone keeps the address vCenter generated for it.
    task = source.InstantClone_Task(clone_spec("ic-own-mac", vm_folder(si),
                                               nic=(device, "disconnect")))
    WaitForTask(task)
    assert nic_of(task.info.result).macAddress != nic_of(source).macAddress
    assert sim.stats()["duplicate_macs"] == before + 1


def test_a_nic_edit_cannot_change_the_adapter_type(si: Any) -> None:
    source = find_vm(si, "frozen-06")
    spec = clone_spec("ic-e1000", vm_folder(si))
    spec.location.deviceChange = [vim.vm.device.VirtualDeviceSpec(
        operation="edit", device=vim.vm.device.VirtualE1000(
            key=nic_of(source).key, connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                migrateConnect="disconnect", connected=False, startConnected=True,
                allowGuestControl=True)))]
    with pytest.raises(vim.fault.InvalidDeviceSpec):
        source.InstantClone_Task(spec)


def test_non_nic_device_change_is_refused(si: Any) -> None:
    source = find_vm(si, "frozen-06")
    disk = next(d for d in source.config.hardware.device
                if isinstance(d, vim.vm.device.VirtualDisk))
    spec = clone_spec("ic-bad-device", vm_folder(si))
    spec.location.deviceChange = [vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)]
    with pytest.raises(vim.fault.DisallowedMigrationDeviceAttached):
        source.InstantClone_Task(spec)


def test_check_instant_clone_reports_problems_without_cloning(si: Any) -> None:
    source = find_vm(si, "frozen-07")
    WaitForTask(source.InstantClone_Task(clone_spec("ic-check", vm_folder(si))))
    checker = si.content.vmProvisioningChecker
    task = checker.CheckInstantClone_Task(source, clone_spec("ic-check", vm_folder(si)))
    WaitForTask(task)
    [result] = task.info.result
    assert result.vm == source
    assert any(isinstance(e, vim.fault.DuplicateName) for e in result.error)
    ok = checker.CheckInstantClone_Task(source, clone_spec("ic-check-free", vm_folder(si)))
    WaitForTask(ok)
    assert ok.info.result[0].error == []
    with pytest.raises(LookupError):
        find_vm(si, "ic-check-free")  # a check creates nothing


def test_cancel_queued_clone(si: Any) -> None:
    source = find_vm(si, "golden-running")
    folder = vm_folder(si)
    tasks = [source.InstantClone_Task(clone_spec(f"ic-cancel-{i}", folder)) for i in range(3)]
    last = tasks[-1]
    assert last.info.state == "queued"
    last.CancelTask()
    WaitForTasks(tasks[:-1])
    with pytest.raises(vmodl.fault.RequestCanceled):
        WaitForTask(last)
    assert last.info.cancelled is True
    with pytest.raises(LookupError):
        find_vm(si, "ic-cancel-2")
    with pytest.raises(vim.fault.InvalidState):
        tasks[0].CancelTask()  # already completed


def test_destroy_needs_power_off(si: Any) -> None:
    source = find_vm(si, "frozen-08")
    task = source.InstantClone_Task(clone_spec("ic-destroy", vm_folder(si)))
    WaitForTask(task)
    clone = task.info.result
    with pytest.raises(vim.fault.InvalidPowerState):
        WaitForTask(clone.Destroy_Task())
    WaitForTask(clone.PowerOffVM_Task())
    WaitForTask(clone.Destroy_Task())
    with pytest.raises(LookupError):
        find_vm(si, "ic-destroy")


def test_relocate_to_another_host(si: Any) -> None:
    folder = vm_folder(si)
    source = find_vm(si, "frozen-01")
    full = source.CloneVM_Task(folder, "ic-reloc", vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(), powerOn=True))
    WaitForTask(full)
    vm = full.info.result
    assert vm.runtime.powerState == "poweredOn"
    assert chain(vm) == 1  # a full clone is consolidated
    target = si.content.searchIndex.FindByInventoryPath("dc1/host/cluster1/esx-05")
    WaitForTask(vm.RelocateVM_Task(vim.vm.RelocateSpec(host=target)))
    assert vm.runtime.host == target
    assert vm in target.vm


@pytest.fixture(scope="module")
def deep_sim() -> Iterator[SimProcess]:
    topology = """
    [latency]
    instant_clone_s = 0.05
    stun_s = 0.02
    per_chain_level_s = 0.0
    jitter = 0.0
    [[hosts]]
    name = "esx-{index:02d}"
    count = 2
    [[sources]]
    name = "deep-running"
    host = "esx-01"
    chain_depth = 240
    [[sources]]
    name = "frozen-254"
    host = "esx-02"
    state = "frozen"
    chain_depth = 254
    [[sources]]
    name = "frozen-255"
    host = "esx-02"
    state = "frozen"
    chain_depth = 255
    """
    with SimProcess(topology_text=topology, time_scale=1.0) as proc:
        yield proc


def test_running_chain_grows_until_the_clone_past_255_fails(deep_sim: SimProcess) -> None:
    si = connect(deep_sim)
    source = find_vm(si, "deep-running")
    folder = vm_folder(si)
    assert chain(source) == 240
    for i in range(15):
        task = source.InstantClone_Task(clone_spec(f"deep-{i}", folder))
        WaitForTask(task)
        assert chain(source) == 241 + i
        assert chain(task.info.result) == 241 + i
    assert chain(source) == 255
    task = source.InstantClone_Task(clone_spec("deep-too-far", folder))
    with pytest.raises(vim.fault.GenericVmConfigFault) as err:
        WaitForTask(task)
    assert "Unable to prepare migration" in err.value.reason
    assert chain(source) == 255  # the failed clone added nothing
    stats = deep_sim.stats()
    assert stats["max_clone_chain_depth"] == 255
    assert stats["sources"]["deep-running"]["chain_depth"] == 255


def test_frozen_source_chain_limit(deep_sim: SimProcess) -> None:
    """A frozen source never deepens: at 254 every clone is 255; at 255 none fits."""
    si = connect(deep_sim)
    folder = vm_folder(si)
    at_254 = find_vm(si, "frozen-254")
    tasks = [at_254.InstantClone_Task(clone_spec(f"f254-{i}", folder)) for i in range(3)]
    WaitForTasks(tasks)
    assert [chain(t.info.result) for t in tasks] == [255, 255, 255]
    assert chain(at_254) == 254
    refused = find_vm(si, "frozen-255").InstantClone_Task(clone_spec("f255", folder))
    with pytest.raises(vim.fault.GenericVmConfigFault):
        WaitForTask(refused)


def test_clone_time_grows_with_chain_depth() -> None:
    topology = """
    [latency]
    instant_clone_s = 0.02
    per_chain_level_s = 0.002
    jitter = 0.0
    [[hosts]]
    name = "esx-01"
    [[sources]]
    name = "shallow"
    state = "frozen"
    chain_depth = 1
    [[sources]]
    name = "deep"
    state = "frozen"
    chain_depth = 200
    """
    with SimProcess(topology_text=topology, time_scale=1.0) as proc:
        si = connect(proc)
        folder = vm_folder(si)

        def duration(source: str, name: str) -> float:
            task = find_vm(si, source).InstantClone_Task(clone_spec(name, folder))
            WaitForTask(task)
            return (task.info.completeTime - task.info.startTime).total_seconds()

        shallow = min(duration("shallow", f"s-{i}") for i in range(3))
        deep = min(duration("deep", f"d-{i}") for i in range(3))
        # 0.02 s vs 0.02 + 200 * 0.002 = 0.42 s
        assert deep > shallow + 0.3


def test_host_memory_overcommit_gives_insufficient_resources() -> None:
    topology = """
    clone_memory_shared = 0.5
    [[hosts]]
    name = "small"
    memory_gb = 10
    [[sources]]
    name = "big"
    state = "frozen"
    memory_mb = 4096
    """
    with SimProcess(topology_text=topology, time_scale=0.01) as proc:
        si = connect(proc)
        folder = vm_folder(si)
        source = find_vm(si, "big")
        # 10 GiB host, 4 GiB source, each clone costs 2 GiB: three fit, the fourth does not.
        for i in range(3):
            WaitForTask(source.InstantClone_Task(clone_spec(f"m-{i}", folder)))
        task = source.InstantClone_Task(clone_spec("m-3", folder))
        with pytest.raises(vim.fault.InsufficientResourcesFault):
            WaitForTask(task)
        host = source.runtime.host
        assert host.summary.quickStats.overallMemoryUsage == 4096 + 3 * 2048


def peak_running(infos: list[Any]) -> int:
    """The most of these tasks that ran at one instant (from their start/complete times)."""
    events = sorted([(i.startTime, 1) for i in infos] + [(i.completeTime, -1) for i in infos])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def test_per_host_queueing_is_visible_in_task_state() -> None:
    topology = """
    [latency]
    instant_clone_s = 0.5
    jitter = 0.0
    [[hosts]]
    name = "esx-01"
    slots = 2
    [[sources]]
    name = "src"
    state = "frozen"
    """
    with SimProcess(topology_text=topology, time_scale=1.0) as proc:
        si = connect(proc)
        folder = vm_folder(si)
        source = find_vm(si, "src")
        # The first two clones hold both slots until cancelled (not for 0.5 s, which a
        # loaded machine can spend between two calls): the next three are queued for sure.
        proc.add_faults({"method": "InstantClone_Task", "fault": "slow", "delay_s": 3600,
                         "max_count": 2})
        tasks = [source.InstantClone_Task(clone_spec(f"q-{i}", folder)) for i in range(5)]
        states = [t.info.state for t in tasks]
        assert states == ["running", "running", "queued", "queued", "queued"]
        assert proc.stats()["tasks"] == {"queued": 3, "running": 2, "total": 5}
        for blocker in tasks[:2]:
            blocker.CancelTask()
        WaitForTasks(tasks[2:])
        infos = [t.info for t in tasks]
        assert [i.state for i in infos] == ["error"] * 2 + ["success"] * 3
        # the queued ones started only as slots freed: at no instant more than two ran
        assert peak_running(infos) == 2


def test_vcenter_wide_cap_queues_across_hosts() -> None:
    topology = """
    [vcenter]
    max_concurrent_operations = 3
    [latency]
    instant_clone_s = 0.4
    jitter = 0.0
    [[hosts]]
    name = "esx-{index:02d}"
    count = 4
    [[sources]]
    name = "src-{index}"
    count = 4
    host = "esx-{index:02d}"
    state = "frozen"
    """
    with SimProcess(topology_text=topology, time_scale=1.0) as proc:
        si = connect(proc)
        folder = vm_folder(si)
        # The first three clones (three hosts) hold vCenter's three operations until
        # cancelled: the other five, on hosts with free slots, are queued for sure.
        proc.add_faults({"method": "InstantClone_Task", "fault": "slow", "delay_s": 3600,
                         "max_count": 3})
        sources = [find_vm(si, f"src-{i % 4 + 1}") for i in range(8)]
        tasks = [src.InstantClone_Task(clone_spec(f"cap-{i}", folder))
                 for i, src in enumerate(sources)]
        assert proc.stats()["tasks"] == {"queued": 5, "running": 3, "total": 8}
        assert [t.info.state for t in tasks] == ["running"] * 3 + ["queued"] * 5
        for blocker in tasks[:3]:
            blocker.CancelTask()
        WaitForTasks(tasks[3:])
        assert peak_running([t.info for t in tasks]) == 3


def test_thousand_clones_from_frozen_sources_leave_them_unchanged() -> None:
    with SimProcess(time_scale=0.01) as proc:
        si = connect(proc)
        folder = vm_folder(si)
        sources = [find_vm(si, f"frozen-{i:02d}") for i in range(1, 9)]
        before = {s.name: chain(s) for s in sources}
        tasks = [sources[i % 8].InstantClone_Task(clone_spec(f"k-{i:04d}", folder))
                 for i in range(1000)]
        WaitForTasks(tasks)
        stats = proc.stats()
        assert stats["clones_total"] == 1000
        for source in sources:
            assert chain(source) == before[source.name]
            assert stats["sources"][source.name]["chain_depth"] == before[source.name]
            assert stats["sources"][source.name]["clones"] == 125
            assert stats["sources"][source.name]["frozen"] is True
        assert stats["max_clone_chain_depth"] == max(before.values()) + 1
        assert stats["vms"] == 9 + 1000
