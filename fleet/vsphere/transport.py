"""vim25 SOAP over HTTP, with pyVmomi's own serializer and deserializer.

A :class:`SoapTransport` owns the HTTP side of one endpoint: a bounded
keep-alive pool (``max_connections``, 256 by default: aiohttp's default of 100
is too few for hundreds of calls in flight), the TLS policy of
``fleet.vsphere.tls``, per-call deadlines and API version negotiation from
``/sdk/vimServiceVersions.xml``. It never stores cookies: the session cookie
``vmware_soap_session`` is sent by hand and the session layer decides which
``Set-Cookie`` to believe (aiohttp's jar would drop it for IP hosts and for
``Secure`` cookies over http, hence ``DummyCookieJar`` there).

Two implementations behave the same and pass the same tests:

- :class:`ProtocolTransport` (default): fleet's own small HTTP/1.1 client on
  asyncio protocols (``fleet.vsphere.http``). It costs less than half the client
  CPU per exchange of aiohttp's general-purpose client; see
  ``benchmarks/bench_client.py``.
- :class:`AiohttpTransport`: ``aiohttp.ClientSession`` with ``DummyCookieJar``.

A URL with the wrong scheme fails in ways that do not say so: an http URL
against an https server gets its connection closed without a reply, an https
URL against a plain http server fails its TLS handshake. Until the first reply
arrives, such a failure is followed by one probe of the other protocol, and if
the server speaks it the error is a :class:`ConfigError` on ``vcenter.url``
saying which scheme to use (the same words from both transports).

:class:`VimStub` is what pyVmomi calls a stub: managed object references
deserialized from replies carry it. It serializes requests with
``SoapStubAdapterBase.SerializeRequest`` (SOAPAction = the quoted version id
from ``VmomiSupport.versionMap``, some of which are hashes) and reads replies
with ``SoapResponseDeserializer``. Calling a method on such a reference
(``await vm.PowerOnVM_Task()``) returns a coroutine that goes through the
session; nothing here ever blocks the event loop.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import aiohttp
import anyio
from pyVmomi import VmomiSupport
from pyVmomi.SoapAdapter import SoapResponseDeserializer, SoapStubAdapterBase
from yarl import URL

from fleet import vmomi
from fleet.errors import ConfigError
from fleet.urls import redact_url, url_problem
from fleet.vsphere.faults import BadReply, HttpStatusError, map_vsphere_faults, translate
from fleet.vsphere.http import (
    ClosedBeforeReply,
    HttpPool,
    TlsHandshakeFailed,
    answers_plain_http,
    speaks_tls,
)
from fleet.vsphere.tls import TlsOptions, client_context, ssl_for

log = logging.getLogger("fleet.vsphere")
vmomi.install()

COOKIE_NAME = "vmware_soap_session"
_SET_COOKIE = re.compile(COOKIE_NAME + r'="?([^";,\s]+)"?')
#: Oldest API fleet speaks: InstantClone_Task arrived with vim25/6.7 (version12).
MIN_VERSION = "vim.version.version12"
_USER_AGENT = "fleet/0.1 (pyVmomi SOAP over aiohttp)"

Invoker = Callable[[Any, Any, list[Any]], Awaitable[Any]]
#: The config key of the endpoint (fleet spec and ``fleet serve`` config alike).
URL_KEY = "vcenter.url"


def _handshake_failed(exc: BaseException) -> bool:
    """A TLS handshake that failed for another reason than the certificate."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return False
    return isinstance(exc, TlsHandshakeFailed | aiohttp.ClientConnectorSSLError)


def _closed_before_reply(exc: BaseException) -> bool:
    """The connection was made, the request sent, and no HTTP reply came back."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return False
    return isinstance(exc, ClosedBeforeReply | aiohttp.ServerDisconnectedError
                      | aiohttp.ClientResponseError | aiohttp.ClientOSError)


class VimStub(SoapStubAdapterBase):  # type: ignore[misc]
    """A pyVmomi stub whose method calls are coroutines routed through ``invoker``."""

    def __init__(self, version: str, invoker: Invoker | None = None) -> None:
        SoapStubAdapterBase.__init__(self, version=version)
        self.requestContext = None
        self._invoker = invoker

    def InvokeMethod(self, mo: Any, info: Any, args: list[Any]) -> Awaitable[Any]:
        if self._invoker is None:
            raise TypeError("this stub only serializes; call through the session")
        return self._invoker(mo, info, list(args))

    def serialize(self, mo: Any, info: Any, args: list[Any]) -> bytes:
        """The request body (raises MethodNotFound if the API version lacks the method)."""
        body: bytes = self.SerializeRequest(mo, info, args)
        return body

    def deserialize(self, body: bytes, result_type: Any) -> Any:
        """A result or, for a fault reply, the fault object (not raised)."""
        return SoapResponseDeserializer(self).Deserialize(body, result_type)

    def __repr__(self) -> str:
        return f"VimStub({self.version})"

    def __deepcopy__(self, memo: Any) -> VimStub:
        return self  # references copied with pyVmomi's deepcopy share the stub


def soap_action(version: str) -> str:
    """The SOAPAction header for a pyVmomi version name (quoted ``urn:vim25/...``)."""
    return f'"urn:{VmomiSupport.GetVersionNamespace(version)}"'


def version_name(api_version: str) -> str | None:
    """pyVmomi's version name for an API version string (``8.0.3.0``), if it knows it."""
    name = VmomiSupport.versionMap.get("vim25/" + api_version)
    return str(name) if name is not None else None


def pick_version(advertised: list[str]) -> str | None:
    """The newest version the server advertises that pyVmomi knows.

    ``advertised`` lists the server's current version first, then its prior ones."""
    known = [name for v in advertised if (name := version_name(v)) is not None]
    if not known:
        return None
    best = known[0]
    for name in known[1:]:
        if VmomiSupport.IsChildVersion(name, best) and name != best:
            best = name
    return best


def parse_versions_xml(text: str) -> list[str]:
    """The vim25 versions in ``vimServiceVersions.xml``: current first, then prior ones."""
    root = ET.fromstring(text)
    for ns in root.iter("namespace"):
        name = (ns.findtext("name") or "").strip()
        if name != "urn:vim25":
            continue
        versions = [(ns.findtext("version") or "").strip()]
        prior = ns.find("priorVersions")
        if prior is not None:
            versions += [(v.text or "").strip() for v in prior.iter("version")]
        return [v for v in versions if v]
    return []


class Reply(NamedTuple):
    status: int
    body: bytes
    session_key: str | None  # from Set-Cookie, if the server sent one


def _session_key(set_cookie: str | None) -> str | None:
    if not set_cookie:
        return None
    match = _SET_COOKIE.search(set_cookie)
    return match.group(1) if match else None


class SoapTransport:
    """HTTP for one vCenter endpoint: pool, TLS, deadlines, negotiation.

    Two implementations with the same behaviour: :class:`ProtocolTransport` (the
    default: fleet's own HTTP/1.1 client, ``fleet.vsphere.http``) and
    :class:`AiohttpTransport` (``aiohttp.ClientSession``). ``post`` returns a 200
    or 500 reply and raises fleet errors for everything else."""

    kind = "base"

    def __init__(self, url: str, *, tls: TlsOptions | None = None, max_connections: int = 256,
                 keepalive_s: float = 15.0, connect_timeout_s: float = 10.0,
                 compress: bool = False) -> None:
        # The same check as a spec's vcenter.url (user info refused: it would be a
        # password in every message that shows the URL); shown redacted.
        problem = url_problem(url)
        if problem:
            raise ConfigError(f"{redact_url(url)!r} {problem}", key=URL_KEY)
        if not url.rstrip("/").endswith("/sdk"):
            url = url.rstrip("/") + "/sdk"
        self.url = url
        parsed = urlsplit(url)
        self.scheme = parsed.scheme
        self.host = parsed.hostname or ""  # never empty: url_problem checked it
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.path = parsed.path or "/sdk"
        self.tls = tls or TlsOptions()
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.compress = compress
        #: set once a reply came back (or a probe found the scheme right): no more probes
        self.scheme_checked = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.url)!r})"

    def _shown(self, scheme: str) -> str:
        """The endpoint with ``scheme``, built from its parts (never any userinfo)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{self.path}"

    async def wrong_scheme(self, exc: BaseException) -> ConfigError | None:
        """After a failure before any reply: a ConfigError if the server speaks the other
        scheme than the URL's, else None (one probe, then never again)."""
        if self.scheme_checked:
            return None
        https = self.scheme == "https"
        if not (_handshake_failed(exc) if https else _closed_before_reply(exc)):
            return None
        self.scheme_checked = True
        timeout_s = min(self.connect_timeout_s, 5.0)
        where = f"{self._shown(self.scheme)}"
        if https:
            if await answers_plain_http(self.host, self.port, timeout_s):
                return ConfigError(
                    f"{where}: the TLS handshake failed and the server answers plain HTTP: it "
                    f"looks like a plain http server, not https; use {self._shown('http')}",
                    key=URL_KEY)
        elif await speaks_tls(self.host, self.port, timeout_s):
            return ConfigError(
                f"{where}: the server closed the connection without a reply and speaks TLS: it "
                f"looks like an https server; use {self._shown('https')}", key=URL_KEY)
        return None

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def get(self, path: str, timeout_s: float | None) -> tuple[int, bytes]:
        raise NotImplementedError

    async def post(self, body: bytes, *, action: str, session_key: str | None,
                   timeout_s: float | None, method: str, obj: str | None = None) -> Reply:
        raise NotImplementedError

    async def negotiate(self, timeout_s: float = 30.0) -> str | None:
        """The pyVmomi version name to speak, from ``/sdk/vimServiceVersions.xml``.

        None when the file is missing or lists nothing pyVmomi knows (the caller
        then falls back to ``about.apiVersion``)."""
        with map_vsphere_faults(method="vimServiceVersions.xml"):
            status, body = await self.get(self.path + "/vimServiceVersions.xml", timeout_s)
            if status == 404:
                return None
            if status != 200:
                raise HttpStatusError(status)
        try:
            advertised = parse_versions_xml(body.decode("utf-8", "replace"))
        except ET.ParseError:
            return None
        return pick_version(advertised)


class ProtocolTransport(SoapTransport):
    """SOAP over fleet's own HTTP/1.1 client (``fleet.vsphere.http``)."""

    kind = "protocol"

    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        self._pool: HttpPool | None = None
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = (self.url.startswith("https:") and self.port == 443) or \
            (self.url.startswith("http:") and self.port == 80)
        self._host_header = host if default else f"{host}:{self.port}"
        self._heads: dict[str, bytes] = {}

    async def open(self) -> None:
        if self._pool is not None:
            return
        # Loading the system's CA bundle reads files: not on the event loop.
        context, pinned = await anyio.to_thread.run_sync(client_context, self.tls, self.url)
        self._pool = HttpPool(self.host, self.port, ssl_context=context, pinned_sha256=pinned,
                              limit=self.max_connections, keepalive_s=self.keepalive_s,
                              connect_timeout_s=self.connect_timeout_s)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def pool(self) -> HttpPool:
        if self._pool is None:
            raise RuntimeError("the transport is not open")
        return self._pool

    def _head(self, action: str) -> bytes:
        head = self._heads.get(action)
        if head is None:
            encoding = "gzip, deflate" if self.compress else "identity"
            head = self._heads[action] = (
                f"POST {self.path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
                f"User-Agent: {_USER_AGENT}\r\nAccept-Encoding: {encoding}\r\n"
                f"Content-Type: text/xml; charset=utf-8\r\nSOAPAction: {action}\r\n"
            ).encode("latin-1")
        return head

    async def get(self, path: str, timeout_s: float | None) -> tuple[int, bytes]:
        request = (f"GET {path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
                   f"User-Agent: {_USER_AGENT}\r\nAccept-Encoding: identity\r\n\r\n")
        try:
            response = await self.pool.request(request.encode("latin-1"), timeout_s)
        except Exception as exc:
            wrong = await self.wrong_scheme(exc)
            if wrong is not None:
                raise wrong from exc
            raise
        self.scheme_checked = True
        return response.status, response.body

    async def post(self, body: bytes, *, action: str, session_key: str | None,
                   timeout_s: float | None, method: str, obj: str | None = None) -> Reply:
        cookie = f'Cookie: {COOKIE_NAME}="{session_key}"\r\n' if session_key else ""
        data = b"".join((self._head(action),
                         f"{cookie}Content-Length: {len(body)}\r\n\r\n".encode("latin-1"),
                         body))
        try:
            response = await self.pool.request(data, timeout_s)
        except Exception as exc:
            wrong = await self.wrong_scheme(exc)
            raise (wrong or translate(exc, method=method, obj=obj)) from exc
        if not self.scheme_checked:
            self.scheme_checked = True
        status = response.status
        if status != 200 and status != 500:
            raise translate(HttpStatusError(status, response.reason), method=method, obj=obj)
        payload = response.body
        if status == 500 and not payload.lstrip().startswith(b"<"):
            raise translate(BadReply(f"HTTP 500 without a SOAP body ({len(payload)} bytes)"),
                            method=method, obj=obj)
        return Reply(status, payload, _session_key(response.headers.get("set-cookie")))


class AiohttpTransport(SoapTransport):
    """SOAP over ``aiohttp.ClientSession`` (cookies sent by hand, ``DummyCookieJar``)."""

    kind = "aiohttp"

    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        self._http: aiohttp.ClientSession | None = None
        self._url = URL(self.url)
        self._timeouts: dict[float | None, aiohttp.ClientTimeout] = {}

    async def open(self) -> None:
        if self._http is not None:
            return
        ssl_param = await anyio.to_thread.run_sync(ssl_for, self.tls, self.url)
        # Abort TLS transports aiohttp closed itself (a thumbprint mismatch) when the
        # connector closes, on the Python versions that would otherwise leak them.
        cleanup = bool(getattr(aiohttp.connector, "NEEDS_CLEANUP_CLOSED", False))
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
                                         keepalive_timeout=self.keepalive_s, ssl=ssl_param,
                                         enable_cleanup_closed=cleanup)
        headers = {"User-Agent": _USER_AGENT,
                   "Accept-Encoding": "gzip, deflate" if self.compress else "identity"}
        self._http = aiohttp.ClientSession(connector=connector,
                                           cookie_jar=aiohttp.DummyCookieJar(),
                                           headers=headers, skip_auto_headers=("Content-Type",))

    async def close(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("the transport is not open")
        return self._http

    def _timeout(self, timeout_s: float | None) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(timeout_s)
        if timeout is None:
            timeout = self._timeouts[timeout_s] = aiohttp.ClientTimeout(
                total=timeout_s, sock_connect=self.connect_timeout_s)
        return timeout

    async def get(self, path: str, timeout_s: float | None) -> tuple[int, bytes]:
        try:
            async with self.http.get(self._url.with_path(path),
                                     timeout=self._timeout(timeout_s)) as resp:
                body = await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            wrong = await self.wrong_scheme(exc)
            if wrong is not None:
                raise wrong from exc
            raise
        self.scheme_checked = True
        return resp.status, body

    async def post(self, body: bytes, *, action: str, session_key: str | None,
                   timeout_s: float | None, method: str, obj: str | None = None) -> Reply:
        headers = {"SOAPAction": action, "Content-Type": "text/xml; charset=utf-8"}
        if session_key is not None:
            headers["Cookie"] = f'{COOKIE_NAME}="{session_key}"'
        with map_vsphere_faults(method=method, obj=obj):
            try:
                async with self.http.post(self._url, data=body, headers=headers,
                                          timeout=self._timeout(timeout_s)) as resp:
                    data = await resp.read()
            except (aiohttp.ClientError, OSError) as exc:
                wrong = await self.wrong_scheme(exc)
                if wrong is not None:
                    raise wrong from exc
                raise
            if not self.scheme_checked:
                self.scheme_checked = True
            status = resp.status
            if status not in (200, 500):
                raise HttpStatusError(status, resp.reason)
            cookie = resp.headers.get("Set-Cookie")
            if status == 500 and not data.lstrip().startswith(b"<"):
                raise BadReply(f"HTTP 500 without a SOAP body ({len(data)} bytes)")
        return Reply(status, data, _session_key(cookie))


TRANSPORTS: dict[str, type[SoapTransport]] = {"protocol": ProtocolTransport,
                                              "aiohttp": AiohttpTransport}


def make_transport(url: str, kind: str = "protocol", **kw: Any) -> SoapTransport:
    """A transport by name: ``protocol`` (default) or ``aiohttp``."""
    try:
        cls = TRANSPORTS[kind]
    except KeyError:
        raise ConfigError(f"{kind!r} is not a transport (protocol, aiohttp)",
                          key="transport") from None
    return cls(url, **kw)
