"""Member records (fleet.engine.members): every member with its own addresses, never its
source's, read in pages from the simulator through the real client."""

from __future__ import annotations

import pytest

from fleet.engine.members import member_records, own_addresses, read_records
from fleet.engine.operations import provision, status
from fleet.engine.reconcile import RECONCILE_LABELS
from fleet.sim.names import ipv6_for
from fleet.vsphere.model import GuestNic, Labels, ListedVm, Ref, VmAddresses
from tests.engine.conftest import CLONE_ONLY, Counted, make_spec, options, vcenter

pytestmark = pytest.mark.anyio


async def test_records_give_each_member_its_own_addresses_as_the_simulator_has_them() -> None:
    async with vcenter() as (vs, vc):
        spec = make_spec(count=24)
        summary = await provision(spec, vs, options=options())
        assert summary.ready == 24
        records = await member_records(spec, vs)
        assert [r.index for r in records] == list(range(24))
        assert len({r.ip for r in records}) == 24
        for r in records:
            vm = vc.vm(r.name)
            assert r.address_status == "ok" and r.state == "ready"
            assert r.ip == vm.guest.ip is not None
            # the primary first, then the guest's IPv6 address; no duplicates
            assert r.ip_addresses == (vm.guest.ip, ipv6_for(vm.nics[0].mac))
            assert r.macs == tuple(n.mac for n in vm.nics)
            assert r.vm == vm.moid and r.instance_uuid == vm.instance_uuid
            assert r.host == vm.host.name and r.datastore == vm.datastore.name
            assert r.source is not None and r.source.startswith("frozen-")
            assert r.fleet == "lt" and r.run_id == summary.run_id
            assert r.created_at == pytest.approx(vm.created.timestamp(), abs=0.001)
            assert r.ready_at is not None and r.ready_at >= int(r.created_at) - 1
            assert r.expires_at is None


async def test_a_member_whose_guest_was_never_refreshed_shows_no_address_not_its_sources() -> None:
    """readiness none, no refresh: the member is labelled ready at once, and its guest
    still uses its source's MAC and IP, which VMware Tools reports as the clone's."""
    async with vcenter() as (vs, vc):
        spec = make_spec(count=4, **CLONE_ONLY)
        assert (await provision(spec, vs, options=options())).ready == 4
        records = await member_records(spec, vs)
        assert len(records) == 4
        for r in records:
            vm = vc.vm(r.name)
            source = vc.vm(r.source or "")
            # The simulator does report an address for the clone: its source's.
            assert vm.guest.ip is not None and vm.guest.macs[0] == source.nics[0].mac
            assert r.state == "ready"
            assert r.ip is None and r.ip_addresses == () and r.address_status == "inherited"
            assert r.macs == (vm.nics[0].mac,)  # the VM's own NIC, whatever its guest uses
        # Once the guest refreshes its NIC itself (a script after the source's freeze
        # line does), its own address shows.
        vm = vc.vm(records[0].name)
        vm.refresh_network()
        first = (await member_records(spec, vs))[0]
        assert vm.guest.ip is not None
        assert first.address_status == "ok" and first.ip == vm.guest.ip


async def test_a_member_before_its_network_phase_shows_no_address() -> None:
    """The network phase fails (the guest refuses the login): the member stays
    ``cloned``, its guest on its source's network, and shows no address."""
    async with vcenter(guest_password="not-the-spec-one") as (vs, vc):
        spec = make_spec(count=3)
        summary = await provision(spec, vs, options=options())
        assert summary.ready == 0 and summary.failed == 3
        records = await member_records(spec, vs)
        assert [r.state for r in records] == ["cloned"] * 3
        for r in records:
            assert vc.vm(r.name).guest.ip is not None  # the source's, inherited
            assert r.ip is None and r.ip_addresses == () and r.address_status == "pending"
            assert r.ready_at is None and r.host is not None


async def test_read_addresses_pages_over_the_refs_and_leaves_out_a_vm_gone_meanwhile() -> None:
    async with vcenter() as (_, vc), vc.client(page_size=7) as vs:
        spec = make_spec(count=20)
        assert (await provision(spec, vs, options=options())).ready == 20
        folder = await vs.find_folder(spec.folder_path)
        assert folder is not None
        listing = await vs.list_folder_vms(folder, RECONCILE_LABELS)
        gone = next(vm for vm in listing if vm.name == spec.vm_name(9))
        await vs.destroy(gone.ref)  # after the listing, before the read
        calls = vc.calls["RetrievePropertiesEx"]
        records = await read_records(vs, spec.name, [vm.ref for vm in listing],
                                     call_s=5.0)
        assert sorted(r.index for r in records) == [i for i in range(20) if i != 9]
        assert len({r.ip for r in records}) == 19 and None not in {r.ip for r in records}
        # 20 refs in pages of 7 (three), one read again without the destroyed VM,
        # and the NICs of each page (three)
        assert vc.calls["RetrievePropertiesEx"] - calls >= 7


async def test_status_reads_no_addresses() -> None:
    """``status`` (and so ``fleet status`` without ``--members``) stays the listing it
    was: the members' guests are read only when asked (docs/reads.md)."""
    async with vcenter() as (vs, _):
        spec = make_spec(count=3)
        await provision(spec, vs, options=options())
        counted = Counted(vs)  # type: ignore[arg-type]
        result = await status(spec, counted)  # type: ignore[arg-type]
        assert result.ready == 3
        assert counted.calls["list_folder_vms"] == 1
        assert counted.calls["read_addresses"] == 0
        await member_records(spec, counted)  # type: ignore[arg-type]
        assert counted.calls["read_addresses"] == 1


def _facts(nics: tuple[GuestNic, ...], macs: dict[int, str], ip: str | None) -> VmAddresses:
    vm = ListedVm(Ref("VirtualMachine", "vm-1"), "m", "poweredOn", None, None,
                  Labels({}, ()))
    return VmAddresses(vm=vm, datastores=(), instance_uuid=None, created_at=None,
                       guest_ip=ip, guest_nics=nics, nic_macs=macs)


def test_own_addresses_keeps_the_nics_with_the_vms_own_macs_primary_first() -> None:
    own = {4000: "00:50:56:00:00:01", 4001: "00:50:56:00:00:02"}
    nics = (GuestNic("00:50:56:00:00:01", ("fe80::1", "10.0.0.5"), 4000, True),
            GuestNic("00:50:56:99:99:99", ("10.9.9.9",), 4002, True),  # not ours
            GuestNic(None, ("192.168.1.1",), None, True),  # no MAC: whose?
            GuestNic("00:50:56:00:00:02", ("10.0.1.5", "10.0.0.5"), 4001, True))
    assert own_addresses(_facts(nics, own, "10.0.0.5"), "ready") == \
        (("10.0.0.5", "fe80::1", "10.0.1.5"), "ok")
    # The primary the guest names on a NIC that is not its own is not taken.
    assert own_addresses(_facts(nics, own, "10.9.9.9"), "network") == \
        (("fe80::1", "10.0.0.5", "10.0.1.5"), "ok")
    # MACs compare whatever their case.
    upper = {k: v.upper() for k, v in own.items()}
    assert own_addresses(_facts(nics[:1], upper, None), "ready")[0] == ("fe80::1", "10.0.0.5")
    assert own_addresses(_facts(nics, own, "10.0.0.5"), "cloned") == ((), "pending")
    assert own_addresses(_facts(nics[1:2], own, "10.9.9.9"), "ready") == ((), "inherited")
    assert own_addresses(_facts((), own, "10.9.9.9"), "ready") == ((), "none")
    assert own_addresses(_facts(nics[:1], {}, "10.0.0.5"), "ready") == ((), "inherited")
