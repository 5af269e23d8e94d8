"""Fleet specs against a test simulator, as data, as a validated spec or as a TOML file.

Every integration, chaos and CLI test needs the same thing: a spec whose
``[vcenter]`` is a :class:`~tests.simproc.SimProcess` (password and thumbprint
wired), with the guest credentials of the default topology, and quick retries.
Keyword arguments replace top-level keys; a dict merges into the table of the
same name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fleet.engine.spec import FleetSpec, spec_from_dict
from tests.simproc import PASSWORD, USER, SimProcess

GUEST_PASSWORD = "fleet-guest"  # the default topology's guest password
ENV = {"SIM_PASSWORD": PASSWORD, "GUEST_PASSWORD": GUEST_PASSWORD}
FROZEN = [f"frozen-{i:02d}" for i in range(1, 9)]


def run_fleet(*args: str, env: dict[str, str] | None = None, timeout: float = 180,
              cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m fleet ARGS`` as a user runs it: ``env`` added to this environment
    (the simulator's passwords by default), no stdin, output captured as text."""
    return subprocess.run([sys.executable, "-m", "fleet", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, **(ENV if env is None else env)))


def spec_data(sim: SimProcess, name: str, count: int, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": name,
        "count": count,
        "sources": FROZEN,
        "vcenter": {"url": sim.url, "user": USER, "password_env": "SIM_PASSWORD",
                    "thumbprint": sim.thumbprint},
        "network": {"guest_user": "root", "guest_password_env": "GUEST_PASSWORD"},
        "retries": {"backoff_base_s": 0.02, "backoff_max_s": 0.2},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def make_spec(sim: SimProcess, name: str, count: int, **extra: Any) -> FleetSpec:
    return spec_from_dict(spec_data(sim, name, count, **extra), source=f"test spec {name}",
                          env=ENV)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(type(value))


def to_toml(data: dict[str, Any]) -> str:
    """A small TOML writer: top-level scalars, then one-level tables of inline values."""
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines.append(f"[{key}]")
            lines.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def write_spec(path: Path, sim: SimProcess, name: str, count: int, **extra: Any) -> Path:
    path.write_text(to_toml(spec_data(sim, name, count, **extra)))
    return path
