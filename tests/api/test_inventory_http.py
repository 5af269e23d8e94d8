"""``GET /v1/fleets/{name}`` with each member's record, and ``GET .../inventory`` in every
format, against the simulator's own VMs."""

from __future__ import annotations

import csv
import io
import json

import yaml

from tests.api.serveproc import ServeProcess
from tests.api.test_http import conforms, doc, error_of
from tests.simproc import SimProcess
from tests.test_cli_inventory import sim_vms


def test_members_carry_their_records_and_every_inventory_format_says_the_same(
        service: ServeProcess, sim: SimProcess) -> None:
    document = doc(service)
    status, body = service.call("POST", "/v1/fleets", {"name": "restinv", "count": 8})
    assert status == 202, body
    fleet = service.wait_for("restinv")
    vms = sim_vms(sim, "fleet/restinv")
    ips = {name: vm["ip"] for name, vm in vms.items()}
    assert len(ips) == 8 and len(set(ips.values())) == 8
    conforms(document, "FleetDetail", fleet)
    assert fleet["member_records_error"] is None
    for member in fleet["member_list"]:
        assert member["ip"] == ips[member["name"]]
        assert member["ip_addresses"][0] == member["ip"] and member["address_status"] == "ok"
        assert member["macs"] == vms[member["name"]]["macs"]
        assert member["host"] == vms[member["name"]]["host"]
        assert member["fleet"] == "restinv" and member["datastore"].startswith("ds-")
        assert member["instance_uuid"] and member["created_at"] and member["ready_at"]

    # A page reads (and shows) the records of its own members.
    status, page = service.call("GET", "/v1/fleets/restinv?offset=2&limit=3")
    assert status == 200
    assert [(m["index"], m["ip"]) for m in page["member_list"]] == \
        [(i, ips[f"restinv-{i:04d}"]) for i in (2, 3, 4)]

    status, headers, raw = service.raw("GET", "/v1/fleets/restinv/inventory?format=json",
                                       headers={"Authorization": f"Bearer {service.token}"})
    assert status == 200 and headers["content-type"].startswith("application/json")
    data = json.loads(raw)
    assert data["fleet"] == "restinv"
    for record in data["members"]:
        conforms(document, "MemberRecord", record)
    assert {m["name"]: m["ip"] for m in data["members"]} == ips

    def get(fmt: str) -> tuple[str, str]:
        status, headers, raw = service.raw(
            "GET", f"/v1/fleets/restinv/inventory?format={fmt}",
            headers={"Authorization": f"Bearer {service.token}"})
        assert status == 200, raw
        return headers["content-type"], raw.decode()

    kind, text = get("ansible")
    assert kind.startswith("application/yaml")
    hosts = yaml.safe_load(text)["all"]["children"]["fleet_restinv"]["hosts"]
    assert {name: h["ansible_host"] for name, h in hosts.items()} == ips
    kind, text = get("csv")
    assert kind.startswith("text/csv")
    assert {r["name"]: r["ip"] for r in csv.DictReader(io.StringIO(text, newline=""))} == ips
    kind, text = get("hosts")
    assert kind.startswith("text/plain")
    assert {line.split()[1]: line.split()[0] for line in text.splitlines()
            if not line.startswith("#")} == ips

    status, body = service.call("GET", "/v1/fleets/restinv/inventory?format=xml")
    assert status == 400 and "'xml' is not an inventory format" in error_of(body)["message"]
    status, body = service.call("GET", "/v1/fleets/nosuch/inventory")
    assert status == 404
    status, body = service.call("GET", "/v1/fleets/restinv/inventory", token=False)
    assert status == 401

    status, body = service.call("DELETE", "/v1/fleets/restinv")
    assert status == 202
    service.wait_for("restinv", ("gone",))
