"""Membership and reconciliation: what the fleet has in vCenter versus what the spec wants.

Membership lives in vCenter, not in a local file. A member is a VM in the
fleet's folder whose ``guestinfo.fleet.name`` is the fleet's name and whose
``guestinfo.fleet.index`` is an integer; it also carries the run that made it
(``run_id``), its source, and ``guestinfo.fleet.state``, the last pipeline
phase it finished (``cloned`` -> ``network`` -> ``ready``), so a re-run can finish
half-configured members instead of making new ones. A VM without the fleet's
label is never a member and is never touched.

:func:`reconcile` is pure: VMs in, a :class:`Reconciliation` out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from fleet.engine.spec import FleetSpec
from fleet.vsphere.model import ListedVm

LABEL_NAME = "guestinfo.fleet.name"
LABEL_INDEX = "guestinfo.fleet.index"
LABEL_RUN_ID = "guestinfo.fleet.run_id"
LABEL_SOURCE = "guestinfo.fleet.source"
LABEL_STATE = "guestinfo.fleet.state"
#: when fleet labelled the member ready (epoch seconds, fleet's clock), written in the
#: same reconfiguration as the ``ready`` state; only member records read it
#: (``fleet.engine.members``), so listings do not pay for it
LABEL_READY_AT = "guestinfo.fleet.ready_at"

#: what reconciliation decides on (``status`` reads no more: docs/reads.md)
RECONCILE_LABELS = (LABEL_NAME, LABEL_INDEX, LABEL_STATE)

MemberState = Literal["cloned", "network", "ready"]
STATES: tuple[MemberState, ...] = ("cloned", "network", "ready")


def labels(*, fleet: str, index: int, run_id: str, source: str,
           state: MemberState) -> dict[str, str]:
    """The extraConfig entries that make a VM a member."""
    return {LABEL_NAME: fleet, LABEL_INDEX: str(index), LABEL_RUN_ID: run_id,
            LABEL_SOURCE: source, LABEL_STATE: state}


@dataclass(frozen=True)
class Member:
    vm: ListedVm
    index: int
    state: MemberState

    @property
    def name(self) -> str:
        return self.vm.name

    # Read from the labels when asked: a listing of RECONCILE_LABELS (status) did not
    # read them, and asking then raises NotRead rather than answer "none".
    @property
    def run_id(self) -> str:
        return self.vm.labels.get(LABEL_RUN_ID, "")

    @property
    def source(self) -> str:
        return self.vm.labels.get(LABEL_SOURCE, "")


#: An index exactly as fleet writes it (``str(index)``): ASCII digits, no sign, no
#: leading zero, no spaces. ``str.isdigit``/``int`` also take "03", other scripts'
#: digits or superscripts (which int() refuses): a VM labelled so is not a member, so it
#: is never removed as a duplicate of a real one and never crashes reconciliation.
_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")


def member_index(extra_config: Mapping[str, str], fleet: str) -> int | None:
    """The member index a VM's labels give for ``fleet``, or None if it is not ours."""
    if extra_config.get(LABEL_NAME) != fleet:
        return None
    raw = extra_config.get(LABEL_INDEX, "")
    if not _INDEX.fullmatch(raw):
        return None
    return int(raw)


def as_member(vm: ListedVm, fleet: str) -> Member | None:
    index = member_index(vm.labels, fleet)
    if index is None:
        return None
    raw_state = vm.labels.get(LABEL_STATE, "cloned")
    # An unknown state (a newer fleet wrote it?) is redone from the start of the pipeline.
    st: MemberState = next((s for s in STATES if s == raw_state), "cloned")
    return Member(vm, index, st)


@dataclass(frozen=True)
class Reconciliation:
    """The difference between the folder and the spec."""

    create: tuple[int, ...]  # missing indexes, ascending
    resume: tuple[Member, ...]  # wanted members that have not finished the pipeline
    ready: tuple[Member, ...]  # wanted members that are done
    remove: tuple[Member, ...]  # scale-down (highest index first) and duplicates
    foreign: tuple[ListedVm, ...]  # VMs in the folder without the fleet's label
    blocked: dict[int, str]  # index -> why it cannot be made (its name is held by a foreign VM)

    @property
    def members(self) -> int:
        return len(self.resume) + len(self.ready)


def _rank(member: Member, expected_name: str) -> tuple[bool, int]:
    return member.name == expected_name, STATES.index(member.state)


def reconcile(spec: FleetSpec, vms: Iterable[ListedVm]) -> Reconciliation:
    """Sort the folder's VMs into keep/resume/remove and list the indexes to create."""
    by_index: dict[int, list[Member]] = {}
    foreign: list[ListedVm] = []
    for vm in vms:
        member = as_member(vm, spec.name)
        if member is None:
            foreign.append(vm)
        else:
            by_index.setdefault(member.index, []).append(member)
    remove: list[Member] = []
    resume: list[Member] = []
    ready: list[Member] = []
    for index in sorted(by_index, reverse=True):
        group = by_index[index]
        if index >= spec.count:
            remove.extend(group)
            continue
        expected = spec.vm_name(index)
        # Two VMs claiming one index: keep the best (right name, furthest along).
        group.sort(key=lambda m: _rank(m, expected), reverse=True)
        keep, extras = group[0], group[1:]
        remove.extend(extras)
        (ready if keep.state == "ready" else resume).append(keep)
    foreign_names = {vm.name: vm for vm in foreign}
    create: list[int] = []
    blocked: dict[int, str] = {}
    for index in range(spec.count):
        if index in by_index:
            continue
        name = spec.vm_name(index)
        holder = foreign_names.get(name)
        if holder is not None:
            blocked[index] = f"the name {name} is taken by {holder.ref.id}, which is not " \
                f"a member of fleet {spec.name}"
        else:
            create.append(index)
    remove.sort(key=lambda m: m.index, reverse=True)
    return Reconciliation(tuple(create), tuple(sorted(resume, key=lambda m: m.index)),
                          tuple(sorted(ready, key=lambda m: m.index)), tuple(remove),
                          tuple(foreign), blocked)
