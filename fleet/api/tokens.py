"""Who calls the API: clients, their tokens' hashes, roles and quotas (docs/api.md, "Clients").

A client is a name, the SHA-256 of its bearer token (never the token), a role and
its quotas. The clients come from ``[api] tokens_file`` (TOML, a ``[[clients]]``
table each) and from the single token of ``[api] token_env``/``token_file``, which
is one admin client called :data:`SINGLE_TOKEN_CLIENT`.

- ``admin``: sees and changes every fleet; no quota applies.
- ``client``: sees and changes only the fleets it made (a fleet's owner is kept on
  its members, as the label :data:`LABEL_OWNER`, and in the service's state
  record); another client's fleet is "not found", and its name is "taken".
  ``max_members`` caps the members of all its fleets together (429 naming the
  quota). ``max_leases`` and ``pools`` are read and checked now, for the pools and
  leases to come.

Tokens are random secrets of high entropy, so one fast hash is right (no salt, no
stretching: there is nothing to guess). A bearer token is hashed once per request
and compared with every client's hash by :func:`hmac.compare_digest`, all of them
each time, so neither which client matched nor how far shows in the timing.

A bad tokens file stops the service at start (exit status 2); each problem names
the file and the line of the offending entry or key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet.engine.lifetime import LABEL_OWNER
from fleet.engine.spec_checks import pydantic_problems
from fleet.engine.spec_model import show
from fleet.files import CONFIG_MAX_BYTES, FileProblem, parse_toml, read_user_file

__all__ = ["LABEL_OWNER", "Client", "ClientTable", "load_tokens"]

#: the client the single ``[api] token_env``/``token_file`` token stands for
SINGLE_TOKEN_CLIENT = "admin"
CLIENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_POOL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
#: the most clients a tokens file may list (each request compares with every one)
MAX_CLIENTS = 1000


@dataclass(frozen=True)
class Client:
    """One caller of the API, as its token identifies it."""

    name: str
    role: Literal["admin", "client"]
    digest: bytes = field(default=b"", repr=False)  # SHA-256 of its token
    max_members: int | None = None   # None: no quota
    max_leases: int | None = None
    pools: tuple[str, ...] | None = None  # None: every pool

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def may_lease(self, pool: str) -> bool:
        """May this client lease from (and see) ``pool``?"""
        return self.admin or self.pools is None or pool in self.pools

    def owns(self, owner: str | None) -> bool:
        """May this client see and change a fleet owned by ``owner`` (None: made
        before owners were kept, or outside the service: admins only)?"""
        return self.admin or (owner is not None and owner == self.name)


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(pattern=CLIENT_NAME)
    token_sha256: str
    role: Literal["admin", "client"] = "client"
    max_members: int | None = Field(default=None, ge=0, le=10_000_000)
    max_leases: int | None = Field(default=None, ge=0, le=10_000_000)
    pools: list[str] | None = Field(default=None, max_length=1000)

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        # Never echoed: a token pasted here by mistake must not reach a log.
        if not _HEX64.match(value):
            raise ValueError("is not 64 hex digits (the SHA-256 of the token, e.g. "
                             "`printf %s \"$TOKEN\" | sha256sum`); the value is not shown")
        return value.lower()

    @field_validator("pools")
    @classmethod
    def _pools(cls, value: list[str] | None) -> list[str] | None:
        for i, pool in enumerate(value or ()):
            if not re.match(_POOL, pool):
                raise ValueError(f"pools[{i}]: {show(pool)} is not a pool name (lower-case "
                                 "letters, digits and '-')")
        return value


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    clients: list[dict[str, Any]] = Field(max_length=MAX_CLIENTS)


# -- where in the file ------------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[\s*clients\s*\]\]\s*(#.*)?$")
_TABLE = re.compile(r"^\s*\[")


def _key_line(lines: Sequence[str], start: int, end: int, key: str) -> int | None:
    pattern = re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')"
                         r"\s*=")
    for i in range(start, end):
        if pattern.match(lines[i]):
            return i + 1
    return None


def _entries(lines: Sequence[str]) -> list[tuple[int, int]]:
    """(first line index, end index) of each ``[[clients]]`` table, in order."""
    heads = [i for i, line in enumerate(lines) if _HEADER.match(line)]
    out = []
    for head in heads:
        end = next((j for j in range(head + 1, len(lines)) if _TABLE.match(lines[j])),
                   len(lines))
        out.append((head, end))
    return out


def _line_of(lines: Sequence[str], index: int | None, key: str | None) -> int:
    """The line (1-based) of clients[index].key, of clients[index], or of ``key`` at
    the top; 1 when the text does not show it (an inline array of tables)."""
    if index is None:
        return _key_line(lines, 0, len(lines), key or "clients") or 1
    entries = _entries(lines)
    if index >= len(entries):
        return _key_line(lines, 0, len(lines), "clients") or 1
    head, end = entries[index]
    if key:
        found = _key_line(lines, head + 1, end, key)
        if found is not None:
            return found
    return head + 1


# -- loading -------------------------------------------------------------------------------

def load_tokens(path: Path, *, reserved: Mapping[str, bytes] | None = None
                ) -> tuple[list[Client], list[str]]:
    """The clients a tokens file lists, or the problems with it (each naming the file
    and its line). ``reserved``: names and digests already taken (the single token)."""
    where = str(path)
    try:
        raw = read_user_file(path, CONFIG_MAX_BYTES)
    except FileProblem as exc:
        return [], [f"cannot read {show(where, 200)}: {exc.reason}"]
    try:
        data = parse_toml(raw)
    except FileProblem as exc:  # tomllib's message names the line and column
        key = f" ({exc.key})" if exc.key else ""
        return [], [f"{where}{key}: {exc.reason}"]
    lines = raw.decode("utf-8").splitlines()

    def at(index: int | None, key: str | None) -> str:
        line = _line_of(lines, index, key)
        name = f"clients[{index}]" if index is not None else ""
        if index is not None and key:
            name += f".{key}"
        elif key:
            name = key
        return f"{where} line {line}" + (f" ({name})" if name else "")

    problems: list[str] = []
    try:
        top = _File.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = err["loc"]
            if loc and loc[0] == "clients" and len(loc) > 1 and isinstance(loc[1], int):
                # an entry that is not a table: say so at its place
                problems.append(f"{at(loc[1], None)}: each client is a [[clients]] table")
        if not problems:
            for key, message in pydantic_problems(exc):
                problems.append(f"{at(None, key.split('.')[0] or None)}: {message}")
        return [], problems
    if not top.clients:
        return [], [f"{where}: lists no [[clients]]"]
    clients: list[Client] = []
    names: dict[str, int] = {}
    digests: dict[str, int] = {}
    taken = dict(reserved or {})
    for i, item in enumerate(top.clients):
        try:
            entry = _Entry.model_validate(item)
        except ValidationError as exc:
            for key, message in pydantic_problems(exc):
                top_key = key.split(".")[0].split("[")[0] or None
                problems.append(f"{at(i, top_key)}: {message}")
            continue
        if entry.name in names or entry.name in taken:
            first = (f"clients[{names[entry.name]}]" if entry.name in names
                     else "the single [api] token")
            problems.append(f"{at(i, 'name')}: {show(entry.name)} is also the name of "
                            f"{first}; names must be unique")
        digest = bytes.fromhex(entry.token_sha256)
        if entry.token_sha256 in digests or any(hmac.compare_digest(digest, d)
                                                for d in taken.values()):
            first = (f"clients[{digests[entry.token_sha256]}]"
                     if entry.token_sha256 in digests else "the single [api] token")
            problems.append(f"{at(i, 'token_sha256')}: the same token hash as {first}; "
                            "every client needs its own token")
        names.setdefault(entry.name, i)
        digests.setdefault(entry.token_sha256, i)
        clients.append(Client(entry.name, entry.role, digest, entry.max_members,
                              entry.max_leases,
                              tuple(entry.pools) if entry.pools is not None else None))
    return (clients, []) if not problems else ([], problems)


def single_token_client(token: str) -> Client:
    return Client(SINGLE_TOKEN_CLIENT, "admin", hashlib.sha256(token.encode()).digest())


class ClientTable:
    """Every client, found by its token."""

    def __init__(self, clients: Iterable[Client]) -> None:
        self.clients = tuple(clients)

    def identify(self, token: bytes) -> Client | None:
        """The client whose token this is, or None. Compares with every client."""
        digest = hashlib.sha256(token).digest()
        found: Client | None = None
        for client in self.clients:
            if hmac.compare_digest(digest, client.digest) and found is None:
                found = client
        return found


# -- owners ----------------------------------------------------------------------------------

def owner_labels(owner: str | None) -> dict[str, str]:
    """The owner label new clones get (none for a fleet without an owner)."""
    return {} if owner is None else {LABEL_OWNER: owner}


def owner_of(labels: Iterable[Mapping[str, str]]) -> str | None:
    """The owner the members' labels agree on; None if any lacks it or they differ."""
    owner: str | None = None
    for extra in labels:
        value = extra.get(LABEL_OWNER)
        if value is None or not re.match(CLIENT_NAME, value) or owner not in (None, value):
            return None
        owner = value
    return owner
