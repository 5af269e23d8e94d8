"""A clone carries exactly its own fleet's labels, whatever its source carries.

An instant clone is born with its source's extraConfig (the simulator copies it
as vCenter does), so a clone of another fleet's member would inherit that fleet's
labels, its expiry among them, and a clone of a ready VM its readiness flag.
"""

from __future__ import annotations

import pytest

from fleet.engine import provision
from fleet.engine.lifetime import (
    LABEL_EXPIRES_AT,
    LABEL_LEASE,
    LABEL_OWNER,
    LABEL_POOL,
    current_expiry,
)
from fleet.engine.reconcile import LABEL_NAME, LABEL_READY_AT, LABEL_SOURCE
from fleet.engine.run import EngineOptions, Provisioner
from fleet.engine.sources import FLEET_LABELS, clone_config
from fleet.vsphere.model import Ref, VmInfo
from tests.engine.conftest import CLONE_ONLY, FROZEN4, make_spec, vcenter
from tests.engine.conftest import options as opts

pytestmark = pytest.mark.anyio

PREFIX = "guestinfo.fleet."


def fleet_keys(extra: dict[str, str]) -> set[str]:
    return {k for k in extra if k.startswith(PREFIX)}


async def test_a_clone_of_a_ttl_fleets_member_inherits_no_label_of_that_fleet() -> None:
    ttl = make_spec(name="ttla", count=1, sources=FROZEN4[:1], **CLONE_ONLY)
    plain = make_spec(name="plainb", count=3, sources=["fleet/ttla/ttla-0000"], **CLONE_ONLY)
    async with vcenter(hosts=2) as (vs, vc):
        made = await provision(ttl, vs, options=opts(labels={LABEL_EXPIRES_AT: "1900000000"}))
        assert made.complete
        source = vc.vm("ttla-0000")
        assert source.extra_config[LABEL_EXPIRES_AT] == "1900000000"
        # A label of some other fleet version, and a user key that is not fleet's.
        source.extra_config[PREFIX + "owner"] = "team-a"
        # As if it were a leased pool member: its lease must not pass to a clone.
        source.extra_config[LABEL_POOL] = "ci"
        source.extra_config[LABEL_LEASE] = "leased 0123456789abcdef team-a 1 2 3"
        source.extra_config["guestinfo.app.role"] = "web"
        source.config_changed()
        summary = await provision(plain, vs, options=opts())
        assert summary.complete
        members = vc.folder_vms(plain.folder_path)
        assert len(members) == 3
        for vm in members:
            assert LABEL_EXPIRES_AT not in vm.extra_config
            assert LABEL_OWNER not in vm.extra_config  # the source's "team-a": not inherited
            assert LABEL_LEASE not in vm.extra_config and LABEL_POOL not in vm.extra_config
            # Every label fleet writes, but those only some fleets have (expiry, owner,
            # a pool's).
            assert fleet_keys(vm.extra_config) == \
                set(FLEET_LABELS) - {LABEL_EXPIRES_AT, LABEL_OWNER, LABEL_POOL, LABEL_LEASE}
            assert vm.extra_config[LABEL_NAME] == "plainb"
            assert vm.extra_config[LABEL_SOURCE] == "fleet/ttla/ttla-0000"
            assert vm.extra_config["guestinfo.app.role"] == "web"  # not fleet's: kept
        # So the fleet has no lifetime: nothing would ever destroy it for one.
        assert await current_expiry(plain, vs) is None
        # The source keeps its own labels (the clear is in the clone's spec only).
        assert source.extra_config[LABEL_EXPIRES_AT] == "1900000000"


async def test_a_fleet_with_its_own_ttl_keeps_it_over_its_sources() -> None:
    first = make_spec(name="one", count=1, sources=FROZEN4[:1], **CLONE_ONLY)
    second = make_spec(name="two", count=2, sources=["fleet/one/one-0000"], **CLONE_ONLY)
    async with vcenter(hosts=1) as (vs, vc):
        await provision(first, vs, options=opts(labels={LABEL_EXPIRES_AT: "1900000000"}))
        await provision(second, vs, options=opts(labels={LABEL_EXPIRES_AT: "1800000000"}))
        assert {vm.extra_config[LABEL_EXPIRES_AT] for vm in vc.folder_vms("fleet/two")} == \
            {"1800000000"}


async def test_a_clone_of_a_ready_vm_is_ready_only_when_its_own_guest_says_so() -> None:
    # The source's guest set the readiness flag long ago; the clones' guests never do
    # (their guest has no agent that writes it): they must time out, not count as
    # ready at birth.
    key = "guestinfo.app.ready"
    spec = make_spec(sources=FROZEN4[:1], count=2,
                     readiness={"wait_for": "guestinfo", "guestinfo_key": key,
                                "timeout_s": 0.2})
    async with vcenter(hosts=1) as (vs, vc):
        vc.vm("frozen-01").extra_config[key] = "1"
        vc.vm("frozen-01").config_changed()
        summary = await provision(spec, vs, options=opts())
    assert summary.ready == 0
    assert summary.failures == {"ready_timeout": 2}
    assert all(key not in vm.extra_config for vm in vc.folder_vms(spec.folder_path))

    # With a guest that does say so, they are ready, with the flag their guest wrote.
    async with vcenter(hosts=1, ready_key=key) as (vs, vc):
        vc.vm("frozen-01").extra_config[key] = "1"
        vc.vm("frozen-01").config_changed()
        summary = await provision(spec, vs, options=opts())
    assert summary.ready == 2
    assert all(vm.extra_config[key] == "1" for vm in vc.folder_vms(spec.folder_path))


def _source(extra: dict[str, str]) -> VmInfo:
    return VmInfo(ref=Ref("VirtualMachine", "vm-1"), name="src", power_state="poweredOn",
                  frozen=True, host=None, host_name=None, folder=None, datastores=(),
                  chain_depth=2, memory_mb=1024, guest_family="linux", extra_config=extra)


def test_clone_config_clears_what_a_stale_view_of_the_source_does_not_show() -> None:
    own = {"guestinfo.fleet.name": "b", "guestinfo.hostname": "b-0"}
    # The view was read before the source was labelled with an expiry: cleared anyway.
    config = clone_config(own, _source({}))
    assert config[LABEL_EXPIRES_AT] == ""
    # Every label fleet writes, the ready time (member records, docs/inventory.md) too.
    assert {k for k, v in config.items() if v == ""} == \
        (set(FLEET_LABELS) | {LABEL_READY_AT}) - set(own)
    assert list(config)[:2] == list(own)  # own first: one body shape per source
    # Keys only the view shows, and the readiness flag, are cleared too; own ones win.
    config = clone_config({**own, "guestinfo.ready": "yes"},
                          _source({"guestinfo.fleet.zone": "z", "guestinfo.fleet": "x",
                                   "guestinfo.other": "kept"}),
                          readiness_key="guestinfo.ready")
    assert config["guestinfo.fleet.zone"] == config["guestinfo.fleet"] == ""
    assert config["guestinfo.ready"] == "yes" and config["guestinfo.fleet.name"] == "b"
    assert "guestinfo.other" not in config
    assert clone_config({}, _source({}), readiness_key="guestinfo.r")["guestinfo.r"] == ""


async def test_options_labels_still_reach_every_clone() -> None:
    spec = make_spec(sources=FROZEN4[:1], count=2, **CLONE_ONLY)
    async with vcenter(hosts=1) as (vs, vc):
        await provision(spec, vs,
                        options=EngineOptions(labels={LABEL_EXPIRES_AT: "1700000000"}))
    assert {vm.extra_config[LABEL_EXPIRES_AT] for vm in vc.folder_vms(spec.folder_path)} == \
        {"1700000000"}


async def test_a_run_that_keeps_the_expiry_labels_new_clones_with_the_members_one() -> None:
    small = make_spec(name="keep", count=2, sources=FROZEN4[:2], **CLONE_ONLY)
    more = make_spec(name="keep", count=4, sources=FROZEN4[:2], **CLONE_ONLY)
    async with vcenter(hosts=2) as (vs, vc):
        assert (await provision(small, vs, options=opts(
            labels={LABEL_EXPIRES_AT: "1900000000"}))).complete
        # Scaled up without a TTL: the run reads the expiry in its own listing.
        grown = Provisioner(more, vs, options=opts(keep_expiry=True))
        assert (await grown.run()).complete
        assert grown.expires_at == 1900000000
        assert sorted(vm.extra_config[LABEL_EXPIRES_AT]
                      for vm in vc.folder_vms(more.folder_path)) == ["1900000000"] * 4
        # A member without the label: the fleet has no expiry, and new clones none.
        vc.vm("keep-0000").set_extra_config(LABEL_EXPIRES_AT, None)
        most = Provisioner(make_spec(name="keep", count=5, sources=FROZEN4[:2], **CLONE_ONLY),
                           vs, options=opts(keep_expiry=True))
        assert (await most.run()).complete
        assert most.expires_at is None
        assert LABEL_EXPIRES_AT not in vc.vm("keep-0004").extra_config
