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

Property reads are written without pyVmomi's serializer where that is cheap: a
read of a fleet's 10,000 members is 90,000 properties, and pyVmomi builds an
object per property to walk it again node by node. The property collector hands
the encoder :class:`Contents` (``RetrieveProperties``) or :class:`Result`
(``RetrievePropertiesEx``), plain objects of ``(path, value)`` pairs; the encoder
writes their structure and every plain value (string, boolean, integer,
reference, array of references, ``OptionValue`` of a plain value) itself, the
bytes pyVmomi writes for them, and hands any other value (a device list, a
layout) to pyVmomi's serializer in place (docs/simulator-vms.md, "Property reads
written directly").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from io import StringIO
from typing import Any
from xml.parsers.expat import ExpatError, ParserCreate

from pyVmomi import VmomiSupport, vim, vmodl
from pyVmomi.SoapAdapter import (
    F_LINK,
    F_OPTIONAL,
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
    if isinstance(value, Result | Contents):
        written = _write_read(value, result_type, result_flags, version)
        if written is not None:
            parts.append(written)
            parts.append(f"</{method}Response>")
            parts.append(_ENVELOPE_END)
            return "".join(parts).encode(XML_ENCODING)
        value = value.to_vmomi()
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


# -- property reads, written directly ------------------------------------------------

PC = vmodl.query.PropertyCollector
_ManagedObject = VmomiSupport.ManagedObject
_OptionValue = vim.option.OptionValue


class Content:
    """An ``ObjectContent`` not yet written: the object's reference and its properties
    as (path, value) pairs (``DynamicProperty`` name and val). The simulator leaves out
    what it cannot read, so there is no ``missingSet``."""

    __slots__ = ("obj", "props")

    def __init__(self, obj: Any, props: list[tuple[str, Any]]) -> None:
        self.obj = obj
        self.props = props

    def to_vmomi(self) -> Any:
        """The same content as pyVmomi objects."""
        return PC.ObjectContent(obj=self.obj, propSet=[
            vmodl.DynamicProperty(name=name, val=val) for name, val in self.props])


#: An ``ObjectContent`` of plain values, already written: its XML without the element
#: around it (``objects`` in a RetrieveResult, ``returnval`` in a RetrieveProperties
#: reply). Plain values are written alike in every API version the writer serves.
Written = str


class Contents(list[Content | Written]):
    """The ``ObjectContent[]`` of ``RetrieveProperties``."""

    def to_vmomi(self) -> Any:
        return PC.ObjectContent.Array([_unwritten(c).to_vmomi() for c in self])


class Result:
    """The ``RetrieveResult`` of ``RetrievePropertiesEx`` and its continuations."""

    __slots__ = ("objects", "token")

    def __init__(self, objects: list[Content | Written], token: str | None = None) -> None:
        self.objects = objects
        self.token = token

    def to_vmomi(self) -> Any:
        return PC.RetrieveResult(objects=[_unwritten(c).to_vmomi() for c in self.objects],
                                 token=self.token)


def _unwritten(content: Content | Written) -> Content:
    if isinstance(content, Content):
        return content
    raise TypeError("an ObjectContent already written has no pyVmomi form")


def _prop(typ: Any, name: str) -> Any:
    return next(p for p in typ._GetPropertyList() if p.name == name)


_TOKEN_INFO = _prop(PC.RetrieveResult, "token")
_OBJECTS_INFO = _prop(PC.RetrieveResult, "objects")
_OBJ_INFO = _prop(PC.ObjectContent, "obj")
_NAME_INFO = _prop(vmodl.DynamicProperty, "name")
_VAL_INFO = _prop(vmodl.DynamicProperty, "val")
#: every field the direct writer writes, as pyVmomi declares it: the writer serves an
#: API version only if pyVmomi writes each of them in it, in the vim25 namespace
_WRITTEN_FIELDS = (_TOKEN_INFO, _OBJECTS_INFO, _OBJ_INFO, _prop(PC.ObjectContent, "propSet"),
                   _NAME_INFO, _VAL_INFO, _prop(_OptionValue, "key"),
                   _prop(_OptionValue, "value"))
#: what a property's name is: the paths of a request are pyVmomi's PropertyPath
_PATH_TYPES = (str, VmomiSupport.PropertyPath)
_MAX_NAMES = 4096
_mo_names: dict[type, str] = {}


def _ref_attrs(ref: Any) -> str:
    """The attributes pyVmomi gives a reference: ``serverGuid`` if any, its type."""
    cls = ref.__class__
    name = _mo_names.get(cls)
    if name is None:
        name = _mo_names[cls] = VmomiSupport.GetQualifiedWsdlName(cls)[1]
    guid = ref._serverGuid
    if guid is not None:
        return f' serverGuid="{guid}" type="{name}"'
    return f' type="{name}"'


def _true_false(value: bool) -> str:
    return "true" if value else "false"


class ContentWriter:
    """Writes ``ObjectContent`` as pyVmomi's serializer does for one API version: plain
    values directly, any other value (and any field pyVmomi would refuse, so that it
    raises what it raises) through pyVmomi's serializer, in place."""

    def __init__(self, version: str) -> None:
        self.version = version
        ser = self._ser = _Serializer(StringIO(), version, _NS_MAP)
        ser.outermostAttrs = ""  # as encode_response's

        def xsi(typ: Any, suffix: str = "") -> str:
            nsattr, qname = ser._QName(typ, VIM_NS)
            return f'{nsattr} {ser.xsiPrefix}type="{qname}{suffix}"'

        #: exact type -> (its xsi:type in an anyType element, how pyVmomi writes it)
        self.scalars: dict[type, tuple[str, Any]] = {
            str: (xsi(str), XmlEscape),
            bool: (xsi(bool), _true_false),
            int: (xsi(int), str),
            VmomiSupport.long: (xsi(VmomiSupport.long), str),
        }
        self.ref = xsi(_ManagedObject)
        refs = VmomiSupport.GetQualifiedWsdlName(_ManagedObject.Array)[1]
        # pyVmomi names an array of references ArrayOfManagedObjectReference
        self.refs = xsi(_ManagedObject.Array,
                        "Reference" if refs.endswith("ArrayOfManagedObject") else "")
        self.option = xsi(_OptionValue)
        self._xsi = xsi
        self._names: dict[str, str] = {}

    def pyvmomi(self, val: Any, info: Any) -> str:
        """``val`` in the field ``info``, by pyVmomi's serializer."""
        ser = self._ser
        ser.writer = writer = StringIO()
        ser._Serialize(val, info, VIM_NS)
        return writer.getvalue()

    def plain(self, tag: str, val: Any) -> str | None:
        """``val`` in an ``anyType`` element ``tag``; None if it is not a plain value."""
        scalar = self.scalars.get(val.__class__)
        if scalar is not None:
            return f"<{tag}{scalar[0]}>{scalar[1](val)}</{tag}>"
        if isinstance(val, _ManagedObject):
            return f"<{tag}{self.ref}{_ref_attrs(val)}>{val._moId}</{tag}>"
        if isinstance(val, VmomiSupport.Enum):  # typed as its enumeration, as vCenter does
            scalar = self.scalars[val.__class__] = (self._xsi(val.__class__), XmlEscape)
            return f"<{tag}{scalar[0]}>{XmlEscape(val)}</{tag}>"
        if val.__class__ is _OptionValue:
            state = val.__dict__
            key = state["key"]
            if state["dynamicType"] is not None or state["dynamicProperty"] or \
                    key.__class__ is not str:
                return None
            inner = state["value"]
            value = "" if inner is None else self.plain("value", inner)
            if value is None:
                return None
            return f"<{tag}{self.option}><key>{XmlEscape(key)}</key>{value}</{tag}>"
        item_type = getattr(val.__class__, "Item", None)
        if isinstance(val, VmomiSupport.Array) and isinstance(item_type, type) and \
                issubclass(item_type, _ManagedObject):
            items = []
            for item in val:
                if not isinstance(item, _ManagedObject):
                    return None
                items.append(f"<ManagedObjectReference{_ref_attrs(item)}>{item._moId}"
                             "</ManagedObjectReference>")
            return f"<{tag}{self.refs}>{''.join(items)}</{tag}>"
        return None

    def _name(self, name: Any) -> str:
        if name.__class__ not in _PATH_TYPES:
            return f"<propSet>{self.pyvmomi(name, _NAME_INFO)}"
        names = self._names
        written = names.get(name)
        if written is None:
            if len(names) >= _MAX_NAMES:
                names.clear()  # keyed paths are any number: keep the few in use
            written = names[name] = f"<propSet><name>{XmlEscape(name)}</name>"
        return written

    def _obj(self, ref: Any) -> str:
        if isinstance(ref, _ManagedObject):
            return f"<obj{_ref_attrs(ref)}>{ref._moId}</obj>"
        return self.pyvmomi(ref, _OBJ_INFO)

    def write(self, obj: Any, props: list[tuple[str, Any]]) -> Content | Written:
        """The content, written if its values are plain (they read alike in every version
        this writer serves), else kept to be written with the reply."""
        parts = [self._obj(obj)]
        for name, val in props:
            written = None if val is None else self.plain("val", val)
            if written is None:
                return Content(obj, props)
            parts.append(self._name(name))
            parts.append(written)
            parts.append("</propSet>")
        return "".join(parts)

    def content(self, tag: str, content: Content | Written) -> str:
        """``<tag>`` content ``</tag>``, writing a kept content now."""
        if content.__class__ is str:
            return f"<{tag}>{content}</{tag}>"
        assert isinstance(content, Content)
        parts = [f"<{tag}>", self._obj(content.obj)]
        for name, val in content.props:
            parts.append(self._name(name))
            written = None if val is None else self.plain("val", val)
            parts.append(self.pyvmomi(val, _VAL_INFO) if written is None else written)
            parts.append("</propSet>")
        parts.append(f"</{tag}>")
        return "".join(parts)


@lru_cache(maxsize=64)
def content_writer(version: str) -> ContentWriter | None:
    """The direct writer for ``version``, or None if pyVmomi writes a reply of it
    otherwise (a field it leaves out in that version, another namespace, a type it maps
    to an older one, a version pyVmomi does not know): then every content is kept and
    pyVmomi writes the reply."""
    try:
        if VmomiSupport.GetWsdlNamespace(version) != VIM_NS:
            return None
    except KeyError:
        return None
    for info in _WRITTEN_FIELDS:
        if not VmomiSupport.IsChildVersion(version, info.version) or \
                VmomiSupport.GetWsdlNamespace(info.version) != VIM_NS:
            return None
    for typ in (PC.RetrieveResult, PC.ObjectContent, vmodl.DynamicProperty, _OptionValue):
        if VmomiSupport.GetCompatibleType(typ, version) is not typ:
            return None
    return ContentWriter(version)


def _write_read(value: Result | Contents, result_type: Any, result_flags: int,
                version: str) -> str | None:
    """The ``returnval`` of a property read, what pyVmomi writes of ``value.to_vmomi()``
    for the declared result; None to leave it to pyVmomi."""
    writer = content_writer(version)
    if writer is None:
        if not any(c.__class__ is str for c in (
                value.objects if isinstance(value, Result) else value)):
            return None
        # Contents written for a client that now speaks an API older than
        # RetrievePropertiesEx: written as they are (no such client continues a read).
        writer = ContentWriter(version)
    if isinstance(value, Result):
        if result_type is not PC.RetrieveResult:
            return None
        out = ["<returnval>"]
        token = value.token
        if token is not None:
            out.append(f"<token>{XmlEscape(token)}</token>" if token.__class__ is str
                       else writer.pyvmomi(token, _TOKEN_INFO))
        if not value.objects:
            out.append(writer.pyvmomi(value.objects, _OBJECTS_INFO))  # pyVmomi refuses
        out.extend(writer.content("objects", c) for c in value.objects)
        out.append("</returnval>")
        return "".join(out)
    if result_type is not PC.ObjectContent.Array or \
            (not value and not result_flags & F_OPTIONAL):
        return None
    return "".join(writer.content("returnval", c) for c in value)


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
