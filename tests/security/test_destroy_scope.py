"""Scale-down and ``destroy`` touch only VMs carrying the fleet's label in its folder.

tests/integration/test_provision.py covers a stranger and another fleet's member
in the folder. Here the adversarial cases: VMs labelled for the fleet outside its
folder (a sibling folder, a subfolder, the sources' folder), a VM in the folder
labelled for another fleet under a member's index, and VMs in the folder labelled
for the fleet whose index is malformed: not the decimal fleet writes ("03",
Arabic-Indic and fullwidth 3, "3.0", "+3", " 3", "²", 5,000 digits...). None of them may be removed;
none may make fleet stumble.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from fleet.engine.operations import destroy, provision, status
from fleet.engine.reconcile import LABEL_INDEX, LABEL_NAME, LABEL_STATE, member_index
from tests.chaos.audit import inventory
from tests.chaos.conftest import client, make_spec
from tests.simproc import PASSWORD, USER, SimProcess

pytestmark = pytest.mark.anyio

MALFORMED = ["03", "\u0663", "\uff13", "3.0", "+3", " 3", "3 ", "²", "1e3", "0x3", "-3", "", "3_0",
             "9" * 5000, "07", "00"]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(time_scale=0.05, topology_text="""
folders = ["sources", "fleet/guarded-old", "elsewhere"]
[[hosts]]
name = "esx-01"
[[sources]]
name = "frozen-01"
host = "esx-01"
folder = "sources"
state = "frozen"
""") as proc:
        yield proc


def _clone(si: Any, folder_path: str, name: str, labels: dict[str, str]) -> str:
    content = si.content
    source = content.searchIndex.FindByInventoryPath("dc1/vm/sources/frozen-01")
    folder = content.searchIndex.FindByInventoryPath(f"dc1/vm/{folder_path}")
    if folder is None:
        parent_path, _, leaf = folder_path.rpartition("/")
        parent = content.searchIndex.FindByInventoryPath(f"dc1/vm/{parent_path}")
        folder = parent.CreateFolder(leaf)
    task = source.InstantClone_Task(vim.vm.InstantCloneSpec(
        name=name, location=vim.vm.RelocateSpec(folder=folder),
        config=[vim.option.OptionValue(key=k, value=v) for k, v in labels.items()]))
    WaitForTask(task)
    return str(task.info.result._moId)


def _plant(sim: SimProcess, fleet: str) -> dict[str, str]:
    """The adversarial VMs; returns name -> moid."""
    ctx = ssl.create_default_context(cafile=str(sim.cert_path))
    si = SmartConnect(host=sim.host, port=sim.port, user=USER, pwd=PASSWORD, sslContext=ctx)
    ours = {LABEL_NAME: fleet, LABEL_STATE: "ready"}
    planted: dict[str, str] = {}
    try:
        folder = f"fleet/{fleet}"
        for i, raw in enumerate(MALFORMED):
            planted[f"malformed-{i}"] = _clone(si, folder, f"malformed-{i}",
                                               {**ours, LABEL_INDEX: raw})
        planted["no-index"] = _clone(si, folder, "no-index", ours)
        planted["other-fleet-3"] = _clone(si, folder, "other-fleet-3",
                                          {LABEL_NAME: "other", LABEL_INDEX: "3",
                                           LABEL_STATE: "ready"})
        planted["case-3"] = _clone(si, folder, "case-3",
                                   {LABEL_NAME: fleet.upper(), LABEL_INDEX: "3"})
        # Labelled for the fleet, with real indexes (some above count), outside its folder.
        for where in ("fleet/guarded-old", f"fleet/{fleet}/sub", "elsewhere", "sources"):
            for index in ("3", "9"):
                name = f"outside-{where.replace('/', '-')}-{index}"
                planted[name] = _clone(si, where, name, {**ours, LABEL_INDEX: index})
    finally:
        Disconnect(si)
    return planted


def test_member_index_accepts_only_what_fleet_writes() -> None:
    for raw in MALFORMED:
        assert member_index({LABEL_NAME: "f", LABEL_INDEX: raw}, "f") is None, raw
    for index in (0, 7, 10, 99999):
        assert member_index({LABEL_NAME: "f", LABEL_INDEX: str(index)}, "f") == index
    assert member_index({LABEL_NAME: "F", LABEL_INDEX: "3"}, "f") is None


async def test_scale_down_and_destroy_spare_everything_not_labelled_in_the_folder(
        sim: SimProcess) -> None:
    spec = make_spec(sim, "guarded", 8, sources=["frozen-01"],
                     network={"refresh": "none", "reconnect": False},
                     readiness={"wait_for": "none"})
    async with client(sim) as vs:
        first = await provision(spec, vs)
    assert first.ready == 8
    planted = await anyio.to_thread.run_sync(_plant, sim, "guarded")
    members_before = {r.name: r.moid for r in await anyio.to_thread.run_sync(inventory, sim)
                      if r.name.startswith("guarded-")}
    assert len(members_before) == 8

    async with client(sim) as vs:
        # Re-running sees the planted VMs and changes nothing.
        again = await provision(spec, vs)
        assert again.ready == 8 and again.created == 0 and again.removed == 0
        st = await status(spec, vs)
        assert st.members == 8 and st.foreign == len(MALFORMED) + 3
        # Scale down: exactly the members 5, 6, 7 go.
        down = await provision(make_spec(sim, "guarded", 5, sources=["frozen-01"],
                                         network={"refresh": "none", "reconnect": False},
                                         readiness={"wait_for": "none"}), vs)
        assert down.removed == 3 and down.ready == 5
        left = {r.moid for r in await anyio.to_thread.run_sync(inventory, sim)}
        assert {members_before[f"guarded-{i:04d}"] for i in (5, 6, 7)}.isdisjoint(left)
        assert set(planted.values()) <= left
        # Destroy: exactly the five remaining members go.
        removed = await destroy(spec, vs)
        assert removed.removed == 5 and removed.failed == 0
        assert removed.untouched == len(MALFORMED) + 3
    left = {r.moid for r in await anyio.to_thread.run_sync(inventory, sim)}
    assert set(members_before.values()).isdisjoint(left)
    assert set(planted.values()) <= left, set(planted) - {
        n for n, m in planted.items() if m in left}


def test_a_malformed_expiry_label_never_expires_a_fleet() -> None:
    """``fleet serve`` destroys a fleet whose members' expiry has passed: a label fleet
    did not write must read as "no expiry", never as 1970 (and never crash)."""
    from fleet.engine.lifetime import LABEL_EXPIRES_AT, expires_at_of

    for raw in ("\u0663", "\uff13", "\u00b2", "-1", "1e3", " 5", "5.0", "9" * 5000, ""):
        assert expires_at_of({LABEL_EXPIRES_AT: raw}) is None, raw
    assert expires_at_of({LABEL_EXPIRES_AT: "1900000000"}) == 1_900_000_000.0
