"""TLS trust (refused by default, CA file, pinned thumbprint, insecure) and endpoint checks."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from fleet import errors
from fleet.vsphere.model import CloneRequest
from tests.simproc import SimProcess
from tests.vsphere.conftest import client_for, unique

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["protocol", "aiohttp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_self_signed_certificate_refused_by_default(sim: SimProcess,
                                                          transport: str) -> None:
    with pytest.raises(errors.TlsVerificationFailed) as info:
        async with client_for(sim, ca_file=None, transport=transport):
            pass
    assert "ca_file" in str(info.value) and "thumbprint" in str(info.value)


async def test_ca_file_trusts_it(sim: SimProcess, transport: str) -> None:
    async with client_for(sim, ca_file=sim.cert_path, transport=transport) as vs:
        assert (await vs.server_info()).api_type == "VirtualCenter"


async def test_pinned_thumbprint_trusts_it(sim: SimProcess, transport: str) -> None:
    assert sim.thumbprint is not None
    async with client_for(sim, ca_file=None, thumbprint=sim.thumbprint,
                          transport=transport) as vs:
        assert (await vs.find_vms(["frozen-01"]))[0].name == "frozen-01"
    async with client_for(sim, ca_file=None, thumbprint=sim.thumbprint.replace(":", "").lower(),
                          transport=transport) as vs:
        await vs.server_info()


async def test_wrong_thumbprint_refused(sim: SimProcess, transport: str) -> None:
    wrong = "AB:" * 31 + "CD"
    with pytest.raises(errors.TlsVerificationFailed, match="thumbprint"):
        async with client_for(sim, ca_file=None, thumbprint=wrong, transport=transport):
            pass


async def test_insecure_works_and_warns(sim: SimProcess, transport: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fleet.vsphere"):
        async with client_for(sim, ca_file=None, insecure=True, transport=transport) as vs:
            await vs.server_info()
    assert any("verification is OFF" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


# -- endpoints that cannot instant-clone ------------------------------------------------

@pytest.fixture(scope="module")
def old_vcenter() -> Iterator[SimProcess]:
    with SimProcess(topology_text='[vcenter]\napi_version = "6.5"\n[[sources]]\n'
                                  'name = "src"\nstate = "frozen"\n',
                    time_scale=0.02) as process:
        yield process


@pytest.fixture(scope="module")
def esxi() -> Iterator[SimProcess]:
    with SimProcess(topology_text='[vcenter]\nkind = "esxi"\n[[sources]]\nname = "src"\n'
                                  'state = "frozen"\n', time_scale=0.02) as process:
        yield process


async def _clone_request(vs: object) -> CloneRequest:
    (src,) = await vs.find_vms(["src"])  # type: ignore[attr-defined]
    folder = await vs.ensure_folder("x")  # type: ignore[attr-defined]
    return CloneRequest(source=src.ref, name=unique("u"), folder=folder)


async def test_api_older_than_6_7(old_vcenter: SimProcess) -> None:
    async with client_for(old_vcenter) as vs:
        assert vs.session.stub.version == "vim.version.version11"  # negotiated 6.5
        with pytest.raises(errors.UnsupportedEndpoint, match=r"6\.7 or later"):
            await vs.server_info()
        request = await _clone_request(vs)
        with pytest.raises(errors.UnsupportedEndpoint):
            await vs.start_instant_clone(request)
        with pytest.raises(errors.UnsupportedEndpoint):
            await vs.check_instant_clone(request)
        assert "InstantClone_Task" not in vs.stats["calls"]  # refused before any clone


async def test_bare_esxi(esxi: SimProcess) -> None:
    async with client_for(esxi) as vs:
        with pytest.raises(errors.UnsupportedEndpoint, match="standalone ESXi"):
            await vs.server_info()
        with pytest.raises(errors.UnsupportedEndpoint):
            await vs.start_instant_clone(await _clone_request(vs))
        assert "InstantClone_Task" not in vs.stats["calls"]


async def test_method_not_found_for_instant_clone(sim: SimProcess) -> None:
    await_rules = sim.add_faults({"method": "InstantClone_Task", "object": "frozen-02",
                                  "fault": "MethodNotFound", "phase": "call", "max_count": 1})
    assert await_rules["added"]
    try:
        async with client_for(sim) as vs:
            (src,) = await vs.find_vms(["frozen-02"])
            folder = await vs.ensure_folder("t/mnf")
            request = CloneRequest(source=src.ref, name=unique("mnf"), folder=folder)
            with pytest.raises(errors.UnsupportedEndpoint):
                await vs.start_instant_clone(request)
            # From now on the client refuses before asking again.
            with pytest.raises(errors.UnsupportedEndpoint):
                await vs.start_instant_clone(request)
            with pytest.raises(errors.UnsupportedEndpoint):
                await vs.server_info()
            assert vs.stats["calls"]["InstantClone_Task"] == 1
    finally:
        sim.clear_faults()
