"""Service benchmark: ``/metrics`` scrape time and API latency while 1,000 clones are in flight.

A ``fleet serve`` process (one vCenter session, shared limits) provisions a
1,000-clone fleet with the full pipeline (clone, guest NIC refresh, reconnect,
readiness) on the simulator's default topology at time scale 1. While the
burst runs, a client polls round-robin, one request at a time, as a dashboard
and a CI job would: ``GET /metrics`` (what Prometheus scrapes), ``GET
/v1/fleets/{name}`` (the fleet with all 1,000 members, states and phase
timings) and ``GET /v1/fleets`` (the list). The same requests are then timed
with the burst over (1,000 members, no run) as the baseline. Server-side
handler time per route (mean, from the service's own
``fleet_api_request_duration_seconds``) tells handler cost from event-loop
wait. Beside it, unless ``--no-baseline``, the same burst by ``fleet provision``
on a fresh simulator shows what going through the service costs in throughput.

Run: ``python benchmarks/bench_service.py [--clones 1000] [--time-scale 1] [--no-baseline]``.
Prints a table and writes ``benchmarks/results/bench_service.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleet.engine.summary import percentile  # noqa: E402
from tests.api.serveproc import ServeProcess, service_config  # noqa: E402
from tests.simproc import SimProcess  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SOURCES = [f"frozen-{i:02d}" for i in range(1, 9)]
FLEET = "bench"


def stats_ms(values_s: list[float]) -> dict[str, float]:
    v = sorted(values_s)
    if not v:
        return {"n": 0, "p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    return {"n": len(v), "p50_ms": round(percentile(v, 50) * 1000, 2),
            "p95_ms": round(percentile(v, 95) * 1000, 2),
            "p99_ms": round(percentile(v, 99) * 1000, 2), "max_ms": round(v[-1] * 1000, 2)}


def poll(service: ServeProcess, *, until: Any, max_s: float, pause_s: float
         ) -> dict[str, Any]:
    """Round-robin GETs until ``until()`` or ``max_s``; latency per kind and sizes."""
    kinds = {"metrics": ("/metrics", False), "get_fleet": (f"/v1/fleets/{FLEET}?limit=100000",
                                                           True),
             "list_fleets": ("/v1/fleets", True)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    sizes: dict[str, int] = {}
    in_flight: list[int] = []
    t_end = time.monotonic() + max_s
    headers = {"Authorization": f"Bearer {service.token}"}
    while time.monotonic() < t_end and not until():
        for kind, (path, auth) in kinds.items():
            t0 = time.perf_counter()
            status, _, body = service.raw("GET", path, headers=headers if auth else None)
            times[kind].append(time.perf_counter() - t0)
            assert status == 200, (kind, status, body[:200])
            sizes[kind] = len(body)
            if kind == "get_fleet":
                fleet = json.loads(body)
                in_flight.append(fleet["requested"] - fleet["by_state"].get("ready", 0))
        time.sleep(pause_s)
    return {"latency": {k: stats_ms(v) for k, v in times.items()}, "bytes": sizes,
            "not_ready_seen": {"max": max(in_flight, default=0),
                               "min": min(in_flight, default=0)}}


def server_side_ms(exposition: str) -> dict[str, float]:
    """Mean handler time per route from the service's own histogram."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in exposition.splitlines():
        for suffix, into in (("_sum{", sums), ("_count{", counts)):
            prefix = "fleet_api_request_duration_seconds" + suffix
            if line.startswith(prefix):
                labels, value = line[len(prefix):].rsplit("} ", 1)
                route = labels.split('route="', 1)[1].split('"', 1)[0]
                into[route] = float(value)
    return {route: round(1000 * sums[route] / counts[route], 3)
            for route in sorted(sums) if counts.get(route)}


def direct_baseline(clones: int, time_scale: float) -> dict[str, Any]:
    """The same burst by ``fleet provision`` (no service) on a fresh simulator."""
    import os
    import subprocess

    from tests.api.serveproc import GUEST_PASSWORD, to_toml
    from tests.simproc import PASSWORD, USER

    with SimProcess(time_scale=time_scale) as sim, \
            tempfile.TemporaryDirectory(prefix="bench-provision-") as tmp:
        spec = Path(tmp) / "spec.toml"
        spec.write_text(to_toml({
            "name": FLEET, "count": clones, "sources": SOURCES,
            "vcenter": {"url": sim.url, "user": USER, "password_env": "SIM_PASSWORD",
                        "thumbprint": sim.thumbprint},
            "retries": {"backoff_base_s": 0.5, "backoff_max_s": 5.0},
            "network": {"guest_user": "root", "guest_password_env": "GUEST_PASSWORD"}}))
        env = dict(os.environ, SIM_PASSWORD=PASSWORD, GUEST_PASSWORD=GUEST_PASSWORD)
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "fleet", "provision", "--spec", str(spec),
                              "--json", "--no-progress"], env=env, capture_output=True,
                             text=True, timeout=900, check=False)
        wall_s = time.monotonic() - t0
        summary = json.loads(out.stdout)
    return {"ready": summary["ready"], "wall_s": round(wall_s, 2),
            "clones_per_s": summary["clones_per_s"],
            "phases_p50_s": {k: v["p50_s"] for k, v in summary["phases"].items()}}


def run(clones: int, time_scale: float, pause_s: float) -> dict[str, Any]:
    with SimProcess(time_scale=time_scale) as sim, \
            tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        config = service_config(sim, Path(tmp) / "state", scan_interval_s=30.0,
                                limits={"in_flight": "auto"}, max_count=clones)
        config["api"] = {**config["api"], "max_body_bytes": 1024 * 1024}
        with ServeProcess(config) as service:
            t0 = time.monotonic()
            status, body = service.call("POST", "/v1/fleets", {
                "name": FLEET, "count": clones, "sources": SOURCES,
                "retries": {"backoff_base_s": 0.5, "backoff_max_s": 5.0}})
            assert status == 202, body
            accepted_s = time.monotonic() - t0
            done: dict[str, Any] = {}

            def finished() -> bool:
                s, fleet = service.call("GET", f"/v1/fleets/{FLEET}?limit=0")
                if s == 200 and fleet["status"] not in ("pending", "provisioning"):
                    done.update(fleet)
                    return True
                return False

            during = poll(service, until=finished, max_s=600, pause_s=pause_s)
            burst_s = time.monotonic() - t0
            while not done:
                finished()
                time.sleep(0.2)
            after_burst = time.monotonic()
            idle = poll(service, until=lambda: time.monotonic() - after_burst > 10,
                        max_s=15, pause_s=pause_s)
            status, detail = service.call("GET", f"/v1/fleets/{FLEET}?limit=0")
            summary = detail["run"]["summary"]
            sim_stats = sim.stats()
            status, text = service.call("GET", "/metrics", token=None)
            server_ms = server_side_ms(text)
    return {
        "clones": clones, "time_scale": time_scale, "poll_pause_s": pause_s,
        "accepted_in_ms": round(accepted_s * 1000, 2),
        "burst_s": round(burst_s, 2), "status": done.get("status"),
        "ready": done.get("ready"), "clones_per_s": summary["clones_per_s"],
        "phases_p50_s": {k: v["p50_s"] for k, v in summary["phases"].items()},
        "during_burst": during, "after_burst": idle,
        "network_conflicts": sim_stats["network_conflicts"],
        "server_side_mean_ms": server_ms,
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clones", type=int, default=1000)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--pause", type=float, default=0.05,
                        help="seconds between polling rounds (default 0.05)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the same burst by 'fleet provision'")
    args = parser.parse_args()
    result = run(args.clones, args.time_scale, args.pause)
    if not args.no_baseline:
        result["direct_provision"] = direct_baseline(args.clones, args.time_scale)
    print(f"fleet serve: {result['clones']} clones, full pipeline, time scale "
          f"{result['time_scale']:g}: accepted in {result['accepted_in_ms']} ms, "
          f"{result['ready']} ready in {result['burst_s']} s "
          f"({result['clones_per_s']} clones/s), network conflicts "
          f"{result['network_conflicts']}")
    print(f"not-ready members seen while polling: up to "
          f"{result['during_burst']['not_ready_seen']['max']}")
    direct = result.get("direct_provision")
    if direct:
        print(f"same burst by 'fleet provision' (no service): {direct['ready']} ready, "
              f"{direct['clones_per_s']} clones/s")
    print("server-side handler time, mean over the run (ms): " + ", ".join(
        f"{route} {ms}" for route, ms in result["server_side_mean_ms"].items()))
    header = f"{'request':<12} {'when':<13} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} " \
             f"{'p99 ms':>8} {'max ms':>8} {'bytes':>9}"
    print(header)
    print("-" * len(header))
    for when in ("during_burst", "after_burst"):
        part = result[when]
        for kind, s in part["latency"].items():
            print(f"{kind:<12} {when.replace('_', ' '):<13} {s['n']:>5} {s['p50_ms']:>8} "
                  f"{s['p95_ms']:>8} {s['p99_ms']:>8} {s['max_ms']:>8} "
                  f"{part['bytes'].get(kind, 0):>9}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_service.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0 if result["ready"] == result["clones"] else 1


if __name__ == "__main__":
    sys.exit(main())
