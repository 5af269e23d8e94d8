"""What every benchmark scenario needs: a simulator in its own process, fleet (or a
baseline script) in another, measured by the kernel, and the run's timeline.

Nothing here times anything against a threshold: the scenarios report figures and
ratios measured side by side in one run, and the report says which targets hold.

- :func:`run_process` starts a command and reaps it with ``os.wait4``, so CPU time
  (user + system) and peak RSS are the kernel's figures for that process alone.
- :func:`run_fleet` runs ``fleet provision --json --events FILE`` exactly as a user
  would, against a :class:`~tests.simproc.SimProcess`.
- :class:`Timeline` reads the event log: clone completions, phase latencies,
  in-flight per host, limit changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.simproc import PASSWORD, SimProcess  # noqa: E402
from tests.specs import spec_data, to_toml  # noqa: E402

TOPOLOGIES = ROOT / "benchmarks" / "topologies"
FROZEN8 = [f"frozen-{i:02d}" for i in range(1, 9)]
# The clone phase alone: no guest network workflow, no readiness wait.
CLONE_ONLY: dict[str, Any] = {
    "network": {"disconnect_at_clone": False, "refresh": "none", "reconnect": False},
    "readiness": {"wait_for": "none"},
}
GUEST_PASSWORD = "fleet-guest"  # the simulator topologies' guest password


class BenchmarkError(RuntimeError):
    """A run did not finish as it must for its figures to mean anything."""


@dataclass
class ProcessResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float  # user + system of the process (and any children it reaped)
    max_rss_mb: float

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except ValueError as exc:
            raise BenchmarkError(f"{self.args[:4]} printed no JSON (exit "
                                 f"{self.returncode}): {self.stderr[-2000:]}") from exc


def run_process(args: list[str], *, env: dict[str, str] | None = None,
                timeout_s: float = 600.0, cwd: Path | None = None) -> ProcessResult:
    """Run ``args`` to the end; CPU and peak RSS from the kernel (``wait4``)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})), cwd=cwd)
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    wall0 = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            raise BenchmarkError(f"{args[:4]} ran past {timeout_s:.0f} s and was killed")
        time.sleep(0.02)
    wall = time.perf_counter() - wall0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    for reader in readers:
        reader.join(timeout=10)
    return ProcessResult(args, proc.returncode, "".join(out), "".join(err), wall,
                         usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def spec_for(sim: SimProcess, name: str, count: int, sources: list[str],
             **extra: Any) -> dict[str, Any]:
    """A fleet spec against ``sim``; a dict in ``extra`` merges into its table. Unlike
    the tests' specs it keeps fleet's own retry policy, as a user would run it."""
    data = spec_data(sim, name, count, sources=sources, **extra)
    if "retries" not in extra:
        del data["retries"]
    return data


@dataclass
class FleetRun:
    summary: dict[str, Any]
    process: ProcessResult
    timeline: Timeline

    @property
    def cpu_ms_per_clone(self) -> float:
        return 1000 * self.process.cpu_s / max(1, self.summary["ready"])


def run_fleet(spec: dict[str, Any], workdir: Path, *, timeout_s: float = 600.0) -> FleetRun:
    """``fleet provision`` in its own process, as a user runs it."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / f"{spec['name']}.toml"
    events_path = workdir / f"{spec['name']}.events.jsonl"
    spec_path.write_text(to_toml(spec))
    result = run_process(
        [sys.executable, "-m", "fleet", "provision", "--spec", str(spec_path), "--json",
         "--no-progress", "--events", str(events_path)],
        env={"SIM_PASSWORD": PASSWORD, "GUEST_PASSWORD": GUEST_PASSWORD},
        timeout_s=timeout_s)
    summary = result.json()
    if result.returncode != 0:
        raise BenchmarkError(f"fleet provision {spec['name']} exited {result.returncode}: "
                             f"{summary.get('failures')} {result.stderr[-1000:]}")
    return FleetRun(summary, result, Timeline.read(events_path))


def run_script(script: str, *args: str, timeout_s: float = 600.0) -> tuple[dict[str, Any],
                                                                           ProcessResult]:
    """A baseline script from ``benchmarks/scripts`` in its own process; it prints JSON."""
    result = run_process([sys.executable, str(ROOT / "benchmarks" / "scripts" / script),
                          *args], env={"SIM_PASSWORD": PASSWORD}, timeout_s=timeout_s,
                         cwd=ROOT)
    if result.returncode != 0:
        raise BenchmarkError(f"{script} exited {result.returncode}: {result.stderr[-2000:]}")
    return result.json(), result


def sim_process(*, time_scale: float, topology: str | None = None) -> SimProcess:
    return SimProcess(time_scale=time_scale,
                      topology=None if topology is None else TOPOLOGIES / topology)


# -- the run's timeline ----------------------------------------------------------------


@dataclass
class Timeline:
    """A run as its events tell it. Times are seconds since the run started."""

    first_start: float = 0.0
    clone_done: list[float] = field(default_factory=list)  # sorted
    ready: list[float] = field(default_factory=list)  # sorted
    phases: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    host_deltas: dict[str, list[tuple[float, int]]] = field(
        default_factory=lambda: defaultdict(list))
    limits: list[tuple[float, str, float]] = field(default_factory=list)
    retries: int = 0
    failures: int = 0
    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # retry/fail

    @classmethod
    def read(cls, path: Path) -> Timeline:
        timeline = cls()
        starts: list[float] = []
        host_of: dict[int, str] = {}
        with path.open() as stream:
            for line in stream:
                timeline._add(json.loads(line), starts, host_of)
        timeline.first_start = min(starts, default=0.0)
        timeline.clone_done.sort()
        timeline.ready.sort()
        return timeline

    def _add(self, e: dict[str, Any], starts: list[float], host_of: dict[int, str]) -> None:
        kind, t = e["event"], e["elapsed_s"]
        if kind == "job_started":
            starts.append(t)
            host_of[e["index"]] = e["host"]
            self.host_deltas[e["host"]].append((t, 1))
        elif kind == "phase_done":
            self.phases[e["phase"]].append(e["duration_s"])
            if e["phase"] == "clone":
                self.clone_done.append(t)
                self._left_host(e["index"], t, host_of)
        elif kind == "job_ready":
            self.ready.append(t)
        elif kind in ("job_retried", "job_failed"):
            self.retries += kind == "job_retried"
            self.failures += kind == "job_failed"
            self.reasons[e["reason"]] += 1
            if e["phase"] == "clone":
                self._left_host(e["index"], t, host_of)
        elif kind == "limit_changed":
            self.limits.append((t, e["limiter"], e["new"]))

    def _left_host(self, index: int, t: float, host_of: dict[int, str]) -> None:
        host = host_of.pop(index, None)
        if host is not None:
            self.host_deltas[host].append((t, -1))

    def clone_phase_s(self) -> float:
        """First clone handed to vCenter to the last clone finished."""
        return self.clone_done[-1] - self.first_start if self.clone_done else 0.0

    def tenth_rates(self, times: list[float] | None = None) -> list[float]:
        """Completions per second in each tenth of the completions (by count)."""
        done = self.clone_done if times is None else times
        n = len(done)
        if n < 10:
            return []
        edges = [self.first_start] + [done[(i * n) // 10 - 1] for i in range(1, 11)]
        return [((i + 1) * n // 10 - i * n // 10) / max(1e-9, edges[i + 1] - edges[i])
                for i in range(10)]

    def in_flight(self, host: str, step_s: float, end: float) -> tuple[list[float], list[int]]:
        """Clones of ours at vCenter on ``host``, sampled every ``step_s`` up to ``end``."""
        deltas = sorted(self.host_deltas.get(host, []))
        times = [t for t, _ in deltas]
        level: list[int] = []
        running = 0
        for _, d in deltas:
            running += d
            level.append(running)
        samples = [i * step_s for i in range(int(end / step_s) + 2)]
        return samples, [level[k - 1] if (k := bisect_right(times, s)) else 0 for s in samples]


def rate_series(times: list[float], bin_s: float, start: float = 0.0
                ) -> tuple[list[float], list[float]]:
    """Completions per second in bins of ``bin_s`` (bin centres, rates)."""
    if not times:
        return [], []
    bins = int((times[-1] - start) / bin_s) + 1
    counts = [0] * bins
    for t in times:
        counts[max(0, int((t - start) / bin_s))] += 1
    return [start + (i + 0.5) * bin_s for i in range(bins)], [c / bin_s for c in counts]
