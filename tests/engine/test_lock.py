"""The fleet lock against the in-memory fake: one holder at a time, stale locks taken
over by exactly one contender, renewals, and a holder that loses the lock stopping.

The fake's ``new_folder`` holds a name while it is being created (as vCenter and
the simulator do) and its clock (``server_time``) can be skewed from the local one.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from typing import Any

import anyio
import pytest

from fleet.engine.lock import (
    CALL_S,
    LOCK_NAME,
    FleetLock,
    Holder,
    LockHeld,
    LockLost,
    LockOptions,
    LockView,
    lock_state,
    process_space,
)
from fleet.engine.operations import destroy, provision, status
from fleet.errors import NotFound, TransientFault
from fleet.vsphere.fake import FakeLatency, FakeVSphere, FaultRule, make_fake
from fleet.vsphere.model import Ref
from tests.engine.conftest import CLONE_ONLY, make_spec
from tests.engine.conftest import options as opts

pytestmark = pytest.mark.anyio

FOLDER = "fleet/lt"


def lock(fake: FakeVSphere, run_id: str, **kw: Any) -> FleetLock:
    return FleetLock(fake, "lt", FOLDER, op=kw.pop("op", "provision"), run_id=run_id,
                     options=LockOptions(**kw))


async def locks_in(fake: FakeVSphere) -> list[tuple[Ref, list[str]]]:
    """Every lock folder in the fleet's folder and the names inside it."""
    folder = await fake.find_folder(FOLDER)
    assert folder is not None
    out = []
    for name, ref in await fake.list_child_folders(folder):
        if name == LOCK_NAME:
            out.append((ref, [n for n, _ in await fake.list_child_folders(ref)]))
    return out


def test_the_record_fits_a_folder_name_and_reads_back() -> None:
    holder = Holder("serve-provision", "4f2a9c1e0b12", 4194304, "h" * 200, 1764150003,
                    1764150063)
    name = holder.record()
    assert len(name) == 80 and not set(name) & set("/\\%")
    back = Holder.parse(name)
    assert back is not None and back.run_id == "4f2a9c1e0b12" and back.until == 1764150063
    assert back.pid == 4194304 and back.host == "h" * (80 - len(name.rsplit(" ", 1)[0]) - 1)
    assert back.space == ""
    spaced = Holder("provision", "4f2a9c1e0b12", 4711, "build-01", 1764150003, 1764150063,
                    "3fa9c2d1")
    assert spaced.record() == "provision 4f2a9c1e0b12 4711@3fa9c2d1 1764150003 1764150063 build-01"
    assert Holder.parse(spaced.record()) == spaced
    assert Holder.parse("a folder somebody made") is None


async def test_a_second_run_is_refused_naming_the_holder_and_since_when() -> None:
    async with make_fake() as fake:
        async with lock(fake, "aaaaaaaaaaaa", op="destroy") as first:
            with pytest.raises(LockHeld) as refused:
                await lock(fake, "bbbbbbbbbbbb").acquire()
            message = str(refused.value)
            assert "destroy run aaaaaaaaaaaa" in message and "pid" in message
            assert " since " in message and "lease until" in message
            assert first.valid
            view = await lock_state(fake, FOLDER)
            assert view is not None and view.holder is not None
            assert view.holder.run_id == "aaaaaaaaaaaa" and not view.expired
        assert await lock_state(fake, FOLDER) is None  # released
        async with lock(fake, "bbbbbbbbbbbb"):
            assert len(await locks_in(fake)) == 1


async def test_a_waiting_run_gets_the_lock_when_it_is_released() -> None:
    async with make_fake() as fake:
        seen: list[LockView] = []
        order: list[str] = []
        taken = anyio.Event()
        waiting = anyio.Event()

        def on_wait(view: LockView) -> None:
            seen.append(view)
            waiting.set()

        async def first() -> None:
            async with lock(fake, "aaaaaaaaaaaa"):
                taken.set()
                with anyio.fail_after(10):
                    await waiting.wait()
                order.append("first done")

        async def second() -> None:
            await taken.wait()
            async with lock(fake, "bbbbbbbbbbbb", wait_s=None, poll_s=0.02, on_wait=on_wait):
                order.append("second")

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            tg.start_soon(second)
        assert order == ["first done", "second"]
        assert seen[0].holder is not None and seen[0].holder.run_id == "aaaaaaaaaaaa"


async def test_of_many_contenders_for_a_free_lock_exactly_one_wins() -> None:
    fake = make_fake(latency=FakeLatency(folder_s=0.01))
    async with fake:
        await fake.ensure_folder(FOLDER)
        winners: list[str] = []
        refused: list[str] = []

        async def contender(i: int) -> None:
            await anyio.sleep(random.uniform(0, 0.02))
            try:
                held = await _acquire(fake, f"{i:012x}")
            except LockHeld:
                refused.append(f"{i:012x}")
            else:
                winners.append(held.run_id)

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(contender, i)
        assert len(winners) == 1 and len(refused) == 29
        [(_, records)] = await locks_in(fake)
        assert len(records) == 1 and records[0].split()[1] == winners[0]


async def _acquire(fake: FakeVSphere, run_id: str) -> FleetLock:
    held = lock(fake, run_id)
    await held.acquire()
    return held


async def test_of_many_contenders_for_a_stale_lock_exactly_one_wins() -> None:
    fake = make_fake(latency=FakeLatency(folder_s=0.005, call_s=0.001))
    async with fake:
        # A holder that died: it took the lock and never renewed nor released it.
        dead = await _acquire(fake, "deaddeaddead")
        assert (await lock_state(fake, FOLDER)).holder.run_id == "deaddeaddead"  # type: ignore[union-attr]
        fake.clock_offset_s += 120  # vCenter's clock passes the lease (no local wait)
        assert (await lock_state(fake, FOLDER)).expired  # type: ignore[union-attr]
        winners: list[FleetLock] = []
        everyone: list[FleetLock] = []
        refused = 0

        async def contender(i: int) -> None:
            nonlocal refused
            await anyio.sleep(random.uniform(0, 0.01))
            held = lock(fake, f"{i:012x}")
            everyone.append(held)
            try:
                await held.acquire()
            except LockHeld:
                refused += 1
            else:
                winners.append(held)

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(contender, i)
        assert len(winners) == 1 and refused == 39
        winner = winners[0]
        # One contender destroyed the stale lock (the others' destroys found it gone);
        # the winner of the create that followed need not be that one.
        [cleared] = [c.took_over for c in everyone if c.took_over is not None]
        assert cleared.holder is not None and cleared.holder.run_id == "deaddeaddead"
        [(ref, records)] = await locks_in(fake)
        assert ref == winner.lock_ref != dead.lock_ref
        assert len(records) == 1 and records[0].split()[1] == winner.run_id


async def test_expiry_is_judged_by_vcenters_clock_not_the_local_one() -> None:
    async with make_fake() as fake:
        fake.clock_offset_s = -7200.0  # vCenter two hours behind this machine
        async with lock(fake, "aaaaaaaaaaaa", lease_s=60):
            with pytest.raises(LockHeld):  # fresh in vCenter's clock, whatever ours says
                await lock(fake, "bbbbbbbbbbbb").acquire()
        fake.clock_offset_s = 7200.0
        async with lock(fake, "aaaaaaaaaaaa", lease_s=60):
            with pytest.raises(LockHeld):
                await lock(fake, "bbbbbbbbbbbb").acquire()


async def test_the_holder_renews_its_lease() -> None:
    async with make_fake() as fake, lock(fake, "aaaaaaaaaaaa", lease_s=2.0) as held:
        first = (await lock_state(fake, FOLDER)).holder  # type: ignore[union-attr]
        with anyio.fail_after(10):
            while True:
                now = (await lock_state(fake, FOLDER)).holder  # type: ignore[union-attr]
                if now is not None and first is not None and now.until > first.until:
                    break
                await anyio.sleep(0.05)
        assert held.valid and held.lost_reason is None
        assert now.since == first.since  # type: ignore[union-attr]
        assert fake.stats.calls["rename_folder"] >= 1


async def test_a_holder_whose_renewals_fail_loses_the_lock_and_stops_dispatching() -> None:
    # Clones take a while; every renewal fails: within 3/4 of the 2 s lease the run
    # must stop handing clones to vCenter.
    fake = make_fake(hosts=4, latency=FakeLatency(clone_s=0.05))
    spec = make_spec(count=2000, limits={"per_host": 2}, **CLONE_ONLY)
    submitted_at_loss: list[int] = []
    async with fake:
        fake.add_fault(FaultRule("rename_folder", TransientFault))
        original = FleetLock._lose

        def lose(self: FleetLock, reason: str) -> None:
            submitted_at_loss.append(fake.stats.calls["start_instant_clone"])
            original(self, reason)

        FleetLock._lose = lose  # type: ignore[method-assign]
        try:
            with pytest.raises(LockLost) as lost:
                await provision(spec, fake, options=opts(),
                                lock=LockOptions(lease_s=2.0))
        finally:
            FleetLock._lose = original  # type: ignore[method-assign]
        await fake.wait_idle()
    assert "no renewal succeeded" in str(lost.value) or "could not renew" in str(lost.value)
    summary = lost.value.result
    assert summary.cancelled and summary.ready < 2000
    # Dispatch stopped at once: nothing was handed to vCenter after the loss.
    assert submitted_at_loss == [fake.stats.calls["start_instant_clone"]]


async def test_a_holder_whose_lock_was_taken_over_loses_it_at_the_next_renewal() -> None:
    fake = make_fake(hosts=4, latency=FakeLatency(clone_s=0.05))
    spec = make_spec(count=2000, limits={"per_host": 2}, **CLONE_ONLY)
    started = anyio.Event()
    count = [0]

    def on_event(event: Any) -> None:
        if event.kind == "job_started":
            count[0] += 1
            if count[0] == 10:
                started.set()

    async with fake:
        async def take_over() -> None:
            with anyio.fail_after(10):
                await started.wait()
            view = await lock_state(fake, FOLDER)
            assert view is not None
            await fake.destroy_folder(view.lock)  # as a contender judging it stale would

        async with anyio.create_task_group() as tg:
            tg.start_soon(take_over)
            with pytest.raises(LockLost) as lost:
                await provision(spec, fake, options=opts(), on_event=on_event,
                                lock=LockOptions(lease_s=2.0))
        await fake.wait_idle()
    assert "record is gone" in str(lost.value)
    assert lost.value.result.ready < 2000


async def test_destroy_takes_the_lock_and_removes_the_fleets_folder() -> None:
    async with make_fake() as fake:
        spec = make_spec(count=5, **CLONE_ONLY)
        summary = await provision(spec, fake, options=opts())
        assert summary.ready == 5
        async with lock(fake, "aaaaaaaaaaaa"):
            with pytest.raises(LockHeld):
                await destroy(spec, fake)
            assert (await status(spec, fake)).lock is not None  # status says who holds it
        removed = await destroy(spec, fake, remove_folder=True)
        assert removed.removed == 5
        assert await fake.find_folder(FOLDER) is None
        # Nothing to destroy: no lock, no folder made.
        again = await destroy(spec, fake, remove_folder=True)
        assert again.removed == 0 and await fake.find_folder(FOLDER) is None


async def test_a_folder_holding_a_vm_is_never_destroyed() -> None:
    async with make_fake() as fake:
        fake.add_vm("stranger", host="esx-01", folder=FOLDER)
        spec = make_spec(count=3, **CLONE_ONLY)
        await provision(spec, fake, options=opts())
        result = await destroy(spec, fake, remove_folder=True)
        assert result.removed == 3 and result.untouched == 1
        assert [vm.name for vm in fake.folder_vms(FOLDER)] == ["stranger"]
        assert await lock_state(fake, FOLDER) is None  # released, folder kept
        folder = await fake.find_folder(FOLDER)
        assert folder is not None
        from fleet.errors import NotEmpty

        with pytest.raises(NotEmpty):
            await fake.destroy_folder(folder)
        with pytest.raises(NotFound):
            await fake.destroy_folder(Ref("Folder", "group-v999999"))


def _gone_pid() -> int:
    """The pid of a process that ended and was reaped: it names no process now."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


async def _plant(fake: FakeVSphere, holder_pid: int, space: str) -> None:
    """A lock whose record says ``holder_pid`` in process space ``space`` holds it for
    another hour."""
    folder = await fake.ensure_folder(FOLDER)
    lock_ref = await fake.new_folder(folder, LOCK_NAME)
    now = await fake.server_time()
    await fake.new_folder(lock_ref, Holder("provision", "deaddeaddead", holder_pid, "elsewhere",
                                           math.floor(now), math.ceil(now + 3600),
                                           space).record())


@pytest.mark.skipif(not process_space(), reason="needs /proc to tell a process space")
async def test_a_holder_whose_process_is_gone_from_this_machine_is_taken_over_at_once() -> None:
    async with make_fake() as fake:
        await _plant(fake, _gone_pid(), process_space())
        held = await _acquire(fake, "bbbbbbbbbbbb")
        assert held.took_over is not None and held.took_over.holder_gone
        assert "its process is gone" in held.took_over.describe()


@pytest.mark.parametrize("alive", [True, False])
async def test_a_holder_alive_or_on_another_machine_is_waited_for(alive: bool) -> None:
    async with make_fake() as fake:
        # Alive here (this test's own parent), or gone but from another process space
        # (another machine, container or boot): only its lease can free the lock.
        await _plant(fake, os.getppid() if alive else _gone_pid(),
                     process_space() if alive else "00000000")
        with pytest.raises(LockHeld) as refused:
            await _acquire(fake, "bbbbbbbbbbbb")
        assert "deaddeaddead" in str(refused.value)
        assert "process is gone" not in str(refused.value)


@pytest.mark.parametrize("step", ["lock", "record"])
async def test_a_run_cancelled_while_its_lock_is_being_made_leaves_no_lock(step: str) -> None:
    """A run cancelled (superseded, deleted, Ctrl-C) while its create of the lock folder,
    or of its record, is on the wire: the create lands in vCenter all the same. The run
    must remove what it made, or every later run waits for a lock nobody holds (a lock
    without a record is judged stale only after 60 s)."""
    async with make_fake() as fake:
        await fake.ensure_folder(FOLDER)
        landed = anyio.Event()
        create = fake.new_folder

        async def reply_in_transit(parent: Ref, name: str) -> Ref:
            made = await create(parent, name)
            if (name == LOCK_NAME) == (step == "lock") and not landed.is_set():
                landed.set()
                await anyio.sleep(0.2)  # landed; the reply is on its way back
            return made

        fake.new_folder = reply_in_transit  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tg.start_soon(lock(fake, "aaaaaaaaaaaa").acquire)
            with anyio.fail_after(10):
                await landed.wait()
            tg.cancel_scope.cancel()
        assert await locks_in(fake) == []
        # The next run takes the lock at once.
        held = await _acquire(fake, "bbbbbbbbbbbb")
        assert held.acquired and held.took_over is None


async def test_a_release_gives_up_at_the_stopping_deadline() -> None:
    """A run stopped by a signal ends within ``cancel_grace_s`` + ``cleanup_s``; its lock
    release, when vCenter is slow to destroy folders, waited up to CALL_S (30 s) more.
    With ``release_by`` it gives up at the deadline and the lock lapses with its lease."""
    async with make_fake() as fake:
        destroy = fake.destroy_folder

        async def slow_destroy(ref: Ref) -> None:
            await anyio.sleep(3600)
            await destroy(ref)

        with anyio.fail_after(CALL_S / 2):  # a release that waited CALL_S fails here
            async with lock(fake, "aaaaaaaaaaaa", lease_s=2.0) as held:
                fake.destroy_folder = slow_destroy  # type: ignore[method-assign]
                held.release_by(anyio.current_time() + 0.1)
        assert len(await locks_in(fake)) == 1  # left to lapse
        fake.destroy_folder = destroy  # type: ignore[method-assign]
        # Without a deadline the release is made (bounded by CALL_S, as before).
        async with lock(fake, "bbbbbbbbbbbb", wait_s=None, poll_s=0.05, lease_s=2.0):
            pass
        assert await locks_in(fake) == []
