"""The ``fleet`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fleet import __version__
from fleet.errors import FleetError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet",
        description="Provision fleets of vSphere Instant Clones fast, within vCenter's limits.")
    parser.add_argument("--version", action="version", version=f"fleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from fleet.sim import cli as sim_cli

    sim = sub.add_parser("sim", help="serve a simulated vCenter (vim25 SOAP)",
                         description="Serve a simulated vCenter that unmodified pyVmomi and "
                                     "fleet talk to. Prints 'listening on URL' when ready.")
    sim_cli.add_arguments(sim)
    sim.set_defaults(func=sim_cli.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FleetError as exc:
        print(f"fleet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fleet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
