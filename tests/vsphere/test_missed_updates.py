"""Updates that never come: the watcher reads an overdue task directly, in batches.

The simulator's ``/_sim/updates`` switches make its update stream fail the way an
independent vCenter simulator (or a lossy path) does: ``withhold_initial`` never
reports the initial state of a filter made while a ``WaitForUpdatesEx`` is pending,
``drop_fraction`` loses changes. fleet must finish every clone anyway, reading the
quiet tasks with few, batched ``RetrievePropertiesEx`` calls, and make no such call
at all while updates arrive. Assertions are on counts, never on time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from fleet.engine.operations import provision
from fleet.vsphere.client import VSphereClient
from fleet.vsphere.model import CloneRequest, Ref
from tests.simproc import SimProcess
from tests.specs import make_spec
from tests.vsphere.conftest import client_for, unique

pytestmark = pytest.mark.anyio

QUIET_S = 1.0  # the grace before a quiet watch is read (5 s by default)
# Making a filter takes longer than a clone: every task ends before it is watched.
SLOW_FILTERS = {"method": "CreateFilter", "fault": "slow", "delay_s": 25.0, "phase": "call"}
# A clone takes longer than making its filter: every task is seen running first.
SLOW_CLONES = {"method": "InstantClone_Task", "fault": "slow", "delay_s": 25.0}


@pytest.fixture(scope="module")
def lossy() -> Iterator[SimProcess]:
    with SimProcess(time_scale=0.02) as process:
        yield process


@pytest.fixture
def updates(lossy: SimProcess) -> Iterator[SimProcess]:
    yield lossy
    lossy.set_updates(withhold_initial=False, drop_fraction=0.0)
    lossy.clear_faults()


def _client(sim: SimProcess) -> VSphereClient:
    vs = client_for(sim)
    vs.watcher.quiet_s = QUIET_S
    return vs


async def _clone_all(vs: VSphereClient, count: int, prefix: str) -> list[Ref]:
    sources = [vm.ref for vm in await vs.find_vms([f"frozen-{i:02d}" for i in range(1, 9)])]
    folder = await vs.ensure_folder(f"missed/{unique(prefix)}")
    tasks = [await vs.start_instant_clone(CloneRequest(source=sources[i % len(sources)],
                                                        name=unique(prefix), folder=folder))
             for i in range(count)]
    made: list[Ref] = []

    async def wait(task: Any) -> None:
        made.append(await task.wait(timeout_s=60))

    async with anyio.create_task_group() as tg:
        for task in tasks:
            tg.start_soon(wait, task)
    return made


async def test_withheld_initial_updates_are_read_in_batches(updates: SimProcess) -> None:
    """The scenario of the field: tasks that ended before their filter was made, whose
    filter's initial state is never reported, are found finished by direct reads."""
    updates.set_updates(withhold_initial=True)
    updates.add_faults(SLOW_FILTERS)
    count = 40
    async with _client(updates) as vs:
        made = await _clone_all(vs, count, "withheld")
        stats = vs.stats
    assert len(made) == len(set(made)) == count
    withheld = updates.stats()["updates"]["withheld"]
    assert withheld > 0
    # Every task whose initial state was withheld was found by a read, no other ...
    assert 0 < stats["missed_updates"] <= withheld
    # ... with one read for all the watches one filter made (all due together),
    # not one per task.
    assert stats["direct_reads"] <= stats["filters_created"] < count
    assert stats["direct_read_objects"] >= stats["missed_updates"]


async def test_every_change_lost_still_ends_every_task(updates: SimProcess) -> None:
    """Only initial states arrive: every task's end is found by a read, many tasks a call."""
    updates.set_updates(drop_fraction=1.0)
    updates.add_faults(SLOW_CLONES)
    count = 30
    async with _client(updates) as vs:
        made = await _clone_all(vs, count, "dropped")
        stats = vs.stats
    assert len(made) == count
    assert updates.stats()["updates"]["dropped"] > 0
    assert stats["missed_updates"] >= count
    assert 0 < stats["direct_reads"] < count


async def test_no_direct_read_while_updates_arrive(updates: SimProcess) -> None:
    """The fallback costs no call when vCenter reports everything (default grace, so a
    loaded machine's slow reply is not taken for a missed one)."""
    async with client_for(updates) as vs:
        made = await _clone_all(vs, 40, "healthy")
        stats = vs.stats
    assert len(made) == 40
    assert stats["direct_reads"] == stats["direct_read_objects"] == 0
    assert stats["missed_updates"] == 0


async def test_a_provision_completes_with_withheld_initial_updates(updates: SimProcess) -> None:
    """The whole engine, whose VM waits and tasks both start with a withheld state."""
    updates.set_updates(withhold_initial=True)
    updates.add_faults({**SLOW_FILTERS, "max_count": 2})  # the first clones end unseen
    # Without the fallback the first clones end unseen: each would wait out clone_s and
    # then be adopted.
    spec = make_spec(updates, unique("withheld-fleet"), 12, timeouts={"clone_s": 60})
    async with _client(updates) as vs:
        summary = await provision(spec, vs)
        assert summary.ready == 12 and summary.failed == 0
        assert summary.created == 12 and summary.adopted == 0
        stats = vs.stats
    assert stats["missed_updates"] > 0 and stats["direct_reads"] > 0


async def test_update_switches_validate_their_input(lossy: SimProcess) -> None:
    import urllib.error

    for body in ({"drop_fraction": 2}, {"withhold": True}):
        with pytest.raises(urllib.error.HTTPError) as info:
            lossy.set_updates(**body)
        assert info.value.code == 400
        info.value.close()
    assert lossy.set_updates(drop_fraction=0.25)["drop_fraction"] == 0.25
    assert lossy.set_updates(drop_fraction=0.0)["drop_fraction"] == 0.0
