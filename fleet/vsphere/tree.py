"""A live view of one folder, its child folders and their VMs, kept by a watch.

:class:`FolderTree` is the service's picture of its fleets (docs/watching.md, "The
service's view"): the service's root folder, the fleet folders in it, and the VMs
directly in those, each VM with its name, power state, host and fleet's labels
(``extraConfig`` keys read by keyed path, as a folder listing reads them:
docs/reads.md). It is kept the way a Kubernetes informer keeps its cache:

- one property filter on a private property collector selects the whole tree
  (root -> ``childEntity`` -> ``childEntity``), and ``WaitForUpdatesEx`` reports
  every object that enters the tree, changes or leaves it;
- the first answer (version ``""``) is the full read, paged with
  ``maxObjectUpdates``; it is built aside and replaces the view only when
  complete, so a reader never sees half a tree;
- a lost reply is asked again with the same version (vCenter answers it the same);
  a new login, a lost collector or ``InvalidCollectorVersion`` makes a new
  collector and reads everything again. So does ``resync_s`` (a safety net against
  an update lost without trace, which docs/watching.md explains);
- the root folder leaving (destroyed) ends the watch: ``root_gone`` says so, and
  the owner finds the folder again.

Readers ask synchronously (:meth:`folders`, :meth:`vms_in`) and wait for the next
change with :meth:`wait_changed`; ``generation`` counts the changes applied.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection
from typing import Any

import anyio
from anyio.abc import TaskStatus
from pyVmomi import vim, vmodl

from fleet.errors import (
    NotAuthenticated,
    NotFound,
    TaskCancelled,
    TransientVSphereError,
    VSphereError,
)
from fleet.vsphere import inventory as inv
from fleet.vsphere.client.reads import Reads
from fleet.vsphere.model import Labels, ListedVm, PowerState, Ref

log = logging.getLogger("fleet.vsphere")
PC = vmodl.query.PropertyCollector

FOLDER_PATHS = ("name", "parent")


class _Node:
    """One object of the tree as the updates left it."""

    __slots__ = ("host", "kind", "labels", "listed", "name", "parent", "power")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name: str | None = None
        self.parent: str | None = None
        self.power: PowerState = "poweredOff"
        self.host: str | None = None
        self.labels: dict[str, str] = {}
        self.listed: ListedVm | None = None  # built when first asked for, until a change


class _View:
    """Nodes by id, and the ids of each parent's children."""

    def __init__(self) -> None:
        self.nodes: dict[str, _Node] = {}
        self.children: dict[str, set[str]] = {}
        #: parents whose children changed since the last notice
        self.dirty: set[str] = set()

    def set_parent(self, moid: str, node: _Node, parent: str | None) -> None:
        if node.parent == parent:
            return
        if node.parent is not None:
            self.dirty.add(node.parent)
            siblings = self.children.get(node.parent)
            if siblings is not None:
                siblings.discard(moid)
                if not siblings:
                    del self.children[node.parent]
        node.parent = parent
        if parent is not None:
            self.dirty.add(parent)
            self.children.setdefault(parent, set()).add(moid)

    def drop(self, moid: str) -> None:
        node = self.nodes.pop(moid, None)
        if node is not None:
            self.set_parent(moid, node, None)


class FolderTree:
    """See the module docstring. Run :meth:`run` in a task group; it returns when the
    root folder is gone and raises only when cancelled."""

    def __init__(self, client: Reads, root: Ref, labels: Collection[str], *,
                 max_wait_s: int = 30, page: int = 1000, resync_s: float = 900.0) -> None:
        self.client = client
        self.root = root
        self.labels = tuple(dict.fromkeys(labels))
        self.max_wait_s = max_wait_s
        self.page = page
        self.resync_s = resync_s
        #: the first full read is in the view (and no later one has failed for good)
        self.synced = False
        #: bumped whenever the view changes
        self.generation = 0
        #: why the watch is not working now, until it works again
        self.error: str | None = None
        self.root_gone = False
        #: full reads done (the first and every rebuild)
        self.full_reads = 0
        self._view = _View()
        #: parent id -> generation of its last change (``folder_version``)
        self._versions: dict[str, int] = {}
        self._label_paths = {inv.extra_config_path(k): k for k in self.labels}
        self._vm_paths = [*FOLDER_PATHS, "runtime.powerState", "runtime.host",
                          *self._label_paths]
        self._changed = anyio.Event()
        self._task_status: TaskStatus[None] | None = None
        self._new_host = False  # a VM names a host whose name is not known yet

    # -- reading the view -------------------------------------------------------------
    def folders(self) -> list[tuple[str, Ref]]:
        """(name, ref) of every folder directly in the root, sorted by name."""
        view = self._view
        found = []
        for moid in view.children.get(self.root.id, ()):
            node = view.nodes[moid]
            if node.kind == "Folder" and node.name is not None:
                found.append((node.name, Ref("Folder", moid)))
        return sorted(found)

    def vms_in(self, folder: Ref) -> list[ListedVm]:
        """Every VM directly in ``folder`` (one of :meth:`folders`), as a listing reads
        it; an empty list for a folder the view does not have."""
        view = self._view
        hosts = self.client._host_names
        out = []
        for moid in view.children.get(folder.id, ()):
            node = view.nodes[moid]
            if node.kind != "VirtualMachine":
                continue
            listed = node.listed
            if listed is None:
                host = Ref("HostSystem", node.host) if node.host else None
                listed = node.listed = ListedVm(
                    Ref("VirtualMachine", moid), node.name or moid, node.power, host,
                    hosts.get(node.host) if node.host else None,
                    Labels(node.labels, self.labels))
            out.append(listed)
        return out

    def folder_version(self, folder: Ref) -> int:
        """The view's generation when a VM in ``folder`` last entered, changed or left."""
        return self._versions.get(folder.id, 0)

    async def wait_changed(self, generation: int) -> None:
        """Return once ``generation`` is behind (a change since), or the watch ended.
        The caller bounds the wait."""
        while self.generation == generation and not self.root_gone:
            await self._changed.wait()

    def _notify(self) -> None:
        self.generation += 1
        view = self._view
        for parent in view.dirty:
            self._versions[parent] = self.generation
        view.dirty.clear()
        self._changed.set()
        self._changed = anyio.Event()

    # -- keeping it -----------------------------------------------------------------
    def _filter_spec(self, root: Any) -> Any:
        members = PC.TraversalSpec(name="members", type=vim.Folder, path="childEntity",
                                   skip=False)
        fleets = PC.TraversalSpec(name="fleets", type=vim.Folder, path="childEntity",
                                  skip=False, selectSet=[members])
        return PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=root, skip=False, selectSet=[fleets])],
            propSet=[PC.PropertySpec(type=vim.Folder, all=False, pathSet=list(FOLDER_PATHS)),
                     PC.PropertySpec(type=vim.VirtualMachine, all=False,
                                     pathSet=self._vm_paths)])

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the view until the root folder is gone (or cancelled). ``started`` is
        signalled once the first full read is in the view or has failed once (then
        ``error`` says why and the watch keeps trying)."""
        self._task_status = task_status
        failures = 0
        session = self.client.session
        while not self.root_gone:
            collector = None
            try:
                collector = await session.call(self.client.content.propertyCollector,
                                               "CreatePropertyCollector", session_bound=True)
                await session.call(collector, "CreateFilter",
                                   self._filter_spec(self.client.mo(self.root)), False,
                                   session_bound=True)
                await self._follow(collector, session.generation)
                failures = 0
            except NotFound as exc:
                if exc.obj == self.root.id:
                    self._lose_root()
                    break
                failures += 1  # the collector vanished: a new one
            except VSphereError as exc:
                self.error = f"the watch of folder {self.root.id} failed: {exc}"
                log.warning("%s; reading it again", self.error)
                failures += 1
            finally:
                if collector is not None:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5), \
                            contextlib.suppress(VSphereError):
                        await session.call(collector, "DestroyPropertyCollector")
            if self.error is not None:
                self._started()
            if failures:
                await anyio.sleep(session.retry.pause_s(min(failures, 6)))
        self._started()

    def _started(self) -> None:
        if self._task_status is not None:
            self._task_status.started()
            self._task_status = None

    def _lose_root(self) -> None:
        self.root_gone = True
        self.synced = False
        self._view = _View()
        self._notify()
        log.info("folder %s is gone: its watch ends", self.root)

    async def _follow(self, collector: Any, generation: int) -> None:
        """Read everything, then follow the changes until the session changes, the
        collector is lost or the resync time comes (returns), or a fault (raises)."""
        session = self.client.session
        options = PC.WaitOptions(maxWaitSeconds=self.max_wait_s, maxObjectUpdates=self.page)
        version = ""
        building: _View | None = _View()
        resync_at = time.monotonic() + self.resync_s
        failures = 0
        while session.generation == generation and time.monotonic() < resync_at:
            try:
                update = await session.call(
                    collector, "WaitForUpdatesEx", version, options,
                    timeout_s=self.max_wait_s + session.call_timeout_s, session_bound=True)
            except (NotAuthenticated, TaskCancelled):
                return  # a new login (the session made it) or the server cancelled: anew
            except TransientVSphereError as exc:
                failures += 1
                log.info("WaitForUpdatesEx on %s failed (%s); asking again", self.root,
                         exc.reason)
                await anyio.sleep(session.retry.pause_s(min(failures, 6)))
                continue
            except VSphereError as exc:
                if exc.fault == "InvalidCollectorVersion":
                    return
                raise
            failures = 0
            if update is None:
                continue
            version = update.version
            target = building if building is not None else self._view
            root_left = self._apply(target, update)
            if root_left:
                self._lose_root()
                return
            if update.truncated:
                continue
            if building is not None:
                # Every folder of either view may differ: its members are read anew.
                building.dirty.update(building.children, self._view.children)
                self._view, building = building, None
                self.full_reads += 1
                self.synced = True
                self.error = None
                self._started()
            if self._new_host:
                self._new_host = False
                with contextlib.suppress(VSphereError):
                    await self.client._host_name_map(refresh=True)
            self._notify()

    def _apply(self, view: _View, update: Any) -> bool:
        """Apply one update set to ``view``; True if the root folder left."""
        labels = self._label_paths
        known_hosts = self.client._host_names
        for filter_update in update.filterSet or ():
            for object_update in filter_update.objectSet or ():
                obj = object_update.obj
                moid = obj._moId
                if object_update.kind == "leave":
                    if moid == self.root.id:
                        return True
                    view.drop(moid)
                    continue
                node = view.nodes.get(moid)
                if node is None:
                    node = view.nodes[moid] = _Node(obj._wsdlName)
                node.listed = None
                if node.parent is not None:
                    view.dirty.add(node.parent)
                for change in object_update.changeSet or ():
                    name = change.name
                    value = None if change.op in ("remove", "indirectRemove") else change.val
                    if name == "name":
                        node.name = None if value is None else str(value)
                    elif name == "parent":
                        view.set_parent(moid, node, None if value is None else value._moId)
                    elif name == "runtime.powerState":
                        # a plain str: pyVmomi gives its enum type, which YAML and
                        # others refuse (docs/simulator-vms.md: typed as vCenter does)
                        node.power = str(value) if value else "poweredOff"  # type: ignore[assignment]
                    elif name == "runtime.host":
                        node.host = None if value is None else value._moId
                        if node.host is not None and node.host not in known_hosts:
                            self._new_host = True
                    elif name in labels:
                        key = labels[name]
                        if value is None:
                            node.labels.pop(key, None)
                        else:
                            node.labels[key] = "" if value.value is None else str(value.value)
        return False
