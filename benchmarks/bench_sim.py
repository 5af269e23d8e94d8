"""Simulator benchmark: how much vCenter the simulator can play on this machine.

Four measurements, each against a ``fleet sim`` started as its own process:

1. reads/s: small property reads (``RetrievePropertiesEx`` of one VM's name,
   pre-serialized) with 200 in flight from a load generator in a third process.
   Target: at least 1,500 reads/s on a 2-core machine.
2. ``WaitForUpdatesEx`` with 1,000 pending tasks in one filter: the latency of
   the first (1,000 objects enter) call and of the calls that follow as tasks finish.
3. An inventory of 10,000 VMs: start-up time, and a paged ``RetrievePropertiesEx``
   of every VM's name and power state through a ContainerView.
4. 1,000 instant clones from the 8 frozen sources at time scale 1: the makespan
   against what the host slots allow (8 hosts x 8 slots; the sum of the task
   durations divided by 64). Target: within 10% of it.

Run: ``python benchmarks/bench_sim.py`` (about two minutes). Prints a table and
writes ``benchmarks/results/bench_sim.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyVim.task import WaitForTasks  # noqa: E402
from pyVmomi import SoapStubAdapter, vim, vmodl  # noqa: E402

from tests.simproc import PASSWORD, USER, SimProcess  # noqa: E402

PC = vmodl.query.PropertyCollector
RESULTS = ROOT / "benchmarks" / "results"


def connect(sim: SimProcess) -> Any:
    from pyVim.connect import SmartConnect

    ctx = ssl.create_default_context(cafile=str(sim.cert_path))
    return SmartConnect(host=sim.host, port=sim.port, user=USER, pwd=PASSWORD, sslContext=ctx)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# -- 1. reads/s ------------------------------------------------------------------

async def _loadgen(url: str, cookie: str, body: bytes, cafile: str, concurrency: int,
                   seconds: float) -> dict[str, Any]:
    import aiohttp

    ctx = ssl.create_default_context(cafile=cafile)
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ctx)
    headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '"urn:vim25/8.0.3.0"',
               "Cookie": f'vmware_soap_session="{cookie}"'}
    done = 0
    errors = 0
    stop_at = 0.0
    async with aiohttp.ClientSession(connector=connector,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        async def worker() -> None:
            nonlocal done, errors
            while time.monotonic() < stop_at:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        done += 1
                    else:
                        errors += 1

        # warm-up: open the connections
        stop_at = time.monotonic() + 1.0
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        done = errors = 0
        start = time.monotonic()
        stop_at = start + seconds
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - start
    return {"reads": done, "errors": errors, "seconds": elapsed, "reads_per_s": done / elapsed}


def bench_reads(seconds: float = 10.0, concurrency: int = 200) -> dict[str, Any]:
    with SimProcess(time_scale=1.0) as sim:
        si = connect(sim)
        cookie = si._stub.cookie.split('"')[1]
        vm = si.content.searchIndex.FindByInventoryPath("dc1/vm/sources/frozen-01")
        stub = SoapStubAdapter(host=sim.host, port=sim.port, version=si._stub.version)
        spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm)],
                             propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=["name"])])
        body = stub.SerializeRequest(PC("propertyCollector", stub),
                                     PC._GetMethodInfo("RetrievePropertiesEx"),
                                     ([spec], PC.RetrieveOptions()))
        cpu0 = cpu_s(sim.proc.pid)
        out = subprocess.run(
            [sys.executable, __file__, "--loadgen", sim.url, cookie, str(sim.cert_path),
             str(concurrency), str(seconds)], input=body, capture_output=True, check=True)
        result = json.loads(out.stdout)
        result["sim_cpu_s"] = cpu_s(sim.proc.pid) - cpu0
        result["concurrency"] = concurrency
        return result


# -- 2. WaitForUpdatesEx with 1,000 pending tasks ----------------------------------

def bench_wait_for_updates(n: int = 1000) -> dict[str, Any]:
    topology = """
    [latency]
    instant_clone_s = 8.0
    jitter = 0.5
    [[hosts]]
    name = "esx-{index:02d}"
    count = 8
    slots = 200
    [[sources]]
    name = "src-{index:02d}"
    count = 8
    host = "esx-{index:02d}"
    state = "frozen"
    """
    with SimProcess(topology_text=topology, time_scale=1.0) as sim:
        si = connect(sim)
        folder = si.content.rootFolder.childEntity[0].vmFolder
        sources = [si.content.searchIndex.FindByInventoryPath(f"dc1/vm/src-{i:02d}")
                   for i in range(1, 9)]
        tasks = [sources[i % 8].InstantClone_Task(vim.vm.InstantCloneSpec(
            name=f"w-{i}", location=vim.vm.RelocateSpec(folder=folder))) for i in range(n)]
        pc = si.content.propertyCollector.CreatePropertyCollector()
        pc.CreateFilter(PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=t) for t in tasks],
                                      propSet=[PC.PropertySpec(type=vim.Task,
                                                               pathSet=["info.state"])]), True)
        pending = {t._moId for t in tasks}
        version = ""
        calls = []
        first_objects = 0
        while pending:
            start = time.perf_counter()
            update = pc.WaitForUpdatesEx(version, PC.WaitOptions(maxWaitSeconds=60))
            elapsed = time.perf_counter() - start
            if update is None:
                break
            objects = [o for f in update.filterSet for o in f.objectSet]
            if not calls:
                first_objects = len(objects)
            calls.append((elapsed, len(objects)))
            for obj in objects:
                for change in obj.changeSet:
                    if change.val in ("success", "error"):
                        pending.discard(obj.obj._moId)
            version = update.version
        return {
            "tasks": n,
            "pending_at_end": len(pending),
            "wait_calls": len(calls),
            "first_call_s": calls[0][0] if calls else None,
            "first_call_objects": first_objects,
            "median_objects_per_call": sorted(c[1] for c in calls)[len(calls) // 2],
            "sim_rss_mb": rss_mb(sim.proc.pid),
        }


# -- 3. 10,000-VM inventory ----------------------------------------------------------

def bench_inventory(n: int = 10_000) -> dict[str, Any]:
    topology = f"""
    [[hosts]]
    name = "esx-{{index:02d}}"
    count = 16
    [[datastores]]
    name = "ds-{{index:02d}}"
    count = 4
    [[vms]]
    name = "vm-{{index:05d}}"
    count = {n}
    """
    start = time.perf_counter()
    with SimProcess(topology_text=topology, time_scale=1.0) as sim:
        startup = time.perf_counter() - start
        si = connect(sim)
        content = si.content
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine],
                                                       True)
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[
                PC.TraversalSpec(name="v", type=vim.view.ContainerView, path="view")])],
            propSet=[PC.PropertySpec(type=vim.VirtualMachine,
                                     pathSet=["name", "runtime.powerState"])])
        pc = content.propertyCollector
        start = time.perf_counter()
        result = pc.RetrievePropertiesEx([spec], PC.RetrieveOptions(maxObjects=1000))
        count = len(result.objects)
        pages = 1
        while result.token:
            result = pc.ContinueRetrievePropertiesEx(result.token)
            count += len(result.objects)
            pages += 1
        retrieve = time.perf_counter() - start
        return {"vms": count, "startup_s": startup, "retrieve_all_s": retrieve, "pages": pages,
                "sim_rss_mb": rss_mb(sim.proc.pid)}


# -- 4. 1,000 instant clones at time scale 1 ------------------------------------------

def bench_clone_burst(n: int = 1000) -> dict[str, Any]:
    with SimProcess(time_scale=1.0) as sim:
        si = connect(sim)
        folder = si.content.rootFolder.childEntity[0].vmFolder
        sources = [si.content.searchIndex.FindByInventoryPath(f"dc1/vm/sources/frozen-{i:02d}")
                   for i in range(1, 9)]
        submitted = time.perf_counter()
        tasks = [sources[i % 8].InstantClone_Task(vim.vm.InstantCloneSpec(
            name=f"b-{i:04d}", location=vim.vm.RelocateSpec(folder=folder))) for i in range(n)]
        submit_s = time.perf_counter() - submitted
        WaitForTasks(tasks)
        wall = time.perf_counter() - submitted
        pc = si.content.propertyCollector
        spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=t) for t in tasks],
                             propSet=[PC.PropertySpec(type=vim.Task, pathSet=["info"])])
        infos = [o.propSet[0].val for o in pc.RetrieveContents([spec])]
        assert all(i.state == "success" for i in infos), "a clone failed"
        first_start = min(i.startTime for i in infos)
        last_end = max(i.completeTime for i in infos)
        makespan = (last_end - first_start).total_seconds()
        busy = sum((i.completeTime - i.startTime).total_seconds() for i in infos)
        slots = 8 * 8
        ideal = busy / slots
        return {"clones": n, "submit_s": submit_s, "wall_s": wall, "makespan_s": makespan,
                "mean_clone_s": busy / n, "slot_bound_s": ideal,
                "makespan_over_bound": makespan / ideal,
                "stats_clones_total": sim.stats()["clones_total"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loadgen", nargs=5, metavar=("URL", "COOKIE", "CAFILE", "N", "S"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["reads", "wait", "inventory", "burst"])
    args = parser.parse_args()
    if args.loadgen:
        url, cookie, cafile, n, seconds = args.loadgen
        body = sys.stdin.buffer.read()
        result = asyncio.run(_loadgen(url, cookie, body, cafile, int(n), float(seconds)))
        print(json.dumps(result))
        return 0
    results: dict[str, Any] = {"cpus": os.cpu_count()}
    steps = {"reads": bench_reads, "wait": bench_wait_for_updates,
             "inventory": bench_inventory, "burst": bench_clone_burst}
    for name, fn in steps.items():
        if args.only and args.only != name:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = fn()
    rows = []
    if "reads" in results:
        r = results["reads"]
        rows.append(("property reads/s, 200 in flight", f"{r['reads_per_s']:.0f}",
                     ">= 1500", "ok" if r["reads_per_s"] >= 1500 else "MISS"))
    if "wait" in results:
        w = results["wait"]
        rows.append(("WaitForUpdatesEx, 1,000 tasks: first call", f"{w['first_call_s']:.3f} s",
                     f"{w['first_call_objects']} objects", ""))
        rows.append(("WaitForUpdatesEx calls until all done", str(w["wait_calls"]),
                     f"pending left {w['pending_at_end']}", ""))
    if "inventory" in results:
        i = results["inventory"]
        rows.append(("10,000-VM inventory: start-up", f"{i['startup_s']:.1f} s",
                     f"RSS {i['sim_rss_mb']:.0f} MB", ""))
        rows.append(("10,000-VM inventory: retrieve all (paged)", f"{i['retrieve_all_s']:.2f} s",
                     f"{i['vms']} VMs, {i['pages']} pages", ""))
    if "burst" in results:
        b = results["burst"]
        rows.append(("1,000 clones, 8 frozen sources: makespan", f"{b['makespan_s']:.2f} s",
                     f"slot bound {b['slot_bound_s']:.2f} s", ""))
        rows.append(("  makespan / slot bound", f"{b['makespan_over_bound']:.3f}", "<= 1.10",
                     "ok" if b["makespan_over_bound"] <= 1.10 else "MISS"))
    width = max(len(r[0]) for r in rows)
    for row in rows:
        print(f"{row[0]:<{width}}  {row[1]:>12}  {row[2]:<24} {row[3]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_sim.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
