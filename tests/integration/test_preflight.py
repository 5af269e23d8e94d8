"""``fleet plan`` against a vCenter (a ``fleet sim`` process) where a first run would be
refused five ways: each refusal is named with its fix, the exit status is 1, and
vCenter is left as it was (issue 13, docs/preflight.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests import specs
from tests.simproc import PASSWORD, USER, SimProcess

TOPOLOGY = f"""
[latency]
jitter = 0.0
[[hosts]]
name = "esx-01"
[[hosts]]
name = "esx-02"
[[hosts]]
name = "esx-03"
maintenance = true
[[sources]]
name = "frozen-01"
host = "esx-01"
state = "frozen"
[[sources]]
name = "frozen-03"
host = "esx-03"
state = "frozen"
[[sources]]
name = "tools-off"
host = "esx-01"
state = "running"
guest = {{ tools_running = false }}
[[sources]]
name = "running-02"
host = "esx-02"
state = "running"
[[users]]
name = "{USER}"
password = "{PASSWORD}"
denied_on = {{ "frozen-01" = ["VirtualMachine.Provisioning.Clone"] }}
"""
SOURCES = ["frozen-01", "frozen-03", "tools-off", "running-02"]
#: what /_sim/stats says of the calls themselves (counts of reads, logins, sessions,
#: tasks: CheckInstantClone_Task is a task), not of vCenter's state
CALL_KEYS = ("calls", "calls_by_method", "logins", "sessions", "sessions_open", "tasks",
             "soap_bytes")
#: vCenter methods that change something (a dry run sends none)
MUTATING = ("InstantClone_Task", "CloneVM_Task", "Destroy_Task", "PowerOnVM_Task",
            "PowerOffVM_Task", "ResetVM_Task", "ShutdownGuest", "ReconfigVM_Task",
            "StartProgramInGuest", "CreateFolder", "RelocateVM_Task", "Rename_Task",
            "UnregisterVM")


def state(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if k not in CALL_KEYS}


def test_plan_names_each_refusal_and_its_fix_exits_1_and_changes_nothing(
        tmp_path: Path) -> None:
    with SimProcess(topology_text=TOPOLOGY) as sim:
        spec = specs.write_spec(tmp_path / "fleet.toml", sim, "lt", 6, sources=SOURCES)
        env = dict(specs.ENV, GUEST_PASSWORD="not-the-guest-password")
        before = sim.stats()
        shown = specs.run_fleet("plan", "--spec", str(spec), env=env)
        as_json = specs.run_fleet("plan", "--spec", str(spec), "--json", env=env)
        after = sim.stats()
    assert shown.returncode == 1, shown.stderr
    assert as_json.returncode == 1, as_json.stderr
    assert state(after) == state(before)
    assert not set(after["calls_by_method"]) & set(MUTATING), after["calls_by_method"]
    assert after["calls_by_method"]["HasPrivilegeOnEntities"] == 2
    assert after["calls_by_method"]["ValidateCredentialsInGuest"] == 2

    plan = json.loads(as_json.stdout)
    assert plan["feasible"] is False
    findings = {(f["check"], f["object"]): f for f in plan["findings"]}
    expected = {
        ("privileges", "source frozen-01"): ("error", "VirtualMachine.Provisioning.Clone",
                                             "grant VirtualMachine.Provisioning.Clone"),
        ("source_tools", "source tools-off"): ("error", "VMware Tools is not running",
                                               "start VMware Tools"),
        ("source_frozen", "source running-02"): ("warning", "not frozen",
                                                 "fleet sources freeze running-02"),
        ("host", "host esx-03"): ("warning", "maintenance mode", "out of maintenance mode"),
        ("guest_login", "source running-02"): ("error", "refuses the login 'root'",
                                               "network.guest_password_env"),
    }
    for key, (severity, problem, fix) in expected.items():
        assert key in findings, (key, sorted(findings))
        assert findings[key]["severity"] == severity, findings[key]
        assert problem in findings[key]["problem"] and fix in findings[key]["fix"]
    assert "not-the-guest-password" not in as_json.stdout + shown.stdout + shown.stderr

    text = shown.stdout
    assert "NOT feasible" in text
    lines = [" ".join(line.split()) for line in text.splitlines()]
    for (_, obj), (severity, problem, fix) in expected.items():
        at = next(i for i, line in enumerate(lines) if f"{severity.upper()} {obj}:" in line
                  and problem in line)
        assert lines[at + 1].startswith("fix: ") and fix in lines[at + 1], lines[at + 1]
    assert text.count("fix: ") == len(plan["findings"])
