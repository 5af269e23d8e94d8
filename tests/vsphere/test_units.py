"""Pure pieces: version negotiation, endpoint checks, spec builders, TLS options, secrets."""

from __future__ import annotations

import copy

import pytest
from pyVmomi import VmomiSupport, vim, vmodl

from fleet.errors import ConfigError
from fleet.vsphere import inventory as inv
from fleet.vsphere import vim_specs
from fleet.vsphere.client import endpoint_problem
from fleet.vsphere.model import CloneRequest, GuestProgram, Ref
from fleet.vsphere.session import Secret, method_info
from fleet.vsphere.tls import TlsOptions, normalize_thumbprint
from fleet.vsphere.transport import (
    VimStub,
    parse_versions_xml,
    pick_version,
    soap_action,
)

VERSIONS_XML = """<?xml version="1.0" encoding="UTF-8" ?>
<namespaces version="1.0">
 <namespace>
  <name>urn:vim25</name>
  <version>8.0.3.0</version>
  <priorVersions><version>8.0.2.0</version><version>7.0</version><version>6.7</version>
  </priorVersions>
 </namespace>
 <namespace><name>urn:sms</name><version>9.0</version></namespace>
</namespaces>
"""


def test_versions_xml_and_pick() -> None:
    advertised = parse_versions_xml(VERSIONS_XML)
    assert advertised == ["8.0.3.0", "8.0.2.0", "7.0", "6.7"]
    assert pick_version(advertised) == "vim.version.v8_0_3_0"
    # A server newer than pyVmomi: the newest version both know.
    assert pick_version(["99.0.0.0", "8.0.2.0", "6.7"]) == "vim.version.v8_0_2_0"
    assert pick_version(["1.0"]) is None


def test_soap_action_is_the_quoted_version_id_even_when_it_is_a_hash() -> None:
    assert soap_action("vim.version.version12") == '"urn:vim25/6.7"'
    hashed = VmomiSupport.versionMap["vim25/m5CA1EF4D"]
    assert soap_action(hashed) == '"urn:vim25/m5CA1EF4D"'
    assert VimStub("vim.version.version12").versionId == '"urn:vim25/6.7"'


def test_stub_serializes_exactly_like_pyvmomi() -> None:
    stub = VimStub("vim.version.v8_0_3_0")
    ref = vim.VirtualMachine("vm-1", stub)
    pc = vmodl.query.PropertyCollector("propertyCollector", stub)
    spec = inv.filter_spec([vmodl.query.PropertyCollector.ObjectSpec(obj=ref)],
                           vim.VirtualMachine, ["name"])
    info = method_info(pc, "RetrievePropertiesEx")
    body = stub.serialize(pc, info, [[spec], vmodl.query.PropertyCollector.RetrieveOptions()])
    assert b"<RetrievePropertiesEx xmlns=\"urn:vim25\">" in body
    assert b'<obj type="VirtualMachine">vm-1</obj>' in body


def test_method_info_by_wsdl_or_python_name() -> None:
    flt = vmodl.query.PropertyCollector.Filter("f-1")
    assert method_info(flt, "DestroyPropertyFilter").wsdlName == "DestroyPropertyFilter"
    ref = vim.VirtualMachine("vm-1")
    assert method_info(ref, "InstantClone_Task").wsdlName == "InstantClone_Task"
    assert method_info(ref, "InstantClone").wsdlName == "InstantClone_Task"
    with pytest.raises(AttributeError):
        method_info(ref, "Frobnicate")


@pytest.mark.parametrize(("api_type", "api_version", "negotiated", "problem"), [
    ("VirtualCenter", "8.0.3.0", "vim.version.v8_0_3_0", None),
    ("VirtualCenter", "6.7", "vim.version.version12", None),
    ("HostAgent", "8.0.3.0", "vim.version.v8_0_3_0", "standalone ESXi"),
    ("VirtualCenter", "6.5", "vim.version.version11", "6.7 or later"),
    ("VirtualCenter", "", "vim.version.version11", "predates vSphere 6.7"),
])
def test_endpoint_problem(api_type: str, api_version: str, negotiated: str,
                          problem: str | None) -> None:
    found = endpoint_problem(api_type, api_version, negotiated)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def _nic(key: int, connected: bool = True) -> object:
    return vim.vm.device.VirtualVmxnet3(
        key=key, macAddress=f"00:50:56:00:00:{key % 100:02d}",
        deviceInfo=vim.Description(label=f"Network adapter {key - 3999}", summary=""),
        backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network"),
        connectable=vim.vm.device.VirtualDevice.ConnectInfo(
            connected=connected, startConnected=True, allowGuestControl=True))


def test_migrate_plan() -> None:
    assert vim_specs.migrate_plan([4000, 4001], "disconnect") == {4000: "disconnect",
                                                              4001: "disconnect"}
    assert vim_specs.migrate_plan([4000, 4001], {4001: "connect", 4999: "connect"}) == {
        4001: "connect"}
    assert vim_specs.migrate_plan([4000], None) == {}
    assert vim_specs.migrate_plan([4000], {}) == {}


def test_instant_clone_spec() -> None:
    nics = [_nic(4000), _nic(4001)]
    edits = vim_specs.migrate_connect_edits(nics, {4001: "disconnect"})
    request = CloneRequest(source=Ref("VirtualMachine", "vm-1"), name="web-1",
                           folder=Ref("Folder", "group-v3"),
                           extra_config={"guestinfo.a": "1"}, bios_uuid="4211-aaaa")
    spec = vim_specs.instant_clone_spec(request, folder=vim.Folder("group-v3"),
                                    datastore=vim.Datastore("datastore-1"), nic_edits=edits)
    assert isinstance(spec, vim.vm.InstantCloneSpec)
    assert spec.name == "web-1" and spec.biosUuid == "4211-aaaa"
    assert spec.location.folder._moId == "group-v3"
    assert spec.location.datastore._moId == "datastore-1"
    assert [(o.key, o.value) for o in spec.config] == [("guestinfo.a", "1")]
    (change,) = spec.location.deviceChange
    assert change.operation == "edit" and change.device.key == 4001
    assert change.device.connectable.migrateConnect == "disconnect"
    assert change.device.connectable.connected is False
    # The NIC as the source has it (type, key, backing), never the source's MAC (the clone
    # would take it); the source's device is untouched.
    assert type(change.device) is type(nics[1])
    assert change.device.macAddress is None
    assert change.device.backing.deviceName == nics[1].backing.deviceName
    assert nics[1].macAddress is not None
    assert nics[1].connectable.migrateConnect is None
    plain = vim_specs.instant_clone_spec(request, folder=vim.Folder("group-v3"))
    assert not plain.location.deviceChange  # no edits at all
    # Everything serializes (types checked by pyVmomi).
    VimStub("vim.version.v8_0_3_0").serialize(
        vim.VirtualMachine("vm-1"), method_info(vim.VirtualMachine("vm-1"), "InstantClone"),
        [spec])


@pytest.mark.parametrize("version", ["vim.version.v8_0_3_0", "vim.version.version12"])
def test_clone_bodies_are_what_pyvmomi_serializes(version: str) -> None:
    stub = VimStub(version)
    source = vim.VirtualMachine("vm-1", stub)
    info = method_info(source, "InstantClone_Task")
    edits = vim_specs.migrate_connect_edits([_nic(4000), _nic(4001)], {4001: "connect"})
    bodies = vim_specs.CloneBodies()
    odd = ["", "a&b<c>d", "quote \" and ' apostrophe", "été ☃", "]]>", "&amp;"]
    for i in range(12):
        request = CloneRequest(
            source=Ref("VirtualMachine", "vm-1"), name=f"web-{i}{odd[i % len(odd)]}",
            folder=Ref("Folder", "group-v3"),
            datastore=Ref("Datastore", "datastore-1") if i % 3 else None,
            extra_config={"guestinfo.fleet.index": str(i), "guestinfo.x": odd[i % len(odd)],
                          "guestinfo.fleet.name": "web"},
            bios_uuid=f"4211-{odd[i % len(odd)]}" if i % 4 == 0 else None)
        where = {"folder": vim.Folder("group-v3", stub),
                 "datastore": vim.Datastore("datastore-1", stub) if request.datastore else None,
                 "nic_edits": edits if i % 2 else []}
        expected = stub.serialize(source, info, [vim_specs.instant_clone_spec(request, **where)])
        assert bodies.render(stub, source, info, request, **where) == expected
    # Not a string: no promise, the caller serializes as usual.
    numeric = CloneRequest(source=Ref("VirtualMachine", "vm-1"), name="web-x",
                           folder=Ref("Folder", "group-v3"),
                           extra_config={"guestinfo.n": 3})  # type: ignore[dict-item]
    assert bodies.render(stub, source, info, numeric, folder=vim.Folder("group-v3", stub)) \
        is None


def test_nic_edits_and_program_spec() -> None:
    edits = vim_specs.nic_edits([_nic(4000, False), _nic(4001, False)], True, [4001])
    assert [e.device.key for e in edits] == [4001]
    assert edits[0].device.connectable.connected is True
    assert edits[0].device.macAddress is None and edits[0].device.backing is not None
    program = vim_specs.program_spec(GuestProgram("/bin/sh", "-c true", env={"A": "1"}))
    assert program.programPath == "/bin/sh" and program.envVariables == ["A=1"]


@pytest.mark.parametrize("version", ["vim.version.v8_0_3_0", "vim.version.version12"])
def test_no_serialized_clone_spec_carries_a_source_mac(version: str) -> None:
    stub = VimStub(version)
    source = vim.VirtualMachine("vm-1", stub)
    info = method_info(source, "InstantClone_Task")
    nics = [_nic(4000), _nic(4001)]
    macs = [n.macAddress for n in nics]
    bodies = vim_specs.CloneBodies()
    for connect in ("disconnect", "connect"):
        edits = vim_specs.migrate_connect_edits(nics, vim_specs.migrate_plan([4000, 4001], connect))
        assert [e.device.key for e in edits] == [4000, 4001]
        for i in range(3):
            request = CloneRequest(source=Ref("VirtualMachine", "vm-1"), name=f"web-{i}",
                                   folder=Ref("Folder", "group-v3"),
                                   extra_config={"guestinfo.fleet.index": str(i)})
            where = {"folder": vim.Folder("group-v3", stub), "nic_edits": edits}
            plain = stub.serialize(source, info, [vim_specs.instant_clone_spec(request, **where)])
            fast = bodies.render(stub, source, info, request, **where)
            assert fast == plain  # the fast path is pyVmomi's serialization, byte for byte
            text = plain.decode()
            assert f"<migrateConnect>{connect}</migrateConnect>" in text
            assert not [mac for mac in macs if mac in text]
            assert "macAddress" not in text
    # The reconfiguration that connects NICs (and labels) carries no MAC either.
    reconfig = vim_specs.device_change_spec(vim_specs.nic_edits(nics, True), {"guestinfo.a": "1"})
    text = stub.serialize(vim.VirtualMachine("vm-2", stub),
                          method_info(vim.VirtualMachine("vm-2", stub), "ReconfigVM_Task"),
                          [reconfig]).decode()
    assert "<connected>true</connected>" in text
    assert not [mac for mac in macs if mac in text] and "macAddress" not in text


def test_a_distributed_switch_nic_edit_asks_for_a_new_port() -> None:
    # The running source holds its port: the clone's NIC keeps the port group and switch
    # but not the port key, and the source's backing is not changed.
    dvs = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
        port=vim.dvs.PortConnection(switchUuid="50 1a", portgroupKey="dvportgroup-7",
                                    portKey="42"))
    nic = vim.vm.device.VirtualVmxnet3(
        key=4000, macAddress="00:50:56:00:00:01", backing=dvs,
        connectable=vim.vm.device.VirtualDevice.ConnectInfo(connected=True))
    (edit,) = vim_specs.migrate_connect_edits([nic], {4000: "disconnect"})
    port = edit.device.backing.port
    assert (port.switchUuid, port.portgroupKey, port.portKey) == ("50 1a", "dvportgroup-7", None)
    assert nic.backing.port.portKey == "42" and edit.device.macAddress is None


def test_inventory_conversions() -> None:
    disks = [vim.vm.FileLayoutEx.DiskLayout(key=2000, chain=[
        vim.vm.FileLayoutEx.DiskUnit(fileKey=[1, 2]) for _ in range(3)]),
        vim.vm.FileLayoutEx.DiskLayout(key=2001, chain=[vim.vm.FileLayoutEx.DiskUnit()])]
    assert inv.chain_depth(disks) == 3
    assert inv.chain_depth(None) == 0
    assert inv.guest_family("windows2019srv_64Guest", None) == "windows"
    assert inv.guest_family("ubuntu64Guest", None) == "linux"
    assert inv.guest_family("otherGuest", None) == "other"
    assert inv.guest_family("otherGuest", "linuxGuest") == "linux"
    (nic,) = inv.nics_of([_nic(4000), vim.vm.device.VirtualDisk(key=2000)])
    assert nic.key == 4000 and nic.connected and nic.network == "VM Network"


def test_tls_options() -> None:
    digest = normalize_thumbprint("AB:" * 31 + "CD")
    assert len(digest) == 32
    assert normalize_thumbprint("ab" * 31 + "cd") == digest
    with pytest.raises(ConfigError, match="SHA-1"):
        normalize_thumbprint("AB:" * 19 + "CD")
    with pytest.raises(ConfigError, match="thumbprint"):
        TlsOptions(thumbprint="nope")
    with pytest.raises(ConfigError, match="choose one"):
        TlsOptions(ca_file="/x.pem", insecure=True)


def test_secret_never_shows() -> None:
    secret = Secret("hunter2-very-secret")
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in str(secret)
    assert "hunter2" not in f"{secret} {secret!r}"
    assert secret.reveal() == "hunter2-very-secret"
    with pytest.raises(TypeError):
        copy.copy(secret)
