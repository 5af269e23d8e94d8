"""Whole-run properties over random topologies, limits and faults (hypothesis).

Each example runs a complete provisioning against a fresh fake, so examples are
kept small and few; the fake's counters make the properties checkable.
"""

from __future__ import annotations

from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.engine import provision
from fleet.engine.reconcile import LABEL_NAME
from fleet.engine.spec import FleetSpec
from fleet.errors import ConnectionFailed, ResourceBusy
from fleet.vsphere.fake import FakeLatency, FakeVSphere, FaultRule
from tests.engine.conftest import CLONE_ONLY, make_spec, members
from tests.engine.conftest import options as opts


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    n_hosts = draw(st.integers(1, 4))
    return {
        "hosts": [draw(st.integers(1, 8)) for _ in range(n_hosts)],  # slots per host
        "frozen": draw(st.lists(st.integers(0, n_hosts - 1), max_size=4)),
        "running": draw(st.lists(st.tuples(st.integers(0, n_hosts - 1), st.integers(0, 30)),
                                 max_size=3)),
        "budget": draw(st.integers(1, 40)),
        "count": draw(st.integers(0, 120)),
        "per_host": draw(st.one_of(st.integers(1, 8), st.just("auto"))),
        "in_flight": draw(st.one_of(st.integers(1, 40), st.just("auto"))),
        "fault_p": draw(st.sampled_from([0.0, 0.0, 0.1, 0.3])),
        "lost_p": draw(st.sampled_from([0.0, 0.0, 0.1, 0.3])),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(sc: dict[str, Any]) -> tuple[FakeVSphere, FleetSpec]:
    fake = FakeVSphere(latency=FakeLatency(clone_s=0.0005, clone_per_depth_s=0.0), seed=sc["seed"])
    fake.add_datastore("ds-01")
    for h, slots in enumerate(sc["hosts"]):
        fake.add_host(f"esx-{h}", slots=slots)
    names: list[Any] = []
    for i, h in enumerate(sc["frozen"]):
        fake.add_vm(f"frozen-{i}", host=f"esx-{h}", state="frozen", chain_depth=2)
        names.append(f"frozen-{i}")
    for i, (h, depth) in enumerate(sc["running"]):
        fake.add_vm(f"running-{i}", host=f"esx-{h}", state="running", chain_depth=depth)
        names.append(f"running-{i}")
    if not names:
        fake.add_vm("frozen-x", host="esx-0", state="frozen", chain_depth=2)
        names.append("frozen-x")
    if sc["fault_p"]:
        fake.add_fault(FaultRule("start_instant_clone", ResourceBusy, probability=sc["fault_p"]))
    if sc["lost_p"]:
        fake.add_fault(FaultRule("instant_clone", ConnectionFailed, lost_reply=True,
                                 probability=sc["lost_p"]))
    spec = make_spec(count=sc["count"], sources=names, chain_budget=sc["budget"],
                     limits={"per_host": sc["per_host"], "in_flight": sc["in_flight"]},
                     retries={"attempts": 50, "backoff_base_s": 0.0005,
                              "backoff_max_s": 0.001},
                     timeouts={"clone_s": 0.2},
                     **CLONE_ONLY)
    return fake, spec


@settings(max_examples=40, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_property_run_invariants(sc: dict[str, Any]) -> None:
    fake, spec = build(sc)

    async def run() -> Any:
        async with fake:
            summary = await provision(spec, fake, options=opts(seed=sc["seed"]))
            await fake.wait_idle()
            return summary

    summary = anyio.run(run)
    got = members(fake, spec)

    # every index exists at most once, under its own name; exactly the ready ones exist
    assert all(len(names) == 1 for names in got.values()), got
    assert all(names == [spec.vm_name(i)] for i, names in got.items())
    assert len(got) == summary.ready
    assert summary.ready + summary.failed == spec.count
    assert sum(summary.failures.values()) == summary.failed
    # nothing foreign in the folder, nothing destroyed, no duplicates from lost replies
    assert all(vm.extra_config.get(LABEL_NAME) == "lt" for vm in fake.folder_vms("fleet/lt"))
    assert fake.stats.destroyed == 0

    # no source's chain ever passes the budget, and vCenter never refused a chain
    for src, depth in fake.stats.max_clone_depth_per_source.items():
        assert depth <= spec.budget_for(src), (src, depth)
    for i, (_, initial) in enumerate(sc["running"]):
        assert fake.vm(f"running-{i}").chain_depth <= max(spec.chain_budget, initial)
    assert fake.stats.task_errors["chain_too_deep"] == 0

    # in flight per host never exceeds a fixed limit; running sources one at a time
    if isinstance(sc["per_host"], int):
        assert max(fake.stats.max_in_flight_per_host.values(), default=0) <= sc["per_host"]
    if isinstance(sc["in_flight"], int):
        assert fake.stats.max_in_flight_total <= sc["in_flight"]
    for name, n in fake.stats.max_in_flight_per_source.items():
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
    from fleet.vsphere.fake import make_fake
    from tests.engine.conftest import CREDS, FROZEN4

    fake = make_fake(hosts=2, credentials=CREDS, seed=seed,
                     latency=FakeLatency(clone_s=0.01, guest_op_s=guest_op_s))
    if lost_p:
        fake.add_fault(FaultRule("start_instant_clone", ConnectionFailed, lost_reply=True,
                                 probability=lost_p))
        fake.add_fault(FaultRule("instant_clone", ConnectionFailed, lost_reply=True,
                                 probability=lost_p))
    spec = make_spec(count=count, sources=FROZEN4[:2],
                     timeouts={"cancel_grace_s": grace_s, "clone_s": 0.3},
                     retries={"attempts": 20, "backoff_base_s": 0.002, "backoff_max_s": 0.01})
    p = Provisioner(spec, fake, options=opts(seed=seed))

    async def run() -> None:
        async with fake:
            with anyio.move_on_after(cancel_after_s):
                await p.run()
            await fake.wait_idle()

    anyio.run(run)
    states = [vm.extra_config.get("guestinfo.fleet.state") for vm in fake.folder_vms("fleet/lt")]
    assert set(states) <= {"ready"}, states
    if p.summary is not None:  # None only when cut off before the run got going
        assert p.summary.ready == len(states)
        assert sum(p.summary.failures.values()) == count - p.summary.ready
    assert fake.stats.network_conflicts == 0
