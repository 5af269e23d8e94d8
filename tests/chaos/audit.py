"""Audit a simulator after a run: every VM it holds, judged against one fleet.

The audit reads the whole inventory with unmodified pyVmomi (not fleet's client,
so a bug there cannot hide itself) and sorts every VM into:

- *members*: in the fleet's folder, labelled for the fleet with a canonical index
  below ``count`` (the one VM per index fleet must end with);
- *duplicates*: a second VM claiming an index that already has a member;
- *outside*: VMs labelled for the fleet anywhere but its folder;
- *orphans*: every VM that was not there before the run (``baseline``) and is
  not a member: a timed-out, cancelled or doubled attempt that nobody owns.

``figures()`` is what the chaos tests report: requested, members, ready,
duplicates, orphans, conflicts.
"""

from __future__ import annotations

import ssl
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from tests.simproc import PASSWORD, USER, SimProcess

LABEL_NAME = "guestinfo.fleet.name"
LABEL_INDEX = "guestinfo.fleet.index"
LABEL_STATE = "guestinfo.fleet.state"


@dataclass(frozen=True)
class VmRecord:
    moid: str
    name: str
    folder: str  # the parent folder's moid
    labels: dict[str, str]
    power_state: str


def _connect(sim: SimProcess) -> Any:
    if sim.http:
        return SmartConnect(protocol="http", host=sim.host, port=sim.port, user=USER,
                            pwd=PASSWORD)
    ctx = ssl.create_default_context(cafile=str(sim.cert_path))
    return SmartConnect(host=sim.host, port=sim.port, user=USER, pwd=PASSWORD, sslContext=ctx)


def inventory(sim: SimProcess) -> list[VmRecord]:
    """Every VM in the simulator, read in one paged property collection."""
    si = _connect(sim)
    try:
        content = si.content
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine],
                                                       True)
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[pc.TraversalSpec(
                name="view", type=vim.view.ContainerView, path="view", skip=False)])],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=[
                "name", "parent", "config.extraConfig", "runtime.powerState"])])
        out: list[VmRecord] = []
        result = content.propertyCollector.RetrievePropertiesEx(
            [spec], pc.RetrieveOptions(maxObjects=1000))
        while result is not None:
            for obj in result.objects or ():
                props = {p.name: p.val for p in obj.propSet or ()}
                extra = {o.key: str(o.value) for o in props.get("config.extraConfig") or ()
                         if str(o.key).startswith("guestinfo.fleet.")}
                parent = props.get("parent")
                out.append(VmRecord(obj.obj._moId, str(props.get("name")),
                                    parent._moId if parent is not None else "",
                                    extra, str(props.get("runtime.powerState"))))
            if not result.token:
                break
            result = content.propertyCollector.ContinueRetrievePropertiesEx(result.token)
        view.DestroyView()
        return out
    finally:
        Disconnect(si)


def folder_id(sim: SimProcess, path: str) -> str | None:
    si = _connect(sim)
    try:
        found = si.content.searchIndex.FindByInventoryPath(f"dc1/vm/{path}")
        return found._moId if found is not None else None
    finally:
        Disconnect(si)


def vm_ids(sim: SimProcess) -> set[str]:
    return {r.moid for r in inventory(sim)}


def _index(raw: str | None) -> int | None:
    if raw is None or not raw.isascii() or not raw.isdigit() or str(int(raw)) != raw:
        return None
    return int(raw)


@dataclass
class Audit:
    requested: int
    members: dict[int, VmRecord] = field(default_factory=dict)
    duplicates: list[VmRecord] = field(default_factory=list)
    outside: list[VmRecord] = field(default_factory=list)
    orphans: list[VmRecord] = field(default_factory=list)
    states: Counter[str] = field(default_factory=Counter)
    wrong_names: list[VmRecord] = field(default_factory=list)
    conflicts: int = 0

    @property
    def ready(self) -> int:
        return self.states.get("ready", 0)

    def figures(self) -> dict[str, Any]:
        return {"requested": self.requested, "members": len(self.members),
                "ready": self.ready, "states": dict(self.states),
                "duplicates": len(self.duplicates), "outside": len(self.outside),
                "orphans": len(self.orphans), "conflicts": self.conflicts}

    def assert_clean(self) -> None:
        """Exactly ``requested`` members, one per index, all ready; nothing else made."""
        problems = []
        if sorted(self.members) != list(range(self.requested)):
            missing = sorted(set(range(self.requested)) - set(self.members))
            problems.append(f"{len(self.members)} members, missing {missing[:20]}")
        if self.duplicates:
            problems.append(f"duplicates: {[(r.name, r.labels) for r in self.duplicates[:10]]}")
        if self.outside:
            problems.append(f"labelled outside the folder: {[r.name for r in self.outside]}")
        if self.orphans:
            problems.append(f"orphans: {[(r.name, r.labels) for r in self.orphans[:10]]}")
        if self.states.get("ready", 0) != self.requested or len(self.states) > 1:
            problems.append(f"member states: {dict(self.states)}")
        if self.wrong_names:
            problems.append(f"members under the wrong name: {[r.name for r in self.wrong_names]}")
        if self.conflicts:
            problems.append(f"{self.conflicts} network conflicts")
        assert not problems, "; ".join(problems)


def audit(sim: SimProcess, *, fleet: str, count: int, folder_path: str, baseline: set[str],
          name_of: Any = None) -> Audit:
    """Judge every VM in ``sim`` against fleet ``fleet`` (see the module docstring)."""
    folder = folder_id(sim, folder_path)
    result = Audit(requested=count, conflicts=int(sim.stats()["network_conflicts"]))
    for record in sorted(inventory(sim), key=lambda r: r.moid):
        ours = record.labels.get(LABEL_NAME) == fleet
        index = _index(record.labels.get(LABEL_INDEX)) if ours else None
        if ours and record.folder != folder:
            result.outside.append(record)
        elif ours and index is not None and index < count:
            if index in result.members:
                result.duplicates.append(record)
            else:
                result.members[index] = record
                result.states[record.labels.get(LABEL_STATE, "?")] += 1
                if name_of is not None and record.name != name_of(index):
                    result.wrong_names.append(record)
                continue
        if record.moid not in baseline:
            result.orphans.append(record)
    return result


def power_off(sim: SimProcess, name: str) -> None:
    """Power a VM off behind fleet's back (as an operator or another tool would)."""
    from pyVim.task import WaitForTask

    si = _connect(sim)
    try:
        vm = si.content.searchIndex.FindByInventoryPath(f"dc1/vm/sources/{name}")
        assert vm is not None, name
        WaitForTask(vm.PowerOffVM_Task())
    finally:
        Disconnect(si)
