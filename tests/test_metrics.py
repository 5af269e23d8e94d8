"""FleetMetrics turns engine events and client hooks into Prometheus samples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest

from fleet import metrics as metrics_module
from fleet.engine import events as ev
from fleet.engine.limits import LimiterStats
from fleet.metrics import (
    GONE_FLEET_HOLD_S,
    LEASE_OUTCOMES,
    POOL_STATES,
    REFUSAL_REASONS,
    FleetMetrics,
)

ROOT = Path(__file__).resolve().parents[1]


def sample(m: FleetMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def started(m: FleetMetrics, fleet: str = "f") -> None:
    m.on_event(ev.RunStarted(0.0, fleet=fleet, run_id="r", requested=2, to_create=2,
                             to_resume=0, to_remove=0, already_ready=0))


def test_known_labels_start_at_zero() -> None:
    m = FleetMetrics()
    assert sample(m, "fleet_clone_phase_duration_seconds_count", phase="clone") == 0
    assert sample(m, "fleet_queue_length") == 0
    assert sample(m, "fleet_runs_total", outcome="cancelled") == 0
    assert sample(m, "fleet_build_info", version=__import__("fleet").__version__,
                  python=__import__("platform").python_version()) == 1
    # A fleet's outcomes are there from its run's start, so rate() sees its first clones.
    assert sample(m, "fleet_clones_total", fleet="f", outcome="ready") is None
    started(m)
    for outcome in ("ready", "failed", "cancelled"):
        assert sample(m, "fleet_clones_total", fleet="f", outcome=outcome) == 0


def test_a_clone_life_cycle() -> None:
    m = FleetMetrics()
    started(m)
    m.on_event(ev.JobQueued(0.0, index=0, name="f-0", phase="clone"))
    m.on_event(ev.JobQueued(0.0, index=1, name="f-1", phase="clone"))
    assert sample(m, "fleet_queue_length") == 2
    m.on_event(ev.JobStarted(0.1, index=0, name="f-0", source="s1", host="esx-01", attempt=1))
    m.on_event(ev.JobStarted(0.1, index=1, name="f-1", source="s1", host="esx-01", attempt=1))
    assert sample(m, "fleet_queue_length") == 0
    assert sample(m, "fleet_clones_in_flight", host="esx-01") == 2
    m.on_event(ev.PhaseDone(1.1, index=0, name="f-0", phase="clone", duration_s=1.0))
    assert sample(m, "fleet_clones_in_flight", host="esx-01") == 1
    m.on_event(ev.JobRetried(1.2, index=1, name="f-1", phase="clone", attempt=1,
                             reason="busy", delay_s=0.5, message="x"))
    assert sample(m, "fleet_clones_in_flight", host="esx-01") == 0
    assert sample(m, "fleet_clone_retries_total", reason="busy") == 1
    m.on_event(ev.JobReady(2.0, index=0, name="f-0", source="s1", duration_s=2.0))
    m.on_event(ev.JobFailed(3.0, index=1, name="f-1", phase="clone", reason="chain_too_deep",
                            message="x", fault="GenericVmConfigFault"))
    assert sample(m, "fleet_clones_total", fleet="f", outcome="ready") == 1
    assert sample(m, "fleet_clones_total", fleet="f", outcome="failed") == 1
    assert sample(m, "fleet_clone_failures_total", reason="chain_too_deep",
                  fault="GenericVmConfigFault") == 1
    assert sample(m, "fleet_clone_phase_duration_seconds_count", phase="clone") == 1
    assert sample(m, "fleet_clone_phase_duration_seconds_bucket", phase="clone", le="1.0") == 1
    assert sample(m, "fleet_clone_phase_duration_seconds_bucket", phase="clone", le="0.75") == 0
    assert sample(m, "fleet_source_clones_total", source="s1") == 2
    assert sample(m, "fleet_clone_attempts_total") == 2
    m.on_event(ev.RunFinished(3.0, fleet="f", run_id="r", ready=1, failed=1, cancelled=False))
    assert sample(m, "fleet_runs_total", outcome="incomplete") == 1


def test_cancelled_work_is_its_own_outcome_never_a_failure() -> None:
    m = FleetMetrics()
    started(m)
    for index in range(3):
        m.on_event(ev.JobQueued(0.0, index=index, name=f"f-{index}", phase="clone"))
    m.on_event(ev.JobStarted(0.1, index=0, name="f-0", source="s1", host="esx-01", attempt=1))
    m.on_event(ev.JobFailed(0.2, index=0, name="f-0", phase="clone", reason="cancelled",
                            message="fleet deleted before it was ready", outcome="cancelled"))
    m.on_event(ev.JobFailed(0.2, index=1, name="f-1", phase="queue", reason="cancelled",
                            message="not started: fleet expired", outcome="cancelled"))
    m.on_event(ev.JobFailed(0.3, index=2, name="f-2", phase="queue", reason="queue_timeout",
                            message="no source"))
    assert sample(m, "fleet_clones_total", fleet="f", outcome="cancelled") == 2
    assert sample(m, "fleet_clones_total", fleet="f", outcome="failed") == 1
    assert sample(m, "fleet_clone_failures_total", reason="cancelled", fault="") is None
    assert sample(m, "fleet_clone_failures_total", reason="queue_timeout", fault="") == 1
    assert sample(m, "fleet_clones_in_flight", host="esx-01") == 0
    assert sample(m, "fleet_queue_length") == 0


def test_client_hooks_and_snapshots() -> None:
    m = FleetMetrics()
    m.observe_request("InstantClone_Task", 0.02)
    m.observe_request("InstantClone_Task", 0.03, fault="TaskInProgress")
    m.observe_task_fault("InstantClone_Task", "FileNotFound")
    m.observe_task_fault("InstantClone_Task", "FileNotFound")
    m.relogin()
    m.set_source("golden", 12, 188)
    m.set_source("frozen-01", 2, None)
    m.set_members("web", {"ready": 5, "cloned": 1})
    assert sample(m, "fleet_vsphere_request_duration_seconds_count",
                  method="InstantClone_Task") == 2
    assert sample(m, "fleet_vsphere_faults_total", fault="TaskInProgress",
                  method="InstantClone_Task", stage="call") == 1
    # A task's fault is no call: no latency sample, its own stage.
    assert sample(m, "fleet_vsphere_faults_total", fault="FileNotFound",
                  method="InstantClone_Task", stage="task") == 2
    assert sample(m, "fleet_vsphere_relogins_total") == 1
    assert sample(m, "fleet_source_clones_left", source="frozen-01") == -1
    assert sample(m, "fleet_source_chain_depth", source="golden") == 12
    assert sample(m, "fleet_members", fleet="web", state="network") == 0
    assert sample(m, "fleet_members", fleet="web", state="ready") == 5
    text = m.exposition().decode()
    assert "fleet_vsphere_request_duration_seconds_bucket" in text


def test_limits_name_their_kind_and_key_apart() -> None:
    m = FleetMetrics()
    m.on_event(ev.LimitChanged(1.0, limiter="host:esx-01", old=8, new=12, limiter_kind="host",
                               limiter_key="esx-01"))
    m.on_event(ev.LimitChanged(1.0, limiter="overall", old=64, new=32,
                               limiter_kind="overall", limiter_key=""))
    assert sample(m, "fleet_limit", kind="host", key="esx-01") == 12
    assert sample(m, "fleet_limit", kind="overall", key="") == 32
    # The service reads its shared limiters' statistics at scrape time.
    m.set_limits([LimiterStats("datastore:ds:1", "datastore", 6, 0, 0, True, 6),
                  LimiterStats("source:golden", "source", float("inf"), 0, 0, False, 1)])
    assert sample(m, "fleet_limit", kind="datastore", key="ds:1") == 6
    assert sample(m, "fleet_limit", kind="source", key="golden") is None  # unlimited
    assert 'limiter="' not in m.exposition().decode()


def test_no_created_series_in_any_registry() -> None:
    """``fleet_clones_created`` reads like a clone count: no ``_created`` series anywhere,
    in a scrape or in what is pushed (the registry itself)."""
    m = FleetMetrics()
    started(m)
    m.on_event(ev.JobReady(2.0, index=0, name="f-0", source="s1", duration_s=2.0))
    m.observe_api("/metrics", "GET", 200, 0.001)
    for text in (m.exposition().decode(), generate_latest(m.registry).decode(),
                 generate_latest(FleetMetrics().registry).decode()):
        assert "fleet_clones_total" in text
        assert "_created" not in text, [line for line in text.splitlines()
                                        if "_created" in line]


def test_registries_are_independent() -> None:
    a, b = FleetMetrics(), FleetMetrics()
    a.relogin()
    assert sample(b, "fleet_vsphere_relogins_total") == 0


def test_overlapping_runs_keep_their_jobs_apart() -> None:
    m = FleetMetrics()
    a, b = m.events_for("a"), m.events_for("b")
    a(ev.RunStarted(0.0, fleet="a", run_id="ra", requested=1, to_create=1, to_resume=0,
                    to_remove=0, already_ready=0))
    b(ev.RunStarted(0.0, fleet="b", run_id="rb", requested=1, to_create=1, to_resume=0,
                    to_remove=0, already_ready=0))
    # Same index in both fleets: two jobs, not one.
    a(ev.JobQueued(0.0, index=0, name="a-0", phase="clone"))
    b(ev.JobQueued(0.0, index=0, name="b-0", phase="clone"))
    assert sample(m, "fleet_queue_length") == 2
    a(ev.JobStarted(0.1, index=0, name="a-0", source="s", host="esx-01", attempt=1))
    b(ev.JobStarted(0.1, index=0, name="b-0", source="s", host="esx-01", attempt=1))
    assert sample(m, "fleet_clones_in_flight", host="esx-01") == 2
    a(ev.PhaseDone(1.0, index=0, name="a-0", phase="clone", duration_s=0.9))
    assert sample(m, "fleet_clones_in_flight", host="esx-01") == 1
    a(ev.JobReady(1.5, index=0, name="a-0", source="s", duration_s=1.5))
    b(ev.RunFinished(2.0, fleet="b", run_id="rb", ready=0, failed=1, cancelled=True))
    assert sample(m, "fleet_clones_in_flight", host="esx-01") == 0
    assert sample(m, "fleet_clones_total", fleet="a", outcome="ready") == 1
    assert sample(m, "fleet_clones_total", fleet="b", outcome="ready") == 0
    m.set_members("a", {"ready": 1})
    m.set_members("b", {"ready": 2})
    m.forget_fleet("b")
    assert sample(m, "fleet_members", fleet="a", state="ready") == 1
    assert sample(m, "fleet_members", fleet="b", state="ready") is None


def test_a_gone_fleets_outcomes_stay_a_while_then_go() -> None:
    m = FleetMetrics()
    now = [1000.0]
    m.clock = lambda: now[0]
    for fleet in ("gone", "back"):
        started(m, fleet)
        m.events_for(fleet)(ev.JobFailed(1.0, index=0, name=f"{fleet}-0", phase="clone",
                                         reason="fault", message="x", fault="FileNotFound"))
        m.set_members(fleet, {"ready": 0})
        m.forget_fleet(fleet)
        assert sample(m, "fleet_members", fleet=fleet, state="ready") is None
    started(m, "back")  # made again under the same name: its counters stay
    now[0] += GONE_FLEET_HOLD_S - 1
    m.drop_gone_fleets()
    assert sample(m, "fleet_clones_total", fleet="gone", outcome="failed") == 1
    now[0] += 2
    m.drop_gone_fleets()
    assert sample(m, "fleet_clones_total", fleet="gone", outcome="failed") is None
    assert 'fleet="gone"' not in m.exposition().decode()
    assert sample(m, "fleet_clones_total", fleet="back", outcome="failed") == 1
    # Gone and made again later: it counts from 0, as a restarted counter.
    started(m, "gone")
    assert sample(m, "fleet_clones_total", fleet="gone", outcome="failed") == 0


def test_api_and_service_numbers() -> None:
    m = FleetMetrics()
    m.observe_api("/v1/fleets/{name}", "GET", 404, 0.002)
    m.set_fleets({"ready": 2}, ["ready", "pending"])
    assert sample(m, "fleet_api_requests_total", route="/v1/fleets/{name}", method="GET",
                  code="404") == 1
    assert sample(m, "fleet_api_request_duration_seconds_count", route="/v1/fleets/{name}") == 1
    assert sample(m, "fleet_fleets", state="ready") == 2
    assert sample(m, "fleet_fleets", state="pending") == 0


# -- warm pools ---------------------------------------------------------------------------

def pool_series(m: FleetMetrics, pool: str) -> list[str]:
    """Every exposed sample line of ``pool``."""
    return [line for line in m.exposition().decode().splitlines()
            if not line.startswith("#") and f'pool="{pool}"' in line]


def test_no_pool_series_until_a_pool_is_reported() -> None:
    m = FleetMetrics()
    assert 'pool="' not in m.exposition().decode()
    m.set_pool_members("ci", {"idle": 3, "leased": 1})
    assert pool_series(m, "ci")
    assert 'pool="' not in "\n".join(line for line in m.exposition().decode().splitlines()
                                     if 'pool="ci"' not in line)


def test_every_member_state_is_exported_for_a_known_pool() -> None:
    m = FleetMetrics()
    m.set_pool_members("ci", {"idle": 3, "leased": 1})
    assert {s: sample(m, "fleet_pool_members", pool="ci", state=s) for s in POOL_STATES} == {
        "idle": 3, "leased": 1, "refilling": 0, "recycling": 0, "doubt": 0}
    # A state that empties goes to 0, not away (an alert asks for idle == 0).
    m.set_pool_members("ci", {"leased": 4, "doubt": 2})
    assert sample(m, "fleet_pool_members", pool="ci", state="idle") == 0
    assert sample(m, "fleet_pool_members", pool="ci", state="doubt") == 2
    # Its first report starts the waits, refills and waiting requests at 0.
    assert sample(m, "fleet_lease_wait_seconds_count", pool="ci") == 0
    assert sample(m, "fleet_pool_refill_seconds_count", pool="ci") == 0
    assert sample(m, "fleet_lease_waiting", pool="ci") == 0


def test_pool_inputs_out_of_their_sets_are_refused_naming_them() -> None:
    m = FleetMetrics()
    with pytest.raises(ValueError, match=r"pool 'ci': unknown member state\(s\) \['ready'\]"):
        m.set_pool_members("ci", {"ready": 1})
    with pytest.raises(ValueError, match="pool 'ci': members idle is -1"):
        m.set_pool_members("ci", {"idle": -1})
    with pytest.raises(ValueError, match="pool 'ci': max is -2"):
        m.set_pool_target("ci", 1, -2)
    with pytest.raises(ValueError, match="pool 'ci': waiting is -1"):
        m.leases_waiting("ci", -1)
    with pytest.raises(ValueError, match=r"'refused' .*count_lease_refused"):
        m.count_lease("ci", "refused", "ci-bot")
    with pytest.raises(ValueError, match="outcome 'lost'"):
        m.count_lease("ci", "lost", "ci-bot")
    with pytest.raises(ValueError, match="reason 'busy'"):
        m.count_lease_refused("ci", "busy", "ci-bot")
    assert pool_series(m, "ci") == []  # nothing half-set


def test_targets_serving_and_waiting_requests() -> None:
    m = FleetMetrics()
    m.set_pool_target("ci", 4, 10)
    m.set_pool_serving("ci", True)
    m.set_pool_serving("nightly", False)
    m.leases_waiting("ci", 3)
    assert sample(m, "fleet_pool_target", pool="ci", kind="ready") == 4
    assert sample(m, "fleet_pool_target", pool="ci", kind="max") == 10
    assert sample(m, "fleet_pool_serving", pool="ci") == 1
    assert sample(m, "fleet_pool_serving", pool="nightly") == 0
    assert sample(m, "fleet_lease_waiting", pool="ci") == 3
    m.set_pool_members("ci", {"idle": 1})  # the waiting count is the caller's, not reset
    assert sample(m, "fleet_lease_waiting", pool="ci") == 3
    m.leases_waiting("ci", 0)
    assert sample(m, "fleet_lease_waiting", pool="ci") == 0


def test_leases_by_outcome_and_refusals_by_reason() -> None:
    m = FleetMetrics()
    m.count_lease("ci", "granted", "ci-bot")
    m.count_lease("ci", "granted", "ci-bot")
    m.count_lease("ci", "returned", "ci-bot")
    m.count_lease("ci", "expired", "nightly")
    # A client's first lease of a pool starts its other outcomes at 0.
    assert {o: sample(m, "fleet_leases_total", pool="ci", outcome=o, client="ci-bot")
            for o in LEASE_OUTCOMES} == {"granted": 2, "returned": 1, "expired": 0,
                                         "refused": 0}
    assert sample(m, "fleet_leases_total", pool="ci", outcome="expired", client="nightly") == 1
    assert sample(m, "fleet_leases_total", pool="ci", outcome="granted", client="nightly") == 0
    for reason in REFUSAL_REASONS:
        m.count_lease_refused("ci", reason, "ci-bot")
    m.count_lease_refused("ci", "at_max", "ci-bot")
    assert sample(m, "fleet_lease_refusals_total", pool="ci", reason="at_max",
                  client="ci-bot") == 2
    assert sample(m, "fleet_lease_refusals_total", pool="ci", reason="quota",
                  client="ci-bot") == 1
    # outcome="refused" is the sum over reasons.
    assert sample(m, "fleet_leases_total", pool="ci", outcome="refused",
                  client="ci-bot") == len(REFUSAL_REASONS) + 1
    assert sample(m, "fleet_lease_refusals_total", pool="ci", reason="at_max",
                  client="nightly") is None


def test_lease_waits_and_refills_land_in_their_buckets() -> None:
    m = FleetMetrics()
    buckets = metrics_module.LEASE_WAIT_BUCKETS
    # An idle member's answer (tens of ms) and a wait for a refill (seconds to minutes)
    # are told apart.
    assert 0.05 in buckets and 0.01 in buckets and max(buckets) >= 300
    m.observe_lease_wait("ci", 0.02)
    m.observe_lease_wait("ci", 45.0)
    assert sample(m, "fleet_lease_wait_seconds_bucket", pool="ci", le="0.01") == 0
    assert sample(m, "fleet_lease_wait_seconds_bucket", pool="ci", le="0.025") == 1
    assert sample(m, "fleet_lease_wait_seconds_bucket", pool="ci", le="0.05") == 1
    assert sample(m, "fleet_lease_wait_seconds_bucket", pool="ci", le="30.0") == 1
    assert sample(m, "fleet_lease_wait_seconds_bucket", pool="ci", le="60.0") == 2
    assert sample(m, "fleet_lease_wait_seconds_sum", pool="ci") == pytest.approx(45.02)
    m.observe_refill("ci", 4.0)
    assert sample(m, "fleet_pool_refill_seconds_bucket", pool="ci", le="3.0") == 0
    assert sample(m, "fleet_pool_refill_seconds_bucket", pool="ci", le="5.0") == 1
    assert sample(m, "fleet_pool_refill_seconds_count", pool="ci") == 1


def test_forget_pool_removes_every_series_of_that_pool_only() -> None:
    m = FleetMetrics()
    for pool in ("ci", "nightly"):
        m.set_pool_members(pool, {"idle": 2})
        m.set_pool_target(pool, 2, 5)
        m.set_pool_serving(pool, True)
        m.leases_waiting(pool, 1)
        m.observe_lease_wait(pool, 0.01)
        m.observe_refill(pool, 2.0)
        m.count_lease(pool, "granted", "ci-bot")
        m.count_lease_refused(pool, "quota", "ci-bot")
    before = pool_series(m, "nightly")
    m.forget_pool("ci")
    assert pool_series(m, "ci") == []
    assert pool_series(m, "nightly") == before
    # Every pool metric had a series of "ci": all of them went.
    names = {line.split("{")[0] for line in before}
    assert {n.removesuffix("_total") for n in names if not n.endswith(("_bucket", "_sum",
                                                                       "_count"))} | {
        "fleet_lease_wait_seconds", "fleet_pool_refill_seconds"} == {
        f.name for f in m.registry.collect() if f.name.startswith(("fleet_pool", "fleet_lease"))}
    m.forget_pool("ci")  # twice, or a pool never reported: nothing to do
    m.forget_pool("never")
    # Reported again, it starts afresh.
    m.count_lease("ci", "granted", "ci-bot")
    assert sample(m, "fleet_leases_total", pool="ci", outcome="granted", client="ci-bot") == 1
    assert sample(m, "fleet_lease_refusals_total", pool="ci", reason="quota",
                  client="ci-bot") is None


# -- the documentation lists exactly what is registered -----------------------------------

def registered() -> dict[str, tuple[str, list[str]]]:
    """name -> (type, label names) of every metric FleetMetrics registers."""
    m = FleetMetrics()
    out: dict[str, tuple[str, list[str]]] = {}
    for attr in vars(m).values():
        names = getattr(attr, "_labelnames", None)
        name = getattr(attr, "_name", None)
        kind = getattr(attr, "_type", None)
        if name is not None and names is not None and kind is not None:
            full = f"{name}_total" if kind == "counter" else name
            out[full] = (kind, list(names))
    families = {f.name for f in m.registry.collect()}
    assert {n.removesuffix("_total") for n in out} == families, "an attribute per metric"
    return out


def readme_metrics() -> dict[str, tuple[str, list[str]]]:
    """The rows of README's metrics table: | `name` | type | `label`, ... | meaning |"""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    out: dict[str, tuple[str, list[str]]] = {}
    for line in section.splitlines():
        row = re.match(r"\| `(fleet_\w+)` \| (\w+) \| ([^|]*) \|", line)
        if row:
            labels = re.findall(r"`(\w+)`", row.group(3))
            out[row.group(1)] = (row.group(2), labels)
    return out


def docstring_metrics() -> dict[str, tuple[str, list[str]]]:
    out: dict[str, tuple[str, list[str]]] = {}
    for line in (metrics_module.__doc__ or "").splitlines():
        row = re.match(r"(fleet_\w+)\s+(counter|gauge|histogram)\s+(.*)$", line)
        if row:
            labels = [] if row.group(3).startswith("(none)") else [
                w.strip() for w in re.sub(r"\(.*?\)", "", row.group(3)).split(",")]
            out[row.group(1)] = (row.group(2), labels)
    return out


@pytest.mark.parametrize("listed", [readme_metrics, docstring_metrics],
                         ids=["README", "fleet.metrics docstring"])
def test_the_docs_list_exactly_the_registered_metrics(listed: object) -> None:
    assert callable(listed)
    assert listed() == registered()
