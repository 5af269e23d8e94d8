"""The HTTP side of ``fleet serve``: routes, authentication, body rules, error shapes.

=======  ===========================  ==============================================
method   path                         what
=======  ===========================  ==============================================
GET      /healthz                     the process serves (no token)
GET      /readyz                      vCenter reachable, fleets discovered (no token)
GET      /metrics                     Prometheus exposition (no token)
GET      /v1/openapi.json             the OpenAPI 3.1 document
GET      /v1/fleets                   every fleet, summarised
POST     /v1/fleets                   create or re-specify a fleet (spec in the body)
GET      /v1/fleets/{name}            a fleet, its members, states, phase timings,
                                      addresses (docs/inventory.md)
GET      /v1/fleets/{name}/inventory  its members as json, ansible, hosts or csv
PUT      /v1/fleets/{name}            create or re-specify this fleet
PATCH    /v1/fleets/{name}            change count and/or ttl_s
DELETE   /v1/fleets/{name}            destroy the fleet (in the background)
GET      /v1/pools                    the warm pools this client may lease from
GET      /v1/pools/{pool}             one pool: its targets and members by state
POST     /v1/pools/{pool}/leases      lease an idle member (docs/pools.md)
GET      /v1/leases                   this client's leases (an admin's: all)
GET      /v1/leases/{id}              one lease, with its member's record
PATCH    /v1/leases/{id}              extend it (``ttl_s`` from now)
DELETE   /v1/leases/{id}              return it: the member is destroyed
=======  ===========================  ==============================================

Everything under ``/v1`` needs ``Authorization: Bearer <token>``; the token names
the client (``fleet.api.tokens``: its SHA-256 is compared with every client's by
:func:`hmac.compare_digest`, equal lengths, so not even the token's length shows in
the timing). A client sees and changes its own fleets only (another's is 404, its
name on create 403) within its quotas (429); an admin sees all. Every
state-changing request, and every 401, is written to the audit log
(``fleet.api.audit``). Every refusal is JSON, ``{"error": {"status",
"message", "problems"?}}``, with a 4xx status: 400 (not JSON, bad query), 401, 403,
404, 405, 408 (body slower than ``api.body_timeout_s``), 409, 413 (body over
``api.max_body_bytes``), 415 (not ``application/json``), 422 (not a valid spec, or a
source vCenter does not have: ``problems`` name each field), 429 (a quota:
``quota`` names it), and 503 (the service is stopping; an inventory vCenter could
not give; the audit log cannot be written). The OpenAPI document
(``fleet.api.openapi``) lists them all; docs/api.md.
Connections themselves are bounded and timed out by :mod:`fleet.api.edge`.
An unexpected exception is logged and answered 500 without detail; the tests'
fuzzing makes sure none happens.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from aiohttp import web

from fleet.api.audit import AuditLog
from fleet.api.config import ServiceConfig
from fleet.api.openapi import openapi_document
from fleet.api.pools import Lease
from fleet.api.requests import (
    MAX_LIMIT,
    MAX_OFFSET,
    ApiError,
    extend_request,
    fleet_request,
    lease_request,
    parse_json,
    scale_request,
    valid_name,
)
from fleet.api.service import FleetRecord, FleetService
from fleet.api.tokens import Client, ClientTable
from fleet.errors import FleetError
from fleet.inventory import CONTENT_TYPES, FORMATS, render
from fleet.metrics import CONTENT_TYPE, FleetMetrics

log = logging.getLogger("fleet.api.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC = ("/healthz", "/readyz", "/metrics")
SERVICE_KEY: web.AppKey[FleetService] = web.AppKey("service", FleetService)
CONFIG_KEY: web.AppKey[ServiceConfig] = web.AppKey("config", ServiceConfig)
CLIENTS_KEY: web.AppKey[ClientTable] = web.AppKey("clients", ClientTable)
AUDIT_KEY: web.AppKey[AuditLog] = web.AppKey("audit", AuditLog)
DOC_KEY: web.AppKey[bytes] = web.AppKey("openapi", bytes)
METRICS_KEY: web.AppKey[FleetMetrics] = web.AppKey("metrics", FleetMetrics)
#: who is calling (set once the token is known), what about, and why it was refused
CLIENT: web.RequestKey[Client] = web.RequestKey("client", Client)
OBJECT: web.RequestKey[str] = web.RequestKey("object", str)
REFUSAL: web.RequestKey[str] = web.RequestKey("refusal", str)
#: methods that change nothing (not audited unless refused a token)
READS = ("GET", "HEAD", "OPTIONS")
#: the longest name an audit line repeats from a URL that names no valid fleet
MAX_OBJECT_CHARS = 80


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None
          ) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


def _route(request: web.Request) -> str:
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None or getattr(info, "http_exception", None) is not None:
        return "unmatched"
    return str(resource.canonical)


#: Retry-After of a 503 that names no better time (the service stopping, a state
#: directory or audit log that cannot be written, vCenter not answering)
UNAVAILABLE_RETRY_S = 5

@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time every request, and turn every refusal into the JSON error shape."""
    t0 = time.perf_counter()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except ApiError as exc:
        headers = {"WWW-Authenticate": 'Bearer realm="fleet"'} if exc.status == 401 else {}
        if exc.status == 503 and exc.retry_after is None:
            exc.retry_after = UNAVAILABLE_RETRY_S  # every 503 says when to come back
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        response = _json(exc.to_dict(), exc.status, headers)
        request[REFUSAL] = _refusal(exc)
        if exc.status == 408:
            # Answer, then hang up: aiohttp would read and drop the rest of the body
            # for another 10 s (its lingering_time) first.
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()
    except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, too large
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",)}
        message = exc.reason
        if exc.status == 413:
            message = f"the body is larger than {request.app[CONFIG_KEY].api.max_body_bytes} " \
                      "bytes"
        response = _json(ApiError(exc.status, message).to_dict(), exc.status, headers)
        request[REFUSAL] = message
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = _json(ApiError(500, "internal error").to_dict(), 500)
        request[REFUSAL] = "internal error"
    request.app[METRICS_KEY].observe_api(_route(request), request.method, response.status,
                                         time.perf_counter() - t0)
    return response


def _refusal(exc: ApiError) -> str:
    """Why a request was refused, for the audit log: a body's problems by key only
    (their messages may repeat what the body holds)."""
    if exc.problems:
        keys = ", ".join(p.key or "(body)" for p in exc.problems[:20])
        return f"invalid request body; problems at: {keys}"
    return exc.message


def _object(request: web.Request) -> str | None:
    if OBJECT in request:
        return request[OBJECT]
    info = request.match_info
    name = info.get("name") or info.get("pool") or info.get("lease")
    if not isinstance(name, str):
        return None
    return name if valid_name(name) else name[:MAX_OBJECT_CHARS]


@web.middleware
async def _audit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost (of the app's): write the audit line of every state-changing request
    under /v1 and of every 401, once its answer is known (fleet.api.audit)."""
    response = await handler(request)  # _errors answers every failure
    changing = request.path.startswith("/v1") and request.method not in READS
    if changing or response.status == 401:
        client = request.get(CLIENT)
        status = response.status
        await request.app[AUDIT_KEY].write(
            client=client.name if client is not None else "-",
            action=f"{request.method} {_route(request)}", obj=_object(request),
            status=status,
            outcome="ok" if status < 400 else f"refused: {request.get(REFUSAL, '')}",
            sync=status != 401)
    return response


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC or not request.path.startswith("/v1"):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "this API needs 'Authorization: Bearer <token>'")
    try:
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
    except UnicodeError:
        given_bytes = b""
    client = request.app[CLIENTS_KEY].identify(given_bytes)
    if client is None:
        raise ApiError(401, "the bearer token is not valid")
    request[CLIENT] = client
    audit = request.app[AUDIT_KEY]
    if request.method not in READS and not await audit.ready():
        raise ApiError(503, f"the audit log cannot be written ({audit.failing}); changes "
                            "are refused until it can be")
    return await handler(request)


async def _body(request: web.Request) -> Any:
    config = request.app[CONFIG_KEY]
    if request.content_type != "application/json":
        raise ApiError(415, f"send the body as application/json, not "
                            f"{request.content_type or 'nothing'}")
    if request.charset not in (None, "utf-8", "UTF-8"):
        raise ApiError(415, f"send the body as UTF-8 JSON, not {request.charset}")
    limit = config.api.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"the body is {request.content_length} bytes; the limit is {limit}")
    try:
        # A client that sends its body slowly or not at all holds a connection (and a
        # place under the connection limit) only this long.
        with anyio.fail_after(config.api.body_timeout_s):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"the body is larger than {limit} bytes") from None
    except TimeoutError:
        raise ApiError(408, f"the body did not arrive within {config.api.body_timeout_s:g} s "
                            "(api.body_timeout_s)") from None
    if not raw:
        raise ApiError(400, "the body is empty; send a JSON object")
    return parse_json(raw)


def _int_query(request: web.Request, key: str, default: int, maximum: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 20:
        raise ApiError(400, f"query {key}: {raw[:20]!r} is not a non-negative integer")
    value = int(raw)
    if value > maximum:
        raise ApiError(400, f"query {key}: {value} is above {maximum}")
    return value


def _accepted(service: FleetService, rec: FleetRecord, created: bool | None = None
              ) -> web.Response:
    url = f"/v1/fleets/{rec.name}"
    body: dict[str, Any] = {"fleet": service.summary(rec), "url": url}
    if created is not None:
        body["created"] = created
    return _json(body, 202, {"Location": url})


# -- handlers ----------------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    return _json({"status": "ok", "uptime_s": round(time.time() - service.started_at, 3)})


async def readyz(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    body = {"status": "ready" if service.ready else "not ready", "fleets": len(service.fleets),
            "scans": service.scans, "last_scan_at": service.last_scan_at,
            "scan_error": service.scan_error}
    return _json(body, 200 if service.ready else 503)


async def scrape(request: web.Request) -> web.Response:
    request.app[SERVICE_KEY].update_gauges()
    return web.Response(body=request.app[METRICS_KEY].exposition(),
                        headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DOC_KEY], content_type="application/json")


async def list_fleets(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    fleets = [service.summary(rec) for rec in service.visible(request[CLIENT])]
    return _json({"fleets": fleets})


async def create_fleet(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    body = await _body(request)
    name = body.get("name") if isinstance(body, dict) else None
    if isinstance(name, str) and valid_name(name):
        request[OBJECT] = name
    req = fleet_request(body, request.app[CONFIG_KEY])
    rec, created = await service.apply(req, body, request[CLIENT])
    return _accepted(service, rec, created)


async def get_fleet(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    rec = service.get(request.match_info["name"], request[CLIENT])
    offset = _int_query(request, "offset", 0, MAX_OFFSET)
    limit = _int_query(request, "limit", 1000, MAX_LIMIT)
    return _json(await service.detail(rec, offset=offset, limit=limit))


async def get_inventory(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    rec = service.get(request.match_info["name"], request[CLIENT])
    fmt = request.query.get("format", "json")
    if fmt not in FORMATS:
        raise ApiError(400, f"query format: {fmt[:40]!r} is not an inventory format; use "
                            f"one of {', '.join(FORMATS)}")
    try:
        records = await service.member_records(rec)
    except (FleetError, TimeoutError) as exc:
        raise ApiError(503, f"the members of fleet {rec.name} could not be read from "
                            f"vCenter: {exc or 'timed out'}") from None
    return web.Response(text=render(fmt, rec.name, records), content_type=CONTENT_TYPES[fmt],
                        charset="utf-8")


async def put_fleet(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    name = request.match_info["name"]
    body = await _body(request)
    req = fleet_request(body, request.app[CONFIG_KEY], name=name)
    rec, created = await service.apply(req, body, request[CLIENT])
    return _accepted(service, rec, created)


async def patch_fleet(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    config = request.app[CONFIG_KEY]
    name = request.match_info["name"]
    client = request[CLIENT]
    service.get(name, client)  # 404 before judging the body
    body = await _body(request)
    rec = await service.scale(name, lambda current: scale_request(body, current, config),
                              client)
    return _accepted(service, rec)


async def delete_fleet(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    rec = await service.remove(request.match_info["name"], request[CLIENT])
    return _accepted(service, rec)


async def list_pools(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    return _json({"pools": [p.summary() for p in service.visible_pools(request[CLIENT])]})


async def get_pool(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    return _json(service.pool(request.match_info["pool"], request[CLIENT]).summary())


def _lease_answer(service: FleetService, lease: Lease, status: int = 200) -> web.Response:
    return _json({"lease": lease.to_dict(service.clock())}, status,
                 {"Location": f"/v1/leases/{lease.id}"} if status == 201 else None)


def _hung_up(request: web.Request) -> bool:
    """Whether the caller has closed its connection (the service does not cancel a
    handler then: edge.py), so an answer could no longer reach it."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def create_lease(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    pool = request.match_info["pool"]
    service.pool(pool, request[CLIENT], leasing=True)  # 404/403 before judging the body
    # The body is optional: no body (or an empty one) takes the pool's defaults.
    body: Any = {}
    if request.body_exists and (request.content_length or 0) != 0:
        body = await _body(request)
    ttl_s, wait_s = lease_request(body, request.app[CONFIG_KEY])
    lease = await service.lease(pool, request[CLIENT], ttl_s=ttl_s, wait_s=wait_s,
                                gone=lambda: _hung_up(request))
    request[OBJECT] = f"{lease.pool}/{lease.id}"
    return _lease_answer(service, lease, 201)


async def list_leases(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    now = service.clock()
    return _json({"leases": [lease.to_dict(now)
                             for lease in service.visible_leases(request[CLIENT])]})


async def get_lease(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    return _lease_answer(service, service.get_lease(request.match_info["lease"],
                                                    request[CLIENT]))


async def patch_lease(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    client = request[CLIENT]
    lease_id = request.match_info["lease"]
    service.get_lease(lease_id, client)  # 404 before judging the body
    ttl_s = extend_request(await _body(request), request.app[CONFIG_KEY])
    return _lease_answer(service, await service.extend(lease_id, ttl_s, client))


async def delete_lease(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    return _lease_answer(service, await service.release(request.match_info["lease"],
                                                        request[CLIENT]))


def make_app(service: FleetService, config: ServiceConfig, metrics: FleetMetrics,
             audit: AuditLog | None = None) -> web.Application:
    """The API's application. ``audit``: the audit log (default: ``api.audit_log``, or
    ``audit.jsonl`` in the service's state directory)."""
    app = web.Application(middlewares=[_audit, _errors, _auth],
                          client_max_size=config.api.max_body_bytes)
    app[SERVICE_KEY] = service
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = metrics
    app[CLIENTS_KEY] = ClientTable(config.api.clients)
    app[AUDIT_KEY] = audit or AuditLog(config.api.audit_path
                                       or service.store.path / "audit.jsonl")
    app[DOC_KEY] = json.dumps(openapi_document(config)).encode()
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", scrape)
    r.add_get("/v1/openapi.json", openapi)
    r.add_get("/v1/fleets", list_fleets)
    r.add_post("/v1/fleets", create_fleet)
    r.add_get("/v1/fleets/{name}", get_fleet)
    r.add_get("/v1/fleets/{name}/inventory", get_inventory)
    r.add_put("/v1/fleets/{name}", put_fleet)
    r.add_patch("/v1/fleets/{name}", patch_fleet)
    r.add_delete("/v1/fleets/{name}", delete_fleet)
    r.add_get("/v1/pools", list_pools)
    r.add_get("/v1/pools/{pool}", get_pool)
    r.add_post("/v1/pools/{pool}/leases", create_lease)
    r.add_get("/v1/leases", list_leases)
    r.add_get("/v1/leases/{lease}", get_lease)
    r.add_patch("/v1/leases/{lease}", patch_lease)
    r.add_delete("/v1/leases/{lease}", delete_lease)
    return app
