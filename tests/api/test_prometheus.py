"""The monitoring assets against the real thing: Prometheus scraping ``fleet serve``.

A real Prometheus (Debian's package ``prometheus``) runs on a free loopback port with the
project's own scrape config and alert rules, only the target and the intervals
rewritten. A burst goes through ``fleet serve`` against the simulator; then,
through Prometheus's HTTP API, every Grafana panel's query (with ``$phase``,
``$__rate_interval`` and ``$__range`` substituted as Grafana would) evaluates
without error, and the throughput and latency panels return data. ``promtool``
checks the shipped config and rules, and runs the rules' unit tests.

On a machine without the package these tests skip, naming it; ``.ci/run``
installs it and sets ``FLEET_REQUIRE_PROMETHEUS=1``, under which a missing
binary is a failure, so CI never skips them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.serveproc import ServeProcess, service_config
from tests.simproc import SimProcess

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "config" / "prometheus"
DASHBOARD = ROOT / "config" / "grafana" / "fleet-dashboard.json"
# A scrape times out after one interval: 1 s leaves room on a loaded 2-core machine.
SCRAPE_S = 1.0
RATE_INTERVAL = f"{int(4 * SCRAPE_S * 1000)}ms"  # Grafana: at least 4 scrape intervals
PHASES = "clone|network"  # a multi-value $phase, as Grafana renders it for a regex


def tool(name: str, package: str = "prometheus") -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).exists():
        why = (f"{name} is not installed: Debian's package {package} provides it "
               f"(apt-get install {package}; .ci/run does)")
        if os.environ.get("FLEET_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(why + "; FLEET_REQUIRE_PROMETHEUS=1 forbids skipping")
        pytest.skip(why)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout_s: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, panel type, expr) of every target of every panel."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], panel["type"], target["expr"]))
    return out


def grafana_substitute(expr: str, range_s: int) -> str:
    return (expr.replace("$__rate_interval", RATE_INTERVAL)
            .replace("$__range", f"{range_s}s")
            .replace("$phase", PHASES))


# -- promtool on the shipped files -------------------------------------------------------

def test_promtool_checks_the_shipped_config_and_rules() -> None:
    promtool = tool("promtool")
    for args in (["check", "config", str(PROM_DIR / "prometheus.yml")],
                 ["check", "rules", str(PROM_DIR / "alerts.yml")],
                 ["test", "rules", str(PROM_DIR / "alerts_test.yml")]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        assert "SUCCESS" in out.stdout + out.stderr


def test_every_dashboard_query_names_only_metrics_fleet_exports() -> None:
    from fleet.metrics import FleetMetrics

    exported = {m.name for m in FleetMetrics().registry.collect()}
    # Histograms' and counters' series names come from their family name.
    for title, _, expr in dashboard_queries():
        names = {tok for tok in _tokens(expr) if tok.startswith("fleet_")}
        assert names, (title, expr)
        for name in names:
            family = name.removesuffix("_bucket").removesuffix("_total") \
                .removesuffix("_count").removesuffix("_sum")
            assert family in exported or name in exported, (title, name)


def _tokens(expr: str) -> list[str]:
    word, out = "", []
    for ch in expr + " ":
        if ch.isalnum() or ch == "_":
            word += ch
        else:
            if word:
                out.append(word)
            word = ""
    return out


# -- the real thing ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[SimProcess, ServeProcess, str]]:
    prometheus = tool("prometheus")
    with tempfile.TemporaryDirectory(prefix="fleet-prom-") as tmp, \
            SimProcess(time_scale=0.05) as sim:
        work = Path(tmp)
        with ServeProcess(service_config(sim, work / "state")) as service:
            config = (PROM_DIR / "prometheus.yml").read_text()
            for old, new in (('["127.0.0.1:8080"]', f'["127.0.0.1:{service.port}"]'),
                             ("scrape_interval: 5s", f"scrape_interval: {int(SCRAPE_S * 1000)}ms"),
                             ("evaluation_interval: 15s", "evaluation_interval: 1s")):
                assert old in config, f"prometheus.yml no longer has {old!r}"
                config = config.replace(old, new)
            (work / "prometheus.yml").write_text(config)
            shutil.copy(PROM_DIR / "alerts.yml", work / "alerts.yml")
            port = free_port()
            log = (work / "prometheus.log").open("wb")
            proc = subprocess.Popen(
                [prometheus, f"--config.file={work / 'prometheus.yml'}",
                 f"--storage.tsdb.path={work / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        with urllib.request.urlopen(f"{url}/-/ready", timeout=2):
                            break
                    except OSError:
                        if time.monotonic() > deadline or proc.poll() is not None:
                            raise AssertionError("prometheus did not start: " + (
                                work / "prometheus.log").read_text()[-2000:]) from None
                        time.sleep(0.1)
                # Static targets reach the scrape manager after a discovery update (up
                # to 5 s); start the burst only once our target is being scraped.
                deadline = time.monotonic() + 30
                while not get_json(f"{url}/api/v1/query?query=fleet_build_info")["data"][
                        "result"]:
                    assert time.monotonic() < deadline, "prometheus never scraped fleet"
                    time.sleep(0.1)
                yield sim, service, url
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()


def test_dashboard_queries_evaluate_and_show_the_burst(
        stack: tuple[SimProcess, ServeProcess, str]) -> None:
    _, service, prom = stack
    t0 = time.time()
    for name, count in (("promburst", 150), ("promsmall", 8)):
        status, _ = service.call("POST", "/v1/fleets", {"name": name, "count": count})
        assert status == 202
    service.wait_for("promburst", timeout_s=60)
    service.wait_for("promsmall", timeout_s=60)
    # Let Prometheus scrape the end state a few times.
    time.sleep(3 * SCRAPE_S)
    end = time.time()
    range_s = int(end - t0) + 1

    targets = get_json(f"{prom}/api/v1/targets")["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets

    results: dict[str, list[Any]] = {}
    for title, _, expr in dashboard_queries():
        query = grafana_substitute(expr, range_s)
        params = urllib.parse.urlencode({"query": query, "start": f"{t0 - 5:.3f}",
                                         "end": f"{end:.3f}", "step": f"{SCRAPE_S}"})
        body = get_json(f"{prom}/api/v1/query_range?{params}")
        assert body["status"] == "success", (title, query, body)
        results[expr] = body["data"]["result"]

    def values(expr_part: str) -> list[float]:
        out: list[float] = []
        for expr, series in results.items():
            if expr_part in expr:
                out.extend(float(v) for s in series for _, v in s["values"]
                           if v not in ("NaN", "+Inf", "-Inf"))
        return out

    # Throughput: clones per second rose above zero during the burst.
    assert max(values('fleet_clones_total{outcome="ready"}[')) > 0
    assert max(values("fleet_clone_attempts_total[")) > 0
    # Latency: per-phase percentiles, end-to-end time, the heatmap, vSphere calls.
    assert values("fleet_clone_phase_duration_seconds_bucket[")
    assert values('fleet_clone_phase_duration_seconds_bucket{phase=~')
    assert values("fleet_clone_duration_seconds_bucket[")
    assert values("fleet_vsphere_request_duration_seconds_bucket[")
    # The service's own panels.
    assert max(values("fleet_fleet_members")) >= 80
    assert values("fleet_api_requests_total[")
    assert values("fleet_api_request_duration_seconds_bucket[")
    # In flight per host: a gauge of instants (clone tasks last ~50 ms at this time
    # scale), so a scrape may see 0; its series must be there.
    assert values("fleet_clones_in_flight")

    rules = get_json(f"{prom}/api/v1/rules")["data"]["groups"]
    loaded = [r for g in rules for r in g["rules"]]
    assert len(loaded) == 5 and all(r["health"] == "ok" for r in loaded), loaded
    firing = [r["name"] for r in loaded if r["state"] == "firing"]
    assert not firing, firing  # a clean burst raises no alert
