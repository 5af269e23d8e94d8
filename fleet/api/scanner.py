"""The scanner: what vCenter says about the service's fleets, and their lifetimes.

:class:`Scanner` reads the service's root folder at start-up and every
``scan_interval_s``: it finds fleets made before a restart or by ``fleet
provision`` (status ``discovered``), brings the member view of every idle fleet
in line with its VMs, forgets a discovered fleet that is gone from vCenter, and
reads each fleet's expiry from its members' labels (``fleet.engine.lifetime``).
Between scans it wakes at the soonest expiry, so a fleet is destroyed when its
lifetime ends, not at the next scan. A fleet with a run under way is left to the
run: its events keep its view current.

It never starts a run or a destroy itself: it asks the service through two
callbacks, ``start_worker`` (a fleet it found, or any fleet whose worker has
ended) and ``doom`` (a fleet whose lifetime is over).

A scan that read the root folder before a delete finished must not bring the
fleet back: the service buries a destroyed fleet (:meth:`Scanner.bury`) with the
number of scans started by then, and a scan never registers a fleet whose
tombstone is at least its own number (docs/locking.md).

:func:`refresh` reads one fleet's members back, for the worker after a run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from fleet.api.context import ServiceContext
from fleet.api.records import FleetRecord
from fleet.api.requests import valid_name
from fleet.engine.lifetime import FLEET_LABELS, fleet_expiry
from fleet.engine.reconcile import Member, as_member
from fleet.errors import FleetError, NotFound
from fleet.vsphere.model import ListedVm, VSphere

log = logging.getLogger("fleet.api")

#: deadline of one vCenter call the service makes itself (a scan gets four)
CALL_TIMEOUT_S = 60.0


def _members(vms: list[ListedVm], fleet: str) -> list[Member]:
    return [m for m in (as_member(vm, fleet) for vm in vms) if m is not None]


async def refresh(vs: VSphere, rec: FleetRecord) -> None:
    """Read one fleet's members from vCenter into its view (unless a run has begun)."""
    with anyio.fail_after(CALL_TIMEOUT_S):
        folder = await vs.find_folder(rec.folder)
        vms: list[ListedVm] = (await vs.list_folder_vms(folder, FLEET_LABELS)
                                if folder else [])
    members = _members(vms, rec.name)
    if not rec.running:
        rec.show_members(members)


class Scanner:
    """See the module docstring."""

    def __init__(self, ctx: ServiceContext, *, start_worker: Callable[[FleetRecord], None],
                 doom: Callable[[FleetRecord, str], None]) -> None:
        self.ctx = ctx
        self._start_worker = start_worker
        self._doom = doom
        self.scans = 0  # scans that ended well
        self.error: str | None = None  # why the last scan failed, until one succeeds
        self.last_at: float | None = None
        self._wake = anyio.Event()
        self._started = 0
        #: fleet name -> scans started when its delete finished
        self._tombstones: dict[str, int] = {}

    def wake(self) -> None:
        """Look at expiries again now: a new one may be sooner than the next scan."""
        self._wake.set()

    def bury(self, name: str) -> None:
        """The fleet's delete has finished: a scan under way read the root folder
        before this, and must not bring the fleet back."""
        self._tombstones[name] = self._started

    async def scan(self) -> None:
        """Read the root folder: find fleets, refresh idle ones, enforce lifetimes."""
        ctx = self.ctx
        self._started += 1
        number = self._started
        # Scans run one at a time: a tombstone older than this scan guards nothing now.
        self._tombstones = {n: t for n, t in self._tombstones.items() if t >= number}
        root = await ctx.vs.find_folder(ctx.config.root_folder)
        found: dict[str, list[Member]] = {}
        if root is not None:
            for name, ref in await ctx.vs.list_child_folders(root):
                if not valid_name(name):
                    continue
                rec = ctx.fleets.get(name)
                if rec is not None and rec.running:
                    continue  # its run keeps the view current
                if rec is not None and rec.folder != ctx.config.fleet_folder(name):
                    continue
                try:
                    vms = await ctx.vs.list_folder_vms(ref, FLEET_LABELS)
                except NotFound:
                    continue  # removed since the root was read (a delete finished)
                found[name] = _members(vms, name)
        for name, members in found.items():
            rec = ctx.fleets.get(name)
            if rec is None:
                if not members or self._tombstones.get(name, -1) >= number:
                    continue  # none, or read before its delete finished: not a fleet now
                rec = FleetRecord(name, ctx.config.fleet_folder(name),
                                  created_at=ctx.clock(), updated_at=ctx.clock())
                ctx.fleets[name] = rec
                log.info("fleet %s: discovered in vCenter with %d members", name,
                         len(members))
                self._start_worker(rec)
            if rec.running:
                continue
            rec.show_members(members)
            if members and not rec.stamp_pending:
                rec.expires_at = fleet_expiry(members)
        for name, rec in list(ctx.fleets.items()):
            if name in found or rec.running or rec.want_destroy:
                continue
            if rec.spec is None:
                del ctx.fleets[name]  # destroyed behind our back (fleet destroy)
                ctx.metrics.forget_fleet(name)
                log.info("fleet %s: no longer in vCenter", name)
            elif root is None or rec.folder == ctx.config.fleet_folder(name):
                rec.show_members([])
        self.enforce_lifetimes()
        self.scans += 1
        self.last_at = ctx.clock()
        self.error = None

    def enforce_lifetimes(self) -> None:
        now = self.ctx.clock()
        for rec in list(self.ctx.fleets.values()):
            if rec.expires_at is not None and rec.expires_at <= now and not rec.want_destroy:
                self.ctx.metrics.expired.inc()
                self._doom(rec, f"expired at {rec.expires_at:.0f}")

    def next_expiry(self) -> float | None:
        times = [r.expires_at for r in self.ctx.fleets.values()
                 if r.expires_at is not None and not r.want_destroy]
        return min(times) if times else None

    async def run(self) -> None:
        """Scan every ``scan_interval_s``, enforce lifetimes as they end, and see that
        every fleet has its worker. Runs until cancelled."""
        interval = self.ctx.config.scan_interval_s
        next_scan = anyio.current_time() + interval
        while True:
            expiry = self.next_expiry()
            wait = next_scan - anyio.current_time()
            if expiry is not None:
                wait = min(wait, expiry - self.ctx.clock())
            with anyio.move_on_after(max(0.0, wait)):
                await self._wake.wait()
            self._wake = anyio.Event()
            if anyio.current_time() >= next_scan:
                next_scan = anyio.current_time() + interval
                try:
                    with anyio.fail_after(CALL_TIMEOUT_S * 4):
                        await self.scan()
                except (FleetError, TimeoutError) as exc:
                    self.error = str(exc) or "the scan timed out"
                    log.warning("scan failed: %s", self.error)
            self.enforce_lifetimes()
            for rec in self.ctx.fleets.values():
                self._start_worker(rec)
