"""One property collector and one ``WaitForUpdatesEx`` loop for everything fleet waits on.

Tasks in flight and VMs being waited for are *watches*: an object and the
property paths wanted of it. The :class:`PropertyWatcher` owns a private
property collector (``CreatePropertyCollector``) and runs a single
``WaitForUpdatesEx`` long poll; each update is dispatched to the watches of
the object it names. There is no per-task polling.

Filters are created in batches: a new watch is queued and a flusher creates
one ``CreateFilter`` for everything queued while the previous one was in
flight (one filter per batch and property signature, at most
``max_filter_objects`` objects). A burst of 1,000 clones therefore costs a
handful of ``CreateFilter`` calls, not 1,000, and a filter is destroyed once
every watch in it is released. A filter created while a long poll is pending
shows up in that poll's answer (vCenter reports new filters' objects as
``enter``).

Failure handling:

- a lost reply of ``WaitForUpdatesEx`` (reset, timeout) is answered by asking
  again with the *same* version: vCenter answers a repeated version with the
  same changes, so nothing is missed;
- ``truncated`` update sets are continued at once with the returned version;
- collector state belongs to the session: after a re-login (the session's
  ``generation`` changed) or ``InvalidCollectorVersion`` the watcher makes a
  new collector, re-creates the filters of every live watch and starts again
  from version ``""``, so the first answer re-reads every watched object's
  current state (a task that finished meanwhile is seen finished);
- an object that disappears (``leave``, or ``ManagedObjectNotFound`` when its
  filter is created) marks its watches gone.

Updates that never come (docs/watching.md): that a filter created while a long
poll is pending shows up in that poll is vCenter's behaviour, not its contract,
and an independent simulator does not do it; an update can also simply be
lost. So every watch has a time by which its next update is due, and a watch
still quiet ``quiet_s`` past it is read directly. A watch is due its first
update (``enter``) right after its filter is made. A task is next due when
tasks of its kind usually end: the watcher keeps a smoothed mean and deviation
of how long each kind took, as TCP does for its retransmission timeout, and
expects mean + 4 deviations after submission. Everything overdue at one moment
is read with one ``RetrievePropertiesEx``; a read that finds nothing new backs
that watch off (doubling, up to 16 x ``quiet_s``). The due times live in one
heap and a single sleeper wakes at the earliest, so while updates arrive the
fallback costs a heap push and pop per watch and no call at all.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from pyVmomi import vmodl

from fleet.errors import (
    ConnectionFailed,
    InvalidLogin,
    NotAuthenticated,
    NotFound,
    RequestTimeout,
    TaskCancelled,
    TransientVSphereError,
    VSphereError,
)
from fleet.vsphere.session import Session

log = logging.getLogger("fleet.vsphere")
PC = vmodl.query.PropertyCollector


class Watch:
    """The latest values of some properties of one object, kept current by the watcher."""

    def __init__(self, watcher: PropertyWatcher, obj: Any, paths: tuple[str, ...],
                 done: Callable[[Watch], bool] | None = None, kind: str | None = None) -> None:
        self.watcher = watcher
        self.obj = obj
        self.moid: str = obj._moId
        self.type_name: str = obj._wsdlName
        self.paths = paths
        self.values: dict[str, Any] = {}
        self.gone = False
        self.error: VSphereError | None = None
        self.active = True
        self._done = done
        # Made when someone waits: most tasks finish before anyone looks.
        self._event: anyio.Event | None = None
        self.group: _Group | None = None
        #: bumped at every change of ``values``, ``gone`` or ``error``
        self.version = 0
        # -- for the direct-read fallback (see the module docstring) --
        #: how long watches of this kind take is learned; None: only the first update is due
        self.kind = kind
        self.started = time.monotonic()
        #: the full state arrived (an ``enter`` from its own filter, or a direct read)
        self.initialized = False
        self.filter_at = 0.0  # when its current filter was made
        self.last_seen = 0.0  # when values last changed
        self.checks = 0  # direct reads in a row that found nothing new
        self.last_check = 0.0
        self.due_at: float | None = None  # its entry in the watcher's heap, if any
        #: filters whose ``enter`` came before the CreateFilter reply named its filter
        self.early: list[str] | None = None

    def __repr__(self) -> str:
        return f"<Watch {self.type_name}:{self.moid} {','.join(self.paths)}>"

    def get(self, path: str, default: Any = None) -> Any:
        return self.values.get(path, default)

    def _notify(self) -> None:
        self.version += 1
        event, self._event = self._event, None
        if event is not None:
            event.set()
        if self._done is not None and self.active and self._done(self):
            self.watcher.finished(self)

    def fail(self, error: VSphereError) -> None:
        if self.error is None:
            self.error = error
        self._notify()

    async def wait_for(self, predicate: Callable[[Watch], bool], *,
                       timeout_s: float | None = None, what: str = "the wanted state") -> None:
        """Return once ``predicate(self)`` holds; RequestTimeout after ``timeout_s``."""
        with anyio.move_on_after(timeout_s):
            while True:
                if predicate(self):
                    return
                if self.error is not None:
                    raise self.error
                if self.gone:
                    raise NotFound(f"{self.type_name} {self.moid} no longer exists",
                                   fault="ManagedObjectNotFound", obj=self.moid)
                if self._event is None:
                    self._event = anyio.Event()
                await self._event.wait()
        raise RequestTimeout(f"{self.type_name} {self.moid}: no {what} after {timeout_s} s",
                             obj=self.moid)

    def release(self) -> None:
        self.watcher.release(self)


@dataclass(eq=False)
class _Group:
    """One server-side filter and the watches it feeds."""

    filter: Any
    watches: set[Watch]
    generation: int


@dataclass
class WatcherStats:
    wait_calls: int = 0  # WaitForUpdatesEx answers received
    updates: int = 0  # object updates dispatched
    truncated: int = 0
    filters_created: int = 0
    filters_destroyed: int = 0
    rebuilds: int = 0
    watches: int = 0
    direct_reads: int = 0  # RetrievePropertiesEx calls for watches whose update was overdue
    direct_read_objects: int = 0  # objects those calls read
    missed_updates: int = 0  # watches such a read found changed: updates the loop never got


class _Durations:
    """How long watches of one kind take to finish, smoothed as RFC 6298 smooths round
    trips: the expected time is the mean plus four mean deviations."""

    __slots__ = ("dev", "mean")

    def __init__(self) -> None:
        self.mean: float | None = None
        self.dev = 0.0

    def add(self, sample_s: float) -> None:
        if self.mean is None:
            self.mean, self.dev = sample_s, sample_s / 2
        else:
            self.dev = 0.75 * self.dev + 0.25 * abs(self.mean - sample_s)
            self.mean = 0.875 * self.mean + 0.125 * sample_s

    def expected_s(self) -> float:
        return 0.0 if self.mean is None else self.mean + 4 * self.dev


class PropertyWatcher:
    """Owns the collector, its filters and the ``WaitForUpdatesEx`` loop."""

    def __init__(self, session: Session, *, max_wait_s: int = 30,
                 max_object_updates: int | None = None,
                 max_filter_objects: int = 1000, quiet_s: float = 5.0) -> None:
        self.session = session
        #: how long past its due time a watch may stay without update before it is read
        self.quiet_s = quiet_s
        self.max_wait_s = max_wait_s
        self.max_object_updates = max_object_updates
        self.max_filter_objects = max_filter_objects
        self.stats = WatcherStats()
        self._watches: dict[str, list[Watch]] = {}
        self._pending: list[Watch] = []
        self._groups: set[_Group] = set()
        self._retired: list[Any] = []
        self._collector: Any = None
        self._collector_generation = -1
        self._lock = anyio.Lock()
        self._wake = anyio.Event()
        self._flush_needed = anyio.Event()
        self._tg: TaskGroup | None = None
        self._stopped: VSphereError | None = None
        self._durations: dict[str, _Durations] = {}
        self._due: list[tuple[float, int, Watch]] = []
        self._due_seq = itertools.count()
        self._sweep_at = math.inf  # when the sweeper wakes; -inf while it is reading
        self._sweep_wake = anyio.Event()
        self._reading = False

    # -- registration ---------------------------------------------------------
    def watch(self, obj: Any, paths: Sequence[str],
              done: Callable[[Watch], bool] | None = None, kind: str | None = None) -> Watch:
        """Start watching ``paths`` of ``obj``. ``done(watch)`` true releases it.

        ``kind`` (a task's method) groups watches whose time to ``done`` is learned, so
        one that stays quiet past it is read directly; without it only the first
        update is checked for."""
        if self._tg is None:
            raise RuntimeError("the watcher is not running (use the client as an async "
                               "context manager)")
        w = Watch(self, obj, tuple(paths), done, kind)
        if self._stopped is not None:
            w.fail(self._stopped)
            return w
        self._watches.setdefault(w.moid, []).append(w)
        self._pending.append(w)
        self.stats.watches += 1
        self._flush_needed.set()
        self._wake.set()
        return w

    def finished(self, w: Watch) -> None:
        """``w`` reached its done state: learn how long its kind takes, and release it."""
        if w.kind is not None and not self._reading:
            # Only ends the update loop reported: one found by a direct read came late.
            durations = self._durations.get(w.kind)
            if durations is None:
                durations = self._durations[w.kind] = _Durations()
            durations.add(time.monotonic() - w.started)
        self.release(w)

    def expected_s(self, kind: str) -> float:
        """How long watches of ``kind`` are expected to take (0 before any ended)."""
        durations = self._durations.get(kind)
        return 0.0 if durations is None else durations.expected_s()

    def release(self, w: Watch) -> None:
        if not w.active:
            return
        w.active = False
        same = self._watches.get(w.moid)
        if same is not None:
            if w in same:
                same.remove(w)
            if not same:
                del self._watches[w.moid]
        group = w.group
        if group is not None:
            group.watches.discard(w)
            if not group.watches and group in self._groups:
                self._groups.discard(group)
                if group.generation == self.session.generation:
                    self._retired.append(group.filter)
                    self._flush_needed.set()
        elif w in self._pending:
            self._pending.remove(w)

    @property
    def live(self) -> int:
        return sum(len(ws) for ws in self._watches.values())

    # -- running --------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The watcher's loops; run it in the client's task group."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._flusher)
                tg.start_soon(self._sweeper)
                task_status.started()
                await self._loop()
        except BaseException:
            self._stop(ConnectionFailed("the vCenter update loop stopped"))
            raise

    def _stop(self, error: VSphereError) -> None:
        self._stopped = error
        for ws in list(self._watches.values()):
            for w in list(ws):
                w.fail(error)

    async def _loop(self) -> None:
        version = ""
        failures = 0
        options = PC.WaitOptions(maxWaitSeconds=self.max_wait_s,
                                 maxObjectUpdates=self.max_object_updates)
        while True:
            if not self._watches:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            if self._collector is None or \
                    self._collector_generation != self.session.generation:
                try:
                    await self._rebuild()
                except InvalidLogin as exc:
                    self._fail_all(exc)
                    continue
                except VSphereError as exc:
                    failures += 1
                    log.warning("cannot create a property collector (%s); retrying", exc)
                    await anyio.sleep(self.session.retry.pause_s(min(failures, 6)))
                    continue
                version = ""
            try:
                update = await self.session.call(
                    self._collector, "WaitForUpdatesEx", version, options,
                    timeout_s=self.max_wait_s + self.session.call_timeout_s, session_bound=True)
            except (NotAuthenticated, TaskCancelled):
                # Session gone (re-login done by the session) or our wait cancelled by
                # the server: the next round rebuilds or simply asks again.
                failures += 1
                if failures > 2:
                    await anyio.sleep(self.session.retry.pause_s(min(failures, 6)))
                continue
            except NotFound:
                self._collector = None  # the collector vanished: rebuild
                continue
            except InvalidLogin as exc:
                self._fail_all(exc)
                continue
            except TransientVSphereError as exc:
                failures += 1
                log.info("WaitForUpdatesEx failed (%s); asking again", exc.reason)
                await anyio.sleep(self.session.retry.pause_s(min(failures, 6)))
                continue
            except VSphereError as exc:
                if exc.fault == "InvalidCollectorVersion":
                    self._collector = None
                    continue
                failures += 1
                log.warning("WaitForUpdatesEx failed: %s", exc)
                await anyio.sleep(self.session.retry.pause_s(min(failures, 6)))
                continue
            failures = 0
            self.stats.wait_calls += 1
            if update is None:
                continue
            version = update.version
            if update.truncated:
                self.stats.truncated += 1
            self._dispatch(update)

    def _fail_all(self, error: VSphereError) -> None:
        for ws in list(self._watches.values()):
            for w in list(ws):
                w.fail(error)
                self.release(w)

    def _dispatch(self, update: Any) -> None:
        touched: dict[int, Watch] = {}
        for filter_update in update.filterSet or ():
            filter_id = filter_update.filter._moId
            for object_update in filter_update.objectSet or ():
                self.stats.updates += 1
                watches = self._watches.get(object_update.obj._moId)
                if not watches:
                    continue
                kind = object_update.kind
                if kind == "leave":
                    for w in watches:
                        w.gone = True
                        touched[id(w)] = w
                    continue
                changes = object_update.changeSet or ()
                for w in watches:
                    values = w.values
                    paths = w.paths
                    for change in changes:
                        name = change.name
                        if name in paths:
                            if change.op == "remove" or change.val is None:
                                values.pop(name, None)
                            else:
                                values[name] = change.val
                    if kind == "enter":
                        group = w.group
                        if group is None:
                            # The poll's reply can overtake CreateFilter's: keep the id.
                            if w.early is None:
                                w.early = []
                            w.early.append(filter_id)
                        elif group.filter._moId == filter_id:
                            w.initialized = True
                    touched[id(w)] = w
        if touched:
            now = time.monotonic()
            for w in touched.values():
                w.last_seen = now
                w.checks = 0
                w._notify()

    # -- collector and filters ----------------------------------------------------
    async def _rebuild(self) -> None:
        async with self._lock:
            generation = self.session.generation
            old = self._collector
            if old is not None and self._collector_generation == generation:
                # Same session (InvalidCollectorVersion): drop the old one.
                with contextlib.suppress(VSphereError):
                    await self.session.call(old, "DestroyPropertyCollector")
            self._collector = None
            content = self.session.content
            collector = await self.session.call(content.propertyCollector,
                                                "CreatePropertyCollector", session_bound=True)
            live = [w for ws in self._watches.values() for w in ws]
            for group in self._groups:
                for w in group.watches:
                    w.group = None
            for w in live:
                w.initialized = False  # the new filters report everything again
                w.early = None
            self._groups.clear()
            self._retired.clear()
            self._pending = live
            self._collector = collector
            self._collector_generation = generation
            self.stats.rebuilds += 1
            if self.stats.rebuilds > 1:
                log.info("property collector rebuilt after a new login: re-reading %d "
                         "watched objects", len(live))
            self._flush_needed.set()

    async def _flusher(self) -> None:
        failures = 0
        while True:
            await self._flush_needed.wait()
            self._flush_needed = anyio.Event()
            try:
                await self._flush()
                failures = 0
            except VSphereError as exc:
                failures += 1
                log.info("creating property filters failed (%s); retrying", exc.reason)
                await anyio.sleep(self.session.retry.pause_s(min(failures, 6)))
                self._flush_needed.set()

    async def _flush(self) -> None:
        async with self._lock:
            retired, self._retired = self._retired, []
            for flt in retired:
                try:
                    await self.session.call(flt, "DestroyPropertyFilter", session_bound=True)
                    self.stats.filters_destroyed += 1
                except VSphereError:
                    pass  # gone with its session, or never mind: it only costs the server
            while self._pending:
                collector = self._collector
                generation = self._collector_generation
                if collector is None or generation != self.session.generation:
                    return  # the loop rebuilds and flushes again
                batch: dict[tuple[str, tuple[str, ...]], list[Watch]] = {}
                rest: list[Watch] = []
                for w in self._pending:
                    key = (w.type_name, w.paths)
                    group = batch.setdefault(key, [])
                    if len(group) < self.max_filter_objects:
                        group.append(w)
                    else:
                        rest.append(w)
                self._pending = rest
                for watches in batch.values():
                    await self._create_filter(collector, generation, watches)

    async def _create_filter(self, collector: Any, generation: int,
                             watches: list[Watch]) -> None:
        while watches:
            objects: dict[str, Any] = {}
            for w in watches:
                objects.setdefault(w.moid, w.obj)
            spec = PC.FilterSpec(
                objectSet=[PC.ObjectSpec(obj=o, skip=False) for o in objects.values()],
                propSet=[PC.PropertySpec(type=type(watches[0].obj), all=False,
                                         pathSet=list(watches[0].paths))])
            try:
                flt = await self.session.call(collector, "CreateFilter", spec, False,
                                              session_bound=True)
            except NotAuthenticated:
                self._pending.extend(w for w in watches if w.active)
                return
            except NotFound as exc:
                bad = [w for w in watches if w.moid == exc.obj]
                if not bad:  # the collector itself is gone
                    self._pending.extend(w for w in watches if w.active)
                    self._collector = None
                    self._wake.set()
                    return
                for w in bad:
                    w.gone = True
                    w._notify()
                    self.release(w)
                watches = [w for w in watches if w.moid != exc.obj]
                continue
            except TransientVSphereError:
                self._pending.extend(w for w in watches if w.active)
                raise
            except VSphereError as exc:
                for w in watches:
                    w.fail(exc)
                    self.release(w)
                return
            self.stats.filters_created += 1
            group = _Group(flt, {w for w in watches if w.active}, generation)
            now = time.monotonic()
            for w in group.watches:
                w.group = group
                w.filter_at = now
                if w.early is not None:
                    w.initialized = w.initialized or flt._moId in w.early
                    w.early = None
                self._schedule(w, now + self.quiet_s)
            if group.watches and generation == self.session.generation:
                self._groups.add(group)
            elif generation == self.session.generation:
                self._retired.append(flt)
                self._flush_needed.set()
            return


    # -- the direct-read fallback ---------------------------------------------------
    def _schedule(self, w: Watch, at: float) -> None:
        if w.due_at is not None and w.due_at <= at:
            return  # an earlier entry is there; it is looked at again when it comes up
        w.due_at = at
        heapq.heappush(self._due, (at, next(self._due_seq), w))
        if at < self._sweep_at:
            self._sweep_wake.set()

    def _due_time(self, w: Watch) -> float | None:
        """When ``w`` is overdue; None once nothing more is expected of it."""
        quiet = self.quiet_s
        if not w.initialized:
            at = w.filter_at + quiet
        elif w.kind is None:
            return None
        else:
            at = max(w.last_seen, w.started + self.expected_s(w.kind)) + quiet
        if w.checks:
            at = max(at, w.last_check + quiet * 2 ** min(w.checks, 4))
        return at

    def _overdue(self, now: float) -> list[Watch]:
        # Read together what falls due within a quarter of quiet_s: one call, not many.
        horizon = now + self.quiet_s / 4
        out = []
        due = self._due
        while due and due[0][0] <= horizon:
            at, _, w = heapq.heappop(due)
            if w.due_at != at:
                continue  # superseded by an earlier entry
            w.due_at = None
            if not w.active or w.group is None:
                continue  # released, or waiting for its (new) filter, which schedules it
            actual = self._due_time(w)
            if actual is None:
                continue
            if actual > horizon:
                self._schedule(w, actual)
            else:
                out.append(w)
        return out

    async def _sweeper(self) -> None:
        while True:
            now = time.monotonic()
            if not self._due or self._due[0][0] > now:
                self._sweep_at = self._due[0][0] if self._due else math.inf
                self._sweep_wake = anyio.Event()
                with anyio.move_on_after(self._sweep_at - now if self._due else None):
                    await self._sweep_wake.wait()
                continue
            self._sweep_at = -math.inf
            overdue = self._overdue(now)
            if overdue:
                await self._read_back(overdue)

    async def _read_back(self, watches: list[Watch]) -> None:
        """Read every overdue watch's paths in one ``RetrievePropertiesEx``."""
        sent = [(w, w.version) for w in watches]
        specs: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
        for w in watches:
            specs.setdefault((w.type_name, w.paths), {}).setdefault(w.moid, w.obj)
        try:
            found = await self._retrieve(specs)
        except VSphereError as exc:
            log.info("reading %d objects whose updates are overdue failed (%s); trying "
                     "again later", len(watches), exc)
            found = None
        now = time.monotonic()
        missed = 0
        self._reading = True
        try:
            for w, version in sent:
                if not w.active:
                    continue
                if found is None:
                    w.checks += 1
                    w.last_check = now
                elif w.version == version:  # (else an update came meanwhile: it is newer)
                    got = found.get(w.moid, {})
                    values = {p: got[p] for p in w.paths if p in got}
                    if not w.initialized or values != w.values:
                        missed += 1
                        w.values.clear()
                        w.values.update(values)
                        w.initialized = True
                        w.last_seen = now
                        w.checks = 0
                        w._notify()
                    else:
                        w.checks += 1
                        w.last_check = now
                if w.active:
                    at = self._due_time(w)
                    if at is not None:
                        self._schedule(w, at)
        finally:
            self._reading = False
        if missed:
            self.stats.missed_updates += missed
            log.info("%d of %d watched objects had changed without an update from vCenter; "
                     "read directly", missed, len(watches))

    async def _retrieve(self, specs: dict[tuple[str, tuple[str, ...]], dict[str, Any]]
                        ) -> dict[str, dict[str, Any]]:
        """moid -> {path: value} for the objects of ``specs``; objects gone are marked gone."""
        while True:
            spec_set = [PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=o, skip=False)
                                                 for o in objects.values()],
                                      propSet=[PC.PropertySpec(type=type(next(iter(
                                          objects.values()))), all=False, pathSet=list(paths))])
                        for (_, paths), objects in specs.items() if objects]
            if not spec_set:
                return {}
            self.stats.direct_reads += 1
            self.stats.direct_read_objects += sum(len(o) for o in specs.values())
            try:
                contents = await self.session.retrieve_all(spec_set, PC.RetrieveOptions(),
                                                           safe=True)
            except NotFound as exc:
                if not any(exc.obj in objects for objects in specs.values()):
                    raise
                for objects in specs.values():
                    objects.pop(exc.obj or "", None)
                for w in list(self._watches.get(exc.obj or "", ())):
                    w.gone = True
                    w._notify()
                    self.release(w)
                continue
            return {c.obj._moId: {p.name: p.val for p in c.propSet or ()} for c in contents}
