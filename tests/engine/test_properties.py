"""Whole-run properties over random topologies, limits and faults (hypothesis).

Each example runs a complete provisioning against a fresh simulator in process
(the real client over the loopback transport), so examples are kept small and
few; the simulator's high-water marks make the properties checkable.
"""

from __future__ import annotations

from typing import Any

import anyio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fleet.engine import provision
from fleet.engine.reconcile import LABEL_NAME
from fleet.engine.spec import FleetSpec
from fleet.sim.topology import DatastoreConfig, HostConfig, Topology, VmConfig
from fleet.testing.harness import FAST, SimVCenter, sim_vsphere
from tests.engine.conftest import CLONE_ONLY, guest, make_spec, members, topology
from tests.engine.conftest import options as opts


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    n_hosts = draw(st.integers(1, 4))
    return {
        "hosts": [draw(st.integers(1, 8)) for _ in range(n_hosts)],  # slots per host
        "frozen": draw(st.lists(st.integers(0, n_hosts - 1), max_size=4)),
        # a VM's chain is at least its base disk: depth 1
        "running": draw(st.lists(st.tuples(st.integers(0, n_hosts - 1), st.integers(1, 30)),
                                 max_size=3)),
        "budget": draw(st.integers(1, 40)),
        # up to 80 (120 on the in-memory model): budgets of 1 to 40 still run out
        "count": draw(st.integers(0, 80)),
        "per_host": draw(st.one_of(st.integers(1, 8), st.just("auto"))),
        "in_flight": draw(st.one_of(st.integers(1, 40), st.just("auto"))),
        "fault_p": draw(st.sampled_from([0.0, 0.0, 0.1, 0.3])),
        "lost_p": draw(st.sampled_from([0.0, 0.0, 0.1, 0.3])),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(sc: dict[str, Any]) -> tuple[Topology, FleetSpec]:
    sources: list[VmConfig] = []
    for i, h in enumerate(sc["frozen"]):
        sources.append(VmConfig(name=f"frozen-{i}", host=f"esx-{h}", state="frozen",
                                chain_depth=2, guest=guest()))
    for i, (h, depth) in enumerate(sc["running"]):
        sources.append(VmConfig(name=f"running-{i}", host=f"esx-{h}", state="running",
                                chain_depth=depth, guest=guest()))
    if not sources:
        sources.append(VmConfig(name="frozen-x", host="esx-0", state="frozen", chain_depth=2,
                                guest=guest()))
    topo = Topology(latency=FAST.model_copy(update={"per_chain_level_s": 0.0}),
                    hosts=[HostConfig(name=f"esx-{h}", slots=slots)
                           for h, slots in enumerate(sc["hosts"])],
                    datastores=[DatastoreConfig(name="ds-01")], sources=sources,
                    seed=sc["seed"])
    spec = make_spec(count=sc["count"], sources=[v.name for v in sources],
                     chain_budget=sc["budget"],
                     limits={"per_host": sc["per_host"], "in_flight": sc["in_flight"]},
                     retries={"attempts": 50, "backoff_base_s": 0.0005,
                              "backoff_max_s": 0.001},
                     timeouts={"clone_s": 0.2},
                     **CLONE_ONLY)
    return topo, spec


def add_faults(vc: SimVCenter, sc: dict[str, Any]) -> None:
    if sc["fault_p"]:  # vCenter busy: the clone call is refused (ResourceBusy)
        vc.add_fault(method="InstantClone_Task", fault="TaskInProgress", phase="call",
                     probability=sc["fault_p"])
    if sc["lost_p"]:
        # the clone is made, and its task says it failed (SystemError) ...
        vc.add_fault(method="InstantClone_Task", fault="SystemError", phase="after",
                     probability=sc["lost_p"])
        # ... or vCenter takes the clone and the submit's reply is lost: the clone runs
        # without a task the engine knows of (it must still count against the limits)
        vc.add_fault(method="InstantClone_Task", fault="http:lost_reply",
                     probability=sc["lost_p"])


@settings(max_examples=40, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
# a running source next to a frozen one, submits whose replies are lost: a lost submit
# used to hand its tokens back at once, and a second clone of the running source
# reached vCenter while the first ran (found on the in-memory model, count 93)
@example({"hosts": [3, 7, 7, 1], "frozen": [0], "running": [(2, 1)], "budget": 25,
          "count": 80, "per_host": "auto", "in_flight": "auto", "fault_p": 0.0,
          "lost_p": 0.3, "seed": 14498})
# two running sources, room for four clones, three asked: a lost clone that lands takes
# the last of its source's budget while its job waits to retry; the job must adopt it
@example({"hosts": [1], "frozen": [], "running": [(0, 1), (0, 1)], "budget": 3, "count": 3,
          "per_host": "auto", "in_flight": "auto", "fault_p": 0.0, "lost_p": 0.3, "seed": 0})
def test_property_run_invariants(sc: dict[str, Any]) -> None:
    topo, spec = build(sc)
    vc: SimVCenter

    async def run() -> Any:
        nonlocal vc
        async with sim_vsphere(topo) as (vs, vc):
            add_faults(vc, sc)
            summary = await provision(spec, vs, options=opts(seed=sc["seed"]))
            await vc.wait_idle()
            return summary

    summary = anyio.run(run)
    got = members(vc, spec)

    # every index exists at most once, under its own name; exactly the ready ones exist
    assert all(len(names) == 1 for names in got.values()), got
    assert all(names == [spec.vm_name(i)] for i, names in got.items())
    assert len(got) == summary.ready
    assert summary.ready + summary.failed == spec.count
    assert sum(summary.failures.values()) == summary.failed
    # nothing foreign in the folder, nothing destroyed, no duplicates from lost replies
    assert all(vm.extra_config.get(LABEL_NAME) == "lt" for vm in vc.folder_vms("fleet/lt"))
    assert vc.destroyed == 0

    # no source's chain ever passes the budget, and vCenter never refused a chain
    for src, depth in vc.clones.max_depth_by_source.items():
        assert depth <= spec.budget_for(src), (src, depth)
    for i, (_, initial) in enumerate(sc["running"]):
        assert vc.vm(f"running-{i}").chain_depth() <= max(spec.chain_budget, initial)
    assert vc.clones.faults["GenericVmConfigFault"] == 0

    # in flight per host never exceeds a fixed limit; running sources one at a time
    if isinstance(sc["per_host"], int):
        assert max(vc.clones.peak("host").values(), default=0) <= sc["per_host"]
    if isinstance(sc["in_flight"], int):
        assert vc.clones.max_in_flight[""] <= sc["in_flight"]
    for name, n in vc.clones.peak("source").items():
        if name.startswith("running-"):
            assert n <= 1

    # with only transient trouble and room in the budgets, everything gets made
    frozen_ok = bool(sc["frozen"]) or not sc["running"]
    if frozen_ok and spec.chain_budget >= 3:
        assert summary.ready == spec.count, summary.failures


@settings(max_examples=25, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(count=st.integers(1, 60), cancel_after_s=st.floats(0.0, 0.08),
       grace_s=st.sampled_from([0.0, 0.005, 5.0]), lost_p=st.sampled_from([0.0, 0.3]),
       guest_op_s=st.sampled_from([0.0, 0.01]), seed=st.integers(0, 2**16))
def test_property_cancel_leaves_nothing_half_made(count: int, cancel_after_s: float,
                                                  grace_s: float, lost_p: float,
                                                  guest_op_s: float, seed: int) -> None:
    """Cut a run off at any moment: afterwards every VM in the fleet's folder is a
    ready member, and the summary counts exactly those."""
    from fleet.engine.run import Provisioner
    from tests.engine.conftest import FROZEN4

    topo = topology(hosts=2, seed=seed,
                    latency={"instant_clone_s": 0.01, "guest_program_s": guest_op_s})
    spec = make_spec(count=count, sources=FROZEN4[:2],
                     timeouts={"cancel_grace_s": grace_s, "clone_s": 0.3},
                     retries={"attempts": 20, "backoff_base_s": 0.002, "backoff_max_s": 0.01})
    vc: SimVCenter
    p: Provisioner | None = None

    async def run() -> None:
        nonlocal vc, p
        async with sim_vsphere(topo) as (vs, vc):
            if lost_p:
                # clone calls whose reply never comes back (the task runs), and clones
                # made whose task says it failed
                vc.add_fault(method="InstantClone_Task", fault="http:lost_reply",
                             probability=lost_p)
                vc.add_fault(method="InstantClone_Task", fault="SystemError", phase="after",
                             probability=lost_p)
            p = Provisioner(spec, vs, options=opts(seed=seed))
            with anyio.move_on_after(cancel_after_s):
                await p.run()
            await vc.wait_idle()

    anyio.run(run)
    assert p is not None
    states = [vm.extra_config.get("guestinfo.fleet.state") for vm in vc.folder_vms("fleet/lt")]
    assert set(states) <= {"ready"}, states
    if p.summary is not None:  # None only when cut off before the run got going
        assert p.summary.ready == len(states)
        assert sum(p.summary.failures.values()) == count - p.summary.ready
    assert vc.network_conflicts == 0
