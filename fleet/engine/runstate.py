"""What the parts of one provisioning run share: its jobs, their queue, and the context.

A :class:`Job` is one member to bring to ``ready``; its ``phase`` says how far
it got and ``outcome`` is set once, by :meth:`RunContext.finish`, the only
place a job ends (it also reports the end and counts it for the summary).
:class:`JobQueue` holds the jobs waiting for placement, some of them waiting
out a backoff first. :class:`RunContext` is what every part is handed: the spec,
the client, the limiters, the event stream, the stop, the tally, and the signal
that wakes the dispatcher when something it waits for may have changed.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Literal

import anyio
import anyio.lowlevel

from fleet.engine.events import Emitter, JobFailed, JobReady, PhaseDone
from fleet.engine.limits import Limiters
from fleet.engine.reconcile import MemberState
from fleet.engine.spec import FleetSpec
from fleet.engine.stopping import StopClock
from fleet.engine.summary import Tally
from fleet.vsphere.model import Ref, TaskHandle, VSphere

Phase = Literal["clone", "network", "ready", "done"]
Outcome = Literal["ready", "failed", "cancelled"]
#: where a member labelled with a state goes on from (a resumed or adopted one)
NEXT_PHASE: dict[MemberState, Phase] = {"cloned": "network", "network": "ready",
                                        "ready": "done"}


@dataclass(eq=False)
class Job:
    """One member to bring to ``ready``."""

    index: int
    name: str
    phase: Phase
    queued_at: float
    started_at: float
    vm: Ref | None = None
    source: str | None = None
    attempt: int = 0  # attempts in the current phase
    replaced: int = 0  # trips back to placement after a source/host was taken out
    not_before: float = 0.0
    queue_s: float = 0.0
    task: TaskHandle | None = None
    adopted: bool = False
    labelled: MemberState = "cloned"  # the state label the VM carries now
    submit_started: float | None = None  # a submit call is under way since then
    lost_submit_at: float | None = None  # a submit whose reply never came (it may yet clone)
    outcome: Outcome | None = None
    reason: str | None = None


class Signal:
    """Wake the dispatcher: set from anywhere (synchronously), awaited with a timeout."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self._pending = False

    def set(self) -> None:
        self._pending = True
        if self._event is not None:
            self._event.set()

    async def wait(self, timeout_s: float) -> None:
        if self._pending:
            self._pending = False
            await anyio.lowlevel.checkpoint()
            return
        self._event = anyio.Event()
        with anyio.move_on_after(max(0.0, timeout_s)):
            await self._event.wait()
        self._event = None
        self._pending = False


class JobQueue:
    """Jobs waiting for placement: ``ready`` in order, ``delayed`` until ``not_before``."""

    def __init__(self, wake: Signal) -> None:
        self._wake = wake
        self.ready: deque[Job] = deque()
        self.delayed: list[Job] = []

    def __bool__(self) -> bool:
        return bool(self.ready or self.delayed)

    def requeue(self, job: Job, delay_s: float) -> None:
        """Back to placement (after ``delay_s``), ahead of jobs that have not waited yet."""
        job.phase = "clone"
        job.task = None
        job.queued_at = anyio.current_time()
        job.not_before = job.queued_at + delay_s
        if delay_s > 0:
            self.delayed.append(job)
        else:
            self.ready.appendleft(job)  # it has waited its turn already
        self._wake.set()

    def promote_due(self, now: float) -> None:
        """Move the delayed jobs whose backoff is over to the end of the queue."""
        if self.delayed:
            due = [j for j in self.delayed if j.not_before <= now]
            if due:
                self.delayed = [j for j in self.delayed if j.not_before > now]
                self.ready.extend(due)

    def drain(self) -> list[Job]:
        """Every waiting job, taken out of the queue."""
        jobs = list(self.ready) + self.delayed
        self.ready.clear()
        self.delayed.clear()
        return jobs


class RunContext:
    """One run's shared state, as every part of it sees it."""

    def __init__(self, spec: FleetSpec, vsphere: VSphere, run_id: str, rng: random.Random,
                 limiters: Limiters, wake: Signal, stop: StopClock, tally: Tally) -> None:
        self.spec = spec
        self.vs = vsphere
        self.run_id = run_id
        self.rng = rng  # placement tie-breaks and jitter
        self.limiters = limiters
        self.wake = wake
        self.stop = stop
        self.tally = tally
        self.events: Emitter | None = None  # from the start of the run

    @property
    def emit(self) -> Emitter:
        assert self.events is not None
        return self.events

    def record(self, job: Job, phase: str, duration_s: float) -> None:
        """A timed phase of ``job`` is done."""
        self.tally.phase_s[phase].append(duration_s)
        self.emit(PhaseDone, index=job.index, name=job.name, phase=phase,
                  duration_s=round(duration_s, 6))

    def finish(self, job: Job, outcome: Outcome, phase: str, reason: str = "",
               message: str = "", *, fault: str | None = None) -> None:
        """End ``job`` (the first call counts) and say so. ``fault``: vCenter's fault
        type, when one made it fail."""
        if job.outcome is not None:
            return
        job.outcome = outcome
        job.reason = reason or None
        if outcome == "ready":
            self.emit(JobReady, index=job.index, name=job.name, source=job.source or "",
                      duration_s=round(anyio.current_time() - job.started_at, 6))
        else:
            self.tally.failed(reason or "unfinished", message)
            self.emit(JobFailed, index=job.index, name=job.name, phase=phase, reason=reason,
                      message=message, outcome=outcome, fault=fault or "")
        self.wake.set()
