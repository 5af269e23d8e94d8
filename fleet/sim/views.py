"""ViewManager and ContainerView: a session's live lists of what a container holds.

A view belongs to the session that made it and goes with it (``fleet.sim.calls``);
``view`` is computed on read, so a filter traversing it sees the inventory as it
is now (``fleet.sim.propcollector`` re-resolves dynamic filters on a structure
change).
"""

from __future__ import annotations

from typing import Any

from pyVmomi import VmomiSupport, vim

from fleet.sim.calls import CallContext, UserSession
from fleet.sim.core import Inventory, SimObject, contained


class ContainerView(SimObject):
    vim_type = vim.view.ContainerView
    id_prefix = "session-view-"

    def __init__(self, inventory: Inventory, container: SimObject, types: list[Any],
                 recursive: bool, owner: UserSession) -> None:
        super().__init__(inventory)
        self.container = container
        self.types = tuple(types or ())
        self.recursive = recursive
        self.owner = owner

    def prop_container(self) -> Any:
        return self.container.ref

    def prop_type(self) -> Any:
        return [t for t in self.types] or None

    def prop_recursive(self) -> bool:
        return self.recursive

    def prop_view(self) -> Any:
        found = contained(self.container, self.recursive)
        if self.types:
            found = [o for o in found if isinstance(o.ref, self.types)]
        return VmomiSupport.ManagedObject.Array([o.ref for o in found])

    def DestroyView(self, ctx: CallContext) -> None:
        ctx.session.views.discard(self.moid)
        self.inventory.objects.pop(self.moid, None)


class ViewManager(SimObject):
    vim_type = vim.view.ViewManager

    def prop_viewList(self) -> Any:
        return None

    def CreateContainerView(self, ctx: CallContext, container: Any, type: Any = None,
                            recursive: bool = False) -> Any:
        target = self.inventory.resolve(container)
        view = ContainerView(self.inventory, target, list(type or ()), bool(recursive),
                             ctx.session)
        self.inventory.objects[view.moid] = view
        ctx.session.views.add(view.moid)
        return view.ref
