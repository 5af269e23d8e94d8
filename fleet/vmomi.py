"""Speed-ups for pyVmomi's type system, shared by the client and the simulator.

pyVmomi's ``DataObject._GetPropertyList()`` walks the class hierarchy and builds
a new list on every call; its serializer and deserializer call it for every
data object they touch (about ten times per small SOAP exchange). A type's
property list never changes once the type exists, so :func:`install` caches it
per class. The results are the same lists pyVmomi would build; nothing else
about pyVmomi changes.

:func:`trusted` builds a data object the way ``cls(**fields)`` does, without
pyVmomi's type check of every field: for the few objects the simulator makes by
the ten thousand per read (an ``OptionValue`` per keyed ``extraConfig`` path and
VM), whose fields it knows are right.
"""

from __future__ import annotations

from typing import Any

from pyVmomi import VmomiSupport

_installed = False


def install() -> None:
    """Cache ``DataObject._GetPropertyList`` per class (idempotent)."""
    global _installed
    if _installed:
        return
    original = VmomiSupport.DataObject._GetPropertyList.__func__
    cache: dict[tuple[type, bool], list[Any]] = {}

    def cached(cls: type, includeBaseClassProps: bool = True) -> list[Any]:
        key = (cls, includeBaseClassProps)
        found = cache.get(key)
        if found is None:
            found = cache[key] = original(cls, includeBaseClassProps)
        return found

    VmomiSupport.DataObject._GetPropertyList = classmethod(cached)
    _installed = True


#: per data object class: (every property's default, in pyVmomi's order; the names of
#: the array properties, each of which gets an empty array of its own; every name)
_Plan = tuple[dict[str, Any], tuple[tuple[str, Any], ...], frozenset[str]]
_plans: dict[type, _Plan] = {}


def _plan(cls: type) -> _Plan:
    blank = cls()  # pyVmomi's own defaults
    arrays = tuple((p.name, p.type) for p in cls._GetPropertyList()  # type: ignore[attr-defined]
                   if issubclass(p.type, list))
    defaults = dict(vars(blank))
    return defaults, arrays, frozenset(defaults)


def trusted(cls: type, **fields: Any) -> Any:
    """``cls(**fields)``, the same object, without checking each field's type (about 15x
    cheaper). Only for values the caller knows fit (strings for string fields). An
    unknown field name is still an error, as it is for pyVmomi."""
    plan = _plans.get(cls)
    if plan is None:
        plan = _plans[cls] = _plan(cls)
    defaults, arrays, names = plan
    if not names.issuperset(fields):
        unknown = sorted(set(fields) - names)
        raise AttributeError(f"{cls.__name__} has no property {unknown[0]!r}")
    obj: Any = object.__new__(cls)
    state = obj.__dict__
    state.update(defaults)
    for name, typ in arrays:
        state[name] = typ()
    state.update(fields)
    return obj
