"""Folders as vCenter has them, through unmodified pyVmomi: the calls fleet's lock uses
(CreateFolder, Rename_Task, Destroy_Task on a folder, CurrentTime) and their faults
and privileges (docs/locking.md)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from tests.sim.conftest import connect, find_vm, vm_folder
from tests.simproc import SimProcess


def test_concurrent_creates_of_one_name_make_one_folder(sim: SimProcess) -> None:
    # CreateFolder takes a while; the name is held from its start, so of twelve
    # sessions creating the same name at once exactly one gets a folder.
    parent = vm_folder(connect(sim)).CreateFolder("race-parent")
    start = threading.Barrier(12)
    made: list[Any] = []
    dups: list[Any] = []

    def create() -> None:
        si = connect(sim)
        target = vim.Folder(parent._moId, si._stub)
        start.wait()
        try:
            made.append(target.CreateFolder("the-one"))
        except vim.fault.DuplicateName as exc:
            dups.append(exc)

    threads = [threading.Thread(target=create) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(made) == 1 and len(dups) == 11
    assert [e.name for e in parent.childEntity] == ["the-one"]


def test_concurrent_renames_and_a_create_of_one_name_give_it_to_one(sim: SimProcess) -> None:
    # Fleet's lock is taken by renaming a folder of one's own to the lock's name
    # (docs/locking.md): of twelve sessions renaming their folders to one name, and one
    # creating it, all at once, exactly one gets the name; the others DuplicateName,
    # from the call or its task, and keep their own names.
    parent = vm_folder(connect(sim)).CreateFolder("rename-race")
    own = [parent.CreateFolder(f"claim-{i:02d}") for i in range(12)]
    start = threading.Barrier(13)
    won: list[str] = []
    dups: list[str] = []

    def rename(i: int) -> None:
        si = connect(sim)
        mine = vim.Folder(own[i]._moId, si._stub)
        start.wait()
        try:
            WaitForTask(mine.Rename("the-one"))
            won.append(f"rename {i}")
        except vim.fault.DuplicateName:
            dups.append(f"rename {i}")

    def create() -> None:
        si = connect(sim)
        target = vim.Folder(parent._moId, si._stub)
        start.wait()
        try:
            target.CreateFolder("the-one")
            won.append("create")
        except vim.fault.DuplicateName:
            dups.append("create")

    threads = [threading.Thread(target=rename, args=(i,)) for i in range(12)]
    threads.append(threading.Thread(target=create))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and len(dups) == 12, (won, dups)
    names = sorted(e.name for e in parent.childEntity)
    assert names.count("the-one") == 1 and len(names) == 12 + (won == ["create"])
    assert sorted(n for n in names if n != "the-one") == sorted(
        f"claim-{i:02d}" for i in range(12) if won != [f"rename {i}"])


def test_rename_a_folder(si: Any) -> None:
    parent = vm_folder(si).CreateFolder("ren-parent")
    a = parent.CreateFolder("a")
    parent.CreateFolder("b")
    WaitForTask(a.Rename("a2"))
    assert a.name == "a2"
    assert si.content.searchIndex.FindChild(parent, "a2") == a
    assert si.content.searchIndex.FindChild(parent, "a") is None
    with pytest.raises(vim.fault.DuplicateName):
        WaitForTask(a.Rename("b"))
    with pytest.raises(vim.fault.InvalidName):
        a.Rename("x" * 81)
    WaitForTask(a.Rename("a2"))  # its own name: no change, no fault
    with pytest.raises(vmodl.fault.NotSupported):
        vm_folder(si).Rename("vm2")


def test_destroy_a_folder_takes_its_subtree_but_not_a_powered_on_vm(si: Any) -> None:
    parent = vm_folder(si).CreateFolder("del-parent")
    inner = parent.CreateFolder("inner")
    inner.CreateFolder("leaf")
    WaitForTask(parent.Destroy())
    with pytest.raises(vmodl.fault.ManagedObjectNotFound):
        _ = inner.name
    assert si.content.searchIndex.FindChild(vm_folder(si), "del-parent") is None
    with pytest.raises(vmodl.fault.ManagedObjectNotFound):
        WaitForTask(parent.Destroy())  # its id is never reused: gone stays gone
    # Two destroys of one folder at once: one succeeds, the other finds it gone.
    # (The second may be refused at the call, if the first task already finished by
    # then, as on a loaded machine, or fail as a task: either way it finds it gone.)
    twice = vm_folder(si).CreateFolder("del-twice")
    outcomes = []
    tasks = [twice.Destroy()]
    try:
        tasks.append(twice.Destroy())
    except vmodl.fault.ManagedObjectNotFound:
        outcomes.append("not found")
    for task in tasks:
        try:
            WaitForTask(task)
            outcomes.append("success")
        except vmodl.fault.ManagedObjectNotFound:
            outcomes.append("not found")
    assert sorted(outcomes) == ["not found", "success"]

    # A folder holding a powered-on VM: vCenter destroys children one by one and stops
    # at the first it cannot destroy (a VM must be powered off), so the VM survives.
    keep = vm_folder(si).CreateFolder("keep-parent")
    source = find_vm(si, "frozen-01")
    spec = vim.vm.InstantCloneSpec(name="survivor",
                                   location=vim.vm.RelocateSpec(folder=keep))
    task = source.InstantClone_Task(spec)
    WaitForTask(task)
    clone = task.info.result
    with pytest.raises(vim.fault.InvalidPowerState):
        WaitForTask(keep.Destroy())
    assert clone.name == "survivor" and clone.runtime.powerState == "poweredOn"
    WaitForTask(clone.PowerOff())
    WaitForTask(keep.Destroy())
    with pytest.raises(vmodl.fault.ManagedObjectNotFound):
        _ = clone.name
    with pytest.raises(vmodl.fault.NotSupported):
        WaitForTask(vm_folder(si).Destroy())


def test_current_time_is_vcenters_clock(si: Any) -> None:
    now = si.CurrentTime()
    assert now.tzinfo is not None
    assert abs(now - datetime.now(UTC)) < timedelta(minutes=1)


def test_folder_privileges_are_checked() -> None:
    topology = """
    [[hosts]]
    name = "esx-01"
    [[datastores]]
    name = "ds-01"
    [[sources]]
    name = "frozen-01"
    host = "esx-01"
    state = "frozen"
    [[users]]
    name = "keeper"
    password = "keeper-pass"
    denied = ["Folder.Rename", "Folder.Delete"]
    """
    with SimProcess(topology_text=topology) as proc:
        admin = connect(proc)
        folder = vm_folder(admin).CreateFolder("guarded")
        si = connect(proc, user="keeper", pwd="keeper-pass")
        mine = vim.Folder(folder._moId, si._stub)
        with pytest.raises(vim.fault.NoPermission) as denied:
            mine.Rename("other")
        assert denied.value.privilegeId == "Folder.Rename"
        with pytest.raises(vim.fault.NoPermission) as denied:
            mine.Destroy()
        assert denied.value.privilegeId == "Folder.Delete"
        assert mine.CreateFolder("allowed").name == "allowed"  # Folder.Create is not denied
