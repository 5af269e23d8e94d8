"""How a run went: the closing :class:`Summary` and its percentiles.

:class:`Summary` is a provisioning run's result; ``to_dict()`` is what
``--json`` prints. :class:`RemovalSummary` is the same for ``destroy`` and a
scale-down.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from fleet.engine.placement import SourceState

#: the timed phases of a clone, in pipeline order (the summary's ``phases`` keys)
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
