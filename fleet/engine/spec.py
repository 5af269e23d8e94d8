"""The fleet spec: TOML in, validated typed models out.

The spec is in three parts: the typed models, their keys, defaults and bounds
(``fleet.engine.spec_model``, whose names this module re-exports); the rules
between keys and the resolution of the secrets and files a spec names
(``fleet.engine.spec_checks``); and this module, the way in.
:func:`load_spec` (a file) and :func:`spec_from_dict` (anything that already has
the data, such as the CLI) are the only ways in; both raise :class:`SpecError`
(a :class:`~fleet.errors.ConfigError`) naming the file, the dotted key and the
bad value, never a pydantic traceback. Unknown keys are errors.

Secrets (vCenter and guest passwords) come from an environment variable or a
file named in the spec, never from the spec itself or argv; they are resolved at
load time into :class:`pydantic.SecretStr` private attributes, so they appear in
no repr, dump, error or log line.

No ``[vcenter]`` table means the built-in simulator is the target. Every
bound on sizes, durations, files and URLs is listed in docs/limits.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fleet.engine.spec_checks import pydantic_problems, resolve_secrets, semantic_problems
from fleet.engine.spec_model import (
    GUESTINFO_FIELDS,
    GUESTINFO_KEY_MAX,
    GUESTINFO_MAX_KEYS,
    GUESTINFO_TOTAL_MAX_BYTES,
    GUESTINFO_VALUE_MAX_BYTES,
    LABEL_PREFIX,
    MAX_COUNT,
    MAX_PROBLEMS_SHOWN,
    MAX_SOURCES,
    MAX_STEP_S,
    MAX_VM_NAME,
    MAX_WAIT_S,
    NAME_FIELDS,
    PATH_SHOWN,
    VCENTER_MAX_OPERATIONS,
    VSPHERE_CHAIN_LIMIT,
    FleetSpec,
    LimitsSpec,
    NetworkSpec,
    ReadinessSpec,
    RetriesSpec,
    SourceSpec,
    SpecError,
    TimeoutsSpec,
    VCenterSpec,
    is_fleet_name,
)
from fleet.files import CONFIG_MAX_BYTES, FileProblem, parse_toml, read_user_file


def read_toml(path: str | os.PathLike[str], what: str = "spec") -> dict[str, Any]:
    """A TOML file's data; a :class:`SpecError` naming the file (and the key, when the
    trouble is inside it) if it cannot be had. Read as :mod:`fleet.files` reads every
    user's file: a regular file of at most a few MiB, nesting bounded."""
    p = Path(path)
    try:
        raw = read_user_file(p, CONFIG_MAX_BYTES)
    except FileProblem as exc:
        raise SpecError([("", f"cannot read the {what}: {exc.reason}")],
                        source=str(p)) from None
    try:
        return parse_toml(raw)
    except FileProblem as exc:
        raise SpecError([(exc.key or "", exc.reason)], source=p.name) from None


def load_spec(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> FleetSpec:
    """Read, validate and resolve a TOML fleet spec. Every error is a :class:`SpecError`."""
    p = Path(path)
    return spec_from_dict(read_toml(p), source=p.name, env=env, base_dir=p.parent)


#: the origin of the built-in demo spec (``fleet.target.demo_spec``: no ``--spec``)
DEMO_ORIGIN = "built-in demo spec"


def spec_from_dict(data: Mapping[str, Any], *, source: str = "<spec>",
                   env: Mapping[str, str] | None = None,
                   base_dir: str | os.PathLike[str] | None = None) -> FleetSpec:
    """Validate already-parsed spec data (TOML shape). Secrets are read from ``env``
    (default: the process environment) and files relative to ``base_dir``."""
    env = os.environ if env is None else env
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    try:
        spec = FleetSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise SpecError(pydantic_problems(exc), source=source) from None
    problems = list(semantic_problems(spec))
    if not problems:
        problems = list(resolve_secrets(spec, env, base))
    if problems:
        raise SpecError(problems, source=source)
    spec._origin = source
    return spec


__all__ = [
    "GUESTINFO_FIELDS", "GUESTINFO_KEY_MAX", "GUESTINFO_MAX_KEYS", "GUESTINFO_TOTAL_MAX_BYTES",
    "GUESTINFO_VALUE_MAX_BYTES", "LABEL_PREFIX", "MAX_COUNT", "MAX_PROBLEMS_SHOWN",
    "MAX_SOURCES", "MAX_STEP_S", "MAX_VM_NAME", "MAX_WAIT_S", "NAME_FIELDS", "PATH_SHOWN",
    "VCENTER_MAX_OPERATIONS", "VSPHERE_CHAIN_LIMIT", "FleetSpec", "LimitsSpec", "NetworkSpec",
    "ReadinessSpec", "RetriesSpec", "SourceSpec", "SpecError", "TimeoutsSpec", "VCenterSpec",
    "is_fleet_name", "load_spec", "read_toml", "spec_from_dict",
]
