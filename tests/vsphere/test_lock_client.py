"""The client's folder calls and the fleet lock against the simulator: many sessions
contending for one stale lock, exactly one of them wins (docs/locking.md)."""

from __future__ import annotations

import math
import time

import anyio
import pytest

from fleet.engine.lock import LOCK_NAME, FleetLock, Holder, LockHeld, LockOptions, lock_state
from fleet.errors import DuplicateName, NotEmpty, NotFound
from fleet.vsphere.model import CloneRequest
from tests.simproc import SimProcess
from tests.vsphere.conftest import client_for, unique

pytestmark = pytest.mark.anyio


async def test_folder_calls(sim: SimProcess) -> None:
    async with client_for(sim) as vs:
        now = await vs.server_time()
        assert abs(now - time.time()) < 60
        base = await vs.ensure_folder(unique("fc"))
        made = await vs.new_folder(base, "x")
        with pytest.raises(DuplicateName):
            await vs.new_folder(base, "x")
        await vs.rename_folder(made, "y")
        assert await vs.list_child_folders(base) == [("y", made)]
        await vs.new_folder(made, "inside")
        await vs.destroy_folder(made)  # folders only: it goes, subtree and all
        assert await vs.list_child_folders(base) == []
        with pytest.raises(NotFound):
            await vs.destroy_folder(made)
        with pytest.raises(NotFound):
            await vs.rename_folder(made, "z")
        # A VM anywhere inside: refused, nothing destroyed.
        inner = await vs.new_folder(base, "holder")
        deeper = await vs.new_folder(inner, "deeper")
        [source] = await vs.find_vms(["frozen-01"])
        clone = await (await vs.start_instant_clone(CloneRequest(
            source=source.ref, name=unique("kept"), folder=deeper))).wait(60)
        with pytest.raises(NotEmpty):
            await vs.destroy_folder(inner)
        assert [vm.ref for vm in await vs.list_folder_vms(deeper)] == [clone]
        await vs.destroy(clone)
        await vs.destroy_folder(inner)


async def test_of_many_sessions_contending_for_a_stale_lock_exactly_one_wins(
        sim: SimProcess) -> None:
    path = unique("stale")
    async with client_for(sim) as vs:
        folder = await vs.ensure_folder(path)
        lock = await vs.new_folder(folder, LOCK_NAME)
        now = await vs.server_time()
        dead = Holder("provision", "deaddeaddead", 999999, "gone", math.floor(now) - 200,
                      math.floor(now) - 100)
        await vs.new_folder(lock, dead.record())
        view = await lock_state(vs, path)
        assert view is not None and view.expired

    winners: list[str] = []
    refused: list[str] = []
    cleared: list[str] = []

    async def contender(i: int) -> None:
        async with client_for(sim) as vs:
            held = FleetLock(vs, "stale", path, op="provision", run_id=f"{i:012x}",
                             options=LockOptions(lease_s=30))
            try:
                await held.acquire()
            except LockHeld:
                refused.append(held.run_id)
            else:
                winners.append(held.run_id)
            if held.took_over is not None:
                cleared.append(held.run_id)

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(contender, i)
    assert len(winners) == 1 and len(refused) == 9, (winners, refused)
    assert len(cleared) == 1  # one destroy of the stale lock succeeded; the rest NotFound
    async with client_for(sim) as vs:
        view = await lock_state(vs, path)
        assert view is not None and view.holder is not None
        assert view.holder.run_id == winners[0] and not view.expired
        folder = await vs.find_folder(path)
        assert folder is not None
        assert [n for n, _ in await vs.list_child_folders(folder)] == [LOCK_NAME]
