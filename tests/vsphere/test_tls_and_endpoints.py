"""TLS trust (refused by default, CA file, pinned thumbprint, insecure) and endpoint checks."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import errors
from fleet.vsphere.client import RetryPolicy, VSphereClient
from fleet.vsphere.model import CloneRequest
from fleet.vsphere.tls import TlsOptions, ssl_for
from tests import specs
from tests.simproc import PASSWORD, USER, SimProcess
from tests.vsphere.conftest import client_for, unique

pytestmark = pytest.mark.anyio


async def test_self_signed_certificate_refused_by_default(sim: SimProcess) -> None:
    with pytest.raises(errors.TlsVerificationFailed) as info:
        async with client_for(sim, ca_file=None):
            pass
    # The remedy names the keys users write in a spec or a serve config.
    text = str(info.value)
    assert "vcenter.ca_file" in text and "vcenter.thumbprint" in text
    assert "tls " not in text and "tls." not in text


async def test_ca_file_trusts_it(sim: SimProcess) -> None:
    async with client_for(sim, ca_file=sim.cert_path) as vs:
        assert (await vs.server_info()).api_type == "VirtualCenter"


async def test_pinned_thumbprint_trusts_it(sim: SimProcess) -> None:
    assert sim.thumbprint is not None
    async with client_for(sim, ca_file=None, thumbprint=sim.thumbprint) as vs:
        assert (await vs.find_vms(["frozen-01"]))[0].name == "frozen-01"
    async with client_for(sim, ca_file=None,
                          thumbprint=sim.thumbprint.replace(":", "").lower()) as vs:
        await vs.server_info()


async def test_wrong_thumbprint_refused(sim: SimProcess) -> None:
    wrong = "AB:" * 31 + "CD"
    with pytest.raises(errors.TlsVerificationFailed, match=r"vcenter\.thumbprint"):
        async with client_for(sim, ca_file=None, thumbprint=wrong):
            pass


async def test_insecure_works_and_warns(sim: SimProcess,
                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fleet.vsphere"):
        async with client_for(sim, ca_file=None, insecure=True) as vs:
            await vs.server_info()
    assert any("verification is OFF" in r.getMessage() and "vcenter.insecure" in r.getMessage()
               and r.levelno == logging.WARNING for r in caplog.records)


# -- every TLS error names the key a user sets: vcenter.ca_file / thumbprint / insecure --

URL = "https://127.0.0.1:1/sdk"


def test_missing_ca_file_names_vcenter_ca_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    with pytest.raises(errors.ConfigError) as info:
        ssl_for(TlsOptions(ca_file=missing), URL)
    assert info.value.key == "vcenter.ca_file"
    assert str(info.value).startswith("vcenter.ca_file: ") and str(missing) in str(info.value)


def test_ca_file_that_is_not_pem_names_vcenter_ca_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(errors.ConfigError) as info:
        ssl_for(TlsOptions(ca_file=junk), URL)
    assert info.value.key == "vcenter.ca_file"
    assert "not a PEM certificate" in str(info.value)


def test_an_empty_ca_file_trusts_nothing_not_the_system_cas(tmp_path: Path) -> None:
    """An empty cadata is none to ``ssl.create_default_context``, which then loads the
    system's CAs: an empty CA file must be an error, not every public CA trusted."""
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(errors.ConfigError) as info:
        ssl_for(TlsOptions(ca_file=empty), URL)
    assert info.value.key == "vcenter.ca_file" and "holds no PEM certificate" in str(info.value)


async def test_several_ca_files_are_trusted_together(sim: SimProcess, tmp_path: Path) -> None:
    """govc's GOVC_TLS_CA_CERTS lists several files (docs/connecting.md): each is trusted."""
    from fleet.sim import certs

    other = tmp_path / "other.pem"
    other.write_bytes(certs.generate().cert_pem)
    ctx = ssl_for(TlsOptions(ca_file=(other, sim.cert_path)), URL)
    assert isinstance(ctx, ssl.SSLContext) and ctx.cert_store_stats()["x509"] == 2
    async with client_for(sim, ca_file=(other, sim.cert_path)) as vs:
        assert (await vs.server_info()).api_type == "VirtualCenter"
    with pytest.raises(errors.TlsVerificationFailed):
        async with client_for(sim, ca_file=(other,)):
            pass


@pytest.mark.parametrize("thumbprint, why", [("AB:" * 19 + "CD", "SHA-1"),
                                             ("not hex at all", "64 hex digits")])
def test_bad_thumbprint_names_vcenter_thumbprint(thumbprint: str, why: str) -> None:
    with pytest.raises(errors.ConfigError) as info:
        TlsOptions(thumbprint=thumbprint)
    assert info.value.key == "vcenter.thumbprint"
    assert str(info.value).startswith("vcenter.thumbprint: ") and why in str(info.value)


def test_two_ways_of_trust_name_both_keys(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError) as info:
        TlsOptions(ca_file=tmp_path / "ca.pem", insecure=True)
    assert info.value.key == "vcenter.insecure"
    assert "vcenter.ca_file and vcenter.insecure" in str(info.value)


def test_cli_names_vcenter_ca_file_for_a_file_that_is_not_pem(sim: SimProcess,
                                                             tmp_path: Path) -> None:
    """End to end: the spec passes validation (the file is readable); connecting finds it
    is no certificate, and the user reads the key to fix with the usage-error code."""
    junk = tmp_path / "ca.pem"
    junk.write_text("-----BEGIN NOTHING-----\n")
    data = specs.spec_data(sim, "tlskeys", 1)
    del data["vcenter"]["thumbprint"]
    data["vcenter"]["ca_file"] = str(junk)
    spec = tmp_path / "fleet.toml"
    spec.write_text(specs.to_toml(data))
    result = subprocess.run([sys.executable, "-m", "fleet", "plan", "--spec", str(spec)],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, **specs.ENV))
    assert result.returncode == 2, result.stderr
    assert "vcenter.ca_file" in result.stderr and "tls." not in result.stderr


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


# -- a URL with the wrong scheme says so ---------------------------------------------------

@pytest.fixture(scope="module")
def http_sim() -> Iterator[SimProcess]:
    with SimProcess(time_scale=0.02, http=True) as process:
        yield process


async def _config_error(url: str, **kw: object) -> errors.ConfigError:
    with pytest.raises(errors.ConfigError) as info:
        async with VSphereClient(url, USER, PASSWORD, **kw):  # type: ignore[arg-type]
            pass
    return info.value


async def test_http_url_against_an_https_server_says_it_speaks_tls(sim: SimProcess) -> None:
    url = sim.url.replace("https://", "http://")
    error = await _config_error(url, insecure=True)
    assert error.key == "vcenter.url"
    assert "speaks TLS" in str(error) and "looks like an https server" in str(error)
    assert f"use {sim.url}" in str(error)


async def test_https_url_against_a_plain_http_server_says_it_is_plain_http(
        http_sim: SimProcess, sim: SimProcess) -> None:
    url = http_sim.url.replace("http://", "https://")
    error = await _config_error(url, insecure=True)
    assert error.key == "vcenter.url"
    assert "TLS handshake failed" in str(error)
    assert "looks like a plain http server" in str(error)
    assert f"use {http_sim.url}" in str(error)
    # Also when the URL's trust is a CA file rather than insecure.
    assert "plain http" in str(await _config_error(url, ca_file=sim.cert_path))


async def test_a_plain_server_that_just_hangs_up_is_not_taken_for_tls() -> None:
    """The probe must find TLS before it is named: a server that closes every connection
    leaves the ordinary connection error."""
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(errors.ConnectionFailed) as info:
            async with VSphereClient(f"http://127.0.0.1:{port}/sdk", USER, PASSWORD,
                                     insecure=True,
                                     retry=RetryPolicy(max_retries=0)):
                pass
        assert "TLS" not in str(info.value)
    finally:
        server.close()
        await server.wait_closed()
