"""Fleet lifetimes: the expiry label, what it means, and durations as people write them.

A fleet with a lifetime carries its expiry on every member, as the label
``guestinfo.fleet.expires_at`` (epoch seconds, an integer), so whoever enforces
it (``fleet serve``) finds it in vCenter after any restart. A request with a
TTL sets the expiry to *now + TTL*: new clones get the label at birth
(``EngineOptions.labels``) and existing members are relabelled
(:func:`stamp_expiry`); a request without one keeps the fleet's expiry (the run
reads it in its own listing of the folder: ``EngineOptions.keep_expiry``;
:func:`current_expiry` reads it alone), so the members always agree.

The fleet's expiry is read conservatively (:func:`fleet_expiry`): the latest of
its members' labels, and none at all if any member has no label. A fleet is
never destroyed before every member says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import anyio

from fleet.engine.reconcile import (
    LABEL_INDEX,
    LABEL_NAME,
    LABEL_RUN_ID,
    LABEL_SOURCE,
    LABEL_STATE,
    Member,
    as_member,
)
from fleet.engine.spec import FleetSpec
from fleet.errors import ConfigError, FleetError, VSphereError
from fleet.vsphere.model import ListedVm, VSphere

LABEL_EXPIRES_AT = "guestinfo.fleet.expires_at"
#: the API client a fleet made by ``fleet serve`` belongs to (fleet.api.tokens); the
#: engine only carries it (``EngineOptions.labels``), like the expiry
LABEL_OWNER = "guestinfo.fleet.owner"
#: a warm pool's member: the pool's name (fleet.api.pools, docs/pools.md)
LABEL_POOL = "guestinfo.fleet.pool"
#: a pool member's lease: ``idle <instance> <spec digest>`` or ``leased <id> <client> <granted>
#: <expires> <max>`` (docs/pools.md); the engine only carries it, like the owner
LABEL_LEASE = "guestinfo.fleet.lease"
#: Every label fleet writes on a member: what a listing of a fleet's folder reads (by
#: key, docs/reads.md), and what a clone clears when it does not set it.
FLEET_LABELS = (LABEL_NAME, LABEL_INDEX, LABEL_RUN_ID, LABEL_SOURCE, LABEL_STATE,
                LABEL_EXPIRES_AT, LABEL_OWNER, LABEL_POOL, LABEL_LEASE)
#: the longest lifetime accepted (a year): past it, "forever" is meant; say so by giving none
MAX_TTL_S = 366 * 24 * 3600.0
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str, *, key: str = "--ttl") -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d``, ``1h30m`` -> seconds. ConfigError otherwise."""
    raw = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", raw):
        seconds = float(raw)
    else:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(raw):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(raw) or not raw:
            raise ConfigError(f"{text!r} is not a duration like 90s, 15m, 2h, 1d or 1h30m",
                              key=key)
    return check_ttl(seconds, key=key)


def check_ttl(seconds: float, *, key: str = "ttl_s") -> float:
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{seconds!r} must be a positive number of seconds", key=key)
    if seconds > MAX_TTL_S:
        raise ConfigError(f"{seconds:g} s is longer than the {MAX_TTL_S:g} s (366 days) "
                          "fleet accepts; give no TTL for a fleet that lives until destroyed",
                          key=key)
    return seconds


def expiry_labels(expires_at: float | None) -> dict[str, str]:
    """The label new clones get (none for a fleet without an expiry)."""
    return {} if expires_at is None else {LABEL_EXPIRES_AT: str(math.ceil(expires_at))}


def expires_at_of(extra_config: Mapping[str, str]) -> float | None:
    """A member's expiry label, or None if it has none (or one fleet did not write)."""
    raw = extra_config.get(LABEL_EXPIRES_AT, "")
    # ASCII digits only: str.isdigit() also takes other scripts' digits (float("\u0663")
    # is 3.0, an expiry in 1970) and superscripts (float("\u00b2") raises).
    return float(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 12 else None


def fleet_expiry(members: Iterable[Member]) -> float | None:
    """The latest expiry of the members; None if any has none, or there are no members."""
    latest: float | None = None
    for member in members:
        at = expires_at_of(member.vm.labels)
        if at is None:
            return None
        latest = at if latest is None else max(latest, at)
    return latest


async def _members(spec: FleetSpec, vs: VSphere) -> list[Member]:
    with anyio.fail_after(spec.timeouts.call_s):
        folder = await vs.find_folder(spec.folder_path)
        vms: list[ListedVm] = (await vs.list_folder_vms(folder, FLEET_LABELS)
                                if folder is not None else [])
    return [m for m in (as_member(vm, spec.name) for vm in vms) if m is not None]


async def current_expiry(spec: FleetSpec, vs: VSphere) -> float | None:
    """The fleet's expiry as its members in vCenter have it."""
    return fleet_expiry(await _members(spec, vs))


async def stamp_expiry(spec: FleetSpec, vs: VSphere, expires_at: float, *,
                       members: Iterable[Member] | None = None, concurrency: int = 16) -> int:
    """Label every member whose expiry differs with ``expires_at``; returns how many were
    relabelled. Only labelled members of the fleet are touched. A failed write raises
    (after the others were tried), so a caller never believes a half-stamped fleet done."""
    value = expiry_labels(expires_at)
    todo = [m for m in (members if members is not None else await _members(spec, vs))
            if m.vm.labels.get(LABEL_EXPIRES_AT) != value[LABEL_EXPIRES_AT]]
    limiter = anyio.CapacityLimiter(max(1, concurrency))
    errors: list[FleetError | TimeoutError] = []

    async def one(member: Member) -> None:
        async with limiter:
            try:
                with anyio.fail_after(spec.timeouts.call_s):
                    await vs.update_extra_config(member.vm.ref, value)
            except (FleetError, TimeoutError) as exc:
                # The write is absolute: one whose reply was lost, or came too late, may
                # have landed all the same. Look before calling it failed.
                refused = isinstance(exc, VSphereError) and not exc.transient
                if refused or not await _carries(member, value):
                    errors.append(exc)

    async def _carries(member: Member, labels: Mapping[str, str]) -> bool:
        try:
            with anyio.fail_after(spec.timeouts.call_s):
                info = await vs.get_vm(member.vm.ref)
        except (FleetError, TimeoutError):
            return False
        return all(info.extra_config.get(k) == v for k, v in labels.items())

    async with anyio.create_task_group() as tg:
        for member in todo:
            tg.start_soon(one, member)
    if errors:
        first = errors[0]
        raise FleetError(f"could not label {len(errors)} of {len(todo)} members of fleet "
                         f"{spec.name} with their expiry: {first}") from first
    return len(todo)
