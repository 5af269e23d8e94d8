"""A vCenter task in flight, as the engine sees one (``fleet.vsphere.model.TaskHandle``).

A task is a watch on the task object's ``info`` (``fleet.vsphere.watch``): its state and
vCenter's own queue, start and completion times come from the watcher's one
``WaitForUpdatesEx`` loop, never from polling the task.

A task that ends in a fault is told to the session's observer (the metrics'
``fleet_vsphere_faults_total{stage="task"}``) the moment the watch sees it end,
whether or not anyone waits for it: the call that started it succeeded, so the
session's own per-call report never sees that fault.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fleet.errors import NotFound, RequestTimeout, VSphereError
from fleet.vsphere.faults import fault_name
from fleet.vsphere.inventory import ref_of
from fleet.vsphere.model import Ref, TaskSnapshot, TaskState
from fleet.vsphere.session import Session
from fleet.vsphere.watch import PropertyWatcher, Watch

log = logging.getLogger("fleet.vsphere")

#: What a task watch reads of a task: its state, outcome and vCenter's times.
TASK_PATHS = ("info.state", "info.error", "info.result", "info.queueTime", "info.startTime",
              "info.completeTime")


def _epoch(value: Any) -> float | None:
    return value.timestamp() if value is not None else None


def _task_done(w: Watch) -> bool:
    return w.values.get("info.state") in ("success", "error")


ResultConverter = Callable[[Any], Any]
ErrorTranslator = Callable[[Any], Awaitable[VSphereError]]


class VCenterTask:
    """A vCenter task in flight (implements ``fleet.vsphere.model.TaskHandle``)."""

    def __init__(self, session: Session, watcher: PropertyWatcher, task: Any, *, method: str,
                 convert: ResultConverter, translate_error: ErrorTranslator) -> None:
        self._session = session
        self._task = task
        self._ref = ref_of(task)
        self.method = method
        self._convert = convert
        self._translate = translate_error
        self._ended = False  # its end was seen (and a fault told to the observer)
        self._cancel_asked = False
        self._watch = watcher.watch(task, TASK_PATHS, done=self._done, kind=method)
        self.submitted = time.monotonic()
        self._snapshot: tuple[int, TaskSnapshot] | None = None

    def __repr__(self) -> str:
        return f"<VCenterTask {self._ref.id} {self.method} {self.snapshot.state}>"

    def _done(self, w: Watch) -> bool:
        """The watch's ``done``: whether the task ended; at the first sight of an end in
        error, the fault goes to the observer."""
        if not _task_done(w):
            return False
        if not self._ended:
            self._ended = True
            if w.values.get("info.state") == "error":
                self._tell_fault(w.values.get("info.error"))
        return True

    def _tell_fault(self, fault: Any) -> None:
        observer = self._session.observer
        if observer is None:
            return
        name = fault_name(fault) if isinstance(fault, BaseException) else "unknown"
        if self._cancel_asked and name == "RequestCanceled":
            return  # the answer to our own CancelTask, not a fault of vCenter's
        try:
            observer.observe_task_fault(self.method, name)
        except Exception:  # a metrics bug must not break the watcher's update loop
            log.exception("the call observer failed on a fault of %s", self.method)

    @property
    def ref(self) -> Ref:
        return self._ref

    @property
    def snapshot(self) -> TaskSnapshot:
        # Made again only after an update: the auto limits ask every sibling's state at
        # every completion, and converting the times is not cheap.
        w = self._watch
        cached = self._snapshot
        if cached is not None and cached[0] == w.version:
            return cached[1]
        values = w.values
        state: TaskState = values.get("info.state") or "queued"
        snap = TaskSnapshot(self._ref, state, _epoch(values.get("info.queueTime")),
                            _epoch(values.get("info.startTime")),
                            _epoch(values.get("info.completeTime")))
        self._snapshot = (w.version, snap)
        return snap

    async def wait(self, timeout_s: float | None = None) -> Any:
        """The task's result, or its translated fault; RequestTimeout after ``timeout_s``."""
        w = self._watch
        try:
            await w.wait_for(_task_done, timeout_s=timeout_s, what=f"end of {self.method}")
        except RequestTimeout:
            raise RequestTimeout(
                f"task {self._ref.id} ({self.method}) still {self.snapshot.state} after "
                f"{timeout_s} s", method=self.method, obj=self._ref.id) from None
        except NotFound:
            raise NotFound(f"task {self._ref.id} ({self.method}) vanished before it was seen "
                           "to finish; its outcome is unknown", method=self.method,
                           obj=self._ref.id) from None
        if w.values.get("info.state") == "success":
            return self._convert(w.values.get("info.result"))
        fault = w.values.get("info.error")
        if not isinstance(fault, BaseException):
            raise VSphereError(f"task {self._ref.id} ({self.method}) failed without a fault",
                               method=self.method, obj=self._ref.id)
        raise await self._translate(fault) from fault

    async def cancel(self) -> None:
        """Ask vCenter to cancel; a task that already finished or cannot be cancelled
        any more is left alone (its ``wait`` tells how it ended)."""
        if _task_done(self._watch):
            return
        self._cancel_asked = True
        try:
            await self._session.call(self._task, "CancelTask")
        except VSphereError as exc:
            if exc.fault in ("InvalidState", "NotSupported"):
                log.info("task %s could not be cancelled: %s", self._ref.id, exc)
                return
            raise
