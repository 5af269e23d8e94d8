"""What every ``fleet`` command shares: its exit statuses, its messages on standard
error and the envelope of its ``--json`` output (docs/cli-json.md). Kept apart from
``fleet.cli`` so that the commands' own modules (``fleet.cli.lease``) use them
without importing the parser that imports them."""

from __future__ import annotations

import json
import sys
from typing import Any

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: sysexits' EX_TEMPFAIL, "try again later": a fleet's lock held by another run, a
#: pool at its max, a service that says 429 or 503
EXIT_TEMPFAIL = 75

#: the version of every ``--json`` output's shape (docs/cli-json.md): raised when a key is
#: removed or changes its meaning, not when one is added
JSON_SCHEMA_VERSION = 1


def eprint(message: str) -> None:
    print(f"fleet: {message}", file=sys.stderr, flush=True)


def print_json(out: dict[str, Any]) -> None:
    """A ``--json`` output: one object on stdout, its ``schema_version`` first."""
    print(json.dumps({"schema_version": JSON_SCHEMA_VERSION, **out}))
