"""fleet: provision fleets of vSphere Instant Clones fast, within vCenter's limits.

The layers (``engine`` decides, ``vsphere`` talks, ``sim`` is vCenter) and how a clone
flows through them: docs/architecture.md.

The Python API for load-test scripts and test suites (docs/python-api.md)::

    import anyio, fleet

    async def main() -> None:
        async with fleet.provisioned(fleet.load_spec("fleet.toml")) as members:
            addresses = [m.ip for m in members]
            ...  # the load test; the fleet is destroyed on the way out

    anyio.run(main)

Its names are loaded on first use (from ``fleet.public``), so ``import fleet`` costs
nothing for the CLI and the pytest plugin.
"""

from __future__ import annotations

from fleet.version import __version__

# typing.TYPE_CHECKING without importing typing (a few ms of every `import fleet`);
# mypy reads the name as typing's.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from fleet.engine.members import MemberRecord
    from fleet.engine.operations import FleetStatus
    from fleet.engine.spec import FleetSpec, SpecError
    from fleet.engine.summary import RemovalSummary, Summary
    from fleet.errors import ConfigError, FleetError
    from fleet.public import (
        Fleet,
        ProvisionIncomplete,
        demo_spec,
        load_spec,
        open,
        provisioned,
    )

#: public name -> the module that defines it
_LAZY = {
    "Fleet": "fleet.public", "ProvisionIncomplete": "fleet.public",
    "demo_spec": "fleet.public", "load_spec": "fleet.public", "open": "fleet.public",
    "provisioned": "fleet.public",
    "MemberRecord": "fleet.engine.members", "FleetStatus": "fleet.engine.operations",
    "FleetSpec": "fleet.engine.spec", "SpecError": "fleet.engine.spec",
    "Summary": "fleet.engine.summary", "RemovalSummary": "fleet.engine.summary",
    "ConfigError": "fleet.errors", "FleetError": "fleet.errors",
}

__all__ = [
    "ConfigError", "Fleet", "FleetError", "FleetSpec", "FleetStatus", "MemberRecord",
    "ProvisionIncomplete", "RemovalSummary", "SpecError", "Summary", "__version__",
    "demo_spec", "load_spec", "open", "provisioned",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fleet' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
