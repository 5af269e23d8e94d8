"""The fleet service: many fleets, one vCenter session, one set of limits.

:class:`FleetService` owns every fleet the service knows, a worker task per
fleet, and a scanner. It is an async context manager; the HTTP layer
(``fleet.api.app``) only calls its synchronous accessors and its ``apply``,
``scale`` and ``remove`` coroutines, which validate, record and return at once.

Fleets and where their truth lives:

- Members live in vCenter: VMs in ``<root_folder>/<name>`` labelled with the
  fleet's name. The scanner reads the root folder at start-up and every
  ``scan_interval_s``, so fleets made before a restart, or by ``fleet
  provision``, are found again (status ``discovered`` when no request for them
  is on record).
- Requests (the spec, its generation) are kept in the state directory
  (``fleet.api.state``) so a build interrupted by a restart is resumed.
- Lifetimes are labels on the members (``fleet.engine.lifetime``); the record
  keeps the expiry while a fleet has no member yet.

A fleet's worker runs one provisioning run at a time. A newer request stops
the current run (in-flight clones finish or are cleaned up) and starts another
with the new spec; a delete stops it, destroys the members and removes the
fleet's folder. Every run and delete holds the fleet's lock in vCenter
(``fleet.engine.lock``, docs/locking.md), so the service and ``fleet
provision``/``destroy`` on any machine never work on one fleet at once; a run
whose fleet is locked waits (status ``pending``, ``error`` naming the holder).

A scan that read the root folder before a delete finished must not bring the
fleet back: a delete leaves a tombstone stamped with the number of scans started
by then, and a scan never registers a fleet whose tombstone is at least its own
number (docs/locking.md). All runs draw
from one :class:`~fleet.engine.shared.SharedLimits`, which wakes the run with
the fewest clones at vCenter first, so bursts share capacity fairly. Every run
feeds the one :class:`~fleet.metrics.FleetMetrics` (``events_for``) and the
fleet's member view, which answers ``GET`` without a vCenter call.

States: ``pending`` (accepted, run not started) -> ``provisioning`` ->
``ready`` | ``incomplete`` (the run ended with failures) | ``failed`` (the run
could not start: bad source, permissions) ; ``retrying`` (vCenter unreachable,
will try again) ; ``destroying`` (deleted or expired) ; ``discovered``.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from fleet.api.config import ServiceConfig
from fleet.api.requests import ApiError, FleetRequest, valid_name
from fleet.api.state import SavedFleet, StateStore
from fleet.engine.events import Event
from fleet.engine.lifetime import expiry_labels, fleet_expiry, stamp_expiry
from fleet.engine.lock import FleetLock, LockLost, LockOptions, LockView
from fleet.engine.operations import check_spec, destroy, lost_message
from fleet.engine.reconcile import Member, as_member
from fleet.engine.run import EngineOptions, Provisioner
from fleet.engine.shared import SharedLimits
from fleet.engine.spec import FleetSpec, spec_from_dict
from fleet.engine.summary import RemovalSummary, Summary
from fleet.errors import ConfigError, FleetError, NotFound, TransientVSphereError
from fleet.metrics import FleetMetrics
from fleet.vsphere.model import VmInfo, VSphere

log = logging.getLogger("fleet.api")

STATUSES = ("pending", "provisioning", "retrying", "ready", "incomplete", "failed",
            "destroying", "discovered")
#: statuses after which a restarted service runs the fleet's request again
UNFINISHED = ("pending", "provisioning", "retrying")
MEMBER_STATES = ("queued", "cloning", "cloned", "network", "ready", "failed")
RETRY_MAX_S = 60.0
#: deadline of one vCenter call the service makes itself (a scan gets four)
CALL_TIMEOUT_S = 60.0


@dataclass
class MemberView:
    """One member (or would-be member) as the service last saw it."""

    index: int
    name: str
    state: str  # queued | cloning | cloned | network | ready | failed
    vm: str | None = None
    source: str | None = None
    host: str | None = None
    attempt: int = 0
    phases_s: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "state": self.state, "vm": self.vm,
                "source": self.source, "host": self.host, "attempt": self.attempt,
                "phases_s": dict(self.phases_s), "reason": self.reason,
                "message": self.message}


@dataclass(eq=False)
class FleetRecord:
    name: str
    folder: str
    spec: FleetSpec | None = None
    spec_data: dict[str, Any] | None = None
    status: str = "discovered"
    generation: int = 0
    applied: int = 0  # generation of the last run that ended (not superseded)
    expires_at: float | None = None
    stamp_pending: bool = False  # members must be relabelled with expires_at
    created_at: float = 0.0
    updated_at: float = 0.0
    members: dict[int, MemberView] = field(default_factory=dict)
    provisioner: Provisioner | None = None
    run_started_at: float | None = None
    summary: Summary | None = None
    removal: RemovalSummary | None = None
    error: str | None = None
    want_destroy: bool = False
    destroy_reason: str = ""
    wake: anyio.Event = field(default_factory=anyio.Event)
    worker: bool = False
    #: set while a run waits for the fleet's lock: a newer request or a delete cancels it
    lock_wait: anyio.CancelScope | None = None
    lock_holder: str | None = None  # who held the lock when we last looked (logged once)

    @property
    def requested(self) -> int | None:
        return self.spec.count if self.spec is not None else None

    def poke(self) -> None:
        self.wake.set()

    def by_state(self) -> dict[str, int]:
        return dict(Counter(m.state for m in self.members.values()))

    def in_vcenter(self) -> dict[str, int]:
        """Members that exist as VMs, by their label state."""
        return dict(Counter(m.state for m in self.members.values()
                            if m.state in ("cloned", "network", "ready")))


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
        self.scans = 0
        self.scan_error: str | None = None
        self.last_scan_at: float | None = None
        self._tg: TaskGroup | None = None
        self._stopping = False
        self._scan_wake = anyio.Event()
        self._runs_done = anyio.Event()
        self._scans_started = 0
        #: fleet name -> scans started when its delete finished (see the module docstring)
        self._tombstones: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------
    async def __aenter__(self) -> FleetService:
        await self.store.prepare()
        for saved in await self.store.load_all():
            self._restore(saved)
        with anyio.fail_after(CALL_TIMEOUT_S * 4):
            await self.scan()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._scanner)
        for rec in self.fleets.values():
            self._ensure_worker(rec)
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
        running = [r for r in self.fleets.values() if r.provisioner is not None]
        for rec in running:
            assert rec.provisioner is not None
            rec.provisioner.stop("service stopping")
        if running:
            with anyio.CancelScope(shield=True), \
                    anyio.move_on_after(self.config.shutdown_grace_s + CALL_TIMEOUT_S):
                await self._runs_done.wait()
        tg.cancel_scope.cancel()
        # Exited where it was entered (not inside another scope), as anyio requires.
        await tg.__aexit__(None, None, None)
        log.info("service stopped")

    @property
    def ready(self) -> bool:
        return self._tg is not None and self.scan_error is None and not self._stopping

    def _limit_changed(self, key: Any, old: float, new: float) -> None:
        self.metrics.limit.labels(str(key)).set(new)

    def _restore(self, saved: SavedFleet) -> None:
        if saved.spec is None:
            # A fleet found in vCenter, not requested here, that a caller asked to destroy.
            if saved.status == "destroying":
                self.fleets[saved.name] = FleetRecord(
                    saved.name, self.config.fleet_folder(saved.name), status="destroying",
                    want_destroy=True, destroy_reason=saved.extra.get("destroy_reason", ""),
                    created_at=saved.created_at, updated_at=saved.updated_at)
            return
        try:
            spec = spec_from_dict(saved.spec, source=f"state of fleet {saved.name}",
                                  env=self.config.env, base_dir=self.config.base_dir)
        except ConfigError as exc:
            log.warning("fleet %s: its saved request no longer validates (%s); it is kept "
                        "as discovered", saved.name, exc)
            return
        rec = FleetRecord(saved.name, spec.folder_path, spec, saved.spec,
                          status=saved.status, generation=saved.generation,
                          applied=saved.generation, expires_at=saved.expires_at,
                          created_at=saved.created_at, updated_at=saved.updated_at)
        if saved.status in UNFINISHED:
            rec.applied = saved.generation - 1
            rec.stamp_pending = rec.expires_at is not None
        if saved.status == "destroying":
            rec.want_destroy = True
            rec.destroy_reason = saved.extra.get("destroy_reason", "deleted")
        self.fleets[saved.name] = rec

    def _ensure_worker(self, rec: FleetRecord) -> None:
        if rec.worker or self._tg is None:
            return
        rec.worker = True
        self._tg.start_soon(self._worker, rec)

    async def _save(self, rec: FleetRecord, *, must: bool = False) -> None:
        """Record the fleet's request. ``must``: a request is being accepted, and is not
        unless it is on disk (503); otherwise a failure is logged and retried later."""
        if rec.spec_data is None and not rec.want_destroy:
            return  # nothing vCenter does not already say
        try:
            await self.store.save(SavedFleet(
                name=rec.name, spec=rec.spec_data, generation=rec.generation,
                status=rec.status, expires_at=rec.expires_at, created_at=rec.created_at,
                updated_at=rec.updated_at,
                extra={"destroy_reason": rec.destroy_reason} if rec.want_destroy else {}))
        except OSError as exc:
            log.error("fleet %s: cannot record its request in %s: %s", rec.name,
                      self.store.path, exc.strerror or exc)
            if must:
                raise ApiError(503, "the service cannot record requests now (state "
                                    "directory unwritable); try again later") from None

    # -- requests (called by the HTTP layer) ---------------------------------------
    def get(self, name: str) -> FleetRecord:
        rec = self.fleets.get(name) if valid_name(name) else None
        if rec is None:
            raise ApiError(404, f"no fleet called {name!r}" if len(name) <= 80
                           else "no such fleet")
        return rec

    def _check_accepting(self) -> None:
        if self._stopping or self._tg is None:
            raise ApiError(503, "the service is stopping")

    async def apply(self, request: FleetRequest) -> tuple[FleetRecord, bool]:
        """Create or re-specify a fleet; returns (record, created)."""
        self._check_accepting()
        spec = request.spec
        rec = self.fleets.get(spec.name)
        created = rec is None
        if rec is None:
            managed = sum(1 for r in self.fleets.values() if r.spec is not None)
            if managed >= self.config.max_fleets:
                raise ApiError(409, f"this service already runs {managed} fleets "
                                    f"(max_fleets = {self.config.max_fleets})")
            rec = FleetRecord(spec.name, spec.folder_path, created_at=self.clock())
            self.fleets[spec.name] = rec
        elif rec.want_destroy:
            raise ApiError(409, f"fleet {spec.name} is being destroyed "
                                f"({rec.destroy_reason}); try again when it is gone")
        self._accept(rec, request, spec, request.data)
        with anyio.CancelScope(shield=True):  # accepted: a caller hanging up changes nothing
            await self._save(rec, must=True)
        self._ensure_worker(rec)
        rec.poke()
        self._scan_wake.set()  # a new expiry may be sooner than the next scan
        log.info("fleet %s: accepted request %d (count %d%s)", rec.name, rec.generation,
                 spec.count, "" if rec.expires_at is None else
                 f", expires at {rec.expires_at:.0f}")
        return rec, created

    async def scale(self, name: str, make: Callable[[dict[str, Any]], FleetRequest]
                    ) -> FleetRecord:
        self._check_accepting()
        rec = self.get(name)
        if rec.spec_data is None:
            raise ApiError(409, f"fleet {name} was discovered in vCenter, not requested "
                                "here: PUT its whole spec first")
        if rec.want_destroy:
            raise ApiError(409, f"fleet {name} is being destroyed ({rec.destroy_reason})")
        request = make(rec.spec_data)
        self._accept(rec, request, request.spec, request.data)
        with anyio.CancelScope(shield=True):
            await self._save(rec, must=True)
        rec.poke()
        self._scan_wake.set()
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
        if rec.provisioner is not None:
            rec.provisioner.stop(f"superseded by request {rec.generation}")
        if rec.lock_wait is not None:
            rec.lock_wait.cancel()  # wait for the lock again, for the new request

    async def remove(self, name: str) -> FleetRecord:
        """Destroy a fleet (in the background); idempotent while it is going."""
        self._check_accepting()
        rec = self.get(name)
        if not rec.want_destroy:
            self._doom(rec, "deleted")
            with anyio.CancelScope(shield=True):
                await self._save(rec)
        return rec

    def _doom(self, rec: FleetRecord, reason: str) -> None:
        rec.want_destroy = True
        rec.destroy_reason = reason
        rec.status = "destroying"
        rec.updated_at = self.clock()
        if rec.provisioner is not None:
            rec.provisioner.stop(f"fleet {reason}")
        if rec.lock_wait is not None:
            rec.lock_wait.cancel()
        self._ensure_worker(rec)
        rec.poke()
        log.info("fleet %s: %s; destroying its members", rec.name, reason)

    # -- workers -------------------------------------------------------------------
    async def _worker(self, rec: FleetRecord) -> None:
        failures = 0
        try:
            while not self._stopping and self.fleets.get(rec.name) is rec:
                try:
                    if rec.want_destroy:
                        if await self._destroy(rec):
                            return
                        failures += 1
                    elif rec.spec is not None and rec.applied < rec.generation:
                        if await self._run(rec):
                            failures = 0
                            continue
                        failures += 1
                    else:
                        failures = 0
                except Exception as exc:  # a bug in one fleet must not stop the others
                    log.exception("fleet %s: worker error", rec.name)
                    rec.error = f"internal error: {type(exc).__name__}"
                    failures += 1
                delay = self.config.scan_interval_s if failures == 0 else \
                    min(RETRY_MAX_S, 0.5 * 2.0 ** min(failures, 10))
                with anyio.move_on_after(delay):
                    await rec.wake.wait()
                rec.wake = anyio.Event()
        finally:
            rec.worker = False

    async def _run(self, rec: FleetRecord) -> bool:
        """One provisioning run of the fleet's current request. False: retry later."""
        assert rec.spec is not None
        spec, generation = rec.spec, rec.generation
        rec.status = "provisioning"
        rec.error = None
        await self._save(rec)
        for member in rec.members.values():
            member.reason = member.message = None
        metrics_events = self.metrics.events_for(rec.name)

        def on_event(event: Event) -> None:
            metrics_events(event)
            self._member_event(rec, event)

        rec.run_started_at = self.clock()
        run_id = uuid.uuid4().hex[:12]
        lock = FleetLock(self.vs, rec.name, spec.folder_path, op="serve-provision",
                         run_id=run_id, options=self._lock_options(rec))
        try:
            await check_spec(spec, self.vs)  # a wrong spec fails before anything is made
            rec.lock_wait = anyio.CancelScope()
            try:
                with rec.lock_wait:
                    await lock.acquire()
            finally:
                rec.lock_wait = None
            if not lock.acquired:
                return True  # a newer request, a delete or a stop came while it waited
            async with lock:
                rec.lock_holder = None
                if rec.status == "pending":
                    rec.status, rec.error = "provisioning", None
                if rec.stamp_pending and rec.expires_at is not None:
                    n = await stamp_expiry(spec, self.vs, rec.expires_at)
                    rec.stamp_pending = False
                    if n:
                        log.info("fleet %s: %d members relabelled to expire at %.0f", rec.name,
                                 n, rec.expires_at)
                if rec.generation != generation or rec.want_destroy or self._stopping:
                    return True
                options = EngineOptions(shared_limits=self.shared,
                                        labels=expiry_labels(rec.expires_at))
                provisioner = rec.provisioner = Provisioner(spec, self.vs, on_event=on_event,
                                                            run_id=run_id, options=options)
                lock.on_lost(lambda why: provisioner.stop(f"lost the fleet's lock: {why}"))
                try:
                    summary = await provisioner.run()
                finally:
                    self._run_ended(rec)
            if lock.lost_reason is not None:
                rec.summary = summary
                await self._run_failed(rec, generation, "retrying",
                                       lost_message(rec.name, lock.lost_reason))
                return False
        except ConfigError as exc:
            rec.provisioner = None
            return await self._run_failed(rec, generation, "failed", str(exc))
        except (TransientVSphereError, TimeoutError) as exc:
            rec.provisioner = None
            await self._run_failed(rec, generation, "retrying",
                                   str(exc) or "vCenter did not answer in time")
            return False
        except FleetError as exc:
            rec.provisioner = None
            return await self._run_failed(rec, generation, "failed", str(exc))
        except Exception as exc:  # a bug must not take the service (or other fleets) down
            log.exception("fleet %s: the run failed unexpectedly", rec.name)
            rec.provisioner = None
            return await self._run_failed(rec, generation, "failed",
                                          f"internal error: {type(exc).__name__}")
        rec.provisioner = None
        rec.summary = summary
        superseded = rec.generation != generation or rec.want_destroy
        if self._stopping or superseded:
            return True  # the newer request (or the destroy, or the next start) takes over
        try:
            # Read the members back first (VM ids, labels), so that a caller who sees the
            # new status sees the members that go with it.
            await self._refresh(rec)
        except (FleetError, TimeoutError) as exc:
            log.warning("fleet %s: could not re-read members: %s", rec.name, exc)
        if rec.generation != generation or rec.want_destroy or self._stopping:
            return True
        rec.applied = generation
        rec.status = "ready" if summary.complete else "incomplete"
        if summary.failures:
            rec.error = ", ".join(f"{n} {reason}" for reason, n in
                                  sorted(summary.failures.items()))
        rec.updated_at = self.clock()
        with anyio.CancelScope(shield=True):  # shown: so recorded, even as the service stops
            await self._save(rec)
        log.info("fleet %s: run %s ended %s: %d/%d ready in %.1fs", rec.name, summary.run_id,
                 rec.status, summary.ready, summary.requested, summary.duration_s)
        return True

    def _run_ended(self, rec: FleetRecord) -> None:
        rec.provisioner = None
        if self._stopping and all(r.provisioner is None for r in self.fleets.values()):
            self._runs_done.set()

    async def _run_failed(self, rec: FleetRecord, generation: int, status: str,
                          error: str) -> bool:
        if rec.generation != generation or rec.want_destroy or self._stopping:
            return True
        rec.status = status
        rec.error = error
        if status == "failed":
            rec.applied = generation  # the same request would fail the same way
        rec.updated_at = self.clock()
        log.warning("fleet %s: %s: %s", rec.name, status, error)
        with anyio.CancelScope(shield=True):
            await self._save(rec)
        return status == "failed"

    def _lock_options(self, rec: FleetRecord, op: str | None = None) -> LockOptions:
        def on_wait(view: LockView) -> None:
            holder = view.describe()
            rec.error = f"waiting for the fleet's lock, held by {holder}"
            if rec.status == "provisioning":
                rec.status = "pending"
            if view.holder is None or rec.lock_holder != view.holder.run_id:
                rec.lock_holder = view.holder.run_id if view.holder else None
                log.info("fleet %s: waiting for its lock, held by %s", rec.name, holder)

        return LockOptions(lease_s=self.config.lock_lease_s, wait_s=None, on_wait=on_wait,
                           op=op)

    async def _destroy(self, rec: FleetRecord) -> bool:
        """Destroy every member, then the fleet's folder. True when the fleet is gone."""
        rec.status = "destroying"
        spec = rec.spec or _bare_spec(rec.name, rec.folder)
        try:
            result = await destroy(spec, self.vs, remove_folder=True,
                                   lock=self._lock_options(rec, op="serve-destroy"))
        except (FleetError, TimeoutError) as exc:
            if isinstance(exc, LockLost) and exc.result is not None:
                rec.removal = exc.result
            rec.error = f"destroy failed: {exc}"
            log.warning("fleet %s: %s", rec.name, rec.error)
            return False
        rec.removal = result
        if result.failed:
            rec.error = f"{result.failed} members could not be destroyed: " + \
                ", ".join(f"{n} {r}" for r, n in sorted(result.failures.items()))
            log.warning("fleet %s: %s", rec.name, rec.error)
            return False
        log.info("fleet %s: destroyed (%s): %d members removed in %.1fs", rec.name,
                 rec.destroy_reason, result.removed, result.duration_s)
        # A scan under way read the root folder before this: it must not bring it back.
        self._tombstones[rec.name] = self._scans_started
        if self.fleets.get(rec.name) is rec:
            del self.fleets[rec.name]
        await self.store.delete(rec.name)
        self.metrics.forget_fleet(rec.name)
        return True

    # -- the member view -----------------------------------------------------------
    def _member_event(self, rec: FleetRecord, event: Event) -> None:
        index = getattr(event, "index", None)
        if index is None:
            return
        kind = event.kind
        if kind == "member_removed":
            rec.members.pop(index, None)
            return
        m = rec.members.get(index)
        if m is None:
            m = rec.members[index] = MemberView(index, getattr(event, "name", ""), "queued")
        if kind == "job_queued":
            if getattr(event, "phase", "clone") == "clone":
                m.state, m.vm, m.phases_s = "queued", None, {}
        elif kind == "job_started":
            m.state = "cloning"
            m.source = getattr(event, "source", None)
            m.host = getattr(event, "host", None)
            m.attempt = int(getattr(event, "attempt", 0))
        elif kind == "phase_done":
            phase = str(getattr(event, "phase", ""))
            m.phases_s[phase] = float(getattr(event, "duration_s", 0.0))
            if phase == "clone":
                m.state = "cloned"
            elif phase == "reconnect":
                m.state = "network"
        elif kind == "job_replaced":
            m.state = "queued"
        elif kind == "job_adopted":
            m.vm = getattr(event, "vm", None)
            m.state = str(getattr(event, "state", "cloned"))
        elif kind == "job_ready":
            m.state = "ready"
            m.source = getattr(event, "source", None) or m.source
        elif kind == "job_failed":
            m.reason = getattr(event, "reason", None)
            m.message = getattr(event, "message", None)
            if m.vm is None and m.state in ("queued", "cloning"):
                m.state = "failed"
        elif kind == "job_cleaned_up":
            m.vm = None
            m.state = "failed"
        elif kind == "job_retried":
            m.reason = getattr(event, "reason", None)
            m.message = getattr(event, "message", None)

    def _view_from_vms(self, rec: FleetRecord, members: list[Member]) -> None:
        old = rec.members
        new: dict[int, MemberView] = {}
        for member in sorted(members, key=lambda m: (m.index, m.name != m.vm.name)):
            prev = old.get(member.index)
            view = MemberView(member.index, member.name, member.state, member.vm.ref.id,
                              member.source or None, member.vm.host_name)
            if prev is not None:
                view.phases_s = prev.phases_s
                view.attempt = prev.attempt
                view.reason, view.message = prev.reason, prev.message
            new.setdefault(member.index, view)
        requested = rec.requested
        for index, prev in old.items():
            if index not in new and prev.state == "failed" and \
                    (requested is None or index < requested):
                new[index] = prev  # a failure of the last run: nothing in vCenter shows it
        rec.members = dict(sorted(new.items()))

    async def _refresh(self, rec: FleetRecord) -> list[Member]:
        with anyio.fail_after(CALL_TIMEOUT_S):
            folder = await self.vs.find_folder(rec.folder)
            vms: list[VmInfo] = await self.vs.list_folder_vms(folder) if folder else []
        members = [m for m in (as_member(vm, rec.name) for vm in vms) if m is not None]
        if rec.provisioner is None:
            self._view_from_vms(rec, members)
        return members

    # -- scanning: discovery, drift, lifetimes -------------------------------------
    async def scan(self) -> None:
        """Read the root folder: find fleets, refresh idle ones, enforce lifetimes."""
        self._scans_started += 1
        number = self._scans_started
        # Scans run one at a time: a tombstone older than this scan guards nothing now.
        self._tombstones = {n: t for n, t in self._tombstones.items() if t >= number}
        root = await self.vs.find_folder(self.config.root_folder)
        found: dict[str, list[Member]] = {}
        if root is not None:
            for name, ref in await self.vs.list_child_folders(root):
                if not valid_name(name):
                    continue
                rec = self.fleets.get(name)
                if rec is not None and rec.provisioner is not None:
                    continue  # its run keeps the view current
                if rec is not None and rec.folder != self.config.fleet_folder(name):
                    continue
                try:
                    vms = await self.vs.list_folder_vms(ref)
                except NotFound:
                    continue  # removed since the root was read (a delete finished)
                found[name] = [m for m in (as_member(vm, name) for vm in vms) if m is not None]
        for name, members in found.items():
            rec = self.fleets.get(name)
            if rec is None:
                if not members or self._tombstones.get(name, -1) >= number:
                    continue  # none, or read before its delete finished: not a fleet now
                rec = FleetRecord(name, self.config.fleet_folder(name),
                                  created_at=self.clock(), updated_at=self.clock())
                self.fleets[name] = rec
                log.info("fleet %s: discovered in vCenter with %d members", name,
                         len(members))
                self._ensure_worker(rec)
            if rec.provisioner is not None:
                continue
            self._view_from_vms(rec, members)
            if members and not rec.stamp_pending:
                rec.expires_at = fleet_expiry(members)
        for name, rec in list(self.fleets.items()):
            if name in found or rec.provisioner is not None or rec.want_destroy:
                continue
            if rec.spec is None:
                del self.fleets[name]  # destroyed behind our back (fleet destroy)
                self.metrics.forget_fleet(name)
                log.info("fleet %s: no longer in vCenter", name)
            elif root is None or rec.folder == self.config.fleet_folder(name):
                self._view_from_vms(rec, [])
        self._enforce_lifetimes()
        self.scans += 1
        self.last_scan_at = self.clock()
        self.scan_error = None

    def _enforce_lifetimes(self) -> None:
        now = self.clock()
        for rec in list(self.fleets.values()):
            if rec.expires_at is not None and rec.expires_at <= now and not rec.want_destroy:
                self.metrics.expired.inc()
                self._doom(rec, f"expired at {rec.expires_at:.0f}")

    def next_expiry(self) -> float | None:
        times = [r.expires_at for r in self.fleets.values()
                 if r.expires_at is not None and not r.want_destroy]
        return min(times) if times else None

    async def _scanner(self) -> None:
        interval = self.config.scan_interval_s
        next_scan = anyio.current_time() + interval
        while True:
            expiry = self.next_expiry()
            wait = next_scan - anyio.current_time()
            if expiry is not None:
                wait = min(wait, expiry - self.clock())
            with anyio.move_on_after(max(0.0, wait)):
                await self._scan_wake.wait()
            self._scan_wake = anyio.Event()
            if anyio.current_time() >= next_scan:
                next_scan = anyio.current_time() + interval
                try:
                    with anyio.fail_after(CALL_TIMEOUT_S * 4):
                        await self.scan()
                except (FleetError, TimeoutError) as exc:
                    self.scan_error = str(exc) or "the scan timed out"
                    log.warning("scan failed: %s", self.scan_error)
            self._enforce_lifetimes()
            for rec in self.fleets.values():
                self._ensure_worker(rec)

    # -- snapshots for the API and metrics -----------------------------------------
    def update_gauges(self) -> None:
        statuses: Counter[str] = Counter()
        for rec in self.fleets.values():
            statuses[rec.status] += 1
            self.metrics.set_members(rec.name, rec.in_vcenter())
        self.metrics.set_fleets(statuses, STATUSES)
        self.metrics.set_limits(self.shared.limiters.statistics())

    def summary(self, rec: FleetRecord) -> dict[str, Any]:
        now = self.clock()
        by_state = rec.by_state()
        return {
            "name": rec.name,
            "url": f"/v1/fleets/{rec.name}",
            "status": rec.status,
            "generation": rec.generation,
            "requested": rec.requested,
            "members": sum(by_state.get(s, 0) for s in ("cloned", "network", "ready")),
            "ready": by_state.get("ready", 0),
            "by_state": by_state,
            "folder": rec.folder,
            "expires_at": None if rec.expires_at is None else math.ceil(rec.expires_at),
            "ttl_left_s": None if rec.expires_at is None else
            round(max(0.0, rec.expires_at - now), 3),
            "created_at": rec.created_at or None,
            "updated_at": rec.updated_at or None,
            "error": rec.error,
            "destroy_reason": rec.destroy_reason or None,
        }

    def detail(self, rec: FleetRecord, *, offset: int = 0, limit: int = 1000
               ) -> dict[str, Any]:
        out = self.summary(rec)
        members = list(rec.members.values())
        out["member_list"] = [m.to_dict() for m in members[offset:offset + limit]]
        out["member_list_offset"] = offset
        out["member_list_total"] = len(members)
        out["spec"] = rec.spec_data
        run: dict[str, Any] | None = None
        if rec.provisioner is not None:
            run = {"run_id": rec.provisioner.run_id, "active": True,
                   "started_at": rec.run_started_at}
        elif rec.summary is not None:
            run = {"run_id": rec.summary.run_id, "active": False,
                   "started_at": rec.run_started_at, "summary": rec.summary.to_dict()}
        out["run"] = run
        out["removal"] = rec.removal.to_dict() if rec.removal is not None else None
        return out


def _bare_spec(name: str, folder: str) -> FleetSpec:
    """Enough of a spec to destroy a fleet known only from vCenter."""
    return spec_from_dict({"name": name, "count": 0, "sources": ["-"], "folder": folder,
                           "network": {"refresh": "none"}},
                          source=f"discovered fleet {name}")
