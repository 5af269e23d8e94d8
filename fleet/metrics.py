"""Prometheus metrics for fleet: one :class:`FleetMetrics` object, passed in, no globals.

It consumes the engine's event stream (:meth:`FleetMetrics.on_event`) and the
vSphere client's observer hooks (:meth:`FleetMetrics.observe_request` for every
call, :meth:`FleetMetrics.observe_task_fault` for every task that ended in a
fault), and keeps everything in its own ``CollectorRegistry`` so tests and
several services in one process never collide. Several runs may feed one object
at once (``fleet serve``): give each its own callback with
:meth:`FleetMetrics.events_for`, so their jobs (which events name by index only)
are told apart. The service adds its own numbers: fleets by state, expiries, API
requests, and its warm pools (members by state, targets, which instance serves, leases
and their waits, refills; :meth:`FleetMetrics.set_pool_members` and the methods after
it, and docs/runbook.md for the alerts on them).

Naming follows Prometheus practice: base units in names (``_seconds``),
``_total`` on counters, small fixed label sets, never a VM name or id as a
label, and no ``_created`` series (importing this module turns them off for
every registry in the process: a ``fleet_clones_created`` series reads like a
clone count). Source names and host names are labels because a fleet has a
handful of each (they are the things operators act on); fleet names label
member counts and clone outcomes, and a fleet that is gone loses those series
(its outcome counters after :data:`GONE_FLEET_HOLD_S`, so its last numbers are
scraped). Pool names are labels too (a config file lists them), and so are the clients
that lease (the tokens file lists them, at most ``fleet.api.tokens.MAX_CLIENTS``); a
pool taken out of the config loses every series at once
(:meth:`FleetMetrics.forget_pool`).

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
fleet_pool_members                             gauge      pool, state (POOL_STATES)
fleet_pool_target                              gauge      pool, kind (ready|max)
fleet_pool_serving                             gauge      pool
fleet_lease_wait_seconds                       histogram  pool
fleet_leases_total                             counter    pool, outcome (LEASE_OUTCOMES), client
fleet_lease_refusals_total                     counter    pool, reason (REFUSAL_REASONS), client
fleet_pool_refill_seconds                      histogram  pool
fleet_lease_waiting                            gauge      pool
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
# A lease: an idle member answers in well under 50 ms; a lease that waits for a refill
# takes a clone's time (seconds) or, with the pool at its max, until a member comes back.
LEASE_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                      10.0, 30.0, 60.0, 120.0, 300.0)
#: fleet_clones_total's outcomes: a cancelled clone (its run was stopped by a delete, an
#: expiry, a new request or Ctrl-C) is neither ready nor failed
OUTCOMES = ("ready", "failed", "cancelled")
MEMBER_STATES = ("cloned", "network", "ready")
#: fleet_pool_members' states, every one exported for a known pool (0 when none):
#: recycling is being destroyed (returned, expired or stale); doubt is what an instance
#: that took the pool over cannot vouch for yet
POOL_STATES = ("idle", "leased", "refilling", "recycling", "doubt")
#: fleet_leases_total's outcomes; "refused" is counted by count_lease_refused alone
LEASE_OUTCOMES = ("granted", "returned", "expired", "refused")
#: fleet_lease_refusals_total's reasons
REFUSAL_REASONS = ("at_max", "wait_timeout", "quota", "not_allowed", "not_serving",
                   "client_gone")
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
        self.pool_members = Gauge("fleet_pool_members",
                                  "Warm pool members, by state (idle, leased, refilling, "
                                  "recycling, doubt)", ["pool", "state"], registry=r)
        self.pool_target = Gauge("fleet_pool_target",
                                 "A warm pool's configured size: kind ready (idle members "
                                 "it keeps) and max (members at most)", ["pool", "kind"],
                                 registry=r)
        self.pool_serving = Gauge("fleet_pool_serving",
                                  "1 when this instance holds the pool and grants its "
                                  "leases, 0 when it stands by", ["pool"], registry=r)
        self.lease_wait = Histogram("fleet_lease_wait_seconds",
                                    "From a lease request's arrival to its answer with a VM",
                                    ["pool"], buckets=LEASE_WAIT_BUCKETS, registry=r)
        self.leases = PromCounter("fleet_leases_total",
                                  "Leases by pool, outcome (granted, returned, expired, "
                                  "refused) and client", ["pool", "outcome", "client"],
                                  registry=r)
        self.lease_refusals = PromCounter("fleet_lease_refusals_total",
                                          "Refused lease requests, by pool, reason and client",
                                          ["pool", "reason", "client"], registry=r)
        # A refill is a clone from queued to ready: the clone buckets.
        self.pool_refill = Histogram("fleet_pool_refill_seconds",
                                     "From a refill clone being queued to the member being "
                                     "idle", ["pool"], buckets=PHASE_BUCKETS, registry=r)
        self.lease_waiting = Gauge("fleet_lease_waiting",
                                   "Lease requests waiting for a member now", ["pool"],
                                   registry=r)
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
        #: pool -> (metric id, label values after the pool) -> (metric, child): every
        #: series a pool has, so forget_pool removes them all
        self._pool_series: dict[str, dict[tuple[int, tuple[str, ...]], tuple[Any, Any]]] = {}

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

    # -- warm pools (fleet serve) -------------------------------------------------
    def set_pool_members(self, pool: str, states: Mapping[str, int]) -> None:
        """A pool's members by state. Every state of :data:`POOL_STATES` is exported (0
        when absent from ``states``); a pool's first call also starts its lease-wait and
        refill histograms and its waiting gauge at 0."""
        unknown = sorted(set(states) - set(POOL_STATES))
        if unknown:
            raise ValueError(f"pool {pool!r}: unknown member state(s) {unknown}; "
                             f"expected {', '.join(POOL_STATES)}")
        counts = {state: _count(pool, f"members {state}", states.get(state, 0))
                  for state in POOL_STATES}  # all checked before any is set
        for state, n in counts.items():
            self._pool_child(self.pool_members, pool, state).set(n)
        self._pool_child(self.lease_wait, pool)
        self._pool_child(self.pool_refill, pool)
        self._pool_child(self.lease_waiting, pool)  # a new gauge child is 0

    def set_pool_target(self, pool: str, ready: int, max_: int) -> None:
        """A pool's configured size: ``ready`` idle members to keep, ``max_`` at most."""
        ready, max_ = _count(pool, "ready", ready), _count(pool, "max", max_)
        self._pool_child(self.pool_target, pool, "ready").set(ready)
        self._pool_child(self.pool_target, pool, "max").set(max_)

    def set_pool_serving(self, pool: str, serving: bool) -> None:
        """Whether this instance holds ``pool`` (grants its leases) or stands by."""
        self._pool_child(self.pool_serving, pool).set(1 if serving else 0)

    def observe_lease_wait(self, pool: str, seconds: float) -> None:
        """A lease answered with a VM ``seconds`` after its request arrived."""
        self._pool_child(self.lease_wait, pool).observe(seconds)

    def count_lease(self, pool: str, outcome: str, client: str) -> None:
        """A lease of ``client``'s was granted, returned or expired. Refusals go through
        :meth:`count_lease_refused`, which also counts their reason."""
        if outcome not in LEASE_OUTCOMES or outcome == "refused":
            raise ValueError(f"pool {pool!r}: lease outcome {outcome!r} is not one of "
                             "granted, returned, expired (refusals: count_lease_refused)")
        self._lease_outcome(pool, outcome, client).inc()

    def count_lease_refused(self, pool: str, reason: str, client: str) -> None:
        """A lease request of ``client``'s was refused: counted in
        ``fleet_lease_refusals_total`` by reason and in ``fleet_leases_total`` as
        ``outcome="refused"`` (the sum over reasons)."""
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"pool {pool!r}: lease refusal reason {reason!r} is not one of "
                             f"{', '.join(REFUSAL_REASONS)}")
        self._pool_child(self.lease_refusals, pool, reason, client).inc()
        self._lease_outcome(pool, "refused", client).inc()

    def observe_refill(self, pool: str, seconds: float) -> None:
        """A refill member became idle ``seconds`` after its clone was queued."""
        self._pool_child(self.pool_refill, pool).observe(seconds)

    def leases_waiting(self, pool: str, n: int) -> None:
        """Lease requests waiting for one of ``pool``'s members now."""
        n = _count(pool, "waiting", n)
        self._pool_child(self.lease_waiting, pool).set(n)

    def forget_pool(self, pool: str) -> None:
        """``pool`` left the config: every series of it goes (a call for it afterwards
        brings that series back)."""
        for (_, rest), (metric, _) in self._pool_series.pop(pool, {}).items():
            with contextlib.suppress(KeyError):
                metric.remove(pool, *rest)

    def _lease_outcome(self, pool: str, outcome: str, client: str) -> PromCounter:
        """A (pool, client)'s fleet_leases_total child; its first use starts all outcomes
        at 0, so rate() sees that client's first refusal or expiry."""
        series = self._pool_series.get(pool, {})
        if (id(self.leases), (outcome, client)) not in series:
            for other in LEASE_OUTCOMES:
                self._pool_child(self.leases, pool, other, client)
        return self._pool_child(self.leases, pool, outcome, client)

    def _pool_child(self, metric: _M, pool: str, *rest: str) -> _M:
        """``metric.labels(pool, *rest)``, recorded as one of ``pool``'s series."""
        series = self._pool_series.setdefault(pool, {})
        key = (id(metric), rest)
        got = series.get(key)
        if got is None:
            got = series[key] = (metric, metric.labels(pool, *rest))
        return cast(_M, got[1])

    def exposition(self) -> bytes:
        """The text format a scrape gets."""
        return generate_latest(self.registry)


def _count(pool: str, what: str, n: int) -> int:
    """``n``, a number of members or requests: never negative."""
    if n < 0:
        raise ValueError(f"pool {pool!r}: {what} is {n}, a count cannot be negative")
    return n
