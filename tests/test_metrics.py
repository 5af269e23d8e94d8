"""FleetMetrics turns engine events and client hooks into Prometheus samples."""

from __future__ import annotations

from fleet.engine import events as ev
from fleet.metrics import FleetMetrics


def sample(m: FleetMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_known_labels_start_at_zero() -> None:
    m = FleetMetrics()
    assert sample(m, "fleet_clones_total", outcome="ready") == 0
    assert sample(m, "fleet_clones_total", outcome="failed") == 0
    assert sample(m, "fleet_clone_phase_duration_seconds_count", phase="clone") == 0
    assert sample(m, "fleet_queue_length") == 0
    assert sample(m, "fleet_build_info", version=__import__("fleet").__version__,
                  python=__import__("platform").python_version()) == 1


def test_a_clone_life_cycle() -> None:
    m = FleetMetrics()
    m.on_event(ev.RunStarted(0.0, fleet="f", run_id="r", requested=2, to_create=2, to_resume=0,
                             to_remove=0, already_ready=0))
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
                            message="x"))
    assert sample(m, "fleet_clones_total", outcome="ready") == 1
    assert sample(m, "fleet_clones_total", outcome="failed") == 1
    assert sample(m, "fleet_clone_failures_total", reason="chain_too_deep") == 1
    assert sample(m, "fleet_clone_phase_duration_seconds_count", phase="clone") == 1
    assert sample(m, "fleet_clone_phase_duration_seconds_bucket", phase="clone", le="1.0") == 1
    assert sample(m, "fleet_clone_phase_duration_seconds_bucket", phase="clone", le="0.75") == 0
    assert sample(m, "fleet_source_clones_total", source="s1") == 2
    assert sample(m, "fleet_clone_attempts_total") == 2
    m.on_event(ev.RunFinished(3.0, fleet="f", run_id="r", ready=1, failed=1, cancelled=False))
    assert sample(m, "fleet_runs_total", outcome="incomplete") == 1


def test_client_hooks_and_snapshots() -> None:
    m = FleetMetrics()
    m.observe_request("InstantClone_Task", 0.02)
    m.observe_request("InstantClone_Task", 0.03, fault="TaskInProgress")
    m.relogin()
    m.set_source("golden", 12, 188)
    m.set_source("frozen-01", 2, None)
    m.set_members("web", {"ready": 5, "cloned": 1})
    assert sample(m, "fleet_vsphere_request_duration_seconds_count",
                  method="InstantClone_Task") == 2
    assert sample(m, "fleet_vsphere_faults_total", fault="TaskInProgress") == 1
    assert sample(m, "fleet_vsphere_relogins_total") == 1
    assert sample(m, "fleet_source_clones_left", source="frozen-01") == -1
    assert sample(m, "fleet_source_chain_depth", source="golden") == 12
    assert sample(m, "fleet_fleet_members", fleet="web", state="network") == 0
    assert sample(m, "fleet_fleet_members", fleet="web", state="ready") == 5
    text = m.exposition().decode()
    assert "fleet_vsphere_request_duration_seconds_bucket" in text


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
    b(ev.RunFinished(2.0, fleet="b", run_id="rb", ready=0, failed=1, cancelled=True))
    assert sample(m, "fleet_clones_in_flight", host="esx-01") == 0
    m.set_members("a", {"ready": 1})
    m.set_members("b", {"ready": 2})
    m.forget_fleet("b")
    assert sample(m, "fleet_fleet_members", fleet="a", state="ready") == 1
    assert sample(m, "fleet_fleet_members", fleet="b", state="ready") is None


def test_api_and_service_numbers() -> None:
    m = FleetMetrics()
    m.observe_api("/v1/fleets/{name}", "GET", 404, 0.002)
    m.set_fleets({"ready": 2}, ["ready", "pending"])
    assert sample(m, "fleet_api_requests_total", route="/v1/fleets/{name}", method="GET",
                  code="404") == 1
    assert sample(m, "fleet_api_request_duration_seconds_count", route="/v1/fleets/{name}") == 1
    assert sample(m, "fleet_fleets", state="ready") == 2
    assert sample(m, "fleet_fleets", state="pending") == 0
