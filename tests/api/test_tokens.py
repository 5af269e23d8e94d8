"""Many clients (issue 15): the tokens file, who sees and changes which fleet, quotas,
and the audit log. The HTTP tests run the real app in process (aiohttp's test
server) on a FleetService against a simulator in process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp.test_utils import TestClient, TestServer

from fleet.api.app import make_app
from fleet.api.audit import AuditLog
from fleet.api.config import ServiceConfig, config_from_dict
from fleet.api.service import FleetService
from fleet.api.tokens import load_tokens
from fleet.engine.lifetime import LABEL_OWNER
from fleet.engine.operations import provision
from fleet.engine.spec import SpecError, spec_from_dict
from fleet.metrics import FleetMetrics
from fleet.vsphere.model import VSphere
from tests.api.test_service import (
    ENV,
    FROZEN4,
    TOKEN,
    Clock,
    folder_fake,
    make_config,
    members_of,
    until,
)

pytestmark = pytest.mark.anyio

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TOKENS = f"""\
# two teams
[[clients]]
name = "alice"
token_sha256 = "{sha(ALICE)}"
role = "client"
max_members = 3
max_leases = 2
pools = ["ci-small"]

[[clients]]
name = "bob"
token_sha256 = "{sha(BOB)}"
"""


def write(tmp_path: Path, text: str, name: str = "tokens.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the tokens file ---------------------------------------------------------------------

def test_a_tokens_file_lists_clients_with_roles_and_quotas(tmp_path: Path) -> None:
    clients, problems = load_tokens(write(tmp_path, TOKENS))
    assert problems == []
    alice, bob = clients
    assert (alice.name, alice.role, alice.max_members, alice.max_leases, alice.pools) == \
        ("alice", "client", 3, 2, ("ci-small",))
    assert (bob.role, bob.max_members, bob.pools) == ("client", None, None)
    assert alice.digest == hashlib.sha256(ALICE.encode()).digest()
    assert sha(ALICE) not in repr(alice)


@pytest.mark.parametrize(("text", "line", "words"), [
    (TOKENS.replace('role = "client"', 'role = "root"'), 5, "clients[0].role"),
    (TOKENS.replace('max_members = 3', 'max_members = -1'), 6, "clients[0].max_members"),
    (TOKENS.replace('pools = ["ci-small"]', 'pools = ["CI small"]'), 8, "not a pool name"),
    (TOKENS.replace('name = "bob"', 'name = "alice"'), 11, "names must be unique"),
    (TOKENS.replace(sha(BOB), sha(ALICE)), 12, "own token"),
    (TOKENS.replace(f'token_sha256 = "{sha(BOB)}"\n', ""), 10, "clients[1].token_sha256"),
    (TOKENS + "colour = 1\n", 13, "unknown key"),
    (TOKENS.replace('max_leases = 2', 'max_leases = 2 2'), 7, "not valid TOML"),
    (TOKENS.replace('name = "bob"', 'name = "bob smith"'), 11, "clients[1].name"),
])
def test_a_bad_tokens_file_names_the_file_and_the_line(tmp_path: Path, text: str, line: int,
                                                      words: str) -> None:
    path = write(tmp_path, text)
    _, problems = load_tokens(path)
    assert problems, text
    assert str(path) in problems[0] and f"line {line}" in problems[0], problems
    assert words in problems[0], problems


def test_a_token_pasted_for_its_hash_is_refused_and_not_repeated(tmp_path: Path) -> None:
    _, problems = load_tokens(write(tmp_path, TOKENS.replace(sha(BOB), BOB)))
    assert "line 12" in problems[0] and "64 hex digits" in problems[0]
    assert BOB not in "".join(problems)


def config_with(tmp_path: Path, api: dict[str, Any]) -> ServiceConfig:
    return config_from_dict({"api": api, "state_dir": str(tmp_path / "state")},
                            source="serve.toml", env=ENV, base_dir=tmp_path)


def test_the_single_token_is_one_admin_beside_the_tokens_file(tmp_path: Path) -> None:
    write(tmp_path, TOKENS)
    config = config_with(tmp_path, {"token_env": "TOKEN", "tokens_file": "tokens.toml"})
    assert [(c.name, c.role) for c in config.api.clients] == \
        [("admin", "admin"), ("alice", "client"), ("bob", "client")]
    # The tokens file alone will do; the single token alone still does.
    assert len(config_with(tmp_path, {"tokens_file": "tokens.toml"}).api.clients) == 2
    assert [c.name for c in config_with(tmp_path, {"token_env": "TOKEN"}).api.clients] == \
        ["admin"]


def test_the_tokens_file_may_not_reuse_the_single_tokens_hash_or_name(tmp_path: Path) -> None:
    write(tmp_path, TOKENS.replace(sha(BOB), sha(TOKEN)).replace('"bob"', '"admin"'))
    with pytest.raises(SpecError) as info:
        config_with(tmp_path, {"token_env": "TOKEN", "tokens_file": "tokens.toml"})
    text = str(info.value)
    assert "api.tokens_file" in text and "line 11" in text and "line 12" in text
    assert "the single [api] token" in text and TOKEN not in text


def test_fleet_serve_exits_2_naming_the_line_of_a_bad_tokens_file(tmp_path: Path) -> None:
    write(tmp_path, TOKENS.replace('role = "client"', 'role = "owner"'))
    config = tmp_path / "serve.toml"
    config.write_text('[api]\ntokens_file = "tokens.toml"\n')
    proc = subprocess.run([sys.executable, "-m", "fleet", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "tokens.toml line 5 (clients[0].role)" in proc.stderr, proc.stderr
    assert "listening" not in proc.stdout


# -- the API, client by client -------------------------------------------------------------

class Api:
    def __init__(self, http: TestClient[Any, Any], service: FleetService, audit: Path) -> None:
        self.http = http
        self.service = service
        self.audit = audit

    async def call(self, token: str | None, method: str, path: str, body: Any = None
                   ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        resp = await self.http.request(method, path, json=body, headers=headers)
        return resp.status, await resp.json()

    def lines(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


def tokens_config(tmp_path: Path, state: Path, **api: Any) -> ServiceConfig:
    write(tmp_path, TOKENS)
    return make_config(state, api={"token_env": "TOKEN",
                                   "tokens_file": str(tmp_path / "tokens.toml"), **api})


@asynccontextmanager
async def api_on(config: ServiceConfig, vs: VSphere, audit: Path | None = None
                 ) -> AsyncIterator[Api]:
    metrics = FleetMetrics()
    async with FleetService(config, vs, metrics, clock=Clock()) as service:
        path = audit or config.api.audit_path or service.store.path / "audit.jsonl"
        app = make_app(service, config, metrics, AuditLog(path))
        async with TestClient(TestServer(app)) as http:
            yield Api(http, service, path)


async def test_a_client_sees_and_changes_only_its_own_fleets(tmp_path: Path) -> None:
    config = tokens_config(tmp_path, tmp_path / "state")
    async with folder_fake() as (vs, _), api_on(config, vs) as api:
        assert (await api.call(ALICE, "POST", "/v1/fleets", {"name": "alpha", "count": 1}))[0] \
            == 202
        assert (await api.call(BOB, "PUT", "/v1/fleets/bravo", {"count": 1}))[0] == 202
        status, body = await api.call(BOB, "GET", "/v1/fleets")
        assert [f["name"] for f in body["fleets"]] == ["bravo"]
        status, body = await api.call(TOKEN, "GET", "/v1/fleets")
        assert {f["name"]: f["owner"] for f in body["fleets"]} == \
            {"alpha": "alice", "bravo": "bob"}
        # Bob tries alice's fleet every way: not found, and its name is taken.
        for method, path, payload in [
                ("GET", "/v1/fleets/alpha", None),
                ("GET", "/v1/fleets/alpha/inventory", None),
                ("PATCH", "/v1/fleets/alpha", {"count": 0}),
                ("DELETE", "/v1/fleets/alpha", None)]:
            status, body = await api.call(BOB, method, path, payload)
            assert status == 404 and body["error"]["message"] == "no fleet called 'alpha'", \
                (method, status, body)
        status, body = await api.call(BOB, "PUT", "/v1/fleets/alpha", {"count": 2})
        assert status == 403 and "taken" in body["error"]["message"]
        status, body = await api.call(BOB, "POST", "/v1/fleets", {"name": "alpha", "count": 1})
        assert status == 403 and "taken" in body["error"]["message"]
        rec = api.service.fleets["alpha"]
        assert (rec.owner, rec.requested, rec.want_destroy) == ("alice", 1, False)
        # The owner and an admin may.
        assert (await api.call(ALICE, "GET", "/v1/fleets/alpha"))[0] == 200
        assert (await api.call(TOKEN, "PATCH", "/v1/fleets/alpha", {"count": 2}))[0] == 202
        assert (await api.call(ALICE, "DELETE", "/v1/fleets/alpha"))[0] == 202
        assert rec.want_destroy


async def test_a_quota_refuses_with_429_naming_it_and_the_usage(tmp_path: Path) -> None:
    config = tokens_config(tmp_path, tmp_path / "state")
    async with folder_fake() as (vs, _), api_on(config, vs) as api:
        assert (await api.call(ALICE, "POST", "/v1/fleets", {"name": "qa", "count": 2}))[0] \
            == 202
        status, body = await api.call(ALICE, "POST", "/v1/fleets", {"name": "qb", "count": 2})
        assert status == 429, body
        assert body["error"]["quota"] == {"name": "max_members", "limit": 3, "usage": 2,
                                          "requested": 2}
        assert "max_members" in body["error"]["message"]
        assert "qb" not in api.service.fleets
        status, body = await api.call(ALICE, "PATCH", "/v1/fleets/qa", {"count": 4})
        assert status == 429 and body["error"]["quota"]["requested"] == 2
        assert (await api.call(ALICE, "PATCH", "/v1/fleets/qa", {"count": 3}))[0] == 202
        assert (await api.call(ALICE, "POST", "/v1/fleets", {"name": "qb", "count": 0}))[0] \
            == 202
        # Bob has no quota; an admin is never held to one.
        assert (await api.call(BOB, "POST", "/v1/fleets", {"name": "qc", "count": 5}))[0] \
            == 202
        assert (await api.call(TOKEN, "PATCH", "/v1/fleets/qa", {"count": 6}))[0] == 202
        # Over its quota now (an admin did it), alice may still shrink, never grow.
        assert (await api.call(ALICE, "PATCH", "/v1/fleets/qa", {"count": 5}))[0] == 202
        assert (await api.call(ALICE, "PATCH", "/v1/fleets/qb", {"count": 1}))[0] == 429


async def test_every_change_and_every_401_is_in_the_audit_log(tmp_path: Path) -> None:
    config = tokens_config(tmp_path, tmp_path / "state")
    async with folder_fake() as (vs, _), api_on(config, vs) as api:
        status, _ = await api.call(ALICE, "POST", "/v1/fleets", {"name": "au", "count": 0})
        assert status == 202
        assert (await api.call(None, "GET", "/v1/fleets"))[0] == 401
        assert (await api.call("wrong-token-0123456789", "DELETE", "/v1/fleets/au"))[0] == 401
        assert (await api.call(BOB, "DELETE", "/v1/fleets/au"))[0] == 404
        assert (await api.call(ALICE, "PATCH", "/v1/fleets/au", {"count": "x"}))[0] == 422
        assert (await api.call(ALICE, "GET", "/v1/fleets/au"))[0] == 200  # a read: no line
        lines = api.lines()
        assert [(e["client"], e["action"], e["object"], e["status"]) for e in lines] == [
            ("alice", "POST /v1/fleets", "au", 202),
            ("-", "GET /v1/fleets", None, 401),
            ("-", "DELETE /v1/fleets/{name}", "au", 401),
            ("bob", "DELETE /v1/fleets/{name}", "au", 404),
            ("alice", "PATCH /v1/fleets/{name}", "au", 422)]
        assert lines[0]["outcome"] == "ok"
        assert lines[2]["outcome"] == "refused: the bearer token is not valid"
        assert lines[4]["outcome"] == "refused: invalid request body; problems at: count"
        assert all(e["time"].endswith("Z") and set(e) == {"time", "client", "action",
                                                          "object", "status", "outcome"}
                   for e in lines)
        text = api.audit.read_text()
        assert "wrong-token" not in text and ALICE not in text and '"x"' not in text


async def test_no_change_is_accepted_while_the_audit_log_cannot_be_written(
        tmp_path: Path) -> None:
    config = tokens_config(tmp_path, tmp_path / "state")
    audit = tmp_path / "audit.jsonl"
    async with folder_fake() as (vs, _), api_on(config, vs, audit) as api:
        audit.mkdir()  # a directory: opening it for appending fails
        status, _ = await api.call(ALICE, "POST", "/v1/fleets", {"name": "un", "count": 0})
        assert status == 202  # accepted; its line could not be written: logged, and...
        status, body = await api.call(ALICE, "POST", "/v1/fleets", {"name": "dos", "count": 0})
        assert status == 503 and "audit log" in body["error"]["message"]
        assert body["error"]["retry_after_s"] == 5  # every 503 says when to come back
        assert "dos" not in api.service.fleets
        assert (await api.call(ALICE, "GET", "/v1/fleets/un"))[0] == 200  # reads go on
        audit.rmdir()
        status, _ = await api.call(ALICE, "POST", "/v1/fleets", {"name": "dos", "count": 0})
        assert status == 202
        assert [(e["object"], e["status"]) for e in api.lines()] == [("dos", 202)]


async def test_an_audit_log_that_is_a_fifo_or_a_device_fails_at_once(
        tmp_path: Path) -> None:
    """A FIFO nobody reads would block the open (and the request) for ever; a device
    swallows lines. Either is a failing log: refused at once, state changes stop."""
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/null")):
        audit = AuditLog(path)
        with anyio.fail_after(10):
            await audit.write(client="alice", action="POST /v1/fleets", obj="x",
                              status=202, outcome="ok", sync=True)
            assert audit.failing is not None and audit.lines == 0
            assert not await audit.ready()


async def test_a_fleets_owner_lives_in_vcenter_and_survives_a_lost_state(
        tmp_path: Path) -> None:
    config = tokens_config(tmp_path, tmp_path / "state")
    async with folder_fake() as (vs, fake):
        async with api_on(config, vs) as api:
            assert (await api.call(ALICE, "POST", "/v1/fleets",
                                   {"name": "kept", "count": 2}))[0] == 202
            rec = api.service.fleets["kept"]
            await until(lambda: rec.status == "ready")
        assert [vm.extra_config.get(LABEL_OWNER) for vm in members_of(fake, "kept")] == \
            ["alice", "alice"]
        # The state directory kept it too...
        saved = json.loads((tmp_path / "state" / "kept.json").read_text())
        assert saved["extra"]["owner"] == "alice"
        async with api_on(config, vs) as api:
            assert api.service.fleets["kept"].owner == "alice"
            # A client cannot write the owner label itself (guestinfo.fleet.* is fleet's).
            status, body = await api.call(BOB, "POST", "/v1/fleets", {
                "name": "forged", "count": 1, "guestinfo": {LABEL_OWNER: "alice"}})
            assert status == 422, body
        # ...but vCenter alone is enough: a service with a new state directory finds it.
        fresh = tokens_config(tmp_path, tmp_path / "other-state")
        async with api_on(fresh, vs) as api:
            assert api.service.fleets["kept"].status == "discovered"
            assert (await api.call(BOB, "GET", "/v1/fleets/kept"))[0] == 404
            status, body = await api.call(ALICE, "GET", "/v1/fleets/kept")
            assert status == 200 and body["owner"] == "alice"


async def test_a_fleet_made_outside_the_service_is_for_admins_only(tmp_path: Path) -> None:
    config = tokens_config(tmp_path, tmp_path / "state")
    spec = spec_from_dict({"name": "fromcli", "count": 1, "sources": FROZEN4,
                           "network": {"refresh": "none", "disconnect_at_clone": False},
                           "readiness": {"wait_for": "none"}}, env=ENV)
    async with folder_fake() as (vs, _):
        assert (await provision(spec, vs)).complete  # fleet provision: no owner label
        async with api_on(config, vs) as api:
            assert api.service.fleets["fromcli"].owner is None
            assert (await api.call(ALICE, "GET", "/v1/fleets"))[1] == {"fleets": []}
            assert (await api.call(ALICE, "GET", "/v1/fleets/fromcli"))[0] == 404
            status, body = await api.call(ALICE, "PUT", "/v1/fleets/fromcli", {"count": 1})
            assert status == 403, body
            status, body = await api.call(TOKEN, "GET", "/v1/fleets/fromcli")
            assert status == 200 and body["owner"] is None


async def test_a_stopping_service_answers_503_with_retry_after(tmp_path: Path) -> None:
    config = tokens_config(tmp_path, tmp_path / "state")
    async with folder_fake() as (vs, _), api_on(config, vs) as api:
        api.service._stopping = True  # what a SIGTERM sets first
        resp = await api.http.post("/v1/fleets", json={"name": "late", "count": 0},
                                   headers={"Authorization": f"Bearer {ALICE}"})
        body = await resp.json()
        assert resp.status == 503 and "stopping" in body["error"]["message"]
        assert resp.headers["Retry-After"] == "5" and body["error"]["retry_after_s"] == 5
        api.service._stopping = False
