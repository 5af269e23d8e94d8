"""The folder tree: a live view of a root folder, its folders and their VMs (issue 16).

The service keeps its fleets from this view instead of re-reading vCenter
(docs/watching.md, "The service's view"). These tests hold the view to what the
simulator has after each kind of change (a VM made, labelled, powered off,
destroyed; a folder made and destroyed; the session lost; the root destroyed), and
count the full reads: one at the start, one after the watch is lost, none for a
change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from fleet.testing.harness import SimVCenter, sim_vsphere, small_topology
from fleet.vsphere.client import VSphereClient
from fleet.vsphere.model import CloneRequest, FolderTree, NotRead, Ref

pytestmark = pytest.mark.anyio

NAME = "guestinfo.fleet.name"
INDEX = "guestinfo.fleet.index"
LABELS = (NAME, INDEX)


@asynccontextmanager
async def tree_of(vs: VSphereClient, root: Ref, **kw: int) -> AsyncIterator[FolderTree]:
    tree = vs.folder_tree(root, LABELS)
    for key, value in kw.items():
        setattr(tree, key, value)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(tree.run)
        yield tree
        tg.cancel_scope.cancel()


async def until(tree: FolderTree, check: Callable[[], bool]) -> None:
    """Wait for the view to satisfy ``check`` (it changes only with updates)."""
    with anyio.fail_after(10):
        while not check():
            await tree.wait_changed(tree.generation)


def view(tree: FolderTree) -> dict[str, dict[str, tuple[str, str, str | None]]]:
    """folder name -> VM name -> (power, the fleet name label or '-', host name)."""
    return {name: {vm.name: (vm.power_state, vm.labels.get(NAME, "-"), vm.host_name)
                   for vm in tree.vms_in(ref)}
            for name, ref in tree.folders()}


async def fleet_of(vs: VSphereClient, vc: SimVCenter, name: str, count: int,
                   start: int = 0) -> list[Ref]:
    folder = await vs.ensure_folder(f"root/{name}")
    source = (await vs.find_vms(["frozen-01"]))[0].ref
    refs = []
    for i in range(start, start + count):
        task = await vs.start_instant_clone(CloneRequest(
            source=source, name=f"{name}-{i}", folder=folder,
            extra_config={NAME: name, INDEX: str(i)}))
        refs.append(await task.wait(10))
    return refs


async def root_of(vs: VSphereClient) -> Ref:
    root = await vs.find_folder("root")
    assert root is not None
    return root


async def test_the_first_read_shows_folders_vms_and_labels() -> None:
    async with sim_vsphere(small_topology(hosts=2)) as (vs, vc):
        await fleet_of(vs, vc, "a", 3)
        await fleet_of(vs, vc, "b", 2)
        root = await root_of(vs)
        vc.add_vm("loose", host="esx-01", folder="root/b")  # no labels: someone else's
        async with tree_of(vs, root) as tree:
            assert tree.synced and tree.full_reads == 1 and tree.error is None
            assert [name for name, _ in tree.folders()] == ["a", "b"]
            seen = view(tree)
            assert seen["a"] == {f"a-{i}": ("poweredOn", "a", vc.vm(f"a-{i}").host.name)
                                 for i in range(3)}
            assert set(seen["b"]) == {"b-0", "b-1", "loose"} and seen["b"]["loose"][1] == "-"
            vm = next(v for v in tree.vms_in(tree.folders()[0][1]) if v.name == "a-2")
            assert vm.labels[INDEX] == "2"
            with pytest.raises(NotRead):  # only the labels asked for were read
                vm.labels["guestinfo.fleet.state"]


async def test_changes_reach_the_view_without_a_full_read() -> None:
    async with sim_vsphere(small_topology(hosts=2)) as (vs, vc):
        refs = await fleet_of(vs, vc, "a", 2)
        root = await root_of(vs)
        async with tree_of(vs, root) as tree:
            a = dict(tree.folders())["a"]
            before = tree.folder_version(a)
            await fleet_of(vs, vc, "a", 1, start=2)
            await until(tree, lambda: len(tree.vms_in(a)) == 3)
            assert tree.folder_version(a) > before
            await vs.update_extra_config(refs[0], {NAME: "renamed"})
            await until(tree, lambda: view(tree)["a"]["a-0"][1] == "renamed")
            await vs.power_off(refs[1])
            await until(tree, lambda: view(tree)["a"]["a-1"][0] == "poweredOff")
            await vs.update_extra_config(refs[0], {NAME: ""})  # an empty value removes it
            await until(tree, lambda: view(tree)["a"]["a-0"][1] == "-")
            await vs.destroy(refs[1])
            await until(tree, lambda: "a-1" not in view(tree)["a"])
            other = await vs.ensure_folder("root/c")
            await until(tree, lambda: "c" in view(tree))
            await vs.destroy_folder(other)
            await until(tree, lambda: "c" not in view(tree))
            assert tree.full_reads == 1


async def test_a_large_first_read_comes_in_pages_and_is_shown_whole() -> None:
    async with sim_vsphere(small_topology(hosts=2)) as (vs, vc):
        await fleet_of(vs, vc, "a", 7)
        root = await root_of(vs)
        seen: list[int] = []
        async with tree_of(vs, root, page=2) as tree:
            seen.append(len(tree.vms_in(dict(tree.folders())["a"])))
            calls = vc.calls["WaitForUpdatesEx"]
        assert seen == [7] and calls >= 4  # 9 objects in pages of 2


async def test_a_lost_session_reads_everything_again() -> None:
    async with sim_vsphere(small_topology(hosts=2)) as (vs, vc):
        refs = await fleet_of(vs, vc, "a", 3)
        root = await root_of(vs)
        async with tree_of(vs, root) as tree:
            vc.sim.expire_all_sessions()
            await vs.power_off(refs[2])  # logs in again
            await vs.destroy(refs[2])
            await until(tree, lambda: tree.full_reads == 2 and "a-2" not in view(tree)["a"])
            assert set(view(tree)["a"]) == {"a-0", "a-1"}


async def test_the_watch_ends_when_its_root_folder_is_destroyed() -> None:
    async with sim_vsphere(small_topology(hosts=2)) as (vs, _vc):
        root = await vs.ensure_folder("root")
        inner = await vs.ensure_folder("root/a")
        tree = vs.folder_tree(root, LABELS)
        async with anyio.create_task_group() as tg:
            await tg.start(tree.run)
            await until(tree, lambda: "a" in view(tree))
            await vs.destroy_folder(inner)
            await vs.destroy_folder(root)
            with anyio.fail_after(10):
                await tree.wait_changed(tree.generation)
                while not tree.root_gone:
                    await tree.wait_changed(tree.generation)
        # run() returned by itself: the task group ended without being cancelled.
        assert tree.root_gone and tree.folders() == [] and not tree.synced


async def test_a_missing_root_ends_the_watch_at_once() -> None:
    async with sim_vsphere(small_topology(hosts=2)) as (vs, _vc):
        root = await vs.ensure_folder("root")
        await vs.destroy_folder(root)
        tree = vs.folder_tree(root, LABELS)
        with anyio.fail_after(10):
            await tree.run()
        assert tree.root_gone and not tree.synced
