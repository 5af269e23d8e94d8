"""What the engine tells the world as a run goes: a typed event stream.

Events are small frozen dataclasses handed to one synchronous callback
(``on_event``) as they happen; the CLI progress bar, the summary printer and the
Prometheus metrics all consume the same stream. The callback must be quick and
must not raise (an exception is logged and swallowed: a broken progress bar
must not break a burst). Every event is also logged, one line per state change,
with the elapsed time and the job's index.

The run's closing result is :class:`fleet.engine.summary.Summary`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

log = logging.getLogger("fleet.engine")


@dataclass(frozen=True)
class Event:
    """Base of all events. ``elapsed_s`` is seconds since the run started."""

    kind: ClassVar[str] = "event"
    level: ClassVar[int] = logging.DEBUG
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        # Every event field is a scalar, so the instance dict (fields in declaration
        # order) is what asdict() would copy, at a fraction of its cost: ``--events``
        # writes one of these per event, several per clone.
        return {"event": self.kind, **self.__dict__}

    def describe(self) -> str:
        fields = " ".join(f"{k}={v}" for k, v in asdict(self).items() if k != "elapsed_s")
        return f"[{self.elapsed_s:8.3f}s] {self.kind} {fields}"


@dataclass(frozen=True)
class RunStarted(Event):
    kind: ClassVar[str] = "run_started"
    level: ClassVar[int] = logging.INFO
    fleet: str
    run_id: str
    requested: int
    to_create: int
    to_resume: int
    to_remove: int
    already_ready: int


@dataclass(frozen=True)
class RunFinished(Event):
    kind: ClassVar[str] = "run_finished"
    level: ClassVar[int] = logging.INFO
    fleet: str
    run_id: str
    ready: int
    failed: int
    cancelled: bool


@dataclass(frozen=True)
class JobQueued(Event):
    kind: ClassVar[str] = "job_queued"
    index: int
    name: str
    phase: str  # the phase the job starts from (clone for new members)


@dataclass(frozen=True)
class JobStarted(Event):
    """A clone was handed to vCenter."""

    kind: ClassVar[str] = "job_started"
    index: int
    name: str
    source: str
    host: str
    attempt: int


@dataclass(frozen=True)
class PhaseDone(Event):
    kind: ClassVar[str] = "phase_done"
    index: int
    name: str
    phase: str
    duration_s: float


@dataclass(frozen=True)
class JobRetried(Event):
    kind: ClassVar[str] = "job_retried"
    level: ClassVar[int] = logging.INFO
    index: int
    name: str
    phase: str
    attempt: int
    reason: str
    delay_s: float
    message: str


@dataclass(frozen=True)
class JobReplaced(Event):
    """A clone went back to placement because its source or host was taken out."""

    kind: ClassVar[str] = "job_replaced"
    level: ClassVar[int] = logging.INFO
    index: int
    name: str
    reason: str


@dataclass(frozen=True)
class JobAdopted(Event):
    """A VM with this job's labels already existed (a lost reply, or a re-run)."""

    kind: ClassVar[str] = "job_adopted"
    level: ClassVar[int] = logging.INFO
    index: int
    name: str
    vm: str
    state: str


@dataclass(frozen=True)
class JobReady(Event):
    kind: ClassVar[str] = "job_ready"
    index: int
    name: str
    source: str
    duration_s: float


@dataclass(frozen=True)
class JobFailed(Event):
    """A job ended without a member. ``outcome`` says how: ``failed``, or ``cancelled``
    (the run was stopped: a delete, an expiry, a newer request, Ctrl-C), which is no
    failure (the metrics count it apart). ``reason`` is fleet's short, label-safe
    cause; ``fault`` vCenter's fault type when a fault caused it (``FileNotFound``),
    else empty."""

    kind: ClassVar[str] = "job_failed"
    level: ClassVar[int] = logging.WARNING
    index: int
    name: str
    phase: str
    reason: str
    message: str
    outcome: str = "failed"
    fault: str = ""


@dataclass(frozen=True)
class JobCleanedUp(Event):
    """A half-made clone was destroyed (cancellation or an unrecoverable phase)."""

    kind: ClassVar[str] = "job_cleaned_up"
    level: ClassVar[int] = logging.INFO
    index: int
    name: str
    vm: str


@dataclass(frozen=True)
class MemberRemoved(Event):
    kind: ClassVar[str] = "member_removed"
    level: ClassVar[int] = logging.INFO
    index: int
    name: str
    vm: str


@dataclass(frozen=True)
class SourceRetired(Event):
    """The run stopped using a source. ``reason`` is short and label-safe
    (``chain_budget`` or an error's reason); ``message`` has the detail."""

    kind: ClassVar[str] = "source_retired"
    level: ClassVar[int] = logging.WARNING
    source: str
    reason: str
    chain_depth: int
    message: str = ""


@dataclass(frozen=True)
class SourceStateChanged(Event):
    """A source as the run now sees it (at start, and when its depth, power or freeze
    state changes)."""

    kind: ClassVar[str] = "source_state"
    source: str
    host: str
    chain_depth: int
    clones_left: int | None  # None: unlimited (frozen)
    frozen: bool
    powered_on: bool


@dataclass(frozen=True)
class HostExcluded(Event):
    """The run stopped placing on a host. ``reason`` is the error's short reason."""

    kind: ClassVar[str] = "host_excluded"
    level: ClassVar[int] = logging.WARNING
    host: str
    reason: str
    message: str = ""


@dataclass(frozen=True)
class LimitChanged(Event):
    """An ``auto`` limit moved. ``limiter`` names it (``host:esx-01``); ``limiter_kind``
    (``host``) and ``limiter_key`` (``esx-01``, empty for ``overall``) are its parts."""

    kind: ClassVar[str] = "limit_changed"
    level: ClassVar[int] = logging.INFO
    limiter: str
    old: float
    new: float
    limiter_kind: str = ""
    limiter_key: str = ""


@dataclass(frozen=True)
class SourceFrozen(Event):
    kind: ClassVar[str] = "source_frozen"
    level: ClassVar[int] = logging.INFO
    source: str
    host: str


@dataclass(frozen=True)
class SourcePrepared(Event):
    kind: ClassVar[str] = "source_prepared"
    level: ClassVar[int] = logging.INFO
    source: str
    host: str


EventCallback = Callable[[Event], None]


class Emitter:
    """Hands events to the callback and the log; never lets the callback break a run."""

    def __init__(self, on_event: EventCallback | None, clock: Callable[[], float]):
        self._on_event = on_event
        self._clock = clock
        self._t0 = clock()

    def elapsed(self) -> float:
        return self._clock() - self._t0

    def __call__(self, cls: type[Event], **fields: Any) -> None:
        logged = log.isEnabledFor(cls.level)
        if self._on_event is None and not logged:
            return  # nobody listens: thousands of clones need not build thousands of events
        event = cls(elapsed_s=round(self.elapsed(), 6), **fields)
        if logged:
            log.log(event.level, "%s", event.describe())
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a consumer's bug must not stop provisioning
                log.exception("on_event callback failed for %s", event.kind)
