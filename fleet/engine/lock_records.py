"""The fleet lock's records as they stand in vCenter, and how they are read.

The names (:class:`Holder` of a lock, :class:`Claim` of a run taking it), the rules that
make one stale, the errors a contender reports (:class:`LockHeld`, :class:`LockLost`),
and the reads ``plan``, ``status`` and ``destroy`` show (:func:`read_lock`,
:func:`lock_state`). Taking, keeping and releasing the lock is :mod:`fleet.engine.lock`;
the design is docs/locking.md.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from fleet.errors import FleetError, NotFound, RequestTimeout
from fleet.vsphere.model import Ref, VSphere

#: the lock folder's name in the fleet's folder
LOCK_NAME = "fleet-lock"
#: vCenter's limit on an entity name
MAX_NAME = 80
DEFAULT_LEASE_S = 60.0
MIN_LEASE_S = 2.0
MAX_LEASE_S = 3600.0
#: the prefix of a claim's name: a lock in the making (:class:`Claim`)
CLAIM_PREFIX = "fleet-claim"
#: a claim's life in vCenter's clock: its maker renames it within three quarters of
#: this (by its own clock) or not at all, so after it anyone may remove it
CLAIM_S = 20.0
#: a lock folder seen without a record for this long is stale (made by an older fleet,
#: which created the lock before its record, and whose taker died in between)
RECORDLESS_S = 60.0
#: the deadline of one vCenter call the lock makes
CALL_S = 30.0
#: what an operation name in a record may be (``provision``, ``destroy``)
OP_NAME = re.compile(r"^[a-z][a-z0-9-]{0,15}$")
_RUN = re.compile(r"^[0-9A-Za-z._-]{1,16}$")
_PID = re.compile(r"^(\d{1,10})(?:@([0-9a-f]{8}))?$")
_TAG = re.compile(r"^[0-9a-f]{4}$")
#: characters a name in a record never carries (replaced by ``-``)
HOST_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class LockHeld(FleetError):
    """Another run holds the fleet's lock (and we did not, or could no longer, wait)."""

    reason = "locked"

    def __init__(self, message: str, view: LockView) -> None:
        super().__init__(message)
        self.view = view


class LockLost(FleetError):
    """The run lost the fleet's lock while it ran (it stopped dispatching then).
    ``result`` is what the run had done by then: the fleet may have changed since."""

    reason = "lock_lost"

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


def _invisible() -> LockView:
    return LockView(Ref("Folder", "?"), None, None, 0.0)


def this_host() -> str:
    """The host name as a record can carry it (vSphere escapes ``/ \\ %``: none here)."""
    return HOST_UNSAFE.sub("-", socket.gethostname()) or "unknown"


@functools.cache
def process_space() -> str:
    """Where a pid means one process: 8 hex digits of the kernel's boot id and this
    process's pid namespace. Two processes with the same space can tell whether the
    other is alive; a host name cannot (containers share names, not pid tables).
    Empty where it cannot be told (no /proc)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return hashlib.sha256(f"{boot}:{namespace}".encode()).hexdigest()[:8]


def _process_gone(pid: int, space: str) -> bool:
    """A holder (or a claim's maker) provably died: it ran in this process space and its
    pid is gone (a pid reused since, or a process of another user, counts as alive:
    wait for expiry)."""
    if not space or space != process_space() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _pid_text(pid: int, space: str) -> str:
    """A pid as names carry it: with its process space (``4711@3fa9c2d1``) if known."""
    return f"{pid}@{space}" if space else str(pid)


def _fitted(head: str, host: str) -> str:
    """``head`` and the host, cut to vCenter's 80 characters for a name."""
    return head + host[:MAX_NAME - len(head)]


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, since and until when (epoch seconds of vCenter's clock)."""

    op: str  # what it is doing: provision, destroy, serve-provision, serve-destroy
    run_id: str
    pid: int
    host: str
    since: int
    until: int
    space: str = ""  # process_space() of the holder

    def record(self) -> str:
        """The record folder's name: at most 80 characters (the host is cut to fit)."""
        return _fitted(f"{self.op} {self.run_id} {_pid_text(self.pid, self.space)} "
                       f"{self.since} {self.until} ", self.host)

    @classmethod
    def parse(cls, name: str) -> Holder | None:
        parts = name.split(" ", 5)
        if len(parts) != 6:
            return None
        op, run_id, pid, since, until, host = parts
        m = _PID.match(pid)
        if not (OP_NAME.match(op) and _RUN.match(run_id) and m and since.isdigit()
                and until.isdigit() and host):
            return None
        return cls(op, run_id, int(m.group(1)), host, int(since), int(until),
                   m.group(2) or "")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "run_id": self.run_id, "pid": self.pid, "host": self.host,
                "since": self.since, "until": self.until}


@dataclass(frozen=True)
class Claim:
    """A lock in the making: a folder beside the lock, named after the run that made it,
    which holds its record and is renamed to :data:`LOCK_NAME` (docs/locking.md). Its
    name, e.g. ``fleet-claim 9c1e 4f2a9c1e0b12 4711@3fa9c2d1 1764150023 build-01``,
    says whose it is (a tag that keeps two claims of one run apart, run id, pid and
    process space, host) and when it ends (``until``, vCenter's clock)."""

    tag: str
    run_id: str
    pid: int
    space: str
    until: int
    host: str

    def name(self) -> str:
        """At most 80 characters (the host is cut to fit)."""
        return _fitted(f"{CLAIM_PREFIX} {self.tag} {self.run_id} "
                       f"{_pid_text(self.pid, self.space)} {self.until} ", self.host)

    @classmethod
    def parse(cls, name: str) -> Claim | None:
        parts = name.split(" ", 5)
        if len(parts) != 6 or parts[0] != CLAIM_PREFIX:
            return None
        _, tag, run_id, pid, until, host = parts
        m = _PID.match(pid)
        if not (_TAG.match(tag) and _RUN.match(run_id) and m and until.isdigit() and host):
            return None
        return cls(tag, run_id, int(m.group(1)), m.group(2) or "", int(until), host)

    def stale(self, now: float) -> bool:
        """Its maker will not rename it any more: its end passed (``now``: vCenter's
        clock, read before the claim was seen), or its maker provably died."""
        return now >= self.until or _process_gone(self.pid, self.space)


def is_claim(name: str) -> bool:
    """``name`` is a claim's: a lock in the making, which holds nothing but a record."""
    return Claim.parse(name) is not None


@dataclass(frozen=True)
class LockView:
    """A lock as read from vCenter. ``holder`` is None while the lock folder has no
    record: made by an older fleet, which created the lock before its record (being
    taken right now, or its taker died in between)."""

    lock: Ref
    record: Ref | None
    holder: Holder | None
    now: float  # vCenter's clock, read before the lock was

    @property
    def expired(self) -> bool:
        return self.holder is not None and self.now >= self.holder.until

    @property
    def holder_gone(self) -> bool:
        """Its holder's process provably died (on this machine): stale before expiry."""
        return self.holder is not None and _process_gone(self.holder.pid, self.holder.space)

    def describe(self) -> str:
        h = self.holder
        if h is None:
            return (f"a lock without a record (lock folder {self.lock.id}): a run of an "
                    "older fleet taking it right now, or one that died doing so")
        age = max(0, round(self.now - h.since))
        text = (f"{h.op} run {h.run_id} (pid {h.pid} on {h.host}) since {_utc(h.since)} "
                f"({age} s ago)")
        left = h.until - self.now
        if left <= 0:
            return text + f", lease expired {round(-left)} s ago"
        if self.holder_gone:
            return text + f", lease until {_utc(h.until)}, but its process is gone"
        return text + f", lease until {_utc(h.until)}"

    def to_dict(self) -> dict[str, Any]:
        return {"holder": self.holder.to_dict() if self.holder else None,
                "expired": self.expired, "lock_folder": self.lock.id,
                "description": self.describe()}


@dataclass(frozen=True)
class Survey:
    """What a fleet's folder holds of the lock: vCenter's clock (read first), the lock
    (None: free) and the claims of runs taking it."""

    now: float
    view: LockView | None
    claims: list[tuple[Claim, Ref]]


async def survey(vs: VSphere, folder: Ref) -> Survey:
    """Read the lock and the claims in the fleet's ``folder`` (NotFound: no folder).
    vCenter's clock is read first, so what is seen expired was expired when read."""
    with anyio.fail_after(CALL_S):
        now = await vs.server_time()
        children = await vs.list_child_folders(folder)
        lock = next((ref for name, ref in children if name == LOCK_NAME), None)
        claims = [(c, ref) for c, ref in ((Claim.parse(name), ref) for name, ref in children)
                  if c is not None]
        if lock is None:
            return Survey(now, None, claims)
        try:
            inside = await vs.list_child_folders(lock)
        except NotFound:
            return Survey(now, None, claims)  # released (or taken over) just now
    records = [(h, ref) for h, ref in ((Holder.parse(name), ref) for name, ref in inside)
               if h is not None]
    if len(records) != 1:  # none (an older fleet's, being made); several cannot be fleet's
        return Survey(now, LockView(lock, None, None, now), claims)
    return Survey(now, LockView(lock, records[0][1], records[0][0], now), claims)


async def read_lock(vs: VSphere, folder: Ref) -> LockView | None:
    """The lock in the fleet's ``folder``, or None when nobody holds it (claims, locks in
    the making, are nobody's yet). vCenter's clock is read first, so a record seen
    expired was expired when it was read."""
    try:
        return (await survey(vs, folder)).view
    except TimeoutError:
        raise RequestTimeout(f"vCenter did not answer within {CALL_S:g} s while reading "
                             f"the lock in {folder.id}") from None


async def lock_state(vs: VSphere, folder_path: str) -> LockView | None:
    """The lock of the fleet at ``folder_path`` (None: free, or no folder)."""
    with anyio.fail_after(CALL_S):
        folder = await vs.find_folder(folder_path)
    return await read_lock(vs, folder) if folder is not None else None


@dataclass(frozen=True)
class LockOptions:
    """How a run takes its fleet's lock. ``wait_s``: 0 refuses at once when another run
    holds it, None waits as long as it takes; ``on_wait`` is called after every look
    at the holder while waiting."""

    lease_s: float = DEFAULT_LEASE_S
    wait_s: float | None = 0.0
    on_wait: Callable[[LockView], None] | None = None
    poll_s: float = 1.0
    op: str | None = None  # what the record says the run does, instead of the caller's


#: what ``_attempt`` returns when the lock's name is taken but no lock folder shows (a
#: claim being renamed to it right now, or something that is not a folder has the name)
INVISIBLE = _invisible()
