"""A source is one VM whatever its spelling: one VM named twice (a name and an inventory
path) is refused with exit 2, by ``plan``, ``provision`` and ``sources list``, against a
real ``fleet sim``, before anything is cloned. Counted twice, its chain would grow past
its budget and it would be cloned twice at once."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyVim.connect import Disconnect, SmartConnect

from tests.simproc import PASSWORD, USER, SimProcess
from tests.specs import run_fleet, write_spec

TWICE = ["golden-running", "dc1/vm/sources/golden-running"]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(time_scale=0.05) as proc:
        yield proc


@pytest.fixture(scope="module")
def golden_id(sim: SimProcess) -> str:
    ctx = ssl.create_default_context(cafile=str(sim.cert_path))
    si = SmartConnect(host=sim.host, port=sim.port, user=USER, pwd=PASSWORD, sslContext=ctx)
    try:
        return str(si.content.searchIndex.FindByInventoryPath(
            "dc1/vm/sources/golden-running")._moId)
    finally:
        Disconnect(si)


@pytest.mark.parametrize("command", [("plan",), ("provision", "--no-progress"),
                                     ("sources", "list")])
def test_one_vm_named_twice_is_refused_naming_both_entries(
        sim: SimProcess, golden_id: str, tmp_path: Path, command: tuple[str, ...]) -> None:
    spec = write_spec(tmp_path / "dup.toml", sim, "dup", 6, sources=TWICE, chain_budget=4)
    before = sim.stats()
    result = run_fleet(*command, "--spec", str(spec))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f'dup.toml: sources[1]: "dc1/vm/sources/golden-running" is the same VM ({golden_id}) ' \
        f'as sources[0] "golden-running"' in result.stderr
    assert "Traceback" not in result.stderr
    after = sim.stats()
    assert after["clones_total"] == before["clones_total"]  # nothing was cloned
    assert after["sources"].get("golden-running", {}).get("chain_depth") == \
        before["sources"].get("golden-running", {}).get("chain_depth")


def test_each_spelling_alone_plans_within_the_budget(sim: SimProcess, tmp_path: Path) -> None:
    # One spelling of the running source, budget 4 from depth 1: 3 clones fit, 3 do not.
    spec = write_spec(tmp_path / "one.toml", sim, "dupone", 6, sources=TWICE[1:],
                      chain_budget=4)
    result = run_fleet("plan", "--spec", str(spec), "--json")
    assert result.returncode == 1, result.stderr  # not feasible as it stands
    plan = json.loads(result.stdout)
    (row,) = plan["rows"]
    assert row["planned"] == 3 and row["final_depth"] == 4 and plan["unplaced"] == 3
