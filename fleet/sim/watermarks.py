"""How hard a client pushed the simulated vCenter with instant clones: high-water marks.

A clone task is *in flight* from its ``InstantClone_Task`` call until it ends,
queued or running. For every host, datastore and source (and overall) the
simulator keeps the most that were ever in flight at once, how many had to
queue for a slot, and each failed clone task's fault by name. A client's limits
are judged by these: one that never hands vCenter more than the host slots has
``queued`` at 0. (The most *running* at once, per host and overall, is the
scheduler's: ``Scheduler.peak``.) Reported under ``clones`` in ``GET /_sim/stats``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: the key of everything in flight at once
ALL = ""


@dataclass
class CloneWatermarks:
    """In flight now and at most, per ``host:``/``datastore:``/``source:`` name and
    overall (:data:`ALL`); see the module docstring."""

    in_flight: Counter[str] = field(default_factory=Counter)
    max_in_flight: Counter[str] = field(default_factory=Counter)
    submitted: int = 0
    queued: int = 0  # clone tasks that waited for a slot (state "queued" when made)
    faults: Counter[str] = field(default_factory=Counter)  # failed clone tasks, by fault
    max_depth_by_source: Counter[str] = field(default_factory=Counter)
    _keys: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def submitted_task(self, task_id: str, *, host: str, datastore: str, source: str,
                       queued: bool) -> None:
        keys = (ALL, f"host:{host}", f"datastore:{datastore}", f"source:{source}")
        self._keys[task_id] = keys
        self.submitted += 1
        self.queued += queued
        for key in keys:
            self.in_flight[key] += 1
            self.max_in_flight[key] = max(self.max_in_flight[key], self.in_flight[key])

    def finished_task(self, task_id: str, fault: str | None) -> None:
        keys = self._keys.pop(task_id, None)
        if keys is None:
            return
        for key in keys:
            self.in_flight[key] -= 1
        if fault is not None:
            self.faults[fault] += 1

    def clone_made(self, source: str, depth: int) -> None:
        self.max_depth_by_source[source] = max(self.max_depth_by_source[source], depth)

    def peak(self, kind: str) -> dict[str, int]:
        """Most in flight at once per ``host``, ``datastore`` or ``source`` name."""
        prefix = kind + ":"
        return {k[len(prefix):]: v for k, v in self.max_in_flight.items()
                if k.startswith(prefix)}

    def as_dict(self) -> dict[str, Any]:
        return {
            "submitted": self.submitted, "queued": self.queued,
            "in_flight": self.in_flight[ALL], "max_in_flight": self.max_in_flight[ALL],
            "max_in_flight_per_host": self.peak("host"),
            "max_in_flight_per_datastore": self.peak("datastore"),
            "max_in_flight_per_source": self.peak("source"),
            "max_clone_depth_per_source": dict(self.max_depth_by_source),
            "faults": dict(self.faults),
        }
