"""Clones whose outcome is unknown: settle them, adopt what they made, or reap it.

A clone attempt can end without the engine knowing whether vCenter made the VM:
the reply to the submit was lost, the task timed out, vCenter forgot the task,
or the run stopped mid-submit. The name is the key: a member's name is fixed
by its index, and a VM under that name carrying this job's labels is the
job's. So :class:`Recovery` lets the task end (:meth:`~Recovery.settle`),
looks the name up, and either adopts the VM (:meth:`~Recovery.adopt`: the job
goes on from the phase its label says it finished) or, when the run is
stopping, destroys it (:meth:`~Recovery.reap`), going on looking until a clone
submitted without a reply can no longer land. :meth:`~Recovery.until_named` tells
the pipeline when such a clone can no longer be running (a VM holds its name), so
that the tokens it keeps can go. Nothing here ever touches a VM
without this job's labels. A job that ends without being ready is cleaned up
the same way (:meth:`~Recovery.cleanup`).
"""

from __future__ import annotations

import contextlib
import math

import anyio

from fleet.engine.events import JobAdopted, JobCleanedUp
from fleet.engine.lifetime import FLEET_LABELS
from fleet.engine.reconcile import as_member, member_index
from fleet.engine.runstate import NEXT_PHASE, Job, RunContext
from fleet.errors import DuplicateName, NotFound, VSphereError
from fleet.vsphere.model import Ref, TaskHandle, VmInfo


class Recovery:
    """Settling, adopting and reaping the clones of one run."""

    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx
        self._unsettled: list[Job] = []

    # -- finding what a clone made -----------------------------------------------------
    async def lookup(self, name: str) -> VmInfo | None:
        """The VM called ``name`` in the fleet's folder, or None."""
        try:
            found = await self._ctx.vs.find_vms([f"{self._ctx.spec.folder_path}/{name}"])
        except NotFound:
            return None
        return found[0] if found else None

    def is_ours(self, job: Job, vm: VmInfo) -> bool:
        """Whether ``vm`` carries ``job``'s labels (this fleet, this index)."""
        return member_index(vm.extra_config, self._ctx.spec.name) == job.index

    async def holder(self, job: Job, error: DuplicateName) -> VmInfo | None:
        """The VM holding the name a clone was refused, if vCenter or a lookup says."""
        try:
            with anyio.fail_after(self._ctx.spec.timeouts.call_s):
                if error.existing:
                    return await self._ctx.vs.get_vm(Ref("VirtualMachine", error.existing))
                return await self.lookup(job.name)
        except (VSphereError, TimeoutError):
            return None

    async def await_holder(self, job: Job, *, deadline: float | None = None) -> VmInfo | None:
        """The VM that lands under ``job.name`` by ``deadline`` (default: the clone timeout
        from now; a clone in flight holds its name before its VM exists), or None; looked
        up at least once, with backoff, given up early when the run stops."""
        if deadline is None:
            deadline = anyio.current_time() + self._ctx.spec.timeouts.clone_s
        _, found = await self._poll_name(job, deadline, stop_when_made=False)
        return found

    async def until_named(self, job: Job, deadline: float) -> tuple[bool, VmInfo | None]:
        """Wait until a VM holds ``job.name``, or ``deadline`` passes or the run stops;
        looked up with backoff. Returns whether the name is held, and the VM found (None
        when the job has its VM already, made or adopted). A clone whose submit got no
        reply cannot be running once the name is held: it made that VM, or it fails on
        the name."""
        return await self._poll_name(job, deadline, stop_when_made=True)

    async def _poll_name(self, job: Job, deadline: float, *, stop_when_made: bool
                         ) -> tuple[bool, VmInfo | None]:
        """Look ``job.name`` up, with backoff, until a VM holds it (True and the VM), the
        job has its VM (if ``stop_when_made``: True and None), or ``deadline`` passes or
        the run stops (False and None). Looked up at least once."""
        call_s = self._ctx.spec.timeouts.call_s
        delay = 0.01
        while True:
            if stop_when_made and job.vm is not None:
                return True, None
            try:
                with anyio.fail_after(call_s):
                    found = await self.lookup(job.name)
            except (VSphereError, TimeoutError):
                found = None
            if found is not None:
                return True, found
            now = anyio.current_time()
            if now >= deadline or self._ctx.stop.stopping:
                return False, None
            await anyio.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 1.0)

    async def landed_late(self, job: Job) -> VmInfo | None:
        """After a job's last attempt: the VM of a submit whose reply was lost, if it
        lands within the clone timeout of that submit and carries this job's labels."""
        if job.lost_submit_at is None:
            return None
        found = await self.await_holder(
            job, deadline=job.lost_submit_at + self._ctx.spec.timeouts.clone_s)
        return found if found is not None and self.is_ours(job, found) else None

    # -- settling and adopting ---------------------------------------------------------
    async def settle_task(self, task: TaskHandle) -> None:
        """Cancel a task if vCenter will, and wait (bounded) until it has ended."""
        if task.snapshot.state in ("success", "error"):
            return
        cleanup_s = self._ctx.spec.timeouts.cleanup_s
        with self._ctx.stop.bounded(cleanup_s):
            with contextlib.suppress(VSphereError):
                await task.cancel()
            with contextlib.suppress(VSphereError, TimeoutError):
                await task.wait(timeout_s=cleanup_s)

    async def settle(self, job: Job) -> VmInfo | None:
        """After an attempt with an unknown outcome: let its task end (cancelling it if
        vCenter will), then return the VM it made if it carries this job's labels."""
        t = self._ctx.spec.timeouts
        with self._ctx.stop.bounded(t.cleanup_s):
            if job.task is not None:
                await self.settle_task(job.task)
            try:
                with anyio.fail_after(t.call_s):
                    vm = await self.lookup(job.name)
            except (VSphereError, TimeoutError):
                return None
            if vm is not None and self.is_ours(job, vm):
                return vm
        return None

    def adopt(self, job: Job, vm: VmInfo) -> None:
        """Take ``vm`` (which carries the job's labels) as the job's member; it goes on
        from the phase after the one its label says it finished."""
        member = as_member(vm.listed(FLEET_LABELS), self._ctx.spec.name)
        assert member is not None
        job.vm, job.adopted, job.attempt = vm.ref, True, 0
        job.labelled = member.state
        job.source = member.source or job.source
        job.phase = NEXT_PHASE[member.state]
        self._ctx.emit(JobAdopted, index=job.index, name=job.name, vm=vm.ref.id,
                       state=member.state)
        if job.phase == "done":
            self._ctx.finish(job, "ready", "clone")

    # -- reaping -----------------------------------------------------------------------
    async def reap(self, job: Job) -> None:
        """Destroy every VM this job's attempts made. After a lost submit reply a clone
        may still be on its way, so keep looking (with backoff) until the clone
        timeout has passed since that submit, destroying what lands. Callers bound
        the whole wait; a failed destroy raises."""
        ctx = self._ctx
        vm = job.vm
        if vm is None:
            found = await self.settle(job)
            vm = found.ref if found is not None else None
        if vm is not None:
            await ctx.vs.destroy(vm)
            job.vm = None
            ctx.emit(JobCleanedUp, index=job.index, name=job.name, vm=vm.id)
        since = job.lost_submit_at
        if since is None:
            return
        deadline = since + ctx.spec.timeouts.clone_s
        delay = 0.01
        while anyio.current_time() < deadline:
            await anyio.sleep(min(delay, max(0.0, deadline - anyio.current_time())))
            delay = min(delay * 2, 1.0)
            try:
                with anyio.fail_after(ctx.spec.timeouts.call_s):
                    info = await self.lookup(job.name)
            except (VSphereError, TimeoutError):
                continue
            if info is not None and self.is_ours(job, info):
                await ctx.vs.destroy(info.ref)
                ctx.emit(JobCleanedUp, index=job.index, name=job.name, vm=info.ref.id)

    async def cleanup(self, job: Job) -> None:
        """Destroy what a job that did not finish made (shielded, bounded)."""
        if job.outcome == "ready":
            return
        ctx = self._ctx
        if job.submit_started is not None:  # cut off mid-submit: it may have gone through
            # (received by vCenter, if at all, before now: it may land until clone_s after)
            job.lost_submit_at, job.submit_started = anyio.current_time(), None
        with ctx.stop.bounded(ctx.spec.timeouts.cleanup_s, shield=True):
            try:
                await self.reap(job)
            except VSphereError as exc:
                ctx.finish(job, "failed", job.phase, "cleanup_failed",
                           f"could not destroy half-made {job.name}: {exc}", fault=exc.fault)
                return
        ctx.finish(job, "cancelled", job.phase, "cancelled",
                   f"{ctx.stop.reason or 'stopped'} before it was ready")

    def unsettled(self, job: Job) -> None:
        """``job`` was dropped while waiting to retry an attempt whose reply was lost:
        :meth:`cleanup_unsettled` destroys what that attempt made after all."""
        self._unsettled.append(job)

    async def cleanup_unsettled(self) -> None:
        """Jobs dropped while waiting to retry an attempt whose reply was lost: a VM it
        made after all is found by name and destroyed (shielded, bounded)."""
        jobs, self._unsettled = self._unsettled, []
        if not jobs:
            return
        with self._ctx.stop.bounded(math.inf, shield=True):
            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(self._destroy_found, job)

    async def _destroy_found(self, job: Job) -> None:
        with self._ctx.stop.bounded(self._ctx.spec.timeouts.cleanup_s), \
                contextlib.suppress(VSphereError):
            await self.reap(job)
