"""The client's read of members' addresses: where each VM runs and what its guest reports.

:meth:`Addresses.read_addresses` serves ``fleet inventory``, ``fleet status
--members`` and the service's member records (docs/inventory.md). It reads the
VMs it is given, never a whole folder or the inventory, in pages of
``page_size`` refs with only the paths it needs (``ADDRESS_PATHS`` and the labels,
by key), then the virtual NICs the guests name, each by its keyed path
(``config.hardware.device[4000]``), so the engine can tell a guest's own addresses
from those an instant clone inherited from its source. A VM destroyed between the
caller's listing and this read is left out: vCenter refuses a whole read that names
a VM it no longer has, so that VM is dropped and the page read again.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from fleet.errors import NotFound
from fleet.vsphere import inventory as inv
from fleet.vsphere.client.reads import Reads
from fleet.vsphere.model import Ref, VmAddresses

#: VMs a page may lose to destroys before the read gives up (each costs a read again)
MAX_VANISHED = 32


class Addresses(Reads):
    """Members' addresses; see the module docstring."""

    async def _datastore_names_for(self, contents: list[Any]) -> dict[str, str]:
        """Datastore names for the VMs read (re-read when one names a datastore not seen)."""
        names = self._datastore_names
        if names and all(d._moId in names for c in contents
                         for d in inv.props(c).get("datastore") or ()):
            return names
        read = await self._retrieve_view("Datastore", ["name"], plain=True)
        self._datastore_names = {c.obj._moId: str(inv.props(c).get("name")) for c in read}
        return self._datastore_names

    async def _read_present(self, mos: list[Any], paths: Sequence[str]) -> list[Any]:
        """``RetrievePropertiesEx`` of ``mos``, less those vCenter no longer has."""
        present = list(mos)
        for _ in range(MAX_VANISHED):
            try:
                return await self._retrieve_objects(present, paths) if present else []
            except NotFound as exc:
                gone = [m for m in present if m._moId == exc.obj]
                if not gone:
                    raise
                present = [m for m in present if m._moId != exc.obj]
        raise NotFound(f"more than {MAX_VANISHED} of the VMs read vanished while being "
                       "read (are they being destroyed?); try again",
                       method="RetrievePropertiesEx")

    async def read_addresses(self, vms: Sequence[Ref],
                             labels: Collection[str]) -> list[VmAddresses]:
        """See ``fleet.vsphere.model.VSphere.read_addresses``."""
        keys = tuple(dict.fromkeys(labels))
        paths = [*inv.ADDRESS_PATHS, *(inv.extra_config_path(k) for k in keys)]
        refs = list(dict.fromkeys(vms))
        out: list[VmAddresses] = []
        size = max(1, self.page_size)
        for start in range(0, len(refs), size):
            mos = [self.mo(r) for r in refs[start:start + size]]
            contents = await self._read_present(mos, paths)
            if not contents:
                continue
            hosts = await self._host_names_for(contents)
            stores = await self._datastore_names_for(contents)
            devices = await self._guest_nic_devices(contents)
            out.extend(inv.vm_addresses(contents, hosts, stores, keys, devices))
        return out

    async def _guest_nic_devices(self, contents: list[Any]) -> dict[str, dict[int, Any]]:
        """VM id -> {key: device} for the virtual NICs the guests name: one read of every
        key any guest names (an instant clone keeps its source's keys, so it is one or
        two keys for a whole fleet), each by its keyed path (docs/reads.md)."""
        nic_keys = sorted({n.device_key for c in contents
                           for n in inv.guest_nics(inv.props(c).get("guest.net"))
                           if n.device_key is not None})
        if not nic_keys:
            return {}
        paths = [inv.device_path(k) for k in nic_keys]
        read = await self._read_present([c.obj for c in contents], paths)
        found: dict[str, dict[int, Any]] = {}
        for c in read:
            p = inv.props(c)
            found[c.obj._moId] = {k: p[path] for k, path in zip(nic_keys, paths, strict=True)
                                  if p.get(path) is not None}
        return found
