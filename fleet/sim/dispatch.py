"""The simulator's SOAP endpoint without HTTP: request bytes in, reply bytes out.

:class:`SoapEndpoint` is what ``POST /sdk`` and ``GET /sdk/vimServiceVersions.xml``
do, as plain methods: a SOAP request (body, ``SOAPAction``, ``Cookie``) becomes a
:class:`SoapReply` (status, headers with the ``Set-Cookie`` of a new session, body).
The aiohttp server (``fleet.sim.server``) is a thin wrapper over it, and so is any
transport that hands requests to the simulator without sockets (``fleet.testing``):
both see the same bytes, the same session cookies and the same injected faults.

HTTP-level faults are told, not done: a reply whose ``drop`` is set must not be
answered; the connection is dropped instead (``reset``: before any work;
``lost_reply``: after the work was done). The server resets the TCP connection; a
socket-less transport raises what a client would see of that reset.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pyVmomi import VmomiSupport, vmodl

from fleet.sim.injection import Injection
from fleet.sim.simulator import Simulator
from fleet.sim.soap import (
    SoapDecodeError,
    SoapRequest,
    decode_request,
    encode_client_fault,
    encode_fault,
    encode_response,
    version_from_soap_action,
)

log = logging.getLogger("fleet.sim.server")

_COOKIE = re.compile(r'vmware_soap_session="?([0-9A-Za-z]+)"?')
VERSIONS_PATH = "/sdk/vimServiceVersions.xml"
XML_CONTENT_TYPE = "text/xml; charset=utf-8"

Drop = Literal["reset", "lost_reply"]


@dataclass(frozen=True)
class SoapReply:
    """What the endpoint answers. ``drop``: answer nothing, drop the connection."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    drop: Drop | None = None


def versions_xml(api_version: str) -> str:
    """``vimServiceVersions.xml`` for an endpoint speaking ``api_version``."""
    current = VmomiSupport.versionMap["vim25/" + api_version]
    prior = []
    for ns, name in VmomiSupport.versionMap.items():
        if not isinstance(ns, str) or not ns.startswith("vim25/") or ns == "vim25/" + api_version:
            continue
        if name != current and VmomiSupport.IsChildVersion(current, name):
            prior.append(ns.split("/", 1)[1])
    prior_xml = "".join(f"<version>{v}</version>" for v in sorted(set(prior), reverse=True))
    return (
        '<?xml version="1.0" encoding="UTF-8" ?>\n<namespaces version="1.0">\n <namespace>\n'
        f"  <name>urn:vim25</name>\n  <version>{api_version}</version>\n"
        f"  <priorVersions>{prior_xml}</priorVersions>\n </namespace>\n</namespaces>\n"
    )


def fault_targets(sim: Simulator, call: SoapRequest) -> list[str]:
    """The names a fault rule's ``object`` glob matches for ``call`` (besides the object's
    moref id): the object's name, the VM a guest operation runs in, and the name of
    what the call makes (an instant or full clone, a folder, a new name)."""
    names = [sim.object_name(call.this._moId)]
    args = call.args
    vm = args.get("vm")
    if vm is not None and getattr(vm, "_moId", None):
        names.append(sim.object_name(vm._moId))
    spec: Any = args.get("spec")
    if call.method == "InstantClone_Task":
        made = spec.name if spec is not None else None
    else:
        made = args.get("name") or args.get("newName")
    if isinstance(made, str):
        names.append(made)
    return names


class SoapEndpoint:
    """``/sdk`` of one :class:`Simulator`, independent of how requests arrive."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.versions = versions_xml(sim.topology.vcenter.api_version).encode()

    def get(self, path: str) -> SoapReply:
        """A GET below ``/sdk``: the versions file, or 404."""
        if path == VERSIONS_PATH:
            return SoapReply(200, self.versions, {"Content-Type": XML_CONTENT_TYPE})
        return SoapReply(404, b"Not Found", {"Content-Type": "text/plain; charset=utf-8"})

    async def post(self, body: bytes, *, soap_action: str | None, cookie: str | None,
                   remote: str = "127.0.0.1", user_agent: str = "") -> SoapReply:
        """One SOAP call: session by cookie, HTTP-level faults, the call, its encoding."""
        sim = self.sim
        version = version_from_soap_action(soap_action)
        try:
            call = decode_request(body, version)
        except SoapDecodeError as exc:
            return SoapReply(500, encode_client_fault(str(exc)),
                             {"Content-Type": XML_CONTENT_TYPE})
        match = _COOKIE.search(cookie or "")
        session, new = sim.session_for(match.group(1) if match else None, remote, user_agent,
                                       create=sim.may_open_session(call))
        headers = {"Content-Type": XML_CONTENT_TYPE}
        if new:
            headers["Set-Cookie"] = (f'vmware_soap_session="{session.key}"; Path=/; HttpOnly; '
                                     "Secure")
        moid = call.this._moId
        name = fault_targets(sim, call)
        http = sim.faults.match(call.method, moid, name, http=True)
        if http is not None:
            await sim.clock.sleep(http.rule.delay_s)
            if http.kind == "http:reset":
                return SoapReply(0, b"", {}, drop="reset")
            if http.kind == "http:503":
                return SoapReply(503, b"Service Unavailable",
                                 {**headers, "Content-Type": "text/plain; charset=utf-8"})
        injection: Injection | None = sim.faults.match(call.method, moid, name, http=False)
        try:
            value, result_type, flags = await sim.invoke(call, session, version, injection)
            payload = encode_response(call.method, result_type, flags, value, version)
            status = 200
        except vmodl.MethodFault as fault:
            payload, status = self._fault(fault, call.method, moid, version), 500
        except Exception as exc:
            log.exception("simulator error in %s on %s", call.method, moid)
            payload, status = self._fault(vmodl.fault.SystemError(
                msg=f"simulator error: {exc!r}", reason=repr(exc)), call.method, moid, version), 500
        if http is not None and http.kind == "http:lost_reply":
            return SoapReply(0, b"", {}, drop="lost_reply")
        return SoapReply(status, payload, headers)

    @staticmethod
    def _fault(fault: Any, method: str, moid: str, version: str) -> bytes:
        try:
            return encode_fault(fault, version)
        except Exception as exc:  # a fault we built wrong must still reach the client
            log.exception("cannot serialize %s from %s on %s", type(fault).__name__, method, moid)
            return encode_fault(vmodl.fault.SystemError(
                msg=f"simulator error serializing {type(fault).__name__}: {exc!r}",
                reason=repr(exc)), version)
