"""The client's inventory reads: server, datacenters, resolution, VMs, hosts, datastores.

:class:`Reads` answers every question about the inventory with
``RetrievePropertiesEx`` (paged, over cached views; ``fleet.vsphere.client.connection``)
or the search index, and turns the answers into the model's values
(``fleet.vsphere.inventory``). Host names are cached for ``VmInfo`` and refreshed
when a VM names a host not seen yet. Every other part builds on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyVmomi import vim, vmodl

from fleet.errors import ConfigError, NotFound, UnsupportedEndpoint, some_of
from fleet.urls import redact_url
from fleet.vsphere import inventory as inv
from fleet.vsphere.client.connection import Connection
from fleet.vsphere.model import DatastoreInfo, HostInfo, Ref, ServerInfo, VmInfo

PC = vmodl.query.PropertyCollector


class Reads(Connection):
    """Reads of the inventory; see the module docstring."""

    async def _host_name_map(self, refresh: bool = False) -> dict[str, str]:
        if refresh or not self._host_names:
            contents = await self._retrieve_view("HostSystem", ["name"], plain=True)
            self._host_names = {c.obj._moId: str(inv.props(c).get("name")) for c in contents}
        return self._host_names

    async def _host_names_for(self, contents: list[Any]) -> dict[str, str]:
        """Host names for the VMs read (re-read when one names a host not seen yet)."""
        names = await self._host_name_map()
        for c in contents:
            host = inv.props(c).get("runtime.host")
            if host is not None and host._moId not in names:
                return await self._host_name_map(refresh=True)
        return names

    async def _vm_infos(self, contents: list[Any]) -> list[VmInfo]:
        names = await self._host_names_for(contents)
        return [inv.vm_info(c, names) for c in contents]

    # -- inventory: server, datacenters, resolution ------------------------------------
    async def server_info(self) -> ServerInfo:
        """About the endpoint; raises UnsupportedEndpoint if it cannot instant-clone."""
        if self._server is None:
            raise RuntimeError("the client is not open")
        if self._unsupported:
            raise UnsupportedEndpoint(f"{redact_url(self.url)}: {self._unsupported}")
        return self._server

    async def datacenters(self) -> list[tuple[str, Ref, Ref]]:
        """(name, datacenter, its VM folder) for every datacenter, in inventory order."""
        if self._datacenters is None:
            contents = await self._retrieve_view("Datacenter", ["name", "vmFolder"])
            self._datacenters = [(str(inv.props(c)["name"]), c.obj, inv.props(c)["vmFolder"])
                                 for c in contents]
        return [(name, inv.ref_of(dc), inv.ref_of(folder))
                for name, dc, folder in self._datacenters]

    async def _inventory_paths(self, path: str, under: str = "vm") -> list[str]:
        """Candidate full inventory paths for ``path`` (``dc/vm/a/b`` or ``a/b``)."""
        clean = path.strip("/")
        dcs = await self.datacenters()
        first = clean.split("/", 1)[0]
        if any(name == first for name, _, _ in dcs):
            return [clean]
        if not dcs:
            return [clean]
        return [f"{dcs[0][0]}/{under}/{clean}" if clean else f"{dcs[0][0]}/{under}", clean]

    async def find_by_path(self, path: str, under: str = "vm") -> Ref | None:
        """The entity at an inventory path; relative paths start below the first
        datacenter's ``under`` folder (``vm``, ``host``, ``datastore``, ``network``)."""
        index = self.content.searchIndex
        for candidate in await self._inventory_paths(path, under):
            found = await self.session.call(index, "FindByInventoryPath", candidate)
            if found is not None:
                return inv.ref_of(found)
        return None

    async def resolve(self, type_name: str, name_or_path: str) -> Ref:
        """A Datacenter, ClusterComputeResource, HostSystem, Datastore, Folder, ResourcePool
        or VirtualMachine by inventory path (contains ``/``) or unique name."""
        if "/" in name_or_path:
            under = {"VirtualMachine": "vm", "Folder": "vm", "Datastore": "datastore",
                     "Network": "network"}.get(type_name, "host")
            ref = await self.find_by_path(name_or_path, under)
            if ref is None or ref.type != type_name:
                raise NotFound(f"no {type_name} at inventory path {name_or_path!r}",
                               method="FindByInventoryPath")
            return ref
        contents = await self._retrieve_view(type_name, ["name"], plain=True)
        hits = [c.obj for c in contents if inv.props(c).get("name") == name_or_path]
        if not hits:
            raise NotFound(f"no {type_name} named {name_or_path!r}", method="resolve")
        if len(hits) > 1:
            ids = ", ".join(h._moId for h in hits)
            raise ConfigError(f"{len(hits)} objects of type {type_name} are named "
                              f"{name_or_path!r} ({ids}); give an inventory path")
        return inv.ref_of(hits[0])

    async def default_pool(self, cluster: Ref) -> Ref:
        """A cluster's (or standalone host's compute resource's) root resource pool."""
        contents = await self._retrieve_objects([self.mo(cluster)], ["resourcePool"])
        pool = inv.props(contents[0]).get("resourcePool") if contents else None
        if pool is None:
            raise NotFound(f"{cluster} has no resource pool")
        return inv.ref_of(pool)

    # -- inventory: VMs, hosts, datastores -----------------------------------------------
    async def find_vms(self, names_or_paths: Sequence[str]) -> list[VmInfo]:
        """Resolve VMs by name or inventory path; NotFound names every missing one."""
        found: dict[str, Any] = {}
        missing: list[str] = []
        names = [n for n in names_or_paths if "/" not in n]
        by_name: dict[str, list[Any]] = {}
        if names:
            for c in await self._retrieve_view("VirtualMachine", ["name"], plain=True):
                by_name.setdefault(str(inv.props(c).get("name")), []).append(c.obj)
        for item in names_or_paths:
            if "/" in item:
                ref = await self.find_by_path(item)
                if ref is None or ref.type != "VirtualMachine":
                    missing.append(item)
                else:
                    found[item] = self.mo(ref)
                continue
            hits = by_name.get(item, [])
            if not hits:
                missing.append(item)
            elif len(hits) > 1:
                ids = ", ".join(h._moId for h in hits)
                raise ConfigError(f"{len(hits)} VMs are named {item!r} ({ids}); give the "
                                  "inventory path")
            else:
                found[item] = hits[0]
        if missing:
            raise NotFound(f"no VM called {some_of(missing)}", method="find_vms")
        infos = {i.ref.id: i for i in await self._vm_infos(
            await self._retrieve_objects(list({m._moId: m for m in found.values()}.values()),
                                         inv.VM_PATHS))}
        try:
            return [infos[found[item]._moId] for item in names_or_paths]
        except KeyError as exc:
            raise NotFound(f"VM {exc.args[0]} vanished while being read",
                           method="find_vms") from None

    async def get_vm(self, ref: Ref) -> VmInfo:
        contents = await self._retrieve_objects([self.mo(ref)], inv.VM_PATHS)
        if not contents:
            raise NotFound(f"{ref} does not exist", obj=ref.id)
        return (await self._vm_infos(contents))[0]

    async def get_vms(self, refs: Sequence[Ref]) -> list[VmInfo]:
        """Several VMs in one read (same order; NotFound if any is gone)."""
        infos = {i.ref: i for i in await self._vm_infos(
            await self._retrieve_objects([self.mo(r) for r in refs], inv.VM_PATHS))}
        missing = [str(r) for r in refs if r not in infos]
        if missing:
            raise NotFound(f"{', '.join(missing)} do not exist")
        return [infos[r] for r in refs]

    async def chain_depth(self, ref: Ref) -> int:
        """A VM's deepest delta-disk chain, read now (``layoutEx.disk[].chain[]``)."""
        contents = await self._retrieve_objects([self.mo(ref)], ["layoutEx.disk"])
        if not contents:
            raise NotFound(f"{ref} does not exist", obj=ref.id)
        return inv.chain_depth(inv.props(contents[0]).get("layoutEx.disk"))

    async def list_vms(self, paths: Sequence[str] = inv.VM_PATHS) -> list[Any]:
        """Raw ObjectContent of every VM (bulk, paged) with the given property paths."""
        return await self._retrieve_view("VirtualMachine", paths)

    async def list_hosts(self) -> list[HostInfo]:
        async def make() -> list[Any]:
            view = await self._view(("HostSystem", "ClusterComputeResource"))
            return [PC.FilterSpec(
                objectSet=[inv.object_spec_view(view, "HostSystem")],
                propSet=[PC.PropertySpec(type=vim.HostSystem, pathSet=list(inv.HOST_PATHS)),
                         PC.PropertySpec(type=vim.ClusterComputeResource, pathSet=["name"])])]

        contents = await self.retrieve(make)
        clusters = {c.obj._moId: str(inv.props(c).get("name")) for c in contents
                    if c.obj._wsdlName == "ClusterComputeResource"}
        hosts = [inv.host_info(c, clusters) for c in contents
                 if c.obj._wsdlName == "HostSystem"]
        self._host_names = {h.ref.id: h.name for h in hosts}
        return hosts

    async def list_datastores(self) -> list[DatastoreInfo]:
        return [inv.datastore_info(c)
                for c in await self._retrieve_view("Datastore", inv.DATASTORE_PATHS)]
