"""Shared servers for the API tests: one simulator and one ``fleet serve`` for the package.

Tests that need a service of their own (restart, Prometheus, TTL timing) start
one; the rest share these. Fleets are named after their test so nothing clashes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest

from tests.api.serveproc import ServeProcess, service_config
from tests.simproc import SimProcess


@pytest.fixture(scope="package")
def sim() -> Iterator[SimProcess]:
    with SimProcess(time_scale=0.02) as proc:
        yield proc


@pytest.fixture(scope="package")
def service(sim: SimProcess) -> Iterator[ServeProcess]:
    with tempfile.TemporaryDirectory(prefix="fleet-serve-state-") as state:
        proc = ServeProcess(service_config(sim, state))
        try:
            yield proc
        finally:
            proc.stop()
