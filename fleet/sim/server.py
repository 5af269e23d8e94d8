"""The simulator's HTTP side: vim25 SOAP at ``/sdk`` plus a small control API.

Endpoints:

- ``POST /sdk``: SOAP calls (cookie ``vmware_soap_session``).
- ``GET /sdk/vimServiceVersions.xml``: API version negotiation, as vCenter serves it.
- ``GET /_sim/stats``: JSON statistics (VMs, clones, sources, conflicts, faults, tasks),
  and ``soap_bytes``: the request and response body bytes ``/sdk`` has carried, what
  a client's reads cost on the wire (the benchmarks' reconcile scenario reads it).
- ``GET|POST|DELETE /_sim/faults``: list, add (one rule object or a list) or clear
  fault-injection rules; ``DELETE /_sim/faults/{id}`` removes one.
- ``POST /_sim/sessions/expire``: expire every authenticated session now.
- ``POST /_sim/hosts/{name}``: ``{"connection_state": "disconnected"}`` and back, and/or
  ``{"maintenance": true}`` (maintenance mode) and back.
- ``POST /_sim/vms/{name}``: ``{"chain_depth": N}`` and/or ``{"frozen": bool}``, to play
  another tool having changed a source behind fleet's back.
- ``GET|POST /_sim/updates``: how the property collector's update stream fails
  (``{"withhold_initial": bool, "drop_fraction": 0..1}``, the topology's ``[updates]``
  at start) and how often it did (``withheld``, ``dropped``); docs/watching.md.

The SOAP endpoints are thin wrappers over ``fleet.sim.dispatch.SoapEndpoint``,
which a socket-less transport (``fleet.testing.loopback``) calls too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import struct
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from fleet.sim.dispatch import SoapEndpoint, SoapReply
from fleet.sim.simulator import Simulator
from fleet.sim.topology import FaultRule, UpdatesConfig
from fleet.sim.vm import VirtualMachine
from fleet.urls import host_port
from fleet.vcenter import MAX_CHAIN_DEPTH

log = logging.getLogger("fleet.sim.server")

MAX_BODY = 16 * 1024 * 1024


class _ConnectionDropped(Exception):
    """The handler dropped the connection on purpose (injected fault)."""


def _drop(request: web.Request) -> None:
    """Reset the TCP connection (RST), as a crashed proxy or load balancer would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class SimApp:
    """aiohttp handlers bound to one :class:`Simulator`."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.endpoint = SoapEndpoint(sim)
        # Counted here, not in the endpoint: the in-process transport has no wire.
        self.soap_bytes: Counter[str] = Counter()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/sdk", self.soap)
        app.router.add_get("/sdk/vimServiceVersions.xml", self.versions)
        app.router.add_get("/_sim/stats", self.stats)
        app.router.add_get("/_sim/faults", self.list_faults)
        app.router.add_post("/_sim/faults", self.add_faults)
        app.router.add_delete("/_sim/faults", self.clear_faults)
        app.router.add_delete("/_sim/faults/{id}", self.remove_fault)
        app.router.add_post("/_sim/sessions/expire", self.expire_sessions)
        app.router.add_post("/_sim/hosts/{name}", self.set_host)
        app.router.add_post("/_sim/vms/{name}", self.set_vm)
        app.router.add_get("/_sim/updates", self.get_updates)
        app.router.add_post("/_sim/updates", self.set_updates)
        app.cleanup_ctx.append(self._reaper)
        return app

    async def _reaper(self, app: web.Application) -> AsyncIterator[None]:
        async def reap() -> None:
            while True:
                await asyncio.sleep(5.0)
                self.sim.reap_sessions()

        task = asyncio.get_running_loop().create_task(reap())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.sim.close()

    # -- SOAP (fleet.sim.dispatch does the work) --------------------------------
    async def soap(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.soap_bytes["requests"] += len(body)
        reply = await self.endpoint.post(
            body, soap_action=request.headers.get("SOAPAction"),
            cookie=request.headers.get("Cookie"), remote=request.remote or "127.0.0.1",
            user_agent=request.headers.get("User-Agent", ""))
        return self._respond(request, reply)

    async def versions(self, request: web.Request) -> web.StreamResponse:
        return self._respond(request, self.endpoint.get(request.path))

    def _respond(self, request: web.Request, reply: SoapReply) -> web.StreamResponse:
        if reply.drop is not None:
            _drop(request)
            raise _ConnectionDropped
        self.soap_bytes["responses"] += len(reply.body)
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)

    # -- control API -----------------------------------------------------------
    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({**self.sim.stats(), "soap_bytes": {
            "requests": self.soap_bytes["requests"], "responses": self.soap_bytes["responses"]}})

    async def list_faults(self, request: web.Request) -> web.Response:
        return web.json_response({"rules": [r.as_dict() for r in self.sim.faults.rules],
                                  "injected": dict(self.sim.faults.injected)})

    async def add_faults(self, request: web.Request) -> web.Response:
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": "body is not JSON"}, status=400)
        items = raw if isinstance(raw, list) else raw.get("rules", [raw]) if isinstance(
            raw, dict) else None
        if not isinstance(items, list):
            return web.json_response({"error": "expected a rule object or a list"}, status=400)
        rules = []
        for i, item in enumerate(items):
            try:
                rules.append(FaultRule.model_validate(item))
            except ValidationError as exc:
                err = exc.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                return web.json_response({"error": f"rules[{i}].{loc}: {err['msg']}"},
                                         status=400)
        added = [self.sim.faults.add(rule).as_dict() for rule in rules]
        return web.json_response({"added": added})

    async def clear_faults(self, request: web.Request) -> web.Response:
        count = len(self.sim.faults.rules)
        self.sim.faults.clear()
        return web.json_response({"removed": count})

    async def remove_fault(self, request: web.Request) -> web.Response:
        try:
            rule_id = int(request.match_info["id"])
        except ValueError:
            return web.json_response({"error": "fault id must be an integer"}, status=400)
        if not self.sim.faults.remove(rule_id):
            return web.json_response({"error": f"no fault rule {rule_id}"}, status=404)
        return web.json_response({"removed": 1})

    async def expire_sessions(self, request: web.Request) -> web.Response:
        return web.json_response({"expired": self.sim.expire_all_sessions()})

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text="body is not JSON") from None
        if not isinstance(raw, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return raw

    async def set_host(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        host = self.sim.hosts.get(name)
        if host is None:
            return web.json_response({"error": f"no host {name!r}"}, status=404)
        raw = await self._json(request)
        unknown = sorted(set(raw) - {"connection_state", "maintenance"})
        if unknown or not raw:
            return web.json_response(
                {"error": f"unknown key {unknown[0]!r} (connection_state, maintenance)"
                 if unknown else "give connection_state and/or maintenance"}, status=400)
        state = raw.get("connection_state", host.connection_state)
        if state not in ("connected", "disconnected", "notResponding"):
            return web.json_response(
                {"error": "connection_state must be connected, disconnected or notResponding"},
                status=400)
        maintenance = raw.get("maintenance", host.maintenance)
        if not isinstance(maintenance, bool):
            return web.json_response({"error": "maintenance must be true or false"},
                                     status=400)
        if state != host.connection_state:
            host.set_connection_state(state)
        if maintenance != host.maintenance:
            host.set_maintenance(maintenance)
        return web.json_response({"host": name, "connection_state": state,
                                  "maintenance": maintenance})

    async def get_updates(self, request: web.Request) -> web.Response:
        return web.json_response(self.sim.update_faults.as_dict())

    async def set_updates(self, request: web.Request) -> web.Response:
        raw = await self._json(request)
        unknown = sorted(set(raw) - {"withhold_initial", "drop_fraction"})
        if unknown:
            return web.json_response({"error": f"unknown key {unknown[0]!r} (withhold_initial, "
                                               "drop_fraction)"}, status=400)
        try:
            merged = {"withhold_initial": self.sim.update_faults.withhold_initial,
                      "drop_fraction": self.sim.update_faults.drop_fraction, **raw}
            valid = UpdatesConfig.model_validate(merged)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            return web.json_response({"error": f"{loc}: {err['msg']}"}, status=400)
        self.sim.update_faults.withhold_initial = valid.withhold_initial
        self.sim.update_faults.drop_fraction = valid.drop_fraction
        return web.json_response(self.sim.update_faults.as_dict())

    async def set_vm(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        vm = next((v for v in self.sim.inventory.of_type(VirtualMachine) if v.name == name), None)
        if vm is None:
            return web.json_response({"error": f"no VM {name!r}"}, status=404)
        raw = await self._json(request)
        depth = raw.get("chain_depth")
        if depth is not None:
            if not isinstance(depth, int) or not 1 <= depth <= MAX_CHAIN_DEPTH:
                return web.json_response({"error": "chain_depth must be an integer "
                                                   f"1..{MAX_CHAIN_DEPTH}"},
                                         status=400)
            vm.set_chain_depth(depth)
        frozen = raw.get("frozen")
        if frozen is not None:
            if not isinstance(frozen, bool):
                return web.json_response({"error": "frozen must be true or false"}, status=400)
            if frozen and vm.power_state != "poweredOn":
                return web.json_response({"error": "only a powered-on VM can be frozen"},
                                         status=400)
            if frozen:
                vm.freeze()
            else:
                vm.unfreeze()
        return web.json_response({"vm": name, "chain_depth": vm.chain_depth(),
                                  "frozen": vm.frozen})


@dataclass
class RunningSim:
    """A simulator being served; ``url`` is its ``/sdk`` endpoint."""

    sim: Simulator
    runner: web.AppRunner
    url: str
    base_url: str

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve(sim: Simulator, host: str = "127.0.0.1", port: int = 8989,
                tls: ssl.SSLContext | None = None) -> RunningSim:
    """Start serving ``sim``; port 0 picks a free port (the URL says which)."""
    handlers = SimApp(sim)
    runner = web.AppRunner(handlers.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls, backlog=1024, reuse_address=True)
    await site.start()
    actual_port = port
    sockets = getattr(site._server, "sockets", None)
    if sockets:
        actual_port = sockets[0].getsockname()[1]
    scheme = "https" if tls is not None else "http"
    base = f"{scheme}://{host_port(host, actual_port)}"
    return RunningSim(sim, runner, f"{base}/sdk", base)
