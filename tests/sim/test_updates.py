"""The update stream's failure switches (``[updates]``, ``/_sim/updates``), in-process.

``withhold_initial``: a filter made while a ``WaitForUpdatesEx`` of its collector is
pending never reports its objects' initial state, but does report later changes;
one made while no wait is pending reports it as usual. ``drop_fraction``: a change
is lost with that probability (1.0: always).
"""

from __future__ import annotations

import asyncio
from typing import Any

from pyVmomi import vim, vmodl

from fleet.sim.calls import CallContext
from fleet.sim.propcollector import PropertyCollector
from fleet.sim.simulator import Simulator
from fleet.sim.topology import load_topology
from fleet.sim.vm import VirtualMachine

PC = vmodl.query.PropertyCollector


def _setup(**updates: Any) -> tuple[Simulator, CallContext, PropertyCollector, VirtualMachine]:
    topo = load_topology(None)
    topo = topo.model_copy(update={"updates": topo.updates.model_copy(update=updates)})
    sim = Simulator(topo, time_scale=0.0)
    session = sim.session_for(None)[0]
    session.authenticated, session.user = True, topo.vcenter.user
    pc = sim.inventory.get("propertyCollector")
    assert isinstance(pc, PropertyCollector)
    vm = next(v for v in sim.inventory.of_type(VirtualMachine) if v.name == "frozen-01")
    return sim, CallContext(session, "8.0.3.0"), pc, vm


def _spec(vm: VirtualMachine) -> Any:
    return PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm.ref)],
                         propSet=[PC.PropertySpec(type=vim.VirtualMachine,
                                                  pathSet=["runtime.instantCloneFrozen"])])


def _kinds(update: Any) -> list[str]:
    return [o.kind for f in (update.filterSet if update else ()) for o in f.objectSet]


def test_a_filter_made_during_a_pending_wait_never_reports_its_initial_state() -> None:
    sim, ctx, pc, vm = _setup(withhold_initial=True)

    async def run() -> None:
        # No wait pending: the initial state comes as usual.
        pc.CreateFilter(ctx, _spec(vm), False)
        first = await pc.WaitForUpdatesEx(ctx, "", PC.WaitOptions(maxWaitSeconds=0))
        assert _kinds(first) == ["enter"]
        waiting = asyncio.ensure_future(pc.WaitForUpdatesEx(ctx, first.version,
                                                            PC.WaitOptions(maxWaitSeconds=30)))
        await asyncio.sleep(0)  # the wait is pending now
        assert pc.state(ctx).waiting == 1
        pc.CreateFilter(ctx, _spec(vm), False)
        await asyncio.sleep(0)
        assert not waiting.done()  # the new filter's initial state did not wake it
        assert sim.update_faults.withheld == 1
        vm.unfreeze()  # a change: both filters report it, as a modify
        update = await waiting
        assert _kinds(update) == ["modify", "modify"]
        # And a wait from the returned version has nothing more: the enter is gone.
        assert await pc.WaitForUpdatesEx(ctx, update.version,
                                         PC.WaitOptions(maxWaitSeconds=0)) is None

    asyncio.run(run())


def test_dropped_changes_are_never_reported() -> None:
    sim, ctx, pc, vm = _setup(drop_fraction=1.0)

    async def run() -> None:
        pc.CreateFilter(ctx, _spec(vm), False)
        first = await pc.WaitForUpdatesEx(ctx, "", PC.WaitOptions(maxWaitSeconds=0))
        assert _kinds(first) == ["enter"]  # initial states are not changes
        vm.unfreeze()
        assert await pc.WaitForUpdatesEx(ctx, first.version,
                                         PC.WaitOptions(maxWaitSeconds=0)) is None
        assert sim.update_faults.dropped == 1
        sim.update_faults.drop_fraction = 0.0
        vm.freeze()
        later = await pc.WaitForUpdatesEx(ctx, first.version, PC.WaitOptions(maxWaitSeconds=0))
        assert _kinds(later) == ["modify"]
        change = later.filterSet[0].objectSet[0].changeSet[0]
        assert (change.name, change.val) == ("runtime.instantCloneFrozen", True)

    asyncio.run(run())
