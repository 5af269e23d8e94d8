"""What the service keeps on local disk: the specs callers asked for, nothing more.

vCenter is the truth for members (labels on the VMs, including their expiry).
What vCenter cannot hold is a request itself: the count, sources and settings
of a fleet that is still being built, or that has no member yet. Each such
request is one small JSON file, ``<state_dir>/<fleet>.json``, written
atomically (temporary file, fsync, rename), so a restarted service resumes the
builds it was doing. Losing the directory loses no VM and no expiry: fleets are
still rediscovered from vCenter, only their unfinished requests are forgotten.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio

from fleet.engine.spec import is_fleet_name
from fleet.files import FileProblem, read_user_file, write_atomically

log = logging.getLogger("fleet.api.state")

FORMAT = 1
#: a saved request is at most a request body (api.max_body_bytes <= 64 MiB), re-indented
STATE_MAX_BYTES = 128 * 1024 * 1024


@dataclass
class SavedFleet:
    """One fleet's request as the service last accepted it."""

    name: str
    spec: dict[str, Any] | None  # the effective spec (defaults merged), as JSON data;
    # None for a fleet found in vCenter that is being destroyed
    generation: int
    status: str  # pending | provisioning | ready | incomplete | failed | destroying
    expires_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)


class StateStore:
    """The state directory. File I/O runs in a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Saves of one fleet must land in the order they were made: one at a time.
        self._lock = anyio.Lock()

    def _file(self, name: str) -> Path:
        if not is_fleet_name(name):
            raise ValueError(f"not a fleet name: {name!r}")
        return self.path / f"{name}.json"

    def _prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def prepare(self) -> None:
        await anyio.to_thread.run_sync(self._prepare)

    def _load_all(self) -> list[SavedFleet]:
        out: list[SavedFleet] = []
        if not self.path.is_dir():
            return out
        for p in sorted(self.path.glob("*.json")):
            try:
                # Read as any file a user could have put there (fleet.files): a FIFO
                # or a device among the state files must not hang or sink the start.
                data = json.loads(read_user_file(p, STATE_MAX_BYTES))
                saved = SavedFleet(**data)
                if saved.format != FORMAT or self._file(saved.name) != p:
                    raise ValueError("unexpected format or name")
            except (OSError, ValueError, TypeError, RecursionError, FileProblem) as exc:
                log.warning("ignoring state file %s: %s", p, exc)
                continue
            out.append(saved)
        return out

    async def load_all(self) -> list[SavedFleet]:
        return await anyio.to_thread.run_sync(self._load_all)

    def _save(self, saved: SavedFleet) -> None:
        write_atomically(self._file(saved.name),
                         json.dumps(asdict(saved), sort_keys=True, indent=1).encode())

    async def save(self, saved: SavedFleet) -> None:
        async with self._lock:
            await anyio.to_thread.run_sync(self._save, saved)

    def _delete(self, name: str) -> None:
        self._file(name).unlink(missing_ok=True)

    async def delete(self, name: str) -> None:
        async with self._lock:
            await anyio.to_thread.run_sync(self._delete, name)
