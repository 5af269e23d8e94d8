"""The client's VM folders: find, make, list, and folders as the fleet lock's records.

A fleet lives in a VM folder (``ensure_folder`` makes it with its parents, safely
against a racing maker or a lost reply); the fleet lock keeps its records as
folders (docs/locking.md), which is why ``new_folder`` is never repeated after a
lost reply and ``destroy_folder`` refuses a folder that holds anything but folders.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import UTC
from typing import Any

import anyio
from pyVmomi import vim, vmodl

from fleet.errors import ConfigError, NotEmpty, NotFound, VSphereError
from fleet.vsphere import inventory as inv
from fleet.vsphere import tree
from fleet.vsphere.client.reads import Reads
from fleet.vsphere.model import FolderTree, ListedVm, Ref

log = logging.getLogger("fleet.vsphere")
PC = vmodl.query.PropertyCollector


class Folders(Reads):
    """VM folders, and folders as the lock's records; see the module docstring."""

    async def _folder_path(self, path: str) -> tuple[Any, list[str]]:
        """(VM folder to start from, names below it) for ``dc/vm/a/b`` or ``a/b``."""
        parts = [p for p in path.strip("/").split("/") if p]
        dcs = await self.datacenters()
        if not dcs:
            raise NotFound("the inventory has no datacenter")
        for name, _, vm_folder in dcs:
            if parts[:2] == [name, "vm"]:
                return self.mo(vm_folder), parts[2:]
        return self.mo(dcs[0][2]), parts

    async def find_folder(self, path: str) -> Ref | None:
        start, parts = await self._folder_path(path)
        node = start
        for name in parts:
            node = await self.session.call(self.content.searchIndex, "FindChild", node, name)
            if node is None or node._wsdlName != "Folder":
                return None
        return inv.ref_of(node)

    async def ensure_folder(self, path: str) -> Ref:
        """The VM folder at ``path``, created with its parents if missing."""
        async with self._folder_lock:
            start, parts = await self._folder_path(path)
            node = start
            for name in parts:
                node = await self._child_folder(node, name)
            return inv.ref_of(node)

    async def create_folder(self, parent: Ref, name: str) -> Ref:
        """A folder ``name`` under ``parent`` (the existing one if it is already there)."""
        return inv.ref_of(await self._child_folder(self.mo(parent), name))

    async def _child_folder(self, parent: Any, name: str) -> Any:
        index = self.content.searchIndex
        child = await self.session.call(index, "FindChild", parent, name)
        attempt = 0
        while child is None:
            try:
                child = await self.session.call(parent, "CreateFolder", name)
                log.info("created folder %s under %s", name, parent._moId)
            except VSphereError as exc:
                # Someone made it first, or our reply was lost after it was made, or the
                # request was lost before (a reset): look, and ask again if it is not there.
                if exc.reason not in ("duplicate_name", "connection", "timeout"):
                    raise
                child = await self.session.call(index, "FindChild", parent, name)
                if child is None and (exc.reason == "duplicate_name"
                                      or attempt >= self.session.retry.max_retries):
                    raise
                attempt += 1
                if child is None:
                    await anyio.sleep(self.session.retry.pause_s(attempt))
        if child._wsdlName != "Folder":
            raise ConfigError(f"{name!r} under {parent._moId} is a {child._wsdlName}, "
                              "not a folder")
        return child

    async def list_folder_vms(self, folder: Ref,
                              labels: Collection[str]) -> list[ListedVm]:
        """Every VM directly in ``folder``: name, power state, host and the labels asked
        for, each by its keyed path (docs/reads.md); paged like every bulk read."""
        keys = tuple(dict.fromkeys(labels))
        spec = inv.filter_spec([inv.object_spec_children(self.mo(folder))], vim.VirtualMachine,
                               inv.listed_paths(keys))
        contents = await self.retrieve([spec], plain=True)
        names = await self._host_names_for(contents)
        return inv.listed_vms(contents, names, keys)

    def folder_tree(self, root: Ref, labels: Collection[str]) -> FolderTree:
        """A live view of ``root``'s folders and their VMs (``fleet.vsphere.tree``)."""
        return tree.FolderTree(self, root, labels)

    async def list_child_folders(self, folder: Ref) -> list[tuple[str, Ref]]:
        """(name, ref) of every folder directly in ``folder``, sorted by name."""
        spec = inv.filter_spec([inv.object_spec_children(self.mo(folder))], vim.Folder, ["name"])
        found = []
        for content in await self.retrieve([spec], plain=True):
            ref = inv.ref_of(content.obj)
            if ref.type == "Folder":
                found.append((str(inv.props(content).get("name", "")), ref))
        return sorted(found)

    # -- folders as records: the fleet lock (docs/locking.md) ---------------------------
    async def server_time(self) -> float:
        """vCenter's clock (``ServiceInstance.CurrentTime``), epoch seconds."""
        value = await self.session.call(self.session.mo("ServiceInstance", "ServiceInstance"),
                                        "CurrentTime")
        if value.tzinfo is None:  # xsd:dateTime without a zone is UTC in vim25
            value = value.replace(tzinfo=UTC)
        return float(value.timestamp())

    async def new_folder(self, parent: Ref, name: str) -> Ref:
        """One new folder (``CreateFolder``); DuplicateName if the name is taken. Not
        repeated after a lost reply (the session never repeats CreateFolder)."""
        return inv.ref_of(await self.session.call(self.mo(parent), "CreateFolder", name))

    async def rename_folder(self, folder: Ref, name: str) -> None:
        """``Rename_Task``; DuplicateName if a sibling has the name, NotFound if gone.
        Repeating it after a lost reply converges (the same name again)."""
        await self._run_task(self.mo(folder), "Rename_Task", name, safe=True)

    async def destroy_folder(self, folder: Ref) -> None:
        """Destroy a folder holding folders only. vCenter's Destroy_Task destroys a
        folder's whole subtree, VMs included, so the subtree is read first and anything
        but a folder in it refuses the call (NotEmpty)."""
        mo = self.mo(folder)
        tree = PC.TraversalSpec(name="tree", type=vim.Folder, path="childEntity", skip=False,
                                selectSet=[PC.SelectionSpec(name="tree")])
        spec = inv.filter_spec([PC.ObjectSpec(obj=mo, skip=False, selectSet=[tree])],
                               vim.ManagedEntity, ["name"])
        contents = await self.retrieve([spec])
        if not any(c.obj._moId == mo._moId for c in contents):
            raise NotFound(f"{folder} does not exist", obj=folder.id, method="Destroy_Task")
        others = [f"{c.obj._wsdlName} {inv.props(c).get('name', c.obj._moId)!r}"
                  for c in contents if c.obj._wsdlName != "Folder"]
        if others:
            raise NotEmpty(f"folder {folder.id} holds {', '.join(sorted(others)[:5])}"
                           + (f" and {len(others) - 5} more" if len(others) > 5 else "")
                           + "; not destroyed", obj=folder.id, method="Destroy_Task")
        await self._run_task(mo, "Destroy_Task", safe=True)
        log.info("destroyed folder %s", folder.id)
