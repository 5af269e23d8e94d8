"""``python -m benchmarks --quick``: the whole benchmark command on tiny sizes.

Figures from a quick run mean nothing (the machine is shared and the sizes tiny);
this checks that every scenario runs against real simulator and fleet processes
and that the report, its JSON and its plots are written and agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import Timeline, rate_series

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_json_report_and_plots(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out",
                             str(tmp_path), "--name", "smoke"], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert set(data) == {"burst", "tools", "chains", "scale", "adaptive", "meta"}
    assert data["meta"]["quick"] is True
    # every clone asked for was made, by fleet and by the baselines
    assert data["burst"]["fleet"]["ready"] == data["meta"]["sizes"]["burst"]
    assert data["tools"]["pool"]["clones"] == data["meta"]["sizes"]["pool"]
    assert data["chains"]["fleet"]["ready"] == data["meta"]["sizes"]["chain"]
    assert data["scale"]["workflow"]["ready"] == data["meta"]["sizes"]["scale_workflow"]
    assert data["scale"]["workflow"]["network_conflicts"] == 0
    assert data["chains"]["fleet"]["chain_faults"] == 0
    # the runs were measured: CPU and memory come from the kernel
    assert data["scale"]["clone_only"]["cpu_s"] > 0
    assert data["scale"]["clone_only"]["max_rss_mb"] > 20
    assert len(data["scale"]["clone_only"]["tenth_rates"]) == 10
    report = (tmp_path / "smoke.md").read_text()
    for plot in ("throughput", "in_flight", "chains", "scale", "latency", "adaptive"):
        png = tmp_path / "smoke" / f"{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(smoke/{plot}.png)" in report
    for row in ("fraction of slot capacity", "pyVmomi thread pool", "chain faults",
                "peak RSS", "client CPU per clone", "last tenth", "auto vs true"):
        assert row in report


def test_timeline_reads_an_event_log(tmp_path: Path) -> None:
    events = [
        {"event": "job_started", "elapsed_s": 1.0, "index": 0, "host": "h1"},
        {"event": "job_started", "elapsed_s": 1.5, "index": 1, "host": "h2"},
        {"event": "phase_done", "elapsed_s": 2.0, "index": 0, "phase": "clone",
         "duration_s": 1.0},
        {"event": "job_retried", "elapsed_s": 2.5, "index": 1, "phase": "clone",
         "reason": "transient"},
        {"event": "job_started", "elapsed_s": 3.0, "index": 1, "host": "h1"},
        {"event": "phase_done", "elapsed_s": 4.0, "index": 1, "phase": "clone",
         "duration_s": 1.0},
        {"event": "limit_changed", "elapsed_s": 4.0, "limiter": "overall", "new": 9},
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    t = Timeline.read(path)
    assert t.first_start == 1.0 and t.clone_done == [2.0, 4.0]
    assert t.clone_phase_s() == 3.0
    assert t.retries == 1 and t.reasons == {"transient": 1}
    samples, h1 = t.in_flight("h1", 1.0, 4.0)
    assert samples == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and h1 == [0, 1, 0, 1, 0, 0]
    assert t.in_flight("h2", 1.0, 4.0)[1] == [0, 0, 1, 0, 0, 0]
    assert t.limits == [(4.0, "overall", 9)]
    x, y = rate_series([0.1, 0.2, 1.1], 1.0)
    assert x == [0.5, 1.5] and y == [2.0, 1.0]


def test_render_only_names_a_missing_run(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--render-only", "--out",
                             str(tmp_path), "--name", "nosuch"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert f"--render-only: cannot read {tmp_path / 'nosuch.json'}" in result.stderr
    assert "Traceback" not in result.stderr
