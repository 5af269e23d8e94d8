"""A fast decoder for property reads of plain values (docs/reads.md, "Decoding").

pyVmomi decodes a reply element by element in Python callbacks and builds a typed
object for each: for a listing of 10,000 VMs that is 360,000 elements and 140,000
objects, seconds of CPU. The reads fleet makes most (a fleet's folder, every VM's
name) ask only for plain values, so :func:`decode_retrieve_result` reads a
``RetrievePropertiesEx`` / ``ContinueRetrievePropertiesEx`` reply with lxml's
parser (libxml2; no entities resolved, no network, no huge trees) and builds small
objects with the same attributes callers use of pyVmomi's: ``result.objects``,
``result.token``, ``content.obj`` (a real pyVmomi managed object),
``content.propSet`` of ``name``/``val``.

Plain means: strings, numbers, booleans, enumerations (as ``str``, as pyVmomi
gives them), managed object references, arrays of references, and ``OptionValue``
(``config.extraConfig["key"]`` reads one), whose ``value`` is a plain value. Any
other value, an unknown type or a reply of another shape raises
:class:`NotPlain`, and the caller decodes the same bytes with pyVmomi: a reply is
never half understood.
"""

from __future__ import annotations

from typing import Any

from lxml import etree  # type: ignore[import-untyped]
from pyVmomi import VmomiSupport

XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
VIM = "{urn:vim25}"
_OBJECTS = VIM + "objects"
_TOKEN = VIM + "token"
_OBJ = VIM + "obj"
_PROPSET = VIM + "propSet"
_NAME = VIM + "name"
_VAL = VIM + "val"
_KEY = VIM + "key"
_VALUE = VIM + "value"
_MISSING = VIM + "missingSet"
_RESPONSES = {VIM + "RetrievePropertiesExResponse", VIM + "ContinueRetrievePropertiesExResponse"}


#: libxml2 as a reader of untrusted replies: entities are not expanded, nothing is
#: fetched, and the parser's limits on depth and text size stay on
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


class NotPlain(ValueError):
    """The reply holds something this decoder does not read: use pyVmomi's."""


class PlainResult:
    __slots__ = ("objects", "token")

    def __init__(self, objects: list[PlainContent], token: str | None) -> None:
        self.objects = objects
        self.token = token


class PlainContent:
    """An ObjectContent: ``obj`` and its properties, kept as a dict of path -> value
    (``values``, what ``fleet.vsphere.inventory.props`` gives; not to be changed);
    ``propSet`` makes pyVmomi's list of them for callers that want it."""

    __slots__ = ("missingSet", "obj", "values")

    def __init__(self, obj: Any, values: dict[str, Any]) -> None:
        self.obj = obj
        self.values = values
        self.missingSet: list[Any] = []

    @property
    def propSet(self) -> list[PlainProperty]:
        return [PlainProperty(name, val) for name, val in self.values.items()]


class PlainProperty:
    __slots__ = ("name", "val")

    def __init__(self, name: str, val: Any) -> None:
        self.name = name
        self.val = val


class PlainOption:
    """An ``OptionValue``: what a keyed ``config.extraConfig["key"]`` read gives."""

    __slots__ = ("key", "value")

    def __init__(self, key: str, value: Any) -> None:
        self.key = key
        self.value = value


_NUMBERS = {"int": int, "long": int, "short": int, "byte": int, "double": float,
            "float": float}
_MO_TYPES: dict[str, Any] = {}
_ENUMS: dict[str, bool] = {}
#: an xsi:type as written (``xsd:string``) -> its local name (``string``)
_KINDS: dict[str, str] = {}


def _mo_type(type_name: str | None) -> Any:
    if not type_name:
        raise NotPlain("a reference without its type")
    cls = _MO_TYPES.get(type_name)
    if cls is None:
        try:
            cls = VmomiSupport.GetWsdlType("urn:vim25", type_name)
        except KeyError:
            raise NotPlain(f"unknown managed object type {type_name}") from None
        if not issubclass(cls, VmomiSupport.ManagedObject):
            raise NotPlain(f"{type_name} is not a managed object type")
        _MO_TYPES[type_name] = cls
    return cls


def _is_enum(type_name: str) -> bool:
    known = _ENUMS.get(type_name)
    if known is None:
        try:
            cls = VmomiSupport.GetWsdlType("urn:vim25", type_name)
        except KeyError:
            cls = None
        known = _ENUMS[type_name] = cls is not None and issubclass(cls, VmomiSupport.Enum)
    return known


class _Decoder:
    """One reply's decoding; references it meets again (a host named by every VM on
    it) are made once."""

    def __init__(self) -> None:
        self._refs: dict[tuple[str | None, str | None], Any] = {}

    def mo(self, elem: Any) -> Any:
        type_name, moid = elem.get("type"), elem.text
        key = (type_name, moid)
        ref = self._refs.get(key)
        if ref is None:
            if moid is None:
                raise NotPlain("a reference without its id")
            ref = self._refs[key] = _mo_type(type_name)(moid)
        return ref

    def value(self, elem: Any) -> Any:
        xsi = elem.get(XSI_TYPE)
        if xsi is None:
            raise NotPlain(f"a value without xsi:type in {elem.tag}")
        kind = _KINDS.get(xsi)
        if kind is None:
            kind = _KINDS[xsi] = xsi.rpartition(":")[2]
        text = elem.text
        if kind == "string":
            return text or ""
        if kind in ("ManagedObjectReference", "ManagedObject"):
            return self.mo(elem)
        if kind == "OptionValue":
            if len(elem) == 2:
                key_elem, value_elem = elem
                if key_elem.tag == _KEY and value_elem.tag == _VALUE:
                    return PlainOption(key_elem.text or "", self.value(value_elem))
            key = elem.find(_KEY)
            value = elem.find(_VALUE)
            return PlainOption("" if key is None else key.text or "",
                               None if value is None else self.value(value))
        if kind == "boolean":
            return text in ("true", "1")
        number = _NUMBERS.get(kind)
        if number is not None:
            if text is None:
                raise NotPlain(f"an empty {kind}")
            return number(text)
        if kind == "ArrayOfManagedObjectReference":
            return [self.mo(child) for child in elem]
        if _is_enum(kind):
            return text or ""
        raise NotPlain(f"values of type {kind}")

    def content(self, part: Any) -> PlainContent:
        """One ``objects`` element: ``obj`` and ``propSet`` elements of ``name`` and
        ``val``, in any order; anything else (``missingSet``) is not plain."""
        obj = None
        values: dict[str, Any] = {}
        value = self.value
        for field in part:
            tag = field.tag
            if tag == _PROPSET:
                try:
                    name, val = field
                except ValueError:
                    raise NotPlain("a propSet without exactly a name and a val") from None
                if name.tag == _NAME and val.tag == _VAL:
                    values[name.text or ""] = value(val)
                elif name.tag == _VAL and val.tag == _NAME:
                    values[val.text or ""] = value(name)
                else:
                    raise NotPlain("a propSet without name or val")
            elif tag == _OBJ:
                obj = self.mo(field)
            elif tag == _MISSING:
                raise NotPlain("a property vCenter could not read (missingSet)")
        if obj is None:
            raise NotPlain("an ObjectContent without obj")
        return PlainContent(obj, values)


_HEAD = 4096  # where a reply's token is, if it has one (it comes before the objects)


class RawPage:
    """A successful ``RetrievePropertiesEx`` reply not decoded yet, and its paging
    token, read from its head: the next page can be asked for while this one is
    decoded (``Session.retrieve_all``)."""

    __slots__ = ("body", "token")

    def __init__(self, body: bytes, token: str | None) -> None:
        self.body = body
        self.token = token

    @classmethod
    def of(cls, body: bytes) -> RawPage:
        """The page and its token; NotPlain if its head does not say plainly whether
        it has one (the WSDL puts ``token`` before ``objects`` in a RetrieveResult)."""
        head = body[:_HEAD]
        start = head.find(b"<returnval>")
        if start < 0:
            if b"RetrievePropertiesExResponse" in head:
                return cls(body, None)  # no returnval: nothing found
            raise NotPlain("not a RetrievePropertiesEx reply")
        rest = head[start + len(b"<returnval>"):]
        if rest.startswith((b"<objects>", b"<objects/>", b"</returnval>")):
            return cls(body, None)
        if rest.startswith(b"<token>"):
            end = rest.find(b"</token>")
            if end > 0:
                token = rest[len(b"<token>"):end].decode("utf-8")
                if "&" not in token:
                    return cls(body, token)
        raise NotPlain("a reply whose token is not where the WSDL puts it")


def decode_retrieve_result(body: bytes) -> PlainResult | None:
    """A ``RetrieveResult`` from a successful ``RetrievePropertiesEx`` or
    ``ContinueRetrievePropertiesEx`` reply; None when it holds nothing.
    Raises :class:`NotPlain` for anything it does not read (see the module)."""
    try:
        root = etree.fromstring(body, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise NotPlain(f"unreadable XML: {exc}") from None
    if root.getroottree().docinfo.doctype:
        raise NotPlain("a reply with a DOCTYPE (vCenter sends none)")
    response = None
    for body_elem in root:
        for child in body_elem:
            if child.tag in _RESPONSES:
                response = child
    if response is None:
        raise NotPlain("not a RetrievePropertiesEx reply")
    returnval = response.find(VIM + "returnval")
    if returnval is None:
        return None
    objects: list[PlainContent] = []
    token: str | None = None
    content = _Decoder().content
    for part in returnval:
        tag = part.tag
        if tag == _OBJECTS:
            objects.append(content(part))
        elif tag == _TOKEN:
            token = part.text
    return PlainResult(objects, token)
