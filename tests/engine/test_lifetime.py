"""Fleet lifetimes: durations as people write them, and the conservative fleet expiry."""

from __future__ import annotations

import pytest

from fleet.engine import provision
from fleet.engine.lifetime import (
    FLEET_LABELS,
    LABEL_EXPIRES_AT,
    expires_at_of,
    expiry_labels,
    fleet_expiry,
    parse_duration,
    stamp_expiry,
)
from fleet.engine.reconcile import Member
from fleet.errors import ConfigError, FleetError
from fleet.vsphere.model import Labels, ListedVm, Ref
from tests.engine.conftest import CLONE_ONLY, FROZEN4, make_spec, vcenter
from tests.engine.conftest import options as opts


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400), ("1w", 604800),
    ("1h30m", 5400), ("1.5h", 5400), (" 10M ", 600), ("0.5s", 0.5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "10x", "1h 30m", "-5m", "0", "0s", "367d",
                                  "1e3", "nan", "inf", "10m5"])
def test_bad_durations_name_the_option(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(text)
    assert info.value.key == "--ttl"


def member(expires: str | None) -> Member:
    extra = {} if expires is None else {LABEL_EXPIRES_AT: expires}
    vm = ListedVm(Ref("VirtualMachine", "vm-1"), "m", "poweredOn", None, None,
                  Labels(extra, FLEET_LABELS))
    return Member(vm, 0, "ready")


def test_fleet_expiry_is_the_latest_and_none_if_any_member_has_none() -> None:
    assert fleet_expiry([]) is None
    assert fleet_expiry([member("100"), member("200")]) == 200
    assert fleet_expiry([member("100"), member(None)]) is None
    assert fleet_expiry([member("100"), member("garbage")]) is None
    assert expires_at_of({LABEL_EXPIRES_AT: "-5"}) is None
    assert expiry_labels(None) == {}
    assert expiry_labels(99.2) == {LABEL_EXPIRES_AT: "100"}


@pytest.mark.anyio
@pytest.mark.parametrize("landed", [True, False])
async def test_an_expiry_write_that_landed_without_a_reply_is_not_a_failure(
        landed: bool) -> None:
    """Issue 11, item 10: a label write whose reply was lost is looked up before it is
    called failed. The TTL stamp (``fleet provision --ttl``, a service PATCH of
    ``ttl_s``) is such a write: absolute, so a landed one is done."""
    spec = make_spec(sources=FROZEN4[:2], count=4, **CLONE_ONLY)
    async with vcenter(hosts=2) as (vs, vc):
        assert (await provision(spec, vs, options=opts())).ready == 4
        # Every reply is lost: after the write was made, or before vCenter had it.
        vc.add_fault(method="ReconfigVM_Task",
                     fault="http:lost_reply" if landed else "http:reset")
        if landed:
            assert await stamp_expiry(spec, vs, 2_000_000_000) == 4
        else:
            with pytest.raises(FleetError, match="could not label 4 of 4 members"):
                await stamp_expiry(spec, vs, 2_000_000_000)
    stamped = {vm.extra_config.get(LABEL_EXPIRES_AT) for vm in vc.folder_vms(spec.folder_path)}
    assert stamped == ({"2000000000"} if landed else {None})
