"""What the service knows of each fleet, and the shapes it shows callers.

A :class:`FleetRecord` is one fleet as the service holds it: the request on
record (spec, generation), the status, the expiry, the member view, and the
handles of the run under way. Every other part of the service reads and writes
records: the service when it accepts a request (``fleet.api.service``), the
worker when it runs or destroys the fleet (``fleet.api.worker``), the scanner
when it reads vCenter (``fleet.api.scanner``).

This module owns, and does no I/O for:

- the vocabulary: fleet statuses (see ``fleet.api.service``) and member states;
- the member view, a :class:`MemberView` per index, kept current from a run's
  events (:meth:`FleetRecord.on_event`) or, between runs, from the VMs in vCenter
  (:meth:`FleetRecord.show_members`), so ``GET`` needs no vCenter call;
- which part of a record is kept on disk (:meth:`FleetRecord.saved`) and how a
  record comes back from it (:func:`restore`), through ``fleet.api.state``;
- the JSON the HTTP layer returns (:func:`summary_of`, :func:`detail_of`, and
  :func:`with_records`, which adds each member's record: addresses, datastore,
  times; docs/inventory.md).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio

from fleet.api.config import ServiceConfig
from fleet.api.state import SavedFleet
from fleet.engine.events import Event
from fleet.engine.members import RECORD_ONLY, MemberRecord
from fleet.engine.reconcile import Member
from fleet.engine.run import Provisioner
from fleet.engine.spec import FleetSpec, spec_from_dict
from fleet.engine.summary import RemovalSummary, Summary
from fleet.errors import ConfigError

log = logging.getLogger("fleet.api")

STATUSES = ("pending", "provisioning", "retrying", "ready", "incomplete", "failed",
            "destroying", "discovered")
#: statuses after which a restarted service runs the fleet's request again
UNFINISHED = ("pending", "provisioning", "retrying")
MEMBER_STATES = ("queued", "cloning", "cloned", "network", "ready", "failed")


@dataclass
class MemberView:
    """One member (or would-be member) as the service last saw it."""

    index: int
    name: str
    state: str  # queued | cloning | cloned | network | ready | failed
    vm: str | None = None
    source: str | None = None
    host: str | None = None
    attempt: int = 0
    phases_s: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "state": self.state, "vm": self.vm,
                "source": self.source, "host": self.host, "attempt": self.attempt,
                "phases_s": dict(self.phases_s), "reason": self.reason,
                "message": self.message}


@dataclass(eq=False)
class FleetRecord:
    name: str
    folder: str
    spec: FleetSpec | None = None
    spec_data: dict[str, Any] | None = None
    status: str = "discovered"
    generation: int = 0
    applied: int = 0  # generation of the last run that ended (not superseded)
    expires_at: float | None = None
    stamp_pending: bool = False  # members must be relabelled with expires_at
    created_at: float = 0.0
    updated_at: float = 0.0
    members: dict[int, MemberView] = field(default_factory=dict)
    provisioner: Provisioner | None = None
    run_started_at: float | None = None
    summary: Summary | None = None
    removal: RemovalSummary | None = None
    error: str | None = None
    want_destroy: bool = False
    destroy_reason: str = ""
    wake: anyio.Event = field(default_factory=anyio.Event)
    worker: bool = False
    #: set while a run waits for the fleet's lock: a newer request or a delete cancels it
    lock_wait: anyio.CancelScope | None = None
    lock_holder: str | None = None  # who held the lock when we last looked (logged once)
    #: the API client the fleet belongs to (fleet.api.tokens); None: admins only. Kept
    #: in the saved request and, as a label, on every member made for it
    owner: str | None = None

    @property
    def requested(self) -> int | None:
        return self.spec.count if self.spec is not None else None

    @property
    def running(self) -> bool:
        """A run is under way; its events keep the member view current, not scans."""
        return self.provisioner is not None

    def poke(self) -> None:
        self.wake.set()

    def interrupt(self, reason: str) -> None:
        """Stop the run under way, or its wait for the lock: the request it serves is
        no longer the one to build (a newer one came, or the fleet is to go)."""
        if self.provisioner is not None:
            self.provisioner.stop(reason)
        if self.lock_wait is not None:
            self.lock_wait.cancel()

    def by_state(self) -> dict[str, int]:
        return dict(Counter(m.state for m in self.members.values()))

    def in_vcenter(self) -> dict[str, int]:
        """Members that exist as VMs, by their label state."""
        return dict(Counter(m.state for m in self.members.values()
                            if m.state in ("cloned", "network", "ready")))

    # -- the member view -----------------------------------------------------------
    def on_event(self, event: Event) -> None:
        """Follow one event of this fleet's run into its member view."""
        index = getattr(event, "index", None)
        if index is None:
            return
        kind = event.kind
        if kind == "member_removed":
            self.members.pop(index, None)
            return
        m = self.members.get(index)
        if m is None:
            m = self.members[index] = MemberView(index, getattr(event, "name", ""), "queued")
        if kind == "job_queued":
            if getattr(event, "phase", "clone") == "clone":
                m.state, m.vm, m.phases_s = "queued", None, {}
        elif kind == "job_started":
            m.state = "cloning"
            m.source = getattr(event, "source", None)
            m.host = getattr(event, "host", None)
            m.attempt = int(getattr(event, "attempt", 0))
        elif kind == "phase_done":
            phase = str(getattr(event, "phase", ""))
            m.phases_s[phase] = float(getattr(event, "duration_s", 0.0))
            if phase == "clone":
                m.state = "cloned"
            elif phase == "reconnect":
                m.state = "network"
        elif kind == "job_replaced":
            m.state = "queued"
        elif kind == "job_adopted":
            m.vm = getattr(event, "vm", None)
            m.state = str(getattr(event, "state", "cloned"))
        elif kind == "job_ready":
            m.state = "ready"
            m.source = getattr(event, "source", None) or m.source
        elif kind == "job_failed":
            m.reason = getattr(event, "reason", None)
            m.message = getattr(event, "message", None)
            if m.vm is None and m.state in ("queued", "cloning"):
                m.state = "failed"
        elif kind == "job_cleaned_up":
            m.vm = None
            m.state = "failed"
        elif kind == "job_retried":
            m.reason = getattr(event, "reason", None)
            m.message = getattr(event, "message", None)

    def show_members(self, members: list[Member]) -> None:
        """Make the member view what vCenter shows, keeping what only the last run
        knew (phase times, attempts, the last failure of each index)."""
        old = self.members
        new: dict[int, MemberView] = {}
        for member in sorted(members, key=lambda m: (m.index, m.name != m.vm.name)):
            prev = old.get(member.index)
            view = MemberView(member.index, member.name, member.state, member.vm.ref.id,
                              member.source or None, member.vm.host_name)
            if prev is not None:
                view.phases_s = prev.phases_s
                view.attempt = prev.attempt
                view.reason, view.message = prev.reason, prev.message
            new.setdefault(member.index, view)
        requested = self.requested
        for index, prev in old.items():
            if index not in new and prev.state == "failed" and \
                    (requested is None or index < requested):
                new[index] = prev  # a failure of the last run: nothing in vCenter shows it
        self.members = dict(sorted(new.items()))

    # -- on disk -------------------------------------------------------------------
    def saved(self) -> SavedFleet | None:
        """What is kept of this fleet on disk; None when vCenter already says it all."""
        if self.spec_data is None and not self.want_destroy:
            return None
        extra: dict[str, Any] = {"destroy_reason": self.destroy_reason} \
            if self.want_destroy else {}
        if self.owner is not None:
            extra["owner"] = self.owner
        return SavedFleet(
            name=self.name, spec=self.spec_data, generation=self.generation,
            status=self.status, expires_at=self.expires_at, created_at=self.created_at,
            updated_at=self.updated_at, extra=extra)


def restore(saved: SavedFleet, config: ServiceConfig) -> FleetRecord | None:
    """The record a saved request stands for, or None when there is nothing to do
    (vCenter says the rest: the next scan finds the fleet if it is there)."""
    rec = _restore(saved, config)
    owner = saved.extra.get("owner")
    if rec is not None and isinstance(owner, str):
        rec.owner = owner
    return rec


def _restore(saved: SavedFleet, config: ServiceConfig) -> FleetRecord | None:
    if saved.spec is None:
        # A fleet found in vCenter, not requested here, that a caller asked to destroy.
        if saved.status == "destroying":
            return FleetRecord(
                saved.name, config.fleet_folder(saved.name), status="destroying",
                want_destroy=True, destroy_reason=saved.extra.get("destroy_reason", ""),
                created_at=saved.created_at, updated_at=saved.updated_at)
        return None
    try:
        spec = spec_from_dict(saved.spec, source=f"state of fleet {saved.name}",
                              env=config.env, base_dir=config.base_dir)
    except ConfigError as exc:
        log.warning("fleet %s: its saved request no longer validates (%s); it is kept "
                    "as discovered", saved.name, exc)
        return None
    rec = FleetRecord(saved.name, spec.folder_path, spec, saved.spec,
                      status=saved.status, generation=saved.generation,
                      applied=saved.generation, expires_at=saved.expires_at,
                      created_at=saved.created_at, updated_at=saved.updated_at)
    if saved.status in UNFINISHED:
        rec.applied = saved.generation - 1
        rec.stamp_pending = rec.expires_at is not None
    if saved.status == "destroying":
        rec.want_destroy = True
        rec.destroy_reason = saved.extra.get("destroy_reason", "deleted")
    return rec


# -- what callers see --------------------------------------------------------------
def summary_of(rec: FleetRecord, now: float) -> dict[str, Any]:
    """One fleet in a list (``GET /v1/fleets``), and the head of its detail."""
    by_state = rec.by_state()
    return {
        "name": rec.name,
        "url": f"/v1/fleets/{rec.name}",
        "status": rec.status,
        "generation": rec.generation,
        "requested": rec.requested,
        "members": sum(by_state.get(s, 0) for s in ("cloned", "network", "ready")),
        "ready": by_state.get("ready", 0),
        "by_state": by_state,
        "folder": rec.folder,
        "expires_at": None if rec.expires_at is None else math.ceil(rec.expires_at),
        "ttl_left_s": None if rec.expires_at is None else
        round(max(0.0, rec.expires_at - now), 3),
        "created_at": rec.created_at or None,
        "updated_at": rec.updated_at or None,
        "error": rec.error,
        "destroy_reason": rec.destroy_reason or None,
        "owner": rec.owner,
    }


def detail_of(rec: FleetRecord, now: float, *, offset: int = 0, limit: int = 1000
              ) -> dict[str, Any]:
    """One fleet (``GET /v1/fleets/{name}``): a page of its members, its spec, its run.
    After a run that was retried, ``run`` shows the last attempt's summary only."""
    out = summary_of(rec, now)
    members = list(rec.members.values())
    out["member_list"] = [m.to_dict() for m in members[offset:offset + limit]]
    out["member_list_offset"] = offset
    out["member_list_total"] = len(members)
    out["spec"] = rec.spec_data
    run: dict[str, Any] | None = None
    if rec.provisioner is not None:
        run = {"run_id": rec.provisioner.run_id, "active": True,
               "started_at": rec.run_started_at}
    elif rec.summary is not None:
        run = {"run_id": rec.summary.run_id, "active": False,
               "started_at": rec.run_started_at, "summary": rec.summary.to_dict()}
    out["run"] = run
    out["removal"] = rec.removal.to_dict() if rec.removal is not None else None
    return out


def with_records(members: list[dict[str, Any]], records: list[MemberRecord]) -> None:
    """Add to each member of a page (``MemberView.to_dict()``) its record's fields
    (:data:`~fleet.engine.members.RECORD_ONLY`; empty for a member with no VM read):
    matched by VM, or by index while the view does not know the VM yet (a clone made
    by the run under way). The record's host, source and VM are vCenter's now."""
    by_vm = {r.vm: r for r in records}
    by_index: dict[int, MemberRecord] = {}
    for r in records:
        by_index.setdefault(r.index, r)
    for member in members:
        vm = member.get("vm")
        record = by_vm.get(vm) if vm else by_index.get(member["index"])
        if record is None:
            member.update(RECORD_ONLY)
            continue
        full = record.to_dict()
        member.update({k: full[k] for k in RECORD_ONLY})
        member["vm"] = record.vm
        member["host"] = record.host
        member["source"] = record.source or member.get("source")
