"""Placement: which source takes the next clone, decided at dispatch time.

Modelled on the Kubernetes scheduler framework. Every source is run through
*filter* plugins (cheapest first), each returning a :class:`Status`:
``SUCCESS``, ``UNSCHEDULABLE`` (may fit later: slots busy, memory in flight) or
``UNRESOLVABLE`` (never, this run: powered off, budget spent, host gone). The
survivors are scored by weighted *score* plugins (0..100 each), ties broken at
random. When nothing fits, :class:`NoFit` (a :class:`~fleet.errors.PlacementError`)
carries every source's reasons so "why is this unschedulable" can be printed.

This module owns the live view placement reads (:class:`ClusterView`,
:class:`SourceState`, :class:`HostState`) and :func:`place`, which is pure and
synchronous: it never awaits and never changes the view. The dispatcher reserves
what it chose (:meth:`ClusterView.reserve`) before its next await.
"""

from __future__ import annotations

import contextlib
import enum
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

from fleet.errors import PlacementError
from fleet.vsphere.model import HostInfo, Ref, VmInfo


class Code(enum.Enum):
    SUCCESS = "success"
    UNSCHEDULABLE = "unschedulable"  # may fit later
    UNRESOLVABLE = "unresolvable"  # will not fit this run


@dataclass(frozen=True)
class Status:
    code: Code
    plugin: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.code is Code.SUCCESS


SUCCESS = Status(Code.SUCCESS)


@dataclass
class SourceState:
    """A source as the run sees it: last inventory view plus the run's own bookkeeping."""

    name: str  # as the spec names it
    info: VmInfo
    budget: int
    in_flight: int = 0  # clones submitted, not finished
    clones: int = 0  # clones made this run
    retired: str | None = None  # why the run stopped using it
    #: deadlines of clones whose outcome is unknown (a lost reply): a running source's
    #: chain may still grow by one for each, so they count until then
    phantoms: list[float] = field(default_factory=list)

    @property
    def ref(self) -> Ref:
        return self.info.ref

    @property
    def running(self) -> bool:
        """Powered on and not frozen: every clone deepens its chain."""
        return self.info.running

    @property
    def datastore(self) -> Ref | None:
        return self.info.datastores[0] if self.info.datastores else None

    @property
    def projected_depth(self) -> int:
        """The chain depth once every in-flight clone of a running source lands."""
        return self.info.chain_depth + \
            (self.in_flight + len(self.phantoms) if self.running else 0)

    @property
    def clones_left(self) -> int | None:
        """Clones the budget still allows; None is unlimited (a frozen source)."""
        if self.info.chain_depth + 1 > self.budget:
            return 0
        if not self.running:
            return None
        return max(0, self.budget - self.projected_depth)


@dataclass
class HostState:
    info: HostInfo
    in_flight: int = 0
    clones: int = 0
    excluded: str | None = None  # why the run stopped using it


class Capacity(Protocol):
    """What the limiters say about taking one more clone from ``source``."""

    def blocked(self, source: SourceState) -> str | None:
        """None if every limiter has a free token, else which one is full."""
        ...


class Unlimited:
    """A capacity with room for everything (dry runs)."""

    def blocked(self, source: SourceState) -> str | None:
        return None


@dataclass(frozen=True)
class PlacementPolicy:
    """Placement knobs (not spec keys)."""

    # Memory a clone is assumed to need while in flight, as a fraction of its
    # source's: conservative, because the host's used memory is refreshed only
    # every few seconds and instant clones' page sharing is not known up front.
    clone_memory_fraction: float = 1.0
    weights: tuple[tuple[str, float], ...] = (
        ("prefer-frozen", 10.0), ("spread-hosts", 3.0), ("fewer-in-flight", 2.0),
        ("shallower-chain", 1.0))



@dataclass
class ClusterView:
    """Sources and hosts for placement. Changed only by the engine, between awaits."""

    sources: dict[str, SourceState]
    hosts: dict[Ref, HostState]
    policy: PlacementPolicy = field(default_factory=PlacementPolicy)
    datastore_names: dict[Ref, str] = field(default_factory=dict)

    #: each source's host, by id(source), while :func:`place` runs (nothing changes the
    #: view meanwhile, and several plugins ask for every source)
    _pinned: dict[int, HostState | None] | None = field(default=None, init=False, repr=False,
                                                        compare=False)

    def host_of(self, source: SourceState) -> HostState | None:
        pinned = self._pinned
        if pinned is not None:
            try:
                return pinned[id(source)]
            except KeyError:
                pass  # a source added meanwhile
        return self.hosts.get(source.info.host) if source.info.host else None

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Look every source's host up once, for the duration of one placement."""
        if self._pinned is not None:
            yield
            return
        hosts = self.hosts
        self._pinned = {id(s): hosts.get(s.info.host) if s.info.host else None
                        for s in self.sources.values()}
        try:
            yield
        finally:
            self._pinned = None

    def reserve(self, source: SourceState) -> None:
        """Count a clone as in flight (call right after :func:`place`, before awaiting)."""
        source.in_flight += 1
        host = self.host_of(source)
        if host is not None:
            host.in_flight += 1

    def unreserve(self, source: SourceState, *, made: bool) -> None:
        source.in_flight -= 1
        host = self.host_of(source)
        if host is not None:
            host.in_flight -= 1
            if made:
                host.clones += 1
        if made:
            source.clones += 1
            if source.running:
                # The chain grew by one; the next inventory refresh confirms it.
                source.info = _with_depth(source.info, source.info.chain_depth + 1)

    def prune_phantoms(self, now: float) -> None:
        for src in self.sources.values():
            if src.phantoms:
                src.phantoms = [t for t in src.phantoms if t > now]

    def retire(self, name: str, reason: str) -> bool:
        """Stop using a source; True if it was in use until now."""
        src = self.sources[name]
        if src.retired is not None:
            return False
        src.retired = reason
        return True

    def exclude_host(self, ref: Ref, reason: str) -> bool:
        host = self.hosts.get(ref)
        if host is None or host.excluded is not None:
            return False
        host.excluded = reason
        return True


def _with_depth(info: VmInfo, depth: int) -> VmInfo:
    return replace(info, chain_depth=depth)


# -- plugins ------------------------------------------------------------------------


class FilterPlugin(Protocol):
    name: ClassVar[str]

    def filter(self, source: SourceState, view: ClusterView, capacity: Capacity) -> Status: ...


class ScorePlugin(Protocol):
    name: ClassVar[str]

    def scorer(self, view: ClusterView) -> Callable[[SourceState], float]:
        """The score function for one placement. What every source's score shares (the
        busiest host, say) is worked out here, once per placement rather than once per
        source, as Kubernetes' PreScore does."""
        ...


class SourceUsable:
    """Retired or powered-off sources never take clones."""

    name: ClassVar[str] = "source-usable"

    def filter(self, source: SourceState, view: ClusterView, capacity: Capacity) -> Status:
        if source.retired is not None:
            return Status(Code.UNRESOLVABLE, self.name, f"retired: {source.retired}")
        if not source.info.powered_on:
            return Status(Code.UNRESOLVABLE, self.name, f"source is {source.info.power_state}")
        return SUCCESS


class HostUsable:
    """The source's host must be known, connected, not in maintenance, not excluded."""

    name: ClassVar[str] = "host-usable"

    def filter(self, source: SourceState, view: ClusterView, capacity: Capacity) -> Status:
        host = view.host_of(source)
        if host is None:
            return Status(Code.UNRESOLVABLE, self.name, "host unknown")
        if host.excluded is not None:
            return Status(Code.UNRESOLVABLE, self.name,
                          f"host {host.info.name} taken out: {host.excluded}")
        if not host.info.connected:
            state = "in maintenance" if host.info.in_maintenance else host.info.connection_state
            return Status(Code.UNRESOLVABLE, self.name, f"host {host.info.name} is {state}")
        return SUCCESS


class ChainBudget:
    """A clone's depth is its source's + 1 and must stay within the budget. A running
    source also deepens with every clone in flight, so those count too."""

    name: ClassVar[str] = "chain-budget"

    def filter(self, source: SourceState, view: ClusterView, capacity: Capacity) -> Status:
        depth = source.info.chain_depth
        if depth + 1 > source.budget:
            return Status(Code.UNRESOLVABLE, self.name,
                          f"chain depth {depth} leaves no room in budget {source.budget}")
        if source.running and source.projected_depth + 1 > source.budget:
            # In-flight clones may still fail and leave room.
            return Status(Code.UNSCHEDULABLE, self.name,
                          f"chain depth {depth} + {source.in_flight} in flight reaches "
                          f"budget {source.budget}")
        return SUCCESS


class MemoryHeadroom:
    """The host must have memory for this clone on top of those in flight."""

    name: ClassVar[str] = "memory-headroom"

    def filter(self, source: SourceState, view: ClusterView, capacity: Capacity) -> Status:
        host = view.host_of(source)
        assert host is not None  # HostUsable ran first
        need = source.info.memory_mb * view.policy.clone_memory_fraction
        free = host.info.memory_mb - host.info.memory_used_mb
        if free - host.in_flight * need >= need:
            return SUCCESS
        code = Code.UNSCHEDULABLE if host.in_flight else Code.UNRESOLVABLE
        return Status(code, self.name, f"host {host.info.name} has {free} MB free, "
                      f"{host.in_flight} clones in flight, a clone needs ~{need:.0f} MB")


class FreeSlots:
    """Every limiter the clone needs (overall, host, datastore, running source) has room."""

    name: ClassVar[str] = "free-slots"

    def filter(self, source: SourceState, view: ClusterView, capacity: Capacity) -> Status:
        blocked = capacity.blocked(source)
        if blocked is None:
            return SUCCESS
        return Status(Code.UNSCHEDULABLE, self.name, blocked)


class PreferFrozen:
    """Frozen sources cost nothing to clone from; running ones deepen their chain."""

    name: ClassVar[str] = "prefer-frozen"

    def scorer(self, view: ClusterView) -> Callable[[SourceState], float]:
        def score(source: SourceState) -> float:
            return 0.0 if source.running else 100.0

        return score


class SpreadHosts:
    """Fewer clones (made and in flight) on the source's host this run scores higher."""

    name: ClassVar[str] = "spread-hosts"

    def scorer(self, view: ClusterView) -> Callable[[SourceState], float]:
        busiest = max((h.clones + h.in_flight for h in view.hosts.values()), default=0)

        def score(source: SourceState) -> float:
            host = view.host_of(source)
            if host is None:
                return 0.0
            if busiest == 0:
                return 100.0
            return 100.0 * (1.0 - (host.clones + host.in_flight) / busiest)

        return score


class FewerInFlight:
    name: ClassVar[str] = "fewer-in-flight"

    def scorer(self, view: ClusterView) -> Callable[[SourceState], float]:
        def score(source: SourceState) -> float:
            return 100.0 / (1 + source.in_flight)

        return score


class ShallowerChain:
    """Deeper chains clone and run slower."""

    name: ClassVar[str] = "shallower-chain"

    def scorer(self, view: ClusterView) -> Callable[[SourceState], float]:
        def score(source: SourceState) -> float:
            return max(0.0, 100.0 * (1.0 - source.projected_depth / max(source.budget, 1)))

        return score


FILTERS: tuple[FilterPlugin, ...] = (SourceUsable(), HostUsable(), ChainBudget(),
                                     MemoryHeadroom(), FreeSlots())
SCORES: dict[str, ScorePlugin] = {p.name: p for p in (PreferFrozen(), SpreadHosts(),
                                                       FewerInFlight(), ShallowerChain())}


# -- placing ------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    source: SourceState
    score: float
    scores: dict[str, float]


class NoFit(PlacementError):
    """No source can take the job now. ``may_fit_later`` is True when at least one
    source is only UNSCHEDULABLE (busy), False when every one is UNRESOLVABLE."""

    def __init__(self, statuses: dict[str, Status]):
        self.statuses = dict(statuses)
        self.may_fit_later = any(s.code is Code.UNSCHEDULABLE for s in statuses.values())
        what = "no source can take a clone now" if self.may_fit_later else \
            "no source can take a clone"
        super().__init__(what, {name: [s.reason] for name, s in statuses.items()})


def filter_source(source: SourceState, view: ClusterView, capacity: Capacity,
                  filters: Sequence[FilterPlugin] = FILTERS) -> Status:
    """The first non-success status of the filter chain, or SUCCESS."""
    for plugin in filters:
        status = plugin.filter(source, view, capacity)
        if status is not SUCCESS and status.code is not Code.SUCCESS:
            return status
    return SUCCESS


def place(view: ClusterView, capacity: Capacity, rng: random.Random, *,
          filters: Sequence[FilterPlugin] = FILTERS,
          scores: dict[str, ScorePlugin] | None = None,
          sample: int = 0) -> Decision:
    """Pick a source for one clone. Pure: reads the view, changes nothing.

    ``sample`` > 0 scores only that many random feasible candidates ("power of
    choices", for very large source pools)."""
    with view.pinned():
        return _place(view, capacity, rng, filters, SCORES if scores is None else scores,
                      sample)


def _place(view: ClusterView, capacity: Capacity, rng: random.Random,
           filters: Sequence[FilterPlugin], scorers: dict[str, ScorePlugin],
           sample: int) -> Decision:
    feasible: list[SourceState] = []
    rejected: dict[str, Status] = {}
    for source in view.sources.values():
        status = filter_source(source, view, capacity, filters)
        if status is SUCCESS:
            feasible.append(source)
        else:
            rejected[source.name] = status
    if not feasible:
        raise NoFit(rejected)
    if sample and len(feasible) > sample:
        feasible = rng.sample(feasible, sample)
    weighted = [(name, scorers[name].scorer(view), weight)
                for name, weight in view.policy.weights if name in scorers]
    # Ties are broken at random (the second element of the key), so no source is
    # favoured by its position in the view.
    best: tuple[float, float] | None = None
    chosen: SourceState | None = None
    for source in feasible:
        total = 0.0
        for _, score, weight in weighted:
            total += score(source) * weight
        key = (total, rng.random())
        if best is None or key > best:
            best, chosen = key, source
    assert best is not None and chosen is not None
    return Decision(chosen, best[0], {name: score(chosen) * weight
                                      for name, score, weight in weighted})


def explain(view: ClusterView, capacity: Capacity,
            filters: Sequence[FilterPlugin] = FILTERS) -> dict[str, Status]:
    """Every source's filter verdict (for ``fleet plan`` and error messages)."""
    return {name: filter_source(s, view, capacity, filters) for name, s in view.sources.items()}


def make_capacity(blocked: Callable[[SourceState], str | None]) -> Capacity:
    """Wrap a function as a :class:`Capacity`."""

    class _Fn:
        def blocked(self, source: SourceState) -> str | None:
            return blocked(source)

    return _Fn()
