"""The client's folder calls and the fleet lock against the simulator: many sessions
contending for one stale lock, exactly one of them wins (docs/locking.md)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import anyio
import pytest

from fleet.engine.lock import (
    LOCK_NAME,
    FleetLock,
    Holder,
    LockHeld,
    LockOptions,
    lock_state,
    process_space,
)
from fleet.errors import DuplicateName, NotEmpty, NotFound
from fleet.vsphere.model import CloneRequest
from tests.simproc import PASSWORD, USER, SimProcess
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


# A run that takes the lock, killed (SIGKILL: no cleanup) right after the die_after-th
# change it made in vCenter landed, or once it holds the lock. FLEET_TEST_SPACE, if
# set, is the process space its records carry (another machine's).
_DYING_RUN = """
import os, signal, sys
import anyio
from fleet.engine import lock
from fleet.vsphere.client import VSphereClient

url, ca, user, path, die_after = sys.argv[1:6]
if os.environ.get("FLEET_TEST_SPACE"):
    lock.process_space = lambda: os.environ["FLEET_TEST_SPACE"]

async def main() -> None:
    async with VSphereClient(url, user, os.environ["FLEET_TEST_PW"], ca_file=ca) as vs:
        made = 0

        def dying(call):
            async def wrapped(*args, **kw):
                nonlocal made
                result = await call(*args, **kw)
                made += 1
                if made == int(die_after):
                    os.kill(os.getpid(), signal.SIGKILL)
                return result
            return wrapped

        vs.new_folder = dying(vs.new_folder)
        vs.rename_folder = dying(vs.rename_folder)
        await lock.FleetLock(vs, "crash", path, op="provision", run_id="deaddeaddead",
                             options=lock.LockOptions(lease_s=600)).acquire()
        os.kill(os.getpid(), signal.SIGKILL)

anyio.run(main)
"""


def _kill_while_taking(sim: SimProcess, path: str, die_after: int, space: str = "") -> None:
    env = dict(os.environ, FLEET_TEST_PW=PASSWORD, FLEET_TEST_SPACE=space)
    child = subprocess.run([sys.executable, "-c", _DYING_RUN, sim.url, str(sim.cert_path), USER,
                            path, str(die_after)], env=env, capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]


@pytest.mark.skipif(not process_space(), reason="needs /proc to tell a process space")
@pytest.mark.parametrize("die_after", [1, 2, 3])
async def test_a_run_killed_while_taking_the_lock_never_holds_the_next_one_off(
        sim: SimProcess, die_after: int) -> None:
    """A run killed at any point of taking the lock (after its first, second or third
    change in vCenter, or once it holds it): the next run on this machine takes the
    lock at once, not after RECORDLESS_S (60 s), and nothing the dead run left stays."""
    path = unique("killed")
    async with client_for(sim) as vs:
        folder = await vs.ensure_folder(path)
    _kill_while_taking(sim, path, die_after)
    async with client_for(sim) as vs:
        held = FleetLock(vs, "crash", path, op="provision", run_id="bbbbbbbbbbbb")
        await held.acquire()  # refuses at once (LockHeld) if anything holds it off
        assert held.acquired
        assert [n for n, _ in await vs.list_child_folders(folder)] == [LOCK_NAME]
        await held.release()
        assert await vs.list_child_folders(folder) == []


async def test_a_run_killed_while_taking_the_lock_on_another_machine_holds_nothing(
        sim: SimProcess) -> None:
    """The same, by a run on another machine (its process cannot be checked here),
    killed right after its first change: the next run takes the lock at once all the
    same, and leaves what the dead run made alone until it can tell it is stale."""
    path = unique("killed-far")
    async with client_for(sim) as vs:
        folder = await vs.ensure_folder(path)
    _kill_while_taking(sim, path, 1, space="00000000")
    async with client_for(sim) as vs:
        held = FleetLock(vs, "crash", path, op="provision", run_id="bbbbbbbbbbbb")
        await held.acquire()
        assert held.acquired
        left = [n for n, _ in await vs.list_child_folders(folder) if n != LOCK_NAME]
        assert len(left) == 1 and "deaddeaddead" in left[0], left
        await held.release()
