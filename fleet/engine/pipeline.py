"""The per-clone pipeline: clone -> network -> reconnect -> ready, each timed and retried.

:meth:`Pipeline.run_job` takes one job from where it is: a placed clone (with
its source and limiter lease), or a member resumed or adopted part-way. The
``clone`` phase hands vCenter an InstantClone (NICs disconnected when the
network workflow asks for it) and feeds the ``auto`` limits how vCenter ran
it. ``network`` runs the NIC refresh recipe in the guest; ``reconnect``
connects the NICs in the same reconfiguration that labels the member, so the
label never says more (or less) than was done; ``ready`` waits for the guest's
IP or its guestinfo flag. Each phase has a deadline; transient faults are
retried with exponential backoff and jitter, permanent ones end the job. A
member is labelled with the last phase it finished, for a later run to resume.

A clone that fails is judged here: a fault scoped to its source or host takes
that out of the run (:class:`~fleet.engine.refresher.Refresher`) and sends the
job back to placement, as does a clone that did not find the fleet's folder
(looked up again, once); a clone whose outcome is unknown, or that was refused
its name, goes to :class:`~fleet.engine.recovery.Recovery` before any retry.

A clone whose submit got no reply may be running in vCenter all the same. The
job goes on (it looks for the VM, then retries: vCenter's one name per folder
keeps it from making two), but the attempt's tokens, the running source's
one-at-a-time token among them, and its place in placement's in-flight count stay
with that clone (:class:`_LostClone`) until a VM holds the job's name or the
clone timeout has passed, or the run stops: otherwise fleet would hand vCenter
more than its limits (a host's slots, a second clone of a running source under
the first one's stun).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import anyio

from fleet.engine.events import JobReplaced, JobRetried, JobStarted
from fleet.engine.limits import Lease, LimitKey
from fleet.engine.placement import HostState, SourceState
from fleet.engine.reconcile import LABEL_READY_AT, LABEL_STATE, MemberState
from fleet.engine.reconcile import labels as member_labels
from fleet.engine.recovery import Recovery
from fleet.engine.refresher import Refresher
from fleet.engine.runstate import Job, JobQueue, RunContext
from fleet.engine.sources import clone_config
from fleet.engine.spec import FleetSpec
from fleet.errors import (
    ConnectionFailed,
    DuplicateName,
    NotDelivered,
    NotFound,
    RequestTimeout,
    VSphereError,
)
from fleet.vsphere import recipes
from fleet.vsphere.model import CloneRequest, GuestProgram, Ref, VmInfo


class _PhaseFailed(Exception):
    def __init__(self, phase: str, reason: str, message: str, error: VSphereError | None = None):
        super().__init__(message)
        self.phase = phase
        self.reason = reason
        self.message = message
        self.error = error


@dataclass(frozen=True)
class _LostClone:
    """An attempt whose submit got no reply, and what it holds: the lease and the
    reservation in placement's view of ``src``, until ``deadline`` at the latest (the
    clone timeout after the reply was given up on: by then it has landed or failed)."""

    src: SourceState
    lease: Lease
    deadline: float


def no_post_phases(spec: FleetSpec) -> bool:
    """A member is ready once cloned: no NIC refresh, no reconnect, no readiness wait."""
    net = spec.network
    return net.refresh == "none" and not (net.disconnect_at_clone and net.reconnect) and \
        spec.readiness.wait_for == "none"


def first_state(spec: FleetSpec) -> MemberState:
    """A new clone's state label, written in its clone spec."""
    return "ready" if no_post_phases(spec) else "cloned"


def clone_request(spec: FleetSpec, *, index: int, name: str, src: SourceState, folder: Ref,
                  run_id: str, labels: Mapping[str, str], state: MemberState) -> CloneRequest:
    """The InstantClone request of member ``index`` from ``src``: the one a run sends, and
    the one ``fleet plan`` has vCenter check (``CheckInstantClone_Task``, docs/preflight.md).

    ``labels``: more ``guestinfo.fleet.*`` labels (the fleet's own win a clash);
    ``state``: the member's label once the clone is made."""
    extra = spec.guestinfo_for(index=index, name=name, source=src.name, run_id=run_id)
    extra.update(labels)
    extra.update(member_labels(fleet=spec.name, index=index, run_id=run_id,
                               source=src.name, state=state))
    # Exactly this fleet's labels: nothing inherited from a source that is a VM of
    # another fleet (its expiry!), nor a readiness flag its guest did not set.
    readiness = spec.readiness.guestinfo_key if spec.readiness.wait_for == "guestinfo" \
        else None
    extra = clone_config(extra, src.info, readiness_key=readiness)
    connect: Literal["connect", "disconnect"] = \
        "disconnect" if spec.network.disconnect_at_clone else "connect"
    return CloneRequest(source=src.ref, name=name, folder=folder, extra_config=extra,
                        nic_connect=connect)


def _backoff_s(spec: FleetSpec, attempt: int, rng: random.Random) -> float:
    r = spec.retries
    delay: float = min(r.backoff_max_s, r.backoff_base_s * 2.0 ** max(0, attempt - 1))
    return delay * (1.0 - r.jitter * rng.random())


class Pipeline:
    """Brings one run's jobs from their phase to ``ready`` (or ends them)."""

    def __init__(self, ctx: RunContext, refresher: Refresher, recovery: Recovery,
                 queue: JobQueue, folder: Ref, *, labels: Mapping[str, str]) -> None:
        self._ctx = ctx
        self._refresher = refresher
        self._view = refresher.view
        self._recovery = recovery
        self._queue = queue
        self._labels = labels  # more guestinfo.fleet.* labels for every new clone
        self._folder = folder  # the fleet's folder, as last looked up
        self._folder_lock = anyio.Lock()
        self._lost_folders: set[str] = set()  # ids of the fleet's folder vCenter lost

    async def run_job(self, job: Job, src: SourceState | None, lease: Lease | None,
                      scope: anyio.CancelScope) -> None:
        """The job's phases in ``scope`` (shielded; cut at the end of a stop's grace),
        then, if it was cut off or the run stopped before it was ready, its cleanup.

        If its submit got no reply and the job went back to the queue, this task stays
        with the clone that may be running, holding its tokens (:meth:`_hold`), while
        the job goes on elsewhere."""
        stop = self._ctx.stop
        lost: _LostClone | None = None
        with scope:
            if src is not None and lease is not None:
                lost = await self._clone_phase(job, src, lease)
            if lost is None and job.outcome is None and \
                    job.phase in ("network", "ready", "done"):
                await self._post_clone(job)
        if lost is not None:
            await self._hold(job, lost)
            return
        if scope.cancelled_caught or (stop.stopping and job.outcome is None
                                      and job.phase != "clone"):
            await self._recovery.cleanup(job)

    # -- the clone phase -----------------------------------------------------------
    def _clone_request(self, job: Job, src: SourceState) -> CloneRequest:
        return clone_request(self._ctx.spec, index=job.index, name=job.name, src=src,
                             folder=self._folder, run_id=self._ctx.run_id,
                             labels=self._labels, state=first_state(self._ctx.spec))

    def _no_post_phases(self) -> bool:
        return no_post_phases(self._ctx.spec)

    async def _clone_phase(self, job: Job, src: SourceState, lease: Lease
                           ) -> _LostClone | None:
        """One clone attempt. Returns the attempt's clone if its submit got no reply and
        the job went back to the queue: it keeps the attempt's tokens (:meth:`_hold`)."""
        ctx = self._ctx
        view = self._view
        job.attempt += 1
        host = view.host_of(src)
        ctx.emit(JobStarted, index=job.index, name=job.name, source=src.name,
                 host=host.info.name if host else "?", attempt=job.attempt)
        t0 = anyio.current_time()
        made: Ref | None = None
        lost_at: float | None = None  # when the submit was given up on without a reply
        error: BaseException | None = None
        if ctx.stop.stopping:  # stopped between placement and here: hand vCenter nothing
            ctx.limiters.release(lease)
            view.unreserve(src, made=False)
            ctx.finish(job, "cancelled", "queue", "cancelled", "not started: stopping")
            return None
        try:
            with anyio.fail_after(ctx.spec.timeouts.clone_s):
                job.submit_started = anyio.current_time()
                job.task = await ctx.vs.start_instant_clone(self._clone_request(job, src))
                job.submit_started = None
                lease.submitted(job.task, anyio.current_time())
                made = await job.task.wait()
        except (VSphereError, TimeoutError) as exc:
            error = exc
            if job.task is None:
                if not isinstance(exc, VSphereError) or (
                        isinstance(exc, ConnectionFailed | RequestTimeout)
                        and not isinstance(exc, NotDelivered)):
                    # No reply: the request may have reached vCenter and be cloning
                    # without us, received at the latest now (when we gave up on it), so
                    # it may land until the clone timeout from now. (A fault in reply,
                    # ResourceBusy say, is vCenter refusing the call: no task was made.)
                    lost_at = job.lost_submit_at = anyio.current_time()
                job.submit_started = None
            if job.task is not None and not (isinstance(exc, VSphereError)
                                             and not exc.transient):
                # The task may still be running in vCenter: keep its tokens until it ends,
                # or fleet would hand vCenter more than the limits allow.
                with ctx.stop.bounded(math.inf, shield=True):
                    await self._recovery.settle_task(job.task)
        finally:
            if lost_at is None:  # else the lost clone keeps them: below
                await self._end_attempt(job, src, lease, made)
        if lost_at is not None:
            assert error is not None
            return await self._lost_clone(
                job, host, error, _LostClone(src, lease, lost_at + ctx.spec.timeouts.clone_s))
        if made is not None:
            ctx.tally.created += 1
            job.vm, job.source = made, src.name
            job.labelled = "ready" if self._no_post_phases() else "cloned"
            job.phase = "done" if self._no_post_phases() else "network"
            ctx.record(job, "queue", job.queue_s)
            ctx.record(job, "clone", anyio.current_time() - t0)
            job.attempt = 0
            if job.phase == "done":
                ctx.finish(job, "ready", "clone")
            return None
        assert error is not None
        await self._clone_failed(job, src, host, error)
        return None

    async def _end_attempt(self, job: Job, src: SourceState, lease: Lease,
                           made: Ref | None) -> None:
        """An attempt is over: its tokens and its reservation go, the source as it is now."""
        ctx = self._ctx
        self._feed_limiters(job, lease, made is not None)
        info: VmInfo | None = None
        before = src.info
        try:
            if src.running and made is None:
                # A failed attempt may or may not have deepened the chain (the stun comes
                # first): read it while this attempt still holds the source's token and
                # its reservation, which placement counts, so the read sees no other
                # clone of the source (one at a time) and none can slip past the budget
                # meanwhile. Shielded: the depth must be right even if this job is being
                # cancelled.
                with ctx.stop.bounded(math.inf, shield=True):
                    info = await self._refresher.read_source(src)
                if job.submit_started is not None or (
                        job.task is not None and job.task.snapshot.state != "error"):
                    # Cut off mid-submit, or its task's end unseen: it may land later
                    # still. Count it until it must have.
                    src.phantoms.append(anyio.current_time() + ctx.spec.timeouts.clone_s)
        finally:
            # A clone made from a running source deepened its chain by exactly one:
            # unreserve counts it, with no need to read the chain back.
            self._view.unreserve(src, made=made is not None)
            self._refresher.update_source(src, info or src.info, before=before)
            ctx.limiters.release(lease)

    async def _lost_clone(self, job: Job, host: HostState | None, error: BaseException,
                          lost: _LostClone) -> _LostClone | None:
        """After a submit without a reply: the job is judged as after any transient fault
        (the VM looked for and adopted, else retried), and the clone keeps the attempt's
        tokens. Returned if the job went back to the queue (:meth:`run_job` then holds
        them until the clone can no longer be running); else they go here (the VM was
        found, or the job's last attempt waited out the clone timeout, or it ended)."""
        handed_over = False
        try:
            await self._clone_failed(job, lost.src, host, error)
            handed_over = job.outcome is None and job.phase == "clone"  # queued again
        finally:
            if not handed_over:
                await self._release(job, lost, landed=job.vm is not None)
        return lost if handed_over else None

    async def _hold(self, job: Job, lost: _LostClone) -> None:
        """Keep a lost clone's tokens and reservation until a VM holds the job's name
        (this clone's, or a retry's: then this one cannot make one) or its deadline has
        passed, or the run stops; then let them go. Not shielded: the run's cancellation
        ends it at once (nothing is dispatched any more), and a stop within a second.

        If the clone landed while the job still waits in the queue (for tokens, its
        backoff, or a source: the clone may have taken the last of the budget), the job
        is taken out and adopts it here, and goes on in this task."""
        landed, found = False, None
        try:
            landed, found = await self._recovery.until_named(job, lost.deadline)
        finally:
            await self._release(job, lost, landed=landed)
        if found is None or not self._recovery.is_ours(job, found) or \
                not self._unqueue(job):
            return
        await self._go_on_adopted(job, found)

    async def settle_lost(self, job: Job, reason: str, message: str) -> None:
        """A job leaving the queue unplaced after a submit without reply: adopt the
        member that submit made, if it landed, and go on from there; else fail it."""
        found = await self._recovery.settle(job)
        if job.outcome is not None:
            return
        if found is None:
            self._ctx.finish(job, "failed", "queue", reason, message)
            return
        await self._go_on_adopted(job, found)

    async def _go_on_adopted(self, job: Job, found: VmInfo) -> None:
        """``job`` takes ``found`` as its member and goes on from its next phase, in this
        task, under a job scope of its own."""
        self._recovery.adopt(job, found)
        stop = self._ctx.stop
        scope = stop.job_scope()
        try:
            await self.run_job(job, None, None, scope)
        finally:
            stop.job_done(scope)

    def _unqueue(self, job: Job) -> bool:
        """Take ``job`` out of the queue if it waits there (neither started nor ended)."""
        queue = self._queue
        if job.outcome is not None:
            return False
        if job in queue.ready:
            queue.ready.remove(job)
            return True
        if job in queue.delayed:
            queue.delayed.remove(job)
            return True
        return False

    async def _release(self, job: Job, lost: _LostClone, *, landed: bool) -> None:
        """A lost clone's tokens and reservation go; a running source's chain is read
        first (under its token), and counted as one deeper until the clone's deadline if
        the clone may still land or the read failed."""
        ctx = self._ctx
        src = lost.src
        info: VmInfo | None = None
        before = src.info
        try:
            if src.running:
                with ctx.stop.bounded(math.inf, shield=True):
                    info = await self._refresher.read_source(src)
                now = anyio.current_time()
                unsure = not landed and now < lost.deadline  # the run stopped first
                if (unsure or info is None) and lost.deadline > now:
                    src.phantoms.append(lost.deadline)
        finally:
            # Not counted as made here: a clone it made is adopted by the job.
            self._view.unreserve(src, made=False)
            self._refresher.update_source(src, info or src.info, before=before)
            ctx.limiters.release(lost.lease)

    def _feed_limiters(self, job: Job, lease: Lease, ok: bool) -> None:
        """Tell the ``auto`` limits how this clone went: vCenter's own queue and run times
        when the task reports them, else the time we waited (all of it counted as run)."""
        if not ok or job.task is None:
            return
        now = anyio.current_time()
        snap = job.task.snapshot
        if snap.queue_time is not None and snap.start_time is not None and \
                snap.complete_time is not None:
            queue_s = max(0.0, snap.start_time - snap.queue_time)
            run_s = max(0.0, snap.complete_time - snap.start_time)
        else:
            queue_s, run_s = 0.0, max(0.0, now - lease.submitted_at)
        self._ctx.limiters.completed(lease, queue_s=queue_s, run_s=run_s, now=now)

    async def _clone_failed(self, job: Job, src: SourceState, host: HostState | None,
                            error: BaseException) -> None:
        ctx = self._ctx
        spec = ctx.spec
        recovery = self._recovery
        if isinstance(error, DuplicateName):
            holder = await recovery.holder(job, error)
            if holder is None:
                # vCenter holds the name for a clone still in flight (our own submit whose
                # reply was lost, or one of a run that died) and no VM has it yet: wait for
                # it to land, then judge it like any holder.
                holder = await recovery.await_holder(job)
            if holder is not None and recovery.is_ours(job, holder):
                recovery.adopt(job, holder)
                return
            if holder is not None:
                ctx.finish(job, "failed", "clone", "name_taken",
                           f"the name {job.name} is taken by {holder.ref.id}, which is not a "
                           f"member of fleet {spec.name}; it was left alone")
                return
            # No VM took the name: the clone that held it failed, and the name is free.
            await self._retry_clone(job, error.reason,
                                    f"{error} (no VM took the name within "
                                    f"{spec.timeouts.clone_s}s)", error.fault)
            return
        if isinstance(error, NotFound) and await self._folder_lost(error):
            # Not the job's fault: place it again, into the folder found anew.
            self._replace(job, "folder_lost", error)
            return
        if isinstance(error, VSphereError) and not error.transient and error.scope != "call":
            if error.scope == "source":
                # Before any await, so no new job is placed on it.
                self._refresher.retire(src, error.reason, str(error))
                # Re-read it (its chain, its power): the summary and the gauges then show
                # the source as vCenter has it, not as fleet believed it was.
                info = None
                with ctx.stop.bounded(math.inf, shield=True):
                    info = await self._refresher.read_source(src)
                if info is not None:
                    self._refresher.update_source(src, info)
            elif host is not None:
                self._refresher.exclude_host(host.info.ref, host.info.name, error)
            self._replace(job, error.reason, error)
            return
        vanished = isinstance(error, NotFound) and job.task is not None and \
            error.obj == job.task.ref.id  # vCenter forgot the task: its outcome is unknown
        if isinstance(error, VSphereError) and not error.transient and not vanished:
            ctx.finish(job, "failed", "clone", error.reason, str(error), fault=error.fault)
            return
        # Transient, a timeout or a task vCenter forgot: the clone may exist. Settle that
        # before trying again.
        reason = error.reason if isinstance(error, VSphereError) else "timeout"
        fault = error.fault if isinstance(error, VSphereError) else None
        message = str(error) or f"clone did not finish in {spec.timeouts.clone_s}s"
        found = None
        with ctx.stop.bounded(math.inf, shield=True):
            found = await recovery.settle(job)
        if found is not None:
            recovery.adopt(job, found)
            return
        await self._retry_clone(job, reason, message, fault)

    def _replace(self, job: Job, why: str, error: VSphereError) -> None:
        """Back to placement, not the job's fault (its source, host or folder is gone);
        failed once it went round every source and host and more."""
        job.replaced += 1
        job.attempt -= 1
        if job.replaced > len(self._view.sources) + len(self._view.hosts):
            self._ctx.finish(job, "failed", "clone", error.reason, str(error),
                             fault=error.fault)
            return
        self._ctx.emit(JobReplaced, index=job.index, name=job.name, reason=why)
        self._queue.requeue(job, 0.0)

    async def _folder_lost(self, error: NotFound) -> bool:
        """Whether the object a clone did not find is the fleet's folder, which the run
        looked up once at its start: vCenter lost it (it lost its state, or someone
        removed the folder). If so it is looked up (made) again, once per lost folder
        whatever the number of clones that failed on it, and True is returned."""
        lost = error.obj
        if lost is None:
            return False
        if lost in self._lost_folders:
            return True  # found anew already; this clone was submitted before
        if lost != self._folder.id:
            return False
        async with self._folder_lock:
            if lost != self._folder.id:
                return True
            spec = self._ctx.spec
            try:
                with anyio.fail_after(spec.timeouts.call_s):
                    fresh = await self._ctx.vs.ensure_folder(spec.folder_path)
            except (VSphereError, TimeoutError):
                return False
            if fresh == self._folder:
                return False
            self._lost_folders.add(lost)
            self._folder = fresh
        return True

    async def _retry_clone(self, job: Job, reason: str, message: str,
                           fault: str | None = None) -> None:
        """Back to the queue after a backoff, or failed when out of attempts (``fault``:
        the vCenter fault of the last attempt, if any)."""
        ctx = self._ctx
        if job.attempt >= ctx.spec.retries.attempts:
            # A submit whose reply was lost may still land (each retry's reply may have
            # been lost too): give it the clone timeout before calling the job failed,
            # or a member would appear that the summary says is missing.
            found = await self._recovery.landed_late(job)
            if found is not None:
                self._recovery.adopt(job, found)
                return
            ctx.finish(job, "failed", "clone", reason,
                       f"{message} (after {job.attempt} attempts)", fault=fault)
            return
        delay = _backoff_s(ctx.spec, job.attempt, ctx.rng)
        ctx.emit(JobRetried, index=job.index, name=job.name, phase="clone",
                 attempt=job.attempt, reason=reason, delay_s=round(delay, 6), message=message)
        self._queue.requeue(job, delay)

    # -- after the clone -----------------------------------------------------------
    def _refresh_program(self, family: str) -> GuestProgram:
        net = self._ctx.spec.network
        if net.refresh == "custom":
            assert net.command is not None
            return recipes.custom_program(net.command, net.arguments)
        if net.refresh == "linux" or (net.refresh == "auto" and family == "linux"):
            return recipes.linux_refresh()
        return recipes.windows_refresh()

    async def _post_clone(self, job: Job) -> None:
        """network -> reconnect -> ready, each retried and timed. Failures leave the VM
        labeled with the last phase it finished, for the next run to resume."""
        assert job.vm is not None
        ctx = self._ctx
        vm = job.vm
        spec = ctx.spec
        net = spec.network
        wait_ready = spec.readiness.wait_for != "none"
        try:
            if job.phase == "network":
                if net.refresh != "none":
                    creds = net.credentials
                    assert creds is not None  # the spec requires them with a refresh
                    src = self._view.sources.get(job.source or "")
                    family = src.info.guest_family if src else (await self._vm(vm)).guest_family
                    program = self._refresh_program(family)
                    timeout = spec.timeouts.network_s

                    async def refresh() -> None:
                        code = await ctx.vs.run_in_guest(vm, creds, program, timeout_s=timeout)
                        if code != 0:
                            raise _PhaseFailed("network", "network_refresh_failed",
                                               f"{program.path} exited with {code}")

                    await self._phase(job, "network", timeout, refresh)
                reconnect = net.disconnect_at_clone and net.reconnect
                if net.refresh != "none" or reconnect:
                    # With a reconnect, one ReconfigVM_Task connects the NICs and labels
                    # the member: the label never says more (or less) than was done.
                    await self._label(job, "network" if wait_ready else "ready",
                                      reconnect=reconnect)
                    job.phase = "ready" if wait_ready else "done"
                else:
                    job.phase = "ready"
            if job.phase == "ready":
                if wait_ready:
                    await self._phase(job, "ready", spec.readiness.timeout_s, self._ready_wait(vm),
                                      retry_timeouts=False)
                job.phase = "done"
            if job.labelled != "ready":
                await self._label(job, "ready")
            ctx.finish(job, "ready", "ready")
        except _PhaseFailed as exc:
            if exc.error is not None and exc.error.scope == "host":
                await self._exclude_vm_host(vm, exc.error)
            ctx.finish(job, "failed", exc.phase, exc.reason, exc.message,
                       fault=exc.error.fault if exc.error is not None else None)

    def _ready_wait(self, vm: Ref) -> Callable[[], Awaitable[object]]:
        vs = self._ctx.vs
        r = self._ctx.spec.readiness
        if r.wait_for == "guest_ip":
            return lambda: vs.wait_for_vm_state(vm, timeout_s=r.timeout_s, guest_ip=True)
        return lambda: vs.wait_for_vm_state(vm, timeout_s=r.timeout_s,
                                            extra_config_key=r.guestinfo_key)

    async def _vm(self, vm: Ref) -> VmInfo:
        with anyio.fail_after(self._ctx.spec.timeouts.call_s):
            return await self._ctx.vs.get_vm(vm)

    async def _label(self, job: Job, state: MemberState, *, reconnect: bool = False) -> None:
        """Label the member with the phase it finished. ``reconnect``: connect its NICs in
        the same reconfiguration (the timed ``reconnect`` phase), so a run that stops at
        any point leaves NICs connected exactly when the label says the network is done."""
        assert job.vm is not None
        ctx = self._ctx
        vm = job.vm
        values: dict[str, str] = {LABEL_STATE: state}
        if state == "ready":
            # When it became ready, in the same reconfiguration (no call more): member
            # records show it (fleet.engine.members; docs/inventory.md).
            values[LABEL_READY_AT] = str(math.floor(time.time()))

        async def write() -> None:
            lease = await ctx.limiters.acquire([LimitKey.of("overall")], (job, "label"))
            try:
                if reconnect:
                    await ctx.vs.set_nics_connected(vm, True, extra_config=values,
                                                    known_nics=self._source_nics(job))
                else:
                    await ctx.vs.update_extra_config(vm, values)
            finally:
                ctx.limiters.release(lease)

        t0 = anyio.current_time()
        try:
            if reconnect:
                await self._phase(job, "reconnect", ctx.spec.timeouts.reconnect_s, write)
            else:
                await self._phase(job, None, ctx.spec.timeouts.call_s, write)
        except _PhaseFailed as exc:
            # The write is absolute (these labels, NICs connected): one whose reply was lost
            # or came too late may have landed all the same. Look before calling it failed.
            refused = exc.error is not None and not exc.error.transient
            if refused or not await self._labelled(vm, values, reconnect):
                raise
            if reconnect:
                ctx.record(job, "reconnect", anyio.current_time() - t0)
        job.labelled = state

    def _source_nics(self, job: Job) -> list[int] | None:
        """The clone's NIC keys, when its source's are known: an instant clone keeps its
        source's devices, keys and all, so the client reads just those (docs/reads.md)."""
        src = self._view.sources.get(job.source or "")
        return [n.key for n in src.info.nics] if src is not None and src.info.nics else None

    async def _labelled(self, vm: Ref, values: Mapping[str, str], nics_connected: bool) -> bool:
        """Whether ``vm`` carries ``values`` (and, if asked, has every NIC connected)."""
        try:
            info = await self._vm(vm)
        except (VSphereError, TimeoutError):
            return False
        if any(info.extra_config.get(k, "") != v for k, v in values.items()):
            return False
        return not nics_connected or all(n.connected for n in info.nics)

    async def _phase(self, job: Job, phase: str | None, timeout_s: float,
                     fn: Callable[[], Awaitable[object]], *, retry_timeouts: bool = True) -> None:
        """Run one phase step with a deadline and retries of transient faults.
        ``phase`` None is bookkeeping (labels): retried but not timed."""
        ctx = self._ctx
        attempts = ctx.spec.retries.attempts
        name = phase or "label"
        t0 = anyio.current_time()
        for attempt in range(1, attempts + 1):
            try:
                with anyio.fail_after(timeout_s):
                    await fn()
            except (TimeoutError, RequestTimeout) as exc:
                reason, message = "timeout", f"{name} did not finish in {timeout_s}s"
                if not retry_timeouts:
                    raise _PhaseFailed(name, f"{name}_timeout", message) from exc
                err: VSphereError | None = exc if isinstance(exc, VSphereError) else None
            except VSphereError as exc:
                if not exc.transient:
                    raise _PhaseFailed(name, exc.reason, str(exc), exc) from exc
                reason, message, err = exc.reason, str(exc), exc
            else:
                if phase is not None:
                    ctx.record(job, phase, anyio.current_time() - t0)
                return
            if attempt >= attempts:
                raise _PhaseFailed(name, reason, f"{message} (after {attempt} attempts)", err)
            delay = _backoff_s(ctx.spec, attempt, ctx.rng)
            ctx.emit(JobRetried, index=job.index, name=job.name, phase=name, attempt=attempt,
                     reason=reason, delay_s=round(delay, 6), message=message)
            await anyio.sleep(delay)

    async def _exclude_vm_host(self, vm: Ref, error: VSphereError) -> None:
        try:
            info = await self._vm(vm)
        except (VSphereError, TimeoutError):
            return
        if info.host is not None:
            self._refresher.exclude_host(info.host, info.host_name or info.host.id, error)
