"""How a stopped run ends on time: the run's stop, and every scope it must bound.

A run stops (:meth:`StopClock.stop`: Ctrl-C, a lost lock, the service, or the
task running it being cancelled) by dispatching nothing more. What is under way
then gets ``timeouts.cancel_grace_s`` to finish: a job's pipeline runs in a
shielded scope (:meth:`StopClock.job_scope`) and work before the first clone in
a stoppable one (:meth:`StopClock.stoppable`), and the stop clamps both to the
grace period. Cleanup (destroying what did not finish, settling tasks) runs in
scopes from :meth:`StopClock.bounded`, each clamped to the moment the stopped
run must be over, ``cancel_grace_s`` + ``cleanup_s`` after the stop, however
much is in flight and however long the configured waits.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import anyio

from fleet.engine.spec import TimeoutsSpec


class StopClock:
    """Whether the run is stopping, why, and the scopes a stop must bound."""

    def __init__(self, timeouts: TimeoutsSpec, wake: Callable[[], None]) -> None:
        self._timeouts = timeouts
        self._wake = wake  # the dispatcher: it drops what is queued
        self.stopping = False
        self.reason = ""
        self._end_by = math.inf  # a stopped run is over by then (grace + cleanup)
        self._shields: set[anyio.CancelScope] = set()  # jobs' pipelines: get the grace
        self._cleanups: set[anyio.CancelScope] = set()  # clamped to _end_by on stop
        self._setup: anyio.CancelScope | None = None  # before dispatch: gets the grace

    def stop(self, reason: str) -> None:
        """Stop (the first call counts): give what runs the grace period, bound cleanup."""
        if self.stopping:
            return
        self.stopping = True
        self.reason = reason
        t = self._timeouts
        self._end_by = anyio.current_time() + t.cancel_grace_s + t.cleanup_s
        deadline = anyio.current_time() + t.cancel_grace_s
        for scope in self._shields:
            scope.deadline = min(scope.deadline, deadline)
        if self._setup is not None:
            self._setup.deadline = min(self._setup.deadline, deadline)
        for scope in self._cleanups:
            scope.deadline = min(scope.deadline, self._end_by)
        self._wake()

    def job_scope(self) -> anyio.CancelScope:
        """A shielded scope for one job's pipeline, until :meth:`job_done`: not cancelled
        with the dispatcher, cut at the end of the grace period once the run stops."""
        scope = anyio.CancelScope(shield=True)
        if self.stopping:
            scope.deadline = anyio.current_time() + self._timeouts.cancel_grace_s
        self._shields.add(scope)
        return scope

    def job_done(self, scope: anyio.CancelScope) -> None:
        self._shields.discard(scope)

    @contextlib.contextmanager
    def stoppable(self) -> Iterator[anyio.CancelScope]:
        """A scope for work before dispatch: a stop gives it the grace period, then
        cancels it (``cancelled_caught``: the run ends there)."""
        scope = anyio.CancelScope()
        if self.stopping:
            scope.cancel()
        self._setup = scope
        try:
            with scope:
                yield scope
        finally:
            self._setup = None

    @contextlib.contextmanager
    def bounded(self, timeout_s: float, *, shield: bool = False
                ) -> Iterator[anyio.CancelScope]:
        """A scope for cleanup (``shield``: not cancelled with its caller): at most
        ``timeout_s``, and never past the end of a stopped run (stop time +
        ``cancel_grace_s`` + ``cleanup_s``), whenever the stop comes."""
        scope = anyio.CancelScope(shield=shield,
                                  deadline=min(anyio.current_time() + timeout_s, self._end_by))
        self._cleanups.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._cleanups.discard(scope)
