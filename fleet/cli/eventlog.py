"""``fleet provision --events FILE``: the run's events as JSON lines (docs/limits.md)."""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from fleet.errors import ConfigError


class EventLog:
    """``--events FILE``: every event as one JSON line, written 64 KiB at a time.

    A write that fails (disk full, ``/dev/full``) must not end the run that makes the
    events, nor lose its summary: the log stops at the first failure and keeps
    count. Afterwards the command says on stderr how many events are missing and
    exits 1 even if every member is ready: the user asked for the log, a CI job
    that archives or analyses it must not go on with a truncated file as if it were
    whole, and re-running ``provision`` is harmless (it converges). docs/limits.md."""

    FLUSH_BYTES = 1 << 16

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            # Not blocking on open: a FIFO nobody reads would hold the run before it
            # began, for ever (ENXIO instead). Writes block again, as for any file.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK, 0o666)
        except OSError as exc:
            why = ("nobody is reading that FIFO" if exc.errno == errno.ENXIO
                   else exc.strerror)
            raise ConfigError(f"cannot write the event log {path!r}: {why}",
                              key="--events") from None
        os.set_blocking(fd, True)
        self._file = os.fdopen(fd, "wb")
        self._encode = json.JSONEncoder(separators=(",", ":")).encode
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.events = 0  # given to the log
        self.saved = 0  # known to be written
        self.error: OSError | None = None

    def write(self, event: Any) -> None:
        self.events += 1
        if self.error is not None:
            return
        line = (self._encode(event.to_dict()) + "\n").encode()
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= self.FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        try:
            self._file.write(b"".join(self._pending))
            self._file.flush()
        except OSError as exc:
            self.error = exc
        else:
            self.saved += len(self._pending)
        self._pending.clear()
        self._pending_bytes = 0

    def close(self) -> None:
        if self.error is None and self._pending:
            self._flush()
        try:
            self._file.close()
        except OSError as exc:  # what a failed flush left in the file's buffer
            self.error = self.error or exc

    def loss(self) -> str | None:
        """What was lost, as the error message to show; None if nothing was."""
        if self.error is None:
            return None
        return (f"error: the event log {self.path!r} could not be written "
                f"({self.error.strerror or self.error}): it holds at most {self.saved} of "
                f"{self.events} events; the run itself is unaffected (see the summary)")
