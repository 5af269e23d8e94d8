"""SIGKILL ``fleet provision`` at random points of a burst, then run it again.

The real command in a real process, killed with no chance to clean up: clones
it handed vCenter keep running and land after it is gone, members are left in
every phase of the pipeline. Running the same command again must converge:
exactly N members, each labelled ``ready`` (it finished the network workflow),
no duplicate, no orphan, and zero network conflicts in the simulator.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests import specs
from tests.chaos.audit import audit, vm_ids
from tests.chaos.conftest import ENV, FULL, report
from tests.simproc import SimProcess

COUNT = 1000 if FULL else 96
# Real time, and clones slower than fleet takes to start (2.5 s, the default topology's
# others), even in CI: a killed run's clones are still in flight when the next run reads
# the folder. In CI fewer at once, so each kill lands mid-burst.
SCALE = 1.0
IN_FLIGHT = "auto" if FULL else 32
TOPOLOGY = (Path(__file__).resolve().parents[2] / "fleet" / "data" / "sim.toml").read_text() \
    .replace("instant_clone_s = 1.0", "instant_clone_s = 2.5")
KILLS = 3


def write_spec(path: Path, sim: SimProcess, count: int) -> None:
    specs.write_spec(path, sim, "crashy", count, limits={"in_flight": IN_FLIGHT},
                     retries={"backoff_base_s": 0.05, "backoff_max_s": 1.0},
                     timeouts={"clone_s": 60})


def provision_cmd(spec: Path) -> list[str]:
    return [sys.executable, "-m", "fleet", "provision", "--spec", str(spec), "--json",
            "--no-progress"]


def test_sigkill_at_random_points_then_the_same_command_converges(tmp_path: Path) -> None:
    seed = int(os.environ.get("FLEET_CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    env = dict(os.environ, **ENV)
    spec = tmp_path / "fleet.toml"
    assert "instant_clone_s = 2.5" in TOPOLOGY
    with SimProcess(time_scale=SCALE, topology_text=TOPOLOGY) as sim:
        write_spec(spec, sim, COUNT)
        baseline = vm_ids(sim)
        started = time.monotonic()
        kills: list[int] = []
        for k in range(KILLS):
            # Kill k lands in the k-th part of the burst (by clones made), at a random
            # point within it, plus a little jitter so the pipeline phases vary too.
            low, high = COUNT * k // KILLS, COUNT * (k + 1) // KILLS
            target = rng.randint(low + (0 if k == 0 else 1), max(low + 1, high - COUNT // 10))
            proc = subprocess.Popen(provision_cmd(spec), env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 300
            while sim.stats()["clones_total"] < target:
                assert proc.poll() is None, f"finished before kill {k} at {target} clones"
                assert time.monotonic() < deadline, "the burst stalled"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3) * max(SCALE, 0.2))
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
            kills.append(sim.stats()["clones_total"])
        final = subprocess.run(provision_cmd(spec), env=env, capture_output=True, text=True,
                               timeout=600)
        elapsed = time.monotonic() - started
        assert final.returncode == 0, final.stderr[-3000:]
        assert "Traceback" not in final.stderr
        summary = json.loads(final.stdout)
        stats = sim.stats()
        result = audit(sim, fleet="crashy", count=COUNT, folder_path="fleet/crashy",
                       baseline=baseline, name_of=lambda i: f"crashy-{i:04d}")
        report("crash_resume", {**result.figures(), "clones_requested": COUNT,
                                "time_s": round(elapsed, 1), "time_scale": SCALE,
                                "seed": seed, "killed_at_clones": kills,
                                "clones_made": stats["clones_total"],
                                "final_run": {k: summary[k] for k in (
                                    "ready", "created", "adopted", "removed", "failed")}})
        assert summary["ready"] == COUNT and summary["failed"] == 0
        result.assert_clean()
