"""``python -m fleet``: the ``fleet`` command (see :func:`fleet.cli.entry`)."""

from fleet.cli import entry

entry()
