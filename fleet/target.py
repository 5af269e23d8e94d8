"""Where fleet's commands point: a vCenter, or the built-in simulator.

The vCenter is the first named by the command line (``--vcenter-url``), the spec's
``[vcenter]``, ``FLEET_VCENTER_*`` or govc's ``GOVC_*`` variables
(:func:`connect_spec`, by the rules of ``fleet.engine.connection`` and
docs/connecting.md). When none is named, ``provision``, ``plan`` and ``sources``
target a simulator that fleet starts for the command, and say so: ``python -m
fleet sim`` on a free loopback port, in its own process (so it has its own core
and survives our Ctrl-C long enough for a clean stop), with a random password
passed through the environment and its self-signed certificate pinned by
thumbprint. It is stopped when the command ends, and everything it held is gone
with it. So commands that read what a fleet already is (``status``, ``destroy``,
``inventory``) never use one: their answer from a fresh simulator would mean
nothing. They open their target with ``open_target(spec, simulator=False)``
(or check first with :func:`require_vcenter`), which refuses with how to point
at a vCenter.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from fleet.engine.connection import HOW_TO_POINT, resolve_connection
from fleet.engine.spec import DEMO_ORIGIN, FleetSpec, VCenterSpec, spec_from_dict
from fleet.errors import ConfigError, ConnectionFailed
from fleet.urls import redact_url
from fleet.vsphere.client import VSphereClient
from fleet.vsphere.session import CallObserver
from fleet.vsphere.tls import TlsOptions

SIM_USER = "administrator@vsphere.local"
SIM_GUEST_USER = "root"
SIM_GUEST_PASSWORD = "fleet-guest"  # the default topology's guest password (a simulator)
SIM_GUEST_ENV = "FLEET_SIM_GUEST_PASSWORD"
SIM_START_TIMEOUT_S = 30.0


@dataclass
class Target:
    client: VSphereClient
    simulated: bool
    url: str  # redacted (fleet.urls): for messages


def demo_spec(count: int, name: str = "demo") -> FleetSpec:
    """The spec ``fleet provision --count N`` uses without ``--spec``: every source of the
    built-in simulator's default topology, the Linux network workflow."""
    from fleet.sim.topology import load_topology

    topology = load_topology(None)
    sources: list[str] = []
    for vm in topology.sources:
        if vm.count:
            sources.extend(vm.name.format(index=i + 1) for i in range(vm.count))
        else:
            sources.append(vm.name)
    return spec_from_dict({
        "name": name,
        "count": count,
        "sources": sources,
        "network": {"guest_user": SIM_GUEST_USER, "guest_password_env": SIM_GUEST_ENV},
    }, source=DEMO_ORIGIN, env={SIM_GUEST_ENV: SIM_GUEST_PASSWORD})


async def _read_until(stream: TextReceiveStream, pattern: re.Pattern[str], seen: list[str]
                      ) -> re.Match[str]:
    buffer = ""
    async for chunk in stream:
        buffer += chunk
        while "\n" in buffer:
            line, buffer = buffer.split("\n", 1)
            seen.append(line)
            match = pattern.search(line)
            if match:
                return match
    raise ConnectionFailed("the built-in simulator exited before it was ready: "
                           + " | ".join(seen[-5:]))


@contextlib.asynccontextmanager
async def builtin_simulator(*, time_scale: float = 1.0, topology: str | None = None
                            ) -> AsyncIterator[tuple[str, str, str]]:
    """Run ``fleet sim``; yields (url, password, SHA-256 thumbprint of its certificate)."""
    password = secrets.token_urlsafe(18)
    workdir = Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    cert = workdir / "sim-cert.pem"
    log_path = workdir / "sim.log"
    args = [sys.executable, "-m", "fleet", "sim", "--listen", "127.0.0.1:0",
            "--time-scale", repr(time_scale), "--user", SIM_USER, "--write-cert", str(cert)]
    if topology:
        args += ["--topology", topology]
    env = dict(os.environ, FLEET_SIM_PASSWORD=password, PYTHONUNBUFFERED="1")
    log_file = log_path.open("wb")
    process: Process = await anyio.open_process(args, env=env, start_new_session=True,
                                                stdin=subprocess.DEVNULL, stderr=log_file)
    try:
        assert process.stdout is not None
        seen: list[str] = []
        try:
            with anyio.fail_after(SIM_START_TIMEOUT_S):
                url = await _read_until(TextReceiveStream(process.stdout),
                                        re.compile(r"listening on (\S+)"), seen)
        except ConnectionFailed:
            detail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise ConnectionFailed("the built-in simulator did not start: "
                                   + " | ".join(detail)) from None
        der = ssl.PEM_cert_to_DER_cert(cert.read_text())
        digest = hashlib.sha256(der).hexdigest().upper()
        yield url.group(1), password, ":".join(digest[i:i + 2] for i in range(0, 64, 2))
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with anyio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await process.aclose()
            log_file.close()
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.asynccontextmanager
async def open_vcenter(vc: VCenterSpec | None, *, observer: CallObserver | None = None,
                       announce: Callable[[str], Any] | None = None,
                       sim_time_scale: float = 1.0, sim_topology: str | None = None,
                       **client_options: Any) -> AsyncIterator[Target]:
    """A connected client for ``vc`` (a spec's or the service's ``[vcenter]``), or for
    a fresh built-in simulator when there is none. ``announce`` hears which simulator."""
    if vc is not None:
        ca_files = vc.ca_paths
        tls = TlsOptions(ca_file=ca_files if len(ca_files) > 1 else vc.ca_path,
                         thumbprint=vc.thumbprint, insecure=vc.insecure,
                         insecure_from=vc.insecure_from)
        client = VSphereClient(vc.url, vc.user, vc.password.get_secret_value(), tls=tls,
                               use_env_proxy=vc.use_env_proxy, observer=observer,
                               **client_options)
        async with client:
            yield Target(client, False, redact_url(vc.url))
        return
    async with builtin_simulator(time_scale=sim_time_scale, topology=sim_topology) as (
            url, password, thumbprint):
        if announce is not None:
            scale = "" if sim_time_scale == 1 else f", time scale {sim_time_scale:g}"
            announce(f"no vCenter configured: using the built-in simulator at {redact_url(url)} "
                     f"({sim_topology or 'default topology'}{scale})")
        client = VSphereClient(url, SIM_USER, password, thumbprint=thumbprint,
                               observer=observer, **client_options)
        async with client:
            yield Target(client, True, url)


def connect_spec(spec: FleetSpec, *, env: Mapping[str, str] | None = None,
                 flags: Mapping[str, Any] | None = None,
                 announce: Callable[[str], Any] | None = None) -> FleetSpec:
    """``spec`` pointing at the vCenter the command line, the spec and the environment
    name together (``fleet.engine.connection``, docs/connecting.md): the spec itself
    when that is its own ``[vcenter]`` or none at all, else a copy with that vCenter.
    ``announce`` hears where a vCenter from outside the spec came from, and which
    variables lost to the spec. A :class:`~fleet.engine.spec.SpecError` (exit 2) names
    a bad or incomplete variable or flag."""
    found = resolve_connection(spec.vcenter, env=env, flags=flags,
                               spec_origin=f"{spec.origin}'s [vcenter]")
    if announce is not None and found.ignored:
        announce(f"using the vCenter of {found.origin}; ignoring "
                 + ", ".join(found.ignored) + " (docs/connecting.md)")
    if found.vcenter is spec.vcenter:
        return spec
    assert found.vcenter is not None
    if announce is not None:
        announce(f"vCenter {redact_url(found.vcenter.url)} (from {found.origin})")
    # A copy keeps the private attributes: the spec's origin and guest password.
    return spec.model_copy(update={"vcenter": found.vcenter})


def require_vcenter(spec: FleetSpec, command: str) -> None:
    """Refuse (exit 2) a command whose answer would mean nothing from a fresh built-in
    simulator (``status``, ``destroy``, ``inventory``) when no vCenter is named."""
    if spec.vcenter is None:
        raise ConfigError(f"`fleet {command}` reads fleets that already exist, and no vCenter "
                          f"is named (a built-in simulator would start empty, so its answer "
                          f"would mean nothing): {HOW_TO_POINT}")


@contextlib.asynccontextmanager
async def open_target(spec: FleetSpec, *, simulator: bool = True, command: str = "",
                      **options: Any) -> AsyncIterator[Target]:
    """:func:`open_vcenter` for a fleet spec's ``[vcenter]``. With ``simulator=False``
    (``status``, ``destroy``, ``inventory``: ``command`` names it for the message) a
    spec without one is refused (:func:`require_vcenter`) instead of starting the
    built-in simulator."""
    if not simulator:
        require_vcenter(spec, command or "this command")
    async with open_vcenter(spec.vcenter, **options) as target:
        yield target
