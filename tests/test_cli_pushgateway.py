"""``fleet provision --pushgateway URL``: a one-off run's metrics reach Prometheus.

A real Pushgateway (Debian's package ``prometheus-pushgateway``) and a real Prometheus
scraping it (``honor_labels``, as docs/pushgateway.md configures it) run on free
loopback ports. On a machine without the packages the tests that need them skip,
naming the package; ``.ci/run`` installs both and sets ``FLEET_REQUIRE_PROMETHEUS=1``,
under which a missing binary is a failure, so CI never skips them.

The rest (URLs, basic authentication, a gateway that refuses or never answers) needs
neither: a loopback socket of the test's own plays the gateway.
"""

from __future__ import annotations

import base64
import http.server
import json
import queue
import re
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from fleet.errors import ConfigError
from fleet.pushgateway import Gateway, Pusher, parse_gateway
from tests.api.test_prometheus import free_port, tool
from tests.simproc import SimProcess
from tests.specs import run_fleet, write_spec
from tests.test_cli import sigterm_provision

SECRET = "s3cret-Pw"  # must never appear in anything fleet prints


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


@contextmanager
def serving(args: list[str], url: str, log: Path) -> Iterator[str]:
    """Run a server until ``url``/-/ready answers (30 s at most); stop it after."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    get(f"{url}/-/ready")
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise AssertionError(f"{args[0]} did not start: "
                                             + log.read_text()[-2000:]) from None
                    time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            proc.kill()  # nothing if it ended
            proc.wait()


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fleet-push-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def gateway(workdir: Path) -> Iterator[str]:
    exe = tool("prometheus-pushgateway", "prometheus-pushgateway")
    port = free_port()
    with serving([exe, f"--web.listen-address=127.0.0.1:{port}",
                  f"--persistence.file={workdir / 'pushgateway.data'}", "--log.level=warn"],
                 f"http://127.0.0.1:{port}", workdir / "pushgateway.log") as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(gateway: str, workdir: Path) -> Iterator[str]:
    exe = tool("prometheus")
    target = gateway.removeprefix("http://")
    (workdir / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: pushgateway\n    honor_labels: true\n"
        f"    static_configs:\n      - targets: [\"{target}\"]\n")
    port = free_port()
    with serving([exe, f"--config.file={workdir / 'prometheus.yml'}",
                  f"--storage.tsdb.path={workdir / 'data'}",
                  f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                 f"http://127.0.0.1:{port}", workdir / "prometheus.log") as url:
        yield url


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    body = json.loads(get(f"{prometheus}/api/v1/query?"
                          + urllib.parse.urlencode({"query": expr})))
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def pushed_groups(gateway: str) -> dict[str, dict[str, Any]]:
    """The gateway's groups by their ``fleet`` label (its /api/v1/metrics)."""
    body = json.loads(get(f"{gateway}/api/v1/metrics"))
    return {g["labels"].get("fleet", ""): g for g in body["data"]}


def push_time(group: dict[str, Any]) -> float:
    return float(group["push_time_seconds"]["metrics"][0]["value"])


# -- the whole way: fleet -> Pushgateway -> Prometheus --------------------------------

def test_a_run_is_pushed_and_prometheus_scrapes_it(gateway: str, prometheus: str,
                                                   tmp_path: Path) -> None:
    """A run on the built-in simulator pushes to the gateway (with a user and password
    in the URL, which the gateway ignores and fleet never shows); Prometheus, scraping
    the gateway with honor_labels, has the run's clones under job and fleet."""
    url = gateway.replace("http://", f"http://fleet:{SECRET}@")
    run = run_fleet("provision", "--count", "3", "--name", "pushed", "--sim-time-scale",
                    "0.05", "--json", "--pushgateway", url, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["ready"] == 3
    port = gateway.rsplit(":", 1)[1]
    assert f"pushing metrics to http://***@127.0.0.1:{port} (job=fleet, fleet=pushed)" \
        in run.stderr
    assert not re.search("cannot push|not pushed", run.stderr), run.stderr
    assert SECRET not in run.stdout + run.stderr

    expr = 'fleet_clones_total{job="fleet",fleet="pushed",outcome="ready"}'
    deadline = time.monotonic() + 60  # the target reaches the scraper within ~5 s
    while not (result := query(prometheus, expr)):
        assert time.monotonic() < deadline, "prometheus never scraped the pushed run"
        time.sleep(0.2)
    (series,) = result
    assert series["value"][1] == "3"
    assert series["metric"]["job"] == "fleet" and series["metric"]["fleet"] == "pushed"
    (up,) = query(prometheus, 'up{job="pushgateway"}')
    assert up["value"][1] == "1"


# -- at the end however the run ends ---------------------------------------------------

@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(time_scale=0.05) as proc:
        yield proc


def test_a_failed_run_pushes_its_metrics_too(gateway: str, sim: SimProcess,
                                             tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "fleet.toml", sim, "pushfail", 3)
    spec.write_text(spec.read_text().replace('"frozen-03"', '"no-such-vm"'))
    run = run_fleet("provision", "--spec", str(spec), "--pushgateway", gateway)
    assert run.returncode == 2, run.stderr
    assert "no-such-vm" in run.stderr
    group = pushed_groups(gateway)["pushfail"]
    assert group["labels"] == {"job": "fleet", "fleet": "pushfail"}
    assert "fleet_build_info" in group


def test_a_cancelled_run_pushes_its_metrics_at_the_end(gateway: str, sim: SimProcess,
                                                       tmp_path: Path) -> None:
    """SIGTERM mid-run: the run stops within its grace and cleanup, and its last push
    comes after the signal (a periodic push every 5 s could not be told apart from
    it but by its time)."""
    quick = {"network": {"refresh": "none", "disconnect_at_clone": False},
             "readiness": {"wait_for": "none"}}
    sim.add_faults({"method": "InstantClone_Task", "fault": "slow", "delay_s": 3600})
    try:
        spec = write_spec(tmp_path / "fleet.toml", sim, "pushcancel", 4, **quick,
                          timeouts={"cleanup_s": 3.0, "cancel_grace_s": 1.0})
        before = sim.stats()["calls_by_method"].get("InstantClone_Task", 0)
        signalled: list[float] = []

        def started(calls: dict[str, int]) -> bool:
            if calls.get("InstantClone_Task", 0) - before < 4:
                return False
            signalled.append(time.time())
            return True

        rc, out, err = sigterm_provision(sim, spec, "--pushgateway", gateway,
                                         "--log-level", "info", bound_s=60, when=started)
    finally:
        sim.clear_faults()
    assert rc == 130, err[-3000:]
    assert json.loads(out)["cancelled"] is True
    assert not re.search("cannot push|not pushed", err), err[-3000:]
    # The final push, after the signal was taken, and the gateway has it.
    stopping = err.index("SIGTERM: stopping")
    assert err.find("pushed the run's final metrics to", stopping) > 0, err[-3000:]
    group = pushed_groups(gateway)["pushcancel"]
    assert push_time(group) >= signalled[0]


# -- the URL ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "url", "user", "password"), [
    ("http://127.0.0.1:9091", "http://127.0.0.1:9091", None, None),
    ("https://gw.example:9091/push/", "https://gw.example:9091/push", None, None),
    ("http://ci:p%40ss@[::1]:9091", "http://[::1]:9091", "ci", "p@ss"),
    ("http://ci:pa@ss/w@127.0.0.1:9091", None, None, None),  # "/" must be escaped
    ("http://ci:pa?ss@127.0.0.1:9091", None, None, None),  # and "?"
    ("http://token@127.0.0.1:9091", "http://127.0.0.1:9091", "token", ""),
])
def test_gateway_urls(text: str, url: str | None, user: str | None,
                      password: str | None) -> None:
    if url is None:
        with pytest.raises(ConfigError) as info:
            parse_gateway(text)
        assert "pa@ss" not in str(info.value) and "pa?ss" not in str(info.value)
        assert "%2F" in str(info.value) or "%3F" in str(info.value)
        return
    gw = parse_gateway(text)
    assert (gw.url, gw.username, gw.password) == (url, user, password)
    assert (password or "%40") not in gw.shown and "@" not in gw.url
    assert not password or password not in repr(gw)


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9091", "is not an http(s) URL like http://127.0.0.1:9091"),
    ("http://127.0.0.1:9091/?job=x", "has a query or fragment"),
    ("http://:pw@127.0.0.1:9091", "has user info without a user name"),
    ("http://127.0.0.1:0", "its port is not a number from 1 to 65535"),
    ("http://gw example", "whitespace"),
])
def test_bad_gateway_urls_name_the_flag(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_gateway(text)
    assert str(info.value).startswith("--pushgateway: ")
    assert expected in str(info.value)


@given(st.text(st.characters(codec="utf-8", exclude_characters="@"), min_size=6),
       st.text(min_size=0, max_size=30))
def test_a_password_never_shows_in_what_the_url_check_says(password: str,
                                                           rest: str) -> None:
    assume(all(password not in shown for shown in (f"http://***@{rest}", f"http://{rest}")))
    text = f"http://user:{password}@{rest}"
    try:
        gw = parse_gateway(text)
    except ConfigError as exc:
        assert password not in str(exc)
    else:
        assert password not in gw.shown + gw.url


# -- pushing, against a gateway of the test's own ---------------------------------------

class Recorder(http.server.BaseHTTPRequestHandler):
    """A gateway that keeps what it was sent and answers ``status``."""

    status = 200
    requests: list[tuple[str, str, str | None, bytes]] = []
    arrived: queue.Queue[bytes]

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append(("PUT", self.path, self.headers.get("Authorization"), body))
        self.arrived.put(body)
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def recorder(status: int = 200) -> Iterator[tuple[str, type[Recorder]]]:
    handler = type("R", (Recorder,), {"status": status, "requests": [],
                                      "arrived": queue.Queue()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


async def next_push(seen: type[Recorder], holding: bytes = b"") -> None:
    """Wait (30 s at most) for a push whose body holds ``holding``."""
    while holding not in await anyio.to_thread.run_sync(seen.arrived.get, True, 30.0):
        pass


def counter_registry() -> tuple[CollectorRegistry, Counter]:
    registry = CollectorRegistry()
    return registry, Counter("fleet_test_pushes", "pushed by the test", registry=registry)


@pytest.mark.anyio
async def test_pushes_every_interval_with_basic_auth() -> None:
    registry, count = counter_registry()
    warnings: list[str] = []
    with recorder() as (url, seen):
        gw = parse_gateway(url.replace("http://", f"http://ci:{SECRET}@") + "/prefix")
        pusher = Pusher(gw, registry, {"fleet": "f1"}, warn=warnings.append,
                        interval_s=0.01)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pusher.run)
            count.inc()
            await next_push(seen, b"fleet_test_pushes_total 1.0")
            count.inc()
            await next_push(seen, b"fleet_test_pushes_total 2.0")
            tg.cancel_scope.cancel()
        await pusher.push_final()
    assert not warnings
    methods = {(m, path) for m, path, _, _ in seen.requests}
    assert methods == {("PUT", "/prefix/metrics/job/fleet/fleet/f1")}
    token = base64.b64encode(f"ci:{SECRET}".encode()).decode()
    assert {auth for _, _, auth, _ in seen.requests} == {f"Basic {token}"}
    assert b"fleet_test_pushes_total 2.0" in seen.requests[-1][3]


@pytest.mark.anyio
async def test_a_refusing_gateway_is_one_warning_not_a_failure() -> None:
    registry, _ = counter_registry()
    warnings: list[str] = []
    with recorder(status=401) as (url, seen):
        gw = parse_gateway(url.replace("http://", f"http://ci:{SECRET}@"))
        pusher = Pusher(gw, registry, {"fleet": "f2"}, warn=warnings.append,
                        interval_s=0.01)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pusher.run)
            for _ in range(3):
                await next_push(seen)
            tg.cancel_scope.cancel()
        await pusher.push_final()
    port = url.rsplit(":", 1)[1]
    assert warnings == [
        f"warning: cannot push metrics to http://***@127.0.0.1:{port}: it answered HTTP 401 "
        "Unauthorized; the run goes on (trying again every 0.01 s)",
        f"warning: the run's metrics were not pushed to http://***@127.0.0.1:{port}: "
        "it answered HTTP 401 Unauthorized"]
    assert pusher.pushed == 0


@pytest.mark.anyio
async def test_a_gateway_that_never_answers_never_holds_up_the_end() -> None:
    """It takes the connection and then says nothing: the final push gives up at its
    timeout with a warning."""
    registry, _ = counter_registry()
    warnings: list[str] = []
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepted by the kernel, never answered
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        pusher = Pusher(Gateway(url, url), registry, {"fleet": "f3"}, warn=warnings.append,
                        timeout_s=0.2)
        with anyio.fail_after(60):  # the bound is the test, not its size
            await pusher.push_final()
    assert warnings == [f"warning: the run's metrics were not pushed to {url}: "
                        "no answer within 0.2 s"]


def test_an_unreachable_gateway_is_a_warning_and_the_run_succeeds(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    run = run_fleet("provision", "--count", "2", "--sim-time-scale", "0.05", "--json",
                    "--pushgateway", f"http://ci:{SECRET}@127.0.0.1:{port}",
                    cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["ready"] == 2
    assert re.search(rf"warning: the run's metrics were not pushed to "
                     rf"http://\*\*\*@127\.0\.0\.1:{port}: Connection refused", run.stderr)
    assert SECRET not in run.stdout + run.stderr
