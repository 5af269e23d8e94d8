"""What the simulator counts for ``GET /_sim/stats``: calls, clones, conflicts, task times.

Objects report events here (a clone made, a duplicate MAC, a network conflict);
``Simulator.stats`` reads it with the inventory to build the report.
"""

from __future__ import annotations

import logging
from collections import Counter, deque

from fleet.sim.watermarks import CloneWatermarks

log = logging.getLogger("fleet.sim")


class RunTimes:
    """count/mean/max of every sample and p50/p95 of the latest ``keep``: a summary that
    does not grow with the number of clones."""

    def __init__(self, keep: int = 10_000) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.recent: deque[float] = deque(maxlen=keep)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.max = max(self.max, value)
        self.recent.append(value)

    def summary(self) -> dict[str, float]:
        if not self.count:
            return {"count": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}
        ordered = sorted(self.recent)
        n = len(ordered)
        return {"count": self.count, "mean": self.total / self.count, "p50": ordered[n // 2],
                "p95": ordered[min(n - 1, int(n * 0.95))], "max": self.max}


class Stats:
    """Counters and summaries the simulator's objects feed."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.source_names: set[str] = set()
        self.max_clone_chain_depth = 0
        self.clone_task_s = RunTimes()  # run times of successful instant clone tasks
        self.clones = CloneWatermarks()

    def clone_made(self, source_name: str, chain_depth: int) -> None:
        self.counters["clones_total"] += 1
        self.source_names.add(source_name)
        self.max_clone_chain_depth = max(self.max_clone_chain_depth, chain_depth)
        self.clones.clone_made(source_name, chain_depth)

    def network_conflict(self, vm_name: str) -> None:
        self.counters["network_conflicts"] += 1
        log.info("network conflict: %s connected while its guest uses another MAC", vm_name)

    def duplicate_mac(self, vm_name: str, mac: str) -> None:
        self.counters["duplicate_macs"] += 1
        log.info("duplicate MAC: %s was given %s, which another VM has", vm_name, mac)
