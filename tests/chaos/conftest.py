"""Shared pieces of the chaos suite: sizes, specs, figures.

CI runs every scenario small and fast (time scale 0.05, a few hundred clones).
``FLEET_FULL_CHAOS=1`` runs the full-size versions (1,000 clones, time scale 1);
see tests/chaos/README.md. Each scenario prints one ``chaos-figures`` JSON line
(and, at full size, writes it under benchmarks/results/).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from fleet.engine.spec import FleetSpec
from fleet.vsphere.client import VSphereClient
from tests import specs
from tests.simproc import PASSWORD, USER, SimProcess
from tests.specs import ENV, FROZEN

__all__ = ["ENV", "FROZEN", "FULL", "client", "make_spec"]

FULL = os.environ.get("FLEET_FULL_CHAOS") == "1"
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_spec(sim: SimProcess, name: str, count: int, **extra: Any) -> FleetSpec:
    """A spec against ``sim`` with the full network workflow and quick retries."""
    extra["retries"] = {"attempts": 6, "backoff_max_s": 0.5, **extra.get("retries", {})}
    return specs.make_spec(sim, name, count, **extra)


def client(sim: SimProcess, **kw: Any) -> VSphereClient:
    kw.setdefault("guest_poll_s", (0.02, 0.5))
    return VSphereClient(sim.url, USER, PASSWORD, thumbprint=sim.thumbprint, **kw)


def report(scenario: str, figures: dict[str, Any]) -> None:
    """Print the scenario's figures; at full size also keep them in benchmarks/results."""
    line = {"scenario": scenario, "full_size": FULL, **figures}
    print(f"\nchaos-figures {json.dumps(line, sort_keys=True)}")
    if FULL:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"chaos_{scenario}.json").write_text(json.dumps(line, indent=2,
                                                                   sort_keys=True) + "\n")
