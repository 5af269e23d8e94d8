"""The fleet service: many fleets, one vCenter session, one set of limits.

:class:`FleetService` is the service's composition root and its front desk. It
holds the table of fleets (name -> :class:`~fleet.api.records.FleetRecord`),
accepts requests and answers for them; the work is done by its parts:

- ``fleet.api.records``: what is known of each fleet, its member view, and the
  shapes callers see;
- ``fleet.api.worker``: a worker task per fleet that runs provisioning and
  destroys, with retries and the fleet's lock;
- ``fleet.api.scanner``: reads vCenter into the records (discovery, drift) and
  enforces lifetimes;
- ``fleet.api.state``: the requests on disk, so a build interrupted by a restart
  is resumed.

The parts share one :class:`~fleet.api.context.ServiceContext` (the table of
fleets, vCenter, metrics, clock, limits) and reach the service only through the
callbacks it hands them (start a fleet's worker, doom a fleet, save a record, a
fleet is gone).

It is an async context manager; the HTTP layer (``fleet.api.app``) only calls
its synchronous accessors and its ``apply``, ``scale`` and ``remove`` coroutines,
which validate, record and return at once: a newer request stops the fleet's
current run (in-flight clones finish or are cleaned up) and its worker starts
another with the new spec; a delete stops it and the worker destroys the members
and the fleet's folder.

Fleets and where their truth lives:

- Members live in vCenter: VMs in ``<root_folder>/<name>`` labelled with the
  fleet's name. The scanner reads the root folder at start-up and every
  ``scan_interval_s``, so fleets made before a restart, or by ``fleet
  provision``, are found again (status ``discovered`` when no request for them
  is on record).
- Requests (the spec, its generation) are kept in the state directory
  (``fleet.api.state``); a request is accepted only once it is on disk.
- Lifetimes are labels on the members (``fleet.engine.lifetime``); the record
  keeps the expiry while a fleet has no member yet.

All runs draw from one :class:`~fleet.engine.shared.SharedLimits`, which wakes
the run with the fewest clones at vCenter first, so bursts share capacity
fairly. Every run feeds the one :class:`~fleet.metrics.FleetMetrics`
(``events_for``) and the fleet's member view, which answers ``GET`` without a
vCenter call.

States: ``pending`` (accepted, run not started) -> ``provisioning`` ->
``ready`` | ``incomplete`` (the run ended with failures) | ``failed`` (the run
could not start: bad source, permissions) ; ``retrying`` (vCenter unreachable,
will try again) ; ``destroying`` (deleted or expired) ; ``discovered``.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from fleet.api.config import ServiceConfig
from fleet.api.context import ServiceContext
from fleet.api.lease_journal import LeaseJournal
from fleet.api.pools import Lease, Pool, instance_id
from fleet.api.records import (
    STATUSES,
    FleetRecord,
    MemberView,
    detail_of,
    restore,
    summary_of,
    with_records,
)
from fleet.api.requests import ApiError, FleetRequest, invalid, stopping_error, valid_name
from fleet.api.scanner import CALL_TIMEOUT_S, Scanner
from fleet.api.sources import SourceCheck
from fleet.api.state import StateStore
from fleet.api.tokens import Client
from fleet.api.worker import Workers
from fleet.engine.lifetime import LABEL_LEASE, LABEL_POOL
from fleet.engine.limits import LimitKey
from fleet.engine.members import MemberRecord, read_records
from fleet.engine.reconcile import RECONCILE_LABELS, as_member
from fleet.engine.shared import SharedLimits
from fleet.engine.spec import FleetSpec
from fleet.errors import FleetError
from fleet.files import write_atomically
from fleet.metrics import FleetMetrics
from fleet.vsphere.model import ListedVm, VSphere

__all__ = ["FleetRecord", "FleetService", "MemberView"]

log = logging.getLogger("fleet.api")

#: how long a member's record, once read, answers for it (docs/inventory.md)
RECORDS_FRESH_S = 2.0


class FleetService:
    """See the module docstring. ``clock`` is wall-clock epoch seconds (expiries)."""

    def __init__(self, config: ServiceConfig, vs: VSphere, metrics: FleetMetrics, *,
                 clock: Callable[[], float] = time.time, state_path: Path | None = None
                 ) -> None:
        self.config = config
        self.vs = vs
        self.metrics = metrics
        self.clock = clock
        self.shared = SharedLimits(config.limits, on_limit=self._limit_changed)
        self.store = StateStore(state_path or config.state_path)
        self.fleets: dict[str, FleetRecord] = {}
        self.started_at = clock()
        ctx = ServiceContext(config, vs, metrics, clock, self.fleets, self.shared)
        self.workers = Workers(ctx, save=self._save, gone=self._gone,
                               ran=lambda: self.scanner.wake())
        self.scanner = Scanner(ctx, start_worker=self.workers.ensure, doom=self._doom)
        self.sources = SourceCheck(vs)
        self._tg: TaskGroup | None = None
        self._stopping = False
        #: VM id -> (when read, its record): records read for callers, for a moment
        self._records: dict[str, tuple[float, MemberRecord]] = {}
        self._ctx = ctx
        #: warm pools (fleet.api.pools), started with the service; every lease by id
        self.pools: dict[str, Pool] = {}
        self.leases: dict[str, Lease] = {}
        #: lease requests under way per client (its quotas count them)
        self._leasing: Counter[str] = Counter()
        self.instance = ""

    # -- lifecycle ---------------------------------------------------------------
    async def __aenter__(self) -> FleetService:
        await self.store.prepare()
        self.instance = await anyio.to_thread.run_sync(_instance_id, self.store.path)
        for name, section in self.config.pools.items():
            self.pools[name] = Pool(self._ctx, name, section, instance=self.instance,
                                    journal=LeaseJournal(self.store.path / "pools", name),
                                    leases=self.leases)
        for saved in await self.store.load_all():
            rec = restore(saved, self.config)
            if rec is not None:
                self.fleets[rec.name] = rec
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            # The first scan is done (or vCenter could not be read: raised) once started.
            await tg.start(self.scanner.run)
        except BaseException:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            raise
        self._tg = tg
        self.workers.start(tg)
        for pool in self.pools.values():
            await tg.start(pool.run)
        tg.start_soon(self._unconfigured_pools)
        log.info("service started: %d fleets (%d on record), root folder %s",
                 len(self.fleets), sum(1 for r in self.fleets.values() if r.spec),
                 self.config.root_folder)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Stop every run (in-flight clones get their grace period, then are cleaned up;
        the requests stay on record and resume on the next start), then the tasks."""
        self._stopping = True
        tg, self._tg = self._tg, None
        if tg is None:
            return
        bound = self.config.shutdown_grace_s + CALL_TIMEOUT_S
        async with anyio.create_task_group() as stopping:
            # Pools release their locks (a standby takes over at once), beside the runs.
            for pool in self.pools.values():
                stopping.start_soon(pool.stop, bound)
            stopping.start_soon(self.workers.stop, bound)
        tg.cancel_scope.cancel()
        # Exited where it was entered (not inside another scope), as anyio requires.
        await tg.__aexit__(None, None, None)
        log.info("service stopped")

    @property
    def ready(self) -> bool:
        return self._tg is not None and self.scan_error is None and not self._stopping

    # -- what the scanner knows ------------------------------------------------------
    @property
    def scans(self) -> int:
        return self.scanner.scans

    @property
    def scan_error(self) -> str | None:
        return self.scanner.error

    @property
    def last_scan_at(self) -> float | None:
        return self.scanner.last_at

    async def scan(self) -> None:
        """Read the root folder: find fleets, refresh idle ones, enforce lifetimes."""
        await self.scanner.scan()

    def next_expiry(self) -> float | None:
        return self.scanner.next_expiry()

    def _limit_changed(self, key: LimitKey, old: float, new: float) -> None:
        self.metrics.set_limit(key.kind, key.id, new)

    async def _save(self, rec: FleetRecord, *, must: bool = False) -> None:
        """Record the fleet's request. ``must``: a request is being accepted, and is not
        unless it is on disk (503); otherwise a failure is logged and retried later."""
        saved = rec.saved()
        if saved is None:
            return  # nothing vCenter does not already say
        try:
            await self.store.save(saved)
        except OSError as exc:
            log.error("fleet %s: cannot record its request in %s: %s", rec.name,
                      self.store.path, exc.strerror or exc)
            if must:
                raise ApiError(503, "the service cannot record requests now (state "
                                    "directory unwritable); try again later") from None

    async def _gone(self, rec: FleetRecord) -> None:
        """The fleet's destroy finished: forget it everywhere."""
        # The view of vCenter may still show it: it must not bring it back.
        self.scanner.bury(rec.name)
        # Its file first, and whole: a fleet gone from the table has no record on disk,
        # also when the service stops meanwhile.
        with anyio.CancelScope(shield=True), anyio.move_on_after(CALL_TIMEOUT_S):
            await self.store.delete(rec.name)
        if self.fleets.get(rec.name) is rec:
            del self.fleets[rec.name]
        self.metrics.forget_fleet(rec.name)

    # -- requests (called by the HTTP layer) ---------------------------------------
    def get(self, name: str, client: Client | None = None) -> FleetRecord:
        """The fleet, if ``client`` (None: the service itself) may see it: another
        client's fleet is "not found" (its existence is not revealed)."""
        rec = self.fleets.get(name) if valid_name(name) else None
        if rec is None or (client is not None and not client.owns(rec.owner)):
            raise ApiError(404, f"no fleet called {name!r}" if len(name) <= 80
                           else "no such fleet")
        return rec

    def visible(self, client: Client | None = None) -> list[FleetRecord]:
        """The fleets ``client`` may see, by name."""
        return [rec for _, rec in sorted(self.fleets.items())
                if client is None or client.owns(rec.owner)]

    def usage(self, client: Client) -> int:
        """The members ``client``'s fleets and leases hold or are asked for. A fleet
        counts its requested count, or the members it still has in vCenter when more
        (scaling down, being destroyed); a lease, or a lease request under way, one."""
        return sum(_holds(rec) for rec in self.fleets.values() if rec.owner == client.name) \
            + self.leases_held(client)

    def leases_held(self, client: Client) -> int:
        """Active leases of ``client``, and its lease requests under way."""
        return self._leasing[client.name] + sum(
            1 for lease in self.leases.values()
            if lease.client == client.name and lease.state == "active")

    def _check_quota(self, client: Client | None, rec: FleetRecord | None, count: int,
                     what: str) -> None:
        if client is None:
            return
        held = _holds(rec) if rec is not None else 0
        check_members(client, self.usage(client), count - held, what)

    def _check_accepting(self) -> None:
        if self._stopping or self._tg is None:
            raise stopping_error()

    async def apply(self, request: FleetRequest, body: Any = None,
                    client: Client | None = None) -> tuple[FleetRecord, bool]:
        """Create or re-specify a fleet; returns (record, created). A request naming a
        source vCenter does not have is refused (422; ``body``, as sent, gives the
        values the problems show). ``client`` (None: the service itself) owns a fleet
        it creates; another client's fleet name is taken (403), and its quota holds
        (429)."""
        self._check_accepting()
        spec = request.spec
        missing = await self.sources.problems(spec, client)
        if missing:
            raise invalid(missing, body)
        self._check_accepting()
        rec = self.fleets.get(spec.name)
        if rec is not None and client is not None and not client.owns(rec.owner):
            raise ApiError(403, f"the fleet name {spec.name} is taken by another client; "
                                "choose another name")
        if rec is not None and rec.want_destroy:
            raise ApiError(409, f"fleet {spec.name} is being destroyed "
                                f"({rec.destroy_reason}); try again when it is gone")
        # No await between the quota's check and the record: requests of one client
        # cannot pass it together.
        self._check_quota(client, rec, spec.count,
                          f"{'a' if rec is None else 'this'} fleet of {spec.count}")
        created = rec is None
        if rec is None:
            managed = sum(1 for r in self.fleets.values() if r.spec is not None)
            if managed >= self.config.max_fleets:
                raise ApiError(409, f"this service already runs {managed} fleets "
                                    f"(max_fleets = {self.config.max_fleets})")
            rec = FleetRecord(spec.name, spec.folder_path, created_at=self.clock(),
                              owner=client.name if client is not None else None)
            self.fleets[spec.name] = rec
        self._accept(rec, request, spec, request.data)
        with anyio.CancelScope(shield=True):  # accepted: a caller hanging up changes nothing
            await self._save(rec, must=True)
        self.workers.ensure(rec)
        rec.poke()
        self.scanner.wake()  # a new expiry may be sooner than the next scan
        log.info("fleet %s: accepted request %d (count %d%s)", rec.name, rec.generation,
                 spec.count, "" if rec.expires_at is None else
                 f", expires at {rec.expires_at:.0f}")
        return rec, created

    async def scale(self, name: str, make: Callable[[dict[str, Any]], FleetRequest],
                    client: Client | None = None) -> FleetRecord:
        self._check_accepting()
        rec = self.get(name, client)
        if rec.spec_data is None:
            raise ApiError(409, f"fleet {name} was discovered in vCenter, not requested "
                                "here: PUT its whole spec first")
        if rec.want_destroy:
            raise ApiError(409, f"fleet {name} is being destroyed ({rec.destroy_reason})")
        request = make(rec.spec_data)
        self._check_quota(client, rec, request.spec.count,
                          f"scaling fleet {name} to {request.spec.count}")
        self._accept(rec, request, request.spec, request.data)
        with anyio.CancelScope(shield=True):
            await self._save(rec, must=True)
        rec.poke()
        self.scanner.wake()
        log.info("fleet %s: accepted scale request %d (count %d)", name, rec.generation,
                 request.spec.count)
        return rec

    def _accept(self, rec: FleetRecord, request: FleetRequest, spec: FleetSpec,
                data: dict[str, Any]) -> None:
        rec.spec, rec.spec_data = spec, data
        rec.folder = spec.folder_path
        rec.generation += 1
        rec.status = "pending"
        rec.error = None
        rec.updated_at = self.clock()
        if request.ttl_s is not None:
            rec.expires_at = self.clock() + request.ttl_s
            rec.stamp_pending = True
        # Wait for the lock again, or run again, for the new request.
        rec.interrupt(f"superseded by request {rec.generation}")

    async def remove(self, name: str, client: Client | None = None) -> FleetRecord:
        """Destroy a fleet (in the background); idempotent while it is going."""
        self._check_accepting()
        rec = self.get(name, client)
        if not rec.want_destroy:
            self._doom(rec, "deleted")
            with anyio.CancelScope(shield=True):
                await self._save(rec)
        return rec

    def _doom(self, rec: FleetRecord, reason: str) -> None:
        """The fleet is to go (a delete, or its lifetime ended): its worker destroys it."""
        rec.want_destroy = True
        rec.destroy_reason = reason
        rec.status = "destroying"
        rec.updated_at = self.clock()
        rec.interrupt(f"fleet {reason}")
        self.workers.ensure(rec)
        rec.poke()
        log.info("fleet %s: %s; destroying its members", rec.name, reason)

    # -- pools and leases (docs/pools.md) ----------------------------------------------
    async def _unconfigured_pools(self) -> None:
        """Say which folders of ``pools_folder`` hold members of a pool the config no
        longer has: nobody serves them (their leases do not expire, nothing refills);
        they are left alone, for an admin to destroy or to configure again."""
        try:
            with anyio.fail_after(CALL_TIMEOUT_S):
                root = await self.vs.find_folder(self.config.pools_root)
                if root is None:
                    return
                for name, folder in await self.vs.list_child_folders(root):
                    if name in self.pools:
                        continue
                    vms = await self.vs.list_folder_vms(folder, (LABEL_POOL, LABEL_LEASE))
                    members = [vm for vm in vms if vm.labels.get(LABEL_POOL) == name]
                    if members:
                        leased = sum(1 for vm in members
                                     if vm.labels.get(LABEL_LEASE, "").startswith("leased"))
                        log.warning("%s/%s holds %d members (%d leased) of pool %s, which "
                                    "this config does not have: nobody serves them; "
                                    "configure the pool again, or destroy them",
                                    self.config.pools_root, name, len(members), leased, name)
        except (FleetError, TimeoutError) as exc:
            log.info("could not look for unconfigured pools: %s", exc)

    def visible_pools(self, client: Client | None = None) -> list[Pool]:
        return [pool for name, pool in sorted(self.pools.items())
                if client is None or client.may_lease(name)]

    def pool(self, name: str, client: Client | None = None, *, leasing: bool = False
             ) -> Pool:
        """The pool, if ``client`` may use it: 404 for none, 403 for one it may not
        (``leasing``: a lease request, counted as refused)."""
        pool = self.pools.get(name) if valid_name(name) else None
        if pool is None:
            raise ApiError(404, f"no pool called {name!r}" if len(name) <= 80
                           else "no such pool")
        if client is not None and not client.may_lease(name):
            if leasing:
                self.metrics.count_lease_refused(name, "not_allowed", client.name)
            allowed = ", ".join(client.pools or ()) or "none"
            raise ApiError(403, f"client {client.name} may not lease from pool {name} (its "
                                f"pools: {allowed})")
        return pool

    async def lease(self, pool_name: str, client: Client, *, ttl_s: float | None = None,
                    wait_s: float | None = None,
                    gone: Callable[[], bool] = lambda: False) -> Lease:
        """Lease a member of the pool for ``client`` (docs/pools.md): at once, or
        within ``wait_s``; quotas are checked first (429 naming the quota)."""
        self._check_accepting()
        pool = self.pool(pool_name, client, leasing=True)
        if ttl_s is not None and ttl_s > pool.cfg.max_lease_ttl_s:
            raise ApiError(422, f"ttl_s: {ttl_s:g} s is above pool {pool.name}'s "
                                f"max_lease_ttl_s ({pool.cfg.max_lease_ttl_s:g} s)")
        # No await between the quotas' checks and the reservation.
        try:
            check_leases(client, self.leases_held(client))
            check_members(client, self.usage(client), 1, "a lease")
        except QuotaExceeded:
            self.metrics.count_lease_refused(pool.name, "quota", client.name)
            raise
        self._leasing[client.name] += 1
        try:
            return await pool.lease(client.name, ttl_s, wait_s, gone)
        finally:
            self._leasing[client.name] -= 1
            if not self._leasing[client.name]:
                del self._leasing[client.name]

    def get_lease(self, lease_id: str, client: Client | None = None) -> Lease:
        """The lease, if ``client`` may see it (another's is 404, as for none)."""
        lease = self.leases.get(lease_id) if _LEASE_ID_OK(lease_id) else None
        if lease is None or (client is not None and not client.admin
                             and lease.client != client.name):
            raise ApiError(404, f"no lease {lease_id!r} here" if len(lease_id) <= 80
                           else "no such lease")
        return lease

    def visible_leases(self, client: Client | None = None) -> list[Lease]:
        return sorted((lease for lease in self.leases.values()
                       if client is None or client.admin or lease.client == client.name),
                      key=lambda lease: (lease.pool, lease.granted_at, lease.id))

    async def release(self, lease_id: str, client: Client | None = None) -> Lease:
        self._check_accepting()
        lease = self.get_lease(lease_id, client)
        await self.pools[lease.pool].release(lease)
        return lease

    async def extend(self, lease_id: str, ttl_s: float, client: Client | None = None
                     ) -> Lease:
        self._check_accepting()
        lease = self.get_lease(lease_id, client)
        await self.pools[lease.pool].extend(lease, ttl_s)
        return lease

    # -- snapshots for the API and metrics -----------------------------------------
    def update_gauges(self) -> None:
        for pool in self.pools.values():
            pool.update_gauges()
        statuses: Counter[str] = Counter()
        for rec in self.fleets.values():
            statuses[rec.status] += 1
            self.metrics.set_members(rec.name, rec.in_vcenter())
        self.metrics.set_fleets(statuses, STATUSES)
        self.metrics.set_limits(self.shared.limiters.statistics())
        self.metrics.drop_gone_fleets()

    def summary(self, rec: FleetRecord) -> dict[str, Any]:
        return summary_of(rec, self.clock())

    async def detail(self, rec: FleetRecord, *, offset: int = 0, limit: int = 1000
                     ) -> dict[str, Any]:
        """A page of the fleet, each member with its record (read for the page's
        members only; docs/inventory.md). If vCenter cannot be read, the members
        come without records and ``member_records_error`` says why."""
        out = detail_of(rec, self.clock(), offset=offset, limit=limit)
        page: list[dict[str, Any]] = out["member_list"]
        error: str | None = None
        records: list[MemberRecord] = []
        if page:
            try:
                records = await self.member_records(rec, {m["index"] for m in page})
            except (FleetError, TimeoutError) as exc:
                error = str(exc) or "vCenter did not answer in time"
        with_records(page, records)
        out["member_records_error"] = error
        return out

    async def member_records(self, rec: FleetRecord, indexes: Collection[int] | None = None
                             ) -> list[MemberRecord]:
        """The records of the fleet's members (those at ``indexes``), sorted by index.
        Members are found in the service's view of its folders when it has one (no
        call), else by a listing of the fleet's folder; their records are read for
        those not read in the last :data:`RECORDS_FRESH_S` seconds with their address
        and in the state they are in now (a caller polling a fleet does not read every
        ready member each time)."""
        vms = await self._fleet_vms(rec)
        members = [m for m in (as_member(vm, rec.name) for vm in vms)
                   if m is not None and (indexes is None or m.index in indexes)]
        now = anyio.current_time()
        cache = self._records
        for vm_id in [k for k, (at, _) in cache.items() if now - at > RECORDS_FRESH_S]:
            del cache[vm_id]
        kept: dict[str, MemberRecord] = {}
        for m in members:
            hit = cache.get(m.vm.ref.id)
            # Only a member with its address, and still in the state it was read in:
            # one without may get it any moment (DHCP, the run's next phase).
            if hit is not None and hit[1].fleet == rec.name and hit[1].state == m.state:
                kept[m.vm.ref.id] = hit[1]
        stale = [m.vm.ref for m in members if m.vm.ref.id not in kept]
        for record in await read_records(self.vs, rec.name, stale, call_s=CALL_TIMEOUT_S):
            kept[record.vm] = record
            if record.address_status == "ok":
                cache[record.vm] = (now, record)
        return sorted(kept.values(), key=lambda r: (r.index, r.name))

    async def _fleet_vms(self, rec: FleetRecord) -> list[ListedVm]:
        tree = self.scanner.tree
        if tree is not None and tree.synced and tree.error is None and \
                rec.folder == self.config.fleet_folder(rec.name):
            for name, ref in tree.folders():
                if name == rec.name:
                    return tree.vms_in(ref)
            return []
        with anyio.fail_after(CALL_TIMEOUT_S):
            folder = await self.vs.find_folder(rec.folder)
            return await self.vs.list_folder_vms(folder, RECONCILE_LABELS) \
                if folder is not None else []



# -- quotas (docs/api.md, "Clients") ---------------------------------------------------

def _holds(rec: FleetRecord) -> int:
    """The members a fleet counts for its owner's quota (FleetService.usage)."""
    existing = sum(rec.in_vcenter().values())
    if rec.want_destroy or rec.spec is None:
        return existing
    return max(rec.spec.count, existing)


@dataclass
class QuotaExceeded(ApiError):
    """429: a request would take a client past one of its quotas."""

    quota: str = ""
    limit: int = 0
    usage: int = 0
    wanted: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["error"]["quota"] = {"name": self.quota, "limit": self.limit,
                                 "usage": self.usage, "requested": self.wanted}
        return out


def check_leases(client: Client, held: int) -> None:
    """Refuse (429) one more lease if the client holds its ``max_leases``."""
    limit = client.max_leases
    if client.admin or limit is None or held + 1 <= limit:
        return
    raise QuotaExceeded(
        429, f"quota max_leases: client {client.name} holds {held} leases (or requests "
             f"under way); its quota is {limit}; return one first",
        quota="max_leases", limit=limit, usage=held, wanted=1)


def _instance_id(state: Path) -> str:
    """This service's instance id, kept in its state directory (docs/pools.md): a
    restart is the same instance, another directory another one."""
    path = state / "instance"
    try:
        raw = path.read_text().strip()
        if _INSTANCE.fullmatch(raw):
            return raw
    except (OSError, UnicodeError):
        pass
    new = instance_id()
    write_atomically(path, new.encode())
    return new


_INSTANCE = re.compile(r"[0-9a-f]{12}")
_LEASE_ID_OK = re.compile(r"[0-9a-f]{16}").fullmatch


def check_members(client: Client, usage: int, wanted: int, change: str) -> None:
    """Refuse (429) ``change``, which would take the client from ``usage`` members to
    ``usage + wanted``, if that is above its ``max_members``; growth only: a request
    that does not add members passes even over the quota (it was lowered)."""
    limit = client.max_members
    if client.admin or limit is None or wanted <= 0 or usage + wanted <= limit:
        return
    raise QuotaExceeded(
        429, f"quota max_members: {change} would take client {client.name} to "
             f"{usage + wanted} members across its fleets; its quota is {limit} and it "
             f"has {usage}", quota="max_members", limit=limit, usage=usage, wanted=wanted)
