"""``fleet serve`` over HTTP against a real simulator: every endpoint, auth, bad input.

The service runs as a real process (``python -m fleet serve``); requests are
made with ``http.client`` so every header and byte is the test's choice.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from tests.api.serveproc import TOKEN, ServeProcess

Json = dict[str, Any]


def doc(service: ServeProcess) -> Json:
    status, body = service.call("GET", "/v1/openapi.json")
    assert status == 200
    return body  # type: ignore[no-any-return]


def conforms(document: Json, schema_name: str, instance: Any) -> None:
    """``instance`` is valid against ``#/components/schemas/<schema_name>``."""
    schema = {"$ref": f"#/components/schemas/{schema_name}",
              "components": document["components"]}
    errors = sorted(Draft202012Validator(schema).iter_errors(instance), key=str)
    assert not errors, [e.message for e in errors[:5]]


def error_of(body: Any) -> Json:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    return err  # type: ignore[no-any-return]


# -- health, readiness, metrics, the document ------------------------------------------

def test_health_ready_and_metrics_need_no_token(service: ServeProcess) -> None:
    status, body = service.call("GET", "/healthz", token=None)
    assert status == 200 and body["status"] == "ok"
    status, body = service.call("GET", "/readyz", token=None)
    assert status == 200 and body["status"] == "ready" and body["scan_error"] is None
    status, text = service.call("GET", "/metrics", token=None)
    assert status == 200
    assert "fleet_build_info{" in text
    assert "fleet_vsphere_request_duration_seconds_bucket" in text  # the client's hook
    assert 'fleet_fleets{state="ready"}' in text


def test_openapi_document_is_valid_openapi_31(service: ServeProcess) -> None:
    document = doc(service)
    validate(document)  # openapi-spec-validator: raises if invalid
    assert document["openapi"].startswith("3.1")
    spec_props = document["components"]["schemas"]["FleetSpec"]["properties"]
    assert "ttl_s" in spec_props and "count" in spec_props
    assert not {"vcenter", "limits", "folder"} & set(spec_props)
    network = document["components"]["schemas"]["NetworkSpec"]["properties"]
    assert "guest_password_env" not in network
    ops = {(path, method) for path, item in document["paths"].items() for method in item
           if method != "parameters"}
    assert {("/v1/fleets", "get"), ("/v1/fleets", "post"), ("/v1/fleets/{name}", "get"),
            ("/v1/fleets/{name}", "put"), ("/v1/fleets/{name}", "patch"),
            ("/v1/fleets/{name}", "delete"), ("/metrics", "get"), ("/healthz", "get"),
            ("/readyz", "get")} <= ops


# -- auth ----------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/fleets", "/v1/fleets/anything", "/v1/openapi.json",
                                  "/v1/no-such-route"])
@pytest.mark.parametrize("header", [None, "Bearer", "Bearer ", "Basic dXNlcjpwYXNz",
                                    f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
                                    "Bearer wrong-token-of-some-length", f"bearer{TOKEN}",
                                    "Bearer \u00e9\u00e9\u00e9"])
def test_missing_or_wrong_token_is_401(service: ServeProcess, path: str,
                                       header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    status, resp_headers, raw = service.raw("GET", path, headers=headers)
    assert status == 401, raw
    assert resp_headers["www-authenticate"].startswith("Bearer")
    error_of(json.loads(raw))
    assert TOKEN.encode() not in raw


def test_write_requests_without_token_change_nothing(service: ServeProcess) -> None:
    status, _ = service.call("POST", "/v1/fleets", {"name": "noauth", "count": 1}, token=None)
    assert status == 401
    status, _ = service.call("DELETE", "/v1/fleets/noauth", token="nope-nope-nope-nope")
    assert status == 401
    status, _ = service.call("GET", "/v1/fleets/noauth")
    assert status == 404


def test_the_token_is_compared_in_constant_time() -> None:
    import inspect

    from fleet.api import app, tokens

    # The token names its client (issue 15): _auth asks the table, which compares.
    assert "CLIENTS_KEY].identify(" in inspect.getsource(app._auth)
    source = inspect.getsource(tokens.ClientTable.identify)
    assert "hmac.compare_digest" in source and "==" not in source.split("compare_digest")[1]
    assert "break" not in source and "return" not in source.split("compare_digest")[1][:80]


# -- create, list, get, scale, destroy -------------------------------------------------

def test_create_get_list_scale_and_destroy(service: ServeProcess) -> None:
    document = doc(service)
    status, body = service.call("POST", "/v1/fleets", {"name": "crud", "count": 6})
    assert status == 202, body
    conforms(document, "Accepted", body)
    assert body["url"] == "/v1/fleets/crud" and body["created"] is True
    assert body["fleet"]["status"] == "pending" and body["fleet"]["requested"] == 6

    fleet = service.wait_for("crud")
    conforms(document, "FleetDetail", fleet)
    assert fleet["ready"] == 6 and fleet["members"] == 6
    assert [m["index"] for m in fleet["member_list"]] == list(range(6))
    for member in fleet["member_list"]:
        assert member["state"] == "ready" and member["vm"].startswith("vm-")
        assert member["name"] == f"crud-{member['index']:04d}"
        assert set(member["phases_s"]) >= {"queue", "clone", "network", "reconnect", "ready"}
        assert member["source"] in [f"frozen-{i:02d}" for i in range(1, 9)]
    assert fleet["run"]["active"] is False
    assert fleet["run"]["summary"]["phases"]["clone"]["count"] == 6
    assert fleet["spec"]["folder"] == "fleet/crud"

    status, listing = service.call("GET", "/v1/fleets")
    assert status == 200
    assert "crud" in [f["name"] for f in listing["fleets"]]
    for summary in listing["fleets"]:
        conforms(document, "FleetSummary", summary)

    status, page = service.call("GET", "/v1/fleets/crud?offset=4&limit=5")
    assert status == 200 and [m["index"] for m in page["member_list"]] == [4, 5]
    assert page["member_list_total"] == 6

    status, body = service.call("PATCH", "/v1/fleets/crud", {"count": 3})
    assert status == 202, body
    fleet = service.wait_for("crud")
    assert fleet["requested"] == 3 and fleet["members"] == 3 and fleet["generation"] == 2

    status, body = service.call("PUT", "/v1/fleets/crud", {"count": 4})
    assert status == 202 and body["created"] is False
    assert service.wait_for("crud")["members"] == 4

    status, body = service.call("DELETE", "/v1/fleets/crud")
    assert status == 202 and body["fleet"]["status"] == "destroying"
    service.wait_for("crud", ("gone",))
    status, listing = service.call("GET", "/v1/fleets")
    assert "crud" not in [f["name"] for f in listing["fleets"]]


def test_put_creates_with_the_name_from_the_url(service: ServeProcess) -> None:
    before = time.time()
    status, body = service.call("PUT", "/v1/fleets/putnew", {"count": 2, "ttl_s": 600})
    after = time.time()
    assert status == 202 and body["created"] is True, body
    fleet = service.wait_for("putnew")
    # The expiry is the request's time plus its TTL (however long the build then took).
    assert before + 600 <= fleet["expires_at"] <= math.ceil(after + 600), (before, fleet)
    # The time left is the expiry's, and vCenter's labels carry it rounded up to the
    # second: read within a second of the request it may exceed the TTL by that much.
    assert 0 < fleet["ttl_left_s"] <= fleet["expires_at"] - before
    status, body = service.call("PUT", "/v1/fleets/putnew", {"name": "other", "count": 2})
    assert status == 422 and error_of(body)["problems"][0]["key"] == "name"
    assert service.call("DELETE", "/v1/fleets/putnew")[0] == 202
    service.wait_for("putnew", ("gone",))


def test_a_newer_request_supersedes_a_run_in_progress(service: ServeProcess) -> None:
    status, _ = service.call("POST", "/v1/fleets", {"name": "supersede", "count": 60})
    assert status == 202
    # Wait until the run is making members (rather than guessing that 0.3 s is enough).
    deadline = time.monotonic() + 30
    while True:
        fleet = service.fleet("supersede")
        if any(n for state, n in fleet["by_state"].items() if state != "queued"):
            break
        assert time.monotonic() < deadline, fleet
        time.sleep(0.02)
    status, _ = service.call("PATCH", "/v1/fleets/supersede", {"count": 5})
    assert status == 202
    fleet = service.wait_for("supersede")
    assert fleet["requested"] == 5 and fleet["members"] == 5 and fleet["ready"] == 5
    assert service.call("DELETE", "/v1/fleets/supersede")[0] == 202
    service.wait_for("supersede", ("gone",))


# -- lifetimes -------------------------------------------------------------------------

def expired_total(service: ServeProcess) -> float:
    status, text = service.call("GET", "/metrics", token=None)
    assert status == 200
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("fleet_fleets_expired_total ")))


def test_a_fleet_is_destroyed_when_its_ttl_ends(service: ServeProcess, sim: Any) -> None:
    # Counted from here: the shared service has also seen the fuzz tests' fleets expire.
    expired_before = expired_total(service)
    before = time.time()
    status, body = service.call("POST", "/v1/fleets", {"name": "short", "count": 3,
                                                       "ttl_s": 2.5})
    assert status == 202, body
    # Built, then destroyed when its lifetime ends (on a loaded machine the build itself
    # may take longer than the 2.5 s: it is destroyed all the same), and never before.
    fleet = service.wait_for("short", ("ready", "destroying", "gone"))
    assert fleet["status"] == "gone" or fleet["expires_at"] is not None
    service.wait_for("short", ("gone",), timeout_s=15)
    assert time.time() >= before + 2.5
    assert expired_total(service) == expired_before + 1
    status, text = service.call("GET", "/metrics", token=None)
    assert 'fleet_members{fleet="short"' not in text


# -- bad requests: always 4xx, with a message --------------------------------------------

SPEC = {"name": "bad", "count": 1}


@pytest.mark.parametrize(("body", "key"), [
    ({"name": "bad", "count": "3"}, "count"),
    ({"name": "bad", "count": -1}, "count"),
    ({"name": "bad", "count": 1.5}, "count"),
    ({"name": "bad", "count": True}, "count"),
    ({"name": "bad", "count": 10**6}, "count"),
    ({"name": "bad"}, "count"),
    ({"count": 1}, "name"),
    ({"name": "bad name", "count": 1}, "name"),
    ({"name": "bad", "count": 1, "bogus": 1}, "bogus"),
    ({"name": "bad", "count": 1, "network": {"bogus": 1}}, "network.bogus"),
    ({"name": "bad", "count": 1, "sources": []}, "sources"),
    ({"name": "bad", "count": 1, "sources": [{"name": "x", "chain_budget": 300}]},
     "sources[0].chain_budget"),
    ({"name": "bad", "count": 1, "chain_budget": 255}, "chain_budget"),
    ({"name": "bad", "count": 1, "vcenter": {"url": "https://x/sdk"}}, "vcenter"),
    ({"name": "bad", "count": 1, "limits": {"in_flight": 1}}, "limits"),
    ({"name": "bad", "count": 1, "folder": "elsewhere"}, "folder"),
    ({"name": "bad", "count": 1, "network": {"guest_password_env": "HOME"}},
     "network.guest_password_env"),
    ({"name": "bad", "count": 1, "network": {"guest_password_file": "/etc/shadow"}},
     "network.guest_password_file"),
    ({"name": "bad", "count": 1, "ttl_s": 0}, "ttl_s"),
    ({"name": "bad", "count": 1, "ttl_s": "1h"}, "ttl_s"),
    ({"name": "bad", "count": 1, "ttl_s": 1e12}, "ttl_s"),
    ({"name": "bad", "count": 2, "name_template": "{fleet}"}, "name_template"),
    ({"name": "bad", "count": 2, "name_template": "{index:0100000000d}"}, "name_template"),
    ({"name": "bad", "count": 2, "name_template": "{index:{index}}"}, "name_template"),
    ({"name": "bad", "count": 1, "guestinfo": {"guestinfo.x": "{name:>99999999}"}},
     'guestinfo."guestinfo.x"'),
    ({"name": "bad", "count": 1, "guestinfo": {"guestinfo.fleet.name": "x"}},
     'guestinfo."guestinfo.fleet.name"'),
    ({"name": "bad", "count": 1, "guestinfo": {"notguestinfo": "x"}}, "guestinfo.notguestinfo"),
    ({"name": "bad", "count": 1, "readiness": {"timeout_s": -1}}, "readiness.timeout_s"),
    ([], ""),
    ("spec", ""),
    (None, ""),
])
def test_invalid_bodies_are_422_naming_the_field(service: ServeProcess, body: Any,
                                                 key: str) -> None:
    status, resp = service.call("POST", "/v1/fleets", body if body is not None else None,
                                headers={"Content-Type": "application/json"})
    if body is None:
        assert status == 400, resp  # an empty body
        return
    assert status == 422, resp
    problems = error_of(resp)["problems"]
    assert key in [p["key"] for p in problems], problems
    assert service.call("GET", "/v1/fleets/bad")[0] == 404


def test_every_problem_is_reported_at_once(service: ServeProcess) -> None:
    status, resp = service.call("POST", "/v1/fleets", {"name": "bad", "count": "x",
                                                       "vcenter": {}, "bogus": 1})
    assert status == 422
    keys = {p["key"] for p in error_of(resp)["problems"]}
    assert keys == {"vcenter", "count", "bogus"}


def test_a_422_lists_every_problem_with_its_path_and_value(service: ServeProcess) -> None:
    document = doc(service)
    body = {"name": "bad", "count": -1, "ttl_s": 0, "sources": ["frozen-01", {"name": 7}],
            "api_token": "s3cret-in-the-body"}
    for method, path in (("POST", "/v1/fleets"), ("PUT", "/v1/fleets/bad")):
        status, resp = service.call(method, path, body)
        assert status == 422, resp
        conforms(document, "Error", resp)
        problems = {p["key"]: p for p in error_of(resp)["problems"]}
        assert set(problems) == {"count", "ttl_s", "sources[1].name", "api_token"}, problems
        assert problems["count"]["path"] == "/count" and problems["count"]["value"] == -1
        assert problems["ttl_s"]["path"] == "/ttl_s" and problems["ttl_s"]["value"] == 0
        assert problems["sources[1].name"]["path"] == "/sources/1/name"
        assert problems["sources[1].name"]["value"] == 7
        assert problems["api_token"]["path"] == "/api_token"
        assert "value" not in problems["api_token"]
        assert "s3cret-in-the-body" not in json.dumps(resp)
        assert all(p["message"] for p in problems.values())
        assert "(and 1 more)" in error_of(resp)["message"]
    assert service.call("GET", "/v1/fleets/bad")[0] == 404

    status, _ = service.call("POST", "/v1/fleets", {"name": "threeprobs", "count": 1})
    assert status == 202
    status, resp = service.call("PATCH", "/v1/fleets/threeprobs",
                                {"count": -2, "ttl_s": "1h", "sources": ["x"]})
    assert status == 422, resp
    problems = {p["key"]: p for p in error_of(resp)["problems"]}
    assert set(problems) == {"count", "ttl_s", "sources"}, problems
    assert problems["count"]["value"] == -2 and problems["ttl_s"]["value"] == "1h"
    name = "a-very-long-name-" * 20
    status, resp = service.call("PUT", "/v1/fleets/threeprobs",
                                {"name": name, "count": 10**6, "ttl_s": -1})
    assert status == 422, resp
    problems = {p["key"]: p for p in error_of(resp)["problems"]}
    assert set(problems) == {"name", "count", "ttl_s"}, problems
    assert "value" not in problems["name"]  # too long to repeat
    assert service.call("DELETE", "/v1/fleets/threeprobs")[0] == 202
    service.wait_for("threeprobs", ("gone",))


def deep(kind: str, depth: int) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("depth", [40, 900, 5000])
@pytest.mark.parametrize("where", ["body", "count", "bogus", "network", "guestinfo",
                                   "sources"])
def test_deeply_nested_bodies_are_400(service: ServeProcess, kind: str, depth: int,
                                      where: str) -> None:
    nested = deep(kind, depth)
    raw = nested if where == "body" else \
        f'{{"name": "deep", "count": 1, "{where}": {nested}}}'
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    for method, path in (("POST", "/v1/fleets"), ("PUT", "/v1/fleets/deep")):
        status, _, body = service.raw(method, path, raw.encode(), headers)
        assert status == 400, (method, status, body[:300])
        assert "deeper than" in error_of(json.loads(body))["message"]
    assert service.call("GET", "/v1/fleets/deep")[0] == 404


@pytest.mark.parametrize(("content_type", "raw", "status"), [
    ("application/json", b"{", 400),
    ("application/json", b'{"name": "bad", "count": 1,}', 400),
    ("application/json", b'{"name": "bad", "count": NaN}', 400),
    ("application/json", b'{"name": "bad", "count": Infinity}', 400),
    ("application/json", b"\xff\xfe{}", 400),
    ("application/json", b"[" * 100_000 + b"]" * 100_000, 413),
    ("application/json", b"[" * 30_000 + b"]" * 30_000, 400),
    ("application/json", b'{"name": "bad", "count": 1' + b"0" * 5000 + b"}", 400),
    ("application/json", b"", 400),
    ("text/plain", b'{"name": "bad", "count": 1}', 415),
    ("application/x-www-form-urlencoded", b"name=bad&count=1", 415),
    ("multipart/form-data; boundary=x", b"--x--", 415),
    ("application/json; charset=latin-1", b'{"name": "bad", "count": 1}', 415),
    ("", b'{"name": "bad", "count": 1}', 415),
])
def test_malformed_bodies_and_content_types(service: ServeProcess, content_type: str,
                                            raw: bytes, status: int) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if content_type:
        headers["Content-Type"] = content_type
    for method, path in (("POST", "/v1/fleets"), ("PUT", "/v1/fleets/bad")):
        got, resp_headers, body = service.raw(method, path, raw, headers)
        assert got == status, (method, body[:300])
        assert resp_headers["content-type"].startswith("application/json")
        error_of(json.loads(body))


def test_huge_bodies_are_413_with_or_without_a_length(service: ServeProcess) -> None:
    big = json.dumps({"name": "bad", "count": 1, "guestinfo": {"guestinfo.x": "x" * 100_000}})
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    status, _, body = service.raw("POST", "/v1/fleets", big.encode(), headers)
    assert status == 413, body
    assert "65536" in error_of(json.loads(body))["message"]

    # Chunked: no Content-Length, the limit still holds while reading.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/fleets")
        for k, v in {**headers, "Transfer-Encoding": "chunked"}.items():
            conn.putheader(k, v)
        conn.endheaders()
        chunk = b"x" * 16384
        try:
            for _ in range(10):
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading it all
        resp = conn.getresponse()
        assert resp.status == 413
    finally:
        conn.close()
    assert service.call("GET", "/healthz", token=None)[0] == 200


def test_scale_bodies(service: ServeProcess) -> None:
    status, _ = service.call("POST", "/v1/fleets", {"name": "scalebad", "count": 1})
    assert status == 202
    service.wait_for("scalebad")
    for body, key in [({"count": -1}, "count"), ({"count": "2"}, "count"),
                      ({"name": "x"}, "name"), ({"sources": ["x"]}, "sources"),
                      ({}, ""), ({"ttl_s": -5}, "ttl_s"), ([1], "")]:
        status, resp = service.call("PATCH", "/v1/fleets/scalebad", body)
        assert status == 422, (body, resp)
        assert key in [p["key"] for p in error_of(resp)["problems"]]
    assert service.call("DELETE", "/v1/fleets/scalebad")[0] == 202
    service.wait_for("scalebad", ("gone",))


# -- unknown fleets, routes, methods, queries --------------------------------------------

@pytest.mark.parametrize("method", ["GET", "DELETE", "PATCH"])
@pytest.mark.parametrize("name", ["nosuchfleet", "a" * 200, "..", "%2e%2e", "x%00y",
                                  "%F0%9F%98%80"])
def test_unknown_fleets_are_404(service: ServeProcess, method: str, name: str) -> None:
    body = {"count": 1} if method == "PATCH" else None
    status, resp = service.call(method, f"/v1/fleets/{name}", body)
    assert status == 404, resp
    error_of(resp)


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/", 404), ("GET", "/v2/fleets", 404), ("GET", "/v1", 404),
    ("POST", "/healthz", 405), ("DELETE", "/v1/fleets", 405), ("POST", "/v1/fleets/x/y", 404),
    ("GET", "/v1/fleets/never?limit=abc", 404), ("GET", "/v1/fleets/never?offset=-1", 404),
])
def test_unknown_routes_and_methods(service: ServeProcess, method: str, path: str,
                                    status: int) -> None:
    got, resp = service.call(method, path)
    assert got == status, resp
    error_of(resp)


def test_bad_queries_are_400(service: ServeProcess) -> None:
    status, _ = service.call("POST", "/v1/fleets", {"name": "query", "count": 1})
    assert status == 202
    for query in ("limit=abc", "offset=-1", "limit=1e3", "limit=999999999999",
                  "offset=%F0%9F%98%80"):
        status, resp = service.call("GET", f"/v1/fleets/query?{query}")
        assert status == 400, (query, resp)
    assert service.call("DELETE", "/v1/fleets/query")[0] == 202
    service.wait_for("query", ("gone",))


def test_secrets_stay_out_of_argv_logs_metrics_and_answers(service: ServeProcess) -> None:
    from tests.api.serveproc import GUEST_PASSWORD
    from tests.simproc import PASSWORD

    secrets = [TOKEN, PASSWORD, GUEST_PASSWORD]
    cmdline = Path(f"/proc/{service.proc.pid}/cmdline").read_bytes().decode(errors="replace")
    assert not [s for s in secrets if s in cmdline], "a secret is in the service's argv"
    _, text = service.call("GET", "/metrics", token=None)
    _, listing = service.call("GET", "/v1/fleets")
    answers = text + json.dumps(listing) + json.dumps(doc(service))
    for name in [f["name"] for f in listing["fleets"]]:
        answers += json.dumps(service.fleet(name))
    logs = "".join(service.stderr_lines)
    for secret in secrets:
        assert secret not in answers
        assert secret not in logs
