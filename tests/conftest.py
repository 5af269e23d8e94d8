from __future__ import annotations

import os

import pytest

from fleet.engine.connection import CONNECTION_VARS

# The suite points fleet at the simulators it starts. A vCenter named in the environment
# it runs in (FLEET_VCENTER_*, GOVC_*: docs/connecting.md) would point every command
# elsewhere, or make the ones that expect the built-in simulator refuse.
for _name in CONNECTION_VARS:
    os.environ.pop(_name, None)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
