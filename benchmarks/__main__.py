"""``python -m benchmarks``: every scenario of the benchmark report in one run.

1. burst efficiency against the host slots; 2. against a sequential pyVmomi script
and a pyVmomi thread pool; 3. chain depth against naive round-robin; 4. scale
(10,000 clones on 64 hosts); 5. adaptive limits against the true ones; 6. reconcile
at scale (create, no-op rerun, status, scale-down and an idle ``fleet serve`` of
10,000 members), this commit against today's way; 7. warm pools (lease waits and
refills of a ``fleet serve`` pool under an open-loop load of lease requests).

Writes ``<out>/<date>.json`` (every figure), ``<out>/<date>.md`` (the report) and
its plots under ``<out>/<date>/``. ``--quick`` shrinks every scenario (a smoke
run for the tests, its figures mean nothing); ``--only`` picks scenarios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import report, scenarios
from benchmarks.harness import ROOT, BenchmarkError

SCENARIOS = ("burst", "tools", "chains", "scale", "adaptive", "reconcile", "pools")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _public(value: Any) -> Any:
    """Drop the in-memory extras (keys starting with ``_``) before writing JSON."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [_public(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where the JSON, the report and the plots go")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, metavar="SCENARIO",
                        help=f"run only these ({', '.join(SCENARIOS)}); tools needs burst")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and fast time scales: checks the machinery only")
    parser.add_argument("--name", help="file stem (default: today's date)")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: rewrite <out>/<name>.md from <name>.json and the "
                             "plots already there")
    args = parser.parse_args(argv)
    stem = args.name or dt.date.today().isoformat()
    if args.render_only:
        source = args.out / f"{stem}.json"
        try:
            public = json.loads(source.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--render-only: cannot read {source}: {exc}")
        public["meta"]["rendered_at"] = _commit()
        path = report.write(public, None, args.out, stem, plot=False)
        print(f"wrote {path}", file=sys.stderr)
        return 0
    chosen = set(args.only or SCENARIOS)
    if "tools" in chosen:
        chosen.add("burst")
    sizes = scenarios.Sizes.quick() if args.quick else scenarios.Sizes()
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    phase_values: dict[str, list[float]] | None = None
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        work = Path(tmp)
        for name in SCENARIOS:
            if name not in chosen:
                continue
            print(f"[{time.perf_counter() - t0:6.1f}s] {name} ...", file=sys.stderr, flush=True)
            try:
                if name == "tools":
                    if "error" in results["burst"]:
                        raise BenchmarkError("needs the burst scenario, which failed")
                    results[name] = scenarios.tools(sizes, work, results["burst"])
                else:
                    results[name] = getattr(scenarios, name)(sizes, work)
            except BenchmarkError as exc:
                # The other scenarios still run; the report says what failed and why.
                print(f"{name} failed: {exc}", file=sys.stderr, flush=True)
                results[name] = {"error": str(exc)[:2000]}
                continue
            if name == "scale":
                phase_values = results[name]["workflow"]["_phase_values"]
    results["meta"] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(), "cpus": os.cpu_count(), "machine": platform.machine(),
        "python": platform.python_version(), "quick": args.quick,
        "sizes": sizes.to_dict(), "elapsed_s": time.perf_counter() - t0}
    public = _public(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(public, indent=1))
    path = report.write(public, phase_values, args.out, stem)
    print(path.read_text())
    print(f"wrote {path} and {args.out / f'{stem}.json'} in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    failed = [name for name, r in results.items() if "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
