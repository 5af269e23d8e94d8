"""The scanner: what vCenter says about the service's fleets, and their lifetimes.

:class:`Scanner` keeps a live view of the service's root folder (a
:class:`~fleet.vsphere.model.FolderTree`: one property filter over the root, its
fleet folders and their VMs, kept by ``WaitForUpdatesEx``; docs/watching.md, "The
service's view"). vCenter is read in full only when the watch starts and after it
is lost; every *scan* after that works from the view, in memory. A scan finds
fleets made before a restart or by ``fleet provision`` (status ``discovered``),
brings the member view of every idle fleet in line with its VMs, forgets a
discovered fleet that is gone from vCenter, and reads each fleet's expiry from its
members' labels (``fleet.engine.lifetime``). A scan runs when the view changes (at
most every ``MIN_GAP_S``), at the soonest expiry and every ``scan_interval_s``;
a fleet whose VMs did not change since the last scan is not converted again. A
fleet with a run under way is left to the run: its events keep its view current.
While the root folder does not exist, it is looked for every ``scan_interval_s``
(and whenever the service is poked), and fleets show no members.

It never starts a run or a destroy itself: it asks the service through two
callbacks, ``start_worker`` (a fleet it found, or any fleet whose worker has
ended) and ``doom`` (a fleet whose lifetime is over).

A view that lags behind vCenter must not bring a deleted fleet back: the service
buries a destroyed fleet (:meth:`Scanner.bury`), and a buried name that the view
still shows with members is registered again only if a direct read of its folder,
made after the burial, finds members there (docs/locking.md).

:func:`refresh` reads one fleet's members back, for the worker after a run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from fleet.api.context import ServiceContext
from fleet.api.records import FleetRecord
from fleet.api.requests import valid_name
from fleet.api.tokens import owner_of
from fleet.engine.lifetime import FLEET_LABELS, fleet_expiry
from fleet.engine.reconcile import Member, as_member
from fleet.errors import FleetError, NotFound
from fleet.vsphere.model import FolderTree, ListedVm, Ref, VSphere

log = logging.getLogger("fleet.api")

#: deadline of one vCenter call the service makes itself (a scan gets four)
CALL_TIMEOUT_S = 60.0
#: the least time between two scans (changes come in bursts; docs/watching.md)
MIN_GAP_S = 0.1


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
        self.error: str | None = None  # why the view is not current, until it is again
        self.last_at: float | None = None
        self.tree: FolderTree | None = None  # the live view, while the root folder exists
        self._wake = anyio.Event()
        #: names of destroyed fleets the view may still show
        self._buried: set[str] = set()
        #: fleet name -> (folder id, the view's version of it) when its members were shown
        self._seen: dict[str, tuple[str, int]] = {}

    def wake(self) -> None:
        """Look again now: a new expiry may be sooner, a new root folder may exist."""
        self._wake.set()

    def bury(self, name: str) -> None:
        """The fleet's delete has finished; the view may not show it yet."""
        self._buried.add(name)
        self._seen.pop(name, None)

    async def scan(self) -> None:
        """Bring the fleets in line with the view: find fleets, refresh idle ones,
        enforce lifetimes."""
        ctx = self.ctx
        tree = self.tree
        found: dict[str, list[Member] | None] = {}  # None: unchanged since the last scan
        if tree is not None and tree.synced:
            folders = list(tree.folders())
            # A burial ends once the view no longer shows the folder (bounded memory).
            self._buried.intersection_update(name for name, _ in folders)
            for name, ref in folders:
                if not valid_name(name):
                    continue
                rec = ctx.fleets.get(name)
                if rec is not None and rec.running:
                    found[name] = None
                    continue  # its run keeps the view current
                if rec is not None and rec.folder != ctx.config.fleet_folder(name):
                    continue
                version = (ref.id, tree.folder_version(ref))
                if rec is not None and self._seen.get(name) == version:
                    found[name] = None
                    continue
                members = _members(tree.vms_in(ref), name)
                if rec is None and members and name in self._buried:
                    members = await self._confirm(ref, name)
                    if not members:
                        continue  # the view lags behind the delete: not a fleet now
                    # Only a direct read lifts a burial: a scan that still finds the
                    # record (it leaves the table after its file) proves nothing.
                    self._buried.discard(name)
                found[name] = members
                self._seen[name] = version
        for name, got in found.items():
            rec = ctx.fleets.get(name)
            if got is None:
                continue
            if rec is None:
                if not got or name in self._buried:
                    continue  # buried while this scan waited for vCenter
                rec = FleetRecord(name, ctx.config.fleet_folder(name),
                                  created_at=ctx.clock(), updated_at=ctx.clock())
                ctx.fleets[name] = rec
                log.info("fleet %s: discovered in vCenter with %d members", name, len(got))
                self._start_worker(rec)
            if rec.running:
                self._seen.pop(name, None)  # shown by its run from now on
                continue
            rec.show_members(got)
            if rec.owner is None and got:
                # Its owner as its members carry it: a fleet whose saved request was
                # lost still belongs to the client that made it (fleet.api.tokens).
                rec.owner = owner_of(m.vm.labels for m in got)
            if got and not rec.stamp_pending:
                rec.expires_at = fleet_expiry(got)
        for name, rec in list(ctx.fleets.items()):
            if name in found or rec.running or rec.want_destroy:
                continue
            self._seen.pop(name, None)
            if rec.spec is None:
                del ctx.fleets[name]  # destroyed behind our back (fleet destroy)
                ctx.metrics.forget_fleet(name)
                log.info("fleet %s: no longer in vCenter", name)
            elif tree is None or rec.folder == ctx.config.fleet_folder(name):
                rec.show_members([])
        self.enforce_lifetimes()
        self.scans += 1
        self.last_at = ctx.clock()

    async def _confirm(self, folder: Ref, name: str) -> list[Member]:
        """Members of a buried fleet's folder, read now (the view may lag)."""
        try:
            with anyio.fail_after(CALL_TIMEOUT_S):
                return _members(await self.ctx.vs.list_folder_vms(folder, FLEET_LABELS),
                                name)
        except NotFound:
            return []

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

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the view and scan from it until cancelled. ``started`` once the first
        scan is done; if vCenter cannot be read at all then, the error is raised."""
        first = True
        while True:
            try:
                with anyio.fail_after(CALL_TIMEOUT_S):
                    root = await self.ctx.vs.find_folder(self.ctx.config.root_folder)
            except (FleetError, TimeoutError) as exc:
                if first:
                    raise
                self._failed(exc)
                await self._pause(None)
                continue
            if root is None:
                self.tree = None
                await self._scan_once()
                self._ensure_workers()
                if first:
                    first = False
                    task_status.started()
                await self._pause(None)
                continue
            tree = self.ctx.vs.folder_tree(root, FLEET_LABELS)
            async with anyio.create_task_group() as tg:
                with anyio.fail_after(CALL_TIMEOUT_S * 4):
                    await tg.start(tree.run)
                if first and tree.error is not None:
                    raise FleetError(tree.error)
                self.tree = tree
                await self._follow(tree, task_status if first else None)
                first = False
                tg.cancel_scope.cancel()
            self.tree = None

    async def _follow(self, tree: FolderTree, task_status: TaskStatus[None] | None) -> None:
        """Scan whenever the view changes (at most every MIN_GAP_S), at expiries and
        every ``scan_interval_s``, until the root folder is gone."""
        seen = -1
        next_scan = 0.0
        while not tree.root_gone:
            if tree.error is not None:
                self.error = tree.error
            elif tree.synced and (tree.generation != seen
                                  or anyio.current_time() >= next_scan):
                seen = tree.generation
                next_scan = anyio.current_time() + self.ctx.config.scan_interval_s
                await self._scan_once()
                if task_status is not None:
                    task_status.started()
                    task_status = None
            else:
                self.enforce_lifetimes()
            self._ensure_workers()
            await self._pause(tree, seen, next_scan)
            await anyio.sleep(MIN_GAP_S)  # changes come in bursts: take them together

    def _ensure_workers(self) -> None:
        """Every fleet has its worker (one whose worker ended gets a new one)."""
        for rec in self.ctx.fleets.values():
            self._start_worker(rec)

    async def _scan_once(self) -> None:
        try:
            with anyio.fail_after(CALL_TIMEOUT_S * 4):
                await self.scan()
            self.error = None
        except (FleetError, TimeoutError) as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self.error = str(exc) or "vCenter did not answer in time"
        log.warning("scan failed: %s", self.error)

    async def _pause(self, tree: FolderTree | None, seen: int = 0,
                     next_scan: float | None = None) -> None:
        """Until the next scan is due: the view changes, the soonest expiry, a wake,
        or ``scan_interval_s``."""
        now = anyio.current_time()
        wait = (next_scan if next_scan is not None else now
                + self.ctx.config.scan_interval_s) - now
        expiry = self.next_expiry()
        if expiry is not None:
            wait = min(wait, expiry - self.ctx.clock())
        with anyio.move_on_after(max(0.0, wait)):
            async with anyio.create_task_group() as tg:
                if tree is not None:
                    async def changed() -> None:
                        await tree.wait_changed(seen)
                        tg.cancel_scope.cancel()
                    tg.start_soon(changed)
                await self._wake.wait()
                tg.cancel_scope.cancel()
        self._wake = anyio.Event()
