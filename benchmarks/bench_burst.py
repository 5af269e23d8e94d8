"""Burst benchmark: fleet's clone throughput against what the host slots allow.

On the simulator's default topology (8 hosts x 8 provisioning slots, 8 frozen
sources and a running one) at time scale 1, fleet provisions a 2,000-clone
burst, clone phase only (no guest network workflow, no readiness wait). The
capacity the slots allow is ``slots / mean clone task time``, with the mean
taken from the simulator's own task records of the same run. Target: fleet
reaches at least 0.95 of it. Client CPU per clone is fleet's process CPU time
over the burst divided by the clones.

Beside it, in the same run and on a fresh simulator, the script users write
today: a pyVmomi thread pool cloning from one source with ``WaitForTask`` per
clone (fewer clones, since it is slow). Both report clones/s and CPU per clone.

Run: ``python benchmarks/bench_burst.py [--clones 2000] [--baseline-clones 400]``.
Prints a table and writes ``benchmarks/results/bench_burst.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from fleet.engine.api import provision  # noqa: E402
from fleet.engine.spec import spec_from_dict  # noqa: E402
from fleet.vsphere.client import VSphereClient  # noqa: E402
from tests.simproc import PASSWORD, USER, SimProcess  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SOURCES = [f"frozen-{i:02d}" for i in range(1, 9)] + ["golden-running"]
SLOTS = 8 * 8


def fleet_burst(clones: int, in_flight: int | str) -> dict[str, Any]:
    with SimProcess(time_scale=1.0) as sim:
        spec = spec_from_dict({
            "name": "burst", "count": clones, "sources": SOURCES,
            "vcenter": {"url": sim.url, "user": USER, "password_env": "SIM_PASSWORD",
                        "thumbprint": sim.thumbprint},
            "limits": {"in_flight": in_flight},
            "network": {"disconnect_at_clone": False, "refresh": "none", "reconnect": False},
            "readiness": {"wait_for": "none"},
        }, source="bench", env={"SIM_PASSWORD": PASSWORD})

        window: list[float] = []  # elapsed of the first clone start and each clone end

        def on_event(event: Any) -> None:
            first_start = event.kind == "job_started" and not window
            if first_start or (event.kind == "phase_done" and event.phase == "clone"):
                window.append(event.elapsed_s)

        async def run() -> Any:
            async with VSphereClient(sim.url, USER, PASSWORD, thumbprint=sim.thumbprint) as vs:
                cpu0 = time.process_time()
                wall0 = time.perf_counter()
                summary = await provision(spec, vs, on_event=on_event)
                return summary, time.process_time() - cpu0, time.perf_counter() - wall0

        summary, cpu, wall = anyio.run(run)
        stats = sim.stats()
        mean_clone = stats["clone_task_s"]["mean"]
        capacity = SLOTS / mean_clone
        clone_phase_s = max(window) - window[0]
        rate = summary.ready / clone_phase_s
        return {"clones": clones, "ready": summary.ready, "failed": summary.failed,
                "in_flight_limit": in_flight, "wall_s": wall, "clone_phase_s": clone_phase_s,
                "clones_per_s": rate, "clones_per_s_whole_run": summary.ready / wall,
                "mean_clone_task_s": mean_clone, "slot_capacity_per_s": capacity,
                "fraction_of_capacity": rate / capacity,
                "fraction_of_capacity_whole_run": summary.ready / wall / capacity,
                "final_limits": summary.limits.get("overall"), "client_cpu_s": cpu,
                "client_cpu_ms_per_clone": 1000 * cpu / max(1, summary.ready),
                "sim_clones_total": stats["clones_total"]}


def pyvmomi_baseline(clones: int, threads: int = 64) -> dict[str, Any]:
    from pyVim.connect import Disconnect, SmartConnect
    from pyVim.task import WaitForTask
    from pyVmomi import vim

    with SimProcess(time_scale=1.0) as sim:
        ctx = ssl.create_default_context(cafile=str(sim.cert_path))
        si = SmartConnect(host=sim.host, port=sim.port, user=USER, pwd=PASSWORD, sslContext=ctx)
        source = si.content.searchIndex.FindByInventoryPath("dc1/vm/sources/frozen-01")
        folder = si.content.rootFolder.childEntity[0].vmFolder

        def clone(i: int) -> None:
            spec = vim.vm.InstantCloneSpec(name=f"script-{i:04d}",
                                           location=vim.vm.RelocateSpec(folder=folder))
            WaitForTask(source.InstantClone_Task(spec))

        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(clone, range(clones)))
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        stats = sim.stats()
        Disconnect(si)
        return {"clones": clones, "threads": threads, "wall_s": wall,
                "clones_per_s": clones / wall, "client_cpu_s": cpu,
                "client_cpu_ms_per_clone": 1000 * cpu / clones,
                "mean_clone_task_s": stats["clone_task_s"]["mean"],
                "sim_clones_total": stats["clones_total"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clones", type=int, default=2000)
    parser.add_argument("--baseline-clones", type=int, default=400)
    parser.add_argument("--in-flight", default="auto",
                        help='fleet\'s overall limit: "auto" (default) or a number')
    args = parser.parse_args()
    in_flight: int | str = int(args.in_flight) if args.in_flight.isdigit() else args.in_flight
    print(f"fleet: {args.clones} clones ...", file=sys.stderr, flush=True)
    fleet = fleet_burst(args.clones, in_flight)
    print(f"pyVmomi script: {args.baseline_clones} clones ...", file=sys.stderr, flush=True)
    base = pyvmomi_baseline(args.baseline_clones)
    rows = [
        ("", "fleet", "pyVmomi script"),
        ("clones", str(fleet["clones"]), str(base["clones"])),
        ("clones ready", str(fleet["ready"]), str(base["sim_clones_total"])),
        ("wall time, whole run (s)", f"{fleet['wall_s']:.1f}", f"{base['wall_s']:.1f}"),
        ("clone phase: first start to last clone (s)", f"{fleet['clone_phase_s']:.1f}",
         f"{base['wall_s']:.1f}"),
        ("clones/s over the clone phase", f"{fleet['clones_per_s']:.1f}",
         f"{base['clones_per_s']:.1f}"),
        ("clones/s over the whole run", f"{fleet['clones_per_s_whole_run']:.1f}", ""),
        ("mean clone task (s, simulator)", f"{fleet['mean_clone_task_s']:.3f}",
         f"{base['mean_clone_task_s']:.3f}"),
        ("slot capacity (clones/s)", f"{fleet['slot_capacity_per_s']:.1f}", ""),
        ("fraction of capacity (target >= 0.95)", f"{fleet['fraction_of_capacity']:.3f}", ""),
        ("  same, over the whole run", f"{fleet['fraction_of_capacity_whole_run']:.3f}", ""),
        ("overall limit at the end", str(fleet["final_limits"]), ""),
        ("client CPU per clone (ms)", f"{fleet['client_cpu_ms_per_clone']:.2f}",
         f"{base['client_cpu_ms_per_clone']:.2f}"),
        ("speed-up over the script", f"{fleet['clones_per_s'] / base['clones_per_s']:.1f}x", ""),
    ]
    for label, a, b in rows:
        print(f"{label:<44} {a:>10} {b:>16}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_burst.json").write_text(json.dumps(
        {"fleet": fleet, "pyvmomi_script": base, "cpus": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
