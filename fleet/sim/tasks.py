"""Tasks and vCenter's concurrency limits.

Every ``*_Task`` method returns a :class:`Task` at once; its work runs in the
background and moves ``queued -> running -> success | error`` exactly as
``Task.info.state`` shows on a real vCenter.

The :class:`Scheduler` holds vCenter's limits: a host runs at most its
provisioning slots at once, vCenter at most ``max_concurrent_operations``, and
a running source is cloned by one task at a time. Work over a limit waits in a
queue (state ``queued``); it is never refused. Queues are kept per most
specific resource (host or source) so a freed slot only wakes work that can
use it; the oldest waiting task goes first.

The :class:`TaskManager` is the task service objects are given: ``start`` makes
a task (injecting a fault into it when a rule fired for the call), queues it on
the scheduler and keeps finished ones readable as vCenter does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from pyVmomi import VmomiSupport, vim, vmodl

from fleet.sim.calls import CallContext
from fleet.sim.clock import Clock
from fleet.sim.core import Inventory, SimObject
from fleet.sim.injection import Injection
from fleet.sim.stats import Stats

log = logging.getLogger("fleet.sim")

VC = "vc"
_seq = itertools.count()

TaskBody = Callable[["Task"], Awaitable[Any]]


class Scheduler:
    """Counts resources in use and starts queued tasks when theirs free up."""

    def __init__(self, vc_capacity: int) -> None:
        self.capacity: dict[str, int] = {VC: vc_capacity}
        self.in_use: dict[str, int] = {}
        #: the most each resource ever had in use at once (``host:<id>``, ``vc``)
        self.peak: dict[str, int] = {}
        self._queues: dict[str, deque[Task]] = {}
        self.queued = 0
        self.running = 0

    def set_capacity(self, key: str, capacity: int) -> None:
        self.capacity[key] = capacity
        self._drain([key])

    def _fits(self, resources: Sequence[str]) -> bool:
        for key in resources:
            cap = self.capacity.get(key)
            if cap is not None and self.in_use.get(key, 0) >= cap:
                return False
        return True

    def busy(self, key: str) -> bool:
        cap = self.capacity.get(key)
        return cap is not None and self.in_use.get(key, 0) >= cap

    def submit(self, task: Task) -> None:
        if self._fits(task.resources) and not self._queues.get(task.resources[-1]):
            self._start(task)
        else:
            self._queues.setdefault(task.resources[-1], deque()).append(task)
            self.queued += 1

    def _start(self, task: Task) -> None:
        for key in task.resources:
            used = self.in_use[key] = self.in_use.get(key, 0) + 1
            if used > self.peak.get(key, 0):
                self.peak[key] = used
        self.running += 1
        task.begin()

    def release(self, task: Task) -> None:
        for key in task.resources:
            self.in_use[key] -= 1
        self.running -= 1
        self._drain(task.resources)

    def forget(self, key: str) -> None:
        """``key`` (a destroyed source) will not be used again, unless work holds it."""
        if not self.in_use.get(key):
            self.capacity.pop(key, None)
            self.in_use.pop(key, None)

    def withdraw(self, task: Task) -> bool:
        """Take a queued task out of its queue (it was cancelled before starting)."""
        queue = self._queues.get(task.resources[-1])
        if queue is not None and task in queue:
            queue.remove(task)
            self.queued -= 1
            return True
        return False

    def _drain(self, freed: Sequence[str]) -> None:
        if VC in freed or any(k not in self._queues for k in freed):
            groups = [k for k, q in self._queues.items() if q]
        else:
            groups = [k for k in freed if self._queues.get(k)]
        while groups:
            # Oldest head first, so no queue starves another.
            groups.sort(key=lambda k: self._queues[k][0].seq)
            progressed = False
            for key in list(groups):
                queue = self._queues[key]
                if queue and self._fits(queue[0].resources):
                    task = queue.popleft()
                    self.queued -= 1
                    self._start(task)
                    progressed = True
                if not queue:
                    groups.remove(key)
                    self._queues.pop(key, None)
            if not progressed or self.busy(VC):
                break


class Task(SimObject):
    vim_type = vim.Task
    id_prefix = "task-"

    def __init__(self, manager: TaskManager, *, entity: SimObject | None, method: str,
                 description_id: str, user: str, resources: Sequence[str], body: TaskBody,
                 cancelable: bool = True) -> None:
        super().__init__(manager.inventory)
        self.manager = manager
        self.seq = next(_seq)
        self.entity = entity  # let go of when the task ends (a destroyed VM must not linger)
        self.entity_ref = entity.ref if entity is not None else None
        self.entity_name = getattr(entity, "name", None)
        self.method = method
        self.description_id = description_id
        self.user = user
        self.resources = tuple(resources) or (VC,)
        self.body: TaskBody | None = body
        self.state = "queued"
        self.cancelable = cancelable
        self.cancelled = False
        self.result: Any = None
        self.error: Any = None
        self.progress: int | None = None
        self.queue_time = datetime.now(UTC)
        self.start_time: datetime | None = None
        self.complete_time: datetime | None = None
        self.done = asyncio.Event()
        self._cancel = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self.chain_id = self.seq
        self._info: tuple[tuple[Any, ...], Any] | None = None

    # -- properties -----------------------------------------------------
    def prop_info(self) -> Any:
        # Clients read and watch ``info`` far more often than it changes: build the
        # TaskInfo once per state (the key holds everything that can change).
        key = (self.state, self.cancelled, self.cancelable, self.progress, self.start_time,
               self.complete_time, id(self.error), id(self.result))
        if self._info is not None and self._info[0] == key:
            return self._info[1]
        try:
            name = VmomiSupport.GetWsdlMethod("urn:vim25", self.method)
        except KeyError:
            name = None
        info = vim.TaskInfo(
            key=self.moid, task=self.ref, name=name, descriptionId=self.description_id,
            entity=self.entity_ref,
            entityName=self.entity_name, state=self.state, cancelled=self.cancelled,
            cancelable=self.cancelable and self.state in ("queued", "running"),
            error=self.error, result=self.result, progress=self.progress,
            reason=vim.TaskReasonUser(userName=self.user), queueTime=self.queue_time,
            startTime=self.start_time, completeTime=self.complete_time,
            eventChainId=self.chain_id)
        self._info = (key, info)  # holds error and result, so their ids stay theirs
        return info

    # -- lifecycle ------------------------------------------------------
    def begin(self) -> None:
        self.state = "running"
        self.start_time = datetime.now(UTC)
        self.progress = 0
        self.touch("info")
        self._runner = self.manager.clock.spawn(self._run())

    async def _run(self) -> None:
        body = self.body
        assert body is not None, "a task runs once"
        try:
            result = await body(self)
        except vmodl.MethodFault as fault:
            self._finish(error=fault)
        except asyncio.CancelledError:
            self._finish(error=vmodl.fault.RequestCanceled(msg="The task was canceled."))
            raise
        except Exception as exc:  # a simulator bug must not hang the client
            log.exception("task %s (%s) crashed", self.moid, self.method)
            self._finish(error=vmodl.fault.SystemError(msg=f"simulator error: {exc!r}",
                                                       reason=repr(exc)))
        else:
            self._finish(result=self._typed(result))

    def _typed(self, result: Any) -> Any:
        """``info.result`` is anyType: a list must travel as its declared typed array."""
        if isinstance(result, list) and not isinstance(result, VmomiSupport.Array):
            try:
                info = VmomiSupport.GetWsdlMethod("urn:vim25", self.method).info
                declared = VmomiSupport.GetVmodlType(info.methodResultName)
            except KeyError:
                return result
            if issubclass(declared, list):
                return declared(result)
        return result

    def _finish(self, *, result: Any = None, error: Any = None) -> None:
        if self.state in ("success", "error"):
            return
        # A finished task is kept (task_retention_s) for its info alone: let go of the
        # work (the body's closure holds the request, its spec and call context), of its
        # entity (a destroyed VM) and of the frames an error's traceback holds, so
        # thousands of retained tasks stay small for the garbage collector.
        self.body = None
        self._runner = None
        self.entity = None
        if isinstance(error, BaseException):
            error.__traceback__ = None
        was_running = self.state == "running"
        self.state = "error" if error is not None else "success"
        self.result = result
        self.error = error
        self.progress = 100 if error is None else self.progress
        self.complete_time = datetime.now(UTC)
        self.touch("info")
        self.done.set()
        if was_running:
            self.manager.scheduler.release(self)
        self.manager.completed(self)

    async def sleep(self, seconds: float) -> None:
        """Simulated work: a (scaled, jittered) pause that ends early on CancelTask."""
        delay = self.manager.clock.latency(seconds)
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cancel.wait(), delay)
        if self._cancel.is_set() and self.cancelable:
            raise vmodl.fault.RequestCanceled(msg="The task was canceled by a user.")

    def set_progress(self, percent: int) -> None:
        self.progress = percent
        self.touch("info")

    def commit(self) -> None:
        """Past this point the work cannot be undone: cancelling is refused."""
        self.cancelable = False
        self.touch("info")

    # -- methods --------------------------------------------------------
    def CancelTask(self, ctx: CallContext) -> None:
        if self.state in ("success", "error"):
            raise vim.fault.InvalidState(msg="The task has already completed.")
        if not self.cancelable:
            raise vmodl.fault.NotSupported(msg="The task cannot be cancelled at this stage.")
        self.cancelled = True
        if self.state == "queued" and self.manager.scheduler.withdraw(self):
            self._finish(error=vmodl.fault.RequestCanceled(msg="The task was canceled by a user."))
            return
        self._cancel.set()
        self.touch("info")

    def SetTaskState(self, ctx: CallContext, state: str, result: Any = None,
                     fault: Any = None) -> None:
        raise vmodl.fault.NotSupported(msg="SetTaskState is not supported by the simulator.")


class TaskManager(SimObject):
    """Tasks in flight, and finished ones until they are forgotten as vCenter forgets them.

    vCenter documents (``TaskManager.recentTask``) that the list holds the queued and
    running tasks and the completed ones of the past 10 minutes, at most the last 200;
    a task that has gone reads as ``ManagedObjectNotFound``. The simulator keeps a
    finished task readable for ``vcenter.task_retention_s`` (600 s by default) and at
    most ``vcenter.max_finished_tasks`` of them (the oldest go first), so its memory
    stays bounded at any clone rate; ``recentTask`` lists the last 200 of those.
    Forgotten tasks leave the filters that watch them, as deleted objects do.
    """

    vim_type = vim.TaskManager
    RECENT_COMPLETED = 200

    def __init__(self, inventory: Inventory, moid: str, *, clock: Clock, scheduler: Scheduler,
                 stats: Stats, retention_s: float, max_finished: int) -> None:
        super().__init__(inventory, moid)
        self.clock = clock
        self.scheduler = scheduler
        self.stats = stats
        self.retention_s = retention_s
        self.max_finished = max_finished
        self.active: dict[str, Task] = {}
        #: finished tasks still readable, oldest first: moid -> (loop time finished, task)
        self.finished: OrderedDict[str, tuple[float, Task]] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, ctx: CallContext, *, entity: SimObject | None, method: str,
              description_id: str, body: TaskBody, resources: tuple[str, ...],
              cancelable: bool = False) -> Any:
        """Start a ``*_Task`` method's work in the background; its reference at once."""
        injection = ctx.injection
        if injection is not None and injection.phase in ("task", "after"):
            body = _inject_into_task(injection, method, entity, body)
        task = Task(self, entity=entity, method=method, description_id=description_id,
                    user=ctx.session.user or "", resources=resources, body=body,
                    cancelable=cancelable)
        self.inventory.objects[task.moid] = task
        self.active[task.moid] = task
        self.stats.counters["tasks"] += 1
        self.scheduler.submit(task)
        return task.ref

    def completed(self, task: Task) -> None:
        if task.method == "InstantClone_Task":
            if task.state == "success" and task.start_time:
                run_s = ((task.complete_time or task.start_time)
                         - task.start_time).total_seconds()
                self.stats.clone_task_s.add(run_s)
            error = task.error
            self.stats.clones.finished_task(task.moid, None if error is None else str(
                getattr(error, "_wsdlName", None) or type(error).__name__))
        self.active.pop(task.moid, None)
        loop = asyncio.get_running_loop()
        self.finished[task.moid] = (loop.time(), task)
        self._forget_old(loop)

    def _forget_old(self, loop: asyncio.AbstractEventLoop) -> None:
        finished = self.finished
        while len(finished) > self.max_finished:
            self.inventory.forget(finished.popitem(last=False)[1][1])
        now = loop.time()
        while finished:
            ended, task = next(iter(finished.values()))
            if ended + self.retention_s > now:
                break
            del finished[task.moid]
            self.inventory.forget(task)
        if finished and self._timer is None:
            # One timer, for the oldest: the others finished later, so expire later.
            ended = next(iter(finished.values()))[0]
            self._timer = loop.call_at(ended + self.retention_s, self._expire,
                                       context=contextvars.Context())

    def _expire(self) -> None:
        self._timer = None
        self._forget_old(asyncio.get_running_loop())

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def prop_recentTask(self) -> Any:
        recent = list(self.finished)[-self.RECENT_COMPLETED:]
        return vim.Task.Array([t.ref for t in self.active.values()] +
                              [self.finished[moid][1].ref for moid in recent])

    def prop_maxCollector(self) -> int:
        return 32

    def prop_description(self) -> Any:
        return None


def _inject_into_task(injection: Injection, method: str, entity: SimObject | None,
                      body: TaskBody) -> TaskBody:
    """The task's work as a fired fault-injection rule changes it: a delay, then the
    real work (``slow``), the injected fault instead, or the work and then the fault
    (phase ``after``)."""
    rule = injection.rule
    name = entity.display_name if entity is not None else ""

    async def injected(task: Task) -> Any:
        await task.sleep(rule.delay_s)
        if rule.fault == "slow":
            return await body(task)
        if injection.phase == "after":
            await body(task)  # the work is done all the same
        raise injection.make_fault(method, name, entity.ref if entity is not None else None)

    return injected
