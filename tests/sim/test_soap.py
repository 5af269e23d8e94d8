"""The SOAP codec against pyVmomi's own client-side serializer and deserializer."""

from __future__ import annotations

import pytest
from pyVmomi import SoapStubAdapter, vim, vmodl
from pyVmomi.SoapAdapter import SoapResponseDeserializer

from fleet.sim.soap import (
    SoapDecodeError,
    decode_request,
    encode_fault,
    encode_response,
    version_from_soap_action,
)

VERSION = "vim.version.v8_0_3_0"
PC = vmodl.query.PropertyCollector


@pytest.fixture
def stub() -> SoapStubAdapter:
    return SoapStubAdapter("127.0.0.1", -1, version=VERSION)


def test_version_from_soap_action() -> None:
    assert version_from_soap_action('"urn:vim25/6.7"') == "vim.version.version12"
    assert version_from_soap_action(None) == VERSION
    assert version_from_soap_action('"urn:vim25/bogus"') == VERSION


def test_request_round_trip_with_arrays_and_polymorphism(stub: SoapStubAdapter) -> None:
    vm = vim.VirtualMachine("vm-7", stub)
    spec = vim.vm.InstantCloneSpec(
        name="c1", location=vim.vm.RelocateSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(
            operation="edit", device=vim.vm.device.VirtualVmxnet3(
                key=4000, connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                    migrateConnect="disconnect", startConnected=True,
                    allowGuestControl=True, connected=False)))]),
        config=[vim.option.OptionValue(key="guestinfo.a", value="1"),
                vim.option.OptionValue(key="guestinfo.b", value="2")])
    info = vim.VirtualMachine._GetMethodInfo("InstantClone")
    call = decode_request(stub.SerializeRequest(vm, info, (spec,)), VERSION)
    assert call.method == "InstantClone_Task"
    assert call.this._moId == "vm-7"
    decoded = call.args["spec"]
    assert decoded.name == "c1"
    assert [o.key for o in decoded.config] == ["guestinfo.a", "guestinfo.b"]
    device = decoded.location.deviceChange[0].device
    assert isinstance(device, vim.vm.device.VirtualVmxnet3)
    assert device.connectable.migrateConnect == "disconnect"


def test_array_parameter_collects_repeated_elements(stub: SoapStubAdapter) -> None:
    pc = PC("propertyCollector", stub)
    spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vim.Folder("group-d1"))],
                         propSet=[PC.PropertySpec(type=vim.Folder, pathSet=["name"])])
    info = PC._GetMethodInfo("RetrievePropertiesEx")
    call = decode_request(stub.SerializeRequest(pc, info, ([spec, spec, spec],
                                                           PC.RetrieveOptions())), VERSION)
    assert len(call.args["specSet"]) == 3
    assert call.args["specSet"][0].propSet[0].type is vim.Folder


def test_response_and_fault_are_read_by_pyvmomi(stub: SoapStubAdapter) -> None:
    info = PC._GetMethodInfo("RetrievePropertiesEx")
    result = PC.RetrieveResult(objects=[PC.ObjectContent(obj=vim.VirtualMachine("vm-1"), propSet=[
        vmodl.DynamicProperty(name="datastore", val=vim.Datastore.Array([vim.Datastore("d")]))])])
    body = encode_response("RetrievePropertiesEx", info.result, info.resultFlags, result, VERSION)
    back = SoapResponseDeserializer(stub).Deserialize(body, info.result)
    assert back.objects[0].propSet[0].val[0]._moId == "d"
    assert b"versionId" not in body
    fault = vim.fault.DuplicateName(msg="taken", name="x", object=vim.VirtualMachine("vm-2"))
    err = SoapResponseDeserializer(stub).Deserialize(encode_fault(fault, VERSION), info.result)
    assert isinstance(err, vim.fault.DuplicateName)
    assert err.msg == "taken" and err.object._moId == "vm-2"


@pytest.mark.parametrize("body", [
    b"<not xml",
    b"<?xml version='1.0'?><x/>",
    b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    b"<soapenv:Body></soapenv:Body></soapenv:Envelope>",
    b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    b'<soapenv:Body><Login xmlns="urn:vim25"><userName>a</userName></Login>'
    b"</soapenv:Body></soapenv:Envelope>",
    b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    b'<soapenv:Body><Login xmlns="urn:vim25"><_this type="SessionManager">SessionManager'
    b"</_this><bogus>1</bogus></Login></soapenv:Body></soapenv:Envelope>",
])
def test_undecodable_requests(body: bytes) -> None:
    with pytest.raises(SoapDecodeError):
        decode_request(body, VERSION)


def test_unknown_method_decodes_for_method_not_found() -> None:
    body = (b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
            b'<soapenv:Body><NoSuchMethod xmlns="urn:vim25"><_this type="Folder">group-d1'
            b"</_this><x>1</x></NoSuchMethod></soapenv:Body></soapenv:Envelope>")
    call = decode_request(body, VERSION)
    assert call.method == "NoSuchMethod" and call.info is None


@pytest.mark.parametrize("version", [VERSION, "vim.version.version12"])
def test_shared_values_are_written_as_pyvmomi_writes_them(version: str) -> None:
    """What the simulator shares between VMs (fleet.sim.shapes) is serialized once and
    copied into replies: the reply is byte for byte what pyVmomi's serializer writes,
    for a whole ConfigInfo and for a device list on its own (another declared type),
    in more than one API version."""
    from fleet.sim import soap
    from fleet.sim.simulator import Simulator
    from fleet.sim.topology import GuestConfig, VmConfig, load_topology
    from fleet.sim.vm import VirtualMachine

    sim = Simulator(load_topology(None), time_scale=0.0)
    windows = sim.add_vm(VmConfig(name="win", guest=GuestConfig(family="windows"), disks=2))
    linux = next(v for v in sim.inventory.of_type(VirtualMachine) if v.name == "frozen-01")
    values = [(vim.vm.ConfigInfo, vm.prop_config()) for vm in (linux, windows)]
    values += [(vim.vm.device.VirtualDevice.Array, vm._devices()) for vm in (linux, windows)]
    values += [(vim.option.OptionValue.Array, linux.extra_options())]
    for result_type, value in values:
        cached = [soap.encode_response("M", result_type, 0, value, version) for _ in range(2)]
        shared = dict(soap._SHARED)
        soap._SHARED.clear()
        try:
            plain = soap.encode_response("M", result_type, 0, value, version)
        finally:
            soap._SHARED.update(shared)
        assert cached[0] == cached[1] == plain
