"""fleet's Python API for scripts and test suites: load a spec, open its target, provision,
read the members, destroy (docs/python-api.md).

``fleet/__init__.py`` re-exports these names lazily, so ``import fleet`` stays cheap;
this module (and the engine, the client, pydantic) loads on first use. It does what the
CLI does, by the same rules: the vCenter is found as ``fleet.target.connect_spec``
finds it (docs/connecting.md: the spec, then ``FLEET_VCENTER_*``, then ``GOVC_*``),
the built-in simulator is started only when none is named and is always announced,
``provision`` and ``destroy`` hold the fleet's lock (docs/locking.md), and the member
records are those of ``fleet inventory`` (docs/inventory.md). Nothing is printed: the
announcements go to ``announce`` or, by default, to the ``fleet`` logger at WARNING.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from fleet.engine.connection import HOW_TO_POINT
from fleet.engine.events import EventCallback
from fleet.engine.lifetime import check_ttl, parse_duration
from fleet.engine.lock import LockHeld, LockOptions
from fleet.engine.members import MemberRecord, member_records
from fleet.engine.operations import FleetStatus, destroy, status
from fleet.engine.operations import provision as provision_fleet
from fleet.engine.run import EngineOptions
from fleet.engine.spec import MAX_COUNT, FleetSpec, read_toml, spec_from_dict
from fleet.engine.summary import RemovalSummary, Summary
from fleet.errors import ConfigError, FleetError
from fleet.target import Target, connect_spec, demo_spec, open_target

log = logging.getLogger("fleet")

#: the slowest time scale of the built-in simulator (as ``--sim-time-scale``)
MAX_SIM_TIME_SCALE = 100.0
#: how long :func:`provisioned` gives its destroy on the way out, by default
CLEANUP_TIMEOUT_S = 600.0

Announce = Callable[[str], object]


class ProvisionIncomplete(FleetError):
    """A run ended without every member ready; ``summary`` says why for each one."""

    reason = "incomplete"

    def __init__(self, summary: Summary) -> None:
        self.summary = summary
        reasons = ", ".join(f"{why} {n}" for why, n in sorted(summary.failures.items())
                            ) or ("cancelled" if summary.cancelled else "no reason given")
        super().__init__(f"fleet {summary.fleet}: {summary.ready} of {summary.requested} "
                         f"members ready ({reasons})")



def _default_announce(message: str) -> None:
    log.warning("%s", message)


def load_spec(spec: str | os.PathLike[str] | Mapping[str, Any], *,
              env: Mapping[str, str] | None = None, **overrides: Any) -> FleetSpec:
    """A validated fleet spec from a TOML file or a dict in the file's shape.

    ``overrides`` replace top-level keys (``count=20``, ``name="lt-2"``) before
    validation, so they are checked with the rest. Secrets (``password_env``,
    ``guest_password_env``) are read from ``env`` (default: the process
    environment); a file's relative paths are taken from its directory, a dict's from
    the current one. A bad spec raises :class:`~fleet.engine.spec.SpecError` (a
    :class:`~fleet.errors.ConfigError`) naming the file and the dotted key."""
    if isinstance(spec, Mapping):
        raw = dict(spec)
        source, base = "<dict>", None
    else:
        path = Path(spec)
        raw = read_toml(path)
        source, base = path.name, path.resolve().parent
    if overrides:
        raw.update(overrides)
        source += f" (with overrides: {', '.join(sorted(overrides))})"
    return spec_from_dict(raw, source=source, env=env, base_dir=base)


class Fleet:
    """A handle on one fleet and the vCenter (or built-in simulator) it lives on; made by
    :func:`open`. Every method may be called many times while the handle is open."""

    def __init__(self, spec: FleetSpec, target: Target, *,
                 on_event: EventCallback | None = None, wait_lock: float | None = 0.0) -> None:
        self.spec = spec
        self._target = target
        self._on_event = on_event
        self._wait_lock = wait_lock

    @property
    def simulated(self) -> bool:
        """True when this handle started the built-in simulator (nothing named a vCenter):
        the fleet goes when the handle closes."""
        return self._target.simulated

    @property
    def url(self) -> str:
        """The vCenter's SDK URL, user info hidden."""
        return self._target.url

    def _lock(self) -> LockOptions:
        return LockOptions(wait_s=self._wait_lock)

    async def provision(self, count: int | None = None, *,
                        ttl: float | str | None = None) -> Summary:
        """Bring the fleet to ``count`` (default: the spec's) ready members, holding the
        fleet's lock as ``fleet provision`` does; returns the run's summary (check
        ``summary.complete``). ``ttl``: the fleet's lifetime from now, seconds or a
        duration (``"2h"``), recorded on every member for ``fleet serve`` to honour.

        Raises LockHeld when another run holds the lock (past ``wait_lock``), LockLost
        (carrying the summary) when this run lost it. Cancelling stops the run cleanly:
        in-flight clones finish within ``timeouts.cancel_grace_s`` or are destroyed."""
        spec = self.spec
        if count is not None:
            if isinstance(count, bool) or not isinstance(count, int) or \
                    not 1 <= count <= MAX_COUNT:
                raise ConfigError(f"{count!r} is not a count from 1 to {MAX_COUNT} "
                                  "(destroy() removes every member)", key="count")
            spec = spec_with(spec, count=count)
        ttl_s = _ttl_seconds(ttl)
        # Without a ttl the fleet keeps the expiry it has, as `fleet provision` does.
        return await provision_fleet(spec, self._target.client, on_event=self._on_event,
                                     options=EngineOptions(keep_expiry=ttl_s is None),
                                     lock=self._lock(),
                                     expires_at=None if ttl_s is None
                                     else time.time() + ttl_s)

    async def members(self) -> list[MemberRecord]:
        """Every member as a record with its addresses, sorted by index: the records of
        ``fleet inventory`` (docs/inventory.md). A member without an address of its own
        has ``ip`` None and says why in ``address_status``."""
        return await member_records(self.spec, self._target.client)

    async def status(self) -> FleetStatus:
        """The members by state, missing and extra indexes, who holds the lock. Changes
        nothing."""
        return await status(self.spec, self._target.client)

    async def destroy(self) -> RemovalSummary:
        """Power off and destroy every member (and nothing else), holding the fleet's
        lock; the fleet's own folder goes too when empty, as with ``fleet destroy``."""
        return await destroy(self.spec, self._target.client, lock=self._lock(),
                             remove_folder=self.spec.folder is None)

    @contextlib.asynccontextmanager
    async def provisioned(self, count: int | None = None, *, ttl: float | str | None = None,
                          keep: bool = False, require_complete: bool = True,
                          cleanup_timeout: float = CLEANUP_TIMEOUT_S
                          ) -> AsyncIterator[list[MemberRecord]]:
        """Provision, yield the member records, and destroy the fleet on the way out
        unless ``keep``: also when provisioning fails, the body raises or the task is
        cancelled. The destroy is shielded from cancellation and bounded by
        ``cleanup_timeout`` seconds. With ``require_complete`` (the default) a run that
        leaves members not ready raises :class:`ProvisionIncomplete` (after the
        destroy). A fleet whose lock another run holds is neither provisioned nor
        destroyed: LockHeld propagates."""
        try:
            summary = await self.provision(count, ttl=ttl)
        except LockHeld:
            raise
        except BaseException as exc:
            await self._cleanup(keep, cleanup_timeout, exc)
            raise
        try:
            if require_complete and not summary.complete:
                raise ProvisionIncomplete(summary)
            yield await self.members()
        except BaseException as exc:
            await self._cleanup(keep, cleanup_timeout, exc)
            raise
        await self._cleanup(keep, cleanup_timeout, None)

    async def _cleanup(self, keep: bool, bound_s: float, error: BaseException | None) -> None:
        if keep:
            return
        failure: BaseException | None = None
        result: RemovalSummary | None = None
        with anyio.CancelScope(shield=True), anyio.move_on_after(bound_s):
            try:
                result = await self.destroy()
            except Exception as exc:
                failure = exc
        if result is not None and not result.failed:
            return
        why = (f"did not finish within {bound_s:g} s" if result is None and failure is None
               else str(failure) if failure is not None
               else f"{result.failed} members were not destroyed" if result else "")
        message = f"fleet {self.spec.name}: the destroy on the way out failed: {why}"
        if error is not None:
            # The body's error is what the caller needs first; this one goes with it.
            error.add_note(message)
            log.error("%s", message)
            return
        raise FleetError(message) from failure


def spec_with(spec: FleetSpec, **changes: Any) -> FleetSpec:
    """A copy of ``spec`` with top-level fields changed and the private attributes
    (origin, resolved secrets) kept."""
    return spec.model_copy(update=changes)


def _ttl_seconds(ttl: float | str | None) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, str):
        return parse_duration(ttl, key="ttl")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
        raise ConfigError(f"{ttl!r} is not a number of seconds", key="ttl")
    return check_ttl(float(ttl), key="ttl")


@contextlib.asynccontextmanager
async def open(spec: FleetSpec, *, simulator: bool = True,
               announce: Announce | None = None, env: Mapping[str, str] | None = None,
               sim_time_scale: float = 1.0, on_event: EventCallback | None = None,
               wait_lock: float | None = 0.0) -> AsyncIterator[Fleet]:
    """A :class:`Fleet` handle on ``spec``'s fleet, connected to its vCenter: the spec's
    ``[vcenter]``, else the one ``FLEET_VCENTER_*`` or ``GOVC_*`` in ``env`` (default:
    the process environment) names, else a built-in simulator started for the handle
    and stopped when it closes (``sim_time_scale`` speeds it up or slows it down).

    ``simulator=False`` refuses (ConfigError) instead of starting one: for a script
    that reads or destroys a fleet that already exists. A variable set but unusable is
    a ConfigError naming it, never a simulator. ``announce`` hears where the vCenter
    came from and that the simulator was started (default: the ``fleet`` logger at
    WARNING). ``wait_lock``: seconds to wait for the fleet's lock (None: for ever).
    ``on_event`` hears every engine event of ``provision``."""
    say = announce if announce is not None else _default_announce
    if not 0 < sim_time_scale <= MAX_SIM_TIME_SCALE:  # NaN fails both
        raise ConfigError(f"{sim_time_scale} must be above 0 and at most "
                          f"{MAX_SIM_TIME_SCALE:g}", key="sim_time_scale")
    if wait_lock is not None and not 0 <= wait_lock < math.inf:
        raise ConfigError(f"{wait_lock} is not a number of seconds (None waits for ever)",
                          key="wait_lock")
    connected = connect_spec(spec, env=env, announce=say)
    # The connection (and the client's own tasks: its vCenter update loop) must outlive
    # a cancellation of the caller, or a destroy on the way out (``provisioned``) could
    # not wait for its tasks. So it runs shielded, and the body runs in a scope of its
    # own that a watcher outside the shield cancels when the caller is cancelled.
    if not simulator and connected.vcenter is None:
        raise ConfigError("fleet.open(simulator=False) is for a fleet that already exists, "
                          "and no vCenter is named (a built-in simulator would start empty): "
                          + HOW_TO_POINT)
    error: Exception | None = None
    async with anyio.create_task_group() as watch:
        try:
            with anyio.CancelScope(shield=True):
                async with open_target(connected, announce=say,
                                       sim_time_scale=sim_time_scale) as target:
                    with anyio.CancelScope() as body:
                        watch.start_soon(_cancel_when_cancelled, body)
                        yield Fleet(connected, target, on_event=on_event,
                                    wait_lock=wait_lock)
        except Exception as exc:
            # Raised past the watcher's task group, which would wrap it in an exception
            # group: the caller gets its own error (or the connection's) as it was.
            error = exc
        if error is None:
            # A body cancelled by the watcher ended quietly inside its own scope: the
            # caller's cancellation is raised here, outside the shield, where it belongs.
            await anyio.lowlevel.checkpoint()
        watch.cancel_scope.cancel()
    if error is not None:
        raise error


async def _cancel_when_cancelled(scope: anyio.CancelScope) -> None:
    try:
        await anyio.sleep_forever()
    finally:
        scope.cancel()


@contextlib.asynccontextmanager
async def provisioned(spec: FleetSpec, count: int | None = None, *, keep: bool = False,
                      ttl: float | str | None = None, require_complete: bool = True,
                      cleanup_timeout: float = CLEANUP_TIMEOUT_S, **open_options: Any
                      ) -> AsyncIterator[list[MemberRecord]]:
    """:func:`open` the fleet, then :meth:`Fleet.provisioned`: yields the member
    records, destroys the fleet on the way out unless ``keep``. ``open_options`` are
    :func:`open`'s."""
    async with open(spec, **open_options) as handle, handle.provisioned(
            count, ttl=ttl, keep=keep, require_complete=require_complete,
            cleanup_timeout=cleanup_timeout) as members:
        yield members


__all__ = [
    "CLEANUP_TIMEOUT_S", "Fleet", "ProvisionIncomplete", "demo_spec", "load_spec", "open",
    "provisioned", "spec_with",
]
