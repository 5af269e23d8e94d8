"""Reconciliation is pure: VMs in, what to create/resume/remove out."""

from __future__ import annotations

import pytest

from fleet.engine.lifetime import FLEET_LABELS
from fleet.engine.reconcile import (
    RECONCILE_LABELS,
    as_member,
    labels,
    member_index,
    reconcile,
)
from fleet.vsphere.model import Labels, ListedVm, NotRead, Ref
from tests.engine.conftest import make_spec


def vm(name: str, extra: dict[str, str] | None = None, n: int = 0) -> ListedVm:
    return ListedVm(Ref("VirtualMachine", f"vm-{name}-{n}"), name, "poweredOn", None, None,
                    Labels(extra or {}, FLEET_LABELS))


def member(index: int, state: str = "ready", fleet: str = "lt", name: str | None = None,
           n: int = 0) -> ListedVm:
    return vm(name or f"lt-{index:04d}",
              labels(fleet=fleet, index=index, run_id="r0", source="frozen-01",
                     state=state),  # type: ignore[arg-type]
              n)


def test_labels_round_trip() -> None:
    info = member(7, "network")
    m = as_member(info, "lt")
    assert m is not None and (m.index, m.state, m.run_id, m.source) == (7, "network", "r0",
                                                                        "frozen-01")
    assert as_member(info, "other") is None
    assert member_index({"guestinfo.fleet.name": "lt", "guestinfo.fleet.index": "x"}, "lt") is None
    odd = vm("lt-0001", {"guestinfo.fleet.name": "lt", "guestinfo.fleet.index": "1",
                         "guestinfo.fleet.state": "weird"})
    m = as_member(odd, "lt")
    assert m is not None and m.state == "cloned"  # unknown state: redo the pipeline


def test_empty_folder_creates_everything() -> None:
    rec = reconcile(make_spec(count=5), [])
    assert rec.create == (0, 1, 2, 3, 4)
    assert not rec.resume and not rec.remove and not rec.ready and not rec.blocked


def test_converged_fleet_needs_nothing() -> None:
    spec = make_spec(count=3)
    rec = reconcile(spec, [member(i) for i in range(3)])
    assert rec.create == () and rec.remove == () and len(rec.ready) == 3 and rec.members == 3


def test_mixed_folder() -> None:
    spec = make_spec(count=5)
    vms = [member(0), member(1, "cloned"), member(2, "network"), member(6), member(5),
           vm("stranger"), vm("lt-0003"), member(0, fleet="other", name="other-0000"),
           member(4, "cloned", name="lt-0004", n=1), member(4, "ready", name="lt-0004-old", n=2)]
    rec = reconcile(spec, vms)
    assert rec.create == ()  # index 3's name is held by a foreign VM
    assert rec.blocked == {3: "the name lt-0003 is taken by vm-lt-0003-0, which is not a "
                              "member of fleet lt"}
    assert [m.index for m in rec.resume] == [1, 2, 4]
    assert [m.index for m in rec.ready] == [0]
    # scale-down removes the highest first; of two VMs claiming index 4, the one with
    # the right name is kept even though the other is further along
    assert [(m.index, m.name) for m in rec.remove] == [(6, "lt-0006"), (5, "lt-0005"),
                                                       (4, "lt-0004-old")]
    assert {v.name for v in rec.foreign} == {"stranger", "lt-0003", "other-0000"}


def test_scale_down_to_zero_removes_every_member_only() -> None:
    spec = make_spec(count=0)
    rec = reconcile(spec, [member(i) for i in range(4)] + [vm("keep-me")])
    assert [m.index for m in rec.remove] == [3, 2, 1, 0]
    assert [v.name for v in rec.foreign] == ["keep-me"]


def test_a_listing_of_the_reconcile_labels_reconciles_and_knows_what_it_did_not_read() -> None:
    def narrow(index: int, state: str) -> ListedVm:
        full = member(index, state)
        return ListedVm(full.ref, full.name, full.power_state, None, None,
                        Labels(dict(full.labels), RECONCILE_LABELS))

    rec = reconcile(make_spec(count=3), [narrow(0, "ready"), narrow(1, "network"),
                                         narrow(5, "ready")])
    assert rec.create == (2,) and [m.index for m in rec.ready] == [0]
    assert [m.index for m in rec.resume] == [1] and [m.index for m in rec.remove] == [5]
    with pytest.raises(NotRead):  # not read: never answered as "no source"
        _ = rec.ready[0].source
