"""Scenario 7 of ``python -m benchmarks``: a warm pool's leases under an open-loop load.

A real ``fleet serve`` (tests/api/serveproc.py) keeps one pool of the default
topology's sources, full workflow (clone, guest NIC refresh, reconnect, guest IP),
against a simulator at time scale 1. Its ``[limits] per_host`` is lowered below the
hosts' slots, so the pool's refills are slower than the lease requests of the
first segment: that is how this scenario has a stretch where leases outrun refills
(on the default limits the slots allow about 64 clones/s, twice the issue's 30
requests/s). The client is an asyncio loop with aiohttp, open loop: each request
is sent at its scheduled time whether or not the earlier ones were answered.

1. ``outrun``: ``pools_leases`` requests at ``pools_rate`` per second, each with
   ``wait_s`` long enough that only ``max`` could refuse one. The pool starts with
   ``ready`` idle members; once they are gone, requests wait for refills, which
   then run at what the slots allow.
2. Once the pool is back at ``ready`` idle members with nothing refilling,
   ``steady``: ``pools_steady_leases`` requests at a rate the refills keep up with
   (about half the slot capacity). If the sampled idle count never reaches 0 in it
   (the report says), every lease of this segment was answered from an idle
   member, and the service's ``fleet_lease_wait_seconds`` over the segment is the
   service-side wait of exactly those leases.

Every lease is returned (``DELETE``) a random ``pools_hold_min_s`` to
``pools_hold_max_s`` after its grant. ``GET /metrics`` is sampled every
:data:`SAMPLE_S` throughout: the pool's members by state, the requests waiting,
the refill and lease-wait histograms (their differences between two samples are
what happened in between) and the engine's view of the refills' clones (in flight,
clone phase time), which splits a refill rate below the slots' into slots left idle
and time lost per clone. ``GET /healthz`` is timed every :data:`PROBE_S`. Per
segment, ``/proc`` gives the CPU of the service, the simulator and this client, how
long each one's main thread (its event loop) ran and how long it waited for a CPU
while runnable, and how busy the whole machine was: a busy event loop and a busy
machine look alike from outside, not from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.bench_reconcile import cpu_s, peak_rss_mb
from benchmarks.bench_service import server_side_ms
from benchmarks.harness import FROZEN8, BenchmarkError, sim_process
from fleet.engine.summary import PhaseStats
from tests.api.serveproc import ServeProcess, service_config

if TYPE_CHECKING:
    from benchmarks.scenarios import Sizes

POOL = "bench"
#: how often the client samples ``GET /metrics`` (a scrape costs the service some 20 ms
#: of its event loop on the loaded machine: every 0.25 s was a tenth of its time)
SAMPLE_S = 1.0
#: how often the client times ``GET /healthz``
PROBE_S = 0.1
#: a lease answered (client side) within this counts as answered at once
AT_ONCE_S = 0.05
#: how long the pool may take to fill (at the start, and again between the segments)
FILL_TIMEOUT_S = 300.0
#: the lines of ``/metrics`` this scenario reads
_WANTED = ("fleet_pool_members", "fleet_lease_waiting", "fleet_pool_refill_seconds",
           "fleet_lease_wait_seconds", "fleet_lease_refusals_total",
           "fleet_clones_in_flight", "fleet_clone_phase_duration_seconds",
           "fleet_clones_total")


# -- the service's metrics ----------------------------------------------------------------


@dataclass
class Sample:
    """One scrape of ``/metrics``: ``t`` seconds since the scenario's origin."""

    t: float
    members: dict[str, int]
    waiting: int
    refills: dict[float, float]  # cumulative histogram buckets: upper bound -> count
    lease_waits: dict[float, float]
    refusals: dict[str, float]  # reason -> count
    #: the engine's view of the refills' clone phase (only the pool clones here):
    #: clones handed to vCenter and not yet seen done, the clone phases' summed
    #: duration and count, and the clones made (ready, before the pool reads them)
    in_flight: int = 0
    clone_phase_sum: float = 0.0
    clone_phase_count: float = 0.0
    made: float = 0.0

    @property
    def refilled(self) -> float:
        return self.refills.get(float("inf"), 0.0)

    @property
    def total(self) -> int:
        return sum(self.members.values())

    def row(self) -> dict[str, float]:
        return {"t": round(self.t, 3), **self.members, "waiting": self.waiting,
                "refilled": self.refilled}


def parse_metrics(text: str, t: float, pool: str = POOL) -> Sample:
    """The pool's series from an exposition (prometheus_client's own parser)."""
    lines = "\n".join(line for line in text.splitlines() if line.startswith(_WANTED)
                      or line.startswith(tuple(f"# TYPE {n}" for n in _WANTED)))
    sample = Sample(t, {}, 0, {}, {}, {})
    for family in text_string_to_metric_families(lines + "\n"):
        for s in family.samples:
            if s.name == "fleet_clones_in_flight":
                sample.in_flight += int(s.value)
            elif s.name == "fleet_clone_phase_duration_seconds_sum" \
                    and s.labels.get("phase") == "clone":
                sample.clone_phase_sum = s.value
            elif s.name == "fleet_clone_phase_duration_seconds_count" \
                    and s.labels.get("phase") == "clone":
                sample.clone_phase_count = s.value
            elif s.name == "fleet_clones_total" and s.labels.get("fleet") == pool \
                    and s.labels.get("outcome") == "ready":
                sample.made = s.value
            if s.labels.get("pool") != pool:
                continue
            if s.name == "fleet_pool_members":
                sample.members[s.labels["state"]] = int(s.value)
            elif s.name == "fleet_lease_waiting":
                sample.waiting = int(s.value)
            elif s.name == "fleet_pool_refill_seconds_bucket":
                sample.refills[float(s.labels["le"])] = s.value
            elif s.name == "fleet_lease_wait_seconds_bucket":
                sample.lease_waits[float(s.labels["le"])] = s.value
            elif s.name == "fleet_lease_refusals_total":
                reason = s.labels["reason"]
                sample.refusals[reason] = sample.refusals.get(reason, 0.0) + s.value
    if not sample.members:
        raise BenchmarkError(f"/metrics shows no fleet_pool_members for pool {pool}")
    return sample


def bucket_delta(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    """What a cumulative histogram counted between two scrapes."""
    return {le: after[le] - before.get(le, 0.0) for le in sorted(after)}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear within the bucket holding rank
    ``q * count``; the highest finite bound if that is the +Inf bucket. None if empty."""
    bounds = sorted(buckets)
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def fraction_within(bound: float, buckets: dict[float, float]) -> float | None:
    """The fraction of observations at most ``bound`` (a bucket's upper bound)."""
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return None
    if bound not in buckets:
        raise BenchmarkError(f"{bound} is not a bucket bound: {sorted(buckets)}")
    return buckets[bound] / total


def bucket_holding(q: float, buckets: dict[float, float]) -> tuple[float, float] | None:
    """The bucket (lower, upper bound) holding the observation of rank ``q * count``:
    that observation is above the lower bound and at most the upper (q = 1: the
    largest; an upper bound of inf: past the last finite bound). None if empty."""
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return None
    lower = 0.0
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return lower, le
        lower = le
    return lower, float("inf")


def histogram_figures(buckets: dict[float, float], within: float | None = None
                      ) -> dict[str, Any]:
    """Count, estimated p50/p99, the buckets holding the p99 and the largest (what the
    histogram proves about them), and a fraction within a bound if asked."""
    p99, largest = bucket_holding(0.99, buckets), bucket_holding(1.0, buckets)
    out: dict[str, Any] = {
        "count": int(buckets.get(float("inf"), 0.0)),
        "p50_s": histogram_quantile(0.50, buckets), "p99_s": histogram_quantile(0.99, buckets),
        "p99_above_s": p99[0] if p99 else None, "p99_le_s": p99[1] if p99 else None,
        "max_above_s": largest[0] if largest else None,
        "max_le_s": largest[1] if largest else None,
        "buckets": {("+Inf" if le == float("inf") else f"{le:g}"): int(n)
                    for le, n in buckets.items()}}
    if within is not None:
        out["fraction_within"] = fraction_within(within, buckets)
        out["within_s"] = within
    return out


# -- the machine -------------------------------------------------------------------------


def _machine_busy() -> tuple[float, float]:
    """Busy and total jiffies of every CPU (``/proc/stat``)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def schedstat(pid: int) -> tuple[float, float]:
    """Seconds a process's main thread (an event loop's) ran on a CPU, and waited on a
    run queue while runnable, from ``/proc/<pid>/task/<pid>/schedstat``."""
    try:
        ran, waited, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"cannot read the scheduler figures of process {pid}: "
                             f"{exc}") from exc
    return int(ran) / 1e9, int(waited) / 1e9


class CpuMeter:
    """CPU of the service, the simulator, this process and the whole machine over a
    span; for each process's main thread (its event loop), the share of the span it
    ran and the share it was runnable but waited for a CPU."""

    def __init__(self, service_pid: int, sim_pid: int) -> None:
        self.pids = {"service": service_pid, "sim": sim_pid, "client": os.getpid()}
        self.start()

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = {k: cpu_s(pid) for k, pid in self.pids.items()}
        self.sched0 = {k: schedstat(pid) for k, pid in self.pids.items()}
        self.machine0 = _machine_busy()
        self.load0 = Path("/proc/loadavg").read_text().split()[0]

    def done(self) -> dict[str, Any]:
        wall = max(1e-9, time.monotonic() - self.t0)
        out: dict[str, Any] = {"wall_s": wall}
        for k, pid in self.pids.items():
            used = cpu_s(pid) - self.cpu0[k]
            ran, waited = (a - b for a, b in zip(schedstat(pid), self.sched0[k], strict=True))
            out[f"{k}_cpu_s"] = used
            out[f"{k}_cpu_percent"] = 100 * used / wall  # all threads, of one core
            out[f"{k}_loop_ran_percent"] = 100 * ran / wall
            out[f"{k}_loop_runqueue_percent"] = 100 * waited / wall
        busy, total = _machine_busy()
        out["machine_busy_percent"] = 100 * (busy - self.machine0[0]) / max(
            1, total - self.machine0[1])  # of all CPUs together
        out["loadavg_1m"] = [float(self.load0),
                             float(Path("/proc/loadavg").read_text().split()[0])]
        return out


# -- the client ---------------------------------------------------------------------------


@dataclass
class LeaseRequest:
    """One request of a segment; times are seconds since the scenario's origin."""

    index: int
    scheduled: float
    sent: float = 0.0
    answered: float | None = None
    status: int | None = None
    reason: str | None = None  # a refusal's error.reason (or the client error)
    lease_id: str | None = None
    hold_s: float = 0.0
    returned_status: int | None = None
    return_s: float | None = None

    @property
    def wait_s(self) -> float | None:
        return None if self.answered is None else self.answered - self.sent



class Client:
    """The open-loop client and the sampler, on one asyncio loop."""

    def __init__(self, base_url: str, token: str, origin: float, wait_s: float,
                 hold_s: tuple[float, float], seed: int) -> None:
        self.base = base_url
        self.auth = {"Authorization": f"Bearer {token}"}
        self.origin = origin
        self.wait_s = wait_s
        self.hold_s = hold_s
        self.rng = random.Random(seed)
        self.samples: list[Sample] = []
        #: (seconds since the origin, GET /healthz latency): how long the service's
        #: event loop takes to answer the cheapest request
        self.probes: list[tuple[float, float]] = []
        self._session: aiohttp.ClientSession | None = None

    def now(self) -> float:
        return time.monotonic() - self.origin

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    async def __aenter__(self) -> Client:
        # No connection limit: an open loop must not queue requests in the client. Idle
        # connections are let go well before the service's keep-alive timeout (its
        # api.idle_timeout_s, 15 s), which would otherwise close one as a request
        # goes out on it (a reset, no answer).
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=5.0)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.wait_s + 120))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def scrape(self) -> Sample:
        async with self.session.get(f"{self.base}/metrics") as resp:
            text = await resp.text()
            if resp.status != 200:
                raise BenchmarkError(f"GET /metrics: {resp.status} {text[:300]}")
        return parse_metrics(text, self.now())

    async def probe(self) -> None:
        t0 = self.now()
        async with self.session.get(f"{self.base}/healthz") as resp:
            await resp.read()
        self.probes.append((t0, self.now() - t0))

    async def sample(self) -> None:
        self.samples.append(await self.scrape())

    @staticmethod
    async def every(period_s: float, action: Any, stop: asyncio.Event) -> None:
        """``await action()`` every ``period_s`` until ``stop`` is set."""
        while not stop.is_set():
            await action()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period_s)

    async def pool(self) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/v1/pools/{POOL}", headers=self.auth) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise BenchmarkError(f"GET /v1/pools/{POOL}: {resp.status} {body}")
            return body  # type: ignore[no-any-return]

    async def filled(self, ready: int, timeout_s: float) -> float:
        """Wait until the pool serves with ``ready`` idle members and nothing else in
        hand (refilling, recycling, waiting); returns how long that took."""
        t0 = self.now()
        deadline = time.monotonic() + timeout_s
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = await self.pool()
            m = body["members"]
            if body["serving"] and m["idle"] >= ready and not m["refilling"] \
                    and not m["recycling"] and not body["waiting"]:
                return self.now() - t0
            await asyncio.sleep(0.1)
        raise BenchmarkError(f"pool {POOL} not full after {timeout_s:.0f} s: {body}")

    async def segment(self, count: int, rate: float) -> list[LeaseRequest]:
        """``count`` lease requests at ``rate`` per second from now, open loop; returns
        once every one is answered and every lease granted is returned."""
        start = self.now() + 0.2
        requests = [LeaseRequest(i, start + i / rate) for i in range(count)]
        for r in requests:
            r.hold_s = self.rng.uniform(*self.hold_s)
        await asyncio.gather(*(self._one(r) for r in requests))
        return requests

    async def _one(self, r: LeaseRequest) -> None:
        await asyncio.sleep(max(0.0, r.scheduled - self.now()))
        r.sent = self.now()
        try:
            async with self.session.post(f"{self.base}/v1/pools/{POOL}/leases",
                                         json={"wait_s": self.wait_s},
                                         headers=self.auth) as resp:
                body = await resp.json(content_type=None)
                r.answered = self.now()
                r.status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            r.answered = self.now()
            r.reason = f"{type(exc).__name__}: {exc}"[:200]
            return
        if r.status != 201:
            r.reason = (body.get("error") or {}).get("reason") if isinstance(body, dict) \
                else None
            r.reason = r.reason or json.dumps(body)[:200]
            return
        lease = body["lease"]
        r.lease_id = lease["id"]
        await asyncio.sleep(r.hold_s)
        t0 = self.now()
        try:
            async with self.session.delete(f"{self.base}/v1/leases/{r.lease_id}",
                                           headers=self.auth) as resp:
                await resp.read()
                r.returned_status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            r.reason = f"return: {type(exc).__name__}: {exc}"[:200]
        r.return_s = self.now() - t0


# -- the scenario -------------------------------------------------------------------------


def pool_config(sim: Any, state_dir: Path, sizes: Sizes) -> dict[str, Any]:
    """The service config: one pool, the limits that make its refills slower than the
    first segment's requests, fleet's own retries and timeouts (as a user runs it)."""
    config = service_config(sim, state_dir, scan_interval_s=30.0,
                            limits={"per_host": sizes.pools_per_host})
    config["defaults"] = {k: v for k, v in config["defaults"].items()
                          if k not in ("retries", "timeouts")}
    config["pools"] = {POOL: {"ready": sizes.pools_ready, "max": sizes.pools_max,
                              "wait_s": sizes.pools_wait_s, "spec": {"sources": FROZEN8}}}
    return config


def _stats(values: list[float]) -> dict[str, Any]:
    d = PhaseStats.of(values)
    return {"count": d.count, "p50_s": d.p50_s, "p99_s": d.p99_s, "max_s": d.max_s,
            "mean_s": d.mean_s}


def _window(samples: list[Sample]) -> dict[str, Any] | None:
    """Where leases outran refills: from the first to the last sample with no idle
    member and requests waiting; the refills the service counted in between."""
    outrun = [s for s in samples if s.members.get("idle", 0) == 0 and s.waiting > 0]
    if len(outrun) < 2:
        return None
    first, last = outrun[0], outrun[-1]
    span = last.t - first.t
    refills = last.refilled - first.refilled
    clones = last.clone_phase_count - first.clone_phase_count
    return {"start_s": first.t, "end_s": last.t, "duration_s": span,
            "samples": len(outrun), "refills": refills,
            "refills_per_s": refills / span if span > 0 else 0.0,
            "peak_waiting": max(s.waiting for s in outrun),
            # Little's law, the engine's view: clones/s = clones in flight / clone time
            "clones_made_per_s": (last.made - first.made) / span if span > 0 else 0.0,
            "mean_in_flight": sum(s.in_flight for s in outrun) / len(outrun),
            "mean_clone_phase_s": (last.clone_phase_sum - first.clone_phase_sum) / clones
            if clones else None}


def segment_figures(requests: list[LeaseRequest], before: Sample, after: Sample,
                    samples: list[Sample], cpu: dict[str, Any]) -> dict[str, Any]:
    granted = [r for r in requests if r.status == 201]
    waits = [r.wait_s for r in granted if r.wait_s is not None]
    at_once = [w for w in waits if w <= AT_ONCE_S]
    waited = [w for w in waits if w > AT_ONCE_S]
    refused: dict[str, int] = {}  # answered, not 201: status and reason
    failed: dict[str, int] = {}  # no answer (the connection failed)
    for r in requests:
        if r.status is None:
            failed[str(r.reason)] = failed.get(str(r.reason), 0) + 1
        elif r.status != 201:
            key = f"{r.status} {r.reason}"
            refused[key] = refused.get(key, 0) + 1
    returns_failed = sum(1 for r in granted if r.returned_status != 200)
    lag = [r.sent - r.scheduled for r in requests]
    inside = [s for s in samples if before.t <= s.t <= after.t]
    return {
        "requests": len(requests), "granted": len(granted), "refused": refused,
        "failed": failed,
        "returns_failed": returns_failed,
        "client_wait": _stats(waits), "client_wait_at_once": _stats(at_once),
        "client_wait_waited": _stats(waited),
        "return_latency": _stats([r.return_s for r in granted if r.return_s is not None]),
        "send_lag": _stats(lag),
        "service_wait": histogram_figures(bucket_delta(after.lease_waits, before.lease_waits),
                                          within=AT_ONCE_S),
        "refill": histogram_figures(bucket_delta(after.refills, before.refills)),
        "service_refusals": {k: v - before.refusals.get(k, 0.0)
                             for k, v in after.refusals.items()
                             if v - before.refusals.get(k, 0.0)},
        "min_idle_sampled": min((s.members.get("idle", 0) for s in inside), default=None),
        "peak_waiting_sampled": max((s.waiting for s in inside), default=0),
        "peak_members_sampled": max((s.total for s in inside), default=0),
        "window": _window(inside), "cpu": cpu,
        # for the plot: each granted lease's send time and client-side wait
        "series": {"sent": [round(r.sent, 3) for r in granted],
                   "wait_s": [round(r.wait_s or 0.0, 4) for r in granted]},
    }


async def _drive(service: ServeProcess, sim: Any, sizes: Sizes) -> dict[str, Any]:
    origin = time.monotonic()
    out: dict[str, Any] = {}
    async with Client(service.url, service.token, origin, sizes.pools_wait_s,
                      (sizes.pools_hold_min_s, sizes.pools_hold_max_s), seed=7) as client:
        out["fill_s"] = await client.filled(sizes.pools_ready, FILL_TIMEOUT_S)
        stop = asyncio.Event()
        sampler = asyncio.create_task(client.every(SAMPLE_S, client.sample, stop))
        prober = asyncio.create_task(client.every(PROBE_S, client.probe, stop))
        try:
            meter = CpuMeter(service.proc.pid, sim.proc.pid)
            for name, count, rate in (("outrun", sizes.pools_leases, sizes.pools_rate),
                                      ("steady", sizes.pools_steady_leases,
                                       sizes.pools_steady_rate)):
                if name == "steady":
                    out["recovered_s"] = await client.filled(sizes.pools_ready,
                                                             FILL_TIMEOUT_S)
                before = await client.scrape()
                client.samples.append(before)
                meter.start()
                requests = await client.segment(count, rate)
                cpu = meter.done()
                after = await client.scrape()
                client.samples.append(after)
                out[name] = segment_figures(requests, before, after, client.samples, cpu)
                out[name]["healthz"] = _stats([d for t, d in client.probes
                                               if before.t <= t <= after.t])
                out[name]["count"], out[name]["rate_per_s"] = count, rate
        finally:
            stop.set()
            await sampler
            await prober
        async with client.session.get(f"{service.url}/metrics") as resp:
            out["api_handler_mean_ms"] = server_side_ms(await resp.text())
    rows = [s.row() for s in sorted(client.samples, key=lambda s: s.t)]
    out["series"] = {key: [r.get(key, 0) for r in rows] for key in
                     ("t", "idle", "leased", "refilling", "recycling", "waiting", "refilled")}
    return out


def run(sizes: Sizes, work: Path) -> dict[str, Any]:
    """The scenario's raw figures (targets are judged by ``scenarios.pools``)."""
    with sim_process(time_scale=sizes.pools_time_scale) as sim, \
            tempfile.TemporaryDirectory(prefix="bench-pools-", dir=work) as tmp:
        config = pool_config(sim, Path(tmp) / "state", sizes)
        try:
            service = ServeProcess(config, start_timeout_s=60.0)
        except RuntimeError as exc:
            raise BenchmarkError(str(exc)[-2000:]) from exc
        with service:
            try:
                out = asyncio.run(_drive(service, sim, sizes))
            except (BenchmarkError, aiohttp.ClientError, OSError) as exc:
                raise BenchmarkError(f"{exc}\nfleet serve said:\n"
                                     + "".join(service.stderr_lines[-30:])) from exc
            out["service_peak_rss_mb"] = peak_rss_mb(service.proc.pid)
            stats = sim.stats()
        out["sim"] = {"hosts": {h: {"slots": s["slots"]} for h, s in stats["hosts"].items()},
                      "clone_task_s": stats["clone_task_s"],
                      "network_conflicts": stats["network_conflicts"]}
    return out
