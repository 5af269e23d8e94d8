"""The ``--json`` outputs against their documentation, docs/cli-json.md: each command's
section lists its top-level keys, and a command prints exactly those (those whose
meaning starts "only with" may be absent), ``schema_version`` first."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli-json.md"
SCHEMA_VERSION = 1


def documented_keys(heading: str) -> tuple[set[str], set[str]]:
    """(keys always printed, keys printed only with some option) of the section whose
    heading starts with ``heading``."""
    sections = DOC.read_text().split("\n## ")
    (section,) = [s for s in sections if s.startswith(heading)]
    always: set[str] = set()
    sometimes: set[str] = set()
    for m in re.finditer(r"^\| `(\w+)` \| [^|]+ \| (.*) \|$", section, re.MULTILINE):
        (sometimes if m.group(2).startswith("only with") else always).add(m.group(1))
    assert always, f"docs/cli-json.md lists no keys under {heading!r}"
    return always, sometimes


def assert_documented(out: Mapping[str, Any], heading: str) -> None:
    always, sometimes = documented_keys(heading)
    keys = set(out)
    assert always <= keys <= always | sometimes, (
        heading, "undocumented:", keys - always - sometimes, "missing:", always - keys)
    assert next(iter(out)) == "schema_version" and out["schema_version"] == SCHEMA_VERSION
