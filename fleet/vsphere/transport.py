"""vim25 SOAP over aiohttp, with pyVmomi's own serializer and deserializer.

A :class:`SoapTransport` owns the HTTP side of one endpoint, on one
``aiohttp.ClientSession`` kept for the transport's life (docs/transport.md):

- a bounded keep-alive pool (``max_connections``, 256 by default: aiohttp's
  default of 100 is too few for hundreds of calls in flight);
- the TLS policy of ``fleet.vsphere.tls`` (a pinned SHA-256 thumbprint is
  aiohttp's own ``Fingerprint``);
- the proxy from ``HTTPS_PROXY``/``HTTP_PROXY`` and ``NO_PROXY``, only when the
  spec says ``vcenter.use_env_proxy = true``; looked up once, at ``open``;
- per-call deadlines, and a cap on every reply body *after* decompression
  (``max_reply_bytes``), so a broken or hostile server cannot make the client
  allocate without bound;
- API version negotiation from ``/sdk/vimServiceVersions.xml``;
- the translation of every transport failure into ``fleet.errors``
  (:func:`transport_error`): nothing aiohttp, ssl or socket raises leaves this
  module untranslated. vim faults are translated in ``fleet.vsphere.faults``.

It never stores cookies: the session cookie ``vmware_soap_session`` is sent by
hand and the session layer decides which ``Set-Cookie`` to believe (aiohttp's
jar would drop it for IP hosts and for ``Secure`` cookies over http, hence
``DummyCookieJar``). Request headers are built once per (SOAPAction, cookie),
not per call.

A URL with the wrong scheme fails in ways that do not say so: an http URL
against an https server gets its connection closed without a reply, an https
URL against a plain http server fails its TLS handshake. Until the first reply
arrives, such a failure is followed by one probe of the other protocol, and if
the server speaks it the error is a :class:`ConfigError` on ``vcenter.url``
saying which scheme to use.

:class:`VimStub` is what pyVmomi calls a stub: managed object references
deserialized from replies carry it. It serializes requests with
``SoapStubAdapterBase.SerializeRequest`` (SOAPAction = the quoted version id
from ``VmomiSupport.versionMap``, some of which are hashes) and reads replies
with ``SoapResponseDeserializer``. Calling a method on such a reference
(``await vm.PowerOnVM_Task()``) returns a coroutine that goes through the
session; nothing here ever blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

import aiohttp
import anyio
from multidict import CIMultiDict
from pyVmomi import VmomiSupport
from pyVmomi.SoapAdapter import SoapResponseDeserializer, SoapStubAdapterBase
from yarl import URL

from fleet import vmomi
from fleet.errors import (
    ConfigError,
    ConnectionFailed,
    NotDelivered,
    RequestTimeout,
    TlsVerificationFailed,
    VSphereError,
)
from fleet.urls import redact_url, url_problem
from fleet.version import __version__
from fleet.vsphere.faults import where_prefix
from fleet.vsphere.tls import TlsOptions, ssl_for, unverified_context

log = logging.getLogger("fleet.vsphere")
vmomi.install()

COOKIE_NAME = "vmware_soap_session"
_SET_COOKIE = re.compile(COOKIE_NAME + r'="?([^";,\s]+)"?')
#: Oldest API fleet speaks: InstantClone_Task arrived with vim25/6.7 (version12).
MIN_VERSION = "vim.version.version12"
USER_AGENT = f"fleet/{__version__}"
#: The largest reply body fleet reads, after decompression (docs/transport.md).
MAX_REPLY_BYTES = 128 * 1024 * 1024

Invoker = Callable[[Any, Any, list[Any]], Awaitable[Any]]
#: The config keys of the endpoint (fleet spec and ``fleet serve`` config alike).
URL_KEY = "vcenter.url"
PROXY_KEY = "vcenter.use_env_proxy"


class HttpStatusError(Exception):
    """An HTTP reply that is neither a SOAP result (200) nor a SOAP fault (500)."""

    def __init__(self, status: int, reason: str | None = None) -> None:
        self.status = status
        self.reason = reason or ""
        super().__init__(f"HTTP {status} {self.reason}".strip())


class BadReply(Exception):
    """A reply whose body is not a vim25 SOAP message we can read."""


def transport_error(exc: BaseException, *, method: str | None = None, obj: str | None = None,
                    endpoint: str | None = None) -> VSphereError:
    """The fleet error for a failure of the HTTP exchange itself (the one place).

    :class:`NotDelivered` only where vCenter cannot have run the call: no
    connection was made (refused, TLS, proxy, no free connection in time) or
    HTTP 503. Everything after the request may have been sent is a
    :class:`ConnectionFailed` or :class:`RequestTimeout` (see the retry rule in
    ``fleet.vsphere.session``). ``endpoint`` (``host:port``) is named where the
    failure is about reaching it. No request body, header or cookie is quoted."""
    if isinstance(exc, VSphereError):
        return exc
    where = where_prefix(method, obj)
    kw: dict[str, Any] = {"method": method, "obj": obj}
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return TlsVerificationFailed(
            f"{where}the server certificate's SHA-256 thumbprint does not match the one pinned "
            "in vcenter.thumbprint", **kw)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError):
        cert_error = getattr(exc, "certificate_error", exc)
        detail = getattr(cert_error, "verify_message", None) or type(cert_error).__name__
        return TlsVerificationFailed(
            f"{where}the server certificate is not trusted ({detail}); give its CA file "
            "(vcenter.ca_file) or pin its SHA-256 thumbprint (vcenter.thumbprint)", **kw)
    if isinstance(exc, HttpStatusError):
        if exc.status == 503:
            return NotDelivered(f"{where}HTTP 503 {exc.reason}".rstrip(), **kw)
        return ConnectionFailed(f"{where}HTTP {exc.status} {exc.reason}".rstrip(), **kw)
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        # The proxy refused the tunnel: nothing reached vCenter.
        return NotDelivered(f"{where}the proxy refused the connection (HTTP {exc.status} "
                            f"{exc.message})".rstrip(), **kw)
    if isinstance(exc, aiohttp.ClientConnectorError):
        # host and port of the connection that failed (the proxy's, for a proxy)
        host = f"[{exc.host}]" if ":" in exc.host else exc.host
        what = "the proxy " if isinstance(exc, aiohttp.ClientProxyConnectionError) else ""
        return NotDelivered(f"{where}cannot connect to {what}{host}:{exc.port}: "
                            f"{exc.os_error or type(exc).__name__}", **kw)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        to = f" to {endpoint}" if endpoint else ""
        return NotDelivered(f"{where}no connection{to} before the deadline", **kw)
    if isinstance(exc, TimeoutError):
        return RequestTimeout(f"{where}no reply before the deadline", **kw)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return ConnectionFailed(f"{where}the server closed the connection without a reply",
                                **kw)
    if isinstance(exc, BadReply):
        return ConnectionFailed(f"{where}unreadable reply ({exc})", **kw)
    if isinstance(exc, aiohttp.ClientError | OSError):
        return ConnectionFailed(f"{where}{type(exc).__name__}: {exc}", **kw)
    return ConnectionFailed(f"{where}{type(exc).__name__}: {exc}", **kw)


def _handshake_failed(exc: BaseException) -> bool:
    """A TLS handshake that failed for another reason than the certificate."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return False
    return isinstance(exc, aiohttp.ClientConnectorSSLError)


def _closed_before_reply(exc: BaseException) -> bool:
    """The connection was made, the request sent, and no HTTP reply came back."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return False
    return isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientResponseError
                      | aiohttp.ClientOSError)


async def speaks_tls(host: str, port: int, timeout_s: float) -> bool:
    """True if a TLS handshake with ``host:port`` completes (the certificate unchecked:
    this only asks which protocol the server speaks, and nothing is sent over it)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(
                asyncio.Protocol, host, port, ssl=unverified_context(), server_hostname=host)
    except (OSError, TimeoutError):
        return False
    transport.abort()
    return True


async def answers_plain_http(host: str, port: int, timeout_s: float) -> bool:
    """True if ``host:port`` answers a plaintext ``HEAD /`` with an HTTP status line."""
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode("latin-1"))
            return (await reader.readexactly(5)) == b"HTTP/"
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        if writer is not None:
            writer.transport.abort()


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


def session_key_of(set_cookie: str | None) -> str | None:
    """The session key a ``Set-Cookie`` header sets, if any."""
    if not set_cookie:
        return None
    match = _SET_COOKIE.search(set_cookie)
    return match.group(1) if match else None


def cookie_header(session_key: str) -> str:
    """The ``Cookie`` header that presents ``session_key``."""
    return f'{COOKIE_NAME}="{session_key}"'


def check_reply(status: int, body: bytes, *, method: str, obj: str | None) -> None:
    """Raise the fleet error for a reply that is neither a SOAP result (200) nor a SOAP
    fault (500 with an XML body)."""
    if status != 200 and status != 500:
        raise transport_error(HttpStatusError(status), method=method, obj=obj)
    if status == 500 and not body.lstrip().startswith(b"<"):
        raise transport_error(BadReply(f"HTTP 500 without a SOAP body ({len(body)} bytes)"),
                              method=method, obj=obj)


def version_of_reply(status: int, body: bytes) -> str | None:
    """The version to speak from a ``GET /sdk/vimServiceVersions.xml`` reply: None when
    the file is missing or lists nothing pyVmomi knows."""
    if status == 404:
        return None
    if status != 200:
        raise transport_error(HttpStatusError(status), method="vimServiceVersions.xml")
    try:
        advertised = parse_versions_xml(body.decode("utf-8", "replace"))
    except ET.ParseError:
        return None
    return pick_version(advertised)


class Transport(Protocol):
    """What a session needs of a transport: :class:`SoapTransport` over HTTP, or one
    that hands the same bytes to a simulator in the same process
    (``fleet.testing.loopback``). ``post`` returns a 200 or 500 reply and raises
    fleet errors for everything else (docs/transport.md)."""

    url: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def negotiate(self, timeout_s: float = 30.0) -> str | None: ...

    async def post(self, body: bytes, *, action: str, session_key: str | None,
                   timeout_s: float | None, method: str, obj: str | None = None) -> Reply: ...


def env_proxy(url: str) -> URL | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY`` for https,
    ``HTTP_PROXY`` for http, either case), or None if there is none or ``NO_PROXY``
    exempts the host. Only plain-http proxies: the tunnel to vCenter is TLS anyway."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    try:
        found = URL(proxy if "://" in proxy else "http://" + proxy)
    except ValueError:
        found = None
    if found is None or found.scheme != "http" or not found.host:
        raise ConfigError(f"the environment's {parts.scheme} proxy {redact_url(proxy)!r} is not "
                          "an http://host:port URL (fleet tunnels to vCenter through an http "
                          "proxy only)", key=PROXY_KEY)
    return found


class SoapTransport:
    """HTTP for one vCenter endpoint on one ``aiohttp.ClientSession``; see the module
    docstring. ``post`` returns a 200 or 500 reply and raises fleet errors for
    everything else."""

    def __init__(self, url: str, *, tls: TlsOptions | None = None, max_connections: int = 256,
                 keepalive_s: float = 15.0, connect_timeout_s: float = 10.0,
                 compress: bool = False, use_env_proxy: bool = False,
                 max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
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
        self.use_env_proxy = use_env_proxy
        self.max_reply_bytes = max_reply_bytes
        #: the proxy in use (from the environment, at ``open``), if any
        self.proxy: URL | None = None
        #: set once a reply came back (or a probe found the scheme right): no more probes
        self.scheme_checked = False
        self._http: aiohttp.ClientSession | None = None
        self._url = URL(self.url)
        self._timeouts: dict[float | None, aiohttp.ClientTimeout] = {}
        self._headers: dict[tuple[str, str | None], CIMultiDict[str]] = {}
        self._encoding = "gzip, deflate" if compress else "identity"
        self._endpoint = f"[{self.host}]:{self.port}" if ":" in self.host else \
            f"{self.host}:{self.port}"
        self._proxy_headers: CIMultiDict[str] | None = None
        self._get_headers = CIMultiDict((("User-Agent", USER_AGENT),
                                         ("Accept-Encoding", self._encoding)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.url)!r})"

    def _shown(self, scheme: str) -> str:
        """The endpoint with ``scheme``, built from its parts (never any userinfo)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{self.path}"

    # -- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        if self._http is not None:
            return
        # Loading the system's CA bundle (and the environment's proxy) reads files:
        # not on the event loop.
        ssl_param = await anyio.to_thread.run_sync(ssl_for, self.tls, self.url)
        if self.use_env_proxy:
            self.proxy = await anyio.to_thread.run_sync(env_proxy, self.url)
            if self.proxy is not None:
                log.info("reaching %s through the proxy %s (vcenter.use_env_proxy)",
                         redact_url(self.url), redact_url(str(self.proxy)))
                # The CONNECT says who is asking too (not aiohttp's default agent).
                self._proxy_headers = CIMultiDict({"User-Agent": USER_AGENT})
                if self.proxy.user is not None:
                    # Credentials in HTTPS_PROXY go to the proxy only, as Proxy-Authorization.
                    self._proxy_headers["Proxy-Authorization"] = aiohttp.encode_basic_auth(
                        self.proxy.user, self.proxy.password or "")
                    self.proxy = self.proxy.with_user(None)
        # Abort TLS transports aiohttp closed itself (a thumbprint mismatch) when the
        # connector closes, on the Python versions that would otherwise leak them.
        cleanup = bool(getattr(aiohttp.connector, "NEEDS_CLEANUP_CLOSED", False))
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
                                         keepalive_timeout=self.keepalive_s, ssl=ssl_param,
                                         enable_cleanup_closed=cleanup)
        # trust_env stays off: it would look the proxy up (in a thread) and read
        # ~/.netrc for vCenter credentials on every request; the proxy is found once above.
        self._http = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), proxy=self.proxy,
            skip_auto_headers=("Accept", "Content-Type"), auto_decompress=self.compress)

    async def close(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("the transport is not open")
        return self._http

    # -- exchanges -------------------------------------------------------------------
    def _timeout(self, timeout_s: float | None) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(timeout_s)
        if timeout is None:
            timeout = self._timeouts[timeout_s] = aiohttp.ClientTimeout(
                total=timeout_s, sock_connect=self.connect_timeout_s)
        return timeout

    def _post_headers(self, action: str, session_key: str | None) -> CIMultiDict[str]:
        key = (action, session_key)
        headers = self._headers.get(key)
        if headers is None:
            if len(self._headers) > 16:
                self._headers.clear()  # old session keys
            headers = self._headers[key] = CIMultiDict(
                (("User-Agent", USER_AGENT), ("Accept-Encoding", self._encoding),
                 ("Content-Type", "text/xml; charset=utf-8"), ("SOAPAction", action)))
            if session_key is not None:
                headers["Cookie"] = cookie_header(session_key)
        return headers

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        """The body, never more than ``max_reply_bytes`` of it (after decompression)."""
        cap = self.max_reply_bytes
        length = resp.content_length
        if length is not None and length > cap:
            raise BadReply(self._too_large(f"announces {length} bytes"))
        if not self.compress:
            encoding = resp.headers.get("Content-Encoding", "identity").lower()
            if encoding != "identity":
                raise BadReply(f"{encoding}-encoded, though fleet asked for identity")
            if length is not None:
                return await resp.read()  # aiohttp reads exactly Content-Length bytes
        # Chunked, close-delimited or compressed: count as it arrives.
        chunks = []
        total = 0
        async for chunk in resp.content.iter_any():
            total += len(chunk)
            if total > cap:
                raise BadReply(self._too_large(f"has more than {cap} bytes"))
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, what: str) -> str:
        return (f"the reply from {self._shown(self.scheme)} {what}; the cap is "
                f"{self.max_reply_bytes} bytes (max_reply_bytes)")

    async def _exchange(self, method: str, obj: str | None, request: Any) -> tuple[
            aiohttp.ClientResponse, bytes]:
        """Run ``request`` (an aiohttp request context) and read its reply; every failure
        becomes its fleet error here, or a ConfigError on ``vcenter.url``."""
        try:
            async with request as resp:
                try:
                    body = await self._read(resp)
                except BadReply:
                    resp.close()  # drop the connection: the rest of the body is unread
                    raise
        except (aiohttp.ClientError, OSError, TimeoutError, BadReply) as exc:
            wrong = await self.wrong_scheme(exc)
            raise (wrong or transport_error(exc, method=method, obj=obj,
                                            endpoint=self._endpoint)) from exc
        self.scheme_checked = True
        return resp, body

    async def get(self, path: str, timeout_s: float | None) -> tuple[int, bytes]:
        resp, body = await self._exchange(
            path.rsplit("/", 1)[-1], None,
            self.http.get(self._url.with_path(path), timeout=self._timeout(timeout_s),
                          headers=self._get_headers, proxy_headers=self._proxy_headers))
        return resp.status, body

    async def post(self, body: bytes, *, action: str, session_key: str | None,
                   timeout_s: float | None, method: str, obj: str | None = None) -> Reply:
        resp, data = await self._exchange(
            method, obj, self.http.post(self._url, data=body,
                                        headers=self._post_headers(action, session_key),
                                        timeout=self._timeout(timeout_s),
                                        proxy_headers=self._proxy_headers))
        status = resp.status
        if status != 200 and status != 500:
            raise transport_error(HttpStatusError(status, resp.reason), method=method, obj=obj)
        check_reply(status, data, method=method, obj=obj)
        return Reply(status, data, session_key_of(resp.headers.get("Set-Cookie")))

    # -- the wrong scheme, and the API version -----------------------------------------
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

    async def negotiate(self, timeout_s: float = 30.0) -> str | None:
        """The pyVmomi version name to speak, from ``/sdk/vimServiceVersions.xml``.

        None when the file is missing or lists nothing pyVmomi knows (the caller
        then falls back to ``about.apiVersion``)."""
        status, body = await self.get(self.path + "/vimServiceVersions.xml", timeout_s)
        return version_of_reply(status, body)
