"""Who is calling: client sessions, the session table, and the context of one call.

Sessions follow vCenter: the first request gets a ``vmware_soap_session``
cookie; ``Login`` authenticates it; a session idle for longer than the
topology's ``session_idle_timeout_s`` expires and every call on it then fails
with ``NotAuthenticated`` until the client logs in again. Property-collector
state (filters, versions) and views belong to the session and die with it: the
session holds them as things to close, without knowing what they are
(``fleet.sim.propcollector`` puts them there).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pyVmomi import vim

from fleet.sim.core import Inventory
from fleet.sim.injection import Injection
from fleet.sim.stats import Stats

log = logging.getLogger("fleet.sim")


class Closeable(Protocol):
    """Per-session state that must be let go of when the session ends."""

    def close(self) -> None: ...


class UserSession:
    """One client session (one cookie): vSphere's ``vim.UserSession`` seen from the server
    (the client's side of it is ``fleet.vsphere.session.Session``)."""

    def __init__(self, inventory: Inventory, ip: str = "127.0.0.1",
                 user_agent: str = "") -> None:
        self.inventory = inventory
        self.key = secrets.token_hex(20)
        self.user: str | None = None
        self.authenticated = False
        self.alive = True
        self.login_time: datetime | None = None
        self.last_active = time.monotonic()
        self.last_active_wall = datetime.now(UTC)
        self.ip = ip
        self.user_agent = user_agent
        self.call_count = 0
        #: per property collector (by id): that collector's state for this session
        self.collectors: dict[str, Closeable] = {}
        self.retrieve_tokens: dict[str, Any] = {}
        self.views: set[str] = set()
        self.owned_collectors: set[str] = set()

    def drop_collector(self, moid: str) -> None:
        state = self.collectors.pop(moid, None)
        if state is not None:
            state.close()
        self.owned_collectors.discard(moid)

    def touch(self) -> None:
        self.last_active = time.monotonic()
        self.last_active_wall = datetime.now(UTC)
        self.call_count += 1

    def idle_s(self) -> float:
        return time.monotonic() - self.last_active

    def close(self) -> None:
        """Logout or expiry: the session's filters, views and collectors go away."""
        self.alive = False
        self.authenticated = False
        for moid in list(self.collectors):
            self.collectors.pop(moid).close()
        for moid in self.views | self.owned_collectors:
            self.inventory.objects.pop(moid, None)
        self.views.clear()
        self.owned_collectors.clear()
        self.retrieve_tokens.clear()

    def user_session(self) -> Any:
        return vim.UserSession(
            key=self.key, userName=self.user or "", fullName=self.user or "",
            loginTime=self.login_time or datetime.now(UTC),
            lastActiveTime=self.last_active_wall, locale="en", messageLocale="en",
            extensionSession=False, ipAddress=self.ip, userAgent=self.user_agent,
            callCount=self.call_count)


class Sessions:
    """The session table; ``authenticate`` (``fleet.sim.permissions``) says who may log in."""

    def __init__(self, inventory: Inventory, stats: Stats, *, idle_timeout_s: float,
                 authenticate: Callable[[str, str], str | None]) -> None:
        self.inventory = inventory
        self.stats = stats
        self.idle_timeout_s = idle_timeout_s
        self.authenticate = authenticate
        self.by_key: dict[str, UserSession] = {}

    def session_for(self, key: str | None, ip: str = "127.0.0.1", user_agent: str = "",
                    *, create: bool = True) -> tuple[UserSession, bool]:
        """The caller's session, or a new unauthenticated one (True when new).

        With ``create=False`` (a call that needs a login anyway) an unknown or
        expired cookie gets a throw-away session that is not kept: a client
        hammering with a dead cookie must not fill the table with sessions."""
        if key is not None:
            session = self.by_key.get(key)
            if session is not None:
                if session.authenticated and session.idle_s() > self.idle_timeout_s:
                    log.info("session %s… expired after %.0f s idle", key[:8], session.idle_s())
                    self.expire(session)
                    session = None
                elif session.alive:
                    return session, False
        session = UserSession(self.inventory, ip, user_agent)
        if create:
            self.by_key[session.key] = session
        return session, create

    def expire(self, session: UserSession) -> None:
        session.close()
        self.by_key.pop(session.key, None)
        self.stats.counters["sessions_expired"] += 1

    def expire_all(self) -> int:
        live = [s for s in self.by_key.values() if s.authenticated]
        for session in live:
            self.expire(session)
        return len(live)

    def reap(self) -> None:
        idle = self.idle_timeout_s
        for session in list(self.by_key.values()):
            if session.idle_s() > max(idle, 60.0 if not session.authenticated else 0.0):
                self.expire(session)


@dataclass
class CallContext:
    """Who is calling, with which API version, and what fault injection fired."""

    session: UserSession
    version: str
    injection: Injection | None = None


#: The call being served, for the few properties whose value depends on the caller
#: (``SessionManager.currentSession``).
current_call: ContextVar[CallContext] = ContextVar("current_call")
