"""How a run went: the closing :class:`Summary`, its percentiles, and the tally behind it.

A run's parts count as they go into one :class:`Tally` (phase durations, clones
made, members removed, the first message given for each failure reason); when
the run ends, :meth:`Tally.summary` turns that, the jobs' outcomes and the
sources as the run last saw them into a :class:`Summary`, whose ``to_dict()``
is what ``--json`` prints. :class:`RemovalSummary` is the same for ``destroy``
and a scale-down.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from fleet.engine.limits import Limiters
from fleet.engine.placement import SourceState
from fleet.engine.spec import FleetSpec

#: the timed phases of a clone, in pipeline order: the summary's ``phases`` keys and the
#: ``phase`` label values of fleet_clone_phase_duration_seconds (fleet.metrics)
PHASES = ("queue", "clone", "network", "reconnect", "ready")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class PhaseStats:
    count: int
    p50_s: float
    p95_s: float
    p99_s: float
    max_s: float
    mean_s: float

    @classmethod
    def of(cls, values: Iterable[float]) -> PhaseStats:
        v = sorted(values)
        if not v:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        return cls(len(v), round(percentile(v, 50), 6), round(percentile(v, 95), 6),
                   round(percentile(v, 99), 6), round(v[-1], 6), round(sum(v) / len(v), 6))


@dataclass(frozen=True)
class SourceSummary:
    clones: int
    chain_depth: int
    frozen: bool
    host: str | None
    clones_left: int | None  # None: unlimited (frozen)
    retired: str | None = None


def source_summary(src: SourceState) -> SourceSummary:
    return SourceSummary(src.clones, src.info.chain_depth, src.info.frozen, src.info.host_name,
                         src.clones_left, src.retired)


@dataclass
class Summary:
    """How a provisioning run went. ``failed`` = ``requested`` - ``ready``, and
    ``failures`` gives a reason for every one of them."""

    fleet: str
    run_id: str
    requested: int
    ready: int
    failed: int
    created: int
    adopted: int
    removed: int
    duration_s: float
    clones_per_s: float
    phases: dict[str, PhaseStats]
    sources: dict[str, SourceSummary]
    failures: dict[str, int] = field(default_factory=dict)
    failed_indexes: list[int] = field(default_factory=list)
    cancelled: bool = False
    limits: dict[str, float] = field(default_factory=dict)
    #: why, for each reason in ``failures``: the first message given for it (e.g. every
    #: source's reason when none can take a clone)
    failure_messages: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.ready == self.requested and not self.cancelled

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)


@dataclass
class RemovalSummary:
    """What ``destroy`` (or a scale-down) did."""

    fleet: str
    removed: int
    failed: int
    duration_s: float
    failures: dict[str, int] = field(default_factory=dict)
    untouched: int = 0  # VMs in the folder without the fleet's labels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Finished(Protocol):
    """What the summary reads of a job (:class:`fleet.engine.runstate.Job`)."""

    @property
    def index(self) -> int: ...
    @property
    def outcome(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def adopted(self) -> bool: ...


class Tally:
    """A run's numbers, counted by its parts as they happen."""

    def __init__(self) -> None:
        self.phase_s: dict[str, list[float]] = {p: [] for p in PHASES}
        self.created = 0
        self.removed = 0
        self.already_ready = 0  # members that were ready before the run
        self.blocked: dict[int, str] = {}  # index -> why its name cannot be used
        self.failure_messages: dict[str, str] = {}  # reason -> the first message given

    def failed(self, reason: str, message: str) -> None:
        self.failure_messages.setdefault(reason, message)

    def summary(self, spec: FleetSpec, run_id: str, jobs: Sequence[Finished],
                sources: Mapping[str, SourceState], limiters: Limiters, *,
                duration_s: float, cancelled: bool) -> Summary:
        duration = max(duration_s, 1e-9)
        ready = self.already_ready + sum(1 for j in jobs if j.outcome == "ready")
        failures: Counter[str] = Counter()
        failed_indexes: list[int] = []
        for job in jobs:
            if job.outcome != "ready":
                failures[job.reason or "unfinished"] += 1
                failed_indexes.append(job.index)
        for index, why in self.blocked.items():
            failures["name_taken"] += 1
            failed_indexes.append(index)
            self.failed("name_taken", why)
        return Summary(
            fleet=spec.name, run_id=run_id, requested=spec.count, ready=ready,
            failed=spec.count - ready, created=self.created,
            adopted=sum(1 for j in jobs if j.adopted), removed=self.removed,
            duration_s=round(duration, 6),
            clones_per_s=round(self.created / duration, 3),
            phases={p: PhaseStats.of(v) for p, v in self.phase_s.items()},
            sources={name: source_summary(s) for name, s in sources.items()},
            failures=dict(failures), failed_indexes=sorted(failed_indexes),
            failure_messages={r: self.failure_messages.get(r, "") for r in failures},
            cancelled=cancelled,
            limits={s.key: s.limit for s in limiters.statistics() if not math.isinf(s.limit)})
