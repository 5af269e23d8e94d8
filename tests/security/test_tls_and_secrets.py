"""TLS verification on by default, and passwords nowhere they could leak, through the real CLI.

The client-level cases (CA file, pinned thumbprint, wrong thumbprint, insecure,
both transports) are in tests/vsphere/test_tls_and_endpoints.py and the
client's own credential hygiene in tests/vsphere/test_secrets.py. Here the
whole ``fleet`` command, as a user runs it:

- a spec with no trust configured refuses the simulator's self-signed
  certificate before a single SOAP request; a wrong pinned thumbprint too; the
  CA file trusts it;
- no ``fleet`` option takes a password (secrets come from the environment or a
  file named in the spec);
- ``fleet --log-level debug provision --json --metrics-port N`` through session
  expiries, resets, a wrong guest password and a wrong vCenter password: the
  vCenter and guest passwords appear in none of stdout, stderr, the metrics
  scraped during the run, or the process's argv.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import cli
from tests.simproc import USER, SimProcess
from tests.specs import run_fleet

VC_PASSWORD = "Vc-Pa55-9d1e7c-never-shown"
GUEST_PASSWORD = "Gu3st-Pa55-41ab0f-never-shown"
WRONG_VC_PASSWORD = "Wr0ng-Vc-77c2e1-never-shown"
WRONG_GUEST_PASSWORD = "Wr0ng-Gu3st-5f09aa-never-shown"
SECRETS = (VC_PASSWORD, GUEST_PASSWORD, WRONG_VC_PASSWORD, WRONG_GUEST_PASSWORD)

TOPOLOGY = f"""
folders = ["sources"]
[vcenter]
password = "{VC_PASSWORD}"
[[hosts]]
name = "esx-{{index:02d}}"
count = 2
[[sources]]
name = "frozen-{{index:02d}}"
count = 2
host = "esx-{{index:02d}}"
folder = "sources"
state = "frozen"
guest = {{ password = "{GUEST_PASSWORD}" }}
"""


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(topology_text=TOPOLOGY, time_scale=0.05) as process:
        yield process


def write_spec(path: Path, sim: SimProcess, name: str, trust: str, count: int = 12) -> Path:
    path.write_text(f"""
name = "{name}"
count = {count}
sources = ["frozen-01", "frozen-02"]
[vcenter]
url = "{sim.url}"
user = "{USER}"
password_env = "VC_PW"
{trust}
[retries]
backoff_base_s = 0.02
backoff_max_s = 0.2
attempts = 3
[network]
guest_user = "root"
guest_password_env = "GUEST_PW"
""")
    return path


def fleet(*args: str, env: dict[str, str], timeout: float = 120
          ) -> subprocess.CompletedProcess[str]:
    return run_fleet(*args, env=env, timeout=timeout)


# -- TLS -----------------------------------------------------------------------------------

GOOD_ENV = {"VC_PW": VC_PASSWORD, "GUEST_PW": GUEST_PASSWORD}


def test_no_trust_configured_refuses_the_self_signed_certificate(sim: SimProcess,
                                                                 tmp_path: Path) -> None:
    before = sim.stats()["calls"]
    spec = write_spec(tmp_path / "f.toml", sim, "tls", trust="")
    run = fleet("provision", "--spec", str(spec), "--json", env=GOOD_ENV)
    assert run.returncode == 1, run.stderr
    assert "certificate is not trusted" in run.stderr and "Traceback" not in run.stderr
    assert run.stdout == ""
    assert sim.stats()["calls"] == before  # refused at the handshake: no request was sent


def test_a_wrong_pinned_thumbprint_is_refused(sim: SimProcess, tmp_path: Path) -> None:
    before = sim.stats()["calls"]
    spec = write_spec(tmp_path / "f.toml", sim, "tls", trust=f'thumbprint = "{"AB:" * 31}CD"')
    run = fleet("status", "--spec", str(spec), "--json", env=GOOD_ENV)
    assert run.returncode == 1, run.stderr
    assert "thumbprint does not match" in run.stderr and "Traceback" not in run.stderr
    assert sim.stats()["calls"] == before


def test_the_ca_file_trusts_it(sim: SimProcess, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "f.toml", sim, "tls", trust=f'ca_file = "{sim.cert_path}"')
    run = fleet("status", "--spec", str(spec), "--json", env=GOOD_ENV)
    assert run.returncode in (0, 1), run.stderr  # 1: the fleet is not complete
    assert json.loads(run.stdout)["fleet"] == "tls"


# -- secrets ---------------------------------------------------------------------------------


def test_no_option_takes_a_secret() -> None:
    """Secrets come from the environment or a file named in the spec, never argv."""
    suspicious: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
                continue
            for option in action.option_strings:
                if any(word in option.lower() for word in ("pass", "secret", "token", "pwd")):
                    if option in ("--vcenter-password-file", "--token-file"):
                        # Its value is the path of a file holding the password (the pool
                        # commands': the API token), read as every secret file is
                        # (fleet.files), never the secret itself.
                        assert action.metavar == "FILE", path
                        files.append(path)
                    else:
                        suspicious.append(f"{path} {option}")

    files: list[str] = []
    walk(cli.build_parser(), "fleet")
    # The simulator's own (fake) vCenter password may be given to `fleet sim`; it also
    # reads $FLEET_SIM_PASSWORD, which is what fleet itself uses when it starts one.
    assert suspicious == ["fleet sim --password"], suspicious
    assert "fleet provision" in files and "fleet status" in files
    assert {"fleet lease", "fleet release", "fleet renew", "fleet pools"} <= set(files)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scraper(threading.Thread):
    """Keeps every /metrics page it can get while the command runs."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.pages: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=2) as resp:
                    self.pages.append(resp.read().decode())
            except OSError:
                pass
            self.stop.wait(0.05)


def _run_watched(args: list[str], env: dict[str, str], sim: SimProcess, *, port: int,
                 expire_sessions: bool) -> tuple[int, str, str, str, str]:
    """Run ``fleet`` with debug logs and metrics; (exit code, stdout, stderr, metrics,
    argv as the OS saw it)."""
    scraper = Scraper(port)
    proc = subprocess.Popen([sys.executable, "-m", "fleet", "--log-level", "debug", *args,
                             "--metrics-port", str(port)], env=dict(os.environ, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scraper.start()
    argv = ""
    with contextlib.suppress(OSError):
        argv = Path(f"/proc/{proc.pid}/cmdline").read_text().replace("\0", " ")
    if expire_sessions:
        deadline = time.monotonic() + 30
        while not scraper.pages and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        for _ in range(3):  # re-logins, with debug logging on
            sim.expire_sessions()
            time.sleep(0.3)
    out, err = proc.communicate(timeout=180)
    scraper.stop.set()
    scraper.join(timeout=10)
    return proc.returncode, out, err, "\n".join(scraper.pages), argv


def test_passwords_never_in_logs_output_errors_metrics_or_argv(sim: SimProcess,
                                                               tmp_path: Path) -> None:
    sim.add_faults({"method": "*", "fault": "http:reset", "probability": 0.02},
                   {"method": "InstantClone_Task", "fault": "http:lost_reply",
                    "probability": 0.1})
    seen: list[str] = []
    try:
        # A good run through resets, lost replies and session expiries.
        spec = write_spec(tmp_path / "good.toml", sim, "secrets", trust=f'ca_file = '
                          f'"{sim.cert_path}"', count=40)
        code, out, err, metrics, argv = _run_watched(
            ["provision", "--spec", str(spec), "--json"], GOOD_ENV, sim,
            port=_free_port(), expire_sessions=True)
        assert code == 0, err[-3000:]
        assert json.loads(out)["ready"] == 40
        assert "session expired: logged in again" in err
        assert "fleet_clones_total" in metrics and "fleet_vsphere_request_duration" in metrics
        seen += [out, err, metrics, argv]
        # The wrong guest password: every clone fails its NIC refresh, loudly.
        spec = write_spec(tmp_path / "guest.toml", sim, "secrets2", trust=f'ca_file = '
                          f'"{sim.cert_path}"', count=4)
        code, out, err, metrics, argv = _run_watched(
            ["provision", "--spec", str(spec), "--json"],
            {"VC_PW": VC_PASSWORD, "GUEST_PW": WRONG_GUEST_PASSWORD}, sim,
            port=_free_port(), expire_sessions=False)
        assert code == 1
        assert json.loads(out)["failures"] == {"invalid_guest_login": 4}
        seen += [out, err, metrics, argv]
        # The wrong vCenter password: refused at login.
        code, out, err, metrics, argv = _run_watched(
            ["provision", "--spec", str(spec), "--json"],
            {"VC_PW": WRONG_VC_PASSWORD, "GUEST_PW": GUEST_PASSWORD}, sim,
            port=_free_port(), expire_sessions=False)
        assert code == 1
        assert "fleet: error: Login on SessionManager: Cannot complete login" in err
        seen += [out, err, metrics, argv]
    finally:
        sim.clear_faults()
    blob = "\n".join(seen)
    assert "Traceback" not in blob
    for secret in SECRETS:
        assert secret not in blob, secret
