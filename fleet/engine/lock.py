"""The fleet lock: runs on one fleet exclude each other through a lease kept in vCenter.

The design, and why, is in docs/locking.md. In short:

- The lock of a fleet is a folder named :data:`LOCK_NAME` in the fleet's folder.
  The one folder inside it is the *record*: its name says who holds the lock
  and until when (:class:`Holder`), e.g.
  ``provision 4f2a9c1e0b12 4711 1764150003 1764150063 build-01``. The holder
  renews by renaming it (``Rename_Task``) every quarter of its lease.
- Taking it is one step: a run makes a *claim*, a folder of its own beside the
  lock named after it (:class:`Claim`), puts its record in it, and renames the
  claim to :data:`LOCK_NAME`. vCenter keeps names unique in a folder, so of two
  runs renaming one gets ``DuplicateName``; and the lock never shows without its
  record, so a run killed while taking it holds nobody off. A claim is renamed
  within three quarters of :data:`CLAIM_S` or not at all; a claim past its end,
  or whose maker provably died, is litter any run removes.
- Expiries are in vCenter's clock (``ServiceInstance.CurrentTime``): every
  holder writes and every contender reads the same clock, so machines' clocks
  need not agree. A holder measures its own lease with its monotonic clock,
  from the moment it *sent* the clock read of its last renewal.
- A holder that has not renewed within three quarters of its lease, or whose
  renewal finds the record gone (taken over), has lost the lock: ``on_lost``
  runs once, and the caller stops dispatching at once.
- A stale lock (vCenter's now past its expiry, a holder that provably died: it
  ran in this process space and its pid is gone, or, from an older fleet that
  made the lock before its record, no record for :data:`RECORDLESS_S`) is
  destroyed by its managed object id, which vCenter never reuses, and taken
  anew: of two contenders one gets ``NotFound`` from the destroy or
  ``DuplicateName`` from the rename, never both the lock.
- Release destroys the lock folder by id, and only if it holds folders only.

:class:`FleetLock` takes (``acquire``), keeps and releases the lock; it is an async
context manager. :func:`read_lock` is what ``plan`` and ``status`` show.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import replace
from types import TracebackType

import anyio
from anyio.abc import TaskGroup

from fleet.engine.lock_records import (
    CALL_S,
    CLAIM_PREFIX,
    CLAIM_S,
    DEFAULT_LEASE_S,
    HOST_UNSAFE,
    INVISIBLE,
    LOCK_NAME,
    MAX_LEASE_S,
    MAX_NAME,
    MIN_LEASE_S,
    OP_NAME,
    RECORDLESS_S,
    Claim,
    Holder,
    LockHeld,
    LockLost,
    LockOptions,
    LockView,
    Survey,
    is_claim,
    lock_state,
    process_space,
    read_lock,
    survey,
    this_host,
)
from fleet.errors import (
    DuplicateName,
    FleetError,
    NotEmpty,
    NotFound,
    RequestTimeout,
    TransientVSphereError,
    VSphereError,
)
from fleet.vsphere.model import Ref, VSphere

log = logging.getLogger("fleet.lock")


class FleetLock:
    """One run's hold on its fleet's lock; see the module docstring.

    ``async with FleetLock(...)`` takes the lock (as ``options`` say: refuse or
    wait), renews it in the background, and releases it on the way out.
    ``acquire`` may be called first on its own (it is cancellable). Callbacks
    given to :meth:`on_lost` run once, as soon as the lock is lost."""

    def __init__(self, vs: VSphere, fleet: str, folder_path: str, *, op: str, run_id: str,
                 options: LockOptions | None = None, create_folder: bool = True,
                 clock: Callable[[], float] = anyio.current_time) -> None:
        opts = options or LockOptions()
        op = opts.op or op
        if not OP_NAME.match(op):
            raise ValueError(f"lock op {op!r}")
        if not MIN_LEASE_S <= opts.lease_s <= MAX_LEASE_S:
            raise ValueError(f"lease {opts.lease_s} s")
        self.vs = vs
        self.fleet = fleet
        self.folder_path = folder_path
        self.op = op
        self.run_id = HOST_UNSAFE.sub("-", run_id)[:16] or os.urandom(6).hex()
        self.options = opts
        self.create_folder = create_folder
        self.clock = clock
        self.folder: Ref | None = None
        self.holder: Holder | None = None
        self.lost_reason: str | None = None
        self.took_over: LockView | None = None  # the stale lock this run replaced
        self._lock: Ref | None = None
        self._record: Ref | None = None
        self._valid_until = -math.inf  # local monotonic time
        self._lost_callbacks: list[Callable[[str], None]] = []
        self._recordless: dict[Ref, float] = {}
        self._cleared: set[Ref] = set()  # stale claims this run tried to remove
        self._tg: TaskGroup | None = None
        self._keeper: anyio.CancelScope | None = None
        self._keeping = False
        self._released = False
        self._release_by: float | None = None

    # -- state -------------------------------------------------------------------
    @property
    def acquired(self) -> bool:
        return self._record is not None

    @property
    def lock_ref(self) -> Ref | None:
        """The lock folder this run made (its id is never reused)."""
        return self._lock

    @property
    def valid(self) -> bool:
        """Held, and within three quarters of the last lease written."""
        return self.acquired and self.lost_reason is None and self.clock() < self._valid_until

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` when the lock is lost (at once if it already is)."""
        if self.lost_reason is not None:
            callback(self.lost_reason)
        else:
            self._lost_callbacks.append(callback)

    def _lose(self, reason: str) -> None:
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        log.warning("fleet %s: lost the lock: %s", self.fleet, reason)
        for callback in self._lost_callbacks:
            try:
                callback(reason)
            except Exception:  # a callback must not keep the others from running
                log.exception("fleet lock %s: on_lost callback failed", self.folder_path)

    # -- taking it ---------------------------------------------------------------
    async def _resolve_folder(self) -> Ref:
        with anyio.fail_after(CALL_S):
            if self.create_folder:
                self.folder = await self.vs.ensure_folder(self.folder_path)
            else:
                found = await self.vs.find_folder(self.folder_path)
                if found is None:
                    raise NotFound(f"folder {self.folder_path} does not exist",
                                   method="find_folder")
                self.folder = found
        return self.folder

    async def acquire(self, wait_s: float | None = None,
                      on_wait: Callable[[LockView], None] | None = None) -> None:
        """Take the lock, waiting up to ``wait_s`` (None: the options' wait; inf: for
        ever). LockHeld names the holder if it is still held then."""
        if self.acquired:
            return
        wait = self.options.wait_s if wait_s is None else wait_s
        notify = on_wait or self.options.on_wait
        deadline = math.inf if wait is None else self.clock() + wait
        invisible_since: float | None = None
        while True:
            try:
                view = await self._attempt()
            except TimeoutError:
                raise RequestTimeout(f"vCenter did not answer within {CALL_S:g} s while "
                                     f"taking the lock of fleet {self.fleet}") from None
            if view is None:
                if self.acquired:
                    return
                continue  # a stale lock was cleared (by us or a rival): try again at once
            if view is INVISIBLE:
                # The name is taken but no lock folder is there: a claim is being
                # renamed to it right now, or it just went; or something else has it.
                invisible_since = invisible_since or self.clock()
                if self.clock() - invisible_since > CLAIM_S:
                    raise FleetError(f"the name {LOCK_NAME!r} in folder {self.folder_path} "
                                     f"(fleet {self.fleet}) is taken by something that is "
                                     "not fleet's lock; rename or remove it")
                await anyio.sleep(random.uniform(0.01, 0.1))
                continue
            invisible_since = None
            if self.clock() >= deadline:
                raise LockHeld(self._held_message(view, waited=wait not in (None, 0)), view)
            if notify is not None:
                notify(view)
            pause = self.options.poll_s * random.uniform(0.5, 1.0)
            if view.holder is not None and not view.expired:
                pause = min(pause, max(0.05, view.holder.until - view.now))
            await anyio.sleep(max(0.0, min(pause, deadline - self.clock())))

    def _held_message(self, view: LockView, *, waited: bool) -> str:
        gave_up = "; gave up waiting" if waited else ""
        return f"fleet {self.fleet} is locked by {view.describe()}{gave_up}"

    async def _attempt(self) -> LockView | None:
        """One try. None: taken (``acquired``), or nothing to wait for (try again at
        once); otherwise the lock as it stands, held by another run."""
        folder = self.folder or await self._resolve_folder()
        t0 = self.clock()
        try:
            seen = await survey(self.vs, folder)
        except NotFound:
            self.folder = None  # the fleet's folder went away: find (or make) it again
            return None
        if seen.view is not None:
            outcome = await self._judge(seen.view)
        else:
            outcome = await self._claim(folder, seen.now, t0)
        await self._clear_claims(seen)
        return outcome

    async def _claim(self, folder: Ref, now: float, t0: float) -> LockView | None:
        """Take the free lock in one step: a claim of our own holding our record, renamed
        to LOCK_NAME. ``now`` is vCenter's clock as read from local time ``t0``."""
        lease = self.options.lease_s
        holder = Holder(self.op, self.run_id, os.getpid(), this_host(), math.floor(now),
                        math.ceil(now + lease), process_space())
        claim = Claim(os.urandom(2).hex(), self.run_id, os.getpid(), process_space(),
                      math.ceil(now + CLAIM_S), this_host())
        # After this (local clock, with a quarter's margin for clock rates) vCenter's clock
        # may be past the claim's end and a contender may remove it: never rename it then.
        by = t0 + 0.75 * CLAIM_S
        made: Ref | None = None
        try:
            try:
                # Shielded as a create of the lock was: once sent, it lands whether or not
                # this run waits for its reply. A claim holds nobody off, but a cancel that
                # waits for the reply (bounded) can remove it rather than leave litter.
                with anyio.CancelScope(shield=True), \
                        anyio.fail_after(max(0.0, min(CALL_S, by - self.clock()))):
                    made = await self._create(folder, claim.name())
                if made is None:
                    return None
                with anyio.fail_after(max(0.0, by - self.clock())):
                    record = await self._create(made, holder.record())
                    if record is None:
                        await self._destroy_quietly(made)
                        return None
                    won = await self._rename(folder, made)
            except NotFound:
                # The fleet's folder went, or our claim was judged stale and removed (this
                # run was too slow): try again.
                return None
            except TimeoutError:
                raise RequestTimeout(
                    f"vCenter did not make the lock of fleet {self.fleet} within "
                    f"{0.75 * CLAIM_S:g} s (three quarters of a claim's {CLAIM_S:g} s)") from None
            if won:
                self._lock, self._record, self.holder = made, record, holder
                self._valid_until = t0 + 0.75 * lease
                log.info("fleet %s: lock taken: %s", self.fleet, holder.record())
                return None
            # Refused: someone holds it, or is renaming a claim to it right now.
            await self._destroy_quietly(made)
            made = None
            after = await survey(self.vs, folder)
            return INVISIBLE if after.view is None else await self._judge(after.view)
        except BaseException:
            if made is not None and not self.acquired:
                await self._destroy_quietly(made)
            raise

    async def _create(self, parent: Ref, name: str) -> Ref | None:
        """Make folder ``name`` (a claim or a record: a name no other run uses) in
        ``parent``; None if another claim has the name (a clash of tags: draw again).
        CreateFolder is not repeated blindly after a lost reply: it may have landed, and
        the name is ours alone, so look for it first."""
        lost = False
        for attempt in range(3):
            try:
                return await self.vs.new_folder(parent, name)
            except DuplicateName:
                if not lost:
                    return None
            except TransientVSphereError:
                if attempt == 2:
                    raise
                lost = True
            found = [ref for n, ref in await self.vs.list_child_folders(parent) if n == name]
            if found:
                return found[0]
        return None

    async def _rename(self, folder: Ref, claim: Ref) -> bool:
        """Rename our claim to LOCK_NAME: True if it is the lock now, False if vCenter
        refused (the name is taken). The client repeats a rename whose reply was lost;
        a repeat of one that landed may itself be refused: so look before deciding."""
        try:
            await self.vs.rename_folder(claim, LOCK_NAME)
            return True
        except NotFound:
            raise
        except VSphereError as exc:
            if (LOCK_NAME, claim) in await self.vs.list_child_folders(folder):
                return True
            if isinstance(exc, DuplicateName):
                return False
            raise

    async def _judge(self, view: LockView) -> LockView | None:
        """The lock another run made: ``view`` if it holds, else None once it is gone."""
        if view.holder is None:
            first = self._recordless.setdefault(view.lock, self.clock())
            if self.clock() - first < RECORDLESS_S:
                return view
        elif not view.expired and not view.holder_gone:
            return view
        # Stale. Destroy it by its id: of several contenders doing so, one succeeds and
        # the others get NotFound; then each tries to take it anew, and one of those wins.
        try:
            with anyio.fail_after(CALL_S):
                await self.vs.destroy_folder(view.lock)
        except NotFound:
            return None
        except NotEmpty as exc:
            raise FleetError(f"the stale lock of {self.folder_path} holds more than a "
                             f"record ({exc}); remove it by hand") from exc
        self.took_over = view
        log.warning("fleet %s: took its stale lock over from %s", self.fleet, view.describe())
        return None

    async def _clear_claims(self, seen: Survey) -> None:
        """Remove the claims of runs that died or gave up while taking the lock. They
        hold nobody off; this only keeps the fleet's folder tidy. A live claim is never
        removed: its maker renames it before its end or not at all, so one seen past its
        end (in vCenter's clock, read before it was seen) is nobody's lock, now or later."""
        for claim, ref in seen.claims:
            if ref in self._cleared or not claim.stale(seen.now):
                continue
            self._cleared.add(ref)  # tried once: a claim that cannot go is not retried
            try:
                with anyio.fail_after(CALL_S):
                    await self.vs.destroy_folder(ref)
            except NotFound:
                continue
            except (VSphereError, TimeoutError) as exc:
                log.warning("fleet %s: could not remove the stale claim %r: %s", self.fleet,
                            claim.name(), exc or "no answer")
                continue
            log.info("fleet %s: removed the stale claim of run %s (pid %d on %s)", self.fleet,
                     claim.run_id, claim.pid, claim.host)

    async def _destroy_quietly(self, ref: Ref, bound_s: float = CALL_S) -> bool:
        """Destroy a lock folder of ours; False (and a warning) if it may still be there."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(bound_s):
            try:
                await self.vs.destroy_folder(ref)
            except NotFound:
                pass
            except VSphereError as exc:
                log.warning("fleet lock %s: could not remove %s: %s (its lease will "
                            "expire)", self.folder_path, ref.id, exc)
                return False
            return True
        log.warning("fleet lock %s: gave up removing %s after %g s (its lease will expire)",
                    self.folder_path, ref.id, bound_s)
        return False

    # -- keeping it --------------------------------------------------------------
    async def _keep(self) -> None:
        with anyio.CancelScope() as self._keeper:
            if self._keeping:
                await self._renew_loop()

    async def _renew_loop(self) -> None:
        """Renew every quarter lease; lose the lock when a renewal finds it gone, or
        none succeeds within three quarters of the last lease."""
        lease = self.options.lease_s
        next_at = self._valid_until - 0.5 * lease  # a quarter lease after the last send
        while self.lost_reason is None:
            await anyio.sleep(max(0.0, next_at - self.clock()))
            t0 = self.clock()
            assert self.holder is not None and self._record is not None
            try:
                with anyio.fail_after(max(0.0, self._valid_until - t0)):
                    now = await self.vs.server_time()
                    renewed = replace(self.holder, until=math.ceil(now + lease))
                    try:
                        await self.vs.rename_folder(self._record, renewed.record())
                    except DuplicateName:
                        # A repeat after a lost reply finds its own name: check it is ours.
                        names = [n for n, r in await self.vs.list_child_folders(self._lock)
                                 if r == self._record] if self._lock else []
                        if names != [renewed.record()]:
                            raise
            except NotFound:
                self._lose("its record is gone: another run took the lock over (this run "
                           "was too late renewing it), or someone removed it")
                return
            except TimeoutError:
                self._lose(f"no renewal succeeded within {0.75 * lease:g} s (three "
                           f"quarters of the {lease:g} s lease)")
                return
            except VSphereError as exc:
                if self.clock() >= self._valid_until:
                    self._lose(f"could not renew it within {0.75 * lease:g} s: {exc}")
                    return
                log.info("fleet lock %s: renewal failed (%s); trying again", self.folder_path,
                         exc)
                next_at = self.clock() + min(1.0, lease / 8)
                continue
            self.holder = renewed
            self._valid_until = t0 + 0.75 * lease
            next_at = t0 + 0.25 * lease

    def stop_keeping(self) -> None:
        """Stop renewing (before the caller destroys the fleet's folder, lock and all).
        The lock stays ``valid`` for what is left of three quarters of its lease."""
        self._keeping = False
        if self._keeper is not None:
            self._keeper.cancel()

    # -- releasing it ------------------------------------------------------------
    def release_by(self, deadline: float) -> None:
        """Give up releasing at ``deadline`` (of ``clock``): a stopped run must end within
        its bound (``cancel_grace_s`` + ``cleanup_s`` after a signal), and a release
        vCenter is slow to carry out would otherwise add up to :data:`CALL_S`. A lock
        left behind lapses with its lease, or at once for a contender on this machine
        (its holder's process is gone)."""
        self._release_by = deadline

    async def release(self) -> None:
        """Destroy the lock folder this run made (by id: never another run's)."""
        if self._released or self._lock is None:
            return
        self._released = True
        bound = CALL_S
        if self._release_by is not None:
            bound = max(0.0, min(bound, self._release_by - self.clock()))
        if await self._destroy_quietly(self._lock, bound):
            log.info("fleet %s: lock released", self.fleet)

    def forget(self) -> None:
        """The lock folder went with the fleet's folder: nothing is left to release."""
        self._released = True

    async def __aenter__(self) -> FleetLock:
        await self.acquire()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._keeping = True
        tg.start_soon(self._keep)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        tg, self._tg = self._tg, None
        try:
            self.stop_keeping()
            if tg is not None:
                # Exited where it was entered, as anyio requires; the body's error (if
                # any) is not the task group's to report.
                await tg.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                await self.release()


__all__ = [
    "CALL_S",
    "CLAIM_PREFIX",
    "CLAIM_S",
    "DEFAULT_LEASE_S",
    "LOCK_NAME",
    "MAX_LEASE_S",
    "MAX_NAME",
    "MIN_LEASE_S",
    "RECORDLESS_S",
    "Claim",
    "FleetLock",
    "Holder",
    "LockHeld",
    "LockLost",
    "LockOptions",
    "LockView",
    "is_claim",
    "lock_state",
    "process_space",
    "read_lock",
    "this_host",
]
