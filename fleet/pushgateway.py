"""A one-off run's metrics, pushed to a Prometheus Pushgateway (``fleet provision
--pushgateway URL``): Prometheus' way for batch jobs, which end before a scrape
would reach them. See docs/pushgateway.md.

The run's whole registry is pushed (``PUT``, replacing the group) under the
grouping key ``job``/``fleet``, every :data:`PUSH_INTERVAL_S` during the run and
once more when it ends, whether it completed, failed or was cancelled. Pushing
never fails or holds up the run: each push gives up after :data:`PUSH_TIMEOUT_S`,
and a push that fails is a warning on stderr. The pushing itself is
prometheus_client's (:func:`prometheus_client.push_to_gateway`), in a worker
thread.

A user and password in the URL (``https://user:pass@host:9091``) are sent as HTTP
basic authentication and never shown: messages show the URL as
:func:`fleet.urls.redact_url` does.
"""

from __future__ import annotations

import http.client
import logging
import threading
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import anyio
from prometheus_client import CollectorRegistry, push_to_gateway
from prometheus_client.exposition import basic_auth_handler, default_handler

from fleet.errors import ConfigError
from fleet.urls import redact_url, url_problem

log = logging.getLogger(__name__)

#: the ``job`` label of what a run pushes
JOB = "fleet"
#: seconds between two pushes during a run
PUSH_INTERVAL_S = 5.0
#: a push that takes longer is given up (connect, and each read, of the request)
PUSH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Gateway:
    """Where to push: ``url`` without user info; the credentials apart."""

    url: str
    shown: str  # the URL as messages show it (user info as ***)
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_gateway(text: str, key: str = "--pushgateway") -> Gateway:
    """The Pushgateway at ``text`` (``http(s)://[user:pass@]host[:port][/prefix]``);
    a ConfigError naming ``key`` otherwise."""
    shown = redact_url(text)
    if text.split("://", 1)[0] not in ("http", "https") or "://" not in text:
        raise ConfigError(f"{shown!r} is not an http(s) URL like http://127.0.0.1:9091",
                          key=key)
    if "?" in text or "#" in text:
        raise ConfigError(f"{shown!r} has a query or fragment; give the Pushgateway's base "
                          "URL only (in a password, write ? as %3F and # as %23)", key=key)
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ConfigError(f"{shown!r} cannot be parsed as a URL", key=key) from None
    userinfo, at, hostport = parts.netloc.rpartition("@")
    bare = urlunsplit((parts.scheme, hostport, parts.path.rstrip("/"), "", ""))
    if "@" in bare:  # a "/" in the password ended the host early
        raise ConfigError(f"{shown!r} cannot be read: in the user and password, write / as "
                          "%2F and @ as %40", key=key)
    problem = url_problem(bare)
    if problem is not None:
        raise ConfigError(f"{shown!r} {problem}", key=key)
    if not at:
        return Gateway(bare, shown)
    user, colon, password = userinfo.partition(":")
    if not user:
        raise ConfigError(f"{shown!r} has user info without a user name", key=key)
    return Gateway(bare, shown, unquote(user), unquote(password) if colon else "")


class Pusher:
    """Pushes ``registry`` to ``gateway`` as job :data:`JOB` with ``grouping_key``."""

    def __init__(self, gateway: Gateway, registry: CollectorRegistry,
                 grouping_key: dict[str, str], *, warn: Callable[[str], Any],
                 interval_s: float = PUSH_INTERVAL_S, timeout_s: float = PUSH_TIMEOUT_S,
                 job: str = JOB) -> None:
        self.gateway = gateway
        self.registry = registry
        self.grouping_key = dict(grouping_key)
        self.job = job
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._warn = warn
        # One push at a time, in order: a push abandoned at the end of the run (its
        # thread still waiting for the gateway) must not land after the final one.
        self._one_at_a_time = threading.Lock()
        self._failing: str | None = None  # why the last periodic push failed
        self.pushed = 0  # pushes the gateway accepted

    def describe(self) -> str:
        labels = ", ".join(f"{k}={v}" for k, v in {"job": self.job,
                                                   **self.grouping_key}.items())
        return f"{self.gateway.shown} ({labels})"

    def _handler(self, url: str, method: str, timeout: float | None,
                 headers: list[tuple[str, str]], data: bytes) -> Callable[[], None]:
        if self.gateway.username is None:
            return default_handler(url, method, timeout, headers, data)
        return basic_auth_handler(url, method, timeout, headers, data,
                                  self.gateway.username, self.gateway.password)

    def push_blocking(self) -> None:
        """One push, in the calling thread; raises what the request raised."""
        if not self._one_at_a_time.acquire(timeout=self.timeout_s):
            raise TimeoutError(f"an earlier push was still waiting after "
                               f"{self.timeout_s:g} s")
        try:
            push_to_gateway(self.gateway.url, job=self.job, registry=self.registry,
                            grouping_key=self.grouping_key, timeout=self.timeout_s,
                            handler=self._handler)
        finally:
            self._one_at_a_time.release()

    async def push(self) -> str | None:
        """Push now, in a worker thread; None when the gateway took it, else why not.
        Cancelling it abandons the thread (it ends at its own timeout)."""
        log.debug("pushing metrics to %s", self.describe())
        why: str | None = f"no answer within {2 * self.timeout_s + 1:g} s"
        # The lock's wait and the request's, each bounded by the timeout.
        with anyio.move_on_after(2 * self.timeout_s + 1):
            try:
                await anyio.to_thread.run_sync(self.push_blocking, abandon_on_cancel=True)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                why = self._why(exc)
            else:
                why = None
                self.pushed += 1
        return why

    async def run(self) -> None:
        """Push every ``interval_s`` until cancelled; say when pushing starts failing
        and when it works again, not at every failed push."""
        while True:
            await anyio.sleep(self.interval_s)
            why = await self.push()
            if why is not None and why != self._failing:
                self._warn(f"warning: cannot push metrics to {self.gateway.shown}: {why}; "
                           f"the run goes on (trying again every {self.interval_s:g} s)")
            elif why is None and self._failing is not None:
                self._warn(f"pushing metrics to {self.gateway.shown} works again")
            self._failing = why

    async def push_final(self) -> None:
        """The push at the end of the run, however it ended: shielded from the run's
        cancellation, bounded by the timeout, a warning if it fails."""
        with anyio.CancelScope(shield=True):
            why = await self.push()
        if why is not None:
            self._warn(f"warning: the run's metrics were not pushed to {self.gateway.shown}: "
                       f"{why}")
        else:
            log.info("pushed the run's final metrics to %s", self.describe())

    def _why(self, exc: BaseException) -> str:
        if isinstance(exc, urllib.error.HTTPError):
            text = f"it answered HTTP {exc.code} {exc.reason}"
        else:
            reason: Any = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, TimeoutError):
                text = str(reason) if str(reason) not in ("", "timed out") \
                    else f"no answer within {self.timeout_s:g} s"
            elif isinstance(reason, OSError) and reason.strerror:
                text = reason.strerror
            else:
                text = str(reason) or type(reason).__name__
        # Belt and braces: no library's message may carry the password out.
        password = self.gateway.password
        return text.replace(password, "***") if password else text
