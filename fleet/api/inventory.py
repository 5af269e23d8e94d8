"""Finding fleets in vCenter: the folders under the service's root folder.

Membership lives in vCenter, so a restarted service finds its fleets there:
each is a folder ``<root>/<name>`` holding VMs labelled
``guestinfo.fleet.name = <name>``. Listing a folder's sub-folders is not part
of the engine-facing :class:`~fleet.vsphere.model.VSphere` interface (yet), so
:func:`child_folders` uses a ``list_child_folders`` method when the backend has
one and otherwise reads ``childEntity`` through the real client's property
collector (one paged read, the same traversal ``list_folder_vms`` uses).
"""

from __future__ import annotations

from typing import Any

from fleet.errors import FleetError
from fleet.vsphere import inventory as inv
from fleet.vsphere.client import VSphereClient
from fleet.vsphere.model import Ref, VSphere


async def child_folders(vs: VSphere, folder: Ref) -> list[tuple[str, Ref]]:
    """(name, ref) of every folder directly in ``folder``."""
    lister: Any = getattr(vs, "list_child_folders", None)
    if lister is not None:
        found: list[tuple[str, Ref]] = await lister(folder)
        return found
    if not isinstance(vs, VSphereClient):
        raise FleetError(f"{type(vs).__name__} cannot list folders, so fleets cannot be "
                         "discovered")
    parent = vs.mo(folder)
    spec = inv.filter_spec([inv.object_spec_children(parent)], type(parent), ["name"])
    contents = await vs.retrieve([spec])
    out = []
    for c in contents:
        ref = inv.ref_of(c.obj)
        if ref.type == "Folder":
            out.append((str(inv.props(c).get("name", "")), ref))
    return sorted(out)
