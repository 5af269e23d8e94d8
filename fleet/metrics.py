"""Prometheus metrics for fleet: one :class:`FleetMetrics` object, passed in, no globals.

It consumes the engine's event stream (:meth:`FleetMetrics.on_event`) and the
vSphere client's observer hooks (:meth:`FleetMetrics.observe_request` for every
call, :meth:`FleetMetrics.observe_task_fault` for every task that ended in a
fault), and keeps everything in its own ``CollectorRegistry`` so tests and
several services in one process never collide. Several runs may feed one object
at once (``fleet serve``): give each its own callback with
:meth:`FleetMetrics.events_for`, so their jobs (which events name by index only)
are told apart. The service adds its own numbers: fleets by state, expiries, API
requests.

Naming follows Prometheus practice: base units in names (``_seconds``),
``_total`` on counters, small fixed label sets, never a VM name or id as a
label, and no ``_created`` series (importing this module turns them off for
every registry in the process: a ``fleet_clones_created`` series reads like a
clone count). Source names and host names are labels because a fleet has a
handful of each (they are the things operators act on); fleet names label
member counts and clone outcomes, and a fleet that is gone loses those series
(its outcome counters after :data:`GONE_FLEET_HOLD_S`, so its last numbers are
scraped).

The README's "Metrics" section is the operator's copy of this table; a test
keeps both equal to what the registry holds.

=============================================  =========  =================================
metric                                         type       labels
=============================================  =========  =================================
fleet_build_info                               gauge      version, python
fleet_clones_total                             counter    fleet, outcome (ready|failed|cancelled)
fleet_clone_failures_total                     counter    reason, fault
fleet_clone_attempts_total                     counter    (none)
fleet_clone_retries_total                      counter    reason
fleet_clones_adopted_total                     counter    (none)
fleet_clone_phase_duration_seconds             histogram  phase
fleet_clone_duration_seconds                   histogram  (none)
fleet_clones_in_flight                         gauge      host
fleet_queue_length                             gauge      (none)
fleet_source_chain_depth                       gauge      source
fleet_source_clones_left                       gauge      source
fleet_source_clones_total                      counter    source
fleet_sources_retired_total                    counter    reason
fleet_hosts_excluded_total                     counter    reason
fleet_limit                                    gauge      kind, key
fleet_vsphere_request_duration_seconds         histogram  method
fleet_vsphere_faults_total                     counter    fault, method, stage (call|task)
fleet_vsphere_relogins_total                   counter    (none)
fleet_members                                  gauge      fleet, state
fleet_runs_total                               counter    outcome (complete|incomplete|cancelled)
fleet_fleets                                   gauge      state (fleet serve)
fleet_fleets_expired_total                     counter    (none)
fleet_api_requests_total                       counter    route, method, code
fleet_api_request_duration_seconds             histogram  route
=============================================  =========  =================================
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from prometheus_client import CollectorRegistry, Gauge, Histogram, disable_created_metrics
from prometheus_client import Counter as PromCounter
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from fleet.engine.summary import PHASES
from fleet.version import __version__

if TYPE_CHECKING:
    from fleet.engine.events import Event
    from fleet.engine.limits import LimiterStats

# Process-wide in prometheus_client (it is read when a registry is collected), so every
# registry fleet builds, the CLI's, the service's, one pushed to a Pushgateway, has no
# ``_created`` series; PROMETHEUS_DISABLE_CREATED_SERIES=True does the same.
disable_created_metrics()  # type: ignore[no-untyped-call]

# 50 ms to 5 min: instant clones take about a second, guest phases tens of
# seconds, and a stuck phase should still land in a bucket below +Inf.
PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0,
                 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0)
# vSphere calls: a few ms (property reads) to seconds (slow tasks' waits).
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
# API calls: sub-millisecond reads to a large fleet's JSON.
API_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: fleet_clones_total's outcomes: a cancelled clone (its run was stopped by a delete, an
#: expiry, a new request or Ctrl-C) is neither ready nor failed
OUTCOMES = ("ready", "failed", "cancelled")
MEMBER_STATES = ("cloned", "network", "ready")
#: How long a gone fleet's outcome counters stay: several scrapes at any usual interval
#: (Prometheus' default is 1 min), so its last increments (the clones a delete or an
#: expiry cancelled) are scraped. After that, rate() and the alerts go on using the
#: samples already stored for as long as their window reaches back.
GONE_FLEET_HOLD_S = 5 * 60.0

CONTENT_TYPE = CONTENT_TYPE_LATEST
_M = TypeVar("_M", PromCounter, Gauge, Histogram)


class FleetMetrics:
    """Every fleet metric, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Gauge("fleet_build_info", "fleet's version and Python version (always 1)",
                                ["version", "python"], registry=r)
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.clones = PromCounter("fleet_clones_total",
                                  "Clones that ended, by fleet and outcome (ready, failed, "
                                  "cancelled)", ["fleet", "outcome"], registry=r)
        self.failures = PromCounter("fleet_clone_failures_total",
                                    "Clones that failed for good, by fleet's reason and "
                                    "vCenter's fault type (empty: no fault)",
                                    ["reason", "fault"], registry=r)
        self.attempts = PromCounter("fleet_clone_attempts_total",
                                    "Instant clone tasks handed to vCenter", registry=r)
        self.retries = PromCounter("fleet_clone_retries_total", "Retried clone phases, by reason",
                                   ["reason"], registry=r)
        self.adopted = PromCounter("fleet_clones_adopted_total",
                                   "Existing labelled VMs adopted instead of cloned again",
                                   registry=r)
        self.phase_duration = Histogram("fleet_clone_phase_duration_seconds",
                                        "Duration of each phase of a clone's pipeline",
                                        ["phase"], buckets=PHASE_BUCKETS, registry=r)
        self.clone_duration = Histogram("fleet_clone_duration_seconds",
                                        "From queued to ready, per clone",
                                        buckets=PHASE_BUCKETS, registry=r)
        self.in_flight = Gauge("fleet_clones_in_flight",
                               "Clone tasks at vCenter right now, per host", ["host"], registry=r)
        self.queue_length = Gauge("fleet_queue_length",
                                  "Clones waiting for a slot (not yet at vCenter)", registry=r)
        self.source_depth = Gauge("fleet_source_chain_depth",
                                  "Delta-disk chain depth of each source", ["source"], registry=r)
        self.source_left = Gauge("fleet_source_clones_left",
                                 "Clones a running source may still give before its chain "
                                 "budget (-1: unlimited, a frozen source)", ["source"],
                                 registry=r)
        self.source_clones = PromCounter("fleet_source_clones_total",
                                         "Clones started from each source", ["source"],
                                         registry=r)
        self.retired = PromCounter("fleet_sources_retired_total",
                                   "Sources taken out of placement, by reason", ["reason"],
                                   registry=r)
        self.excluded = PromCounter("fleet_hosts_excluded_total",
                                    "Hosts taken out of placement, by reason", ["reason"],
                                    registry=r)
        self.limit = Gauge("fleet_limit",
                           "Current concurrency limit, by limiter kind (overall, host, "
                           "datastore, source) and key (what it limits; empty for overall)",
                           ["kind", "key"], registry=r)
        self.request_duration = Histogram("fleet_vsphere_request_duration_seconds",
                                          "vSphere API call latency, per method", ["method"],
                                          buckets=REQUEST_BUCKETS, registry=r)
        self.faults = PromCounter("fleet_vsphere_faults_total",
                                  "Faults vSphere answered, by fault type, method and stage "
                                  "(call: the call failed; task: the task it started did)",
                                  ["fault", "method", "stage"], registry=r)
        self.relogins = PromCounter("fleet_vsphere_relogins_total",
                                    "Transparent re-logins after an expired session", registry=r)
        self.members = Gauge("fleet_members", "Fleet members as vCenter shows them, by state",
                             ["fleet", "state"], registry=r)
        self.runs = PromCounter("fleet_runs_total", "Provisioning runs, by outcome", ["outcome"],
                                registry=r)
        self.fleets = Gauge("fleet_fleets", "Fleets the service manages, by state", ["state"],
                            registry=r)
        self.expired = PromCounter("fleet_fleets_expired_total",
                                   "Fleets destroyed because their lifetime ended", registry=r)
        self.api_requests = PromCounter("fleet_api_requests_total",
                                        "REST API requests, by route template, method and "
                                        "status code", ["route", "method", "code"], registry=r)
        self.api_duration = Histogram("fleet_api_request_duration_seconds",
                                      "REST API request latency, by route template", ["route"],
                                      buckets=API_BUCKETS, registry=r)
        # Known label values start at 0, so rate() and absent() behave from the first scrape.
        for phase in PHASES:
            self.phase_duration.labels(phase)
        for outcome in ("complete", "incomplete", "cancelled"):
            self.runs.labels(outcome)
        self.queue_length.set(0)
        self._host_of: dict[tuple[str, int], str] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._outcomes: dict[str, dict[str, PromCounter]] = {}  # fleet -> outcome -> child
        self._gone: dict[str, float] = {}  # fleet -> when (clock) its outcome counters go
        #: monotonic seconds; a test replaces it to age gone fleets
        self.clock: Callable[[], float] = time.monotonic
        self._queued: set[tuple[str, int]] = set()
        self._run_fleet = ""

    # -- engine events ---------------------------------------------------------
    def events_for(self, fleet: str) -> Callable[[Event], None]:
        """An ``on_event`` callback for one run of ``fleet`` (runs may overlap)."""

        def on_event(event: Event) -> None:
            self.on_event(event, fleet=fleet)

        return on_event

    def on_event(self, event: Event, *, fleet: str | None = None) -> None:
        kind = event.kind
        fleet = getattr(event, "fleet", None) or fleet or self._run_fleet
        index = getattr(event, "index", None)
        job = (fleet, index) if index is not None else None
        if kind == "run_started":
            self._run_fleet = fleet
            self._outcomes_of(fleet)  # 0 for each outcome from the run's first scrape
        elif kind == "job_queued" and job is not None:
            self._queued.add(job)
            self.queue_length.set(len(self._queued))
        elif kind == "job_started" and job is not None:
            self._dequeue(job)
            host = getattr(event, "host", "") or "unknown"
            self._leave_host(job)
            self._host_of[job] = host
            self._labelled(self.in_flight, host).inc()
            self.attempts.inc()
            self._labelled(self.source_clones, getattr(event, "source", "unknown")).inc()
        elif kind == "phase_done":
            phase = getattr(event, "phase", "")
            self._labelled(self.phase_duration, phase).observe(
                float(getattr(event, "duration_s", 0.0)))
            if phase == "clone" and job is not None:
                self._leave_host(job)
        elif kind in ("job_retried", "job_replaced") and job is not None:
            self._leave_host(job)
            if kind == "job_retried":
                self.retries.labels(getattr(event, "reason", "unknown")).inc()
        elif kind == "job_adopted":
            self.adopted.inc()
        elif kind == "job_ready" and job is not None:
            self._dequeue(job)
            self._leave_host(job)
            self._outcomes_of(fleet)["ready"].inc()
            self.clone_duration.observe(float(getattr(event, "duration_s", 0.0)))
        elif kind == "job_failed" and job is not None:
            self._dequeue(job)
            self._leave_host(job)
            # Cancelled work (a delete, an expiry, Ctrl-C) is its own outcome: never a
            # failure, never in the failure ratio.
            outcome = "cancelled" if getattr(event, "outcome", "failed") == "cancelled" \
                else "failed"
            self._outcomes_of(fleet)[outcome].inc()
            if outcome == "failed":
                self._labelled(self.failures, getattr(event, "reason", "") or "unknown",
                               getattr(event, "fault", "") or "").inc()
        elif kind == "source_retired":
            self.retired.labels(getattr(event, "reason", "unknown")).inc()
            source = getattr(event, "source", "unknown")
            self.source_depth.labels(source).set(float(getattr(event, "chain_depth", 0)))
            self.source_left.labels(source).set(0)
        elif kind == "host_excluded":
            self.excluded.labels(getattr(event, "reason", "unknown")).inc()
        elif kind == "limit_changed":
            self.set_limit(getattr(event, "limiter_kind", "") or "unknown",
                           getattr(event, "limiter_key", ""), float(getattr(event, "new", 0.0)))
        elif kind == "source_state":
            source = getattr(event, "source", "unknown")
            self.source_depth.labels(source).set(float(getattr(event, "chain_depth", 0)))
            left = getattr(event, "clones_left", None)
            self.source_left.labels(source).set(-1 if left is None else float(left))
        elif kind == "run_finished":
            cancelled = bool(getattr(event, "cancelled", False))
            failed = int(getattr(event, "failed", 0))
            self.runs.labels("cancelled" if cancelled else
                             "incomplete" if failed else "complete").inc()
            for key in [k for k in self._queued if k[0] == fleet]:
                self._dequeue(key)
            for key in [k for k in self._host_of if k[0] == fleet]:
                self._leave_host(key)

    def _labelled(self, metric: _M, *values: str) -> _M:
        """``metric.labels(*values)``, kept: events ask for the same few series (hosts,
        sources, phases) several times per clone, and ``labels()`` validates and locks
        every time. Only for metrics whose series are never removed."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return cast(_M, child)

    def _outcomes_of(self, fleet: str) -> dict[str, PromCounter]:
        """``fleet``'s fleet_clones_total children; a fleet that is back is no longer gone."""
        children = self._outcomes.get(fleet)
        if children is None:
            children = self._outcomes[fleet] = {o: self.clones.labels(fleet, o)
                                                for o in OUTCOMES}
        self._gone.pop(fleet, None)
        return children

    def _dequeue(self, job: tuple[str, int]) -> None:
        if job in self._queued:
            self._queued.discard(job)
        self.queue_length.set(len(self._queued))

    def _leave_host(self, job: tuple[str, int]) -> None:
        host = self._host_of.pop(job, None)
        if host is not None:
            self._labelled(self.in_flight, host).dec()

    # -- vSphere client hooks (fleet.vsphere.session.CallObserver) ------------------
    def observe_request(self, method: str, duration_s: float, fault: str | None = None) -> None:
        """One vSphere call: ``method`` is its WSDL name, ``fault`` the fault's if it failed."""
        self._labelled(self.request_duration, method).observe(duration_s)
        if fault:
            self._labelled(self.faults, fault, method, "call").inc()

    def observe_task_fault(self, method: str, fault: str) -> None:
        """A task ended in a fault: ``method`` is the WSDL name of the call that started it
        (``InstantClone_Task``), ``fault`` the fault's type (``FileNotFound``)."""
        self._labelled(self.faults, fault, method, "task").inc()

    def relogin(self) -> None:
        self.relogins.inc()

    # -- state snapshots -----------------------------------------------------
    def set_source(self, source: str, chain_depth: int, clones_left: int | None) -> None:
        self.source_depth.labels(source).set(chain_depth)
        self.source_left.labels(source).set(-1 if clones_left is None else clones_left)

    def set_members(self, fleet: str, states: Mapping[str, int] | Counter[str]) -> None:
        for state in sorted(set(MEMBER_STATES) | set(states)):
            self.members.labels(fleet, state).set(states.get(state, 0))

    def forget_fleet(self, fleet: str) -> None:
        """A fleet is gone: its member series go now (not a row of zeros forever), its
        outcome counters :data:`GONE_FLEET_HOLD_S` later (:meth:`drop_gone_fleets`)."""
        for labels in [s.labels for m in self.members.collect() for s in m.samples
                       if s.labels.get("fleet") == fleet]:
            self.members.remove(labels["fleet"], labels["state"])
        if fleet in self._outcomes:
            self._gone[fleet] = self.clock() + GONE_FLEET_HOLD_S
        self.drop_gone_fleets()

    def drop_gone_fleets(self) -> None:
        """Remove the outcome counters of fleets gone longer than the hold."""
        now = self.clock()
        for fleet in [f for f, at in self._gone.items() if at <= now]:
            del self._gone[fleet]
            self._outcomes.pop(fleet, None)
            for outcome in OUTCOMES:
                with contextlib.suppress(KeyError):
                    self.clones.remove(fleet, outcome)

    def set_fleets(self, states: Mapping[str, int], known: Iterable[str] = ()) -> None:
        """Fleets by state; ``known`` states are shown at 0 when no fleet is in them."""
        for state in sorted(set(known) | set(states)):
            self.fleets.labels(state).set(states.get(state, 0))

    def set_limit(self, kind: str, key: str, limit: float) -> None:
        """One limiter's current limit: ``kind`` (overall, host, datastore, source) and
        ``key``, the name of what it limits ("" for overall)."""
        self._labelled(self.limit, kind, key).set(limit)

    def set_limits(self, stats: Iterable[LimiterStats]) -> None:
        """Current limits of shared limiters (``fleet serve`` reads them at scrape time)."""
        for s in stats:
            if s.limit != float("inf"):
                # LimiterStats.key is str(LimitKey): "kind:id", or "kind" alone.
                self.set_limit(s.kind, s.key.partition(":")[2], s.limit)

    def observe_api(self, route: str, method: str, code: int, duration_s: float) -> None:
        self.api_requests.labels(route, method, str(code)).inc()
        self.api_duration.labels(route).observe(duration_s)

    def exposition(self) -> bytes:
        """The text format a scrape gets."""
        return generate_latest(self.registry)
