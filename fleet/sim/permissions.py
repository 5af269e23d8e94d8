"""Who may do what where: the simulated vCenter's permissions and its AuthorizationManager.

vCenter grants privileges through permissions: a user (or group), a role (a set of
privileges) and an entity, propagated to everything below it. The simulator keeps
the part a client can see: every user holds every privilege except those the
topology denies them, everywhere (``[[users]] denied``) or on named entities and
everything below them (``[[users]] denied_on``, a propagating permission). One
answer serves both ways of asking: a call's own check (``NoPermission`` naming the
privilege and the entity) and ``AuthorizationManager.HasPrivilegeOnEntities`` /
``FetchUserPrivilegeOnEntities``, so a preflight sees what the calls will meet.

Which privilege a call needs where (:func:`required_privileges`): the method's own
on the call's object (the type info's ``privId``, or the simulator's table where
vSphere decides by the arguments), each parameter's ``privId`` on the entity passed
in it (a guest operation's VM), for an instant clone the places it goes (the folder:
``VirtualMachine.Inventory.CreateFromExisting``, the resource pool:
``Resource.AssignVMToPool``, the datastore: ``Datastore.AllocateSpace``) and for a
reconfiguration what it changes (:func:`reconfigure_privileges`).
docs/preflight.md lists what fleet needs of each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyVmomi import vim

from fleet.sim.calls import CallContext
from fleet.sim.core import Inventory, SimObject
from fleet.sim.entities import ManagedEntity

#: privileges every role holds (vSphere adds them to each user-defined role)
FREE_PRIVILEGES = ("System.Anonymous", "System.View", "System.Read")
#: privileges FetchUserPrivilegeOnEntities reports, when held: the ones the simulated
#: calls need (a real vCenter knows several hundred)
KNOWN_PRIVILEGES = (
    "Datastore.AllocateSpace", "Folder.Create", "Folder.Delete", "Folder.Rename",
    "Network.Assign", "Resource.AssignVMToPool", "System.Anonymous", "System.Read",
    "System.View", "VirtualMachine.Config.AdvancedConfig", "VirtualMachine.Config.EditDevice",
    "VirtualMachine.Config.Settings", "VirtualMachine.GuestOperations.Execute",
    "VirtualMachine.GuestOperations.Modify", "VirtualMachine.GuestOperations.Query",
    "VirtualMachine.Interact.PowerOff", "VirtualMachine.Interact.PowerOn",
    "VirtualMachine.Interact.Reset", "VirtualMachine.Inventory.CreateFromExisting",
    "VirtualMachine.Inventory.Delete", "VirtualMachine.Provisioning.Clone",
)


@dataclass(frozen=True)
class Grants:
    """One user: the password, and the privileges denied everywhere or on named entities
    (and below them)."""

    password: str
    denied: frozenset[str] = frozenset()
    denied_on: Mapping[str, frozenset[str]] = field(default_factory=dict)


class Permissions:
    """The users who may log in and what each may do where."""

    def __init__(self, users: Mapping[str, Grants]) -> None:
        self.users = dict(users)

    def authenticate(self, user: str, password: str) -> str | None:
        grants = self.users.get(user)
        return user if grants is not None and grants.password == password else None

    def holds(self, user: str | None, privilege: str, entity: SimObject) -> bool:
        """Whether ``user`` holds ``privilege`` on ``entity`` (a denial on it or on any
        entity above it takes it away: permissions propagate down)."""
        if privilege.startswith(FREE_PRIVILEGES):
            return True
        grants = self.users.get(user or "")
        if grants is None:
            return True  # not logged in: the session check refuses it first
        if privilege in grants.denied:
            return False
        node: Any = entity
        while isinstance(node, ManagedEntity):
            if privilege in grants.denied_on.get(node.name, ()):
                return False
            node = node.parent
        return True

    def check(self, user: str | None, privilege: str | None, entity: SimObject) -> None:
        """NoPermission, naming the privilege and the entity, unless ``user`` holds it."""
        if privilege and not self.holds(user, privilege, entity):
            raise vim.fault.NoPermission(
                msg=f"Permission to perform this operation was denied: {privilege} on "
                    f"'{entity.display_name}'.", object=entity.ref, privilegeId=privilege)


def required_privileges(method: str, info: Any, obj: SimObject, args: Mapping[str, Any],
                        inventory: Inventory) -> list[tuple[str, SimObject]]:
    """What a call needs besides its method's privilege on its object: each parameter's
    privilege on the entity passed, and an instant clone's on where the clone goes."""
    needed: list[tuple[str, SimObject]] = []
    for param in info.params:
        priv = getattr(param, "privId", None)
        value = args.get(param.name)
        if priv and value is not None and getattr(value, "_moId", None):
            target = inventory.get(value._moId)
            if target is not None:
                needed.append((priv, target))
    if method == "InstantClone_Task":
        needed.extend(_clone_targets(obj, args.get("spec"), inventory))
    if method == "ReconfigVM_Task":
        needed.extend((priv, obj) for priv in reconfigure_privileges(args.get("spec")))
    return needed


def reconfigure_privileges(spec: Any) -> list[str]:
    """What a ``ReconfigVM_Task`` needs, by what its ConfigSpec changes (the reconfigure
    privilege vSphere documents per ConfigSpec property): ``extraConfig``
    ``VirtualMachine.Config.AdvancedConfig``, a device edit
    ``VirtualMachine.Config.EditDevice``, anything else ``VirtualMachine.Config.Settings``."""
    needed = []
    if getattr(spec, "extraConfig", None):
        needed.append("VirtualMachine.Config.AdvancedConfig")
    if getattr(spec, "deviceChange", None):
        needed.append("VirtualMachine.Config.EditDevice")
    return needed or ["VirtualMachine.Config.Settings"]


def _clone_targets(source: SimObject, spec: Any, inventory: Inventory
                   ) -> Iterable[tuple[str, SimObject]]:
    location = getattr(spec, "location", None)

    def pick(attr: str, default: Any) -> Any:
        ref = getattr(location, attr, None) if location is not None else None
        found = inventory.get(ref._moId) if ref is not None else None
        return found if found is not None else default

    for priv, attr, default in (
            ("VirtualMachine.Inventory.CreateFromExisting", "folder",
             getattr(source, "parent", None)),
            ("Resource.AssignVMToPool", "pool", getattr(source, "pool", None)),
            ("Datastore.AllocateSpace", "datastore", getattr(source, "datastore", None))):
        target = pick(attr, default)
        if isinstance(target, SimObject):
            yield priv, target


class AuthorizationManager(SimObject):
    """``ServiceContent.authorizationManager``: the privilege queries a client asks
    before it acts (roles and permissions themselves are the topology's)."""

    vim_type = vim.AuthorizationManager

    def __init__(self, inventory: Inventory, moid: str, *, permissions: Permissions,
                 sessions: Mapping[str, Any]) -> None:
        super().__init__(inventory, moid)
        self.permissions = permissions
        self.sessions = sessions  # session key -> fleet.sim.calls.UserSession

    def _entities(self, refs: Any) -> list[SimObject]:
        return [self.inventory.resolve(ref) for ref in refs or ()]

    def HasPrivilegeOnEntities(self, ctx: CallContext, entity: Any, sessionId: str,
                               privId: list[str] | None = None) -> Any:
        session = self.sessions.get(sessionId)
        if session is None or not session.authenticated:
            raise vim.fault.NotFound(msg=f"No session {sessionId[:8]}….")
        out = []
        for target in self._entities(entity):
            out.append(vim.AuthorizationManager.EntityPrivilege(
                entity=target.ref, privAvailability=[
                    vim.AuthorizationManager.PrivilegeAvailability(
                        privId=priv, isGranted=self.permissions.holds(session.user, priv,
                                                                      target))
                    for priv in privId or ()]))
        return vim.AuthorizationManager.EntityPrivilege.Array(out)

    def FetchUserPrivilegeOnEntities(self, ctx: CallContext, entities: Any,
                                     userName: str) -> Any:
        if userName not in self.permissions.users:
            raise vim.fault.NotFound(msg=f"No user {userName!r}.")
        return vim.AuthorizationManager.UserPrivilegeResult.Array([
            vim.AuthorizationManager.UserPrivilegeResult(
                entity=target.ref,
                privileges=[p for p in KNOWN_PRIVILEGES
                            if self.permissions.holds(userName, p, target)])
            for target in self._entities(entities)])
