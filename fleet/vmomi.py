"""Speed-ups for pyVmomi's type system, shared by the client and the simulator.

pyVmomi's ``DataObject._GetPropertyList()`` walks the class hierarchy and builds
a new list on every call; its serializer and deserializer call it for every
data object they touch (about ten times per small SOAP exchange). A type's
property list never changes once the type exists, so :func:`install` caches it
per class. The results are the same lists pyVmomi would build; nothing else
about pyVmomi changes.
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
