"""Deciding what to do: spec -> reconcile -> placement -> dispatch -> per-clone pipeline.

The public API (what the CLI and the REST service call)::

    spec = load_spec("fleet.toml")                  # or spec_from_dict({...})
    summary = await provision(spec, vsphere, on_event=print)
    await destroy(spec, vsphere)
    report = await plan(spec, vsphere)              # dry run, no changes
    state = await status(spec, vsphere)
    await list_sources(spec, vsphere); await freeze_sources(spec, vsphere)
    await prepare_sources(spec, vsphere, golden="golden-vm")

``vsphere`` is anything implementing :class:`fleet.vsphere.model.VSphere`.
For Ctrl-C, run ``p = Provisioner(spec, vsphere, on_event=...)`` and call
``p.stop(reason)`` from the signal handler: ``await p.run()`` then returns a
summary with ``cancelled`` set after in-flight clones finished (within
``timeouts.cancel_grace_s``) or were destroyed. Cancelling ``run`` does the
same and leaves the summary on ``p.summary``.

Where things are:

- ``operations``: the front door above; ``spec``: the fleet spec and its rules;
  ``reconcile``: membership (labels) and what a run must do; ``lock``: the fleet lock;
  ``lifetime``: expiry; ``sources``: listing, freezing and preparing sources.
- One run (``run.Provisioner``) is cut into parts sharing a ``runstate.RunContext``:
  ``dispatch`` (what starts next, under ``limits`` and ``placement``), ``pipeline``
  (clone -> network -> reconnect -> ready), ``recovery`` (clones whose outcome is
  unknown), ``refresher`` (the view of sources and hosts), ``stopping`` (how a stopped
  run ends on time), ``summary`` (the tally and the closing summary).
- ``events``: what a run reports as it goes; ``shared``: limits shared by many runs.
"""

from fleet.engine.events import Event, EventCallback
from fleet.engine.operations import FleetStatus, Plan, PlanRow, destroy, plan, provision, status
from fleet.engine.run import EngineOptions, Provisioner
from fleet.engine.sources import SourceStatus, freeze_sources, list_sources, prepare_sources
from fleet.engine.spec import FleetSpec, SpecError, load_spec, spec_from_dict
from fleet.engine.summary import PhaseStats, RemovalSummary, Summary

__all__ = [
    "EngineOptions",
    "Event",
    "EventCallback",
    "FleetSpec",
    "FleetStatus",
    "PhaseStats",
    "Plan",
    "PlanRow",
    "Provisioner",
    "RemovalSummary",
    "SourceStatus",
    "SpecError",
    "Summary",
    "destroy",
    "freeze_sources",
    "list_sources",
    "load_spec",
    "plan",
    "prepare_sources",
    "provision",
    "spec_from_dict",
    "status",
]
