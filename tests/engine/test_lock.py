"""The fleet lock against the simulator: one holder at a time, stale locks taken
over by exactly one contender, renewals, and a holder that loses the lock stopping.

The simulator's ``CreateFolder`` holds a name while it is being created (as vCenter
does) and its clock (``CurrentTime``) can be skewed from the local one.
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
    Claim,
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
from fleet.errors import NotFound
from fleet.vsphere.model import Ref, VSphere
from tests.engine.conftest import CLONE_ONLY, make_spec, vcenter
from tests.engine.conftest import options as opts

pytestmark = pytest.mark.anyio

FOLDER = "fleet/lt"


def lock(fake: VSphere, run_id: str, **kw: Any) -> FleetLock:
    return FleetLock(fake, "lt", FOLDER, op=kw.pop("op", "provision"), run_id=run_id,
                     options=LockOptions(**kw))


async def locks_in(fake: VSphere) -> list[tuple[Ref, list[str]]]:
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
    async with vcenter() as (vs, _):
        async with lock(vs, "aaaaaaaaaaaa", op="destroy") as first:
            with pytest.raises(LockHeld) as refused:
                await lock(vs, "bbbbbbbbbbbb").acquire()
            message = str(refused.value)
            assert "destroy run aaaaaaaaaaaa" in message and "pid" in message
            assert " since " in message and "lease until" in message
            assert first.valid
            view = await lock_state(vs, FOLDER)
            assert view is not None and view.holder is not None
            assert view.holder.run_id == "aaaaaaaaaaaa" and not view.expired
        assert await lock_state(vs, FOLDER) is None  # released
        async with lock(vs, "bbbbbbbbbbbb"):
            assert len(await locks_in(vs)) == 1


async def test_a_waiting_run_gets_the_lock_when_it_is_released() -> None:
    async with vcenter() as (vs, _):
        seen: list[LockView] = []
        order: list[str] = []
        taken = anyio.Event()
        waiting = anyio.Event()

        def on_wait(view: LockView) -> None:
            seen.append(view)
            waiting.set()

        async def first() -> None:
            async with lock(vs, "aaaaaaaaaaaa"):
                taken.set()
                with anyio.fail_after(10):
                    await waiting.wait()
                order.append("first done")

        async def second() -> None:
            await taken.wait()
            async with lock(vs, "bbbbbbbbbbbb", wait_s=None, poll_s=0.02, on_wait=on_wait):
                order.append("second")

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            tg.start_soon(second)
        assert order == ["first done", "second"]
        assert seen[0].holder is not None and seen[0].holder.run_id == "aaaaaaaaaaaa"


async def test_of_many_contenders_for_a_free_lock_exactly_one_wins() -> None:
    async with vcenter(latency={"folder_s": 0.01}) as (vs, _):
        await vs.ensure_folder(FOLDER)
        winners: list[str] = []
        refused: list[str] = []

        async def contender(i: int) -> None:
            await anyio.sleep(random.uniform(0, 0.02))
            try:
                held = await _acquire(vs, f"{i:012x}")
            except LockHeld:
                refused.append(f"{i:012x}")
            else:
                winners.append(held.run_id)

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(contender, i)
        assert len(winners) == 1 and len(refused) == 29
        [(_, records)] = await locks_in(vs)
        assert len(records) == 1 and records[0].split()[1] == winners[0]
        folder = await vs.find_folder(FOLDER)
        assert folder is not None  # and every loser removed its claim
        assert [n for n, _ in await vs.list_child_folders(folder)] == [LOCK_NAME]


async def _acquire(fake: VSphere, run_id: str) -> FleetLock:
    held = lock(fake, run_id)
    await held.acquire()
    return held


async def test_of_many_contenders_for_a_stale_lock_exactly_one_wins() -> None:
    async with vcenter(latency={"folder_s": 0.005}) as (vs, vc):
        # A holder that died: it took the lock and never renewed nor released it.
        dead = await _acquire(vs, "deaddeaddead")
        assert (await lock_state(vs, FOLDER)).holder.run_id == "deaddeaddead"  # type: ignore[union-attr]
        vc.clock_offset_s += 120  # vCenter's clock passes the lease (no local wait)
        assert (await lock_state(vs, FOLDER)).expired  # type: ignore[union-attr]
        winners: list[FleetLock] = []
        everyone: list[FleetLock] = []
        refused = 0

        async def contender(i: int) -> None:
            nonlocal refused
            await anyio.sleep(random.uniform(0, 0.01))
            held = lock(vs, f"{i:012x}")
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
        [(ref, records)] = await locks_in(vs)
        assert ref == winner.lock_ref != dead.lock_ref
        assert len(records) == 1 and records[0].split()[1] == winner.run_id


async def test_expiry_is_judged_by_vcenters_clock_not_the_local_one() -> None:
    async with vcenter() as (vs, vc):
        vc.clock_offset_s = -7200.0  # vCenter two hours behind this machine
        async with lock(vs, "aaaaaaaaaaaa", lease_s=60):
            with pytest.raises(LockHeld):  # fresh in vCenter's clock, whatever ours says
                await lock(vs, "bbbbbbbbbbbb").acquire()
        vc.clock_offset_s = 7200.0
        async with lock(vs, "aaaaaaaaaaaa", lease_s=60):
            with pytest.raises(LockHeld):
                await lock(vs, "bbbbbbbbbbbb").acquire()


async def test_the_holder_renews_its_lease() -> None:
    async with vcenter() as (vs, vc), lock(vs, "aaaaaaaaaaaa", lease_s=2.0) as held:
        first = (await lock_state(vs, FOLDER)).holder  # type: ignore[union-attr]
        with anyio.fail_after(10):
            while True:
                now = (await lock_state(vs, FOLDER)).holder  # type: ignore[union-attr]
                if now is not None and first is not None and now.until > first.until:
                    break
                await anyio.sleep(0.05)
        assert held.valid and held.lost_reason is None
        assert now.since == first.since  # type: ignore[union-attr]
        assert vc.calls["Rename_Task"] >= 1


async def test_a_holder_whose_renewals_fail_loses_the_lock_and_stops_dispatching() -> None:
    # Clones take a while; every renewal fails: within 3/4 of the 2 s lease the run
    # must stop handing clones to vCenter.
    spec = make_spec(count=2000, limits={"per_host": 2}, **CLONE_ONLY)
    submitted_at_loss: list[int] = []
    async with vcenter(hosts=4, latency={"instant_clone_s": 0.05}) as (vs, vc):
        # every renewal (a rename of the lock's record, named "provision ...") fails:
        # vCenter's SystemError (the rename that takes the lock is not a renewal)
        vc.add_fault(method="Rename_Task", object="provision *", fault="SystemError")
        original = FleetLock._lose
        sent = vs.session.stats.calls  # clone submits the client has sent

        def lose(self: FleetLock, reason: str) -> None:
            submitted_at_loss.append(sent["InstantClone_Task"])
            original(self, reason)

        FleetLock._lose = lose  # type: ignore[method-assign]
        try:
            with pytest.raises(LockLost) as lost:
                await provision(spec, vs, options=opts(),
                                lock=LockOptions(lease_s=2.0))
        finally:
            FleetLock._lose = original  # type: ignore[method-assign]
        await vc.wait_idle()
    assert "no renewal succeeded" in str(lost.value) or "could not renew" in str(lost.value)
    summary = lost.value.result
    assert summary.cancelled and summary.ready < 2000
    # Dispatch stopped at once: nothing was handed to vCenter after the loss.
    assert submitted_at_loss == [sent["InstantClone_Task"]]


async def test_a_holder_whose_lock_was_taken_over_loses_it_at_the_next_renewal() -> None:
    spec = make_spec(count=2000, limits={"per_host": 2}, **CLONE_ONLY)
    started = anyio.Event()
    count = [0]

    def on_event(event: Any) -> None:
        if event.kind == "job_started":
            count[0] += 1
            if count[0] == 10:
                started.set()

    async with vcenter(hosts=4, latency={"instant_clone_s": 0.05}) as (vs, vc):
        async def take_over() -> None:
            with anyio.fail_after(10):
                await started.wait()
            view = await lock_state(vs, FOLDER)
            assert view is not None
            await vs.destroy_folder(view.lock)  # as a contender judging it stale would

        async with anyio.create_task_group() as tg:
            tg.start_soon(take_over)
            # An 8 s lease is renewed every 2 s, each renewal given 6 s: the take-over
            # is found at the next renewal, well before the run of 2,000 ends. With
            # 2 s (renewals given 1.5 s) a loaded machine let the run's own renewal
            # time out first, which loses the lock for another reason.
            with pytest.raises(LockLost) as lost:
                await provision(spec, vs, options=opts(), on_event=on_event,
                                lock=LockOptions(lease_s=8.0))
        await vc.wait_idle()
    assert "record is gone" in str(lost.value)
    assert lost.value.result.ready < 2000


async def test_destroy_takes_the_lock_and_removes_the_fleets_folder() -> None:
    async with vcenter() as (vs, _):
        spec = make_spec(count=5, **CLONE_ONLY)
        summary = await provision(spec, vs, options=opts())
        assert summary.ready == 5
        async with lock(vs, "aaaaaaaaaaaa"):
            with pytest.raises(LockHeld):
                await destroy(spec, vs)
            assert (await status(spec, vs)).lock is not None  # status says who holds it
        removed = await destroy(spec, vs, remove_folder=True)
        assert removed.removed == 5
        assert await vs.find_folder(FOLDER) is None
        # Nothing to destroy: no lock, no folder made.
        again = await destroy(spec, vs, remove_folder=True)
        assert again.removed == 0 and await vs.find_folder(FOLDER) is None


async def test_a_folder_holding_a_vm_is_never_destroyed() -> None:
    async with vcenter() as (vs, vc):
        vc.add_vm("stranger", host="esx-01", folder=FOLDER)
        spec = make_spec(count=3, **CLONE_ONLY)
        await provision(spec, vs, options=opts())
        result = await destroy(spec, vs, remove_folder=True)
        assert result.removed == 3 and result.untouched == 1
        assert [vm.name for vm in vc.folder_vms(FOLDER)] == ["stranger"]
        assert await lock_state(vs, FOLDER) is None  # released, folder kept
        folder = await vs.find_folder(FOLDER)
        assert folder is not None
        from fleet.errors import NotEmpty

        with pytest.raises(NotEmpty):
            await vs.destroy_folder(folder)
        with pytest.raises(NotFound):
            await vs.destroy_folder(Ref("Folder", "group-v999999"))


def _gone_pid() -> int:
    """The pid of a process that ended and was reaped: it names no process now."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


async def _plant(fake: VSphere, holder_pid: int, space: str) -> None:
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
    async with vcenter() as (vs, _):
        await _plant(vs, _gone_pid(), process_space())
        held = await _acquire(vs, "bbbbbbbbbbbb")
        assert held.took_over is not None and held.took_over.holder_gone
        assert "its process is gone" in held.took_over.describe()


@pytest.mark.parametrize("alive", [True, False])
async def test_a_holder_alive_or_on_another_machine_is_waited_for(alive: bool) -> None:
    async with vcenter() as (vs, _):
        # Alive here (this test's own parent), or gone but from another process space
        # (another machine, container or boot): only its lease can free the lock.
        await _plant(vs, os.getppid() if alive else _gone_pid(),
                     process_space() if alive else "00000000")
        with pytest.raises(LockHeld) as refused:
            await _acquire(vs, "bbbbbbbbbbbb")
        assert "deaddeaddead" in str(refused.value)
        assert "process is gone" not in str(refused.value)


@pytest.mark.parametrize("step", ["claim", "record", "rename"])
async def test_a_run_cancelled_while_its_lock_is_being_made_leaves_no_lock(step: str) -> None:
    """A run cancelled (superseded, deleted, Ctrl-C) while its create of its claim, or of
    its record, or the rename of its claim to the lock, is on the wire: the call lands
    in vCenter all the same. The run must remove what it made: a lock nobody holds
    holds every later run off, and a claim is litter in the fleet's folder."""
    async with vcenter() as (vs, _):
        folder = await vs.ensure_folder(FOLDER)
        landed = anyio.Event()
        create, rename = vs.new_folder, vs.rename_folder

        async def in_transit() -> None:
            if not landed.is_set():
                landed.set()
                await anyio.sleep(0.2)  # landed; the reply is on its way back

        async def create_in_transit(parent: Ref, name: str) -> Ref:
            made = await create(parent, name)
            if (parent == folder) == (step == "claim"):
                await in_transit()
            return made

        async def rename_in_transit(ref: Ref, name: str) -> None:
            await rename(ref, name)
            if step == "rename" and name == LOCK_NAME:
                await in_transit()

        vs.new_folder = create_in_transit  # type: ignore[method-assign]
        vs.rename_folder = rename_in_transit  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tg.start_soon(lock(vs, "aaaaaaaaaaaa").acquire)
            with anyio.fail_after(10):
                await landed.wait()
            tg.cancel_scope.cancel()
        assert await vs.list_child_folders(folder) == []  # no lock, no claim
        # The next run takes the lock at once.
        held = await _acquire(vs, "bbbbbbbbbbbb")
        assert held.acquired and held.took_over is None


async def test_a_release_gives_up_at_the_stopping_deadline(
        caplog: pytest.LogCaptureFixture) -> None:
    """A run stopped by a signal ends within ``cancel_grace_s`` + ``cleanup_s``; its lock
    release, when vCenter is slow to destroy folders, waited up to CALL_S (30 s) more.
    With ``release_by`` it gives up at the deadline and the lock lapses with its lease."""
    async with vcenter() as (vs, vc):
        # The release is shielded from cancellation, so a deadline cannot cut it short:
        # a release that waited CALL_S shows as this scope's deadline having passed.
        with anyio.move_on_after(CALL_S / 2) as guard:
            async with lock(vs, "aaaaaaaaaaaa", lease_s=2.0) as held:
                # vCenter sits on the lock folder's Destroy_Task for an hour before doing it.
                slow = vc.add_fault(method="Destroy_Task", object=LOCK_NAME, fault="slow",
                                    phase="call", delay_s=3600)
                held.release_by(anyio.current_time() + 0.1)
        assert not guard.cancel_called
        assert slow.fired == 1  # the release was made and it was slow
        [gave_up] = [r for r in caplog.records if "gave up removing" in r.getMessage()]
        assert gave_up.args is not None and gave_up.args[-1] < CALL_S  # type: ignore[index]
        assert len(await locks_in(vs)) == 1  # left to lapse
        vc.remove_fault(slow)
        # Without a deadline the release is made (bounded by CALL_S, as before).
        async with lock(vs, "bbbbbbbbbbbb", wait_s=None, poll_s=0.05, lease_s=2.0):
            pass
        assert await locks_in(vs) == []


async def _plant_claim(vs: VSphere, *, pid: int, space: str, until_in_s: float,
                       run_id: str) -> str:
    """A claim of run ``run_id`` (pid ``pid`` in process space ``space``) holding its
    record, ending ``until_in_s`` from vCenter's now: a run taking the lock, or killed
    while it did."""
    folder = await vs.ensure_folder(FOLDER)
    now = await vs.server_time()
    name = Claim("0a0a", run_id, pid, space, math.ceil(now + until_in_s), "elsewhere").name()
    claim = await vs.new_folder(folder, name)
    await vs.new_folder(claim, Holder("provision", run_id, pid, "elsewhere", math.floor(now),
                                      math.ceil(now + 600), space).record())
    return name


async def test_claims_are_nobodys_lock_and_stale_ones_are_removed() -> None:
    """Claims (locks in the making) hold nobody off and show in no status; a run that
    takes the lock removes those it can prove stale (ended in vCenter's clock, or made
    by a process gone from this machine), never a live one, and nothing else."""
    async with vcenter() as (vs, vc):
        here = process_space()
        live = [await _plant_claim(vs, pid=os.getppid(), space=here, until_in_s=3600,
                                   run_id="1111111111"),  # alive here (or pid only)
                await _plant_claim(vs, pid=os.getpid(), space=here, until_in_s=3600,
                                   run_id="2222222222"),  # a run in this very process
                await _plant_claim(vs, pid=_gone_pid(), space="00000000",
                                   until_in_s=3600, run_id="3333333333")]  # elsewhere
        ended = await _plant_claim(vs, pid=os.getpid(), space=here, until_in_s=-1,
                                   run_id="4444444444")
        dead = await _plant_claim(vs, pid=_gone_pid(), space=here, until_in_s=3600,
                                  run_id="5555555555")
        folder = await vs.find_folder(FOLDER)
        assert folder is not None
        stranger = await vs.new_folder(folder, "fleet-claim of somebody else")
        assert await lock_state(vs, FOLDER) is None  # status and plan: nobody holds it
        async with lock(vs, "bbbbbbbbbbbb") as held:
            assert held.took_over is None
            left = {n for n, _ in await vs.list_child_folders(folder)}
            gone = {ended} | ({dead} if here else set())  # no /proc: only the end tells
            assert left == {LOCK_NAME, "fleet-claim of somebody else", *live,
                            *({dead} - gone)}
        # Once vCenter's clock passes their end, every claim is stale: the next run
        # removes them all (and the folder that is not a claim stays).
        vc.clock_offset_s += 7200
        async with lock(vs, "cccccccccccc"):
            left = {n for n, _ in await vs.list_child_folders(folder)}
            assert left == {LOCK_NAME, "fleet-claim of somebody else"}
        assert await vs.list_child_folders(folder) == [("fleet-claim of somebody else",
                                                        stranger)]


@pytest.mark.parametrize("fault", ["http:lost_reply", "DuplicateName"])
async def test_a_rename_that_landed_is_the_lock_whatever_its_reply_said(fault: str) -> None:
    """The rename that takes the lock landed, but its reply was lost (the client asks
    again: the same name again), or it answered DuplicateName (as vCenter may to a
    repeat of a rename that landed): the run looks before deciding, and keeps the
    lock it made rather than destroying it and taking it anew."""
    async with vcenter() as (vs, vc):
        await vs.ensure_folder(FOLDER)
        rule = vc.add_fault(method="Rename_Task", object=LOCK_NAME, fault=fault,
                            max_count=1, **({} if fault.startswith("http:") else
                                            {"phase": "after"}))
        async with lock(vs, "aaaaaaaaaaaa") as held:
            assert rule.fired == 1
            view = await lock_state(vs, FOLDER)
            assert view is not None and view.lock == held.lock_ref
            assert view.holder == held.holder
        assert vc.calls["Destroy_Task"] == 1  # the release: nothing made twice
        assert await lock_state(vs, FOLDER) is None


async def test_destroy_removes_the_fleets_folder_with_claims_left_in_it() -> None:
    """A claim left by a run killed while taking the lock (on another machine, and not
    yet ended: nobody can tell it is stale) does not keep a destroyed fleet's folder."""
    async with vcenter() as (vs, _):
        spec = make_spec(count=3, **CLONE_ONLY)
        await provision(spec, vs, options=opts())
        await _plant_claim(vs, pid=_gone_pid(), space="00000000", until_in_s=3600,
                           run_id="3333333333")
        removed = await destroy(spec, vs, remove_folder=True)
        assert removed.removed == 3
        assert await vs.find_folder(FOLDER) is None
