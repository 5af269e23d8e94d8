"""The baseline of bench_client.py: stock pyVmomi's blocking stub in a pool of threads.

Run as its own process by bench_client.py so that nothing fleet installs in its
own process (``fleet.vmomi``'s cache of pyVmomi property lists) changes the
baseline: this is pyVmomi as users have it. Prints one JSON object.

    python benchmarks/pyvmomi_reads.py HOST PORT CAFILE USER CALLS CONCURRENCY
    (the password comes from $SIM_PASSWORD)
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pyVmomi import SoapStubAdapter, vim, vmodl

PC = vmodl.query.PropertyCollector


def main() -> int:
    host, port_s, cafile, user, calls_s, concurrency_s = sys.argv[1:7]
    calls, concurrency = int(calls_s), int(concurrency_s)
    ctx = ssl.create_default_context(cafile=cafile)
    stub = SoapStubAdapter(host=host, port=int(port_s), version="vim.version.v8_0_3_0",
                           sslContext=ctx, poolSize=concurrency)
    content = vim.ServiceInstance("ServiceInstance", stub).RetrieveContent()
    content.sessionManager.Login(user, os.environ["SIM_PASSWORD"])
    vm = content.searchIndex.FindByInventoryPath("dc1/vm/sources/frozen-01")
    pc = content.propertyCollector
    spec = [PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm, skip=False)],
                          propSet=[PC.PropertySpec(type=vim.VirtualMachine, all=False,
                                                   pathSet=["name"])])]
    options = PC.RetrieveOptions()

    def one(_: int) -> Any:
        result = pc.RetrievePropertiesEx(spec, options)
        assert result.objects[0].propSet[0].val == "frozen-01"

    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(one, range(concurrency * 2)))  # warm-up: threads and connections
            cpu0, t0 = time.process_time(), time.perf_counter()
            list(pool.map(one, range(calls)))
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        content.sessionManager.Logout()
        stub.DropConnections()
    print(json.dumps({"calls": calls, "concurrency": concurrency, "seconds": wall,
                      "requests_per_s": calls / wall, "cpu_s": cpu,
                      "cpu_us_per_call": cpu / calls * 1e6}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
