"""Pointing fleet at vCenter from the environment, as govc users do (docs/connecting.md):
``fleet`` processes with ``GOVC_*`` (or ``FLEET_VCENTER_*``) variables and no spec,
against a simulator started separately; and the commands that must never answer from
a fresh built-in simulator."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.simproc import PASSWORD, USER, SimProcess
from tests.specs import ENV, run_fleet, write_spec

#: no simulator is named anywhere: the tests' own environment is scrubbed (conftest)
NO_VCENTER: dict[str, str] = {}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(time_scale=0.05) as proc:
        yield proc


def govc_env(sim: SimProcess, **extra: str) -> dict[str, str]:
    # A bare host:port, as govc users write it: https and /sdk are implied.
    return {"GOVC_URL": f"{sim.host}:{sim.port}", "GOVC_USERNAME": USER,
            "GOVC_PASSWORD": PASSWORD, "GOVC_TLS_CA_CERTS": str(sim.cert_path), **extra}


def test_status_with_govc_url_and_no_spec_talks_to_that_vcenter(sim: SimProcess) -> None:
    """The issue's "done when": with GOVC_URL set and no spec, `fleet status` reads the
    vCenter it names (here a fleet made there), never a fresh built-in simulator."""
    env = govc_env(sim)
    made = run_fleet("provision", "--name", "govc", "--count", "3", "--json", env=env)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["target"] == "vcenter"
    assert "built-in simulator" not in made.stderr
    assert f"vCenter https://{sim.host}:{sim.port}/sdk (from GOVC_URL)" in made.stderr
    assert sim.stats()["vms"] == 9 + 3  # made in that simulator

    status = run_fleet("status", "--name", "govc", "--count", "3", "--json", env=env)
    assert status.returncode == 0, status.stderr
    seen = json.loads(status.stdout)
    assert seen["ready"] == 3 and seen["complete"] is True
    assert "built-in simulator" not in status.stderr
    assert PASSWORD not in status.stderr + status.stdout

    # The same vCenter pinned by thumbprint: govc has no variable for it, fleet's stands in.
    assert sim.thumbprint is not None
    pinned = govc_env(sim, FLEET_VCENTER_THUMBPRINT=sim.thumbprint)
    del pinned["GOVC_TLS_CA_CERTS"]
    status = run_fleet("status", "--name", "govc", "--count", "3", "--json", env=pinned)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["ready"] == 3

    # fleet's own variables do the same, and destroy goes where status looked.
    own = {"FLEET_VCENTER_URL": sim.url, "FLEET_VCENTER_USER": USER,
           "FLEET_VCENTER_PASSWORD": PASSWORD, "FLEET_VCENTER_CA_FILE": str(sim.cert_path)}
    gone = run_fleet("destroy", "--name", "govc", "--yes", "--json", env=own)
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["removed"] == 3
    assert sim.stats()["vms"] == 9


def test_govc_url_at_a_closed_port_fails_clearly_without_a_simulator() -> None:
    # A loopback port bound but not listening: connections to it are refused.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        env = {"GOVC_URL": f"127.0.0.1:{port}", "GOVC_USERNAME": USER,
               "GOVC_PASSWORD": PASSWORD, "GOVC_INSECURE": "1"}
        for command in (("status", "--name", "x"), ("provision", "--count", "1")):
            run = run_fleet(*command, env=env)
            assert run.returncode == 1, run.stderr
            assert f"cannot connect to 127.0.0.1:{port}" in run.stderr
            assert "built-in simulator" not in run.stderr
            assert "Traceback" not in run.stderr and PASSWORD not in run.stderr


@pytest.mark.parametrize("command", [("status", "--name", "x"), ("destroy", "--yes"),
                                     ("status", "--json")])
def test_status_and_destroy_never_answer_from_a_fresh_simulator(
        command: tuple[str, ...]) -> None:
    run = run_fleet(*command, env=NO_VCENTER)
    assert run.returncode == 2, run.stderr
    assert f"`fleet {command[0]}` reads fleets that already exist" in run.stderr
    for how in ("--spec FILE", "[vcenter]", "FLEET_VCENTER_URL", "GOVC_URL"):
        assert how in run.stderr
    assert "listening" not in run.stderr and "built-in simulator at" not in run.stderr


@pytest.mark.parametrize(("env", "culprit"), [
    ({"GOVC_PASSWORD": PASSWORD}, "GOVC_PASSWORD: is set but no vCenter is named"),
    ({"FLEET_VCENTER_URL": "https://127.0.0.1:9/sdk"}, "FLEET_VCENTER_USER: is required"),
    ({"GOVC_URL": "127.0.0.1:9", "GOVC_USERNAME": USER, "GOVC_PASSWORD": PASSWORD,
      "GOVC_INSECURE": "maybe"}, 'GOVC_INSECURE: "maybe" is not a boolean'),
    ({"FLEET_VCENTER_URL": "https://127.0.0.1:9/sdk", "FLEET_VCENTER_USER": USER,
      "FLEET_VCENTER_PASSWORD_FILE": "/dev/zero"},
     'FLEET_VCENTER_PASSWORD_FILE: cannot read "/dev/zero": it is a character device'),
])
def test_a_vcenter_meant_but_incomplete_is_an_error_not_the_simulator(
        env: dict[str, str], culprit: str) -> None:
    """provision keeps the embedded default only when nothing names a vCenter."""
    run = run_fleet("provision", "--count", "1", env=env)
    assert run.returncode == 2, run.stderr
    assert f"fleet: error: environment: {culprit}" in run.stderr
    assert "using the built-in simulator at" not in run.stderr and "Traceback" not in run.stderr
    assert PASSWORD not in run.stderr


def test_flags_then_spec_then_environment_end_to_end(sim: SimProcess, tmp_path: Path) -> None:
    """The flags' vCenter wins over the environment's, the spec's over the environment's;
    what lost is named on stderr, and nothing is sent to the losing (closed) address."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        elsewhere = {"GOVC_URL": f"127.0.0.1:{closed.getsockname()[1]}",
                     "GOVC_USERNAME": USER, "GOVC_PASSWORD": PASSWORD, "GOVC_INSECURE": "1"}
        secret = tmp_path / "password"
        secret.write_text(PASSWORD + "\n")
        assert sim.thumbprint is not None
        run = run_fleet("status", "--name", "flags", "--count", "0", "--json",
                        "--vcenter-url", sim.url, "--vcenter-user", USER,
                        "--vcenter-password-file", str(secret),
                        "--vcenter-thumbprint", sim.thumbprint, env=elsewhere)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["requested"] == 0
        assert "using the vCenter of --vcenter-url; ignoring GOVC_INSECURE, GOVC_PASSWORD, " \
               "GOVC_URL, GOVC_USERNAME" in run.stderr
        assert f"vCenter {sim.url} (from --vcenter-url)" in run.stderr

        spec = write_spec(tmp_path / "fleet.toml", sim, "specwins", 0)
        run = run_fleet("status", "--spec", str(spec), "--json",
                        env={**ENV, **elsewhere})
        assert run.returncode == 0, run.stderr
        assert "using the vCenter of fleet.toml's [vcenter]; ignoring GOVC_INSECURE, " \
               "GOVC_PASSWORD, GOVC_URL, GOVC_USERNAME" in run.stderr


def test_the_demo_fleet_against_a_vcenter_without_its_sources_says_to_give_a_spec() -> None:
    """No --spec means the demo fleet, whose sources are the built-in simulator's; a
    vCenter without them is told apart before anything is cloned, naming --spec."""
    from tests.integration.test_preflight import TOPOLOGY  # lacks frozen-02 and others

    with SimProcess(topology_text=TOPOLOGY) as other:
        run = run_fleet("provision", "--count", "2", env=govc_env(other))
        assert run.returncode == 2, run.stderr
        assert "sources: no VM called" in run.stderr and "frozen-02" in run.stderr
        assert "--spec FILE" in run.stderr and "Traceback" not in run.stderr
        assert other.stats()["clones_total"] == 0
