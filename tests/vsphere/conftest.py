"""Fixtures for the vSphere client tests: simulators run as real https servers.

The default ``sim`` is shared by every test in the package (unique VM names per
test keep them apart); tests that inject faults, expire sessions or need a
special topology start their own, module-scoped.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from fleet.vsphere.client import VSphereClient
from tests.simproc import PASSWORD, USER, SimProcess

TIME_SCALE = 0.02
_names = itertools.count(1)


def unique(prefix: str) -> str:
    """A VM or folder name no other test uses."""
    return f"{prefix}-{next(_names):04d}"


def client_for(sim: SimProcess, *, user: str = USER, password: str = PASSWORD,
               **kw: Any) -> VSphereClient:
    kw.setdefault("ca_file", sim.cert_path)
    kw.setdefault("guest_poll_s", (0.02, 0.2))
    return VSphereClient(sim.url, user, password, **kw)


@pytest.fixture(scope="session")
def sim() -> Iterator[SimProcess]:
    with SimProcess(time_scale=TIME_SCALE) as process:
        yield process


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect after every test, so a leaked socket or transport fails the test that
    leaked it (``-W error`` turns its ResourceWarning into an error there)."""
    yield
    gc.collect()
