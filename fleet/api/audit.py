"""The audit log: one JSON line per state-changing request, and per refused token.

Each line (docs/api.md, "Audit log") holds ``time`` (UTC, ISO 8601), ``client``
(its name, or ``-`` when no token matched), ``action`` (the method and the route
template, ``DELETE /v1/fleets/{name}``), ``object`` (the fleet, when the request
names one), ``status`` (the HTTP status) and ``outcome`` (``ok``, or ``refused:``
and why). Never a token, a header or a body: a refused body is summed up by the
keys of its problems, not their values.

Written lines:

- every request under ``/v1`` that is not a ``GET``/``HEAD``/``OPTIONS``, whatever
  its outcome;
- every request answered 401 (no token or a wrong one), whatever its method.

How: the file is opened ``O_APPEND`` for each line and the line goes in one
``write``, so lines never interleave and a log rotated by renaming is followed at
once (no reopen signal needed). A state-changing request's line is ``fsync``\\ ed
before the answer goes out; a 401's is not (a flood of wrong tokens must not turn
into a flood of disk flushes: the kernel writes them within seconds).

A failing audit log is loud, and stops changes: when a line cannot be written the
error (with the line) goes to the service's log, and from then on every
state-changing request is refused with 503 until the file can be opened for
appending again (tried at each such request). Reads go on.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import anyio

log = logging.getLogger("fleet.api.audit")

#: longest refusal reason written (messages are the service's own, never a body's)
MAX_REASON_CHARS = 300
_MODE = 0o600


def now_iso(t: float) -> str:
    ms = int((t % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{ms:03d}Z"


class AuditLog:
    """See the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failing: str | None = None  # why the last write failed, until one works
        self.lines = 0

    def _open(self) -> int:
        # O_NONBLOCK: a FIFO without a reader fails at once instead of holding the
        # request (and its worker thread) for ever; only a regular file is a log.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                     | os.O_NONBLOCK, _MODE)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{self.path} is not a regular file")
        return fd

    def _probe(self) -> None:
        os.close(self._open())

    def _write(self, line: bytes, sync: bool) -> None:
        fd = self._open()
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"wrote {written} of {len(line)} bytes (disk full?)")
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    async def ready(self) -> bool:
        """May a state change be accepted (its line can be written)?"""
        if self.failing is None:
            return True
        try:
            await anyio.to_thread.run_sync(self._probe)
        except OSError as exc:
            self.failing = exc.strerror or str(exc)
            return False
        log.warning("audit log %s can be written again", self.path)
        self.failing = None
        return True

    async def write(self, *, client: str, action: str, obj: str | None, status: int,
                    outcome: str, sync: bool, at: float | None = None) -> None:
        entry: dict[str, Any] = {"time": now_iso(time.time() if at is None else at),
                                 "client": client, "action": action, "object": obj,
                                 "status": status, "outcome": outcome[:MAX_REASON_CHARS]}
        line = (json.dumps(entry, ensure_ascii=True, separators=(",", ":")) + "\n").encode()
        try:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._write, line, sync)
        except OSError as exc:
            self.failing = exc.strerror or str(exc)
            log.error("cannot write the audit log %s (%s): state-changing requests are "
                      "refused with 503 until it can be; the line was: %s", self.path,
                      self.failing, line.decode().rstrip())
            return
        self.lines += 1
