"""Fleet lifetimes: durations as people write them, and the conservative fleet expiry."""

from __future__ import annotations

import pytest

from fleet.engine.lifetime import (
    LABEL_EXPIRES_AT,
    expires_at_of,
    expiry_labels,
    fleet_expiry,
    parse_duration,
)
from fleet.engine.reconcile import Member
from fleet.errors import ConfigError
from fleet.vsphere.model import Ref, VmInfo


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
    vm = VmInfo(Ref("VirtualMachine", "vm-1"), "m", "poweredOn", False, None, None, None, (),
                1, 1024, "linux", extra_config=extra)
    return Member(vm, 0, "ready", "r", "s")


def test_fleet_expiry_is_the_latest_and_none_if_any_member_has_none() -> None:
    assert fleet_expiry([]) is None
    assert fleet_expiry([member("100"), member("200")]) == 200
    assert fleet_expiry([member("100"), member(None)]) is None
    assert fleet_expiry([member("100"), member("garbage")]) is None
    assert expires_at_of({LABEL_EXPIRES_AT: "-5"}) is None
    assert expiry_labels(None) == {}
    assert expiry_labels(99.2) == {LABEL_EXPIRES_AT: "100"}
