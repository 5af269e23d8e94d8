"""The monitoring assets against the real thing: Prometheus scraping ``fleet serve``.

A real Prometheus (Debian's package ``prometheus``) runs on a free loopback port with the
project's own scrape config and alert rules, only the target and the intervals
rewritten. A burst goes through ``fleet serve`` against the simulator, beside a fleet
whose clone tasks end in an injected ``FileNotFound`` (built, then grown) and a fleet
deleted while its clones run; then, through Prometheus's HTTP API: the dashboard's ``job`` and
``instance`` variables find the service, every Grafana panel's query (with the
variables, ``$__rate_interval`` and ``$__range`` substituted as Grafana would) returns
data, or its panel says what it shows until then (``noValue``); the task faults are in
``fleet_vsphere_faults_total`` by type; and the failure-ratio alert is pending for the
faulty fleet alone, never for the cancelled one. ``promtool`` checks the shipped config
and rules, and runs the rules' unit tests.

The service runs no warm pool here, so the "Pools" row shows its ``noValue`` texts; its
queries are evaluated by ``promtool`` instead, over series that ``FleetMetrics`` exports
for a serving and a standby instance of one pool.

On a machine without the package these tests skip, naming it; ``.ci/run``
installs it and sets ``FLEET_REQUIRE_PROMETHEUS=1``, under which a missing
binary is a failure, so CI never skips them.
"""

from __future__ import annotations

import json
import os
import re
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
import yaml

from tests.api.serveproc import ServeProcess, service_config
from tests.simproc import SimProcess

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "config" / "prometheus"
DASHBOARD = ROOT / "config" / "grafana" / "fleet-dashboard.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
# A scrape times out after one interval: 1 s leaves room on a loaded 2-core machine.
SCRAPE_S = 1.0
RATE_INTERVAL = f"{int(4 * SCRAPE_S * 1000)}ms"  # Grafana: at least 4 scrape intervals
PHASES = "clone|network"  # a multi-value $phase, as Grafana renders it for a regex
POOLS = ".*"  # $pool at "All": the variable's allValue
JOB = "fleet"  # prometheus.yml's job_name


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


def board() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panels() -> list[dict[str, Any]]:
    """Every panel that shows data (rows only group them)."""
    return [p for p in board()["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, panel type, expr) of every target of every panel."""
    return [(p["title"], p["type"], t["expr"]) for p in panels() for t in p.get("targets", [])]


def no_value(panel: dict[str, Any]) -> str | None:
    """What the panel says while its queries return nothing (Grafana's noValue)."""
    return panel.get("fieldConfig", {}).get("defaults", {}).get("noValue")  # type: ignore[no-any-return]


def regex_value(value: str) -> str:
    """A selected variable value inside ``=~"..."``, as Grafana writes it: regex-escaped,
    then each backslash doubled for the PromQL string."""
    return re.escape(value).replace("\\", "\\\\")


def grafana_substitute(expr: str, range_s: int, instance: str) -> str:
    """``expr`` as Grafana sends it, with job ``fleet`` and ``instance`` selected."""
    return (expr.replace("$__rate_interval", RATE_INTERVAL)
            .replace("$__range", f"{range_s}s")
            .replace("$phase", PHASES)
            .replace("$pool", POOLS)
            .replace("$job", regex_value(JOB))
            .replace("$instance", regex_value(instance)))


def row_panels(title: str) -> list[dict[str, Any]]:
    """The panels under the row called ``title``, up to the next row."""
    out: list[dict[str, Any]] = []
    inside = False
    for panel in board()["panels"]:
        if panel["type"] == "row":
            inside = panel["title"] == title
        elif inside:
            out.append(panel)
    return out


def alert_rules() -> dict[str, dict[str, Any]]:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return {r["alert"]: r for g in rules["groups"] for r in g["rules"]}


# -- the shipped files, without Prometheus ---------------------------------------------

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


def test_every_panel_has_a_unit_and_selects_the_chosen_job_and_instance() -> None:
    names = [v["name"] for v in board()["templating"]["list"]]
    assert {"job", "instance"} <= set(names), names
    for panel in panels():
        assert panel.get("fieldConfig", {}).get("defaults", {}).get("unit"), panel["title"]
        for target in panel["targets"]:
            # Every selector of a fleet metric names the variables.
            for selector in re.findall(r"fleet_\w+(\{[^}]*\})?", target["expr"]):
                assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, \
                    (panel["title"], target["expr"])


def test_every_alert_aggregates_by_instance_and_has_a_runbook_section() -> None:
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), re.M)}
    for name, rule in alert_rules().items():
        url = rule["annotations"]["runbook_url"]
        assert url == f"docs/runbook.md#{name.lower()}", (name, url)
        assert name.lower() in headings, (name, sorted(headings))
        for by in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", rule["expr"]):
            assert {"job", "instance"} <= {w.strip() for w in by.split(",")}, (name, by)
        assert not re.search(r"\bsum\s*\(", rule["expr"]), (name, "a sum over instances")


POOL_METRICS = ("fleet_pool_", "fleet_lease")


def test_the_pools_row_selects_the_chosen_pool_and_shows_every_pool_metric() -> None:
    from fleet.metrics import FleetMetrics

    variables = {v["name"]: v for v in board()["templating"]["list"]}
    assert variables["pool"]["definition"] == (
        'label_values(fleet_pool_members{job=~"$job", instance=~"$instance"}, pool)')
    assert variables["pool"]["allValue"] == POOLS
    pool_panels = row_panels("Pools")
    assert pool_panels
    shown: set[str] = set()
    for panel in pool_panels:
        # No pool (fleet provision, a service without one): the panel says so.
        assert no_value(panel), panel["title"]
        for target in panel["targets"]:
            for name, selector in re.findall(r"(fleet_\w+)(\{[^}]*\})", target["expr"]):
                assert name.startswith(POOL_METRICS), (panel["title"], name)
                assert 'pool=~"$pool"' in selector, (panel["title"], target["expr"])
                shown.add(name.removesuffix("_bucket").removesuffix("_total"))
    families = {f.name for f in FleetMetrics().registry.collect()
                if f.name.startswith(POOL_METRICS)}
    assert families <= shown, families - shown
    # No other row asks for pool metrics.
    for panel in panels():
        if panel not in pool_panels:
            assert not any(m in t["expr"] for t in panel["targets"] for m in POOL_METRICS), \
                panel["title"]


def _labels(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _pool_series(instance: str, serving: bool) -> list[dict[str, str]]:
    """promtool input series of one instance's pool ``ci``, from what FleetMetrics exports:
    gauges hold their value for 10 minutes, counters and histograms grow by theirs each
    minute."""
    from fleet.metrics import FleetMetrics

    m = FleetMetrics()
    if serving:
        m.set_pool_members("ci", {"idle": 2, "leased": 3, "refilling": 1, "recycling": 1})
        m.leases_waiting("ci", 1)
        for outcome in ("granted", "granted", "granted", "returned", "returned"):
            m.count_lease("ci", outcome, "ci-bot")
        m.count_lease_refused("ci", "at_max", "ci-bot")
        m.observe_lease_wait("ci", 0.02)
        m.observe_refill("ci", 4.0)
    else:  # a standby's own view of the pool, never shown as the pool's state
        m.set_pool_members("ci", {"idle": 5, "doubt": 6})
        m.count_lease_refused("ci", "not_serving", "ci-bot")
    m.set_pool_target("ci", 2, 8)
    m.set_pool_serving("ci", serving)
    out = []
    for family in m.registry.collect():
        for s in family.samples:
            if "pool" in s.labels:
                labels = {**s.labels, "job": JOB, "instance": instance}
                grows = family.type in ("counter", "histogram")
                out.append({"series": s.name + _labels(labels),
                            "values": f"0+{s.value:g}x10" if grows else f"{s.value:g}x10"})
    return out


def test_the_pools_row_shows_the_serving_instances_pool(tmp_path: Path) -> None:
    """Every query of the "Pools" row, as Grafana sends it (all instances, all pools),
    over a serving instance a and a standby b of pool ci: the members are a's alone, the
    lease and refusal rates count both, the percentiles are a's observations."""
    promtool = tool("promtool")
    per_min = 1 / 60
    pool = {"pool": "ci"}
    expected: dict[str, dict[str, list[tuple[dict[str, str], float]]]] = {
        "Pool members by state": {
            "A": [({**pool, "state": "idle"}, 2), ({**pool, "state": "leased"}, 3),
                  ({**pool, "state": "refilling"}, 1)],
            "B": [(pool, 2)]},
        # The one lease waited 0.02 s: in the (0.01, 0.025] bucket, interpolated.
        "Lease wait (p50 / p99)": {"A": [(pool, 0.0175)], "B": [(pool, 0.02485)]},
        "Leases per second by outcome": {
            "A": [({**pool, "outcome": "granted"}, 3 * per_min),
                  ({**pool, "outcome": "returned"}, 2 * per_min),
                  ({**pool, "outcome": "expired"}, 0),
                  ({**pool, "outcome": "refused"}, 2 * per_min)]},
        # The one refill took 4 s: in the (3, 5] bucket.
        "Refill time (p50 / p99)": {"A": [(pool, 4.0)], "B": [(pool, 4.98)]},
        "Lease requests waiting": {"A": [(pool, 1)]},
        "Lease refusals by reason": {
            "A": [({**pool, "reason": "at_max"}, per_min),
                  ({**pool, "reason": "not_serving"}, per_min)]},
        "Members recycling or in doubt": {
            "A": [({**pool, "state": "recycling"}, 1), ({**pool, "state": "doubt"}, 0)]},
        "Serving instance per pool": {
            "A": [({**pool, "instance": "a:8080"}, 1), ({**pool, "instance": "b:8080"}, 0)]},
    }
    pool_panels = row_panels("Pools")
    assert {p["title"] for p in pool_panels} == set(expected)
    tests = []
    for panel in pool_panels:
        for target in panel["targets"]:
            expr = grafana_substitute(target["expr"].replace("$instance", ".*")
                                      .replace("$__rate_interval", "5m"), 600, "")
            exp = expected[panel["title"]][target["refId"]]
            # promtool compares values exactly: both sides in millionths, as integers.
            tests.append({"expr": f"round(({expr}) * 1e6)", "eval_time": "10m",
                          "exp_samples": [{"labels": _labels(labels), "value": round(value * 1e6)}
                                          for labels, value in exp]})
    (tmp_path / "pools_test.yml").write_text(yaml.safe_dump({
        "rule_files": [], "evaluation_interval": "1m",
        "tests": [{"interval": "1m",
                   "input_series": _pool_series("a:8080", True) + _pool_series("b:8080", False),
                   "promql_expr_test": tests}]}))
    out = subprocess.run([promtool, "test", "rules", str(tmp_path / "pools_test.yml")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


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


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    body = get_json(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]  # type: ignore[no-any-return]


def until(prom: str, expr: str, at_least: float, timeout_s: float = 60.0) -> None:
    """Wait until Prometheus has scraped ``expr`` (one series) to ``at_least``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = query(prom, expr)
        if got and float(got[0]["value"][1]) >= at_least:
            return
        assert time.monotonic() < deadline, (expr, got, at_least)
        time.sleep(SCRAPE_S / 4)


def pending_or_firing(prom: str) -> list[tuple[str, str, dict[str, str]]]:
    """(alert name, state, labels) of every active alert."""
    groups = get_json(f"{prom}/api/v1/rules")["data"]["groups"]
    return [(r["name"], a["state"], a["labels"]) for g in groups for r in g["rules"]
            for a in r.get("alerts", [])]


def test_dashboard_queries_and_alerts_through_a_burst_with_faults_and_a_cancellation(
        stack: tuple[SimProcess, ServeProcess, str]) -> None:
    sim, service, prom = stack
    instance = f"127.0.0.1:{service.port}"
    # The fault fleet: every clone task ends in FileNotFound (the submit succeeds). The
    # cancelled fleet: its clones run for 10 s at vCenter, and it is deleted meanwhile
    # (past the service's 2 s cancel grace, fleet cancels the tasks).
    sim.add_faults({"method": "InstantClone_Task", "object": "promfault-*",
                    "fault": "FileNotFound", "phase": "task"},
                   {"method": "InstantClone_Task", "object": "promcancel-*",
                    "fault": "slow", "delay_s": 200.0})
    t0 = time.time()
    for name, count in (("promburst", 150), ("promsmall", 8), ("promfault", 6),
                        ("promcancel", 12)):
        status, _ = service.call("POST", "/v1/fleets", {"name": name, "count": count})
        assert status == 202
    deadline = time.monotonic() + 60
    while service.fleet("promcancel")["by_state"].get("cloning", 0) == 0:
        assert time.monotonic() < deadline, service.fleet("promcancel")
        time.sleep(0.05)
    assert service.call("DELETE", "/v1/fleets/promcancel")[0] == 202
    # Prometheus takes a counter's first sample as its start: failures that come before
    # their series' first scrape are in the counter but not in its rate. Once they are
    # scraped, the fault fleet is grown (a new run, whose clones fail too), so the rate
    # panels see failures and faults arrive.
    until(prom, 'sum(fleet_clone_failures_total{reason="fault"})', 6)
    status, body = service.call("PATCH", "/v1/fleets/promfault", {"count": 8})
    assert status == 202, body
    until(prom, 'sum(fleet_clone_failures_total{reason="fault"})', 6 + 8)
    service.wait_for("promburst", timeout_s=60)
    service.wait_for("promsmall", timeout_s=60)
    service.wait_for("promcancel", ("gone",), timeout_s=60)
    # The alert's condition holds once Prometheus has two scrapes of the fault fleet's
    # failures; it stays pending (for: 5m) for as long as this test runs.
    deadline = time.monotonic() + 30
    while not any(name == "FleetCloneFailureRatioHigh" for name, _, _ in
                  pending_or_firing(prom)):
        assert time.monotonic() < deadline, "the failure-ratio alert never became pending"
        time.sleep(SCRAPE_S / 2)
    time.sleep(2 * SCRAPE_S)  # a few more scrapes of the end state
    end = time.time()
    range_s = int(end - t0) + 1

    targets = get_json(f"{prom}/api/v1/targets")["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets

    # The dashboard's variables find the service (Grafana's label_values(metric, label)).
    # The service has no warm pool: the pool variable's query only has to be answered.
    found = {"job": JOB, "instance": instance}
    for variable in board()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        got = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert got, variable["definition"]
        match = grafana_substitute(got.group(1), range_s, instance)
        body = get_json(f"{prom}/api/v1/label/{got.group(2)}/values?"
                        + urllib.parse.urlencode({"match[]": match}))
        assert body["status"] == "success", (variable["name"], body)
        if variable["name"] != "pool":
            assert found[variable["name"]] in body["data"], body

    # Every panel's queries evaluate; each panel shows data, or says what it waits for.
    results: dict[str, list[Any]] = {}
    for panel in panels():
        shown = False
        for target in panel["targets"]:
            expr = target["expr"]
            params = urllib.parse.urlencode({
                "query": grafana_substitute(expr, range_s, instance), "start": f"{t0 - 5:.3f}",
                "end": f"{end:.3f}", "step": f"{SCRAPE_S}"})
            body = get_json(f"{prom}/api/v1/query_range?{params}")
            assert body["status"] == "success", (panel["title"], expr, body)
            results[expr] = body["data"]["result"]
            shown = shown or bool(results[expr])
        assert shown or no_value(panel), f"panel {panel['title']!r} is empty and says nothing"

    def values(expr_part: str) -> list[float]:
        out: list[float] = []
        for expr, series in results.items():
            if expr_part in expr:
                out.extend(float(v) for s in series for _, v in s["values"]
                           if v not in ("NaN", "+Inf", "-Inf"))
        return out

    # Throughput: clones per second rose above zero during the burst.
    assert max(values('outcome="ready"}[')) > 0
    assert max(values('outcome="cancelled"}[')) > 0
    assert max(values("fleet_clone_attempts_total{")) > 0
    # Latency: per-phase percentiles, end-to-end time, the heatmap, vSphere calls.
    assert values("fleet_clone_phase_duration_seconds_bucket{")
    assert values('phase=~"$phase"')
    assert values("fleet_clone_duration_seconds_bucket{")
    assert values("fleet_vsphere_request_duration_seconds_bucket{")
    # Failures and faults: the panels that are empty on a clean run show the task faults.
    assert max(values("fleet_clone_failures_total{")) > 0
    assert max(values("fleet_vsphere_faults_total{")) > 0
    # The service's own panels.
    assert max(values("sum by (fleet, state) (fleet_members{")) >= 80
    assert values("fleet_api_requests_total{")
    assert values("fleet_api_request_duration_seconds_bucket{")
    # In flight per host: a gauge of instants (clone tasks last ~50 ms at this time
    # scale), so a scrape may see 0; its series must be there.
    assert values("fleet_clones_in_flight{")

    # The task faults, by type and method; failures name their fault; the cancelled
    # fleet's clones are cancelled, none failed.
    faults = {(s["metric"]["fault"], s["metric"]["method"], s["metric"]["stage"]):
              float(s["value"][1])
              for s in query(prom, "sum by (fault, method, stage) (fleet_vsphere_faults_total)")}
    assert faults.get(("FileNotFound", "InstantClone_Task", "task"), 0) >= 14, faults
    failures = {(s["metric"].get("reason"), s["metric"].get("fault")): float(s["value"][1])
                for s in query(prom, "sum by (reason, fault) (fleet_clone_failures_total)")}
    assert set(failures) == {("fault", "FileNotFound")}, failures
    outcomes = {s["metric"]["outcome"]: float(s["value"][1]) for s in query(
        prom, 'fleet_clones_total{fleet="promcancel"}')}
    assert outcomes["cancelled"] > 0 and outcomes["failed"] == 0, outcomes

    # The failure ratio alerts for the fault fleet, on this instance, and for nothing
    # else: not the cancelled fleet, not the healthy ones. Nothing has fired (for: 5m).
    # The latency alert says how fast vCenter answered, which a loaded test machine
    # decides: it may be pending too, and is no answer to faults or a cancellation.
    active = pending_or_firing(prom)
    assert [(name, state, labels.get("fleet"), labels.get("instance"))
            for name, state, labels in active if name != "FleetVSphereLatencyHigh"] == [
        ("FleetCloneFailureRatioHigh", "pending", "promfault", instance)], active
    rules = [r for g in get_json(f"{prom}/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    assert len(rules) == len(alert_rules()) and all(r["health"] == "ok" for r in rules), rules
