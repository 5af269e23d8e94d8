"""``python -m benchmarks --quick``: the benchmark command on tiny sizes.

Figures from a quick run mean nothing (the machine is shared and the sizes tiny);
this checks that the scenarios run against real simulator and fleet processes
and that the report, its JSON and its plots are written and agree. The pools
scenario runs on its own (a ``fleet serve`` and its load, some 20 s), so the
two runs can share the machine's two cores under ``-n 2``. The reconcile
scenario is left out of both runs: even at quick sizes it starts some twenty
processes and waits up to a re-scan interval (30 s) of today's ``fleet serve``
per side; its report and targets are checked here from figures given to them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench_pools, bench_reconcile, report, scenarios
from benchmarks.harness import BenchmarkError, Timeline, rate_series

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_json_report_and_plots(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out",
                             str(tmp_path), "--name", "smoke", "--only", "burst", "tools",
                             "chains", "scale", "adaptive"], capture_output=True,
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


def test_quick_pools_run_leases_returns_and_reports(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out",
                             str(tmp_path), "--name", "pools", "--only", "pools"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "pools.json").read_text())
    assert set(data) == {"pools", "meta"}
    sizes, pools = data["meta"]["sizes"], data["pools"]
    for segment, count in (("outrun", sizes["pools_leases"]),
                           ("steady", sizes["pools_steady_leases"])):
        figures = pools[segment]
        # every request got a lease, and every lease was returned
        assert figures["granted"] == figures["requests"] == count, figures["refused"]
        assert figures["returns_failed"] == 0
        assert figures["client_wait"]["count"] == count
        # the service counted each lease's wait, as the client did
        assert figures["service_wait"]["count"] == count
        assert figures["cpu"]["service_cpu_s"] > 0
        assert len(figures["series"]["sent"]) == count
    # the pool was sampled in both segments (what it showed depends on the machine)
    assert pools["steady"]["min_idle_sampled"] is not None
    assert len(pools["series"]["t"]) == len(pools["series"]["idle"]) >= 2
    assert pools["slot_capacity_per_s"] > 0
    assert set(pools["targets"]) == {"idle_within_50ms", "waited_p99_vs_refill_p99",
                                     "waited_max_vs_refill_max", "refills_vs_capacity",
                                     "refused"}
    text = (tmp_path / "pools.md").read_text()
    assert (tmp_path / "pools" / "pools.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## 7. Warm pools" in text and "(pools/pools.png)" in text
    for row in ("7 pools: leases with an idle member", "7 pools: refills/s while leases "
                "outrun them", "7 pools: lease requests refused"):
        assert row in text


EXPOSITION = """\
# TYPE fleet_pool_members gauge
fleet_pool_members{pool="bench",state="idle"} 0.0
fleet_pool_members{pool="bench",state="leased"} 7.0
fleet_pool_members{pool="other",state="idle"} 3.0
# TYPE fleet_lease_waiting gauge
fleet_lease_waiting{pool="bench"} 4.0
# TYPE fleet_pool_refill_seconds histogram
fleet_pool_refill_seconds_bucket{le="0.1",pool="bench"} 2.0
fleet_pool_refill_seconds_bucket{le="0.5",pool="bench"} 6.0
fleet_pool_refill_seconds_bucket{le="1.0",pool="bench"} 10.0
fleet_pool_refill_seconds_bucket{le="+Inf",pool="bench"} 10.0
fleet_pool_refill_seconds_count{pool="bench"} 10.0
fleet_pool_refill_seconds_sum{pool="bench"} 4.2
# TYPE fleet_lease_refusals_total counter
fleet_lease_refusals_total{client="a",pool="bench",reason="at_max"} 1.0
fleet_lease_refusals_total{client="b",pool="bench",reason="at_max"} 2.0
# TYPE fleet_clones_in_flight gauge
fleet_clones_in_flight{host="esx-01"} 2.0
fleet_clones_in_flight{host="esx-02"} 3.0
# TYPE fleet_clone_phase_duration_seconds histogram
fleet_clone_phase_duration_seconds_bucket{le="+Inf",phase="clone"} 10.0
fleet_clone_phase_duration_seconds_count{phase="clone"} 10.0
fleet_clone_phase_duration_seconds_sum{phase="clone"} 12.5
fleet_clone_phase_duration_seconds_count{phase="network"} 4.0
fleet_clone_phase_duration_seconds_sum{phase="network"} 99.0
# TYPE fleet_clones_total counter
fleet_clones_total{fleet="bench",outcome="ready"} 9.0
fleet_clones_total{fleet="bench",outcome="failed"} 1.0
fleet_clones_total{fleet="other",outcome="ready"} 5.0
"""


def test_pool_histograms_are_read_as_prometheus_reads_them() -> None:
    sample = bench_pools.parse_metrics(EXPOSITION, 1.5)
    assert sample.members == {"idle": 0, "leased": 7}  # the other pool's are not ours
    assert sample.waiting == 4 and sample.refusals == {"at_max": 3.0}
    # the engine's view: every host's clones, the clone phase only, the pool's clones
    assert sample.in_flight == 5
    assert (sample.clone_phase_sum, sample.clone_phase_count) == (12.5, 10.0)
    assert sample.made == 9.0
    refills = sample.refills
    assert sample.refilled == 10.0
    # histogram_quantile: linear within the bucket that holds the rank
    assert bench_pools.histogram_quantile(0.5, refills) == pytest.approx(0.4)
    assert bench_pools.histogram_quantile(0.99, refills) == pytest.approx(0.9875)
    assert bench_pools.histogram_quantile(0.1, refills) == pytest.approx(0.05)
    assert bench_pools.fraction_within(0.5, refills) == 0.6
    # the buckets holding the p99 and the largest: what the histogram proves
    assert bench_pools.bucket_holding(0.99, refills) == (0.5, 1.0)
    assert bench_pools.bucket_holding(0.5, refills) == (0.1, 0.5)
    assert bench_pools.bucket_holding(0.1, refills) == (0.0, 0.1)
    figures = bench_pools.histogram_figures(refills)
    assert (figures["p99_above_s"], figures["max_above_s"], figures["max_le_s"]) == \
        (0.5, 0.5, 1.0)
    # past the last finite bound: that bound (the quantile), inf (the bound on the max)
    later = {0.1: 2.0, 1.0: 5.0, float("inf"): 10.0}
    assert bench_pools.histogram_quantile(0.9, later) == 1.0
    assert bench_pools.bucket_holding(1.0, later) == (1.0, float("inf"))
    # what happened between two scrapes
    assert bench_pools.bucket_delta({0.1: 5.0, float("inf"): 9.0},
                                    {0.1: 2.0, float("inf"): 3.0}) == {0.1: 3.0,
                                                                       float("inf"): 6.0}
    assert bench_pools.histogram_quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None
    with pytest.raises(BenchmarkError, match=r"0\.05 is not a bucket bound"):
        bench_pools.fraction_within(0.05, refills)
    with pytest.raises(BenchmarkError, match="no fleet_pool_members for pool bench"):
        bench_pools.parse_metrics("# TYPE fleet_lease_waiting gauge\n", 0.0)


def _pool_sample(t: float, idle: int, waiting: int, refilled: float, in_flight: int,
                 phases: tuple[float, float]) -> bench_pools.Sample:
    return bench_pools.Sample(t, {"idle": idle}, waiting, {float("inf"): refilled}, {}, {},
                              in_flight=in_flight, clone_phase_sum=phases[0],
                              clone_phase_count=phases[1], made=refilled)


def test_pool_outrun_window_and_its_targets_follow_the_samples() -> None:
    samples = [_pool_sample(0.0, 5, 0, 0, 2, (0.0, 0.0)),  # idle members left: not in it
               _pool_sample(1.0, 0, 3, 10, 16, (10.0, 8.0)),
               _pool_sample(2.0, 0, 9, 20, 14, (22.0, 18.0)),
               _pool_sample(3.0, 0, 4, 36, 15, (40.0, 32.0)),
               _pool_sample(4.0, 2, 0, 40, 3, (45.0, 36.0))]
    window = bench_pools._window(samples)
    assert window is not None
    assert (window["start_s"], window["end_s"], window["refills"]) == (1.0, 3.0, 26.0)
    assert window["refills_per_s"] == 13.0 and window["peak_waiting"] == 9
    assert window["mean_in_flight"] == 15.0
    assert window["mean_clone_phase_s"] == pytest.approx(30.0 / 24.0)
    assert bench_pools._window(samples[:2] + samples[4:]) is None  # one sample is no span
    wait = {"count": 3, "p50_s": 1.0, "p99_s": 4.0, "max_s": 5.0, "mean_s": 2.0}
    refill = {"count": 30, "p99_s": 5.6, "p99_above_s": 5.0, "max_above_s": 7.5}
    outrun = {"client_wait_waited": wait, "refill": refill, "window": window,
              "refused": {"429 at_max": 1}, "failed": {}}
    steady = {"service_wait": {"fraction_within": 0.995}, "min_idle_sampled": 3,
              "refused": {}, "failed": {"ClientOSError": 1}}
    targets = scenarios._pools_targets({"outrun": outrun, "steady": steady,
                                        "slot_capacity_per_s": 16.0})
    assert {k: t["met"] for k, t in targets.items()} == {
        "idle_within_50ms": True, "waited_p99_vs_refill_p99": True,
        "waited_max_vs_refill_max": True, "refills_vs_capacity": False, "refused": False}
    assert targets["refills_vs_capacity"]["value"] == 13.0 / 16.0
    assert targets["waited_max_vs_refill_max"]["value"] == 5.0 / 7.5
    assert targets["refused"]["value"] == 2  # a refusal and a request never answered
    outrun["window"] = None  # leases never outran refills: nothing shows the rate
    assert scenarios._pools_targets({"outrun": outrun, "steady": steady,
                                     "slot_capacity_per_s": 16.0}
                                    )["refills_vs_capacity"]["value"] == 0.0


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


def _step(wall_s: float, cpu_s: float) -> dict[str, float]:
    return {"wall_s": wall_s, "client_cpu_s": cpu_s, "sim_cpu_s": 1.0,
            "wire_bytes": 2_000_000, "peak_rss_mb": 120.0}


def _reconcile_side(*, rerun_cpu_s: float, reflected_s: float | None) -> dict[str, Any]:
    return {"create": _step(20.0, 10.0), "rerun": _step(4.0, rerun_cpu_s),
            "status": _step(1.5, 1.0), "scale_down": _step(5.0, 2.0),
            "serve_start": _step(3.0, 2.0),
            "serve_idle": {**_step(60.0, 0.6), "client_cpu_percent": 1.0},
            "external_change": {"reflected_s": reflected_s, "bound_s": 90.0,
                                "peak_rss_mb": 310.0 if reflected_s is None else 150.0},
            "shape": {"vm": "vm-42", "guest_id": "ubuntu64Guest", "extra_config_keys": 62,
                      "devices": 14, "keyed_path": 'config.extraConfig["guestinfo.fleet.state"]',
                      "keyed_value": "ready"}}


def _reconcile_results(**extra: Any) -> dict[str, Any]:
    mine = _reconcile_side(rerun_cpu_s=1.5, reflected_s=0.4)
    return {"meta": {"date": "today", "commit": "abc", "cpus": 2, "machine": "x86_64",
                     "python": "3.11", "elapsed_s": 1.0},
            "reconcile": {"members": 10000, "destroyed": 1000, "time_scale": 0.02,
                          "idle_s": 60.0, "baseline_commit": "45978d9", "this_commit": mine,
                          "targets": scenarios._reconcile_targets(mine), **extra}}


def test_reconcile_targets_follow_the_figures() -> None:
    mine = scenarios._reconcile_targets(_reconcile_side(rerun_cpu_s=1.5, reflected_s=0.4))
    assert all(t["met"] for t in mine.values())
    assert mine["rerun_cpu_vs_create"]["value"] == 0.15
    assert mine["rerun_wall_vs_create"]["value"] == 0.2
    theirs = scenarios._reconcile_targets(_reconcile_side(rerun_cpu_s=12.0, reflected_s=None))
    assert {k for k, t in theirs.items() if not t["met"]} == {
        "rerun_cpu_vs_create", "change_reflected_s", "peak_rss_mb"}
    assert theirs["change_reflected_s"]["reflected"] is False
    assert theirs["peak_rss_mb"]["value"] == 310.0  # the service's, the largest of all steps


def test_reconcile_report_puts_both_sides_side_by_side() -> None:
    theirs = _reconcile_side(rerun_cpu_s=12.0, reflected_s=None)
    text = report.markdown(_reconcile_results(
        todays_way=theirs, todays_way_targets=scenarios._reconcile_targets(theirs)), {})
    assert "## 6. Reconcile at scale" in text
    assert "| 2 rerun, no change | this commit | 4.00 | 1.50 | 1.00 | 2.0 | 120 |" in text
    assert "| 2 rerun, no change | today's way (`45978d9`) | 4.00 | 12.00 |" in text
    assert ("| no-op rerun: client CPU / the create's | <= 0.2x | 0.150x | met | 1.200x |"
            in text)
    assert "| 0.40 s | met | not within 90 s |" in text
    # the targets table at the top carries this commit's rows
    assert "| 6 reconcile: status: wall | 1.50 s | <= 2 s | met |" in text


def test_reconcile_report_says_why_the_baseline_was_skipped() -> None:
    text = report.markdown(_reconcile_results(
        baseline_skipped="git archive 45978d9: fatal: not a valid object name"), {})
    assert "Today's way was skipped: git archive 45978d9: fatal" in text
    assert "today's way (`" not in text  # no rows for it
    assert "| 62 | met | — |" in text


def test_reconcile_report_keeps_the_steps_a_failed_baseline_ran() -> None:
    theirs = _reconcile_side(rerun_cpu_s=12.0, reflected_s=None)
    for step in ("serve_start", "serve_idle", "external_change", "shape"):
        del theirs[step]
    theirs["error"] = "today's way, step serve: fleet serve did not start"
    targets = scenarios._reconcile_targets(theirs)
    assert set(targets) == {"rerun_cpu_vs_create", "rerun_wall_vs_create", "status_wall_s",
                            "peak_rss_mb"}
    text = report.markdown(_reconcile_results(todays_way=theirs,
                                              todays_way_targets=targets), {})
    assert "figures stop at the step that failed" in text
    assert "step serve: fleet serve did not start" in text
    assert "| 4 scale-down | today's way (`45978d9`) |" in text
    assert "| 5 serve: idle | today's way" not in text
    assert "| 1.00% | met | — |" in text  # idle CPU: this commit's only


def test_baseline_without_its_commit_is_an_error_naming_it(tmp_path: Path,
                                                           monkeypatch: Any) -> None:
    missing = "0" * 40
    monkeypatch.setattr(bench_reconcile, "BASELINE_COMMIT", missing)
    with pytest.raises(BenchmarkError, match=f"git archive {missing}"):
        bench_reconcile.baseline_side(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-unpacked is left


def test_process_figures_come_from_proc() -> None:
    assert bench_reconcile.cpu_s(os.getpid()) > 0
    assert bench_reconcile.peak_rss_mb(os.getpid()) > 10
    gone = 2**22 + 1  # above the largest pid_max Linux allows
    with pytest.raises(BenchmarkError, match=str(gone)):
        bench_reconcile.cpu_s(gone)
    with pytest.raises(BenchmarkError, match=str(gone)):
        bench_reconcile.peak_rss_mb(gone)
