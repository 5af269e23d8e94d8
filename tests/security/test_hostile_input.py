"""Hostile files and values given to fleet at start: exit 2 naming the culprit, bounded, no leak.

Issue 11, items 2, 7, 8, 9 and 10e, through the real commands (``fleet
provision``, ``plan``, ``serve``, ``sim``) as a user runs them, each in a
process of its own with a timeout (a command that hangs fails the test instead
of hanging the suite):

- a vCenter URL with a password in it is refused naming ``vcenter.url``, and the
  password appears nowhere in stdout or stderr, even at ``--log-level debug``;
- URLs urllib cannot take (port 99999, ``:abc``, ``[::1``) are refused at load;
- TOML nested 5,000 deep, in a spec, a service config or a topology;
- secret files that are not UTF-8, ``/dev/zero``, a FIFO, too large; specs,
  configs and topologies that are FIFOs, devices or too large; a CA file that is
  a device or not PEM;
- durations past their bounds (``1e308``) and folder paths with ``.``/``..``.

``--events /dev/full`` is in tests/test_cli.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.simproc import USER, SimProcess
from tests.specs import ENV, run_fleet, to_toml

SECRET = "Hunter2-url-secret-8c1f0e"
TOKEN = "a-good-long-token-0123456789"
# Deeper than tomllib can recurse: it raised RecursionError (a traceback, exit 1).
DEEP = "a = " + "[" * 5000 + "]" * 5000 + "\n"


def fleet(*args: str, env: dict[str, str] | None = None, timeout: float = 60
          ) -> subprocess.CompletedProcess[str]:
    return run_fleet(*args, env=env or {}, timeout=timeout)


def assert_usage_error(run: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    for fragment in fragments:
        assert fragment in run.stderr, (fragment, run.stderr[-2000:])


def spec_text(**over: Any) -> str:
    data: dict[str, Any] = {
        "name": "hostile", "count": 2, "sources": ["frozen-01"],
        "vcenter": {"url": "https://127.0.0.1:1/sdk", "user": USER,
                    "password_env": "SIM_PASSWORD", "insecure": True},
        "network": {"refresh": "none"},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return to_toml(_without_none(data))


def serve_text(**vcenter: Any) -> str:
    """A service config; ``vcenter`` keys (None drops one) make a [vcenter] table."""
    data: dict[str, Any] = {"listen": "127.0.0.1:0", "api": {"token_env": "TOKEN"}}
    if vcenter:
        data["vcenter"] = {"url": "https://127.0.0.1:1/sdk", "user": USER,
                           "password_env": "SIM_PASSWORD", "insecure": True, **vcenter}
    return to_toml(_without_none(data))


def _without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in data.items()
            if v is not None}


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    yield path


# -- item 2: a password in the vCenter URL ---------------------------------------------

URL_WITH_SECRET = f"https://fleet%40vsphere.local:{SECRET}@vc.example.com/sdk"


@pytest.mark.parametrize("command", ["provision", "plan"])
def test_a_password_in_the_url_is_refused_and_never_shown(tmp_path: Path, command: str) -> None:
    spec = tmp_path / "fleet.toml"
    spec.write_text(spec_text(vcenter={"url": URL_WITH_SECRET}))
    run = fleet("--log-level", "debug", command, "--spec", str(spec), "--json", env=ENV)
    assert_usage_error(run, "fleet.toml: vcenter.url: ", '"https://***@vc.example.com/sdk"',
                       "has a user name or password in it")
    assert SECRET not in run.stdout + run.stderr
    assert run.stdout == ""


def test_serve_refuses_a_password_in_the_url_and_never_shows_it(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(serve_text(url=URL_WITH_SECRET))
    run = fleet("--log-level", "debug", "serve", "--config", str(config),
                env={**ENV, "TOKEN": TOKEN})
    assert_usage_error(run, "serve.toml: vcenter.url: ", "https://***@vc.example.com/sdk")
    assert SECRET not in run.stdout + run.stderr


def test_a_url_that_is_not_even_a_url_is_shown_redacted(tmp_path: Path) -> None:
    """Whatever fails about a URL, its user info is not echoed: here a table was
    expected and a password-bearing string given."""
    spec = tmp_path / "fleet.toml"
    spec.write_text(f'name = "x"\ncount = 1\nsources = ["a"]\nvcenter = "{URL_WITH_SECRET}"\n')
    run = fleet("plan", "--spec", str(spec))
    assert_usage_error(run, "fleet.toml: vcenter: ", "must be a table")
    assert SECRET not in run.stderr


# -- item 7: URLs urllib cannot take ------------------------------------------------------

@pytest.mark.parametrize(("url", "reason"), [
    ("https://vc.example.com:99999/sdk", "its port is not a number from 1 to 65535"),
    ("https://vc.example.com:abc/sdk", "its port is not a number from 1 to 65535"),
    ("https://[::1/sdk", "its host is not an IPv6 address in brackets"),
])
def test_a_url_urllib_cannot_parse_is_a_usage_error(tmp_path: Path, url: str,
                                                    reason: str) -> None:
    spec = tmp_path / "fleet.toml"
    spec.write_text(spec_text(vcenter={"url": url}))
    run = fleet("provision", "--spec", str(spec), "--json", env=ENV)
    assert_usage_error(run, f"fleet.toml: vcenter.url: {json.dumps(url)} is not an http(s) "
                            f"URL: {reason}")


# -- item 7: nesting ---------------------------------------------------------------------

def test_deep_toml_in_a_spec(tmp_path: Path) -> None:
    spec = tmp_path / "fleet.toml"
    spec.write_text(DEEP)
    assert_usage_error(fleet("provision", "--spec", str(spec)),
                       "fleet.toml: a: arrays or tables nested more than 32 deep (line 1)")


def test_deep_toml_in_a_service_config(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('listen = "127.0.0.1:0"\n' + DEEP)
    assert_usage_error(fleet("serve", "--config", str(config), env={"TOKEN": TOKEN}),
                       "serve.toml: a: arrays or tables nested more than 32 deep (line 2)")


def test_deep_toml_in_a_topology(tmp_path: Path) -> None:
    topology = tmp_path / "topo.toml"
    topology.write_text(DEEP)
    assert_usage_error(fleet("sim", "--topology", str(topology), "--listen", "127.0.0.1:0"),
                       f"{topology}: a: arrays or tables nested more than 32 deep")


def test_deep_dotted_keys_are_named(tmp_path: Path) -> None:
    """Dotted keys nest without recursing in tomllib, but would in what reads them after."""
    spec = tmp_path / "fleet.toml"
    spec.write_text("guestinfo." + ".".join(["k"] * 40) + ' = "x"\n')
    assert_usage_error(fleet("plan", "--spec", str(spec)),
                       "fleet.toml: guestinfo.k.k.k...: arrays or tables nested more than 32")


# -- items 7 and 8: secret files -----------------------------------------------------------

SECRET_KEYS = [
    ("spec", "vcenter.password_file"),
    ("spec", "network.guest_password_file"),
    ("serve", "vcenter.password_file"),
    ("serve", "api.token_file"),
]


def write_with_secret_file(tmp_path: Path, where: str, key: str, secret_path: Path) -> Path:
    table, name = key.split(".")
    if where == "spec":
        path = tmp_path / "fleet.toml"
        if table == "vcenter":
            text = spec_text(vcenter={"password_env": None, name: str(secret_path)})
        else:
            text = spec_text(network={"refresh": "linux", "guest_user": "root",
                                      name: str(secret_path)})
        path.write_text(text)
        return path
    path = tmp_path / "serve.toml"
    if table == "api":
        text = to_toml({"listen": "127.0.0.1:0", "api": {name: str(secret_path)}})
    else:
        text = serve_text(password_env=None, **{name: str(secret_path)})
    path.write_text(text)
    return path


def run_with(where: str, path: Path) -> subprocess.CompletedProcess[str]:
    if where == "spec":
        return fleet("provision", "--spec", str(path), "--json", env=ENV)
    return fleet("serve", "--config", str(path), env={**ENV, "TOKEN": TOKEN})


@pytest.mark.parametrize(("where", "key"), SECRET_KEYS, ids=[f"{w}:{k}" for w, k in SECRET_KEYS])
def test_a_secret_file_that_is_not_utf8(tmp_path: Path, where: str, key: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cr\xff\xfeT-never-shown\n")
    run = run_with(where, write_with_secret_file(tmp_path, where, key, secret))
    assert_usage_error(run, f": {key}: cannot read {json.dumps(str(secret))}: it is not UTF-8 "
                            "text (invalid byte at offset 4)")
    assert "never-shown" not in run.stderr and "s3cr" not in run.stderr


@pytest.mark.parametrize(("where", "key"), SECRET_KEYS, ids=[f"{w}:{k}" for w, k in SECRET_KEYS])
def test_a_secret_file_that_is_dev_zero(tmp_path: Path, where: str, key: str) -> None:
    """It took 2.7 GB, then MemoryError."""
    run = run_with(where, write_with_secret_file(tmp_path, where, key, Path("/dev/zero")))
    assert_usage_error(run, f': {key}: cannot read "/dev/zero": it is a character device, '
                            "not a regular file")


@pytest.mark.parametrize(("where", "key"), SECRET_KEYS, ids=[f"{w}:{k}" for w, k in SECRET_KEYS])
def test_a_secret_file_that_is_a_fifo(tmp_path: Path, fifo: Path, where: str, key: str) -> None:
    """It hung forever (nobody writes to the FIFO)."""
    run = run_with(where, write_with_secret_file(tmp_path, where, key, fifo))
    assert_usage_error(run, f": {key}: cannot read {json.dumps(str(fifo))}: it is a FIFO, "
                            "not a regular file")


def test_a_secret_file_that_is_too_large(tmp_path: Path) -> None:
    from fleet.files import SECRET_MAX_BYTES

    secret = tmp_path / "secret"
    secret.write_text("x" * (SECRET_MAX_BYTES + 1))
    run = run_with("spec", write_with_secret_file(tmp_path, "spec", "vcenter.password_file",
                                                  secret))
    assert_usage_error(run, f": vcenter.password_file: cannot read {json.dumps(str(secret))}: "
                            f"it is {SECRET_MAX_BYTES + 1} bytes; the limit is "
                            f"{SECRET_MAX_BYTES}")
    assert "xxxx" not in run.stderr


@pytest.mark.parametrize("where", ["spec", "serve"])
def test_a_ca_file_that_is_a_device_or_not_pem(tmp_path: Path, where: str) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    for ca, reason in (("/dev/zero", "it is a character device"),
                       (str(bogus), "holds no PEM certificate")):
        if where == "spec":
            path = tmp_path / "fleet.toml"
            path.write_text(spec_text(vcenter={"insecure": False, "ca_file": ca}))
        else:
            path = tmp_path / "serve.toml"
            path.write_text(serve_text(insecure=False, ca_file=ca))
        run = run_with(where, path)
        assert_usage_error(run, ": vcenter.ca_file: ", json.dumps(ca), reason)


# -- item 8: the files themselves -------------------------------------------------------------

def test_a_spec_that_is_a_fifo_or_a_device(fifo: Path) -> None:
    assert_usage_error(fleet("plan", "--spec", str(fifo)),
                       f"{fifo}: cannot read the spec: it is a FIFO, not a regular file")
    assert_usage_error(fleet("plan", "--spec", "/dev/zero"),
                       "/dev/zero: cannot read the spec: it is a character device")


def test_a_config_or_topology_that_is_a_fifo(fifo: Path) -> None:
    assert_usage_error(fleet("serve", "--config", str(fifo), env={"TOKEN": TOKEN}),
                       f"{fifo}: cannot read the config: it is a FIFO, not a regular file")
    assert_usage_error(fleet("sim", "--topology", str(fifo), "--listen", "127.0.0.1:0"),
                       f"{fifo}: cannot read topology file: it is a FIFO, not a regular file")


def test_a_certificate_for_the_simulator_that_is_a_fifo(fifo: Path) -> None:
    assert_usage_error(fleet("sim", "--cert-file", str(fifo), "--key-file", str(fifo),
                             "--listen", "127.0.0.1:0"),
                       "--cert-file: cannot use the certificate: it is a FIFO")


def test_an_event_log_fifo_without_a_reader_is_refused_not_waited_for(fifo: Path) -> None:
    """Opening a FIFO for writing waits for a reader: ``--events FIFO`` with nobody
    reading it hung before the run began, for ever."""
    assert_usage_error(fleet("provision", "--count", "1", "--sim-time-scale", "0.05",
                             "--events", str(fifo), timeout=60),
                       "--events", f"{str(fifo)!r}", "nobody is reading that FIFO")


def test_an_event_log_fifo_with_a_reader_gets_every_event(fifo: Path) -> None:
    """A FIFO someone reads (``--events >(jq ...)``, a log shipper) is a fine event log."""
    lines: list[bytes] = []

    def read() -> None:
        with fifo.open("rb") as log:  # returns once fleet opens it for writing
            lines.extend(log)

    # A reader is there before fleet starts: this end, opened without waiting.
    present = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        reading = threading.Thread(target=read, daemon=True)
        reading.start()
        run = fleet("provision", "--count", "2", "--sim-time-scale", "0.05", "--json",
                    "--events", str(fifo), timeout=120)
        reading.join(30)
    finally:
        os.close(present)
    assert run.returncode == 0, run.stderr[-2000:]
    kinds = [json.loads(line)["event"] for line in lines]
    assert kinds.count("job_ready") == 2, kinds


def test_a_ten_megabyte_spec_is_refused_before_parsing(tmp_path: Path) -> None:
    """1M sources in 10 MB took more than 60 s and 840 MB, and listed every name."""
    from fleet.files import CONFIG_MAX_BYTES

    spec = tmp_path / "fleet.toml"
    names = ", ".join(f'"vm-{i:07d}"' for i in range(1_000_000))
    spec.write_text(f'name = "big"\ncount = 1\nsources = [{names}]\n')
    size = spec.stat().st_size
    assert size > 10_000_000
    run = fleet("plan", "--spec", str(spec))
    assert_usage_error(run, f"{spec}: cannot read the spec: it is {size} bytes; the limit is "
                            f"{CONFIG_MAX_BYTES}")
    assert len(run.stderr) < 1000


def test_missing_sources_are_listed_with_a_count_of_the_rest(tmp_path: Path) -> None:
    """The most sources a spec may list, none of which exist: the error names a few
    and counts the rest (it listed every one)."""
    with SimProcess(time_scale=0.05) as sim:
        spec = tmp_path / "fleet.toml"
        sources = [f"nowhere-{i:04d}" for i in range(5000)]
        spec.write_text(to_toml({
            "name": "many", "count": 1, "sources": sources,
            "vcenter": {"url": sim.url, "user": USER, "password_env": "SIM_PASSWORD",
                        "thumbprint": sim.thumbprint},
            "network": {"refresh": "none"}}))
        run = fleet("plan", "--spec", str(spec), env=ENV, timeout=120)
    assert_usage_error(run, "fleet.toml: sources: no VM called nowhere-0000, nowhere-0001",
                       "nowhere-0009 and 4990 more")
    assert "nowhere-0010" not in run.stderr
    assert len(run.stderr) < 2000


def test_hundreds_of_problems_are_counted_not_listed(tmp_path: Path) -> None:
    spec = tmp_path / "fleet.toml"
    spec.write_text("".join(f"bogus{i} = 1\n" for i in range(990)) + spec_text())
    run = fleet("plan", "--spec", str(spec))
    assert_usage_error(run, "fleet.toml: bogus0: unknown key",
                       "fleet.toml: ... and 970 more problems")
    assert len(run.stderr.splitlines()) == 21


@pytest.mark.parametrize(("text", "fragment"), [
    ("".join(f"k{i} = 1\n" for i in range(184_000)),
     "fleet.toml: a table of 184000 keys; the limit is 1000"),
    ("[guestinfo]\n" + "".join(f'"guestinfo.k{i}" = "x"\n' for i in range(1001)),
     "fleet.toml: guestinfo: a table of 1001 keys; the limit is 1000"),
    ("a = [" + "0, " * 10_001 + "]\n", "fleet.toml: a: an array of 10001 items; the limit"),
    # 5,000 sources of 40 unknown keys each (1.2 MB) made 205,000 problems: 4.7 s, 290 MB
    ("sources = [" + ", ".join("{" + ", ".join(f"k{i} = 1" for i in range(40)) + "}"
                               for _ in range(5000)) + "]\n",
     "fleet.toml: it holds more than 50000 keys and array items in all"),
])
def test_huge_tables_and_arrays_are_refused_before_validation(tmp_path: Path, text: str,
                                                              fragment: str) -> None:
    """184,000 unknown keys in 2 MiB took 5 s and 250 MB to list (and printed them all)."""
    spec = tmp_path / "fleet.toml"
    spec.write_text(text)
    run = fleet("plan", "--spec", str(spec))
    assert_usage_error(run, fragment)
    assert len(run.stderr) < 300


# -- item 9: durations ---------------------------------------------------------------------------

def test_a_backoff_of_1e308_is_refused(tmp_path: Path) -> None:
    """It was accepted, and one transient fault then slept forever."""
    spec = tmp_path / "fleet.toml"
    spec.write_text(spec_text(retries={"backoff_base_s": 1e308, "backoff_max_s": 1e308}))
    assert_usage_error(fleet("provision", "--spec", str(spec), env=ENV),
                       "fleet.toml: retries.backoff_base_s: 1e+308 must be at most 3600 seconds",
                       "fleet.toml: retries.backoff_max_s: 1e+308 must be at most 3600 seconds")


@pytest.mark.parametrize("value", ["1e308", "nan", "inf"])
def test_time_scales_are_bounded(value: str, tmp_path: Path) -> None:
    assert_usage_error(fleet("provision", "--count", "1", "--sim-time-scale", value),
                       "--sim-time-scale: ", "must be above 0 and at most 100")
    assert_usage_error(fleet("sim", "--time-scale", value, "--listen", "127.0.0.1:0"),
                       "--time-scale: ", "must be above 0 and at most 100")


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ("[latency]\ninstant_clone_s = 1e308\n", "latency.instant_clone_s",
     "less than or equal to 3600"),
    ("[latency]\nstun_s = nan\n", "latency.stun_s", "finite number"),
    ("[vcenter]\nsession_idle_timeout_s = inf\n", "vcenter.session_idle_timeout_s",
     "finite number"),
    ("[vcenter]\ntask_retention_s = 1e9\n", "vcenter.task_retention_s",
     "less than or equal to 86400"),
    ("[[faults]]\nfault = 'slow'\ndelay_s = 1e308\n", "faults[0].delay_s",
     "less than or equal to 3600"),
    ("[[vms]]\nname = 'vm-{index}'\ncount = 1000000000\n", "vms[0].count",
     "less than or equal to 100000"),
    ("folders = ['sources/../x']\n", "folders", "no empty"),
])
def test_topology_durations_counts_and_folders_are_bounded(tmp_path: Path, text: str, key: str,
                                                          fragment: str) -> None:
    topology = tmp_path / "topo.toml"
    topology.write_text(text)
    run = fleet("sim", "--topology", str(topology), "--listen", "127.0.0.1:0")
    assert_usage_error(run, f"{topology}: {key}: ", fragment)


@pytest.mark.parametrize(("over", "key", "fragment"), [
    ({"shutdown_grace_s": 1e308}, "shutdown_grace_s", "must be at most 3600 seconds"),
    ({"scan_interval_s": float("nan")}, "scan_interval_s", "must be a finite number"),
    ({"simulator": {"time_scale": 1e308}}, "simulator.time_scale", "must be at most 100"),
    ({"root_folder": "fleet/.."}, "root_folder", 'the folder name ".." is not a folder name'),
    ({"root_folder": "."}, "root_folder", 'the folder name "."'),
])
def test_service_durations_and_folders_are_bounded(tmp_path: Path, over: dict[str, Any],
                                                   key: str, fragment: str) -> None:
    config = tmp_path / "serve.toml"
    data: dict[str, Any] = {"listen": "127.0.0.1:0", "api": {"token_env": "TOKEN"}, **over}
    config.write_text(to_toml(data))
    run = fleet("serve", "--config", str(config), env={"TOKEN": TOKEN})
    assert_usage_error(run, f"serve.toml: {key}: ", fragment)


def test_a_bad_simulator_topology_in_the_service_config_is_named(tmp_path: Path) -> None:
    """It was passed to the simulator child, which failed: exit 1, "did not start"."""
    topology = tmp_path / "topo.toml"
    topology.write_text("[latency]\ninstant_clone_s = -1\n")
    config = tmp_path / "serve.toml"
    config.write_text(to_toml({"listen": "127.0.0.1:0", "api": {"token_env": "TOKEN"},
                               "simulator": {"topology": str(topology)}}))
    run = fleet("serve", "--config", str(config), env={"TOKEN": TOKEN})
    assert_usage_error(run, "serve.toml: simulator.topology: ", "latency.instant_clone_s")
