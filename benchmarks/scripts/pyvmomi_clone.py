"""The script people write today: pyVmomi, one ``InstantClone_Task`` per clone and
``pyVim.task.WaitForTask`` on each, sequentially (``--threads 1``) or from a thread
pool, cycling over the given sources. Stock pyVmomi, nothing of fleet's.

Prints one JSON object: clones made, failures by fault, wall time and when each
clone finished (seconds since the first was started). The caller measures CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import ssl
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password-env", default="SIM_PASSWORD")
    parser.add_argument("--sources", required=True, help="comma-separated inventory paths")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefix", default="script")
    args = parser.parse_args()
    ctx = ssl.create_default_context(cafile=args.cafile)
    si = SmartConnect(host=args.host, port=args.port, user=args.user,
                      pwd=os.environ[args.password_env], sslContext=ctx)
    index = si.content.searchIndex
    sources = [index.FindByInventoryPath(p) for p in args.sources.split(",")]
    if any(s is None for s in sources):
        sys.exit(f"a source was not found: {args.sources}")
    folder = si.content.rootFolder.childEntity[0].vmFolder
    faults: Counter[str] = Counter()
    done: list[float] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def clone(job: tuple[int, vim.VirtualMachine]) -> None:
        i, source = job
        spec = vim.vm.InstantCloneSpec(name=f"{args.prefix}-{i:05d}",
                                       location=vim.vm.RelocateSpec(folder=folder))
        try:
            WaitForTask(source.InstantClone_Task(spec))
        except vmodl.MethodFault as exc:
            with lock:
                faults[type(exc).__name__] += 1
            return
        with lock:
            done.append(time.perf_counter() - t0)

    jobs = list(zip(range(args.count), itertools.cycle(sources), strict=False))
    if args.threads == 1:
        for job in jobs:
            clone(job)
    else:
        with ThreadPoolExecutor(max_workers=args.threads) as pool:
            list(pool.map(clone, jobs))
    wall = time.perf_counter() - t0
    Disconnect(si)
    print(json.dumps({"clones": len(done), "failed": sum(faults.values()),
                      "faults": dict(faults), "wall_s": wall, "done_s": sorted(done)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
