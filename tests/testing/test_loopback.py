"""The loopback transport is the HTTP transport without sockets: the same bytes, cookies,
deadlines and failures, side by side against one simulator served both ways."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from pyVmomi import vim

from fleet import errors
from fleet.sim.dispatch import SoapEndpoint
from fleet.sim.server import serve
from fleet.sim.simulator import Simulator
from fleet.sim.topology import FaultRule
from fleet.testing.harness import sim_vsphere, small_topology
from fleet.testing.loopback import LoopbackServer
from fleet.vsphere.transport import (
    MIN_VERSION,
    SoapTransport,
    Transport,
    VimStub,
    session_key_of,
)

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def both_ways() -> AsyncIterator[tuple[Simulator, dict[str, Transport]]]:
    """One simulator, served over HTTP on 127.0.0.1 and in process; a transport to each."""
    sim = Simulator(small_topology(hosts=1))
    running = await serve(sim, port=0)
    loopback = LoopbackServer(SoapEndpoint(sim))
    transports: dict[str, Transport] = {"http": SoapTransport(running.url),
                                        "loopback": loopback.transport()}
    try:
        for t in transports.values():
            await t.open()
        yield sim, transports
    finally:
        for t in transports.values():
            await t.close()
        await loopback.aclose()
        await running.close()


def content_request() -> bytes:
    stub = VimStub(MIN_VERSION)
    si = vim.ServiceInstance("ServiceInstance", stub)
    return stub.serialize(si, si._GetMethodInfo("RetrieveContent"), [])


async def post(t: Transport, body: bytes, *, key: str | None = None,
               timeout_s: float = 5.0) -> Any:
    return await t.post(body, action=VimStub(MIN_VERSION).versionId, session_key=key,
                        timeout_s=timeout_s, method="RetrieveServiceContent")


async def test_the_same_bytes_come_back_both_ways() -> None:
    async with both_ways() as (_, ts):
        versions = {name: await t.negotiate() for name, t in ts.items()}
        assert versions["http"] == versions["loopback"] is not None
        body = content_request()
        replies = {name: await post(t, body) for name, t in ts.items()}
    assert replies["http"].status == replies["loopback"].status == 200
    assert replies["http"].body == replies["loopback"].body
    # each got a session cookie of its own, read by the same rule
    assert replies["http"].session_key and replies["loopback"].session_key
    assert replies["http"].session_key != replies["loopback"].session_key


@pytest.mark.parametrize(("fault", "raised", "served"), [
    ("http:reset", errors.ConnectionFailed, False),  # dropped before any work
    ("http:lost_reply", errors.ConnectionFailed, True),  # the work done, no reply
    ("http:503", errors.NotDelivered, False),  # a proxy's 503: never delivered
])
async def test_injected_faults_fail_alike(fault: str, raised: type[Exception],
                                          served: bool) -> None:
    async with both_ways() as (sim, ts):
        for t in ts.values():
            sim.faults.add(FaultRule(method="RetrieveServiceContent", fault=fault,
                                     max_count=1))
            before = sim.calls["RetrieveServiceContent"]
            with pytest.raises(raised) as info:
                await post(t, content_request())
            assert type(info.value) is raised
            assert sim.calls["RetrieveServiceContent"] - before == served
            # and the next exchange goes through
            assert (await post(t, content_request())).status == 200


async def test_a_deadline_is_a_request_timeout_and_the_work_goes_on() -> None:
    async with both_ways() as (sim, ts):
        for t in ts.values():
            # vCenter takes 0.3 s to answer; the client waits 0.05 s
            rule = sim.faults.add(FaultRule(method="RetrieveServiceContent", fault="slow",
                                            phase="call", delay_s=0.3, max_count=1))
            before = sim.calls["RetrieveServiceContent"]
            with pytest.raises(errors.RequestTimeout):
                await post(t, content_request(), timeout_s=0.05)
            with anyio.fail_after(10):
                for _ in itertools.count():
                    if sim.calls["RetrieveServiceContent"] > before:
                        break
                    await anyio.sleep(0.01)
            assert rule.fired == 1


async def test_a_cancelled_call_still_lands_in_vcenter() -> None:
    async with sim_vsphere(small_topology(hosts=1)) as (vs, vc):
        parent = await vs.ensure_folder("t")
        # CreateFolder takes a while in vCenter; the caller gives up at once
        vc.add_fault(method="CreateFolder", fault="slow", phase="call", delay_s=0.2)
        with anyio.move_on_after(0.01) as scope:
            await vs.new_folder(parent, "late")
        assert scope.cancelled_caught
        with anyio.fail_after(10):
            for _ in itertools.count():
                if await vs.find_folder("t/late") is not None:
                    break
                await anyio.sleep(0.02)


async def test_the_session_cookie_travels_and_an_expired_session_logs_in_again() -> None:
    async with sim_vsphere(small_topology(hosts=1)) as (vs, vc):
        assert [s.authenticated for s in vc.sim.sessions.values()] == [True]
        assert vc.sim.expire_all_sessions() == 1
        (vm,) = await vs.find_vms(["frozen-01"])
        assert vm.name == "frozen-01"
        assert vs.session.stats.relogins == 1
        assert sum(s.authenticated for s in vc.sim.sessions.values()) == 1


async def test_a_stopped_simulator_is_never_reached() -> None:
    sim = Simulator(small_topology(hosts=1))
    server = LoopbackServer(SoapEndpoint(sim))
    t = server.transport()
    await t.open()
    await server.aclose()
    with pytest.raises(errors.NotDelivered):
        await post(t, content_request())
    await sim.close()


def test_set_cookie_is_read_by_the_transport_s_rule() -> None:
    assert session_key_of('vmware_soap_session="abc123"; Path=/; HttpOnly; Secure') == "abc123"
