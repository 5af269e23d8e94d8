"""Property reads are written without pyVmomi where their values are plain, and the
bytes are the bytes pyVmomi's serializer writes (docs/simulator-vms.md, "Property
reads written directly").

Every reply here is compared byte for byte with what pyVmomi's own ``SoapSerializer``
writes of the same read as pyVmomi objects: replies the simulator's endpoint gives to
requests pyVmomi serialized (status listings, paged with tokens and continued; plain
values of every kind; mixed replies whose devices, layouts and guest NICs pyVmomi
writes; ``RetrieveProperties``; two API versions), and single values of every kind
written directly or handed to pyVmomi, down to the errors pyVmomi raises for values it
refuses. In process: the same code the server runs, without sockets.
"""

from __future__ import annotations

import asyncio
import gc
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from io import StringIO
from typing import Any

import pytest
from pyVmomi import SoapStubAdapter, VmomiSupport, vim, vmodl
from pyVmomi.SoapAdapter import SoapSerializer

from fleet.sim import soap
from fleet.sim.dispatch import SoapEndpoint
from fleet.sim.propcollector import retrieve
from fleet.sim.simulator import Simulator
from fleet.sim.topology import GuestConfig, VmConfig, load_topology
from fleet.sim.vm import VirtualMachine

PC = vmodl.query.PropertyCollector
V8 = "vim.version.v8_0_3_0"
V67 = "vim.version.version12"
SOAP_ACTION = {V8: '"urn:vim25/8.0.3.0"', V67: '"urn:vim25/6.7"'}

ODD = 'a<b & c>d "q" \'s\' é 漢字 \t tab'
LABELS = {"guestinfo.fleet.name": f"fleet {ODD}", "guestinfo.fleet.index": "7",
          "guestinfo.fleet.state": "ready", 'guestinfo.odd<&>"key': "v&<>"}


def keyed(key: str) -> str:
    quoted = key.replace("\\", "\\\\").replace('"', '\\"')
    return f'config.extraConfig["{quoted}"]'


STATUS = ["name", "runtime.powerState", "runtime.host",
          *(keyed(k) for k in LABELS), keyed("guestinfo.fleet.expires_at")]
PLAIN = ["name", "parent", "resourcePool", "datastore", "network",
         "runtime.instantCloneFrozen", "runtime.connectionState", "runtime.powerState",
         "config.hardware.memoryMB", "config.hardware.numCPU", "config.guestId",
         "config.instanceUuid", "config.template", "guest.ipAddress",
         "guest.toolsRunningStatus", "guestHeartbeatStatus", "summary.config.numCpu",
         "summary.storage.committed", keyed("nvram"), keyed("pciBridge0.present"),
         keyed("guestinfo.fleet.name"), "config.hardware.device[4000].deviceInfo.label",
         "config.hardware.device[4000].connectable.connected"]
MIXED = ["name", "config.hardware.device", "layoutEx.disk", "layoutEx.file", "guest.net",
         "config.extraConfig", "config.hardware.device[4000]", "config.files",
         "runtime.host", "config", "capability", "runtime.bootTime"]
MISSING_ONLY = [keyed("no.such.key"), "config.hardware.device[4999]"]
HOST = ["name", "parent", "vm", "runtime.connectionState", "runtime.inMaintenanceMode",
        "summary.hardware.memorySize", "datastore"]
DATASTORE = ["name", "summary.capacity", "summary.freeSpace", "summary.accessible", "vm"]


class Lab:
    """An in-process simulator with odd VMs, its SOAP endpoint and a logged-in cookie."""

    def __init__(self, vms: int = 6) -> None:
        self.sim = Simulator(load_topology(None), time_scale=0.0)
        self.folder = self.sim.ensure_folder("fleets/odd")
        self.empty = self.sim.ensure_folder("fleets/empty")
        states = ("running", "poweredOff", "frozen")
        for i in range(vms):
            self.sim.add_vm(VmConfig(
                name=f"m{i}-{ODD}" if i % 2 else f"m{i}", folder="fleets/odd",
                state=states[i % 3], nics=i % 3, disks=1 + i % 2,
                guest=GuestConfig(family="windows" if i % 4 == 3 else "linux"),
                extra_config=dict(LABELS) if i % 5 != 4 else {}))
        vms_in = [v for v in self.sim.inventory.of_type(VirtualMachine)
                  if v.parent is self.folder]
        vms_in[0].host.set_connection_state("disconnected")
        self.endpoint = SoapEndpoint(self.sim)
        self.stub = SoapStubAdapter("127.0.0.1", -1, version=V8)
        self.pc = PC("propertyCollector", self.stub)
        self.cookie: dict[str, str] = {}

    def post(self, body: bytes, version: str) -> bytes:
        if version not in self.cookie:
            login = vim.SessionManager("SessionManager", self.stub)
            reply = self.run(self._post(self.request(
                login, "Login", "administrator@vsphere.local", "fleet-sim", None), version))
            self.cookie[version] = reply.headers["Set-Cookie"].split(";")[0]
        reply = self.run(self._post(body, version, self.cookie[version]))
        assert reply.status == 200, reply.body[:400]
        return reply.body

    async def _post(self, body: bytes, version: str, cookie: str | None = None) -> Any:
        return await self.endpoint.post(body, soap_action=SOAP_ACTION[version], cookie=cookie)

    @staticmethod
    def run(coro: Any) -> Any:
        return asyncio.run(coro)

    def request(self, mo: Any, method: str, *args: Any) -> bytes:
        return bytes(self.stub.SerializeRequest(mo, mo._GetMethodInfo(method), args))

    def spec(self, paths: list[str], *, obj: Any = None, mo_type: Any = vim.VirtualMachine
             ) -> Any:
        """The children of a folder (the fleet's, unless ``obj``), or with ``obj`` a
        ContainerView, the objects it shows."""
        if isinstance(obj, vim.view.ContainerView):
            select = PC.TraversalSpec(name="view", type=vim.view.ContainerView, path="view")
        else:
            select = PC.TraversalSpec(name="children", type=vim.Folder, path="childEntity")
        objects = PC.ObjectSpec(obj=obj if obj is not None else self.folder.ref, skip=True,
                                selectSet=[select])
        return PC.FilterSpec(objectSet=[objects], propSet=[
            PC.PropertySpec(type=mo_type, all=False, pathSet=paths)])

    def view(self, mo_type: Any, version: str) -> Any:
        """A ContainerView of every ``mo_type`` in the datacenter, made in the session
        that speaks ``version``."""
        body = self.request(vim.view.ViewManager("ViewManager", self.stub),
                            "CreateContainerView", self.sim.datacenter.ref, [mo_type], True)
        reply = self.post(body, version).decode()
        match = re.search(r"<returnval type=\"ContainerView\">([^<]+)</returnval>", reply)
        assert match, reply
        return vim.view.ContainerView(match.group(1), self.stub)


@pytest.fixture(scope="module")
def lab() -> Lab:
    return Lab()


def pyvmomi_reply(method: str, value: Any, version: str) -> bytes:
    """What pyVmomi's own serializer writes as ``method``'s reply (the envelope is the
    simulator's; only the ``returnval`` is pyVmomi's, as in ``soap.encode_response``)."""
    info = PC._GetMethodInfo({"RetrieveProperties": "RetrieveContents"}.get(method, method))
    body = ""
    if value is not None:
        writer = StringIO()
        serializer = SoapSerializer(writer, version, soap._NS_MAP)
        serializer.outermostAttrs = ""
        serializer.Serialize(value, VmomiSupport.Object(
            name="returnval", type=info.result, version=version, flags=info.resultFlags))
        body = writer.getvalue()
    return (f'{soap._ENVELOPE_START}<{method}Response xmlns="{soap.VIM_NS}">{body}'
            f"</{method}Response>{soap._ENVELOPE_END}").encode()


def _token(reply: bytes) -> str | None:
    match = re.search(rb"<token>([^<]*)</token>", reply)
    return match.group(1).decode() if match else None


def read_both(lab: Lab, spec: Any, version: str, max_objects: int | None = None
              ) -> Iterator[tuple[bytes, bytes]]:
    """Each page of a RetrievePropertiesEx as the simulator writes it, beside what
    pyVmomi writes of the same objects (read as pyVmomi objects, paged alike)."""
    body = lab.request(lab.pc, "RetrievePropertiesEx", [spec],
                       PC.RetrieveOptions(maxObjects=max_objects))
    specs = soap.decode_request(body, version).args["specSet"]
    expected = [c.to_vmomi() for c in retrieve(lab.sim.inventory, specs)]
    reply = lab.post(body, version)
    method = "RetrievePropertiesEx"
    while True:
        token = _token(reply)
        page = expected[:max_objects] if token else expected
        expected = expected[len(page):]
        result = PC.RetrieveResult(objects=page, token=token) if page else None
        yield reply, pyvmomi_reply(method, result, version)
        if token is None:
            assert not expected
            return
        method = "ContinueRetrievePropertiesEx"
        reply = lab.post(lab.request(lab.pc, method, token), version)


@pytest.mark.parametrize("version", [V8, V67])
@pytest.mark.parametrize(("paths", "max_objects"), [
    (STATUS, None), (STATUS, 2), (PLAIN, None), (PLAIN, 4), (MIXED, 2),
    (MISSING_ONLY, 3), ([*STATUS, *MIXED], 5)],
    ids=["status", "status-paged", "plain", "plain-paged", "mixed-paged", "missing-only",
         "status-and-mixed"])
def test_vm_reads_are_written_as_pyvmomi_writes_them(lab: Lab, version: str,
                                                      paths: list[str],
                                                      max_objects: int | None) -> None:
    pages = list(read_both(lab, lab.spec(paths), version, max_objects))
    assert len(pages) == (1 if max_objects is None else -(-6 // max_objects))
    for written, expected in pages:
        assert written == expected
    text = b"".join(w for w, _ in pages)
    if paths is STATUS:  # the odd values are there, escaped
        assert b"a&lt;b &amp; c&gt;d \"q\" 's' \xc3\xa9 \xe6\xbc\xa2\xe5\xad\x97 \t tab" in text
        assert b'<key>guestinfo.odd&lt;&amp;&gt;"key</key>' in text
        assert b"guestinfo.fleet.expires_at" not in text  # absent: left out


@pytest.mark.parametrize("version", [V8, V67])
def test_hosts_datastores_and_views_are_written_as_pyvmomi_writes_them(
        lab: Lab, version: str) -> None:
    for paths, mo_type in ((HOST, vim.HostSystem), (DATASTORE, vim.Datastore),
                           (["name"], vim.VirtualMachine)):
        spec = lab.spec(paths, obj=lab.view(mo_type, version), mo_type=mo_type)
        for written, expected in read_both(lab, spec, version, 7):
            assert written == expected


@pytest.mark.parametrize("version", [V8, V67])
def test_retrieve_properties_and_empty_reads_are_written_as_pyvmomi_writes_them(
        lab: Lab, version: str) -> None:
    for paths in (STATUS, MIXED):
        spec = lab.spec(paths)
        body = lab.request(lab.pc, "RetrieveContents", [spec])
        specs = soap.decode_request(body, version).args["specSet"]
        expected = PC.ObjectContent.Array(
            [c.to_vmomi() for c in retrieve(lab.sim.inventory, specs)])
        assert lab.post(body, version) == pyvmomi_reply("RetrieveProperties", expected,
                                                        version)
    for method, args in (("RetrievePropertiesEx", (PC.RetrieveOptions(),)),
                         ("RetrieveContents", ())):
        empty = lab.spec(STATUS, obj=lab.empty.ref)
        written = lab.post(lab.request(lab.pc, method, [empty], *args), version)
        name = {"RetrieveContents": "RetrieveProperties"}.get(method, method)
        expected_empty = None if method == "RetrievePropertiesEx" else PC.ObjectContent.Array()
        assert written == pyvmomi_reply(name, expected_empty, version)


# -- single values ------------------------------------------------------------------------

def _values() -> list[tuple[str, Any, bool]]:
    """(what, value, written directly?)"""
    host = vim.HostSystem("host-1")
    guid = vim.VirtualMachine("vm-9")
    guid._serverGuid = "a-guid-1"
    option = vim.option.OptionValue
    typed = option(key="t", value="x")
    typed.dynamicType = "Custom"
    return [
        ("string", ODD, True), ("empty string", "", True), ("path-like", "a.b[\"c\"]", True),
        ("true", True, True), ("false", False, True), ("int", -5, True),
        ("big int", 2 ** 40, True), ("long", VmomiSupport.long(1 << 50), True),
        ("reference", host, True), ("reference with a server guid", guid, True),
        ("references", vim.Datastore.Array([vim.Datastore("ds-1"), vim.Datastore("ds-2")]),
         True),
        ("references of mixed types", vim.ManagedEntity.Array([host, vim.Folder("group-1")]),
         True),
        ("no references", vim.Network.Array(), True),
        ("option", option(key="guestinfo.x<&>", value=ODD), True),
        ("option without value", option(key="k"), True),
        ("option of an int", option(key="k", value=3), True),
        ("option of a reference", option(key="k", value=host), True),
        ("option of an option", option(key="k", value=option(key="in", value="v")), True),
        ("option with a dynamic type", typed, False),
        ("option of a float", option(key="k", value=1.5), False),
        ("float", 2.5, False), ("enum", vim.VirtualMachine.PowerState.poweredOn, True),
        ("strings", VmomiSupport.GetVmodlType("string[]")(["a", "<b>"]), False),
        ("ints", VmomiSupport.GetVmodlType("int[]")([1, 2]), False),
        ("a reference array holding a string", vim.Datastore.Array(["ds-1"]), False),
        ("device", vim.vm.device.VirtualVmxnet3(key=4000), False),
        ("description", vim.Description(label="l<", summary="s"), False),
        ("options", vim.option.OptionValue.Array([option(key="a", value="b")]), False),
        ("datetime", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), False),
        ("binary", VmomiSupport.binary(b"\x00\x01binary"), False),
    ]


@pytest.mark.parametrize("version", [V8, V67])
def test_every_kind_of_value_is_written_as_pyvmomi_writes_it(version: str) -> None:
    """Plain values are written directly, any other goes through pyVmomi's serializer in
    place; either way each reply is pyVmomi's, kept or written at read time."""
    writer = soap.content_writer(version)
    assert writer is not None
    vm = vim.VirtualMachine("vm-1")
    for what, value, direct in _values():
        props = [(f"p.{what}", value), ("name", "x")]
        content = writer.write(vm, props)
        assert isinstance(content, str) is direct, what
        for kept in (content, soap.Content(vm, props)):
            result = soap.Result([kept], "17")
            expected = PC.RetrieveResult(objects=[soap.Content(vm, props).to_vmomi()],
                                         token="17")
            info = PC._GetMethodInfo("RetrievePropertiesEx")
            assert soap.encode_response("RetrievePropertiesEx", info.result, info.resultFlags,
                                        result, version) == \
                pyvmomi_reply("RetrievePropertiesEx", expected, version), what
            info = PC._GetMethodInfo("RetrieveContents")
            assert soap.encode_response("RetrieveProperties", info.result, info.resultFlags,
                                        soap.Contents([kept]), version) == \
                pyvmomi_reply("RetrieveProperties",
                              PC.ObjectContent.Array([expected.objects[0]]), version), what


@pytest.mark.parametrize(("what", "value"), [
    ("nothing", None), ("an empty list", []), ("a list", ["a"])])
def test_values_pyvmomi_refuses_fail_as_they_fail_in_pyvmomi(what: str, value: Any) -> None:
    """A value pyVmomi cannot write raises what pyVmomi raises (the endpoint answers it
    with a SystemError fault naming that exception); the writer does not guess."""
    vm = vim.VirtualMachine("vm-1")
    props = [("name", "x"), ("p", value)]
    expected = PC.RetrieveResult(objects=[PC.ObjectContent(obj=vm, propSet=[
        vmodl.DynamicProperty(name=name, val="placeholder") for name, _ in props])])
    expected.objects[0].propSet[1].__dict__["val"] = value  # what pyVmomi cannot check
    with pytest.raises(Exception) as theirs:
        pyvmomi_reply("RetrievePropertiesEx", expected, V8)
    info = PC._GetMethodInfo("RetrievePropertiesEx")
    with pytest.raises(Exception) as ours:
        soap.encode_response("RetrievePropertiesEx", info.result, info.resultFlags,
                             soap.Result([soap.Content(vm, props)]), V8)
    assert type(ours.value) is type(theirs.value), what
    assert str(ours.value) == str(theirs.value), what


def test_an_api_version_the_writer_does_not_serve_is_left_to_pyvmomi() -> None:
    """vim25/4.0 predates RetrievePropertiesEx and versions pyVmomi does not know have no
    writer: the contents are kept as pyVmomi objects' sources and pyVmomi writes them."""
    old = str(VmomiSupport.versionMap["vim25/4.0"])
    assert soap.content_writer(old) is None
    assert soap.content_writer("8.0.3.0") is None
    vm = vim.VirtualMachine("vm-1")
    contents = soap.Contents([soap.Content(vm, [("name", ODD), ("runtime.host",
                                                                vim.HostSystem("h"))])])
    info = PC._GetMethodInfo("RetrieveContents")
    assert soap.encode_response("RetrieveProperties", info.result, info.resultFlags,
                                contents, old) == \
        pyvmomi_reply("RetrieveProperties", contents.to_vmomi(), old)


# -- what a read keeps and builds ----------------------------------------------------------

def _status_lab(vms: int) -> tuple[Lab, bytes]:
    lab = Lab(vms)
    body = lab.request(lab.pc, "RetrievePropertiesEx", [lab.spec(STATUS)],
                       PC.RetrieveOptions(maxObjects=5))
    lab.post(body, V8)  # warm: caches of paths, names and types are filled once
    return lab, body


def test_a_listing_builds_no_pyvmomi_data_object_per_vm(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """A listing of a fleet's members (name, power state, host, labels) costs no pyVmomi
    data object per VM or property: the simulator's CPU for `fleet status` of 10,000
    members was mostly pyVmomi building and walking 150,000 of them."""
    built = 0
    original = VmomiSupport.DataObject.__init__

    def counting(self: Any, **kwargs: Any) -> None:
        nonlocal built
        built += 1
        original(self, **kwargs)

    counts = []
    for vms in (10, 40):
        lab, body = _status_lab(vms)
        monkeypatch.setattr(VmomiSupport.DataObject, "__init__", counting)
        built = 0
        lab.post(body, V8)
        monkeypatch.setattr(VmomiSupport.DataObject, "__init__", original)
        counts.append(built)
    assert counts[0] == counts[1], counts


def test_pages_kept_for_a_continuation_hold_no_objects_per_vm() -> None:
    """What a read keeps for ContinueRetrievePropertiesEx (the objects still to read and
    their paths, docs/simulator-vms.md "Paged reads") holds nothing per VM for the
    garbage collector to walk, nor does the page written."""
    lab, body = _status_lab(200)
    gc.collect()
    before = len(gc.get_objects())
    lab.post(body, V8)  # 195 VMs kept for continuations
    gc.collect()
    assert len(gc.get_objects()) - before < 100


def test_trusted_builds_what_pyvmomi_builds() -> None:
    """``fleet.vmomi.trusted`` (the OptionValues of a VM's own and set keys) is
    ``cls(**fields)`` without the per-field checks: the same state, an array of its own
    per object, and an unknown field is still an error."""
    from fleet.vmomi import trusted

    for cls, fields in ((vim.option.OptionValue, {"key": "k<", "value": ODD}),
                        (vim.option.OptionValue, {}),
                        (vim.vm.device.VirtualDevice.ConnectInfo, {"connected": True})):
        made, checked = trusted(cls, **fields), cls(**fields)
        assert type(made) is cls
        assert list(vars(made).items()) == list(vars(checked).items())
        for name, value in vars(made).items():
            if isinstance(value, list):
                assert value is not getattr(trusted(cls, **fields), name)
    with pytest.raises(AttributeError, match="nope"):
        trusted(vim.option.OptionValue, nope=1)
