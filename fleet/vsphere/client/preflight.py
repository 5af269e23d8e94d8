"""The client's preflight reads: where a clone goes, which privileges the login lacks,
whether a guest login works (docs/preflight.md).

Each is a question asked before anything changes, and each reads only what it needs:
``clone_resources`` the pool, datastores and networks of the sources (one read) and
their names (one more); ``missing_privileges`` one ``HasPrivilegeOnEntities`` for every
entity and privilege at once, for this very session (the login's effective privileges:
its own permissions and its groups', as vCenter computes them);
``check_guest_login`` one ``ValidateCredentialsInGuest``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from pyVmomi import vim

from fleet.errors import NotAuthenticated, NotFound
from fleet.vsphere import inventory as inv
from fleet.vsphere.client.reads import Reads
from fleet.vsphere.model import CloneResources, GuestCredentials, Named, Ref

PC = inv.PC


class Preflight(Reads):
    """Preflight reads; see the module docstring."""

    async def _names(self, refs: Collection[Ref]) -> dict[Ref, str]:
        """The names of ``refs`` (of any entity types) in one read."""
        by_type: dict[str, list[Ref]] = {}
        for ref in refs:
            by_type.setdefault(ref.type, []).append(ref)
        if not by_type:
            return {}
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=self.mo(r), skip=False) for r in refs],
            propSet=[PC.PropertySpec(type=self.mo(group[0]).__class__, all=False,
                                     pathSet=["name"]) for group in by_type.values()])
        return {inv.ref_of(c.obj): str(inv.props(c).get("name", c.obj._moId))
                for c in await self.retrieve([spec], plain=True)}

    async def clone_resources(self, vms: Sequence[Ref]) -> list[CloneResources]:
        """Where an instant clone of each VM would go and what it would use."""
        contents = await self._retrieve_objects([self.mo(r) for r in vms],
                                                ["resourcePool", "datastore", "network"])
        found: dict[Ref, tuple[Ref | None, list[Ref], list[Ref]]] = {}
        for c in contents:
            p = inv.props(c)
            pool = p.get("resourcePool")
            found[inv.ref_of(c.obj)] = (
                inv.ref_of(pool) if pool is not None else None,
                [inv.ref_of(d) for d in p.get("datastore") or ()],
                [inv.ref_of(n) for n in p.get("network") or ()])
        missing = [str(r) for r in vms if r not in found]
        if missing:
            raise NotFound(f"{', '.join(missing)} do not exist", method="clone_resources")
        names = await self._names({r for pool, dss, nets in found.values()
                                   for r in [*([pool] if pool else []), *dss, *nets]})

        def named(ref: Ref) -> Named:
            return Named(ref, names.get(ref, ref.id))

        out = []
        for vm in vms:
            pool, dss, nets = found[vm]
            out.append(CloneResources(vm, named(pool) if pool else None,
                                      tuple(named(d) for d in dss),
                                      tuple(named(n) for n in nets)))
        return out

    async def missing_privileges(self, wanted: Mapping[Ref, Collection[str]]
                                 ) -> dict[Ref, list[str]]:
        """Of the privileges ``wanted`` on each entity, those this login lacks there."""
        privileges = sorted({p for privs in wanted.values() for p in privs})
        entities = list(wanted)
        if not privileges or not entities:
            return {}
        manager = self.content.authorizationManager
        for attempt in range(2):
            # The session's own key: read again after a re-login, which makes a new one.
            contents = await self._retrieve_objects([self.content.sessionManager],
                                                    ["currentSession"])
            current = inv.props(contents[0]).get("currentSession") if contents else None
            if current is None:
                raise NotAuthenticated("no current session to check privileges for",
                                       method="HasPrivilegeOnEntities")
            try:
                answers = await self.session.call(
                    manager, "HasPrivilegeOnEntities", [self.mo(e) for e in entities],
                    current.key, privileges, safe=True, session_bound=True)
                break
            except NotAuthenticated:
                if attempt:
                    raise
        lacking: dict[Ref, list[str]] = {}
        for answer in answers or ():
            ref = inv.ref_of(answer.entity)
            want = wanted.get(ref, ())
            lack = sorted(a.privId for a in answer.privAvailability or ()
                          if not a.isGranted and a.privId in want)
            if lack:
                lacking[ref] = lack
        return lacking

    async def check_guest_login(self, vm: Ref, credentials: GuestCredentials) -> None:
        """``ValidateCredentialsInGuest`` (raises as the docstring in the model says)."""
        manager = await self._guest_auth_manager()
        auth = vim.vm.guest.NamePasswordAuthentication(
            username=credentials.username, password=credentials.password,
            interactiveSession=False)
        await self.session.call(manager, "ValidateCredentialsInGuest", self.mo(vm), auth,
                                safe=True)

    async def _guest_auth_manager(self) -> Any:
        contents = await self._retrieve_objects([self.content.guestOperationsManager],
                                                ["authManager"])
        manager = inv.props(contents[0]).get("authManager") if contents else None
        if manager is None:
            raise NotFound("this endpoint has no guest authentication manager",
                           method="ValidateCredentialsInGuest")
        return manager
