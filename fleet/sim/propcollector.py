"""PropertyCollector and PropertyFilter (views are ``fleet.sim.views``).

Retrieval walks ``ObjectSpec``/``TraversalSpec``/``SelectionSpec`` trees exactly
as vCenter does (``skip``, named selection specs, type-matched traversal of
reference properties) and pages results with ``maxObjects`` and continuation
tokens.

Waiting is change-based, not polling: every filter registers with the
inventory for the objects it covers; a mutation (``SimObject.touch``) stamps the
touched paths with the collector's next version number and wakes waiters.
``WaitForUpdatesEx(version)`` then reports everything stamped after
``version``: objects that entered, changed or left. Because the state is kept
per version, a client repeating a call with an older version (a lost reply)
gets the changes again instead of losing them. Collector state is per session,
as in vCenter: a new session gets ``InvalidCollectorVersion`` for old versions.

:class:`~fleet.sim.injection.UpdateFaults` makes the update stream fail the way clients must survive
(topology ``[updates]``, ``POST /_sim/updates``; docs/watching.md): a filter
created while a ``WaitForUpdatesEx`` of its collector is pending can have its
objects' initial state withheld (never reported; later changes are), as an
independent vCenter simulator does, and any change can be dropped with a given
probability.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from pyVmomi import VmomiSupport, vim, vmodl

from fleet.sim.calls import CallContext, UserSession
from fleet.sim.core import (
    Inventory,
    SimObject,
    parse_path,
    property_type,
    resolve_path,
    typed_value,
)
from fleet.sim.injection import UpdateFaults
from fleet.sim.soap import Content, Contents, Result, content_writer

PC = vmodl.query.PropertyCollector

# vCenter caps one WaitForUpdatesEx reply; clients continue with the version.
DEFAULT_MAX_OBJECT_UPDATES = 10_000
# Pages of a RetrievePropertiesEx a session never continued: the oldest are dropped.
MAX_RETRIEVE_TOKENS = 100
_token_ids = itertools.count(1)


# -- traversal -----------------------------------------------------------------

def _named_specs(select_set: Iterable[Any], out: dict[str, Any]) -> None:
    for sel in select_set or ():
        if isinstance(sel, PC.TraversalSpec):
            if sel.name and sel.name not in out:
                out[sel.name] = sel
                _named_specs(sel.selectSet, out)
            elif not sel.name:
                _named_specs(sel.selectSet, out)


def _children(inventory: Inventory, obj: SimObject, path: str) -> list[SimObject]:
    value = resolve_path(obj, path)
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, VmomiSupport.ManagedObject):
            child = inventory.get(item._moId)
            if child is not None:
                out.append(child)
    return out


def collect_objects(inventory: Inventory, object_set: Iterable[Any]) -> dict[str, SimObject]:
    """The objects an ``objectSet`` selects, in traversal order (ids -> objects)."""
    result: dict[str, SimObject] = {}
    for spec in object_set or ():
        root = inventory.resolve(spec.obj)
        named: dict[str, Any] = {}
        _named_specs(spec.selectSet, named)
        visited: set[tuple[str, int]] = set()

        def visit(obj: SimObject, select_set: Iterable[Any], skip: bool,
                  named: dict[str, Any] = named, visited: set[tuple[str, int]] = visited) -> None:
            if not skip:
                result.setdefault(obj.moid, obj)
            for sel in select_set or ():
                ts = sel if isinstance(sel, PC.TraversalSpec) else named.get(sel.name)
                if ts is None:
                    raise vmodl.fault.InvalidArgument(
                        msg=f"unknown selection spec {sel.name!r}", invalidProperty="selectSet")
                if not isinstance(obj.ref, ts.type):
                    continue
                mark = (obj.moid, id(ts))
                if mark in visited:
                    continue
                visited.add(mark)
                property_type(ts.type, ts.path)  # validate the traversal path
                for child in _children(inventory, obj, ts.path):
                    visit(child, ts.selectSet, bool(ts.skip))

        visit(root, spec.selectSet, bool(spec.skip))
    return result


def paths_for(obj: SimObject, prop_set: Iterable[Any]) -> tuple[str, ...] | None:
    """Property paths the ``propSet`` asks of ``obj``; ``None`` if no spec matches its type."""
    paths: list[str] = []
    matched = False
    for ps in prop_set or ():
        if not isinstance(obj.ref, ps.type):
            continue
        matched = True
        if ps.all:
            paths.extend(obj.property_names())
        for path in ps.pathSet or ():
            property_type(ps.type, path)
            paths.append(path)
    if not matched:
        return None
    return tuple(dict.fromkeys(paths))


def validate_prop_set(prop_set: Iterable[Any]) -> None:
    for ps in prop_set or ():
        if ps.type is None:
            raise vmodl.fault.InvalidArgument(msg="PropertySpec.type is required",
                                              invalidProperty="type")
        for path in ps.pathSet or ():
            property_type(ps.type, path)


def read_props(obj: SimObject, paths: Iterable[str]) -> list[tuple[str, Any]]:
    """(path, value) of each path ``obj`` has a value for, every top-level property
    built once."""
    out = []
    tops: dict[str, Any] = {}
    vim_type = obj.vim_type
    for path in paths:
        value = resolve_path(obj, path, tops)
        if value is None:
            continue
        out.append((path, typed_value(vim_type, path, value)))
    return out


def _read(obj: SimObject, paths: Iterable[str]) -> dict[str, Any]:
    """Each path's value, every top-level property built once."""
    tops: dict[str, Any] = {}
    return {p: resolve_path(obj, p, tops) for p in paths}


class Selected:
    """What a retrieval reads, not read yet: the objects every FilterSpec selects and,
    beside each, the paths its propSet asks of it (one tuple per class and spec,
    shared). Two lists, so a read kept for its continuations holds no object per VM
    for the garbage collector to walk."""

    __slots__ = ("objects", "paths")

    def __init__(self, objects: list[SimObject], paths: list[tuple[str, ...]]) -> None:
        self.objects = objects
        self.paths = paths

    def __len__(self) -> int:
        return len(self.objects)

    def head(self, count: int) -> Selected:
        return Selected(self.objects[:count], self.paths[:count])

    def tail(self, start: int) -> Selected:
        return Selected(self.objects[start:], self.paths[start:])


def select(inventory: Inventory, spec_set: Iterable[Any]) -> Selected:
    """Every object every FilterSpec selects, with the paths its propSet asks of it."""
    selected = Selected([], [])
    for spec in spec_set:
        validate_prop_set(spec.propSet)
        # what the propSet asks depends on the object's class only
        by_class: dict[type, tuple[str, ...] | None] = {}
        for obj in collect_objects(inventory, spec.objectSet).values():
            cls = obj.__class__
            if cls in by_class:
                paths = by_class[cls]
            else:
                paths = by_class[cls] = paths_for(obj, spec.propSet)
            if paths is not None:
                selected.objects.append(obj)
                selected.paths.append(paths)
    return selected


def read_selected(inventory: Inventory, selected: Selected,
                  version: str | None = None) -> Contents:
    """The content of objects ``select`` chose, read now; one gone from the inventory
    since (a continuation's page is read when it is asked for) is left out. For a
    reply in API ``version`` each object's content is written as it is read when its
    values are plain (``fleet.sim.soap.ContentWriter``)."""
    writer = content_writer(version) if version is not None else None
    objects = inventory.objects
    contents = Contents()
    for obj, paths in zip(selected.objects, selected.paths, strict=True):
        if objects.get(obj.moid) is not obj:
            continue
        props = read_props(obj, paths)
        contents.append(Content(obj.ref, props) if writer is None
                        else writer.write(obj.ref, props))
    return contents


def retrieve(inventory: Inventory, spec_set: Iterable[Any], version: str | None = None
             ) -> Contents:
    """The content of every object every FilterSpec selects, read now."""
    return read_selected(inventory, select(inventory, spec_set), version)


# -- filters and update tracking ---------------------------------------------

@dataclass
class _Tracked:
    obj: SimObject
    paths: tuple[str, ...]
    tops: frozenset[str]
    entered: int
    changed: dict[str, int] = field(default_factory=dict)
    # the value each path had when last stamped: a touch that leaves it equal is no change
    values: dict[str, Any] = field(default_factory=dict)


def same(a: Any, b: Any) -> bool:
    """Deep equality of pyVmomi values (DataObject's own ``==`` is identity)."""
    if a is b:
        return True
    mo = VmomiSupport.ManagedObject
    if isinstance(a, mo) or isinstance(b, mo):
        return isinstance(a, mo) and isinstance(b, mo) and a._moId == b._moId \
            and type(a) is type(b)
    if isinstance(a, VmomiSupport.DataObject) or isinstance(b, VmomiSupport.DataObject):
        if type(a) is not type(b):
            return False
        return all(same(getattr(a, p.name), getattr(b, p.name)) for p in a._GetPropertyList())
    if isinstance(a, list) or isinstance(b, list):
        return (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
                and all(same(x, y) for x, y in zip(a, b, strict=True)))
    if isinstance(a, BaseException) or isinstance(b, BaseException):
        return False  # faults: always report
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return False


def _gone_op(obj: SimObject, path: str) -> str:
    """How a change reports a watched path that has no value any more: a keyed element
    that left its array is ``remove``d, a path below one whose element went is
    ``indirectRemove``d, and any other path is ``assign``ed nothing (it became unset).
    (PropertyChange in the vSphere API reference; docs/simulator-vms.md.)"""
    parsed = parse_path(path)
    if parsed.keyed_at is None:
        return "assign"
    if parsed.keyed_at == len(parsed.steps) - 1:
        return "remove"
    element = ".".join(_step_text(step) for step in parsed.steps[:parsed.keyed_at + 1])
    return "assign" if resolve_path(obj, element) is not None else "indirectRemove"


def _step_text(step: tuple[str, str | None]) -> str:
    name, key = step
    if key is None:
        return name
    quoted = key.replace("\\", "\\\\").replace('"', '\\"')
    return f'{name}["{quoted}"]'



class PropertyFilter(SimObject):
    vim_type = PC.Filter
    id_prefix = "session"

    def __init__(self, inventory: Inventory, updates: UpdateFaults, state: CollectorState,
                 spec: Any, partial: bool, withhold_initial: bool = False) -> None:
        super().__init__(inventory, f"session[{state.session_key[:8]}]{next(_token_ids):x}")
        self.updates = updates
        self.state = state
        self.spec = spec
        self.partial = partial
        self.tracked: dict[str, _Tracked] = {}
        self.left: dict[str, tuple[Any, int]] = {}
        self.dynamic = any(os.selectSet for os in spec.objectSet or ())
        self.needs_resolve = False
        self.created = state.bump()
        # Withheld: stamped before any version, so no wait ever reports them as entered.
        self._resolve(self.created, entered=-1 if withhold_initial else None)
        if withhold_initial:
            updates.withheld += len(self.tracked)
        if self.dynamic:
            inventory.listen_structure(self)

    def prop_spec(self) -> Any:
        return self.spec

    def prop_partialUpdates(self) -> bool:
        return self.partial

    def _resolve(self, version: int, entered: int | None = None) -> None:
        try:
            objects = collect_objects(self.inventory, self.spec.objectSet)
        except vmodl.fault.ManagedObjectNotFound:
            objects = {}
            for os in self.spec.objectSet or ():
                obj = self.inventory.get(os.obj._moId)
                if obj is not None and not os.skip:
                    objects[obj.moid] = obj
        for moid in list(self.tracked):
            if moid not in objects:
                tracked = self.tracked.pop(moid)
                self.inventory.unwatch(moid, self)
                self.left[moid] = (tracked.obj.ref, version)
        for moid, obj in objects.items():
            if moid in self.tracked:
                continue
            paths = paths_for(obj, self.spec.propSet)
            if paths is None:
                continue
            tops = frozenset(p.split(".", 1)[0].split("[", 1)[0] for p in paths)
            self.tracked[moid] = _Tracked(obj, paths, tops,
                                          version if entered is None else entered,
                                          values=_read(obj, paths))
            self.left.pop(moid, None)
            self.inventory.watch(moid, self)

    def on_touch(self, obj: SimObject, props: tuple[str, ...]) -> None:
        tracked = self.tracked.get(obj.moid)
        if tracked is None:
            return
        hit = [p for p in tracked.paths if p.split(".", 1)[0].split("[", 1)[0] in props]
        if not hit:
            return
        # vCenter reports values that changed, not every path below a touched property.
        really: list[tuple[str, Any]] = []
        tops: dict[str, Any] = {}
        for path in hit:
            value = resolve_path(obj, path, tops)
            if path in tracked.values and same(tracked.values[path], value):
                continue
            really.append((path, value))
        if not really:
            return
        faults = self.updates
        if faults.drop_now():
            # Lost: the filter moves on to the new values without ever reporting them.
            for path, value in really:
                tracked.values[path] = value
            faults.dropped += 1
            return
        version = self.state.bump()
        for path, value in really:
            tracked.changed[path] = version
            tracked.values[path] = value
        self.state.wake()

    def on_structure_change(self) -> None:
        if self.dynamic:
            self.needs_resolve = True
        else:
            # One of our static objects disappeared: it leaves.
            version = self.state.bump()
            for moid in [m for m in self.tracked if self.inventory.get(m) is None]:
                tracked = self.tracked.pop(moid)
                self.left[moid] = (tracked.obj.ref, version)
        self.state.wake()

    def refresh(self) -> None:
        if self.needs_resolve:
            self.needs_resolve = False
            self._resolve(self.state.bump())

    def updates_since(self, base: int, upto: int) -> list[Any]:
        """ObjectUpdates for changes stamped in (base, upto]."""
        out = []
        for moid in sorted(self.tracked):
            tracked = self.tracked[moid]
            if base < tracked.entered <= upto:
                out.append((moid, PC.ObjectUpdate(kind="enter", obj=tracked.obj.ref,
                                                  changeSet=self._changes(tracked,
                                                                          tracked.paths))))
                continue
            if tracked.entered > upto:
                continue
            paths = [p for p, v in tracked.changed.items() if base < v <= upto]
            if paths:
                out.append((moid, PC.ObjectUpdate(kind="modify", obj=tracked.obj.ref,
                                                  changeSet=self._changes(tracked, paths,
                                                                          modify=True))))
        for moid, (ref, version) in self.left.items():
            if base < version <= upto:
                out.append((moid, PC.ObjectUpdate(kind="leave", obj=ref)))
        out.sort(key=lambda item: item[0])
        return out

    def acknowledged(self, version: int) -> None:
        """The client asked from ``version``: it has every change up to it, so objects
        that left before it need not be remembered (a retry asks from the same one)."""
        if self.left:
            for moid in [m for m, (_, v) in self.left.items() if v <= version]:
                del self.left[moid]

    def _changes(self, tracked: _Tracked, paths: Iterable[str], modify: bool = False) -> list[Any]:
        changes = []
        tops: dict[str, Any] = {}
        for path in paths:
            value = resolve_path(tracked.obj, path, tops)
            if value is None:
                if modify:
                    changes.append(PC.Change(name=path, op=_gone_op(tracked.obj, path)))
                continue
            changes.append(PC.Change(name=path, op="assign",
                                     val=typed_value(tracked.obj.vim_type, path, value)))
        return changes

    def destroy(self) -> None:
        for moid in list(self.tracked):
            self.inventory.unwatch(moid, self)
        self.tracked.clear()
        self.inventory.unlisten_structure(self)
        self.inventory.objects.pop(self.moid, None)
        self.state.filters.pop(self.moid, None)

    def DestroyPropertyFilter(self, ctx: CallContext) -> None:
        self.destroy()


class CollectorState:
    """One session's view of one property collector: its filters and version counter."""

    def __init__(self, session_key: str) -> None:
        self.session_key = session_key
        self.version = 0
        self.filters: dict[str, PropertyFilter] = {}
        self.waiting = 0  # WaitForUpdates calls pending on this collector
        self._event = asyncio.Event()
        self.cancelled = 0
        # last reply, so that a retried call after a lost reply gets the same answer
        self.last_request: str | None = None
        self.last_reply: Any = None

    def bump(self) -> int:
        self.version += 1
        return self.version

    def wake(self) -> None:
        self._event.set()

    async def wait(self, limit_s: float | None) -> None:
        self._event.clear()
        if limit_s is None:
            await self._event.wait()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), limit_s)

    def close(self) -> None:
        for flt in list(self.filters.values()):
            flt.destroy()
        self.cancelled += 1
        self.wake()


def _parse_version(version: str | None, state: CollectorState) -> tuple[int, int | None, str]:
    """(base, snapshot, cursor) from a version string; vCenter's are opaque strings."""
    if not version:
        return -1, None, ""
    try:
        if ":" in version:
            base_s, snap_s, cursor = version.split(":", 2)
            base, snap = int(base_s), int(snap_s)
        else:
            base, snap, cursor = int(version), None, ""
    except ValueError:
        raise vmodl.query.InvalidCollectorVersion(msg=f"invalid version {version!r}") from None
    if base > state.version or (snap is not None and snap > state.version):
        raise vmodl.query.InvalidCollectorVersion(msg=f"unknown version {version!r}")
    return base, snap, cursor


class PropertyCollector(SimObject):
    vim_type = PC
    id_prefix = "session"

    def __init__(self, inventory: Inventory, updates: UpdateFaults, moid: str | None = None,
                 owner: UserSession | None = None) -> None:
        super().__init__(inventory, moid)
        self.updates = updates
        self.owner = owner  # None for the shared, per-session 'propertyCollector'
        self._retrieve_pages: dict[str, list[Any]] = {}

    def state(self, ctx: CallContext) -> CollectorState:
        """The calling session's state of this collector (made on first use)."""
        states = ctx.session.collectors
        state = states.get(self.moid)
        if state is None:
            state = states[self.moid] = CollectorState(ctx.session.key)
        return cast(CollectorState, state)  # only collectors put their state there

    def prop_filter(self) -> Any:
        return None

    # -- retrieval ------------------------------------------------------
    def RetrieveContents(self, ctx: CallContext, specSet: list[Any]) -> Any:
        return retrieve(self.inventory, specSet, ctx.version)

    def RetrieveProperties(self, ctx: CallContext, specSet: list[Any]) -> Any:
        return retrieve(self.inventory, specSet, ctx.version)

    def RetrievePropertiesEx(self, ctx: CallContext, specSet: list[Any],
                             options: Any = None) -> Any:
        # Objects are chosen now; each page's properties are read when the page is
        # asked for (docs/simulator-vms.md, "Paged reads"), so the first page of a large
        # read answers at once and later pages are read while the client decodes.
        selected = select(self.inventory, specSet)
        limit = options.maxObjects if options is not None and options.maxObjects else None
        return self._page(ctx, selected, limit)

    def _page(self, ctx: CallContext, selected: Selected, limit: int | None) -> Any:
        if not selected:
            return None
        if limit is None or len(selected) <= limit:
            return Result(read_selected(self.inventory, selected, ctx.version))
        token = f"{next(_token_ids)}"
        tokens = ctx.session.retrieve_tokens
        tokens[token] = (selected.tail(limit), limit)
        while len(tokens) > MAX_RETRIEVE_TOKENS:
            del tokens[next(iter(tokens))]
        return Result(read_selected(self.inventory, selected.head(limit), ctx.version), token)

    def ContinueRetrievePropertiesEx(self, ctx: CallContext, token: str) -> Any:
        pending = ctx.session.retrieve_tokens.pop(token, None)
        if pending is None:
            raise vmodl.fault.InvalidArgument(msg=f"unknown token {token!r}",
                                              invalidProperty="token")
        selected, limit = pending
        result = self._page(ctx, selected, limit)
        if result is None:
            return Result([])
        return result

    def CancelRetrievePropertiesEx(self, ctx: CallContext, token: str) -> None:
        ctx.session.retrieve_tokens.pop(token, None)

    # -- filters --------------------------------------------------------
    def CreateFilter(self, ctx: CallContext, spec: Any, partialUpdates: bool) -> Any:
        validate_prop_set(spec.propSet)
        for os in spec.objectSet or ():
            self.inventory.resolve(os.obj)
        state = self.state(ctx)
        withhold = self.updates.withhold_initial and state.waiting > 0
        flt = PropertyFilter(self.inventory, self.updates, state, spec, partialUpdates, withhold)
        self.inventory.objects[flt.moid] = flt  # not an inventory entity: no structure event
        state.filters[flt.moid] = flt
        state.wake()
        return flt.ref

    def DestroyPropertyCollector(self, ctx: CallContext) -> None:
        if self.owner is None:
            raise vmodl.fault.NotSupported(msg="the default property collector cannot be destroyed")
        ctx.session.drop_collector(self.moid)
        self.inventory.objects.pop(self.moid, None)

    def CreatePropertyCollector(self, ctx: CallContext) -> Any:
        collector = PropertyCollector(self.inventory, self.updates, owner=ctx.session)
        self.inventory.objects[collector.moid] = collector
        ctx.session.owned_collectors.add(collector.moid)
        return collector.ref

    # -- waiting ----------------------------------------------------------
    def CancelWaitForUpdates(self, ctx: CallContext) -> None:
        state = self.state(ctx)
        state.cancelled += 1
        state.wake()

    async def WaitForUpdatesEx(self, ctx: CallContext, version: str | None = None,
                               options: Any = None) -> Any:
        max_wait = options.maxWaitSeconds if options is not None else None
        max_objects = (options.maxObjectUpdates if options is not None
                       and options.maxObjectUpdates else DEFAULT_MAX_OBJECT_UPDATES)
        return await self._wait(ctx, version, max_wait, max_objects)

    async def WaitForUpdates(self, ctx: CallContext, version: str | None = None) -> Any:
        return await self._wait(ctx, version, None, None)

    async def CheckForUpdates(self, ctx: CallContext, version: str | None = None) -> Any:
        return await self._wait(ctx, version, 0, None)

    async def _wait(self, ctx: CallContext, version: str | None, max_wait: int | None,
                    max_objects: int | None) -> Any:
        state = self.state(ctx)
        key = version or ""
        # A repeat of the previous call (its reply was lost): answer it the same way.
        if state.last_request == key and state.last_reply is not None:
            return state.last_reply
        base, snap, cursor = _parse_version(version, state)
        for flt in state.filters.values():
            flt.acknowledged(base)
        state.waiting += 1
        try:
            return await self._wait_from(ctx, state, key, base, snap, cursor, max_wait,
                                         max_objects)
        finally:
            state.waiting -= 1

    async def _wait_from(self, ctx: CallContext, state: CollectorState, key: str, base: int,
                         snap: int | None, cursor: str, max_wait: int | None,
                         max_objects: int | None) -> Any:
        cancelled = state.cancelled
        loop = asyncio.get_running_loop()
        deadline = None if max_wait is None else loop.time() + max_wait
        while True:
            for flt in list(state.filters.values()):
                flt.refresh()
            upto = snap if snap is not None else state.version
            result = self._collect(state, base, upto, cursor, max_objects)
            if result is not None:
                state.last_request, state.last_reply = key, result
                return result
            if state.cancelled != cancelled:
                raise vmodl.fault.RequestCanceled(msg="WaitForUpdates was cancelled")
            if not ctx.session.alive:
                raise vim.fault.NotAuthenticated(msg="The session is not authenticated.")
            if snap is not None:
                # A truncated series just ended: continue from its snapshot.
                base, snap, cursor = snap, None, ""
                continue
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                await state.wait(remaining)
            else:
                await state.wait(None)

    def _collect(self, state: CollectorState, base: int, upto: int, cursor: str,
                 max_objects: int | None) -> Any:
        filter_updates = []
        count = 0
        truncated_at: str | None = None
        prev_mark = cursor
        for fid in sorted(state.filters):
            flt = state.filters[fid]
            updates = []
            for moid, update in flt.updates_since(base, upto):
                mark = f"{fid}/{moid}"
                if cursor and mark <= cursor:
                    continue
                if max_objects is not None and count >= max_objects:
                    truncated_at = truncated_at or prev_mark
                    break
                updates.append(update)
                count += 1
                prev_mark = mark
            if updates:
                filter_updates.append(PC.FilterUpdate(filter=flt.ref, objectSet=updates))
            if truncated_at:
                break
        if not filter_updates:
            return None
        if truncated_at:
            return PC.UpdateSet(version=f"{base}:{upto}:{truncated_at}",
                                filterSet=filter_updates, truncated=True)
        return PC.UpdateSet(version=str(upto), filterSet=filter_updates, truncated=False)
