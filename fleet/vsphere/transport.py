"""vim25 SOAP over aiohttp, with pyVmomi's own serializer and deserializer.

:class:`SoapTransport` owns the HTTP side: one ``aiohttp.ClientSession`` with a
bounded keep-alive pool (``max_connections``; aiohttp's default of 100 is too
few for hundreds of calls in flight), the TLS policy of ``fleet.vsphere.tls``,
per-call deadlines and API version negotiation from
``/sdk/vimServiceVersions.xml``. It never stores cookies itself: aiohttp's jar
drops cookies for IP hosts and ``Secure`` cookies over http, so the session
cookie is sent by hand (``DummyCookieJar``) and the session layer decides which
``Set-Cookie`` to believe.

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
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from pyVmomi import VmomiSupport
from pyVmomi.SoapAdapter import SoapResponseDeserializer, SoapStubAdapterBase

from fleet.vsphere.faults import BadReply, HttpStatusError, map_vsphere_faults
from fleet.vsphere.tls import TlsOptions, ssl_for

log = logging.getLogger("fleet.vsphere")

COOKIE_NAME = "vmware_soap_session"
_SET_COOKIE = re.compile(COOKIE_NAME + r'="?([^";,\s]+)"?')
#: Oldest API fleet speaks: InstantClone_Task arrived with vim25/6.7 (version12).
MIN_VERSION = "vim.version.version12"
_USER_AGENT = "fleet/0.1 (pyVmomi SOAP over aiohttp)"

Invoker = Callable[[Any, Any, list[Any]], Awaitable[Any]]


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
        return bytes(self.SerializeRequest(mo, info, args))

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


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    session_key: str | None  # from Set-Cookie, if the server sent one


class SoapTransport:
    """HTTP for one vCenter endpoint: pool, TLS, deadlines, negotiation."""

    def __init__(self, url: str, *, tls: TlsOptions | None = None, max_connections: int = 256,
                 keepalive_s: float = 15.0, connect_timeout_s: float = 10.0,
                 compress: bool = True) -> None:
        if not url.rstrip("/").endswith("/sdk"):
            url = url.rstrip("/") + "/sdk"
        self.url = url
        self.base_url = url.rsplit("/sdk", 1)[0]
        self.tls = tls or TlsOptions()
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.compress = compress
        self._http: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"SoapTransport({self.url!r})"

    async def open(self) -> None:
        if self._http is not None:
            return
        ssl_param = ssl_for(self.tls, self.url)
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
                                         keepalive_timeout=self.keepalive_s, ssl=ssl_param)
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
        return aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.connect_timeout_s)

    async def negotiate(self, timeout_s: float = 30.0) -> str | None:
        """The pyVmomi version name to speak, from ``/sdk/vimServiceVersions.xml``.

        None when the file is missing or lists nothing pyVmomi knows (the caller
        then falls back to ``about.apiVersion``)."""
        with map_vsphere_faults(method="vimServiceVersions.xml"):
            async with self.http.get(self.url + "/vimServiceVersions.xml",
                                     timeout=self._timeout(timeout_s)) as resp:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise HttpStatusError(resp.status, resp.reason)
                text = await resp.text()
        try:
            advertised = parse_versions_xml(text)
        except ET.ParseError:
            return None
        return pick_version(advertised)

    async def post(self, body: bytes, *, action: str, session_key: str | None,
                   timeout_s: float | None, method: str, obj: str | None = None) -> Reply:
        """POST one SOAP envelope; a 200 or 500 reply is returned, anything else raised."""
        headers = {"SOAPAction": action, "Content-Type": "text/xml; charset=utf-8"}
        if session_key is not None:
            headers["Cookie"] = f'{COOKIE_NAME}="{session_key}"'
        with map_vsphere_faults(method=method, obj=obj):
            async with self.http.post(self.url, data=body, headers=headers,
                                      timeout=self._timeout(timeout_s)) as resp:
                data = await resp.read()
                status = resp.status
                if status not in (200, 500):
                    raise HttpStatusError(status, resp.reason)
                cookie = resp.headers.get("Set-Cookie")
                if status == 500 and not data.lstrip().startswith(b"<"):
                    raise BadReply(f"HTTP 500 without a SOAP body ({len(data)} bytes)")
        key = None
        if cookie:
            match = _SET_COOKIE.search(cookie)
            key = match.group(1) if match else None
        return Reply(status, data, key)


class CallTimer:
    """``time.perf_counter`` around a call, for observers."""

    __slots__ = ("start",)

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start
