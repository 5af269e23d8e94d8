"""Limits that several provisioning runs share (``fleet serve``), and whose turn it is.

A service that runs many fleets at once must hand vCenter no more than one
fleet would: the runs draw their tokens from one :class:`Limiters` (per host,
datastore, running source and overall, with one set of ``auto`` controllers
learning vCenter's capacity from everybody's clones).

A run's dispatcher sleeps until capacity frees, then takes what it can without
awaiting, so whichever dispatcher runs first after a release gets the token.
:class:`SharedLimits` decides that order: every release wakes every attached
run, the one with the fewest clones at vCenter first (max-min fairness: a
10-clone burst is not starved behind a 1,000-clone one), ties going to the run
that went first least recently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fleet.engine.limits import AutoTuning, Limiters, LimitKey
from fleet.engine.spec import LimitsSpec


@dataclass(eq=False)
class _Run:
    wake: Callable[[], None]
    load: Callable[[], int]
    turn: int


class SharedLimits:
    """One :class:`Limiters` for many runs; pass it as ``EngineOptions(shared_limits=...)``.

    ``on_limit`` hears every ``auto`` limit change (the runs do not: their event
    streams would each report the same change)."""

    def __init__(self, spec: LimitsSpec, *, tuning: AutoTuning | None = None,
                 on_limit: Callable[[LimitKey, float, float], None] | None = None) -> None:
        self._runs: list[_Run] = []
        self._turns = 0
        self.limiters = Limiters(spec, tuning=tuning, on_change=self._changed,
                                 on_limit=on_limit)

    @property
    def runs(self) -> int:
        """Runs attached now."""
        return len(self._runs)

    @contextlib.contextmanager
    def attach(self, wake: Callable[[], None], load: Callable[[], int]) -> Iterator[None]:
        """While inside, ``wake`` is called when capacity may have freed; ``load`` says how
        many clones the run has at vCenter (it orders the wake-ups)."""
        run = _Run(wake, load, self._turns)
        self._runs.append(run)
        try:
            yield
        finally:
            self._runs.remove(run)

    def _changed(self) -> None:
        if not self._runs:
            return
        order = sorted(self._runs, key=lambda r: (r.load(), r.turn))
        self._turns += 1
        order[0].turn = self._turns
        for run in order:
            run.wake()
