"""Placement: filters, scores, reasons, and properties over random clusters."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.engine.placement import (
    ClusterView,
    Code,
    HostState,
    NoFit,
    SourceState,
    Unlimited,
    explain,
    make_capacity,
    place,
)
from fleet.errors import PlacementError
from fleet.vsphere.model import HostInfo, Ref, VmInfo


def host(n: int, *, state: str = "connected", memory_mb: int = 512 * 1024,
         used_mb: int = 16 * 1024) -> HostInfo:
    return HostInfo(Ref("HostSystem", f"host-{n}"), f"esx-{n:02d}", state, False, memory_mb,
                    used_mb)


def source(name: str, h: int, *, frozen: bool = True, depth: int = 2, power: str = "poweredOn",
           budget: int = 200, memory_mb: int = 4096) -> SourceState:
    info = VmInfo(Ref("VirtualMachine", f"vm-{name}"), name, power,  # type: ignore[arg-type]
                  frozen, Ref("HostSystem", f"host-{h}"), f"esx-{h:02d}", None,
                  (Ref("Datastore", "ds-1"),), depth, memory_mb, "linux")
    return SourceState(name, info, budget)


def view(sources: list[SourceState], hosts: list[HostInfo]) -> ClusterView:
    return ClusterView({s.name: s for s in sources}, {h.ref: HostState(h) for h in hosts})


def per_host_capacity(v: ClusterView, limit: int) -> object:
    def blocked(s: SourceState) -> str | None:
        h = v.host_of(s)
        if h is not None and h.in_flight >= limit:
            return f"host {h.info.name} {h.in_flight}/{limit}"
        if s.running and s.in_flight >= 1:
            return "source busy"
        return None
    return make_capacity(blocked)


def test_frozen_is_strongly_preferred() -> None:
    v = view([source("run", 1, frozen=False, depth=1), source("frz", 1, depth=50)], [host(1)])
    picks = Counter(place(v, Unlimited(), random.Random(i)).source.name for i in range(50))
    assert picks == {"frz": 50}


def test_running_source_used_when_frozen_ones_are_full() -> None:
    v = view([source("frz", 1), source("run", 2, frozen=False, depth=1)], [host(1), host(2)])
    cap = per_host_capacity(v, 2)
    rng = random.Random(0)
    chosen = []
    for _ in range(3):
        d = place(v, cap, rng)  # type: ignore[arg-type]
        v.reserve(d.source)
        chosen.append(d.source.name)
    assert chosen == ["frz", "frz", "run"]
    with pytest.raises(NoFit) as info:
        place(v, cap, rng)  # type: ignore[arg-type]
    assert info.value.may_fit_later
    assert set(info.value.reasons) == {"frz", "run"}
    assert "esx-01 2/2" in info.value.reasons["frz"][0]
    assert info.value.reasons["run"] == ["source busy"]


def test_no_fit_lists_every_source_with_reason() -> None:
    srcs = [source("off", 1, power="poweredOff"), source("deep", 1, frozen=False, depth=20,
                                                           budget=20),
            source("gone", 2), source("retired", 1)]
    srcs[3].retired = "chain_too_deep: boom"
    v = view(srcs, [host(1), host(2, state="disconnected")])
    with pytest.raises(PlacementError) as info:
        place(v, Unlimited(), random.Random(0))
    err = info.value
    assert isinstance(err, NoFit) and not err.may_fit_later
    assert err.reasons == {
        "off": ["source is poweredOff"],
        "deep": ["chain depth 20 leaves no room in budget 20"],
        "gone": ["host esx-02 is disconnected"],
        "retired": ["retired: chain_too_deep: boom"],
    }
    for name in ("off", "deep", "gone", "retired"):
        assert name in str(err)


def test_budget_counts_in_flight_clones_of_a_running_source() -> None:
    s = source("run", 1, frozen=False, depth=8, budget=10)
    v = view([s], [host(1)])
    rng = random.Random(0)
    place(v, Unlimited(), rng)
    v.reserve(s)  # depth 8 + 1 in flight: one more fits (clone would be at 10)
    place(v, Unlimited(), rng)
    v.reserve(s)
    with pytest.raises(NoFit) as info:
        place(v, Unlimited(), rng)
    assert info.value.may_fit_later  # in-flight clones may fail and free room
    assert "2 in flight" in info.value.reasons["run"][0]
    v.unreserve(s, made=True)
    v.unreserve(s, made=True)
    assert s.info.chain_depth == 10 and s.clones_left == 0
    with pytest.raises(NoFit) as info:
        place(v, Unlimited(), rng)
    assert not info.value.may_fit_later


def test_frozen_source_at_budget_is_unresolvable() -> None:
    v = view([source("frz", 1, depth=200, budget=200)], [host(1)])
    status = explain(v, Unlimited())["frz"]
    assert status.code is Code.UNRESOLVABLE and status.plugin == "chain-budget"


def test_memory_headroom() -> None:
    small = host(1, memory_mb=40 * 1024, used_mb=30 * 1024)  # 10 GB free
    s = source("frz", 1, memory_mb=4096)
    v = view([s], [small])
    rng = random.Random(0)
    place(v, Unlimited(), rng)
    v.reserve(s)
    place(v, Unlimited(), rng)
    v.reserve(s)  # two 4 GB clones in flight: the third does not fit now
    with pytest.raises(NoFit) as info:
        place(v, Unlimited(), rng)
    assert info.value.may_fit_later
    assert "10240 MB free, 2 clones in flight" in info.value.reasons["frz"][0]
    full = view([source("frz", 1)], [host(1, memory_mb=18 * 1024, used_mb=16 * 1024)])
    assert explain(full, Unlimited())["frz"].code is Code.UNRESOLVABLE


def test_spread_across_hosts() -> None:
    srcs = [source(f"s{i}", i) for i in range(1, 5)]
    v = view(srcs, [host(i) for i in range(1, 5)])
    rng = random.Random(0)
    for _ in range(40):
        d = place(v, Unlimited(), rng)
        v.reserve(d.source)
        v.unreserve(d.source, made=True)
    assert {s.clones for s in srcs} == {10}


def test_ties_are_broken_at_random() -> None:
    srcs = [source(f"s{i}", 1) for i in range(4)]  # identical: same host, same depth
    v = view(srcs, [host(1)])
    firsts = {place(v, Unlimited(), random.Random(seed)).source.name for seed in range(40)}
    assert len(firsts) == 4


@st.composite
def clusters(draw: st.DrawFn) -> tuple[ClusterView, int]:
    n_hosts = draw(st.integers(1, 4))
    hosts = [host(i, state=draw(st.sampled_from(["connected"] * 4 + ["disconnected"])))
             for i in range(1, n_hosts + 1)]
    sources = []
    for i in range(draw(st.integers(1, 6))):
        frozen = draw(st.booleans())
        budget = draw(st.integers(1, 30))
        sources.append(source(f"s{i}", draw(st.integers(1, n_hosts)), frozen=frozen,
                              depth=draw(st.integers(0, 32)), budget=budget,
                              power=draw(st.sampled_from(["poweredOn"] * 5 + ["poweredOff"]))))
    return view(sources, hosts), draw(st.integers(1, 8))


@settings(max_examples=150, deadline=None)
@given(clusters(), st.integers(0, 2**32 - 1), st.integers(1, 300))
def test_property_placement_respects_budgets_hosts_and_slots(
        cluster: tuple[ClusterView, int], seed: int, jobs: int) -> None:
    """Whatever the cluster, place() only picks sources that pass every filter: no
    running source's projected chain passes its budget, no host exceeds its slots,
    nothing lands on a disconnected host or a powered-off source."""
    v, per_host = cluster
    cap = per_host_capacity(v, per_host)
    rng = random.Random(seed)
    in_flight: list[SourceState] = []
    for _ in range(jobs):
        try:
            d = place(v, cap, rng)  # type: ignore[arg-type]
        except NoFit as exc:
            assert set(exc.reasons) == set(v.sources)
            if not in_flight:
                # with nothing in flight, nothing can change: every reason is final
                assert not exc.may_fit_later
                break
            v.unreserve(in_flight.pop(rng.randrange(len(in_flight))), made=rng.random() < 0.9)
            continue
        s = d.source
        h = v.host_of(s)
        assert h is not None and h.info.connected and s.info.powered_on
        assert h.in_flight < per_host
        assert s.info.chain_depth + 1 <= s.budget
        if s.running:
            assert s.projected_depth + 1 <= s.budget
        v.reserve(s)
        in_flight.append(s)
        for src in v.sources.values():
            if src.running:
                assert src.projected_depth <= max(src.budget, src.info.chain_depth)
