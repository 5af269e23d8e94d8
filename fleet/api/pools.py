"""Warm pools: ready instant clones handed out as leases, refilled as they go.

A pool (``[pools.<name>]`` in the service config) is a fleet spec plus how many
idle members to keep (``ready``), how many members in all (``max``), how old an
idle member may get (``ready_ttl_s``) and the lease lifetimes. Its members live in
``<pools_folder>/<pool>``, apart from the fleets. Everything here is explained in
docs/pools.md; in short:

- **One server per pool.** The instance that holds the pool's fleet lock
  (``fleet.engine.lock``, op ``serve-pool``) serves it: refills, grants, returns,
  expiries. Another instance on the same vCenter waits for the lock and answers
  lease requests with 503 naming the holder; it takes over when the holder dies.
- **Refills stream.** One open-ended provisioning run (``EngineOptions.stream``)
  per pool takes a clone job for each missing idle member (and one per waiting
  lease request), under the service's shared limits, so pools and fleets share
  vCenter's capacity fairly.
- **A lease lives in vCenter.** A member is labelled ``idle <instance> <spec>`` in its
  clone spec, and ``leased <id> <client> <granted> <expires> <max>`` once leased.
  The grant is written to the pool's journal (``fleet.api.lease_journal``,
  fsynced) before the answer and to the label right after, so a lease survives a
  SIGKILL; an instance that takes a pool over never leases an idle member another
  instance made (it may have been handed out in the moment before its label):
  those are *in doubt* and are destroyed once any lease could have ended. An
  extension is answered only once its label is written too (another instance
  reads labels, not this journal); a lease's label writes go one at a time; where
  the journal and the label disagree on an end, the later one holds.
- **Returned and expired members are destroyed**, never handed out again; so are
  idle members older than ``ready_ttl_s`` and unfinished clones found at start.
  An idle member (or one in doubt) is labelled ``recycling`` before its destroy
  begins, so one still being destroyed when its instance stops is not idle to the
  next.

:class:`Pool` is one pool's manager; :class:`Lease` one lease.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup, TaskStatus

from fleet.api.config import PoolSection
from fleet.api.context import ServiceContext
from fleet.api.lease_journal import LeaseJournal
from fleet.api.requests import ApiError, stopping_error
from fleet.engine.events import Event, JobFailed, JobReady
from fleet.engine.lifetime import FLEET_LABELS, LABEL_LEASE, LABEL_POOL
from fleet.engine.lock import FleetLock, LockOptions, LockView
from fleet.engine.members import MemberRecord, read_records
from fleet.engine.reconcile import LABEL_READY_AT, LABEL_STATE, as_member
from fleet.engine.run import EngineOptions, Provisioner
from fleet.engine.runstate import Job
from fleet.errors import FleetError, NotFound
from fleet.vsphere.model import ListedVm, Ref

log = logging.getLogger("fleet.api.pools")

#: "made": cloned and ready, its record being read before it is idle
MemberState = Literal["made", "idle", "granting", "leased", "recycling", "doubt"]
#: the states ``fleet_pool_members`` shows (made counts as refilling, granting as leased)
SHOWN_STATES = ("idle", "leased", "refilling", "recycling", "doubt")
#: how often a serving pool looks at expiries and idle ages, at the latest
TICK_S = 1.0
#: a vCenter call's deadline (labels, destroys, reads)
CALL_S = 30.0
#: members destroyed at once per pool
DESTROY_CONCURRENCY = 16
#: label writes at once per pool
LABEL_CONCURRENCY = 8
#: a returned or expired lease is still shown (GET) this long
KEEP_ENDED_S = 300.0
#: refills after failures back off up to this
REFILL_BACKOFF_MAX_S = 60.0
#: compact the journal once it is larger than this
COMPACT_BYTES = 1024 * 1024
#: the lease label of an idle member (or one in doubt) whose destroy has begun
RECYCLING = "recycling"


_SHOWN = {"made": "refilling", "granting": "leased"}


def new_lease_id() -> str:
    return secrets.token_hex(8)


@dataclass(eq=False)
class PoolMember:
    index: int
    name: str
    vm: Ref
    state: MemberState
    #: monotonic: when it became idle (its idle age counts from here)
    idle_since: float = 0.0
    record: MemberRecord | None = None
    lease: Lease | None = None
    #: doubt: destroyed at this wall-clock time, once any lease it had has ended
    doubt_until: float | None = None


@dataclass(eq=False)
class Lease:
    """One lease: who holds which member until when (wall-clock epoch seconds)."""

    id: str
    pool: str
    client: str
    member: PoolMember
    granted_at: float
    expires_at: float
    max_until: float
    state: Literal["active", "returned", "expired"] = "active"
    #: the label value vCenter is known to carry (None: not yet written)
    labelled: str | None = None
    ended_at: float | None = None
    #: held while its label is written: one write at a time, so an older value never
    #: lands after a newer one
    label_lock: anyio.Lock = field(default_factory=anyio.Lock, repr=False)

    def label(self) -> str:
        return (f"leased {self.id} {self.client} {math.floor(self.granted_at)} "
                f"{math.ceil(self.expires_at)} {math.ceil(self.max_until)}")

    def entry(self, op: str) -> dict[str, Any]:
        return {"op": op, "id": self.id, "vm": self.member.vm.id, "name": self.member.name,
                "index": self.member.index, "client": self.client,
                "granted_at": self.granted_at, "expires_at": self.expires_at,
                "max_until": self.max_until}

    def to_dict(self, now: float) -> dict[str, Any]:
        m = self.member
        record = m.record.to_dict() if m.record is not None else \
            {"name": m.name, "index": m.index, "vm": m.vm.id}
        return {"id": self.id, "pool": self.pool, "client": self.client, "state": self.state,
                "granted_at": round(self.granted_at, 3),
                "expires_at": round(self.expires_at, 3),
                "expires_in_s": max(0.0, round(self.expires_at - now, 3))
                if self.state == "active" else 0.0,
                "max_expires_at": round(self.max_until, 3),
                "url": f"/v1/leases/{self.id}", "member": record}


def parse_lease_label(value: str) -> tuple[str, str, float, float, float] | None:
    """``leased <id> <client> <granted> <expires> <max>`` -> its fields, or None."""
    parts = value.split()
    if len(parts) != 6 or parts[0] != "leased":
        return None
    try:
        granted, expires, until = float(parts[3]), float(parts[4]), float(parts[5])
    except ValueError:
        return None
    if not all(map(math.isfinite, (granted, expires, until))):
        return None
    return parts[1], parts[2], granted, expires, until


@dataclass
class _Waiter:
    client: str
    ttl_s: float
    got: anyio.Event = field(default_factory=anyio.Event)
    member: PoolMember | None = None
    gone: bool = False
    #: whether the caller has hung up (looked at on every tick)
    hung_up: Callable[[], bool] = lambda: False


class Pool:
    """One pool's manager (module docstring). ``leases`` is the service's table of
    every lease by id, which each pool adds its own to."""

    def __init__(self, ctx: ServiceContext, name: str, section: PoolSection, *,
                 instance: str, journal: LeaseJournal, leases: dict[str, Lease]) -> None:
        self.ctx = ctx
        self.name = name
        self.cfg = section
        self.spec = section.fleet_spec
        self.instance = instance
        #: what a member this instance makes carries until it is leased
        self._idle_label = f"idle {instance} {section.digest}"
        self.journal = journal
        self.leases = leases
        self.members: dict[str, PoolMember] = {}  # by VM id
        self.idle: deque[PoolMember] = deque()  # oldest first
        #: index -> (monotonic time queued, its job: the VM once made)
        self.refilling: dict[int, tuple[float, Job]] = {}
        self.waiters: deque[_Waiter] = deque()
        self.serving = False
        self.holder: str | None = None  # who serves it, when not this instance
        self.error: str | None = None
        self.stopping = False
        self._next_index = 0
        self._provisioner: Provisioner | None = None
        self._lock: FleetLock | None = None
        self._tg: TaskGroup | None = None
        self._wake = anyio.Event()
        self._failures = 0  # rounds of refills that failed in a row
        self._backoff_until = 0.0
        self._backoff_set_at = -math.inf  # when the last round's failure set the backoff
        self._labels: deque[Lease] = deque()
        self._label_wake = anyio.Event()
        self._doubts: list[PoolMember] = []  # doubt deadlines to write on the members
        self._labels_in_flight = 0
        self._labels_drained = anyio.Event()
        self._refills_done = anyio.Event()
        self._refills_failed = False
        #: set while this instance holds no lock of the pool (stop waits for it)
        self._released = anyio.Event()
        self._released.set()
        self._destroy_limit = anyio.CapacityLimiter(DESTROY_CONCURRENCY)
        # Refill clones count in fleet_clones_total under the pool's name.
        self._metrics_events = ctx.metrics.events_for(name)
        self.granted = 0  # leases granted by this instance (tests, benchmark)
        self.refilled = 0  # members made idle by refills

    # -- what callers see -----------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(SHOWN_STATES, 0)
        for m in self.members.values():
            out[_SHOWN.get(m.state, m.state)] += 1
        out["refilling"] += len(self.refilling)
        return out

    def total(self) -> int:
        return len(self.members) + len(self.refilling)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "ready": self.cfg.ready, "max": self.cfg.max,
                "ready_ttl_s": self.cfg.ready_ttl_s, "lease_ttl_s": self.cfg.lease_ttl_s,
                "max_lease_ttl_s": self.cfg.max_lease_ttl_s, "wait_s": self.cfg.wait_s,
                "folder": self.spec.folder_path, "serving": self.serving,
                "holder": None if self.serving else self.holder,
                "members": self.counts(), "waiting": len(self.waiters),
                "error": self.error}

    def update_gauges(self) -> None:
        m = self.ctx.metrics
        m.set_pool_members(self.name, self.counts())
        m.set_pool_target(self.name, self.cfg.ready, self.cfg.max)
        m.set_pool_serving(self.name, self.serving)
        m.leases_waiting(self.name, len(self.waiters))

    def wake(self) -> None:
        self._wake.set()

    # -- leases (called by the service) ---------------------------------------------
    def _not_serving(self) -> ApiError:
        if self.stopping:
            return stopping_error()
        who = self.holder or "another instance (or this one is still taking it over)"
        err = ApiError(503, f"pool {self.name} is served by {who}; send lease requests "
                            "there, or retry: this instance takes over if that one stops")
        err.retry_after = 5
        return err

    async def lease(self, client: str, ttl_s: float | None, wait_s: float | None,
                    gone: Callable[[], bool] = lambda: False) -> Lease:
        """A lease of an idle member, at once or within ``wait_s``; ApiError otherwise
        (429 at max or after the wait, 503 when this instance does not serve it).

        ``gone`` says whether the caller has hung up. A member that arrives for a caller
        who has gone is handed to the next one (or goes back to idle) without a grant,
        and a grant whose caller left while it was recorded is returned at once: no VM
        stays leased to nobody until its TTL. (A caller who hangs up after that check
        is not seen; its lease runs until it is returned or expires.)"""
        t0 = anyio.current_time()
        ttl = self.cfg.lease_ttl_s if ttl_s is None else ttl_s
        wait = self.cfg.wait_s if wait_s is None else wait_s
        if not self.serving or self._lock is None or not self._lock.valid:
            self._refused("not_serving", client)
            raise self._not_serving()
        member: PoolMember | None = self.idle.popleft() if self.idle else None
        if member is None:
            if not self.refilling and self.total() >= self.cfg.max and \
                    not any(m.state == "recycling" for m in self.members.values()):
                self._refused("at_max", client)
                raise self._at_max()
            if wait <= 0:
                self._refused("wait_timeout", client)
                raise self._busy("no member is idle now and the request does not wait "
                                 "(wait_s = 0)")
            member = await self._wait_for_member(client, ttl, wait, gone)
        if gone():
            self._hand_on(member, front=True)
            self._refused("client_gone", client)
            raise self._client_gone()
        member.state = "granting"
        lease = await self._grant(member, client, ttl)
        if gone():
            log.info("pool %s: lease %s's client %s hung up before the answer; returned",
                     self.name, lease.id, client)
            with contextlib.suppress(ApiError):  # not serving now: it runs to its TTL
                await self.release(lease)
            raise self._client_gone()
        self.ctx.metrics.observe_lease_wait(self.name, anyio.current_time() - t0)
        return lease

    @staticmethod
    def _cannot_record() -> ApiError:
        return ApiError(503, "the service cannot record leases now (its state directory "
                             "is not writable); try again later")

    def _client_gone(self) -> ApiError:
        err = ApiError(499, f"pool {self.name}: the client closed the connection before "
                            "the answer; no lease is kept for it")
        err.reason = "client_gone"
        return err

    async def _wait_for_member(self, client: str, ttl: float, wait: float,
                               gone: Callable[[], bool]) -> PoolMember:
        waiter = _Waiter(client, ttl, hung_up=gone)
        self.waiters.append(waiter)
        self._refill()
        try:
            with anyio.move_on_after(wait):
                await waiter.got.wait()
        finally:
            waiter.gone = True
            if waiter.member is None:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
        if waiter.member is None:
            if gone():
                self._refused("client_gone", client)
                raise self._client_gone()
            if not self.serving:
                self._refused("not_serving", client)
                raise self._not_serving()
            self._refused("wait_timeout", client)
            raise self._busy(f"no member became idle within {wait:g} s")
        return waiter.member

    def _at_max(self) -> ApiError:
        soonest = min((m.lease.expires_at for m in self.members.values()
                       if m.lease is not None and m.lease.state == "active"), default=None)
        now = self.ctx.clock()
        retry = 5 if soonest is None else int(min(3600, max(1, math.ceil(soonest - now))))
        err = ApiError(429, f"pool {self.name} is at its max of {self.cfg.max} members, all "
                            "leased or in doubt; a member comes free when a lease is "
                            "returned or expires")
        err.retry_after = retry
        err.reason = "at_max"
        return err

    def _busy(self, message: str) -> ApiError:
        err = ApiError(429, f"pool {self.name}: {message}; refills are under way")
        err.retry_after = 1
        err.reason = "wait_timeout"
        return err

    def _refused(self, reason: str, client: str) -> None:
        self.ctx.metrics.count_lease_refused(self.name, reason, client)

    async def _grant(self, member: PoolMember, client: str, ttl: float) -> Lease:
        now = self.ctx.clock()
        lease = Lease(new_lease_id(), self.name, client, member, granted_at=now,
                      expires_at=now + ttl, max_until=now + self.cfg.max_lease_ttl_s)
        # Recorded before anyone hears of it, and never half-way: a caller hanging up
        # (or a stop) does not undo a grant that may be on disk.
        with anyio.CancelScope(shield=True):
            try:
                await self.journal.append(lease.entry("grant"))
            except OSError as exc:
                log.error("pool %s: cannot record a lease in %s: %s", self.name,
                          self.journal.path, exc)
                member.state = "idle"
                self.idle.appendleft(member)
                raise self._cannot_record() from None
        if member.state != "granting" or self.members.get(member.vm.id) is not member:
            # Taken from under the grant (the pool stopped serving and was re-read):
            # the journal's line makes the next reading treat it as leased.
            raise self._not_serving()
        member.state = "leased"
        member.lease = lease
        self.leases[lease.id] = lease
        self.granted += 1
        self.ctx.metrics.count_lease(self.name, "granted", client)
        self._label(lease)
        self._refill()
        log.info("pool %s: lease %s of %s to %s until %.0f", self.name, lease.id, member.name,
                 client, lease.expires_at)
        return lease

    async def release(self, lease: Lease) -> None:
        """Return the lease: its member is destroyed, never handed out again."""
        if lease.state != "active":
            return
        if not self.serving:
            raise self._not_serving()
        lease.state = "returned"
        lease.ended_at = self.ctx.clock()
        with anyio.CancelScope(shield=True):
            try:
                await self.journal.append(lease.entry("return"))
            except OSError as exc:
                # The destroy below is what matters; without the line a restart before
                # it lands keeps the VM until the lease's expiry.
                log.error("pool %s: cannot record the return of lease %s: %s", self.name,
                          lease.id, exc)
        self.ctx.metrics.count_lease(self.name, "returned", lease.client)
        self._recycle(lease.member, f"lease {lease.id} returned")

    async def extend(self, lease: Lease, ttl_s: float) -> None:
        """The lease now ends ``ttl_s`` from now, within its max (422 past it)."""
        if lease.state != "active":
            raise ApiError(409, f"lease {lease.id} is {lease.state}")
        if not self.serving:
            raise self._not_serving()
        now = self.ctx.clock()
        new_end = now + ttl_s
        if new_end > lease.max_until + 1e-6:
            raise ApiError(422, f"ttl_s: {ttl_s:g} s would end lease {lease.id} after its "
                                f"max (max_lease_ttl_s = {self.cfg.max_lease_ttl_s:g} s from "
                                f"its grant: {max(0.0, lease.max_until - now):.0f} s left)")
        old = lease.expires_at
        lease.expires_at = new_end
        with anyio.CancelScope(shield=True):
            try:
                await self.journal.append(lease.entry("extend"))
            except OSError:
                lease.expires_at = old
                raise self._cannot_record() from None
            # Answered once vCenter carries the new end: an instance that takes the pool
            # over reads the labels, not this instance's journal.
            labelled = await self._put_label(lease)
        if not labelled:
            self._label(lease)  # kept trying in the background
            err = ApiError(503, f"vCenter did not take the new end of lease {lease.id}: it "
                                "holds on this instance, but another one taking the pool "
                                "over would not know it; try again")
            err.retry_after = 1
            raise err

    # -- running ----------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the pool whenever this instance holds its lock, for ever."""
        task_status.started()
        failures = 0
        while not self.stopping:
            run_id = uuid.uuid4().hex[:12]
            lock = FleetLock(self.ctx.vs, self.name, self.spec.folder_path, op="serve-pool",
                             run_id=run_id, options=LockOptions(
                                 lease_s=self.ctx.config.lock_lease_s, wait_s=None,
                                 on_wait=self._on_wait))
            try:
                await lock.acquire()
                self._released = anyio.Event()
                async with lock:
                    self._lock = lock
                    self.holder = None
                    await self._serve(lock)
                failures = 0 if not self._refills_failed else failures + 1
            except (FleetError, TimeoutError) as exc:
                failures += 1
                self.error = str(exc) or "vCenter did not answer in time"
                log.warning("pool %s: %s", self.name, self.error)
            except Exception as exc:  # a bug in one pool must not stop the service
                failures += 1
                self.error = f"internal error: {type(exc).__name__}"
                log.exception("pool %s: failed", self.name)
            finally:
                self._lock = None
                self._stop_serving()
                self._released.set()
            if not self.stopping:
                await anyio.sleep(min(REFILL_BACKOFF_MAX_S, 0.5 * 2.0 ** min(failures, 10)))

    def _on_wait(self, view: LockView) -> None:
        self.holder = view.describe()

    def _stop_serving(self) -> None:
        self.serving = False
        for waiter in self.waiters:
            waiter.got.set()  # they see no member and not serving: 503
        self.waiters.clear()
        self.idle.clear()
        self.members.clear()
        self.refilling.clear()
        for lid in [lid for lid, lease in self.leases.items() if lease.pool == self.name]:
            del self.leases[lid]

    async def stop(self, timeout_s: float) -> None:
        """Stop serving and release the pool's lock (a standby takes over at once);
        waits at most ``timeout_s``. Leases stay: they are in vCenter."""
        self.stopping = True
        if self._provisioner is not None:
            self._provisioner.stop("service stopping")
        self.wake()
        with anyio.move_on_after(timeout_s):
            await self._released.wait()

    async def _serve(self, lock: FleetLock) -> None:
        """Read the pool, then keep it while the lock is held."""
        assert lock.folder is not None
        with anyio.fail_after(CALL_S):
            vms = await self.ctx.vs.list_folder_vms(lock.folder, (*FLEET_LABELS, LABEL_READY_AT))
        entries = await self.journal.load()
        recycle = self._adopt(vms, entries)
        await self._read_records([m for m in self.members.values() if m.state == "idle"])
        await self._compact()
        lost = anyio.Event()

        def on_lost(why: str) -> None:
            self.serving = False  # no grant from now on, not even before the loop sees it
            lost.set()
            self.wake()

        lock.on_lost(on_lost)
        labels = {LABEL_POOL: self.name, LABEL_LEASE: self._idle_label}
        options = EngineOptions(shared_limits=self.ctx.shared, labels=labels, stream=True)
        provisioner = Provisioner(self.spec, self.ctx.vs, on_event=self._on_event,
                                  options=options)
        self._provisioner = provisioner
        self._refills_done = anyio.Event()
        self._refills_failed = False
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._run_refills, provisioner)
                for member, why in recycle:
                    self._recycle(member, why)
                tg.start_soon(self._label_writer)
                tg.start_soon(self._mark_doubts, self._doubts)
                with anyio.fail_after(CALL_S * 2):
                    await provisioner.started.wait()
                self.serving = True
                self.error = None
                log.info("pool %s: serving (%d idle, %d leased, %d in doubt)", self.name,
                         len(self.idle), sum(1 for m in self.members.values()
                                             if m.state == "leased"),
                         sum(1 for m in self.members.values() if m.state == "doubt"))
                self._refill()
                while not self.stopping and not lost.is_set() and not self._refills_failed:
                    self._tick()
                    with anyio.move_on_after(TICK_S):
                        await self._wake.wait()
                    self._wake = anyio.Event()
                self.serving = False
                provisioner.stop("pool lock lost" if lost.is_set() else "service stopping")
                provisioner.close()
                # In-flight clones finish or are cleaned up; label writes under way land
                # (each bounded by its call) while the lock is still ours.
                timeouts = self.spec.timeouts
                with anyio.move_on_after(timeouts.cancel_grace_s + timeouts.cleanup_s
                                         + CALL_S):
                    await self._refills_done.wait()
                    if not lost.is_set():
                        await self._labels_drained.wait()
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            self._provisioner = None
        if lost.is_set():
            self.error = f"lost the pool's lock: {lock.lost_reason}"

    async def _run_refills(self, provisioner: Provisioner) -> None:
        try:
            await provisioner.run()
        except (FleetError, TimeoutError) as exc:
            self.error = f"refills stopped: {exc}"
            log.warning("pool %s: %s", self.name, self.error)
            self._refills_failed = True
            self.wake()  # serve again from the top after a backoff
        finally:
            self._refills_done.set()

    # -- reading the pool at start ---------------------------------------------------
    def _adopt(self, vms: list[ListedVm], entries: list[dict[str, Any]]
               ) -> list[tuple[PoolMember, str]]:
        """Sort the folder's members by their labels and the journal's lines; returns
        the members to destroy, with why."""
        journal: dict[str, dict[str, Any]] = {}  # VM id -> the last entry about it
        for line in entries:
            if isinstance(line.get("vm"), str):
                journal[line["vm"]] = line
        now = self.ctx.clock()
        mono = anyio.current_time()
        recycle: list[tuple[PoolMember, str]] = []
        self._next_index = 0
        self._doubts = []
        for vm in vms:
            member = as_member(vm, self.name)
            if member is None or vm.labels.get(LABEL_POOL) != self.name:
                continue  # not this pool's: never touched
            self._next_index = max(self._next_index, member.index + 1)
            pm = PoolMember(member.index, vm.name, vm.ref, "idle", idle_since=mono)
            self.members[vm.ref.id] = pm
            said = vm.labels.get(LABEL_LEASE, "")
            entry = journal.get(vm.ref.id)
            if entry is not None and entry["op"] == "return":
                recycle.append((pm, "its lease was returned"))
                continue
            if entry is not None and isinstance(entry.get("expires_at"), (int, float)):
                # Granted (or extended) here, maybe not yet labelled. The label may be
                # newer all the same: another instance served the pool since and
                # extended the lease. The later end holds (never sooner than told).
                expires = float(entry["expires_at"])
                parsed = parse_lease_label(said)
                if parsed is not None and parsed[0] == entry["id"]:
                    expires = max(expires, parsed[3])
                lease = self._lease_from(pm, entry["id"], str(entry.get("client", "?")),
                                         float(entry["granted_at"]), expires,
                                         float(entry["max_until"]))
                if said != lease.label():
                    self._labels.append(lease)
                else:
                    lease.labelled = said
                continue
            parsed = parse_lease_label(said)
            if parsed is not None:
                lease = self._lease_from(pm, *parsed)
                lease.labelled = said
                continue
            mine = said.split()[:2] == ["idle", self.instance]
            if vm.labels.get(LABEL_STATE) != "ready":
                recycle.append((pm, "an unfinished clone"))
            elif said.split(" ", 1)[0] == RECYCLING:
                recycle.append((pm, "its destroy was under way"))
            elif mine and said != self._idle_label:
                recycle.append((pm, "made from the pool's spec before it changed"))
            elif said == self._idle_label:
                ready_at = _float(vm.labels.get(LABEL_READY_AT))
                age = now - ready_at if ready_at is not None else 0.0
                pm.idle_since = mono - max(0.0, age)
                self.idle.append(pm)
            else:
                # Made idle by another instance (or an unknown label): it may have been
                # handed out in the moment before its label. Never leased from here;
                # destroyed once any lease it might have had has ended. The deadline is
                # written on it, so a restart does not push it back.
                pm.state = "doubt"
                until = _doubt_until(said)
                if until is None:
                    until = now + self.cfg.max_lease_ttl_s
                    self._doubts.append(pm)
                pm.doubt_until = until
        self.idle = deque(sorted(self.idle, key=lambda m: m.idle_since))
        for held in [m.lease for m in self.members.values() if m.lease is not None]:
            if held.state == "active" and held.expires_at <= now:
                self._expire(held, recycle)
        return recycle

    def _lease_from(self, pm: PoolMember, lid: str, client: str, granted: float,
                    expires: float, until: float) -> Lease:
        lease = Lease(lid, self.name, client, pm, granted, expires, until)
        pm.state = "leased"
        pm.lease = lease
        self.leases[lid] = lease
        return lease

    def _expire(self, lease: Lease, into: list[tuple[PoolMember, str]] | None = None) -> None:
        lease.state = "expired"
        lease.ended_at = self.ctx.clock()
        self.ctx.metrics.count_lease(self.name, "expired", lease.client)
        why = f"lease {lease.id} expired"
        if into is not None:
            into.append((lease.member, why))
        else:
            self._recycle(lease.member, why)

    async def _read_records(self, members: list[PoolMember]) -> None:
        if not members:
            return
        try:
            records = await read_records(self.ctx.vs, self.name, [m.vm for m in members],
                                         call_s=CALL_S)
        except (FleetError, TimeoutError) as exc:
            log.warning("pool %s: could not read members' records: %s", self.name, exc)
            return
        by_vm = {r.vm: r for r in records}
        for m in members:
            m.record = by_vm.get(m.vm.id, m.record)

    async def _compact(self) -> None:
        """Keep only the lines vCenter does not show yet (unlabelled grants, returns of
        members not yet destroyed)."""
        keep = [lease.entry("grant") for lease in self.leases.values()
                if lease.pool == self.name and lease.state == "active"
                and lease.labelled != lease.label()]
        keep += [m.lease.entry("return") for m in self.members.values()
                 if m.lease is not None and m.lease.state == "returned"]
        try:
            await self.journal.rewrite(keep)
        except OSError as exc:
            log.error("pool %s: cannot compact %s: %s", self.name, self.journal.path, exc)

    # -- keeping it ---------------------------------------------------------------------
    def _tick(self) -> None:
        now = self.ctx.clock()
        mono = anyio.current_time()
        # A request whose caller hung up stops waiting (and asking for a clone): the
        # service does not cancel it, so without this it would wait out its wait_s.
        for waiter in [w for w in self.waiters if w.member is None and w.hung_up()]:
            self.waiters.remove(waiter)
            waiter.got.set()
        for m in list(self.members.values()):
            if m.state == "leased" and m.lease is not None and m.lease.state == "active" \
                    and m.lease.expires_at <= now:
                self._expire(m.lease)
            elif m.state == "idle" and mono - m.idle_since >= self.cfg.ready_ttl_s:
                with contextlib.suppress(ValueError):
                    self.idle.remove(m)
                self._recycle(m, f"idle for {self.cfg.ready_ttl_s:g} s (ready_ttl_s)",
                              mark=True)
            elif m.state == "doubt" and m.doubt_until is not None and m.doubt_until <= now:
                self._recycle(m, "in doubt since a takeover, and any lease it had is over",
                              mark=True)
        for lid in [lid for lid, lease in self.leases.items()
                    if lease.pool == self.name and lease.ended_at is not None
                    and now - lease.ended_at > KEEP_ENDED_S]:
            del self.leases[lid]
        self._refill()

    def _refill(self) -> None:
        """Queue clones for the idle members (and waiting requests) missing, within max."""
        prov = self._provisioner
        if not self.serving or prov is None or not prov.started.is_set() or self.stopping:
            return
        if anyio.current_time() < self._backoff_until:
            return
        waiting = sum(1 for w in self.waiters if w.member is None)
        made = sum(1 for m in self.members.values() if m.state == "made")
        want = self.cfg.ready + waiting - len(self.idle) - len(self.refilling) - made
        room = self.cfg.max - self.total()
        for _ in range(max(0, min(want, room))):
            index = self._next_index
            self._next_index += 1
            now = anyio.current_time()
            self.refilling[index] = (now, prov.add(index))

    def _on_event(self, event: Event) -> None:
        self._metrics_events(event)
        if isinstance(event, JobReady):
            refill = self.refilling.pop(event.index, None)
            if refill is None or refill[1].vm is None:
                return
            queued, vm = refill[0], refill[1].vm
            self._failures = 0
            pm = PoolMember(event.index, event.name, vm, "made")
            self.members[vm.id] = pm
            if self._tg is not None:
                self._tg.start_soon(self._became_ready, pm, queued)
        elif isinstance(event, JobFailed):
            refill = self.refilling.pop(event.index, None)
            if refill is None:
                return
            if event.outcome == "failed":
                self.error = f"a refill failed: {event.reason}: {event.message}"
                # The backoff doubles per round, not per clone: the other clones queued
                # before the last failure's backoff fail for the same cause, and a burst
                # of ten must not push it to its max at once.
                if refill[0] >= self._backoff_set_at:
                    self._failures += 1
                    now = anyio.current_time()
                    delay = min(REFILL_BACKOFF_MAX_S, 0.5 * 2.0 ** min(self._failures, 10))
                    self._backoff_until, self._backoff_set_at = now + delay, now
            self.wake()

    async def _became_ready(self, pm: PoolMember, queued: float) -> None:
        await self._read_records([pm])
        if self.members.get(pm.vm.id) is not pm or pm.state != "made":
            return
        self.refilled += 1
        self.ctx.metrics.observe_refill(self.name, anyio.current_time() - queued)
        pm.idle_since = anyio.current_time()
        self._hand_on(pm)

    def _hand_on(self, pm: PoolMember, *, front: bool = False) -> None:
        """``pm`` is free to lease: to the oldest waiter still waiting, else idle (at the
        front of the idle members if ``front``)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.gone:
                pm.state = "granting"  # the waiter's task grants it
                waiter.member = pm
                waiter.got.set()
                return
        pm.state = "idle"
        if front:  # it was the oldest idle member, taken for a caller who has gone
            self.idle.appendleft(pm)
        else:
            self.idle.append(pm)

    def _recycle(self, member: PoolMember, why: str, *, mark: bool = False) -> None:
        """Destroy ``member`` (in the background); it is never handed out again.
        ``mark``: its label says idle; it says ``recycling`` before the destroy begins,
        so a destroy still under way in vCenter when this instance stops (or dies)
        leaves the next reading no idle member (powered off, about to vanish) to lease."""
        if member.state == "recycling":
            return
        member.state = "recycling"
        if self._tg is None:
            return  # the next reading finds it again
        self._tg.start_soon(self._destroy, member, why, mark)

    async def _destroy(self, member: PoolMember, why: str, mark: bool = False) -> None:
        delay = 1.0
        while True:
            try:
                async with self._destroy_limit:
                    with anyio.fail_after(CALL_S):
                        if mark:
                            await self.ctx.vs.update_extra_config(
                                member.vm, {LABEL_LEASE: f"{RECYCLING} {self.instance}"})
                            mark = False
                        await self.ctx.vs.destroy(member.vm)
                break
            except NotFound:
                break  # gone already
            except (FleetError, TimeoutError) as exc:
                log.warning("pool %s: could not destroy %s (%s): %s; trying again",
                            self.name, member.name, why, exc)
                await anyio.sleep(delay)
                delay = min(REFILL_BACKOFF_MAX_S, delay * 2)
        log.info("pool %s: destroyed %s: %s", self.name, member.name, why)
        if self.members.get(member.vm.id) is member:
            del self.members[member.vm.id]
        self._refill()

    async def _mark_doubts(self, members: list[PoolMember]) -> None:
        """Write ``doubt <until>`` on members found in doubt (a few at once)."""
        limit = anyio.Semaphore(LABEL_CONCURRENCY)

        async def mark(m: PoolMember) -> None:
            async with limit:
                value = f"doubt {math.ceil(m.doubt_until or 0)}"
                try:
                    with anyio.fail_after(CALL_S):
                        await self.ctx.vs.update_extra_config(m.vm, {LABEL_LEASE: value})
                except (FleetError, TimeoutError) as exc:
                    log.warning("pool %s: %s: could not mark it in doubt: %s", self.name,
                                m.name, exc)

        async with anyio.create_task_group() as tg:
            for m in members:
                if m.state == "doubt":
                    tg.start_soon(mark, m)

    def _label(self, lease: Lease) -> None:
        self._labels.append(lease)
        if self._labels_drained.is_set():
            self._labels_drained = anyio.Event()
        self._label_wake.set()

    async def _label_writer(self) -> None:
        """Write lease labels as grants and extensions come (a few at once)."""
        async with anyio.create_task_group() as tg:
            limit = anyio.Semaphore(LABEL_CONCURRENCY)
            while True:
                while self._labels:
                    lease = self._labels.popleft()
                    await limit.acquire()
                    self._labels_in_flight += 1
                    tg.start_soon(self._write_label, lease, limit)
                if not self._labels_in_flight:
                    self._labels_drained.set()
                if self.journal.size > COMPACT_BYTES:
                    await self._compact()
                await self._label_wake.wait()
                self._label_wake = anyio.Event()

    async def _write_label(self, lease: Lease, limit: anyio.Semaphore) -> None:
        try:
            if not await self._put_label(lease) and lease.state == "active":
                await anyio.sleep(1.0)
                self._label(lease)  # trying again
        finally:
            limit.release()
            self._labels_in_flight -= 1
            self._label_wake.set()

    async def _put_label(self, lease: Lease) -> bool:
        """Make vCenter carry the lease's label as it is now (nothing to do for a lease
        that ended); False if a write failed. Writes of one lease go one at a time, each
        of its value when it starts, until the label is the lease's latest: two at once
        could land in either order, and leave vCenter with an older end than a client
        was told."""
        async with lease.label_lock:
            while lease.state == "active" and lease.labelled != (value := lease.label()):
                try:
                    with anyio.fail_after(CALL_S):
                        await self.ctx.vs.update_extra_config(lease.member.vm,
                                                              {LABEL_LEASE: value})
                except (FleetError, TimeoutError) as exc:
                    log.warning("pool %s: lease %s: label not written: %s", self.name,
                                lease.id, exc or "vCenter did not answer in time")
                    return False
                lease.labelled = value
        return True


def _doubt_until(label: str) -> float | None:
    """``doubt <until>`` -> until (epoch seconds), or None."""
    parts = label.split()
    if len(parts) != 2 or parts[0] != "doubt":
        return None
    return _float(parts[1])


def _float(raw: str | None) -> float | None:
    try:
        value = float(raw) if raw else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def instance_id() -> str:
    """A new service instance's id (kept in its state directory)."""
    return uuid.uuid4().hex[:12]
