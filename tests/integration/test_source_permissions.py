"""A source the login may not clone from is retired, not a cause of failed clones.

``fleet plan`` names a missing privilege before a run (docs/preflight.md); a run that
meets one anyway (no plan was made, or a permission changed meanwhile) must not fail
every clone it placed there while another source can give them. vCenter's
``NoPermission`` names the entity: when that is the source itself, the source is
retired and its clones placed elsewhere; on anything else the clone fails."""

from __future__ import annotations

import json
from pathlib import Path

from tests import specs

# frozen-01 is denied VirtualMachine.Provisioning.Clone; running-02 may be cloned
from tests.integration.test_preflight import TOPOLOGY
from tests.simproc import SimProcess


def test_a_source_the_login_cannot_clone_from_is_retired_and_its_work_moves(
        tmp_path: Path) -> None:
    with SimProcess(topology_text=TOPOLOGY, time_scale=0.05) as sim:
        spec = specs.write_spec(tmp_path / "fleet.toml", sim, "perm", 8,
                                sources=["frozen-01", "running-02"])
        done = specs.run_fleet("provision", "--spec", str(spec), "--json")
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["ready"] == 8 and summary["failed"] == 0, summary
        sources = summary["sources"]
        retired = {name for name, s in sources.items() if s["retired"]}
        assert retired == {"frozen-01"}, sources
        assert sources["frozen-01"]["retired"].startswith("permission_denied: ")
        assert "VirtualMachine.Provisioning.Clone" in sources["frozen-01"]["retired"]
        assert sources["running-02"]["clones"] == 8, sources
        assert "frozen-01" in done.stderr and "retired" in done.stderr
