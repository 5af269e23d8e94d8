"""Capacity lost mid-burst: a host, a source, all of them; a source's chain behind fleet's back.

- A host disconnected and a source powered off mid-burst: work moves to what is
  left; members stranded on the lost host are reported, not remade or lost, and
  the next run (host back) finishes them without a duplicate.
- Every source powered off mid-burst: fleet stops (no hang), says why for every
  source, and its count of ready members is exactly what exists.
- Another tool deepens a source's chain to vSphere's limit while fleet believes
  it far below budget: the chain fault makes fleet re-read and retire the source
  and re-place its jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from fleet.engine.operations import provision, status
from fleet.engine.run import EngineOptions
from tests.chaos.audit import audit, inventory, power_off, vm_ids
from tests.chaos.conftest import ENV, FROZEN, client, make_spec
from tests.simproc import USER, SimProcess

pytestmark = pytest.mark.anyio


async def test_host_lost_and_source_powered_off_mid_burst_work_moves_elsewhere() -> None:
    count = 240
    with SimProcess(time_scale=0.1) as sim:
        baseline = await anyio.to_thread.run_sync(vm_ids, sim)
        spec = make_spec(sim, "moving", count, limits={"in_flight": 32},
                         timeouts={"network_s": 5.0, "reconnect_s": 5.0, "call_s": 5.0},
                         readiness={"timeout_s": 5.0})
        made = 0
        trigger = anyio.Event()
        lost = False
        after: Counter[str] = Counter()

        def on_event(event: Any) -> None:
            nonlocal made
            if event.kind == "phase_done" and event.phase == "clone":
                made += 1
                if made == count // 3:
                    trigger.set()
            if event.kind == "job_started" and lost:
                after[event.source] += 1
                after[event.host] += 1

        async with client(sim) as vs:
            async with anyio.create_task_group() as tg:
                async def lose_capacity() -> None:
                    nonlocal lost
                    await trigger.wait()
                    await anyio.to_thread.run_sync(sim.set_host, "esx-03", "disconnected")
                    await anyio.to_thread.run_sync(power_off, sim, "frozen-05")
                    lost = True

                tg.start_soon(lose_capacity)
                summary = await provision(spec, vs, on_event=on_event,
                                          options=EngineOptions(refresh_interval_s=0.5))
            # What exists, as fleet itself reports it now.
            st = await status(spec, vs)

        records = await anyio.to_thread.run_sync(inventory, sim)
        host_of = {r.name: r for r in records}
        result = await anyio.to_thread.run_sync(lambda: audit(
            sim, fleet="moving", count=count, folder_path=spec.folder_path, baseline=baseline,
            name_of=spec.vm_name))
        assert lost and host_of
        # Work moved: after the loss, at most the clones already on their way went to the
        # lost host or source (they fail and are re-placed).
        assert after["esx-03"] <= 8 and after["frozen-05"] <= 8, after
        # The count is right: every member fleet says is ready exists and is ready, the
        # rest are either stranded on the lost host (made before it went) or not made.
        assert summary.ready == result.ready == st.ready
        assert summary.ready + summary.failed == count
        assert not result.duplicates and not result.orphans and not result.outside
        not_ready = [r for r in result.members.values() if r.labels.get("guestinfo.fleet.state")
                     != "ready"]
        assert len(not_ready) + len(st.missing) == summary.failed
        assert set(st.missing) | {int(r.labels["guestinfo.fleet.index"]) for r in not_ready} \
            == set(summary.failed_indexes)
        assert summary.ready >= count - 2 * 8 - 8  # only the stranded ones are short

        # The host comes back: the same spec finishes the stranded members (no new clone
        # for them) and makes the missing ones.
        await anyio.to_thread.run_sync(sim.set_host, "esx-03", "connected")
        async with client(sim) as vs:
            again = await provision(spec, vs)
        assert again.ready == count, again.failures
        assert again.created == len(st.missing)
        final = await anyio.to_thread.run_sync(lambda: audit(
            sim, fleet="moving", count=count, folder_path=spec.folder_path, baseline=baseline,
            name_of=spec.vm_name))
        final.assert_clean()


TWO_SOURCES = """
folders = ["sources"]
[[hosts]]
name = "esx-{index:02d}"
count = 2
[[sources]]
name = "frozen-{index:02d}"
count = 2
host = "esx-{index:02d}"
folder = "sources"
state = "frozen"
"""


def test_every_source_powered_off_mid_burst_stops_with_a_clear_error(tmp_path: Path) -> None:
    count = 200
    with SimProcess(time_scale=0.1, topology_text=TWO_SOURCES) as sim:
        baseline = vm_ids(sim)
        spec = tmp_path / "fleet.toml"
        spec.write_text(f"""
name = "gone"
count = {count}
sources = ["frozen-01", "frozen-02"]
[vcenter]
url = "{sim.url}"
user = "{USER}"
password_env = "SIM_PASSWORD"
thumbprint = "{sim.thumbprint}"
[limits]
in_flight = 8
[network]
guest_user = "root"
guest_password_env = "GUEST_PASSWORD"
""")
        env = dict(os.environ, **ENV)
        cmd = [sys.executable, "-m", "fleet", "provision", "--spec", str(spec), "--no-progress"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 60
        while sim.stats()["clones_total"] < 40:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        power_off(sim, "frozen-01")
        power_off(sim, "frozen-02")
        out, err = proc.communicate(timeout=120)
        result = audit(sim, fleet="gone", count=count, folder_path="fleet/gone",
                       baseline=baseline)
        status_run = subprocess.run([sys.executable, "-m", "fleet", "status", "--spec",
                                     str(spec), "--json"], env=env, capture_output=True,
                                    text=True, timeout=60)
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    # It says what exists and why it stopped, naming every source and its reason.
    ready = result.ready
    assert 40 <= ready < count
    assert f"fleet gone: {ready}/{count} ready, {count - ready} failed, INCOMPLETE" in out
    assert "no source can take a clone" in out
    for source in ("frozen-01", "frozen-02"):
        assert f"{source}:" in out and "poweredOff" in out
    # ... and the count is exactly what exists: nothing half-made, nothing else made.
    assert result.states == Counter({"ready": ready})
    assert not result.duplicates and not result.orphans and not result.outside
    st = json.loads(status_run.stdout)
    assert st["members"] == st["ready"] == ready
    assert len(st["missing"]) == count - ready


@pytest.mark.parametrize(("deepened_source", "sources", "count", "limits"), [
    # A frozen source among eight, all busy.
    ("frozen-03", [*FROZEN, "golden-running"], 300, {"in_flight": 32}),
    # A running source (its depth fleet counts itself, re-reading it only when idle),
    # used in turn with a frozen one: one clone per host at a time.
    ("golden-running", ["golden-running", "frozen-02"], 60, {"per_host": 1}),
], ids=["frozen", "running"])
async def test_chain_limit_behind_fleets_back_retires_the_source_and_re_places(
        deepened_source: str, sources: list[str], count: int, limits: dict[str, Any]) -> None:
    """A source fleet believes far below its budget (200) is pushed to 255 mid-burst by
    "another tool": its next clone fails with vSphere's generic chain fault."""
    with SimProcess(time_scale=0.1) as sim:
        baseline = await anyio.to_thread.run_sync(vm_ids, sim)
        spec = make_spec(sim, "deep", count, limits=limits, sources=sources,
                         network={"refresh": "none", "reconnect": False},
                         readiness={"wait_for": "none"})
        made = 0
        trigger = anyio.Event()
        deepened = False
        retired: dict[str, str] = {}
        replaced: Counter[str] = Counter()
        after: Counter[str] = Counter()

        def on_event(event: Any) -> None:
            nonlocal made
            if event.kind == "phase_done" and event.phase == "clone":
                made += 1
                if made == count // 4:
                    trigger.set()
            if event.kind == "source_retired":
                retired[event.source] = event.reason
            if event.kind == "job_replaced":
                replaced[event.reason] += 1
            if event.kind == "job_started" and deepened:
                after[event.source] += 1

        async with client(sim) as vs, anyio.create_task_group() as tg:
            async def deepen() -> None:
                nonlocal deepened
                await trigger.wait()
                await anyio.to_thread.run_sync(
                    lambda: sim.set_vm(deepened_source, chain_depth=255))
                deepened = True

            tg.start_soon(deepen)
            # A long refresh interval: fleet must learn it from the fault, not a refresh.
            summary = await provision(spec, vs, on_event=on_event,
                                      options=EngineOptions(refresh_interval_s=3600))
        stats = sim.stats()
        result = await anyio.to_thread.run_sync(lambda: audit(
            sim, fleet="deep", count=count, folder_path=spec.folder_path, baseline=baseline,
            name_of=spec.vm_name))
    assert deepened
    assert summary.ready == count, summary.failures
    # Re-read and retired: by the chain fault, or by the re-read after it (a running
    # source's chain is read back after every failed clone) finding it past the budget.
    assert retired.get(deepened_source) in ("chain_too_deep", "chain_budget"), retired
    assert summary.sources[deepened_source].retired is not None
    assert summary.sources[deepened_source].chain_depth >= 255
    assert sum(replaced.values()) >= 1, replaced
    # Only clones already on their way when the chain was raised went to it.
    assert after[deepened_source] <= 8
    assert stats["sources"][deepened_source]["chain_depth"] == 255  # none got past it
    result.assert_clean()
