"""Fault injection: declarative rules from the topology file or added at run time.

A rule matches calls by method glob and object glob (over the object's moref id
and its name, the name of the VM a guest operation runs in and the name of what
the call makes: a clone, a folder), fires with a probability, at most ``max_count`` times, after an
optional delay. It injects a vim fault (into the call or into the task the call
starts), an HTTP-level failure (``http:reset``, ``http:503``, ``http:lost_reply``)
or just slowness (``slow``: the task takes ``delay_s`` longer).

:class:`UpdateFaults` are the update stream's own switches (withhold a new
filter's initial state, drop changes), read by ``fleet.sim.propcollector``.
"""

from __future__ import annotations

import fnmatch
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyVmomi import VmomiSupport

from fleet.sim.topology import FaultRule, resolve_fault_type


@dataclass
class ActiveRule:
    rule: FaultRule
    fired: int = 0
    id: int = 0

    @property
    def exhausted(self) -> bool:
        return self.rule.max_count is not None and self.fired >= self.rule.max_count

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "fired": self.fired, **self.rule.model_dump(exclude_none=True)}


@dataclass
class Injection:
    """What to do to one call."""

    rule: FaultRule
    phase: str  # "http" | "call" | "task" | "after"

    @property
    def kind(self) -> str:
        return self.rule.fault

    def make_fault(self, method: str, obj_name: str, target: Any = None) -> Any:
        cls = resolve_fault_type(self.rule.fault)
        message = self.rule.message or (
            f"Injected fault {cls.__name__.rsplit('.', 1)[-1]} on {method} ({obj_name})")
        fault = cls(msg=message)
        _fill_required(fault, target)
        return fault


def _fill_required(fault: Any, target: Any) -> None:
    """Give an injected fault's required fields plausible values so it serializes."""
    for prop in fault._GetPropertyList():
        if prop.flags & VmomiSupport.F_OPTIONAL or getattr(fault, prop.name) is not None:
            continue
        typ = prop.type
        value: Any
        if issubclass(typ, VmomiSupport.ManagedObject):
            value = target if isinstance(target, typ) else typ(f"{prop.name}-injected")
        elif issubclass(typ, list) or issubclass(typ, VmomiSupport.DataObject):
            value = typ()
        elif typ is bool:
            value = False
        elif typ in (int, float) or issubclass(typ, int):
            value = typ(0)
        elif issubclass(typ, VmomiSupport.Enum):
            value = typ.values[0] if getattr(typ, "values", None) else ""
        else:
            value = "injected"
        setattr(fault, prop.name, value)


@dataclass
class FaultInjector:
    rng: random.Random
    rules: list[ActiveRule] = field(default_factory=list)
    injected: Counter[str] = field(default_factory=Counter)
    _next_id: int = 1

    def add(self, rule: FaultRule) -> ActiveRule:
        active = ActiveRule(rule, id=self._next_id)
        self._next_id += 1
        self.rules.append(active)
        return active

    def clear(self) -> None:
        self.rules.clear()

    def remove(self, rule_id: int) -> bool:
        before = len(self.rules)
        self.rules = [r for r in self.rules if r.id != rule_id]
        return len(self.rules) != before

    def match(self, method: str, moid: str, name: str | Sequence[str], *,
              http: bool) -> Injection | None:
        """The first rule that fires for this call; HTTP rules only when ``http``.
        ``name``: the names the call is about (its object's, and see ``FaultRule.object``)."""
        names = (name,) if isinstance(name, str) else name
        for active in self.rules:
            rule = active.rule
            is_http = rule.fault.startswith("http:")
            if is_http != http or active.exhausted:
                continue
            if not fnmatch.fnmatchcase(method, rule.method):
                continue
            if rule.object != "*" and not (fnmatch.fnmatchcase(moid, rule.object)
                                           or any(fnmatch.fnmatchcase(n, rule.object)
                                                  for n in names)):
                continue
            if rule.probability < 1.0 and self.rng.random() >= rule.probability:
                continue
            active.fired += 1
            self.injected[rule.fault] += 1
            if is_http:
                return Injection(rule, "http")
            phase = rule.phase or ("task" if method.endswith("_Task") else "call")
            return Injection(rule, phase)
        return None

    @property
    def total(self) -> int:
        return sum(self.injected.values())


@dataclass
class UpdateFaults:
    """Switches that make the update stream lose what a client waits for."""

    rng: random.Random
    withhold_initial: bool = False
    drop_fraction: float = 0.0
    withheld: int = 0  # objects whose initial state was never reported
    dropped: int = 0  # object changes never reported

    def drop_now(self) -> bool:
        """Whether the change being reported is lost (``drop_fraction`` of them)."""
        return bool(self.drop_fraction) and self.rng.random() < self.drop_fraction

    def as_dict(self) -> dict[str, Any]:
        return {"withhold_initial": self.withhold_initial, "drop_fraction": self.drop_fraction,
                "withheld": self.withheld, "dropped": self.dropped}
