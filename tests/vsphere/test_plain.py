"""The fast decoder of plain property reads gives what pyVmomi gives (docs/reads.md).

Every reply is decoded both ways and compared value by value: the simulator's own
replies (folder listings with labels, names through a view, hosts), replies written
the way vCenter writes them (typed references, enumerations, longs), and replies the
fast decoder must refuse (devices, a ``missingSet``, a fault), which the client then
reads with pyVmomi.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from pyVmomi import VmomiSupport, vim, vmodl

import fleet.vsphere.session as session_module
from fleet.engine.lifetime import FLEET_LABELS
from fleet.testing.harness import sim_vsphere, small_topology
from fleet.vsphere import inventory as inv
from fleet.vsphere.model import CloneRequest
from fleet.vsphere.plain import NotPlain, PlainOption, RawPage, decode_retrieve_result
from fleet.vsphere.transport import VimStub

pytestmark = pytest.mark.anyio

ENVELOPE = ('<?xml version="1.0" encoding="UTF-8"?>\n<soapenv:Envelope '
            'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
            'xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>'
            '<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval>{}</returnval>'
            '</RetrievePropertiesExResponse></soapenv:Body></soapenv:Envelope>')


def _plain(value: Any) -> Any:
    """A value as a comparable Python value, whichever decoder made it."""
    if isinstance(value, VmomiSupport.ManagedObject):
        return ("mo", value._wsdlName, value._moId)
    if isinstance(value, PlainOption | vim.option.OptionValue):
        return ("option", value.key, _plain(value.value))
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):  # pyVmomi's long, short and int are all ints
        return ("int", int(value))
    if isinstance(value, float | str):
        return (type(value).__name__ if not isinstance(value, str) else "str", value)
    raise AssertionError(f"not a plain value: {value!r}")


def _contents(result: Any) -> list[tuple[Any, dict[str, Any]]]:
    return [(_plain(c.obj), {p.name: _plain(p.val) for p in c.propSet})
            for c in result.objects or ()]


def _both(body: bytes) -> tuple[Any, Any]:
    stub = VimStub("vim.version.v8_0_3_0")
    slow = stub.deserialize(body, vmodl.query.PropertyCollector.RetrieveResult)
    fast = decode_retrieve_result(body)
    return slow, fast


async def test_the_simulators_listings_decode_as_pyvmomi_decodes_them() -> None:
    async with sim_vsphere(small_topology(hosts=2)) as (vs, _vc):
        folder = await vs.ensure_folder("fleet/p")
        source = (await vs.find_vms(["frozen-01"]))[0].ref
        for i in range(3):
            task = await vs.start_instant_clone(CloneRequest(
                source=source, name=f"p-{i}", folder=folder,
                extra_config={"guestinfo.fleet.name": "p", "guestinfo.fleet.index": str(i),
                              "guestinfo.fleet.state": 'quote " and <tag> & more'}))
            await task.wait(10)
        replies: list[bytes] = []
        post = vs.session.transport.post

        async def keep(body: bytes, **kw: Any) -> Any:
            reply = await post(body, **kw)
            if kw.get("method") == "RetrievePropertiesEx":
                replies.append(reply.body)
            return reply

        vs.session.transport.post = keep  # type: ignore[method-assign]
        listed = await vs.list_folder_vms(folder, FLEET_LABELS)
        await vs.list_hosts()
        await vs.find_vms(["frozen-02"])
        decoded = 0
        for body in replies:
            try:
                slow, fast = _both(body)
            except NotPlain:
                continue  # a source's whole configuration: pyVmomi's to read
            decoded += 1
            if fast is None:
                assert slow is None or not slow.objects
                continue
            assert _contents(fast) == _contents(slow) and fast.token == slow.token
        assert decoded >= 3  # the listing, the hosts and the names
        assert sorted(vm.labels["guestinfo.fleet.state"] for vm in listed) == \
            ['quote " and <tag> & more'] * 3
        assert {vm.labels["guestinfo.fleet.index"] for vm in listed} == {"0", "1", "2"}


async def test_replies_written_as_vcenter_writes_them() -> None:
    body = ENVELOPE.format(
        '<token>t-1</token>'
        '<objects><obj type="VirtualMachine">vm-7</obj>'
        '<propSet><name>runtime.powerState</name>'
        '<val xsi:type="VirtualMachinePowerState">poweredOff</val></propSet>'
        '<propSet><name>runtime.host</name>'
        '<val type="HostSystem" xsi:type="ManagedObjectReference">host-9</val></propSet>'
        '<propSet><name>datastore</name><val xsi:type="ArrayOfManagedObjectReference">'
        '<ManagedObjectReference type="Datastore" xsi:type="ManagedObjectReference">ds-1'
        '</ManagedObjectReference></val></propSet>'
        '<propSet><name>config.hardware.memoryMB</name><val xsi:type="xsd:int">2048</val>'
        '</propSet>'
        '<propSet><name>summary.storage.committed</name><val xsi:type="xsd:long">'
        '12345678901</val></propSet>'
        '<propSet><name>runtime.instantCloneFrozen</name>'
        '<val xsi:type="xsd:boolean">true</val></propSet>'
        '<propSet><name>config.extraConfig["guestinfo.fleet.name"]</name>'
        '<val xsi:type="OptionValue"><key>guestinfo.fleet.name</key>'
        '<value xsi:type="xsd:string">web</value></val></propSet>'
        '</objects>').encode()
    slow, fast = _both(body)
    assert _contents(fast) == _contents(slow)
    assert fast is not None and fast.token == "t-1"
    props = inv.props(fast.objects[0])
    assert props["runtime.powerState"] == "poweredOff"
    assert props["config.hardware.memoryMB"] == 2048 and props["runtime.instantCloneFrozen"]


@pytest.mark.parametrize("inner", [
    # a device list: data objects the fast decoder does not build
    '<objects><obj type="VirtualMachine">vm-7</obj><propSet><name>config.hardware.device'
    '</name><val xsi:type="ArrayOfVirtualDevice"><VirtualDevice xsi:type="VirtualE1000">'
    '<key>4000</key></VirtualDevice></val></propSet></objects>',
    # a property vCenter could not read
    '<objects><obj type="VirtualMachine">vm-7</obj><missingSet><path>guest.net</path>'
    '<fault><fault xsi:type="NoPermission"/></fault></missingSet></objects>',
    # a value whose type it does not know
    '<objects><obj type="VirtualMachine">vm-7</obj><propSet><name>x</name>'
    '<val xsi:type="xsd:dateTime">2026-12-02T00:00:00Z</val></propSet></objects>',
])
def test_anything_else_is_left_to_pyvmomi(inner: str) -> None:
    with pytest.raises(NotPlain):
        decode_retrieve_result(ENVELOPE.format(inner).encode())


def test_an_empty_reply_is_none_and_other_replies_are_refused() -> None:
    empty = ENVELOPE.replace("<returnval>{}</returnval>", "").encode()
    assert decode_retrieve_result(empty) is None
    with pytest.raises(NotPlain):
        decode_retrieve_result(b"<not xml")
    with pytest.raises(NotPlain):
        decode_retrieve_result(ENVELOPE.replace("RetrievePropertiesExResponse",
                                                "FindChildResponse").encode())


async def test_a_listing_falls_back_to_pyvmomi_when_the_reply_is_not_plain() -> None:
    async with sim_vsphere(small_topology(hosts=2)) as (vs, _vc):
        folder = await vs.find_folder("sources")
        assert folder is not None
        expected = await vs.list_folder_vms(folder, FLEET_LABELS)
        def refuse(body: bytes) -> Any:
            raise NotPlain("refused for the test")

        plain = session_module.decode_retrieve_result
        session_module.decode_retrieve_result = refuse  # type: ignore[assignment]
        try:
            assert await vs.list_folder_vms(folder, FLEET_LABELS) == expected
        finally:
            session_module.decode_retrieve_result = plain
        assert expected


def test_a_reply_with_a_doctype_is_never_read_plainly() -> None:
    laughs = ('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">'
              '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>')
    body = ENVELOPE.format('<objects><obj type="VirtualMachine">vm-1</obj><propSet>'
                           '<name>name</name><val xsi:type="xsd:string">&b;</val></propSet>'
                           '</objects>')
    with pytest.raises(NotPlain):
        decode_retrieve_result((laughs + body.split("\n", 1)[1]).encode())


def test_a_pages_token_is_read_from_its_head() -> None:
    assert RawPage.of(ENVELOPE.format("<token>7</token><objects/>").encode()).token == "7"
    assert RawPage.of(ENVELOPE.format("<objects/>").encode()).token is None
    assert RawPage.of(ENVELOPE.replace("<returnval>{}</returnval>", "").encode()).token is None
    with pytest.raises(NotPlain):  # an entity in it: decoded whole, not guessed at
        RawPage.of(ENVELOPE.format("<token>a&amp;b</token><objects/>").encode())
    with pytest.raises(NotPlain):
        RawPage.of(ENVELOPE.replace("RetrievePropertiesExResponse", "FindChild").encode())


async def test_pages_are_decoded_while_the_next_one_is_asked_for() -> None:
    async with sim_vsphere(small_topology(hosts=2), page_size=2) as (vs, vc):
        folder = await vs.ensure_folder("fleet/pages")
        source = (await vs.find_vms(["frozen-01"]))[0].ref
        for i in range(7):
            task = await vs.start_instant_clone(CloneRequest(source=source, name=f"pg-{i}",
                                                             folder=folder))
            await task.wait(10)
        before = vc.calls.get("ContinueRetrievePropertiesEx", 0)
        overlapped: list[bool] = []
        plain = session_module.decode_retrieve_result

        def slow_decode(body: bytes) -> Any:
            # The first page waits (in its thread) for the next one to reach vCenter.
            if not overlapped:
                deadline = time.monotonic() + 10
                while vc.calls.get("ContinueRetrievePropertiesEx", 0) == before and \
                        time.monotonic() < deadline:
                    time.sleep(0.005)
                overlapped.append(vc.calls.get("ContinueRetrievePropertiesEx", 0) > before)
            return plain(body)

        session_module.decode_retrieve_result = slow_decode  # type: ignore[assignment]
        try:
            listed = await vs.list_folder_vms(folder, FLEET_LABELS)
        finally:
            session_module.decode_retrieve_result = plain
        assert sorted(vm.name for vm in listed) == [f"pg-{i}" for i in range(7)]
        assert overlapped == [True]
        assert vc.calls["ContinueRetrievePropertiesEx"] - before == 3  # pages of 2, 2, 2, 1
