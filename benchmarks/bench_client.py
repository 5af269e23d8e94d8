"""Client benchmark: fleet's asyncio client against pyVmomi's blocking stub in threads.

Both run against one ``fleet sim`` started as its own process (https, trusted by
CA file), one after the other:

1. 200 concurrent small reads (``RetrievePropertiesEx`` of one VM's ``name``):
   - fleet: ``VSphereClient.call`` from 200 asyncio tasks (its aiohttp transport,
     docs/transport.md);
   - pyVmomi: ``SoapStubAdapter`` (its connection pool raised to 200 so it does not
     reconnect per call) shared by a pool of 200 threads, in a process of its own
     that imports nothing of fleet (stock pyVmomi; benchmarks/pyvmomi_reads.py).
   Requests/s, and client CPU per call from ``time.process_time()`` of the client's
   process (the simulator's CPU is its own); rounds are interleaved and medians
   reported.
   Targets: fleet <= 0.6x the CPU per call and >= 1.5x the requests/s of the
   threaded stub.
2. 1,000 instant clones started at once from the 8 frozen sources and awaited
   through the client's single ``WaitForUpdatesEx`` loop: makespan, client CPU,
   and how many ``WaitForUpdatesEx``/``CreateFilter`` calls it took.

Run: ``python benchmarks/bench_client.py`` (about a minute). Prints a table and
writes ``benchmarks/results/bench_client.json``. The machine's cores are shared
with the simulator, which is usually the bottleneck for requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
from pyVmomi import vim, vmodl  # noqa: E402

from fleet.vsphere.client import VSphereClient  # noqa: E402
from fleet.vsphere.model import CloneRequest  # noqa: E402
from tests.simproc import PASSWORD, USER, SimProcess  # noqa: E402

PC = vmodl.query.PropertyCollector
RESULTS = ROOT / "benchmarks" / "results"


def sim_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def name_spec(vm: Any) -> Any:
    return PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm, skip=False)],
                         propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=["name"])])


# -- 1a. fleet ------------------------------------------------------------------------

async def fleet_reads(sim: SimProcess, calls: int, concurrency: int) -> dict[str, Any]:
    async with VSphereClient(sim.url, USER, PASSWORD, ca_file=sim.cert_path) as vs:
        vm = vs.mo((await vs.find_vms(["frozen-01"]))[0].ref)
        pc = vs.content.propertyCollector
        spec = [name_spec(vm)]
        options = PC.RetrieveOptions()

        async def worker(n: int) -> None:
            for _ in range(n):
                result = await vs.call(pc, "RetrievePropertiesEx", spec, options)
                assert result.objects[0].propSet[0].val == "frozen-01"

        async def run(total: int) -> None:
            async with anyio.create_task_group() as tg:
                for i in range(concurrency):
                    tg.start_soon(worker, total // concurrency + (i < total % concurrency))

        await run(concurrency * 2)  # warm-up: open the connections
        sim0 = sim_cpu_s(sim.proc.pid)
        cpu0, t0 = time.process_time(), time.perf_counter()
        await run(calls)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        return {"calls": calls, "concurrency": concurrency, "seconds": wall,
                "requests_per_s": calls / wall, "cpu_s": cpu, "cpu_us_per_call": cpu / calls * 1e6,
                "sim_cpu_s": sim_cpu_s(sim.proc.pid) - sim0}


# -- 1b. pyVmomi's blocking stub in threads -------------------------------------------------

def pyvmomi_reads(sim: SimProcess, calls: int, concurrency: int) -> dict[str, Any]:
    """Stock pyVmomi in its own process (see benchmarks/pyvmomi_reads.py)."""
    sim0 = sim_cpu_s(sim.proc.pid)
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pyvmomi_reads.py"), sim.host,
         str(sim.port), str(sim.cert_path), USER, str(calls), str(concurrency)],
        env=dict(os.environ, SIM_PASSWORD=PASSWORD), capture_output=True, text=True,
        check=True, timeout=600)
    result: dict[str, Any] = json.loads(out.stdout)
    result["sim_cpu_s"] = sim_cpu_s(sim.proc.pid) - sim0
    return result


# -- 2. 1,000 instant clones through one WaitForUpdatesEx loop --------------------------------

async def fleet_clones(sim: SimProcess, n: int) -> dict[str, Any]:
    async with VSphereClient(sim.url, USER, PASSWORD, ca_file=sim.cert_path) as vs:
        sources = await vs.find_vms([f"frozen-{i:02d}" for i in range(1, 9)])
        folder = await vs.ensure_folder(f"bench/clones-{time.monotonic_ns()}")
        before = dict(vs.stats["calls"])
        wait0 = vs.stats["wait_calls"]
        results: list[Any] = []
        max_live = 0
        cpu0, t0 = time.process_time(), time.perf_counter()

        async def one(i: int) -> None:
            nonlocal max_live
            src = sources[i % len(sources)]
            task = await vs.start_instant_clone(CloneRequest(
                source=src.ref, name=f"bench-{i:04d}", folder=folder,
                extra_config={"guestinfo.bench": str(i)}))
            max_live = max(max_live, vs.watcher.live)
            results.append(await task.wait(timeout_s=600))

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        calls = {k: v - before.get(k, 0) for k, v in vs.stats["calls"].items()}
        return {"clones": len(results), "seconds": wall, "cpu_s": cpu,
                "cpu_ms_per_clone": cpu / n * 1e3, "max_tasks_watched_at_once": max_live,
                "wait_for_updates_calls": vs.stats["wait_calls"] - wait0,
                "create_filter_calls": calls.get("CreateFilter", 0),
                "instant_clone_calls": calls.get("InstantClone_Task", 0),
                "total_calls": sum(calls.values())}


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median CPU per call (its requests/s alongside), plus all runs."""
    ordered = sorted(runs, key=lambda r: r["cpu_us_per_call"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["requests_per_s"] = statistics.median(r["requests_per_s"] for r in runs)
    chosen["runs"] = [{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}
                      for r in runs]
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--clones", type=int, default=1000)
    args = parser.parse_args()

    runs: dict[str, list[dict[str, Any]]] = {"fleet": [], "threads": []}
    with SimProcess(time_scale=0.05) as sim:
        # Interleaved rounds, so a noisy neighbour hurts every client alike.
        for _ in range(args.rounds):
            runs["fleet"].append(asyncio.run(fleet_reads(sim, args.calls, args.concurrency)))
            runs["threads"].append(pyvmomi_reads(sim, args.calls, args.concurrency))
        clones = asyncio.run(fleet_clones(sim, args.clones))
    fleet, threaded = (median_run(runs[k]) for k in ("fleet", "threads"))
    rps_ratio = fleet["requests_per_s"] / threaded["requests_per_s"]
    cpu_ratio = fleet["cpu_us_per_call"] / threaded["cpu_us_per_call"]
    print(f"{args.calls} RetrievePropertiesEx calls x {args.rounds} rounds, "
          f"{args.concurrency} in flight, against fleet sim over https "
          f"({os.cpu_count()} cores shared with the sim); medians\n")
    print(table([
        ("client", "requests/s", "client CPU us/call", "vs threads: req/s", "CPU/call"),
        ("fleet (aiohttp)", f"{fleet['requests_per_s']:.0f}",
         f"{fleet['cpu_us_per_call']:.0f}", f"{rps_ratio:.2f}x", f"{cpu_ratio:.2f}x"),
        (f"pyVmomi stub, {args.concurrency} threads", f"{threaded['requests_per_s']:.0f}",
         f"{threaded['cpu_us_per_call']:.0f}", "1.00x", "1.00x"),
    ]))
    cpu_ok, rps_ok = cpu_ratio <= 0.6, rps_ratio >= 1.5
    print(f"\ntargets: CPU/call <= 0.6x: {'met' if cpu_ok else 'MISSED'}; "
          f"requests/s >= 1.5x: {'met' if rps_ok else 'MISSED'}\n")
    print(f"{clones['clones']} instant clones started at once and awaited through one "
          "WaitForUpdatesEx loop\n")
    print(table([
        ("measure", "value"),
        ("makespan s", f"{clones['seconds']:.2f}"),
        ("client CPU ms/clone", f"{clones['cpu_ms_per_clone']:.2f}"),
        ("tasks watched at once (max)", str(clones["max_tasks_watched_at_once"])),
        ("WaitForUpdatesEx calls", str(clones["wait_for_updates_calls"])),
        ("CreateFilter calls", str(clones["create_filter_calls"])),
        ("SOAP calls in all", str(clones["total_calls"])),
    ]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"reads": {"fleet": fleet, "pyvmomi_threads": threaded, "cpu_ratio": cpu_ratio,
                     "requests_ratio": rps_ratio, "cpu_target_met": cpu_ok,
                     "requests_target_met": rps_ok},
           "clones": clones, "cores": os.cpu_count(), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (RESULTS / "bench_client.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'bench_client.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
