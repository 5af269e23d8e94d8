"""Edge benchmark: ``/healthz`` (and ``/v1``) latency while unauthenticated clients attack.

A ``fleet serve`` process with its default ``[api]`` settings (512 connections
at most, 15 s to send request headers) is probed by a monitor, as a load
balancer or Kubernetes would probe it: a fresh connection per ``GET
/healthz``, one every 20 ms, plus an authenticated ``GET /v1/fleets`` every
tenth probe. Three phases, each timed the same way:

- ``quiet``: nobody else;
- ``slowloris``: an attacker process keeps ``--connections`` (1,000)
  connections open, each with half a request (``GET /healthz HTTP/1.1\\r\\nHost:
  x\\r\\n``) and nothing more, reconnecting whenever the service closes one;
- ``flood``: an attacker process sends as many tiny requests as it can
  (``GET /healthz``, 32 pipelined at a time) over ``--flood-connections`` (16)
  keep-alive connections, reading every answer.

The attackers run in their own processes, so the monitor's figures are the
service's, not the GIL's. Reported: probe latency p50/p95/p99/max, failed
probes, what each attacker achieved (connections opened and closed by the
service, requests answered per second) and the service's peak open fds.

Run: ``python benchmarks/bench_edge.py [--connections 1000] [--seconds 30]``.
Prints a table and writes ``benchmarks/results/bench_edge.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_service import stats_ms  # noqa: E402
from tests.api.serveproc import ServeProcess, service_config  # noqa: E402
from tests.simproc import SimProcess  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HALF_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
TINY_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
PIPELINE = 32
PROBE_PAUSE_S = 0.02


# -- the attackers (run as ``bench_edge.py --attacker KIND``, in a process of their own) --

async def _slowloris(port: int, connections: int, seconds: float) -> dict[str, int]:
    stats = {"opened": 0, "closed_by_service": 0, "connect_failed": 0}

    async def hold() -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                stats["connect_failed"] += 1
                await asyncio.sleep(0.05)
                continue
            stats["opened"] += 1
            try:
                writer.write(HALF_REQUEST)
                await reader.read()  # until the service closes it
            except OSError:
                pass
            stats["closed_by_service"] += 1
            writer.close()

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await asyncio.gather(*(hold() for _ in range(connections)))
    return stats


async def _flood(port: int, connections: int, seconds: float) -> dict[str, int]:
    stats = {"answered": 0, "errors": 0}

    async def hammer() -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                while True:
                    writer.write(TINY_REQUEST * PIPELINE)
                    for _ in range(PIPELINE):
                        head = await reader.readuntil(b"\r\n\r\n")
                        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                                      if line.lower().startswith(b"content-length:"))
                        await reader.readexactly(length)
                        stats["answered"] += 1
            except (OSError, asyncio.IncompleteReadError):
                stats["errors"] += 1
                await asyncio.sleep(0.01)

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await asyncio.gather(*(hammer() for _ in range(connections)))
    return stats


def attacker_main(kind: str, port: int, connections: int, seconds: float) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < connections + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, connections + 1024), hard))
    attack = _slowloris if kind == "slowloris" else _flood
    print(json.dumps(asyncio.run(attack(port, connections, seconds))), flush=True)


def start_attacker(kind: str, port: int, connections: int, seconds: float
                   ) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--attacker", kind, "--port", str(port),
                             "--connections", str(connections), "--seconds", str(seconds)],
                            stdout=subprocess.PIPE, text=True)


# -- the monitor --------------------------------------------------------------------------

def probe(service: ServeProcess, seconds: float) -> dict[str, Any]:
    """A fresh connection per request, as a health checker makes them."""
    healthz: list[float] = []
    v1: list[float] = []
    failed: list[str] = []
    auth = {"Authorization": f"Bearer {service.token}"}
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        path, headers, into = ("/v1/fleets", auth, v1) if n % 10 == 9 else \
            ("/healthz", {}, healthz)
        n += 1
        t0 = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            finally:
                conn.close()
        except OSError as exc:
            failed.append(f"{path}: {exc}")
            continue
        if status != 200:
            failed.append(f"{path}: HTTP {status}")
            continue
        into.append(time.perf_counter() - t0)
        time.sleep(PROBE_PAUSE_S)
    return {"healthz": stats_ms(healthz), "v1_fleets": stats_ms(v1),
            "failed": len(failed), "failures": failed[:5]}


class FdWatch(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, len(os.listdir(f"/proc/{self.pid}/fd")))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase(service: ServeProcess, kind: str | None, connections: int, seconds: float
          ) -> dict[str, Any]:
    lines_before = len(service.stderr_lines)
    cpu0, t0 = cpu_s(service.proc.pid), time.monotonic()
    watch = FdWatch(service.proc.pid)
    watch.start()
    attacker = None
    if kind is not None:
        attacker = start_attacker(kind, service.port, connections, seconds + 3)
        time.sleep(3)  # let the attack build up before measuring
    result = probe(service, seconds)
    if attacker is not None:
        out, _ = attacker.communicate(timeout=120)
        result["attacker"] = json.loads(out.strip().splitlines()[-1])
    watch.done.set()
    watch.join()
    result["service_peak_fds"] = watch.peak
    result["service_cpu_share"] = round((cpu_s(service.proc.pid) - cpu0)
                                        / (time.monotonic() - t0), 3)
    result["service_log_lines"] = len(service.stderr_lines) - lines_before
    return result


def run(connections: int, flood_connections: int, seconds: float, api: dict[str, Any]
        ) -> dict[str, Any]:
    with SimProcess(time_scale=0.05) as sim, \
            tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        config = service_config(sim, Path(tmp) / "state", scan_interval_s=30.0)
        config["api"] = {k: v for k, v in config["api"].items() if k == "token_env"}
        config["api"].update(api)
        with ServeProcess(config) as service:
            status, _ = service.call("POST", "/v1/fleets", {"name": "edge", "count": 20})
            assert status == 202
            service.wait_for("edge", timeout_s=120)
            phases = {
                "quiet": phase(service, None, 0, seconds),
                "slowloris": phase(service, "slowloris", connections, seconds),
                "flood": phase(service, "flood", flood_connections, seconds),
            }
            startup = [line.strip() for line in service.stderr_lines
                       if "API connections" in line]
    phases["flood"]["attacker"]["answered_per_s"] = round(
        phases["flood"]["attacker"]["answered"] / (seconds + 3), 1)
    return {"connections": connections, "flood_connections": flood_connections,
            "seconds": seconds, "probe_pause_s": PROBE_PAUSE_S, "api": api,
            "budget": startup[:1],
            "phases": phases,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000,
                        help="half-open connections the slowloris attacker holds")
    parser.add_argument("--flood-connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0, help="per phase")
    parser.add_argument("--max-connections", type=int,
                        help="the service's api.max_connections (default: its default)")
    parser.add_argument("--attacker", choices=["slowloris", "flood"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attacker:
        attacker_main(args.attacker, args.port, args.connections, args.seconds)
        return 0
    api = {} if args.max_connections is None else {"max_connections": args.max_connections}
    result = run(args.connections, args.flood_connections, args.seconds, api)
    budget = result["budget"][0].split(": ", 1)[-1] if result["budget"] else "?"
    print(f"fleet serve under attack ({budget})")
    header = (f"{'phase':<10} {'probe':<10} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} "
              f"{'p99 ms':>8} {'max ms':>8} {'failed':>6}")
    print(header)
    print("-" * len(header))
    for name, part in result["phases"].items():
        for probe_name in ("healthz", "v1_fleets"):
            s = part[probe_name]
            print(f"{name:<10} {probe_name:<10} {s['n']:>5} {s['p50_ms']:>8} {s['p95_ms']:>8} "
                  f"{s['p99_ms']:>8} {s['max_ms']:>8} {part['failed']:>6}")
    for name, part in result["phases"].items():
        print(f"{name}: attacker {part.get('attacker', '-')}; service: CPU "
              f"{part['service_cpu_share']:.0%} of a core, peak fds "
              f"{part['service_peak_fds']}, log lines {part['service_log_lines']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_edge.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    failed = sum(part["failed"] for part in result["phases"].values())
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
