"""A pool's lease journal: what was promised to a caller before vCenter shows it.

A lease is answered in milliseconds, and a label write in vCenter takes a
reconfigure task (a fifth of a second or more), so the lease's label is written
right after the answer. What closes that gap is this journal: every grant,
extension and return is appended here, one JSON line, and ``fsync``ed *before*
the caller hears of it. A service killed between the answer and the label finds
the line at its next start and writes the label then (docs/pools.md, "Where a
lease lives"). Lines whose labels vCenter shows are dropped when the journal is
compacted, so it stays small.

Each pool has its own file, ``<state_dir>/pools/<pool>.jsonl`` (mode 0600). A
torn last line (a crash mid-write) is ignored; so is any line that is not an
entry, with a warning. File I/O runs in a worker thread, one write at a time, and
lines that arrive while a write is under way go out together in the next (one
``write``, one ``fsync``: group commit), so a burst of leases costs a few flushes, not
one each in a queue.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import anyio

from fleet.engine.spec import is_fleet_name
from fleet.files import FileProblem, read_user_file, write_atomically

log = logging.getLogger("fleet.api.pools")

#: a journal larger than this is refused at start (a lease line is ~200 bytes)
JOURNAL_MAX_BYTES = 256 * 1024 * 1024
#: the operations a line may record
OPS = ("grant", "extend", "return")


class _Batch:
    """Lines waiting for one write; ``done`` once written (or ``error``)."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.done = False
        self.error: OSError | None = None


class LeaseJournal:
    """See the module docstring."""

    def __init__(self, directory: Path, pool: str) -> None:
        if not is_fleet_name(pool):
            raise ValueError(f"not a pool name: {pool!r}")
        self.path = directory / f"{pool}.jsonl"
        self._lock = anyio.Lock()  # fair: writers in their order of arrival
        self._open = _Batch()
        self.size = 0
        self.writes = 0  # fsynced writes (the benchmark compares them with lines)

    def _load(self) -> list[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.path.lexists(self.path):
            return []
        try:
            raw = read_user_file(self.path, JOURNAL_MAX_BYTES)
        except FileProblem as exc:
            raise OSError(f"lease journal {self.path}: {exc}") from None
        self.size = len(raw)
        out: list[dict[str, Any]] = []
        lines = raw.split(b"\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not (isinstance(entry, dict) and entry.get("op") in OPS
                        and isinstance(entry.get("id"), str)):
                    raise ValueError("not a lease entry")
            except (ValueError, RecursionError) as exc:
                if number < len(lines):  # the last line may be torn by a crash
                    log.warning("lease journal %s line %d ignored: %s", self.path, number, exc)
                continue
            out.append(entry)
        return out

    async def load(self) -> list[dict[str, Any]]:
        """Every entry, oldest first (the directory is made if missing)."""
        async with self._lock:
            return await anyio.to_thread.run_sync(self._load)

    def _append(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a device would swallow it
                raise OSError(f"lease journal {self.path} is not a regular file")
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.size += len(data)

    async def append(self, entry: dict[str, Any]) -> None:
        """Add one entry and make it durable; OSError if it could not be. The first
        caller to get the file writes every line waiting by then, its own among them;
        the others find theirs written."""
        batch = self._open
        batch.lines.append(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
        async with self._lock:
            if not batch.done:
                self._open = _Batch()
                try:
                    await anyio.to_thread.run_sync(self._append, b"".join(batch.lines))
                    self.writes += 1
                except OSError as exc:
                    batch.error = exc
                finally:
                    batch.done = True
        if batch.error is not None:
            raise OSError(batch.error.errno, f"lease journal {self.path}: "
                                             f"{batch.error.strerror or batch.error}")

    def _rewrite(self, data: bytes) -> None:
        write_atomically(self.path, data)
        self.size = len(data)

    async def rewrite(self, entries: list[dict[str, Any]]) -> None:
        """Replace the journal with ``entries`` (atomically: a crash leaves the old
        or the new one)."""
        data = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n"
                        for e in entries)
        async with self._lock:
            await anyio.to_thread.run_sync(self._rewrite, data)
