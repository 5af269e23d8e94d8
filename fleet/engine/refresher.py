"""The run's view of sources and hosts, and keeping it current.

:func:`load_view` reads the spec's sources and the hosts into a placement
view (:class:`~fleet.engine.placement.ClusterView`). While the run goes,
:class:`Refresher` is the one place that view changes on vCenter's word: the
periodic inventory refresh (memory, connection, power and freeze state, chain
depth), a source read back after a clone attempt, a source retired (chain
budget reached, or a fault vCenter blamed on it) and a host excluded. Each
change is reported as an event and wakes the dispatcher, which may now place
differently.
"""

from __future__ import annotations

from dataclasses import replace

import anyio

from fleet.engine.events import HostExcluded, SourceRetired, SourceStateChanged
from fleet.engine.placement import ClusterView, HostState, PlacementPolicy, SourceState
from fleet.engine.runstate import RunContext
from fleet.engine.sources import resolve_sources
from fleet.engine.spec import FleetSpec
from fleet.errors import VSphereError
from fleet.vsphere.model import Ref, VmInfo, VSphere


async def load_view(spec: FleetSpec, vs: VSphere, policy: PlacementPolicy | None = None
                    ) -> ClusterView:
    """Resolve the spec's sources and the hosts into a placement view.

    A source vCenter does not know, or one VM named twice, is a :class:`ConfigError`
    naming the entries (:func:`~fleet.engine.sources.resolve_sources`)."""
    infos = await resolve_sources(spec, vs)
    with anyio.fail_after(spec.timeouts.call_s):
        hosts = await vs.list_hosts()
        datastores = await vs.list_datastores()
    sources = {s.name: SourceState(s.name, info, spec.budget_for(s.name))
               for s, info in zip(spec.sources, infos, strict=True)}
    return ClusterView(sources, {h.ref: HostState(h) for h in hosts},
                       policy or PlacementPolicy(),
                       datastore_names={d.ref: d.name for d in datastores})


class Refresher:
    """Keeps ``view`` current for one run; :meth:`run` is its periodic refresh."""

    def __init__(self, ctx: RunContext, view: ClusterView, interval_s: float) -> None:
        self._ctx = ctx
        self.view = view
        self._interval_s = interval_s

    def retire(self, src: SourceState, reason: str, message: str) -> None:
        """Place no more clones on ``src`` (once; later calls change nothing)."""
        if self.view.retire(src.name, f"{reason}: {message}"):
            self._ctx.emit(SourceRetired, source=src.name, reason=reason,
                           chain_depth=src.info.chain_depth, message=message)
            self._ctx.wake.set()

    def exclude_host(self, host: Ref, name: str, error: VSphereError) -> None:
        """Place no more clones on ``host``, which vCenter blamed for ``error``."""
        if self.view.exclude_host(host, f"{error.reason}: {error}"):
            self._ctx.emit(HostExcluded, host=name, reason=error.reason, message=str(error))

    def report(self, src: SourceState) -> None:
        """Say how the run sees ``src`` now (at the start, and on every change)."""
        self._ctx.emit(SourceStateChanged, source=src.name, host=src.info.host_name or "",
                       chain_depth=src.info.chain_depth, clones_left=src.clones_left,
                       frozen=src.info.frozen, powered_on=src.info.powered_on)

    def update_source(self, src: SourceState, info: VmInfo, *,
                      before: VmInfo | None = None) -> None:
        """Take a new view of a source (and retire it if its chain is at the budget)."""
        old = before or src.info
        src.info = info
        if (old.chain_depth, old.frozen, old.power_state) != \
                (info.chain_depth, info.frozen, info.power_state):
            self.report(src)
        if src.info.chain_depth + 1 > src.budget:  # chains only grow: this is final
            self.retire(src, "chain_budget", f"chain budget {src.budget} reached")

    async def read_source(self, src: SourceState) -> VmInfo | None:
        """The source as vCenter has it now, or None if it could not say."""
        try:
            with anyio.fail_after(self._ctx.spec.timeouts.call_s):
                return await self._ctx.vs.get_vm(src.ref)
        except (VSphereError, TimeoutError):
            return None  # the periodic refresh will try again

    async def run(self) -> None:
        """Refresh hosts and sources every ``interval_s``: memory use, connection
        state, power and freeze state, chain depth."""
        view = self.view
        vs = self._ctx.vs
        while True:
            await anyio.sleep(self._interval_s)
            try:
                with anyio.fail_after(self._ctx.spec.timeouts.call_s):
                    for info in await vs.list_hosts():
                        state = view.hosts.get(info.ref)
                        if state is None:
                            view.hosts[info.ref] = HostState(info)
                        else:
                            state.info = info
                    for src in view.sources.values():
                        if src.retired is not None:
                            continue
                        busy, made = bool(src.in_flight or src.phantoms), src.clones
                        vm_info = await vs.get_vm(src.ref)
                        if src.running and (busy or src.in_flight or src.phantoms
                                            or src.clones != made):
                            # vCenter counts an in-flight clone in the chain from its stun
                            # on, and placement adds it too: keep our own count of the
                            # depth until the source is idle; take power and freeze state.
                            # Idle for the whole read: a clone that started and landed
                            # while the reply was on its way is missing from it.
                            vm_info = replace(vm_info, chain_depth=src.info.chain_depth)
                        self.update_source(src, vm_info)
            except (VSphereError, TimeoutError):
                continue  # a refresh is an optimisation; the next one may work
            self._ctx.wake.set()
