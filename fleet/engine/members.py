"""Members as records: who each member is, where it runs, and its own addresses.

A :class:`MemberRecord` is what ``fleet status --members``, ``fleet inventory``,
``fleet provision --inventory`` and the service's ``GET /v1/fleets/{name}`` show of
a member (docs/inventory.md). :func:`member_records` lists the fleet's folder as
reconciliation does (the labels it decides on), then reads the members it found
with :meth:`~fleet.vsphere.model.VSphere.read_addresses`: only members, only the
paths a record needs, in pages.

An instant clone's guest keeps its source's network (MAC, IP) until its NIC is
refreshed (docs/vsphere.md), and VMware Tools reports it as the clone's:
``guest.ipAddress`` right after a clone is the *source's* address. A record never
shows such an address. :func:`own_addresses` keeps an address only when

- the member's label says the network phase is done (``network`` or ``ready``), and
- the guest reports it on a NIC whose MAC is one of the VM's own virtual NICs' (a
  guest still on its source's network reports the source's MAC there),

so a member made with ``readiness = none`` and no refresh, whose guest never left
its source's network, shows no address, and says why (``address_status``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from fleet.engine.lifetime import FLEET_LABELS, expires_at_of
from fleet.engine.reconcile import (
    LABEL_READY_AT,
    RECONCILE_LABELS,
    Member,
    MemberState,
    as_member,
)
from fleet.engine.spec import FleetSpec
from fleet.vsphere.model import ListedVm, Ref, VmAddresses, VSphere

#: what a record reads of each member: every label fleet writes, and the ready time
RECORD_LABELS = (*FLEET_LABELS, LABEL_READY_AT)
#: the states whose guest network fleet has refreshed (or had nothing to refresh)
NETWORK_DONE: tuple[MemberState, ...] = ("network", "ready")
#: refs per read when deadlines are reckoned: the client's page
_PAGE = 1000

AddressStatus = Literal["ok", "pending", "inherited", "none"]


@dataclass(frozen=True)
class MemberRecord:
    """One member: identity, place, addresses, times (docs/inventory.md).

    ``ip_addresses`` are the guest's own addresses, the primary (``guest.ipAddress``)
    first, IPv4 and IPv6, no duplicates; ``ip`` is the first of them or None.
    ``address_status`` says why there is none: ``pending`` (the network phase is not
    done), ``inherited`` (the guest still uses its source's network), ``none`` (the
    guest reports no address of its own yet: DHCP, Tools, power)."""

    name: str
    index: int
    fleet: str
    state: MemberState
    vm: str  # the VM's managed object id (vm-42)
    power_state: str
    ip: str | None
    ip_addresses: tuple[str, ...]
    macs: tuple[str, ...]  # the virtual NICs' MACs, by NIC key
    address_status: AddressStatus
    host: str | None
    datastore: str | None  # the first of ``datastores``
    datastores: tuple[str, ...]
    source: str | None
    instance_uuid: str | None
    run_id: str | None
    created_at: float | None  # vCenter's creation time of the VM (``config.createDate``)
    ready_at: float | None  # when fleet labelled it ready (fleet's clock)
    expires_at: float | None  # the fleet's expiry label

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "fleet": self.fleet,
                "state": self.state, "vm": self.vm, "power_state": self.power_state,
                "ip": self.ip, "ip_addresses": list(self.ip_addresses),
                "macs": list(self.macs), "address_status": self.address_status,
                "host": self.host, "datastore": self.datastore,
                "datastores": list(self.datastores), "source": self.source,
                "instance_uuid": self.instance_uuid, "run_id": self.run_id,
                "created_at": _time(self.created_at), "ready_at": _time(self.ready_at),
                "expires_at": None if self.expires_at is None else math.ceil(self.expires_at)}


def _time(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def own_addresses(facts: VmAddresses, state: MemberState
                  ) -> tuple[tuple[str, ...], AddressStatus]:
    """The guest's addresses that are the VM's own, primary first, and the status
    (see the module docstring). Pure."""
    if state not in NETWORK_DONE:
        return (), "pending"
    own_macs = {mac.lower() for mac in facts.nic_macs.values()}
    found: list[str] = []
    inherited = False
    for nic in facts.guest_nics:
        if nic.mac is None:
            continue  # not tied to a MAC: nothing says whose address it is
        if nic.mac.lower() not in own_macs:
            inherited = inherited or bool(nic.ip_addresses)
            continue
        found.extend(nic.ip_addresses)
    unique = list(dict.fromkeys(found))
    if facts.guest_ip is not None and facts.guest_ip in unique:
        unique.remove(facts.guest_ip)
        unique.insert(0, facts.guest_ip)
    if unique:
        return tuple(unique), "ok"
    return (), "inherited" if inherited else "none"


def record_of(member: Member, facts: VmAddresses, fleet: str) -> MemberRecord:
    """A member's record from its listing and its read (``member.vm`` is ``facts.vm``)."""
    labels = facts.vm.labels
    addresses, status = own_addresses(facts, member.state)
    macs = tuple(facts.nic_macs[k] for k in sorted(facts.nic_macs))
    ready_raw = labels.get(LABEL_READY_AT, "")
    return MemberRecord(
        name=member.name, index=member.index, fleet=fleet, state=member.state,
        vm=facts.vm.ref.id, power_state=facts.vm.power_state,
        ip=addresses[0] if addresses else None, ip_addresses=addresses, macs=macs,
        address_status=status, host=facts.vm.host_name,
        datastore=facts.datastores[0] if facts.datastores else None,
        datastores=facts.datastores, source=member.source or None,
        instance_uuid=facts.instance_uuid, run_id=member.run_id or None,
        created_at=facts.created_at,
        ready_at=float(ready_raw) if ready_raw.isascii() and ready_raw.isdigit()
        and len(ready_raw) <= 12 else None,
        expires_at=expires_at_of(labels))


async def read_records(vs: VSphere, fleet: str, vms: Sequence[Ref], *, call_s: float
                       ) -> list[MemberRecord]:
    """Records of the VMs ``vms`` that are members of ``fleet``, sorted by index then
    name. Membership is judged on the labels read now: a VM relabelled or gone since
    the caller's listing is left out. ``call_s``: the deadline of one page's read."""
    if not vms:
        return []
    pages = max(1, math.ceil(len(vms) / _PAGE))
    with anyio.fail_after(call_s * (pages + 1)):
        read = await vs.read_addresses(vms, RECORD_LABELS)
    records = []
    for facts in read:
        member = as_member(facts.vm, fleet)
        if member is not None:
            records.append(record_of(member, facts, fleet))
    records.sort(key=lambda r: (r.index, r.name))
    return records


def member_refs(vms: Iterable[ListedVm], fleet: str) -> list[Ref]:
    """The VMs of a listing that are members of ``fleet``."""
    return [vm.ref for vm in vms if as_member(vm, fleet) is not None]


async def member_records(spec: FleetSpec, vs: VSphere) -> list[MemberRecord]:
    """Every member of the fleet as a record (none if its folder does not exist)."""
    with anyio.fail_after(spec.timeouts.call_s):
        folder = await vs.find_folder(spec.folder_path)
        vms = (await vs.list_folder_vms(folder, RECONCILE_LABELS)
               if folder is not None else [])
    return await read_records(vs, spec.name, member_refs(vms, spec.name),
                              call_s=spec.timeouts.call_s)


#: the fields a record adds to what the service's member view shows (``GET
#: /v1/fleets/{name}``), and their values when a member has no VM (yet) to read
RECORD_ONLY: dict[str, Any] = {
    "fleet": None, "power_state": None, "ip": None, "ip_addresses": [], "macs": [],
    "address_status": None, "datastore": None, "datastores": [], "instance_uuid": None,
    "run_id": None, "created_at": None, "ready_at": None, "expires_at": None}
