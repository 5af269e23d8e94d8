"""Fleet workers: one task per fleet that builds it to its request or destroys it.

:class:`Workers` starts a worker for each fleet the service knows (one at a
time per fleet) and stops them all when the service stops. A fleet's worker
sleeps until its record is poked (a request, a delete, an expiry) or until the
next ``scan_interval_s``, then does what the record asks:

- a delete or an expiry (``want_destroy``): destroy every member, then the
  fleet's folder; once it is gone, the service forgets the fleet (``gone``);
- a request not yet applied (``applied < generation``): one provisioning run
  (``fleet.engine.run.Provisioner``) with the fleet's current spec, drawing from
  the service's one :class:`~fleet.engine.shared.SharedLimits`. Its events feed
  the service's metrics and the fleet's member view; when it ends, the members
  are read back (``fleet.api.scanner.refresh``) before the new status shows.

A run that could not start or ended early says why in the record: ``failed``
(the same request would fail again: a bad source, permissions; not retried
until a new request), ``retrying`` (vCenter unreachable, the lock lost: tried
again with a backoff of up to ``RETRY_MAX_S``). After a retry the record keeps
the summary of the last attempt only.

Every run and destroy holds the fleet's lock in vCenter (``fleet.engine.lock``,
docs/locking.md), so the service and ``fleet provision``/``destroy`` on any
machine never work on one fleet at once. A run whose fleet is locked waits
(status ``pending``, ``error`` naming the holder); a newer request or a delete
cancels that wait (:meth:`~fleet.api.records.FleetRecord.interrupt`).

Records are saved through the service's ``save`` callback; the worker never
decides what is on disk.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskGroup

from fleet.api.context import ServiceContext
from fleet.api.records import FleetRecord
from fleet.api.scanner import refresh
from fleet.api.tokens import owner_labels
from fleet.engine.events import Event
from fleet.engine.lifetime import expiry_labels, stamp_expiry
from fleet.engine.lock import FleetLock, LockLost, LockOptions, LockView
from fleet.engine.operations import check_spec, destroy, lost_message
from fleet.engine.run import EngineOptions, Provisioner
from fleet.engine.spec import FleetSpec, spec_from_dict
from fleet.errors import ConfigError, FleetError, TransientVSphereError

log = logging.getLogger("fleet.api")

RETRY_MAX_S = 60.0


class Workers:
    """See the module docstring. A worker ends when its record is no longer the one
    under its name in the service's table (the fleet is gone, or was replaced)."""

    def __init__(self, ctx: ServiceContext, *,
                 save: Callable[[FleetRecord], Awaitable[None]],
                 gone: Callable[[FleetRecord], Awaitable[None]],
                 ran: Callable[[], None]) -> None:
        self.ctx = ctx
        self._save = save
        self._gone = gone
        self._ran = ran  # a run ended: it may have made the service's root folder
        self.stopping = False
        self._tg: TaskGroup | None = None
        self._runs_done = anyio.Event()

    def start(self, tg: TaskGroup) -> None:
        """From now on, workers run in ``tg``; start one for every fleet."""
        self._tg = tg
        for rec in self.ctx.fleets.values():
            self.ensure(rec)

    def ensure(self, rec: FleetRecord) -> None:
        """Start the fleet's worker unless it has one (or workers are not running)."""
        if rec.worker or self._tg is None:
            return
        rec.worker = True
        self._tg.start_soon(self._worker, rec)

    async def stop(self, timeout_s: float) -> None:
        """Start no more work and stop every run: in-flight clones get their grace period,
        then are cleaned up (the requests stay on record). Waits at most ``timeout_s``
        for the runs to end; the caller then cancels the workers' task group."""
        self.stopping = True
        self._tg = None
        running = [r for r in self.ctx.fleets.values() if r.provisioner is not None]
        for rec in running:
            assert rec.provisioner is not None
            rec.provisioner.stop("service stopping")
        if running:
            with anyio.CancelScope(shield=True), anyio.move_on_after(timeout_s):
                await self._runs_done.wait()

    async def _worker(self, rec: FleetRecord) -> None:
        failures = 0
        try:
            while not self.stopping and self.ctx.fleets.get(rec.name) is rec:
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
                delay = self.ctx.config.scan_interval_s if failures == 0 else \
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
        metrics_events = self.ctx.metrics.events_for(rec.name)

        def on_event(event: Event) -> None:
            metrics_events(event)
            rec.on_event(event)

        rec.run_started_at = self.ctx.clock()
        run_id = uuid.uuid4().hex[:12]
        lock = FleetLock(self.ctx.vs, rec.name, spec.folder_path, op="serve-provision",
                         run_id=run_id, options=self._lock_options(rec))
        try:
            # A wrong spec fails before anything is made; the view starts a prompt run.
            checked = await check_spec(spec, self.ctx.vs)
            checked_at = anyio.current_time()
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
                    n = await stamp_expiry(spec, self.ctx.vs, rec.expires_at)
                    rec.stamp_pending = False
                    if n:
                        log.info("fleet %s: %d members relabelled to expire at %.0f", rec.name,
                                 n, rec.expires_at)
                if rec.generation != generation or rec.want_destroy or self.stopping:
                    return True
                # New clones carry the fleet's owner: a restarted service knows it.
                labels = {**expiry_labels(rec.expires_at), **owner_labels(rec.owner)}
                options = EngineOptions(shared_limits=self.ctx.shared, labels=labels)
                provisioner = rec.provisioner = Provisioner(spec, self.ctx.vs, on_event=on_event,
                                                            run_id=run_id, options=options)
                provisioner.use_view(checked, checked_at)
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
        if self.stopping or superseded:
            return True  # the newer request (or the destroy, or the next start) takes over
        try:
            # Read the members back first (VM ids, labels), so that a caller who sees the
            # new status sees the members that go with it.
            await refresh(self.ctx.vs, rec)
        except (FleetError, TimeoutError) as exc:
            log.warning("fleet %s: could not re-read members: %s", rec.name, exc)
        self._ran()
        if rec.generation != generation or rec.want_destroy or self.stopping:
            return True
        rec.applied = generation
        rec.status = "ready" if summary.complete else "incomplete"
        if summary.failures:
            rec.error = ", ".join(f"{n} {reason}" for reason, n in
                                  sorted(summary.failures.items()))
        rec.updated_at = self.ctx.clock()
        with anyio.CancelScope(shield=True):  # shown: so recorded, even as the service stops
            await self._save(rec)
        log.info("fleet %s: run %s ended %s: %d/%d ready in %.1fs", rec.name, summary.run_id,
                 rec.status, summary.ready, summary.requested, summary.duration_s)
        return True

    def _run_ended(self, rec: FleetRecord) -> None:
        rec.provisioner = None
        if self.stopping and all(r.provisioner is None for r in self.ctx.fleets.values()):
            self._runs_done.set()

    async def _run_failed(self, rec: FleetRecord, generation: int, status: str,
                          error: str) -> bool:
        if rec.generation != generation or rec.want_destroy or self.stopping:
            return True
        rec.status = status
        rec.error = error
        if status == "failed":
            rec.applied = generation  # the same request would fail the same way
        rec.updated_at = self.ctx.clock()
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

        return LockOptions(lease_s=self.ctx.config.lock_lease_s, wait_s=None, on_wait=on_wait,
                           op=op)

    async def _destroy(self, rec: FleetRecord) -> bool:
        """Destroy every member, then the fleet's folder. True when the fleet is gone."""
        rec.status = "destroying"
        spec = rec.spec or _bare_spec(rec.name, rec.folder)
        try:
            result = await destroy(spec, self.ctx.vs, remove_folder=True,
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
        await self._gone(rec)
        return True


def _bare_spec(name: str, folder: str) -> FleetSpec:
    """Enough of a spec to destroy a fleet known only from vCenter."""
    return spec_from_dict({"name": name, "count": 0, "sources": ["-"], "folder": folder,
                           "network": {"refresh": "none"}},
                          source=f"discovered fleet {name}")
