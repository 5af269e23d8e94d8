"""What the metrics say of a run with vCenter task faults, and of a cancelled run: the
engine and the real client on the in-process simulator, FleetMetrics as both the
event consumer and the client's call observer (as ``fleet provision`` wires them)."""

from __future__ import annotations

import anyio
import pytest

from fleet.engine.events import JobReady
from fleet.engine.run import Provisioner
from fleet.metrics import FleetMetrics
from fleet.testing.harness import sim_vsphere
from tests.engine.conftest import CLONE_ONLY, make_spec, topology
from tests.engine.conftest import options as opts
from tests.engine.test_cancel import CancelAt, nth

pytestmark = pytest.mark.anyio


def sample(m: FleetMetrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def total(m: FleetMetrics, name: str, **labels: str) -> float:
    """The sum of every series of ``name`` whose labels include ``labels``."""
    return sum(s.value for f in m.registry.collect() for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


async def test_task_faults_are_counted_by_type_and_failures_name_them() -> None:
    m = FleetMetrics()
    spec = make_spec(count=8, **CLONE_ONLY)
    async with sim_vsphere(topology(), observer=m) as (vs, vc):
        # The submit succeeds; the task it starts ends in FileNotFound.
        rule = vc.add_fault(method="InstantClone_Task", object="lt-*", fault="FileNotFound",
                            phase="task", max_count=3)
        summary = await Provisioner(spec, vs, on_event=m.on_event, options=opts()).run()
    assert rule.fired == 3
    assert summary.ready == 5
    assert sample(m, "fleet_vsphere_faults_total", fault="FileNotFound",
                  method="InstantClone_Task", stage="task") == 3
    assert total(m, "fleet_vsphere_faults_total", stage="call") == 0
    assert sample(m, "fleet_clones_total", fleet="lt", outcome="failed") == 3
    assert sample(m, "fleet_clone_failures_total", reason="fault", fault="FileNotFound") == 3
    assert sample(m, "fleet_clones_total", fleet="lt", outcome="ready") == 5


async def test_a_cancelled_run_counts_no_failure_and_no_fault() -> None:
    m = FleetMetrics()
    spec = make_spec(count=30, timeouts={"cancel_grace_s": 0.0}, **CLONE_ONLY)
    # Two clones take long: the run is cancelled while their tasks run at vCenter, so
    # fleet cancels them (CancelTask), and they end in RequestCanceled.
    cancel = CancelAt(nth(JobReady, 3))
    async with sim_vsphere(topology(), observer=m) as (vs, vc):
        vc.add_fault(method="InstantClone_Task", object="lt-*", fault="slow", delay_s=60.0,
                     max_count=2)
        p = Provisioner(spec, vs, on_event=lambda e: (cancel(e), m.on_event(e)),
                        options=opts())
        with anyio.move_on_after(60) as scope:
            cancel.scope = scope
            await p.run()
        assert scope.cancelled_caught
        await vc.wait_idle()
    assert p.summary is not None and p.summary.cancelled
    cancelled = sample(m, "fleet_clones_total", fleet="lt", outcome="cancelled")
    ready = sample(m, "fleet_clones_total", fleet="lt", outcome="ready")
    assert cancelled >= 2 and cancelled + ready == 30
    assert sample(m, "fleet_clones_total", fleet="lt", outcome="failed") == 0
    assert total(m, "fleet_clone_failures_total") == 0
    # fleet asked vCenter to cancel the slow clones: their RequestCanceled is the answer,
    # not a fault.
    assert sample(m, "fleet_vsphere_request_duration_seconds_count", method="CancelTask") >= 2
    assert total(m, "fleet_vsphere_faults_total") == 0
    assert sample(m, "fleet_runs_total", outcome="cancelled") == 1
