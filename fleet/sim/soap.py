"""The simulator's vim25 SOAP codec: requests in, responses and faults out.

pyVmomi ships a serializer and a *response* deserializer but no *request*
deserializer. This module adds one on top of pyVmomi's own
``SoapDeserializer``, so the simulator reads exactly what pyVmomi (and any
other vim25 client) writes, and writes exactly what vCenter writes:

- a request body is ``<Method xmlns="urn:vim25"><_this type="T">id</_this>
  <param>...</param>...</Method>``; each parameter element is handed to
  pyVmomi's deserializer with the parameter's declared type, repeated
  elements of an array parameter are collected into a typed array;
- a response is ``<MethodResponse><returnval>...</returnval></MethodResponse>``;
- a fault is HTTP 500 with ``<soapenv:Fault>`` whose unqualified ``<detail>``
  holds ``<XFault xmlns="urn:vim25" xsi:type="X">``.

``Fetch`` (pyVmomi's accessor for ``mo.prop``) is not a WSDL method; it is
decoded here like any other call with one string parameter ``prop``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from io import StringIO
from typing import Any
from xml.parsers.expat import ExpatError, ParserCreate

from pyVmomi import VmomiSupport, vmodl
from pyVmomi.SoapAdapter import (
    F_LINK,
    NS_SEP,
    SOAP_NSMAP,
    XML_ENCODING,
    XMLNS_SOAPENV,
    ExpatDeserializerNSHandlers,
    GetHandlers,
    SetHandlers,
    SoapDeserializer,
    SoapSerializer,
    XmlEscape,
)

from fleet import vmomi

vmomi.install()

VIM_NS = "urn:vim25"

# The newest API version the simulator speaks; a topology may lower it to play
# an older vCenter.
DEFAULT_API_VERSION = "8.0.3.0"

_ENVELOPE_START = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" '
    'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
    'xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">\n<soapenv:Body>'
)
_ENVELOPE_END = "</soapenv:Body>\n</soapenv:Envelope>"


class SoapDecodeError(Exception):
    """The request body is not a vim25 SOAP call we can decode."""


@dataclass(frozen=True)
class _FetchInfo:
    """Method info for pyVmomi's non-WSDL ``Fetch`` accessor."""

    name: str = "Fetch"
    wsdlName: str = "Fetch"
    isTask: bool = False
    privId: str = "System.Read"


FETCH_INFO = _FetchInfo()


@dataclass
class SoapRequest:
    """One decoded call: which method, on which object, with which arguments."""

    method: str
    this: Any
    args: dict[str, Any] = field(default_factory=dict)
    info: Any = None


def version_from_soap_action(header: str | None) -> str:
    """Map a SOAPAction header (``"urn:vim25/8.0.3.0"``) to a pyVmomi version name."""
    if header:
        ns = header.strip().strip('"')
        if ns.startswith("urn:"):
            ns = ns[4:]
        version = VmomiSupport.versionMap.get(ns)
        if version is not None:
            return str(version)
    return str(VmomiSupport.versionMap["vim25/" + DEFAULT_API_VERSION])


def _param_type(param: Any) -> Any:
    typ = param.type
    if issubclass(typ, list):
        return typ.Item
    return typ


class _RequestParser(ExpatDeserializerNSHandlers):  # type: ignore[misc]
    """Outer expat handlers: envelope and method element; params go to pyVmomi."""

    def __init__(self, version: str) -> None:
        super().__init__()
        self.version = version
        self.parser = ParserCreate(namespace_separator=NS_SEP)
        self.parser.buffer_text = True
        self.deser = SoapDeserializer(version=version)
        self.depth = 0
        self.method: str | None = None
        self.info: Any = None
        self.params: dict[str, Any] = {}
        self.this: Any = None
        self.args: dict[str, Any] = {}
        self._pending: str | None = None
        SetHandlers(self.parser, GetHandlers(self))

    def _collect(self) -> None:
        """Take the value pyVmomi finished deserializing for the pending param."""
        name = self._pending
        if name is None:
            return
        self._pending = None
        self.depth -= 1
        value = self.deser.GetResult()
        if name == "_this":
            self.this = value
            return
        param = self.params.get(name)
        if param is not None and issubclass(param.type, list):
            self.args.setdefault(name, param.type()).append(value)
        else:
            self.args[name] = value

    def StartElementHandler(self, tag: str, attr: dict[str, str]) -> None:
        self._collect()
        self.depth += 1
        ns, _, name = tag.rpartition(NS_SEP)
        if self.depth <= 2:
            if ns != XMLNS_SOAPENV:
                raise SoapDecodeError(f"unexpected element {name!r} outside the SOAP body")
            return
        if self.depth == 3:
            if ns == XMLNS_SOAPENV:
                raise SoapDecodeError(f"unexpected SOAP element {name!r} in the body")
            self.method = name
            if name == "Fetch":
                self.info = FETCH_INFO
                self.params = {"prop": VmomiSupport.Object(name="prop", type=str, flags=0)}
            else:
                try:
                    self.info = VmomiSupport.GetWsdlMethod(ns or VIM_NS, name).info
                except KeyError:
                    self.info = None
                    self.params = {}
                else:
                    self.params = {p.name: p for p in self.info.params}
            return
        if self.depth == 4:
            if name == "_this":
                typ: Any = VmomiSupport.ManagedObject
            else:
                param = self.params.get(name)
                if param is None:
                    if self.info is None:
                        # Unknown method: skip its arguments, MethodNotFound follows.
                        typ = str
                    else:
                        raise SoapDecodeError(
                            f"{self.method} has no parameter {name!r}"
                        )
                else:
                    typ = _param_type(param)
            self._pending = name
            self.deser.Deserialize(self.parser, typ, False, self.nsMap)
            self.deser.StartElementHandler(tag, attr)
            return
        raise SoapDecodeError(f"unexpected element {name!r}")

    def EndElementHandler(self, tag: str) -> None:
        self._collect()
        self.depth -= 1

    def CharacterDataHandler(self, data: str) -> None:
        pass


def decode_request(body: bytes, version: str) -> SoapRequest:
    """Decode one SOAP request body into a :class:`SoapRequest`."""
    reader = _RequestParser(version)
    try:
        reader.parser.Parse(body, True)
    except SoapDecodeError:
        raise
    except ExpatError as exc:
        raise SoapDecodeError(f"malformed XML: {exc}") from exc
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        raise SoapDecodeError(f"cannot decode request: {exc!r}") from exc
    if reader.method is None:
        raise SoapDecodeError("no method in the SOAP body")
    if reader.this is None:
        raise SoapDecodeError(f"{reader.method} without _this")
    return SoapRequest(method=reader.method, this=reader.this, args=reader.args, info=reader.info)


# -- shared values: serialized once ------------------------------------------------

#: data objects the simulator shares between VMs and replies and never changes (the
#: devices and extraConfig every VM of a shape has alike, fleet.sim.shapes): id ->
#: (the object, its serialized content per API version and namespace)
_SHARED: dict[int, tuple[Any, dict[tuple[str, str], str]]] = {}


def share(*values: Any) -> None:
    """Declare data objects immutable from now on: each reply then writes their content
    from a copy serialized once (per API version), instead of walking them again. The
    objects stay alive (their ids must not be reused)."""
    for value in values:
        _SHARED.setdefault(id(value), (value, {}))


class _Serializer(SoapSerializer):  # type: ignore[misc]
    """pyVmomi's serializer, writing the content of shared data objects from cache."""

    writer: Any
    version: str
    xsiPrefix: str

    def _SerializeDataObject(self, val: Any, info: Any, attr: str, currDefNS: str) -> None:
        entry = _SHARED.get(id(val))
        if entry is None or entry[0] is not val or info.flags & F_LINK:
            super()._SerializeDataObject(val, info, attr, currDefNS)
            return
        key = (self.version, currDefNS)
        content = entry[1].get(key)
        if content is None:
            outer = self.writer
            buffer = self.writer = StringIO()
            try:
                for prop in val._GetPropertyList():
                    self._Serialize(getattr(val, prop.name), prop, currDefNS)
                content = entry[1][key] = buffer.getvalue()
            finally:
                self.writer = outer
        # The element itself, as pyVmomi writes it: its xsi:type when the declared one
        # differs (a VirtualDisk in a VirtualDevice[]), then the cached content.
        dyn_type = VmomiSupport.GetCompatibleType(VmomiSupport.Type(val), self.version)
        if dyn_type != info.type:
            nsattr, qname = self._QName(dyn_type, currDefNS)
            attr += f'{nsattr} {self.xsiPrefix}type="{qname}"'
        self.writer.write(f"<{info.name}{attr}>{content}</{info.name}>")


def _ns_map() -> dict[str, str]:
    ns_map = dict(SOAP_NSMAP)
    ns_map[VIM_NS] = ""
    return ns_map


_NS_MAP = _ns_map()


def encode_response(method: str, result_type: Any, result_flags: int, value: Any,
                    version: str) -> bytes:
    """Serialize ``value`` as the ``returnval`` of ``method``'s response."""
    parts = [_ENVELOPE_START, f'<{method}Response xmlns="{VIM_NS}">']
    if value is not None and result_type is not type(None):
        info = VmomiSupport.Object(name="returnval", type=result_type, version=version,
                                   flags=result_flags)
        writer = StringIO()
        serializer = _Serializer(writer, version, _NS_MAP)
        serializer.outermostAttrs = ""  # vCenter sends no versionId attribute in replies
        serializer.Serialize(value, info)
        parts.append(writer.getvalue())
    parts.append(f"</{method}Response>")
    parts.append(_ENVELOPE_END)
    return "".join(parts).encode(XML_ENCODING)


def encode_fault(fault: Any, version: str) -> bytes:
    """Serialize a ``vmodl.MethodFault`` as a SOAP fault (sent with HTTP 500)."""
    wsdl_name = fault._wsdlName
    writer = StringIO()
    ns_map = {
        "http://www.w3.org/2001/XMLSchema-instance": "xsi",
        "http://www.w3.org/2001/XMLSchema": "xsd",
        VIM_NS: "",
    }
    serializer = SoapSerializer(writer, version, ns_map)
    serializer.outermostAttrs = ""
    info = VmomiSupport.Object(name=f"{wsdl_name}Fault", type=vmodl.MethodFault,
                               version=version, flags=0)
    serializer._SerializeDataObject(fault, info, f' xmlns="{VIM_NS}"', VIM_NS)
    message = fault.msg or wsdl_name
    body = (
        f"{_ENVELOPE_START}<soapenv:Fault><faultcode>ServerFaultCode</faultcode>"
        f"<faultstring>{XmlEscape(message)}</faultstring><detail>{writer.getvalue()}</detail>"
        f"</soapenv:Fault>{_ENVELOPE_END}"
    )
    return body.encode(XML_ENCODING)


def encode_client_fault(message: str) -> bytes:
    """A SOAP fault for a request we could not even decode (no vim fault type)."""
    body = (
        f"{_ENVELOPE_START}<soapenv:Fault><faultcode>ClientFaultCode</faultcode>"
        f"<faultstring>{XmlEscape(message)}</faultstring></soapenv:Fault>{_ENVELOPE_END}"
    )
    return body.encode(XML_ENCODING)
