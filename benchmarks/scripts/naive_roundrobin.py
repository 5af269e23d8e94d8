"""The naive way to spread clones over several sources: strict round-robin, no
notion of chains, frozen or running. It uses fleet's own async client (so the
only difference from fleet is the placement policy) with a fixed number of
clones in flight, and no retries: a failed clone is counted by its fault.

Prints one JSON object: clones made, failures by fault, wall time, when each
clone finished, and how long the caller waited for each clone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fleet.errors import VSphereError
from fleet.vsphere.client import VSphereClient
from fleet.vsphere.model import CloneRequest


async def run(args: argparse.Namespace) -> dict[str, object]:
    faults: Counter[str] = Counter()
    chain_faults = 0
    done: list[float] = []
    waits: list[float] = []  # handed to vCenter -> finished, as the caller waits
    names = args.sources.split(",")
    async with VSphereClient(args.url, args.user, os.environ[args.password_env],
                             thumbprint=args.thumbprint) as vs:
        sources = {vm.name: vm for vm in await vs.find_vms(names)}
        order = [sources[n].ref for n in names]
        folder = await vs.ensure_folder(args.folder)
        limiter = anyio.CapacityLimiter(args.in_flight)
        t0 = time.perf_counter()

        async def clone(i: int) -> None:
            async with limiter:
                request = CloneRequest(source=order[i % len(order)], name=f"rr-{i:05d}",
                                       folder=folder)
                started = time.perf_counter()
                try:
                    task = await vs.start_instant_clone(request)
                    await task.wait()
                except VSphereError as exc:
                    nonlocal chain_faults
                    faults[getattr(exc, "fault", None) or type(exc).__name__] += 1
                    chain_faults += "chain" in str(exc)
                    return
                now = time.perf_counter()
                done.append(now - t0)
                waits.append(now - started)

        async with anyio.create_task_group() as tg:
            for i in range(args.count):
                tg.start_soon(clone, i)
        wall = time.perf_counter() - t0
    return {"clones": len(done), "failed": sum(faults.values()), "faults": dict(faults),
            "chain_faults": chain_faults,
            "wall_s": wall, "done_s": sorted(done), "clone_wait_s": waits}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password-env", default="SIM_PASSWORD")
    parser.add_argument("--thumbprint", required=True)
    parser.add_argument("--sources", required=True, help="comma-separated VM names")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--folder", default="naive")
    args = parser.parse_args()
    print(json.dumps(anyio.run(run, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
