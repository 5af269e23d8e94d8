"""The ``fleet`` command as users run it: a real process, the built-in or a given simulator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import specs
from tests.cli_json import assert_documented
from tests.simproc import SimProcess
from tests.specs import ENV

SOURCES = ["frozen-01", "frozen-02", "frozen-03", "golden-running"]


def fleet(*args: str, env: dict[str, str] | None = None, timeout: float = 180,
          cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleet", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})),
                          cwd=cwd)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(time_scale=0.05) as proc:
        yield proc


def write_spec(path: Path, sim: SimProcess, name: str, count: int, **extra: Any) -> Path:
    return specs.write_spec(path, sim, name, count, sources=SOURCES, **extra)


def test_python_m_fleet_leaves_its_heap_out_of_the_last_collection() -> None:
    """Exiting, the interpreter collects every object once more: for a ``fleet``
    process (pyVmomi's type tables, a simulator's inventory) that took longer than a
    short command, and every test that starts or stops ``fleet sim`` paid it. The
    heap is frozen once the command has returned (here: a spec that is not there,
    rc 2), so the last collection skips it."""
    code = ("import gc, runpy, sys\n"
            "sys.argv = ['fleet', 'plan', '--spec', sys.argv[1]]\n"
            "try:\n"
            "    runpy.run_module('fleet', run_name='__main__')\n"
            "except SystemExit as exc:\n"
            "    print(exc.code, gc.get_freeze_count())\n")
    out = subprocess.run([sys.executable, "-c", code, "/nonexistent/fleet.toml"],
                         capture_output=True, text=True, timeout=60, check=False)
    rc, frozen = out.stdout.split()
    assert rc == "2", out.stderr
    assert int(frozen) > 10_000, out.stdout
    # The ``fleet`` command users run goes the same way.
    from importlib.metadata import entry_points
    (script,) = entry_points(group="console_scripts", name="fleet")
    assert script.value == "fleet.cli:entry"


def test_main_command_uses_the_builtin_simulator_from_any_directory(tmp_path: Path) -> None:
    result = fleet("provision", "--count", "12", "--json", "--sim-time-scale", "0.1",
                   cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "built-in simulator" in result.stderr
    summary = json.loads(result.stdout)
    for key in ("requested", "ready", "failed", "duration_s", "clones_per_s", "phases",
                "sources"):
        assert key in summary
    assert summary["requested"] == summary["ready"] == 12
    assert summary["failed"] == 0
    assert set(summary["phases"]) >= {"queue", "clone", "network", "reconnect", "ready"}
    assert summary["phases"]["clone"]["count"] == 12
    assert summary["target"] == "simulator"
    assert_documented(summary, "`fleet provision --json`")


def test_events_file_holds_every_event_as_json_lines(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    result = fleet("provision", "--count", "6", "--json", "--sim-time-scale", "0.1",
                   "--events", str(events), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = [line["event"] for line in lines]
    assert kinds[0] == "source_state" and kinds[-1] == "run_finished"
    assert kinds.count("job_started") == kinds.count("job_ready") == 6
    assert [e["elapsed_s"] for e in lines] == sorted(e["elapsed_s"] for e in lines)
    clone_done = [e for e in lines if e["event"] == "phase_done" and e["phase"] == "clone"]
    assert sorted(e["index"] for e in clone_done) == list(range(6))
    assert all(e["duration_s"] > 0 for e in clone_done)


def test_plain_progress_and_summary_when_not_a_terminal(tmp_path: Path) -> None:
    result = fleet("provision", "--count", "5", "--sim-time-scale", "0.1", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "5/5 ready" in result.stdout
    assert "phases" in result.stdout and "sources" in result.stdout
    assert "clones/s" in result.stderr  # plain progress lines go to stderr


def test_provision_status_plan_destroy_against_a_vcenter(sim: SimProcess, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "fleet.toml", sim, "cli", 20)
    made = fleet("provision", "--spec", str(spec), "--json", env=ENV)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["ready"] == 20
    assert_documented(json.loads(made.stdout), "`fleet provision --json`")
    assert "built-in simulator" not in made.stderr
    status = fleet("status", "--spec", str(spec), "--json", env=ENV)
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert st["ready"] == 20 and st["missing"] == [] and st["complete"] is True
    assert_documented(st, "`fleet status --json`")
    plan = fleet("plan", "--spec", str(spec), "--count", "30", "--json", env=ENV)
    assert plan.returncode == 0, plan.stderr
    p = json.loads(plan.stdout)
    assert p["create"] == 10 and p["feasible"] is True
    assert_documented(p, "`fleet plan --json`")
    assert sim.stats()["vms"] == 9 + 20  # the plan changed nothing
    shown = fleet("plan", "--spec", str(spec), env=ENV)
    assert "placement" in shown.stdout and "frozen-01" in shown.stdout
    refused = fleet("destroy", "--spec", str(spec), env=ENV)  # stdin is not a terminal
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    gone = fleet("destroy", "--spec", str(spec), "--yes", "--json", env=ENV)
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["removed"] == 20
    assert_documented(json.loads(gone.stdout), "`fleet destroy --json`")
    assert sim.stats()["vms"] == 9


def test_sources_list_freeze_and_prepare(tmp_path: Path) -> None:
    with SimProcess(time_scale=0.02) as sim:
        spec = write_spec(tmp_path / "fleet.toml", sim, "src", 1)
        listed = fleet("sources", "list", "--spec", str(spec), "--json", env=ENV)
        assert listed.returncode == 0, listed.stderr
        out = json.loads(listed.stdout)
        assert_documented(out, "`fleet sources list|freeze|prepare --json`")
        assert out["fleet"] == "src"
        rows = {r["name"]: r for r in out["sources"]}
        assert rows["frozen-01"]["frozen"] is True and rows["frozen-01"]["clones_left"] is None
        assert rows["golden-running"]["frozen"] is False
        assert rows["golden-running"]["clones_left"] == 199  # depth 1, budget 200
        frozen = fleet("sources", "freeze", "--spec", str(spec), "golden-running", "--json",
                       env=ENV)
        assert frozen.returncode == 0, frozen.stderr
        out = json.loads(frozen.stdout)
        assert_documented(out, "`fleet sources list|freeze|prepare --json`")
        assert [(s["name"], s["frozen"]) for s in out["sources"]] == [("golden-running", True)]
        assert sim.stats()["sources"]["golden-running"]["frozen"] is True
        prepared = fleet("sources", "prepare", "--spec", str(spec), "--per-host", "--golden",
                         "frozen-01", "--json", env=ENV)
        assert prepared.returncode == 0, prepared.stderr
        # esx-04..08 had no source of this spec; each gets a frozen one
        made = json.loads(prepared.stdout)
        assert_documented(made, "`fleet sources list|freeze|prepare --json`")
        hosts = {r["host"] for r in made["sources"] if r["frozen"]}
        assert {"esx-04", "esx-05", "esx-06", "esx-07", "esx-08"} <= hosts


@pytest.mark.parametrize(("args", "expected"), [
    (["provision", "--count", "-1"], "--count: -1 is negative"),
    (["provision", "--spec", "/no/such/spec.toml"], "cannot read the spec"),
    (["provision", "--count", "3", "--metrics-port", "99999"], "--metrics-port"),
    (["provision", "--count", "3", "--metrics-port", "70000"],
     "argument --metrics-port: 70000 is not a TCP port (1..65535)"),
    (["provision", "--count", "3", "--metrics-listen", "127.0.0.1:0"],
     "argument --metrics-listen: port 0 is out of range 1..65535"),
    (["provision", "--count", "3", "--metrics-listen", "metrics.example:9100"],
     "argument --metrics-listen: 'metrics.example' is not an IP address"),
    (["provision", "--count", "3", "--metrics-port", "9100", "--metrics-listen",
      "127.0.0.1:9100"], "argument --metrics-listen: not allowed with argument --metrics-port"),
    (["provision", "--count", "3", "--pushgateway", "ftp://u:Pw-0f-Mine@127.0.0.1:9091"],
     "argument --pushgateway: 'ftp://***@127.0.0.1:9091' is not an http(s) URL"),
    (["provision", "--count", "3", "--pushgateway", "http://u:Pw-0f-Mine@127.0.0.1:99999"],
     "argument --pushgateway: 'http://***@127.0.0.1:99999' is not an http(s) URL: its port"),
    (["provision", "--count", "3", "--sim-time-scale", "0"], "--sim-time-scale"),
    (["destroy", "--spec", "/no/such/spec.toml", "--yes"], "cannot read the spec"),
    (["provision", "--count", "3", "--events", "/no/such/dir/events.jsonl"],
     "--events: cannot write the event log '/no/such/dir/events.jsonl'"),
])
def test_bad_options_are_clear_errors(args: list[str], expected: str) -> None:
    result = fleet(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in result.stderr
    # Refused before anything started (the built-in simulator announces itself).
    assert "built-in simulator" not in result.stderr
    assert "Pw-0f-Mine" not in result.stderr + result.stdout


def test_a_bad_spec_names_file_key_and_value(sim: SimProcess, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "bad.toml", sim, "bad", 5, chain_budget=300)
    result = fleet("provision", "--spec", str(spec), env=ENV)
    assert result.returncode == 2
    assert "bad.toml" in result.stderr and "chain_budget" in result.stderr
    assert "300" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_source_fails_before_any_clone(sim: SimProcess, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "fleet.toml", sim, "ghost", 5)
    spec.write_text(spec.read_text().replace('"frozen-03"', '"no-such-vm"'))
    before = sim.stats()["clones_total"]
    result = fleet("provision", "--spec", str(spec), env=ENV)
    assert result.returncode == 2, result.stderr
    assert "no-such-vm" in result.stderr
    assert sim.stats()["clones_total"] == before


def test_metrics_port_serves_prometheus_text(tmp_path: Path) -> None:
    import socket
    import threading
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scraped: list[str] = []

    def scrape() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not scraped:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    text = r.read().decode()
                    if "fleet_clones_total" in text:
                        scraped.append(text)
            except OSError:
                time.sleep(0.05)

    thread = threading.Thread(target=scrape)
    thread.start()
    result = fleet("provision", "--count", "40", "--json", "--metrics-port", str(port),
                   "--sim-time-scale", "0.5", cwd=str(tmp_path))
    thread.join(70)
    assert result.returncode == 0, result.stderr
    assert scraped, "no scrape during the run"
    text = scraped[0]
    assert "fleet_vsphere_request_duration_seconds_bucket" in text
    assert 'fleet_clone_phase_duration_seconds_bucket{le="0.05",phase="clone"}' in text


def _summary(result: Any) -> dict[str, Any]:
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_an_event_log_that_cannot_be_written_loses_no_summary(tmp_path: Path) -> None:
    """All members were made, then closing the log failed: exit 1 with a traceback and
    no ``--json`` summary. Now the summary prints, stderr says what was lost, and the
    exit status is 1 (the log that was asked for is not there)."""
    run = fleet("provision", "--count", "4", "--json", "--sim-time-scale", "0.05",
                "--events", "/dev/full", timeout=120)
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["ready"] == summary["requested"] == 4 and summary["failed"] == 0
    assert "error: the event log '/dev/full' could not be written (No space left on device)" \
        in run.stderr
    assert "it holds at most 0 of " in run.stderr
    assert run.returncode == 1


def sigterm_provision(sim: SimProcess, spec: Path, *args: str, bound_s: float,
                      when: Callable[[dict[str, int]], bool]) -> tuple[int, str, str]:
    """Run ``fleet provision --spec SPEC --json ARGS``; once ``when`` holds of the
    simulator's calls by method (within 120 s, the run still going), send SIGTERM, and
    give the run ``bound_s`` to exit (TimeoutExpired fails the test). Returns the exit
    status, stdout and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "fleet", "provision", "--spec", str(spec),
                             "--json", *args], env=dict(os.environ, **ENV),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and \
                not when(sim.stats()["calls_by_method"]):
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=bound_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def test_sigterm_never_lingers_past_grace_and_cleanup(tmp_path: Path) -> None:
    """Issue 11, item 9: with hour-long backoffs and day-long timeouts configured, and
    clones slowed, failing and losing replies at SIGTERM, ``fleet provision`` exits
    within ``cancel_grace_s`` + ``cleanup_s`` (plus a generous margin for a loaded
    machine), with its summary. The bound is the guarantee, not a speed: what the
    configured waits would cost is hours."""

    # The bound is what is checked, not its size: slowed clones never end, so the run
    # uses all of grace + cleanup, and short ones keep the test quick.
    grace_s, cleanup_s, margin_s = 1.0, 3.0, 60.0
    with SimProcess(time_scale=0.05) as sim:
        sim.add_faults(
            # In flight at SIGTERM: 3600 s at time scale 0.05 is three minutes a clone.
            {"method": "InstantClone_Task", "fault": "slow", "delay_s": 3600,
             "probability": 0.5},
            # Retried with an hour's backoff: in the clone queue and in the NIC phases.
            {"method": "InstantClone_Task", "fault": "TaskInProgress", "probability": 0.2},
            {"method": "InstantClone_Task", "fault": "http:lost_reply", "probability": 0.1},
            {"method": "ReconfigVM_Task", "fault": "TaskInProgress", "probability": 0.5},
            {"method": "StartProgramInGuest", "fault": "http:503", "probability": 0.3})
        spec = write_spec(
            tmp_path / "fleet.toml", sim, "linger", 60,
            retries={"attempts": 100, "backoff_base_s": 3600, "backoff_max_s": 3600,
                     "jitter": 0},
            timeouts={"queue_s": 86_400, "clone_s": 86_400, "network_s": 86_400,
                      "reconnect_s": 86_400, "call_s": 3600, "cleanup_s": cleanup_s,
                      "cancel_grace_s": grace_s},
            readiness={"timeout_s": 86_400})
        rc, out, err = sigterm_provision(
            sim, spec, bound_s=grace_s + cleanup_s + margin_s,
            when=lambda calls: calls.get("InstantClone_Task", 0) >= 20
            and calls.get("ReconfigVM_Task", 0) >= 5)
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err
    summary = json.loads(out)
    assert summary["cancelled"] is True
    assert summary["ready"] < 60


def test_sigterm_never_waits_out_a_slow_lock_release(tmp_path: Path) -> None:
    """Issue 11, item 9, the lock's part: with vCenter slow to destroy folders, a stopped
    run ended in time and then spent 30 s (the lock's own call bound) releasing its
    lock. The release now gives up at the stop's deadline: the lock lapses instead."""

    grace_s, cleanup_s, margin_s = 1.0, 3.0, 20.0  # the release alone took 30 s
    quick = {"network": {"refresh": "none", "disconnect_at_clone": False},
             "readiness": {"wait_for": "none"}}
    with SimProcess(time_scale=0.05) as sim:
        sim.add_faults({"method": "Destroy_Task", "object": "fleet-lock", "fault": "slow",
                        "delay_s": 3600},
                       {"method": "InstantClone_Task", "fault": "slow", "delay_s": 3600})
        spec = write_spec(tmp_path / "fleet.toml", sim, "slowlock", 4, **quick,
                          timeouts={"cleanup_s": cleanup_s, "cancel_grace_s": grace_s})
        rc, out, err = sigterm_provision(
            sim, spec, bound_s=grace_s + cleanup_s + margin_s,
            when=lambda calls: calls.get("InstantClone_Task", 0) >= 4)
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err
    assert json.loads(out)["cancelled"] is True
    assert "gave up removing" in err and "its lease will expire" in err, err[-3000:]


def test_sigterm_during_a_scale_down_never_lingers(tmp_path: Path) -> None:
    """Issue 11, item 9: removing extras (a scale-down) happens before any clone, and a
    stop did not reach it: with slow destroys, 16 at a time, each given ``cleanup_s``,
    a SIGTERM waited for every round (here about ten rounds of 20 s). The run must end
    within ``cancel_grace_s`` + ``cleanup_s`` (plus a generous margin) of the signal."""

    grace_s, cleanup_s, margin_s = 2.0, 20.0, 60.0
    quick = {"network": {"refresh": "none", "disconnect_at_clone": False},
             "readiness": {"wait_for": "none"}}
    with SimProcess(time_scale=0.05) as sim:
        spec = write_spec(tmp_path / "fleet.toml", sim, "shrink", 160, **quick,
                          timeouts={"cleanup_s": cleanup_s, "cancel_grace_s": grace_s,
                                    "call_s": 3600})
        made = fleet("provision", "--spec", str(spec), "--json", env=ENV)
        assert made.returncode == 0, made.stderr[-3000:]
        # Each destroy of a member now takes three minutes (3600 s at time scale 0.05).
        # Members only: the lock's release has a test of its own (below).
        sim.add_faults({"method": "Destroy_Task", "object": "shrink-*", "fault": "slow",
                        "delay_s": 3600})
        rc, out, err = sigterm_provision(
            sim, spec, "--count", "1", bound_s=grace_s + cleanup_s + margin_s,
            when=lambda calls: calls.get("Destroy_Task", 0) >= 16)
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err
    summary = json.loads(out)
    assert summary["cancelled"] is True


def test_a_vcenter_slower_than_the_spec_deadline_is_a_clear_error(sim: SimProcess,
                                                                  tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "slow.toml", sim, "slow", 3,
                      timeouts={"call_s": 1.0})
    # 3 s at the simulator's time scale (0.05): past the 1 s deadline
    sim.add_faults({"method": "RetrievePropertiesEx", "fault": "slow", "delay_s": 60.0,
                    "phase": "call"})
    try:
        result = fleet("status", "--spec", str(spec), env=ENV)
    finally:
        sim.clear_faults()
    assert result.returncode == 1, result.stderr
    assert "timeouts.call_s" in result.stderr and "Traceback" not in result.stderr
