"""The simulator's object model: managed objects, the inventory registry, property paths.

Every simulated managed object is a :class:`SimObject` with a vCenter-style id
(``vm-42``, ``host-7``) and a pyVmomi managed-object reference. Properties are
computed on read by ``prop_<name>`` methods that return real pyVmomi values, so
what goes on the wire is exactly pyVmomi's type system. Methods are Python
methods named after their WSDL operation (``InstantClone_Task``) taking a
:class:`CallContext` and the call's named parameters.

Mutations call :meth:`SimObject.touch` with the top-level properties that
changed; the :class:`Inventory` forwards that to the property filters watching
the object (``fleet.sim.propcollector``), which is how ``WaitForUpdatesEx``
learns about changes without polling.

This module is the bottom of the simulator: a managed object is given the
registry (and, by its subclass, the narrow services of ``fleet.sim.runtime``),
never the whole ``Simulator``, so no object module imports the one above it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Any, ClassVar, Protocol, TypeVar

from pyVmomi import VmomiSupport, vim, vmodl


class ChangeListener(Protocol):
    """Something that wants to hear about property changes (a property filter)."""

    def on_touch(self, obj: SimObject, props: tuple[str, ...]) -> None: ...

    def on_structure_change(self) -> None: ...


class SimObject:
    """Base of every simulated managed object."""

    vim_type: ClassVar[Any] = VmomiSupport.ManagedObject
    id_prefix: ClassVar[str] = "mo-"
    #: Nested paths read without building the whole top-level property: path -> name of
    #: a method returning exactly what resolving the path through ``prop_<top>`` would.
    #: Clients watch and read a few small paths of big properties (``guest.ipAddress``,
    #: ``config.hardware.device``) once or more per clone.
    path_getters: ClassVar[dict[str, str]] = {}
    #: Keyed paths read without building the array: the plain path of an array whose
    #: items have a ``key`` (``config.extraConfig``) -> name of a method taking the key
    #: (a string) and returning that item or ``None``, as a search of the array would.
    keyed_getters: ClassVar[dict[str, str]] = {}

    def __init__(self, inventory: Inventory, moid: str | None = None) -> None:
        self.inventory = inventory
        self.moid = moid if moid is not None else inventory.next_id(self.id_prefix)
        self.ref: Any = self.vim_type(self.moid)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.moid}>"

    # -- properties --------------------------------------------------------
    def get_property(self, name: str) -> Any:
        """Value of a top-level property; ``None`` when unset. Unknown names fault."""
        getter = getattr(self, "prop_" + name, None)
        if getter is not None:
            return getter()
        property_type(self.vim_type, name)  # raises InvalidProperty for unknown names
        return None

    def property_names(self) -> list[str]:
        """The properties this object can report (for ``PropertySpec.all``)."""
        return [p.name for p in self.vim_type._GetPropertyList()
                if hasattr(self, "prop_" + p.name)]

    def touch(self, *props: str) -> None:
        """Record that top-level ``props`` changed, for WaitForUpdates."""
        self.inventory.touched(self, props)

    @property
    def display_name(self) -> str:
        return self.moid

    def children(self) -> Sequence[SimObject]:
        """What a ContainerView over this object shows one level down (entities
        override it)."""
        return []


class Inventory:
    """Registry of every managed object, by id and by type."""

    def __init__(self) -> None:
        self.objects: dict[str, SimObject] = {}
        self._counter = 0
        self._watchers: dict[str, set[ChangeListener]] = {}
        self._structure_listeners: set[ChangeListener] = set()
        #: bumped whenever objects appear, disappear or move
        self.generation = 0

    def next_id(self, prefix: str) -> str:
        """A vCenter-style id (``vm-42``): one counter for all types, as vpxd does."""
        self._counter += 1
        return f"{prefix}{self._counter}"

    def add(self, obj: SimObject) -> None:
        self.objects[obj.moid] = obj
        self.structure_changed()

    def remove(self, obj: SimObject) -> None:
        self.objects.pop(obj.moid, None)
        watchers = self._watchers.pop(obj.moid, set())
        for watcher in list(watchers):
            watcher.on_structure_change()
        self.structure_changed()

    def forget(self, obj: SimObject) -> None:
        """``obj`` is gone without being an inventory entity (a finished task): filters
        watching it see it leave; no structure event (no folder changed)."""
        if self.objects.get(obj.moid) is obj:
            del self.objects[obj.moid]
        for watcher in list(self._watchers.pop(obj.moid, ())):
            watcher.on_structure_change()

    def get(self, moid: str) -> SimObject | None:
        return self.objects.get(moid)

    def resolve(self, ref: Any) -> SimObject:
        """The object behind a pyVmomi reference, or ManagedObjectNotFound."""
        obj = self.objects.get(ref._moId) if ref is not None else None
        if obj is None:
            raise vmodl.fault.ManagedObjectNotFound(
                msg=f"The object '{ref}' has already been deleted or has not been completely "
                    "created", obj=ref)
        return obj

    def of_type(self, cls: type[SimObjectT]) -> Iterator[SimObjectT]:
        for obj in list(self.objects.values()):
            if isinstance(obj, cls):
                yield obj

    # -- change notification ----------------------------------------------
    def watch(self, moid: str, listener: ChangeListener) -> None:
        self._watchers.setdefault(moid, set()).add(listener)

    def unwatch(self, moid: str, listener: ChangeListener) -> None:
        watchers = self._watchers.get(moid)
        if watchers is not None:
            watchers.discard(listener)
            if not watchers:
                del self._watchers[moid]

    def listen_structure(self, listener: ChangeListener) -> None:
        self._structure_listeners.add(listener)

    def unlisten_structure(self, listener: ChangeListener) -> None:
        self._structure_listeners.discard(listener)

    def touched(self, obj: SimObject, props: tuple[str, ...]) -> None:
        for watcher in list(self._watchers.get(obj.moid, ())):
            watcher.on_touch(obj, props)

    def structure_changed(self) -> None:
        self.generation += 1
        for listener in list(self._structure_listeners):
            listener.on_structure_change()


SimObjectT = TypeVar("SimObjectT", bound=SimObject)


def contained(container: SimObject, recursive: bool) -> list[SimObject]:
    """What a ContainerView over ``container`` shows (children, or all descendants)."""
    out: list[SimObject] = []
    stack = list(reversed(container.children()))
    while stack:
        node = stack.pop()
        out.append(node)
        if recursive:
            stack.extend(reversed(node.children()))
    return out


# -- property paths ----------------------------------------------------------

def invalid_property(path: str) -> vmodl.query.InvalidProperty:
    return vmodl.query.InvalidProperty(msg=f"Invalid property: {path}", name=path)


class ParsedPath:
    """A property path cut into steps, as vCenter reads one (docs/simulator-vms.md,
    "Keyed property paths"): ``name`` steps joined by dots, any of them keyed with
    ``[4000]`` (an integer key, e.g. a device's) or ``["guestinfo.fleet.state"]`` (a
    quoted string key, which may hold dots and brackets; ``\\`` escapes a quote or a
    backslash). A keyed step names the element of that array whose ``key`` is the key."""

    __slots__ = ("keyed_at", "keyed_prefix", "steps")

    def __init__(self, steps: tuple[tuple[str, str | None], ...]) -> None:
        self.steps = steps
        #: index of the first keyed step and the plain path up to its array (or None)
        self.keyed_at: int | None = None
        self.keyed_prefix: str | None = None
        for i, (_, key) in enumerate(steps):
            if key is not None:
                self.keyed_at = i
                self.keyed_prefix = ".".join(name for name, _ in steps[:i + 1])
                break


def _read_key(path: str, j: int) -> tuple[str, int]:
    """The key of a step whose ``[`` is at ``j - 1``; returns it and the index after
    its ``]``."""
    n = len(path)
    if j < n and path[j] in "\"'":
        quote = path[j]
        j += 1
        chars: list[str] = []
        while j < n and path[j] != quote:
            if path[j] == "\\" and j + 1 < n:
                j += 1
            chars.append(path[j])
            j += 1
        if j >= n or j + 1 >= n or path[j + 1] != "]":
            raise invalid_property(path)
        return "".join(chars), j + 2
    end = path.find("]", j)
    if end < 0:
        raise invalid_property(path)
    try:
        number = int(path[j:end].strip())
    except ValueError:
        raise invalid_property(path) from None
    return str(number), end + 1


@lru_cache(maxsize=8192)
def parse_path(path: str) -> ParsedPath:
    """``path`` cut into (name, key) steps; InvalidProperty if it is malformed."""
    steps: list[tuple[str, str | None]] = []
    n = len(path)
    i = 0
    while True:
        j = i
        while j < n and path[j] not in ".[":
            j += 1
        name = path[i:j]
        if not name.isidentifier():
            raise invalid_property(path)
        key: str | None = None
        if j < n and path[j] == "[":
            key, j = _read_key(path, j + 1)
        steps.append((name, key))
        if j == n:
            return ParsedPath(tuple(steps))
        if path[j] != ".":
            raise invalid_property(path)
        i = j + 1


@lru_cache(maxsize=4096)
def property_type(mo_type: Any, path: str) -> Any:
    """The declared pyVmomi type at ``path`` below ``mo_type``; InvalidProperty if none.
    A keyed step needs an array of items that have a ``key``."""
    typ = mo_type
    for name, key in parse_path(path).steps:
        if issubclass(typ, list):
            raise invalid_property(path)
        try:
            info = typ._GetPropertyInfo(name)
        except (AttributeError, KeyError):
            raise invalid_property(path) from None
        typ = info.type
        if key is not None:
            if not issubclass(typ, list):
                raise invalid_property(path)
            typ = typ.Item
            try:
                typ._GetPropertyInfo("key")
            except (AttributeError, KeyError):
                raise invalid_property(path) from None
    return typ


def _keyed(items: Any, key: str) -> Any:
    for item in items:
        if str(getattr(item, "key", None)) == key:
            return item
    return None


def resolve_path(obj: SimObject, path: str, tops: dict[str, Any] | None = None) -> Any:
    """Read a (possibly nested or keyed) property path; ``None`` if any step is unset
    or a keyed element is missing (vCenter then leaves the property out of its reply).

    ``tops``: top-level values already built during one read of several paths of
    ``obj`` (``config`` for ``config.guestId`` and ``config.extraConfig``), filled as
    they are built: a top-level property is built once per read, not once per path.
    ``path_getters`` and ``keyed_getters`` answer the paths they name without building
    the top-level property at all."""
    reader = _readers.get((obj.__class__, path))
    if reader is None:
        reader = _reader(obj.__class__, path)  # InvalidProperty: nothing is kept
        if len(_readers) >= _MAX_READERS:
            _readers.clear()  # keyed paths are any number: keep the ones in use
        _readers[(obj.__class__, path)] = reader
    return reader(obj, tops)


#: How each class reads each path it was asked, worked out once: a listing of 10,000
#: VMs reads the same ten paths of each.
_Reader = Callable[[SimObject, "dict[str, Any] | None"], Any]
_readers: dict[tuple[type, str], _Reader] = {}
_MAX_READERS = 8192


def _reader(cls: type[SimObject], path: str) -> _Reader:
    """How ``resolve_path`` reads ``path`` of an object of class ``cls``."""
    getter = cls.path_getters.get(path)
    if getter is not None:
        return lambda obj, tops: getattr(obj, getter)()
    parsed = parse_path(path)
    steps = parsed.steps
    start = 0
    keyed: str | None = None
    if parsed.keyed_prefix is not None:
        keyed = cls.keyed_getters.get(parsed.keyed_prefix)
        if keyed is not None:
            assert parsed.keyed_at is not None
            start = parsed.keyed_at + 1
    if keyed is not None:
        keyed_name, key, rest = keyed, steps[start - 1][1], steps[start:]
        if not rest:
            return lambda obj, tops: getattr(obj, keyed_name)(key)
        return lambda obj, tops: _walk(getattr(obj, keyed_name)(key), rest)
    (top, top_key), rest = steps[0], steps[1:]
    if top_key is None and not rest:
        return lambda obj, tops: _top(obj, top, tops)

    def read(obj: SimObject, tops: dict[str, Any] | None) -> Any:
        value = _top(obj, top, tops)
        if value is not None and top_key is not None:
            value = _keyed(value, top_key)
        return _walk(value, rest)

    return read


def _top(obj: SimObject, name: str, tops: dict[str, Any] | None) -> Any:
    """A top-level property, built once per read when ``tops`` keeps them."""
    if tops is None:
        return obj.get_property(name)
    if name in tops:
        return tops[name]
    value = tops[name] = obj.get_property(name)
    return value


def _walk(value: Any, steps: tuple[tuple[str, str | None], ...]) -> Any:
    """Follow (name, key) ``steps`` from ``value``; None once a step is unset or a keyed
    element is missing."""
    for name, key in steps:
        if value is None:
            return None
        value = getattr(value, name, None)
        if value is not None and key is not None:
            value = _keyed(value, key)
    return value


def typed_value(mo_type: Any, path: str, value: Any) -> Any:
    """Make a value safe for an ``anyType`` slot: lists become typed arrays, and a
    string at an enumeration's path its enum value, whose ``xsi:type`` vCenter writes
    (``VirtualMachinePowerState``, not ``xsd:string``)."""
    if value.__class__ is str:
        enum = _enums.get((mo_type, path), _UNKNOWN)
        if enum is _UNKNOWN:
            if len(_enums) >= _MAX_READERS:
                _enums.clear()  # keyed paths are any number: keep the ones in use
            enum = _enums[(mo_type, path)] = _enum_at(mo_type, path)
        return value if enum is None else enum(value)
    if isinstance(value, list) and not isinstance(value, VmomiSupport.Array):
        typ = property_type(mo_type, path)
        if issubclass(typ, list):
            return typ(value)
    return value


#: (type, path) -> the enumeration there or None; typed_value asks for every string
_enums: dict[tuple[Any, str], Any] = {}
_UNKNOWN = object()


def _enum_at(mo_type: Any, path: str) -> Any:
    """The enumeration declared at ``path``, or None (a plain string, or no such path)."""
    try:
        typ = property_type(mo_type, path)
    except vmodl.query.InvalidProperty:
        return None
    return typ if isinstance(typ, type) and issubclass(typ, VmomiSupport.Enum) else None


def refs(objs: Iterable[SimObject], array_type: Any) -> Any:
    """A typed array of references, e.g. ``refs(vms, vim.VirtualMachine.Array)``."""
    return array_type([o.ref for o in objs])


def fault(cls: Any, message: str, **fields: Any) -> Any:
    """Build a vim fault with its message; a small helper to keep call sites short."""
    return cls(msg=message, **fields)


__all__ = [
    "Inventory",
    "SimObject",
    "contained",
    "fault",
    "parse_path",
    "property_type",
    "refs",
    "resolve_path",
    "typed_value",
    "vim",
]
