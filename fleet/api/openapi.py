"""The OpenAPI 3.1 description of ``fleet serve``'s REST API (``GET /v1/openapi.json``).

The request bodies' schemas are the JSON Schema of the very models the service
validates bodies with (``fleet.api.bodies``), made for the service's config: its
``max_count``, and which keys its ``[defaults]`` give. The query parameters' bounds
are the constants the handlers check. The paths, responses and response shapes are
written here; tests check the document with ``openapi-spec-validator``, check real
responses against its schemas, and CI runs schemathesis against a live service
(``.ci/schemathesis``, docs/api.md).
"""

from __future__ import annotations

import copy
from typing import Any

from fleet.api.bodies import NAME_PATTERN, body_models
from fleet.api.config import ServiceConfig
from fleet.api.requests import MAX_DEPTH, MAX_LIMIT, MAX_OFFSET
from fleet.engine.members import RECORD_ONLY
from fleet.inventory import CONTENT_TYPES, FORMATS
from fleet.version import __version__

_REF = "#/components/schemas/{model}"


#: an Ansible YAML inventory as fleet writes it (fleet.inventory): groups of hosts
_ANSIBLE = {
    "type": "object", "required": ["all"], "additionalProperties": False,
    "properties": {"all": {
        "type": "object", "required": ["children"], "additionalProperties": False,
        "properties": {"children": {
            "type": "object", "additionalProperties": {
                "type": "object", "required": ["hosts"], "additionalProperties": False,
                "properties": {"hosts": {
                    "type": "object",
                    "additionalProperties": {"type": ["object", "null"]}}}}}}}}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json(_ref("Error"))}


def openapi_document(config: ServiceConfig) -> dict[str, Any]:
    schemas = body_models(config).schemas(_REF)
    nullable_str = {"type": ["string", "null"]}
    nullable_num = {"type": ["number", "null"]}
    schemas["Error"] = {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["status", "message"],
            "properties": {
                "status": {"type": "integer"},
                "message": {"type": "string"},
                "reason": {"type": "string",
                           "description": "with a lease's 429 or 503: at_max, "
                                          "wait_timeout (docs/pools.md)"},
                "retry_after_s": {"type": "integer",
                                  "description": "as the Retry-After header"},
                "quota": {
                    "type": "object", "required": ["name", "limit", "usage", "requested"],
                    "description": "with 429: the quota the request would pass",
                    "properties": {"name": {"type": "string",
                                            "enum": ["max_members", "max_leases"]},
                                   "limit": {"type": "integer"},
                                   "usage": {"type": "integer",
                                             "description": "what the client holds now"},
                                   "requested": {"type": "integer",
                                                 "description": "what the request adds"}}},
                "problems": {
                    "type": "array",
                    "description": "with 422: every problem with the body, not just the "
                                   "first",
                    "items": {
                        "type": "object", "required": ["key", "message"],
                        "properties": {
                            "key": {"type": "string",
                                    "description": "dotted key, e.g. sources[1].name; empty "
                                                   "for the body as a whole"},
                            "path": {"type": "string",
                                     "description": "the same place as a JSON Pointer "
                                                    "(RFC 6901) into the body, e.g. "
                                                    "/sources/1/name"},
                            "message": {"type": "string"},
                            "value": {"type": ["string", "number", "integer", "boolean",
                                               "null"],
                                      "description": "the value the body holds there; "
                                                     "absent for secrets (keys naming a "
                                                     "password, token, secret or key), "
                                                     "tables, lists and long strings"}}}}}}}}
    schemas["FleetSummary"] = {
        "type": "object",
        "required": ["name", "url", "status", "generation", "requested", "members", "ready",
                     "by_state", "folder", "expires_at", "ttl_left_s", "error"],
        "properties": {
            "name": {"type": "string"},
            "url": {"type": "string"},
            "status": {"type": "string",
                       "enum": ["pending", "provisioning", "retrying", "ready", "incomplete",
                                "failed", "destroying", "discovered"]},
            "generation": {"type": "integer",
                           "description": "requests accepted for this fleet"},
            "requested": {"type": ["integer", "null"],
                          "description": "null for a fleet discovered in vCenter"},
            "members": {"type": "integer", "description": "members that exist as VMs"},
            "ready": {"type": "integer"},
            "by_state": {"type": "object", "additionalProperties": {"type": "integer"}},
            "folder": {"type": "string"},
            "expires_at": {"type": ["integer", "null"], "description": "epoch seconds"},
            "ttl_left_s": nullable_num,
            "created_at": nullable_num,
            "updated_at": nullable_num,
            "error": nullable_str,
            "destroy_reason": nullable_str,
            "owner": {"type": ["string", "null"],
                      "description": "the client the fleet belongs to (null: made outside "
                                     "the service, or before owners were kept: admins "
                                     "only)"},
        }}
    schemas["Member"] = {
        "type": "object", "required": ["index", "name", "state"],
        "properties": {
            "index": {"type": "integer"},
            "name": {"type": "string"},
            "state": {"type": "string",
                      "enum": ["queued", "cloning", "cloned", "network", "ready", "failed"]},
            "vm": nullable_str, "source": nullable_str, "host": nullable_str,
            "attempt": {"type": "integer"},
            "phases_s": {"type": "object", "additionalProperties": {"type": "number"},
                         "description": "seconds per pipeline phase: queue, clone, network, "
                                        "reconnect, ready"},
            "reason": nullable_str, "message": nullable_str,
            # the member's record (fleet.engine.members; docs/inventory.md): null or
            # empty for a member with no VM yet, or when vCenter could not be read
            "fleet": nullable_str,
            "power_state": nullable_str,
            "ip": {"type": ["string", "null"],
                   "description": "the primary address of the guest's own (null until the "
                                  "guest has one: never its source's, which an instant "
                                  "clone reports until its network is refreshed)"},
            "ip_addresses": {"type": "array", "items": {"type": "string"},
                             "description": "every address of the guest's own, IPv4 and "
                                            "IPv6, the primary first"},
            "macs": {"type": "array", "items": {"type": "string"},
                     "description": "the virtual NICs' MACs"},
            "address_status": {"type": ["string", "null"],
                               "enum": ["ok", "pending", "inherited", "none", None],
                               "description": "why ip is null: pending (network phase "
                                              "not done), inherited (the guest still uses "
                                              "its source's network), none (no address "
                                              "yet)"},
            "datastore": nullable_str,
            "datastores": {"type": "array", "items": {"type": "string"}},
            "instance_uuid": nullable_str,
            "run_id": nullable_str,
            "created_at": {"type": ["number", "null"],
                           "description": "epoch seconds, vCenter's creation time of the VM"},
            "ready_at": {"type": ["number", "null"],
                         "description": "epoch seconds, when fleet labelled it ready"},
            "expires_at": {"type": ["integer", "null"], "description": "epoch seconds"},
        }}
    member_props = schemas["Member"]["properties"]
    schemas["MemberRecord"] = {
        "type": "object",
        "required": ["name", "index", "fleet", "state", "vm", "ip", "ip_addresses", "macs",
                     "address_status", "host", "datastore", "source"],
        "properties": {
            **{k: member_props[k] for k in ("name", "index", "source", "host", "vm")},
            **{k: member_props[k] for k in RECORD_ONLY},
            "state": {"type": "string", "enum": ["cloned", "network", "ready"]},
            "fleet": {"type": "string"}, "vm": {"type": "string"},
            "address_status": {"type": "string",
                               "enum": ["ok", "pending", "inherited", "none"]}}}
    schemas["FleetDetail"] = {
        "allOf": [_ref("FleetSummary"), {
            "type": "object",
            "required": ["member_list", "member_list_total", "member_list_offset", "spec",
                         "run"],
            "properties": {
                "member_list": {"type": "array", "items": _ref("Member")},
                "member_list_total": {"type": "integer"},
                "member_list_offset": {"type": "integer"},
                "spec": {"type": ["object", "null"],
                         "description": "the effective spec (defaults merged)"},
                "run": {"type": ["object", "null"],
                        "description": "the current or last provisioning run; summary "
                                       "has per-phase timings (p50/p95/p99)"},
                "removal": {"type": ["object", "null"]},
                "member_records_error": {
                    "type": ["string", "null"],
                    "description": "why the members come without their records "
                                   "(addresses...): vCenter could not be read"},
            }}]}
    counts = {"type": "object", "required": ["idle", "leased", "refilling", "recycling",
                                             "doubt"],
              "properties": {k: {"type": "integer"} for k in
                             ("idle", "leased", "refilling", "recycling", "doubt")}}
    schemas["Pool"] = {
        "type": "object",
        "required": ["name", "ready", "max", "ready_ttl_s", "lease_ttl_s", "max_lease_ttl_s",
                     "wait_s", "folder", "serving", "holder", "members", "waiting", "error"],
        "properties": {
            "name": {"type": "string"},
            "ready": {"type": "integer", "description": "idle members the pool keeps"},
            "max": {"type": "integer", "description": "members in all, at most"},
            "ready_ttl_s": {"type": "number"}, "lease_ttl_s": {"type": "number"},
            "max_lease_ttl_s": {"type": "number"}, "wait_s": {"type": "number"},
            "folder": {"type": "string"},
            "serving": {"type": "boolean",
                        "description": "this instance serves the pool (holds its lock)"},
            "holder": {"type": ["string", "null"],
                       "description": "who serves it, when another instance does"},
            "members": counts,
            "waiting": {"type": "integer", "description": "lease requests waiting"},
            "error": nullable_str}}
    schemas["Lease"] = {
        "type": "object",
        "required": ["id", "pool", "client", "state", "granted_at", "expires_at",
                     "expires_in_s", "max_expires_at", "url", "member"],
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
            "pool": {"type": "string"}, "client": {"type": "string"},
            "state": {"type": "string", "enum": ["active", "returned", "expired"]},
            "granted_at": {"type": "number", "description": "epoch seconds"},
            "expires_at": {"type": "number", "description": "epoch seconds"},
            "expires_in_s": {"type": "number"},
            "max_expires_at": {"type": "number",
                               "description": "the latest a PATCH may extend it to"},
            "url": {"type": "string"},
            "member": {"type": "object", "required": ["name", "index", "vm"],
                       "description": "the member's record (MemberRecord's fields: "
                                      "addresses, MACs, host...)",
                       "properties": {"name": {"type": "string"},
                                      "index": {"type": "integer"},
                                      "vm": {"type": "string"}}}}}
    if config.pools:
        # No pool takes a lease longer than its max_lease_ttl_s: the largest is the bound.
        longest = max(p.max_lease_ttl_s for p in config.pools.values())
        for model in ("LeaseCreate", "LeaseExtend"):
            ttl = schemas[model]["properties"]["ttl_s"]
            for option in ttl.get("anyOf", [ttl]):
                if option.get("type") == "number":
                    option["maximum"] = longest
    lease_links = {
        name: {"operationId": op, "parameters": {"lease": "$response.body#/lease/id"}}
        for name, op in (("GetLease", "getLease"), ("ExtendLease", "extendLease"),
                         ("ReturnLease", "returnLease"))}
    lease_one = _json({"type": "object", "required": ["lease"],
                       "properties": {"lease": _ref("Lease")}})
    schemas["Accepted"] = {
        "type": "object", "required": ["fleet", "url"],
        "properties": {"fleet": _ref("FleetSummary"), "url": {"type": "string"},
                       "created": {"type": "boolean"}}}
    name_param = {"name": "name", "in": "path", "required": True,
                  "schema": {"type": "string", "pattern": NAME_PATTERN}}
    auth: list[dict[str, list[str]]] = [{"bearer": []}]
    unauthorized = _error("no or wrong bearer token")
    stopping = _error("the service is stopping, or cannot record requests (state "
                      "directory) or audit them (audit log) now")
    quota = _error("the request would take the client past a quota: error.quota names it, "
                   "with the limit and the current usage")
    not_found = _error("no such fleet (or another client's)")
    taken = _error("the fleet name is taken by another client's fleet")
    bad_body = {
        "400": _error(f"the body is not JSON, or nests deeper than {MAX_DEPTH} levels"),
        "401": unauthorized,
        "409": _error("the fleet is being destroyed, or too many fleets"),
        "408": _error(f"the body took longer than {config.api.body_timeout_s:g} s to arrive"),
        "413": _error(f"the body is larger than {config.api.max_body_bytes} bytes"),
        "415": _error("the body is not application/json"),
        "422": _error("the body is not a valid fleet spec, or names a source vCenter does "
                      "not have: problems lists every problem, each with its key, JSON "
                      "Pointer, message and (unless secret) value"),
        "429": quota,
        "503": stopping,
    }
    accepted = {"description": "accepted; progress shows in the fleet's status",
                "headers": {"Location": {"schema": {"type": "string"}}},
                "content": _json(_ref("Accepted"))}
    # This service's pools are its config's: any other name is 404.
    pool_param = {"name": "pool", "in": "path", "required": True,
                  "schema": {"type": "string", "enum": sorted(config.pools)} if config.pools
                  else {"type": "string", "pattern": NAME_PATTERN}}
    lease_param = {"name": "lease", "in": "path", "required": True,
                   "schema": {"type": "string"}}
    no_pool = _error("no such pool")
    no_lease = _error("no such lease here (or another client's; or the pool is served by "
                      "another instance)")
    not_serving = _error("the service is stopping, cannot record leases or audit now, "
                         "vCenter did not take a lease's new end, or another instance "
                         "serves this pool (each with Retry-After)")
    lease_body = {k: v for k, v in bad_body.items() if k not in ("409", "429", "503")}
    pool_paths = {
        "/v1/pools": {
            "get": {"operationId": "listPools", "summary": "the pools this client may use",
                    "responses": {"200": {"description": "the pools", "content": _json({
                        "type": "object", "required": ["pools"],
                        "properties": {"pools": {"type": "array", "items": _ref("Pool")}}})},
                                  "401": unauthorized}}},
        "/v1/pools/{pool}": {
            "parameters": [pool_param],
            "get": {"operationId": "getPool", "summary": "a pool and its members by state",
                    "responses": {"200": {"description": "the pool",
                                          "content": _json(_ref("Pool"))},
                                  "401": unauthorized, "403": _error("not this client's pool"),
                                  "404": no_pool}}},
        "/v1/pools/{pool}/leases": {
            "parameters": [pool_param],
            "post": {"operationId": "createLease",
                     "summary": "lease an idle member: at once, or within wait_s",
                     "requestBody": {"required": False,
                                     "content": _json(_ref("LeaseCreate"))},
                     "responses": {
                         "201": {"description": "leased: the member's record is in the lease",
                                 "headers": {"Location": {"schema": {"type": "string"}}},
                                 "content": lease_one, "links": lease_links},
                         "403": _error("not this client's pool"), "404": no_pool,
                         **lease_body,
                         "429": _error("a quota (error.quota), the pool at its max "
                                       "(reason at_max), or no member within wait_s "
                                       "(wait_timeout); Retry-After says when to try again"),
                         "503": not_serving}}},
        "/v1/leases": {
            "get": {"operationId": "listLeases",
                    "summary": "this client's leases (an admin's: every lease)",
                    "responses": {"200": {"description": "the leases", "content": _json({
                        "type": "object", "required": ["leases"],
                        "properties": {"leases": {"type": "array",
                                                  "items": _ref("Lease")}}})},
                                  "401": unauthorized}}},
        "/v1/leases/{lease}": {
            "parameters": [lease_param],
            "get": {"operationId": "getLease", "summary": "a lease and its member",
                    "responses": {"200": {"description": "the lease", "content": lease_one},
                                  "401": unauthorized, "404": no_lease}},
            "patch": {"operationId": "extendLease",
                      "summary": "the lease ends ttl_s from now (within its max)",
                      "requestBody": {"required": True,
                                      "content": _json(_ref("LeaseExtend"))},
                      "responses": {"200": {"description": "extended", "content": lease_one},
                                    "404": no_lease, **lease_body,
                                    "409": _error("the lease has ended"),
                                    "503": not_serving}},
            "delete": {"operationId": "returnLease",
                       "summary": "return the lease: its member is destroyed",
                       "responses": {"200": {"description": "returned", "content": lease_one},
                                     "401": unauthorized, "404": no_lease,
                                     "503": not_serving}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "fleet serve", "version": __version__,
                 "description": "Request bursts of vSphere Instant Clones. Fleets share the "
                                "service's vCenter session and limits. A client sees and "
                                "changes its own fleets only (another's is 404); an admin "
                                "sees all (docs/api.md). Any request may also "
                                "be refused before routing, in the Error shape: 400 (not "
                                "HTTP/1.1), 431 (a line longer than 8190 bytes, or more "
                                "than 32 headers), 503 (every connection busy)."},
        "servers": [{"url": "/"}],
        "security": auth,
        "paths": {
            "/v1/fleets": {
                "get": {"operationId": "listFleets", "summary": "every fleet",
                        "responses": {"200": {"description": "the fleets", "content": _json({
                            "type": "object", "required": ["fleets"],
                            "properties": {"fleets": {"type": "array",
                                                      "items": _ref("FleetSummary")}}})},
                                      "401": unauthorized}},
                "post": {"operationId": "createFleet",
                         "summary": "create a fleet, or re-specify (scale) one",
                         "requestBody": {"required": True,
                                         "content": _json(_ref("FleetSpec"))},
                         "responses": {"202": accepted, "403": taken, **bad_body}},
            },
            "/v1/fleets/{name}": {
                "parameters": [name_param],
                "get": {"operationId": "getFleet",
                        "summary": "a fleet with its members, their states and phase timings",
                        "parameters": [
                            {"name": "offset", "in": "query",
                             "schema": {"type": "integer", "minimum": 0,
                                        "maximum": MAX_OFFSET}},
                            {"name": "limit", "in": "query",
                             "schema": {"type": "integer", "minimum": 0,
                                        "maximum": MAX_LIMIT}}],
                        "responses": {"200": {"description": "the fleet",
                                              "content": _json(_ref("FleetDetail"))},
                                      "400": _error("bad offset or limit"),
                                      "401": unauthorized,
                                      "404": not_found}},
                "put": {"operationId": "putFleet",
                        "summary": "create or re-specify this fleet (the body's name, if "
                                   "any, must match)",
                        "requestBody": {"required": True,
                                        "content": _json(_ref("FleetSpecPut"))},
                        "responses": {"202": accepted, "403": taken, **bad_body}},
                "patch": {"operationId": "scaleFleet",
                          "summary": "change count and/or ttl_s of a fleet",
                          "requestBody": {"required": True, "content": _json(_ref("Scale"))},
                          "responses": {"202": accepted, "404": not_found,
                                        **bad_body}},
                "delete": {"operationId": "destroyFleet",
                           "summary": "destroy every member (in the background)",
                           "responses": {"202": accepted,
                                         "401": unauthorized,
                                         "404": not_found,
                                         "503": stopping}},
            },
            "/v1/fleets/{name}/inventory": {
                "parameters": [name_param],
                "get": {"operationId": "getInventory",
                        "summary": "the fleet's members with their addresses, for Ansible, "
                                   "/etc/hosts, a spreadsheet or a script",
                        "parameters": [
                            {"name": "format", "in": "query",
                             "schema": {"type": "string", "enum": list(FORMATS),
                                        "default": "json"}}],
                        "responses": {"200": {
                            "description": "the inventory (docs/inventory.md)",
                            "content": {
                                CONTENT_TYPES["json"]: {"schema": {
                                    "type": "object", "required": ["fleet", "members"],
                                    "properties": {
                                        "fleet": {"type": "string"},
                                        "members": {"type": "array",
                                                    "items": _ref("MemberRecord")}}}},
                                # YAML: its parsed shape (docs/inventory.md)
                                CONTENT_TYPES["ansible"]: {"schema": _ANSIBLE},
                                CONTENT_TYPES["hosts"]: {"schema": {"type": "string"}},
                                CONTENT_TYPES["csv"]: {"schema": {"type": "string"}}}},
                            "400": _error("an unknown format"),
                            "401": unauthorized,
                            "404": not_found,
                            "503": _error("vCenter could not be read")}}},
            "/v1/openapi.json": {
                "get": {"operationId": "openapi", "summary": "this document",
                        "responses": {"200": {"description": "OpenAPI 3.1",
                                              "content": _json({"type": "object"})},
                                      "401": unauthorized}}},
            "/healthz": {
                "get": {"operationId": "healthz", "security": [],
                        "summary": "the process serves",
                        "responses": {"200": {"description": "alive",
                                              "content": _json({"type": "object"})}}}},
            "/readyz": {
                "get": {"operationId": "readyz", "security": [],
                        "summary": "vCenter reachable and fleets discovered",
                        "responses": {"200": {"description": "ready",
                                              "content": _json({"type": "object"})},
                                      "503": {"description": "not ready (reason given)",
                                              "content": _json({"type": "object"})}}}},
            "/metrics": {
                "get": {"operationId": "metrics", "security": [],
                        "summary": "Prometheus metrics",
                        "responses": {"200": {"description": "text exposition format",
                                              "content": {"text/plain": {
                                                  "schema": {"type": "string"}}}}}}},
            **pool_paths,
        },
        "components": {
            "schemas": copy.deepcopy(schemas),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
