"""The API's schema is the service's truth (issue 14): ``GET /v1/openapi.json`` says of a
request body exactly what the service accepts, because it is the JSON Schema of the
models the service validates with, made for the service's own config.

Each drift found by a client generator has a test here: ``count``'s bound is
``max_count`` in the schema and in the service; a ``PUT`` needs neither ``name`` nor
``sources`` (the README's example); the document's 401 is documented; ``null`` means
the default; ``4.0`` is the whole number 4 (``4.5`` is refused naming its key); a
source vCenter does not have is refused at once, naming it. Most run in process (no
vCenter needed to judge a body); the rest use the package's shared service.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import anyio
import pytest
from jsonschema import Draft202012Validator

from fleet.api.config import ServiceConfig, config_from_dict
from fleet.api.openapi import openapi_document
from fleet.api.requests import ApiError, fleet_request, scale_request
from fleet.api.service import FleetService
from fleet.metrics import FleetMetrics
from tests.api.serveproc import FROZEN, ServeProcess
from tests.engine.conftest import vcenter

Json = dict[str, Any]
ENV = {"TOKEN": "in-process-token-0123456789", "GUEST_PW": "pw"}


def make_config(**over: Any) -> ServiceConfig:
    data: dict[str, Any] = {"api": {"token_env": "TOKEN"}, "defaults": {
        "sources": ["frozen-01"], "network": {"guest_user": "root",
                                              "guest_password_env": "GUEST_PW"}}}
    data.update(over)
    return config_from_dict(data, env=ENV)


def body_errors(document: Json, schema: str, body: Any) -> list[str]:
    """Why ``body`` is not valid against ``#/components/schemas/<schema>`` (none: it is)."""
    full = {"$ref": f"#/components/schemas/{schema}", "components": document["components"]}
    return [e.message for e in Draft202012Validator(full).iter_errors(body)]


def request_schema(document: Json, path: str, method: str) -> str:
    ref = document["paths"][path][method]["requestBody"]["content"]["application/json"]
    return str(ref["schema"]["$ref"]).rsplit("/", 1)[1]


def refused(call: Any) -> dict[str, str]:
    """The problems (key -> message) of a 422 from ``call()``."""
    with pytest.raises(ApiError) as info:
        call()
    assert info.value.status == 422
    return {p.key: p.message for p in info.value.problems}


# -- count: the schema's bound is the service's max_count ------------------------------

def test_count_is_bounded_by_max_count_in_the_schema_and_the_service() -> None:
    config = make_config(max_count=7)
    document = openapi_document(config)
    schemas = document["components"]["schemas"]
    for name in ("FleetSpec", "FleetSpecPut", "Scale"):
        count = schemas[name]["properties"]["count"]
        branch = next(b for b in count.get("anyOf", [count]) if b.get("type") == "integer")
        assert branch["maximum"] == 7, (name, count)
    assert not body_errors(document, "FleetSpec", {"name": "seven", "count": 7})
    assert body_errors(document, "FleetSpec", {"name": "eight", "count": 8})

    assert fleet_request({"name": "seven", "count": 7}, config).spec.count == 7
    problems = refused(lambda: fleet_request({"name": "eight", "count": 8}, config))
    assert "max_count of 7" in problems["count"]
    current = fleet_request({"name": "seven", "count": 1}, config).data
    assert scale_request({"count": 7}, current, config).spec.count == 7
    assert "max_count of 7" in refused(lambda: scale_request({"count": 8}, current,
                                                             config))["count"]


# -- PUT: the name comes from the URL, sources from [defaults] ---------------------------

def test_a_put_needs_no_name_and_sources_only_without_default_ones() -> None:
    readme = {"count": 50, "ttl_s": 3600}  # the README's example, sent by PUT
    with_sources = openapi_document(make_config())
    assert not body_errors(with_sources, request_schema(with_sources, "/v1/fleets/{name}",
                                                        "put"), readme)
    assert fleet_request(readme, make_config(), name="ci-runners").spec.sources[0].name == \
        "frozen-01"
    # POST names its fleet in the body, so there the name is required.
    assert body_errors(with_sources, request_schema(with_sources, "/v1/fleets", "post"),
                       readme)

    # Without default sources, every request must give them: the schema says so too.
    bare = make_config(defaults={"network": {"refresh": "none"}})
    document = openapi_document(bare)
    assert "sources" in document["components"]["schemas"]["FleetSpecPut"]["required"]
    assert body_errors(document, "FleetSpecPut", readme)
    assert "sources" in refused(lambda: fleet_request(readme, bare, name="ci-runners"))


def test_the_readme_example_by_put_is_accepted(service: ServeProcess) -> None:
    status, document = service.call("GET", "/v1/openapi.json")
    assert status == 200
    body = {"count": 1, "ttl_s": 3600}
    assert not body_errors(document, request_schema(document, "/v1/fleets/{name}", "put"),
                           body)
    status, resp = service.call("PUT", "/v1/fleets/readme-put", body)
    assert status == 202, resp
    assert resp["fleet"]["requested"] == 1 and resp["created"] is True
    assert service.call("DELETE", "/v1/fleets/readme-put")[0] == 202
    service.wait_for("readme-put", ("gone",))


# -- every refusal the document's operations give is documented ---------------------------

def test_every_operation_behind_the_token_documents_its_401() -> None:
    document = openapi_document(make_config())
    assert "401" in document["paths"]["/v1/openapi.json"]["get"]["responses"]
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method == "parameters" or op.get("security") == []:
                continue
            assert "401" in op["responses"], (method, path)


# -- null means the default ---------------------------------------------------------------

def test_null_means_the_default() -> None:
    config = make_config(defaults={"sources": ["frozen-01", "frozen-02"],
                                   "network": {"guest_user": "root",
                                               "guest_password_env": "GUEST_PW"},
                                   "timeouts": {"call_s": 7.0}})
    body = {"name": "nulls", "count": 2, "sources": None, "name_template": None,
            "ttl_s": None, "network": {"guest_user": None, "reconnect": None},
            "timeouts": {"call_s": None, "clone_s": None}, "readiness": None}
    assert not body_errors(openapi_document(config), "FleetSpec", body)
    req = fleet_request(body, config)
    assert req.spec.network.guest_user == "root"          # the service's default
    assert [s.name for s in req.spec.sources] == ["frozen-01", "frozen-02"]
    assert req.spec.timeouts.call_s == 7.0
    assert req.spec.timeouts.clone_s == 600.0              # the spec's default
    assert req.spec.name_template == "{fleet}-{index:04d}" and req.ttl_s is None
    # A key with no default cannot be null: it is refused, naming it.
    problems = refused(lambda: fleet_request({"name": "nulls", "count": None}, config))
    assert set(problems) == {"count"} and "no default" in problems["count"]


# -- 4.0 is 4 -------------------------------------------------------------------------------

def test_a_whole_number_written_with_a_point_is_an_integer() -> None:
    config = make_config()
    req = fleet_request({"name": "whole", "count": 4.0, "chain_budget": 8.0,
                         "retries": {"attempts": 3.0},
                         "sources": [{"name": "frozen-01", "chain_budget": 5.0}]}, config)
    assert req.spec.count == 4 and isinstance(req.spec.count, int)
    assert req.spec.chain_budget == 8 and req.spec.retries.attempts == 3
    assert req.spec.sources[0].chain_budget == 5
    assert scale_request({"count": 2.0}, req.data, config).spec.count == 2

    problems = refused(lambda: fleet_request({"name": "whole", "count": 4.5,
                                              "retries": {"attempts": 2.5}}, config))
    assert set(problems) == {"count", "retries.attempts"}
    assert "4.5" in problems["count"] and "integer" in problems["count"]
    assert "count" in refused(lambda: scale_request({"count": 1.5}, req.data, config))
    # Not a number at all stays refused: no string or boolean is taken for one.
    assert set(refused(lambda: fleet_request({"name": "whole", "count": "4"}, config))) \
        == {"count"}
    assert set(refused(lambda: fleet_request({"name": "whole", "count": True}, config))) \
        == {"count"}


def test_4_0_over_http(service: ServeProcess) -> None:
    status, resp = service.call("POST", "/v1/fleets", {"name": "whole", "count": 1.0})
    assert status == 202, resp
    status, resp = service.call("PATCH", "/v1/fleets/whole", {"count": 2.5})
    assert status == 422, resp
    [problem] = resp["error"]["problems"]
    assert problem["key"] == "count" and problem["value"] == 2.5
    assert service.call("DELETE", "/v1/fleets/whole")[0] == 202
    service.wait_for("whole", ("gone",))


# -- a source vCenter does not have: refused at once ---------------------------------------

def test_a_source_vcenter_does_not_have_is_refused_at_once(service: ServeProcess) -> None:
    body = {"name": "nosrc", "count": 2, "sources": [FROZEN[0], "no-such-vm"]}
    for method, path in (("POST", "/v1/fleets"), ("PUT", "/v1/fleets/nosrc")):
        status, resp = service.call(method, path, body)
        assert status == 422, resp
        [problem] = resp["error"]["problems"]
        assert problem["key"] == "sources[1]" and problem["path"] == "/sources/1"
        assert problem["value"] == "no-such-vm" and "no-such-vm" in problem["message"]
        assert service.call("GET", "/v1/fleets/nosrc")[0] == 404
    status, resp = service.call("GET", "/v1/fleets")
    assert "nosrc" not in {f["name"] for f in resp["fleets"]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def wait_done(rec: Any) -> None:
    with anyio.fail_after(10):
        for _ in itertools.count():
            if rec.status not in ("pending", "provisioning", "retrying"):
                return
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_sources_are_checked_against_vcenter_in_process(tmp_path: Path) -> None:
    config = make_config(state_dir=str(tmp_path), scan_interval_s=0.05, defaults={
        "network": {"refresh": "none", "disconnect_at_clone": False},
        "readiness": {"wait_for": "none"}})
    sources = ["frozen-01", "gone-1", "dc1/vm/sources/frozen-02", "gone-2"]
    body = {"name": "checked", "count": 1, "sources": sources}
    async with vcenter(hosts=2) as (vs, fake), \
            FleetService(config, vs, FleetMetrics()) as service:
        with pytest.raises(ApiError) as info:
            await service.apply(fleet_request(body, config), body)
        assert info.value.status == 422
        problems = {p.key: p.value for p in info.value.problems}
        assert problems == {"sources[1]": "gone-1", "sources[3]": "gone-2"}
        assert "checked" not in service.fleets and fake.folder_vms("fleet/checked") == []
        # A name two VMs share is no one source: refused too, naming it.
        for folder in ("twins/a", "twins/b"):
            fake.add_vm("twin", host="esx-01", folder=folder)
        twin = {"name": "checked", "count": 1, "sources": ["twin"]}
        with pytest.raises(ApiError) as info:
            await service.apply(fleet_request(twin, config), twin)
        [problem] = info.value.problems
        assert problem.key == "sources[0]" and "twin" in problem.message, problem

        # vCenter cannot say in time: the request is accepted and its run decides.
        service.sources.timeout_s = 0.0
        rec, _ = await service.apply(fleet_request(body, config), body)
        await wait_done(rec)
        assert rec.status == "failed" and rec.error is not None and "gone-1" in rec.error
        assert fake.folder_vms("fleet/checked") == []

