"""Warm pools and leases (issue 15, docs/pools.md), on the real app in process over a
simulator in process: filling, leasing, returning, expiring, extending, quotas, and what
a restart or another instance does with the leases vCenter holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from fleet.api.pools import Pool
from fleet.api.requests import ApiError
from fleet.engine.lifetime import LABEL_LEASE, LABEL_POOL
from fleet.sim.topology import FaultRule
from fleet.testing.harness import SimVCenter
from tests.api.test_service import make_config, until
from tests.api.test_tokens import ALICE, BOB, TOKEN, Api, api_on, folder_fake, write
from tests.api.test_tokens import sha as token_sha

pytestmark = pytest.mark.anyio

CAROL = "carol-token-0123456789abcdef"

TOKENS = f"""\
[[clients]]
name = "alice"
token_sha256 = "{token_sha(ALICE)}"
max_leases = 2
pools = ["ci"]

[[clients]]
name = "bob"
token_sha256 = "{token_sha(BOB)}"
pools = ["ci", "other"]

[[clients]]
name = "carol"
token_sha256 = "{token_sha(CAROL)}"
max_members = 1
"""


def pool_config(tmp_path: Path, state: str = "state", **pool: Any) -> Any:
    write(tmp_path, TOKENS)
    spec = {"ready": 2, "max": 4, **pool}
    return make_config(tmp_path / state,
                       api={"token_env": "TOKEN", "tokens_file": str(tmp_path / "tokens.toml")},
                       pools={"ci": spec, "other": {"ready": 0, "max": 1}})


def pool_vms(sim: SimVCenter, pool: str = "ci") -> dict[str, Any]:
    return {vm.name: vm for vm in sim.folder_vms(f"fleet-pools/{pool}")}


async def filled(api: Api, name: str = "ci", idle: int = 2) -> Pool:
    pool = api.service.pools[name]
    await until(lambda: pool.serving and len(pool.idle) == idle and not pool.refilling, 20)
    return pool


async def lease(api: Api, token: str, body: Any = None, pool: str = "ci"
                ) -> tuple[int, Any]:
    return await api.call(token, "POST", f"/v1/pools/{pool}/leases", body)


async def test_a_lease_is_an_idle_member_with_its_record_and_the_pool_refills(
        tmp_path: Path) -> None:
    async with folder_fake() as (vs, sim), api_on(pool_config(tmp_path), vs) as api:
        pool = await filled(api)
        idle_before = [m.name for m in pool.idle]
        status, body = await lease(api, ALICE, {"ttl_s": 600})
        assert status == 201, body
        got = body["lease"]
        assert got["client"] == "alice" and got["state"] == "active"
        assert got["expires_at"] == api.service.clock() + 600
        member = got["member"]
        # The oldest idle member, with its whole record.
        assert member["name"] == idle_before[0]
        assert member["fleet"] == "ci" and member["vm"].startswith("vm-")
        assert member["macs"] and member["host"] and member["instance_uuid"]
        # The lease is written on the VM, and the pool is back to two idle members.
        vm = pool_vms(sim)[member["name"]]
        await until(lambda: vm.extra_config.get(LABEL_LEASE, "").startswith("leased "))
        assert vm.extra_config[LABEL_LEASE].split()[1:3] == [got["id"], "alice"]
        assert vm.extra_config[LABEL_POOL] == "ci"
        await filled(api)
        assert member["name"] not in [m.name for m in pool.idle]
        # Returned: the VM is destroyed, never handed out again.
        status, body = await api.call(ALICE, "DELETE", f"/v1/leases/{got['id']}")
        assert status == 200 and body["lease"]["state"] == "returned"
        await until(lambda: member["name"] not in pool_vms(sim))
        names = set()
        for _ in range(3):
            status, body = await lease(api, TOKEN)
            assert status == 201
            names.add(body["lease"]["member"]["name"])
        assert member["name"] not in names and len(names) == 3


async def test_a_full_pool_says_429_with_retry_after_and_a_wait_gets_the_next_refill(
        tmp_path: Path) -> None:
    async with folder_fake() as (vs, _sim), api_on(pool_config(tmp_path), vs) as api:
        await filled(api)
        # "other" keeps none idle: with no wait, 429 at once, saying why.
        status, body = await lease(api, BOB, {"wait_s": 0}, pool="other")
        assert status == 429 and body["error"]["reason"] == "wait_timeout", body
        # A request that waits gets the refill it causes.
        status, body = await lease(api, BOB, {"wait_s": 20}, pool="other")
        assert status == 201, body
        # Its one member leased: at max, 429 with Retry-After, waiting or not.
        status, body = await lease(api, BOB, {"wait_s": 20}, pool="other")
        assert status == 429 and body["error"]["reason"] == "at_max", body
        resp = await api.http.post("/v1/pools/other/leases",
                                   headers={"Authorization": f"Bearer {BOB}"})
        assert resp.status == 429 and 1 <= int(resp.headers["Retry-After"]) <= 3600
        assert (await resp.json())["error"]["retry_after_s"] == int(resp.headers["Retry-After"])


async def test_an_expired_lease_is_destroyed_and_extensions_stay_within_the_max(
        tmp_path: Path) -> None:
    config = pool_config(tmp_path, max_lease_ttl_s=1000.0, lease_ttl_s=100.0)
    async with folder_fake() as (vs, sim), api_on(config, vs) as api:
        await filled(api)
        clock = api.service.clock
        status, body = await lease(api, BOB)
        lid, name = body["lease"]["id"], body["lease"]["member"]["name"]
        assert body["lease"]["expires_at"] == clock() + 100
        status, body = await api.call(BOB, "PATCH", f"/v1/leases/{lid}", {"ttl_s": 900})
        assert status == 200 and body["lease"]["expires_at"] == clock() + 900
        status, body = await api.call(BOB, "PATCH", f"/v1/leases/{lid}", {"ttl_s": 1001})
        assert status == 422 and "max_lease_ttl_s" in body["error"]["message"]
        status, body = await lease(api, BOB, {"ttl_s": 1001})
        assert status == 422 and "max_lease_ttl_s" in body["error"]["message"]
        vm = pool_vms(sim)[name]
        await until(lambda: vm.extra_config.get(LABEL_LEASE, "").split()[4:5]
                    == [str(int(clock() + 900))])
        clock.now += 901  # type: ignore[attr-defined]
        await until(lambda: name not in pool_vms(sim))  # within a tick (docs/pools.md)
        status, body = await api.call(BOB, "GET", f"/v1/leases/{lid}")
        assert status == 200 and body["lease"]["state"] == "expired"
        status, body = await api.call(BOB, "PATCH", f"/v1/leases/{lid}", {"ttl_s": 10})
        assert status == 409


async def test_clients_see_only_their_leases_within_their_pools_and_quotas(
        tmp_path: Path) -> None:
    async with folder_fake() as (vs, _sim), api_on(pool_config(tmp_path), vs) as api:
        await filled(api)
        status, body = await api.call(ALICE, "GET", "/v1/pools")
        assert [p["name"] for p in body["pools"]] == ["ci"]
        status, body = await lease(api, ALICE, pool="other")
        assert status == 403 and "may not lease from pool other" in body["error"]["message"]
        status, body = await lease(api, ALICE, {"ttl_s": 60})
        lid = body["lease"]["id"]
        # Bob cannot see, extend or return alice's lease; it is "not found".
        for method, payload in (("GET", None), ("PATCH", {"ttl_s": 5}), ("DELETE", None)):
            status, body = await api.call(BOB, method, f"/v1/leases/{lid}", payload)
            assert status == 404, (method, body)
        assert (await api.call(BOB, "GET", "/v1/leases"))[1] == {"leases": []}
        assert [x["id"] for x in (await api.call(TOKEN, "GET", "/v1/leases"))[1]["leases"]] \
            == [lid]
        assert api.service.leases[lid].state == "active"
        # max_leases = 2: the third is refused, naming the quota.
        assert (await lease(api, ALICE, {"wait_s": 10}))[0] == 201
        status, body = await lease(api, ALICE, {"wait_s": 10})
        assert status == 429 and body["error"]["quota"]["name"] == "max_leases", body
        # max_members counts leases and fleets together.
        assert (await lease(api, CAROL, {"wait_s": 10}))[0] == 201
        status, body = await api.call(CAROL, "POST", "/v1/fleets", {"name": "c1", "count": 1})
        assert status == 429 and body["error"]["quota"]["name"] == "max_members"
        status, body = await lease(api, CAROL, {"wait_s": 10})
        assert status == 429 and body["error"]["quota"]["name"] == "max_members"
        # Every lease change is in the audit log, with the pool and the lease.
        actions = [(x["client"], x["action"], x["status"]) for x in api.lines()]
        assert ("alice", "POST /v1/pools/{pool}/leases", 201) in actions
        assert ("bob", "DELETE /v1/leases/{lease}", 404) in actions
        assert f"ci/{lid}" in [x["object"] for x in api.lines()]
        # And in the metrics: granted by client, refused by reason.
        text = api.service.metrics.exposition().decode()
        for line in ('fleet_leases_total{client="alice",outcome="granted",pool="ci"} 2.0',
                     'fleet_lease_refusals_total{client="alice",pool="other",'
                     'reason="not_allowed"} 1.0',
                     'fleet_lease_refusals_total{client="alice",pool="ci",reason="quota"} 1.0',
                     'fleet_lease_wait_seconds_count{pool="ci"} 3.0'):
            assert line in text, (line, [x for x in text.splitlines() if "lease" in x])


@pytest.mark.parametrize("body, key", [
    ({"wait_s": 601}, "wait_s"), ({"ttl_s": 0}, "ttl_s"), ({"ttl_s": "1h"}, "ttl_s"),
    ({"ttl": 5}, "ttl"), ([], "")])
async def test_a_bad_lease_body_is_422_naming_the_key(tmp_path: Path, body: Any,
                                                      key: str) -> None:
    async with folder_fake() as (vs, _sim), api_on(pool_config(tmp_path), vs) as api:
        status, answer = await lease(api, TOKEN, body)
        assert status == 422, answer
        assert [p["key"] for p in answer["error"]["problems"]] == [key]


async def test_a_restart_keeps_every_lease_and_its_idle_members(tmp_path: Path) -> None:
    config = pool_config(tmp_path)
    async with folder_fake() as (vs, sim):
        async with api_on(config, vs) as api:
            await filled(api)
            kept = (await lease(api, BOB, {"ttl_s": 500}))[1]["lease"]
            gone = (await lease(api, BOB))[1]["lease"]
            await filled(api)
            idle = sorted(m.name for m in api.service.pools["ci"].idle)
            await api.call(BOB, "DELETE", f"/v1/leases/{gone['id']}")
        async with api_on(config, vs) as api:
            pool = await filled(api)
            assert sorted(m.name for m in pool.idle) == idle  # the same VMs, not new ones
            status, body = await api.call(BOB, "GET", f"/v1/leases/{kept['id']}")
            assert status == 200 and body["lease"]["member"]["name"] == kept["member"]["name"]
            assert body["lease"]["expires_at"] == kept["expires_at"]
            await until(lambda: gone["member"]["name"] not in pool_vms(sim))
            for _ in range(2):
                got = (await lease(api, TOKEN))[1]["lease"]["member"]["name"]
                assert got != kept["member"]["name"]


async def test_a_grant_the_label_never_reached_is_kept_from_the_journal(
        tmp_path: Path) -> None:
    """Killed between the answer and the label: the journal, written before the answer,
    makes the next start treat the member as leased (and label it)."""
    config = pool_config(tmp_path)
    async with folder_fake() as (vs, sim):
        async with api_on(config, vs) as api:
            pool = await filled(api)
            pool._label = lambda lease: None  # type: ignore[method-assign]
            got = (await lease(api, BOB))[1]["lease"]
            vm = pool_vms(sim)[got["member"]["name"]]
            assert vm.extra_config[LABEL_LEASE].startswith("idle ")
            journal = (tmp_path / "state" / "pools" / "ci.jsonl").read_text().splitlines()
            assert json.loads(journal[-1])["id"] == got["id"]
        async with api_on(config, vs) as api:
            pool = await filled(api)
            assert got["member"]["name"] not in [m.name for m in pool.idle]
            assert (await api.call(BOB, "GET", f"/v1/leases/{got['id']}"))[0] == 200
            await until(lambda: vm.extra_config[LABEL_LEASE].startswith(f"leased {got['id']}"))


async def test_another_instance_never_leases_idle_members_it_did_not_make(
        tmp_path: Path) -> None:
    """Two instances on one vCenter: one serves, the other says who does; when the first
    is gone, the second takes the pool over but keeps the first's idle members out of
    reach (they may have been handed out just before their label)."""
    first, second = pool_config(tmp_path, "state-a"), pool_config(tmp_path, "state-b")
    async with folder_fake() as (vs, sim):
        async with api_on(first, vs) as a:
            await filled(a)
            leased = (await lease(a, BOB))[1]["lease"]
            await filled(a)
            a_idle = {m.name for m in a.service.pools["ci"].idle}
            async with api_on(second, vs) as b:
                await anyio.sleep(0.3)
                status, body = await lease(b, BOB)
                assert status == 503 and "served by" in body["error"]["message"], body
                assert (await b.call(BOB, "GET", "/v1/pools/ci"))[1]["serving"] is False
            # a hands over (stops), holding its lease in vCenter.
            a.service.pools["ci"].stopping = True
            await a.service.pools["ci"].stop(30)
        async with api_on(second, vs) as b:
            pool = b.service.pools["ci"]
            await until(lambda: pool.serving, 30)
            assert {m.name for m in pool.members.values() if m.state == "doubt"} == a_idle
            assert (await b.call(BOB, "GET", f"/v1/leases/{leased['id']}"))[0] == 200
            # Room for one more (max 4: 1 leased, 2 in doubt): that one is leased, the
            # members in doubt never are.
            await until(lambda: len(pool.idle) == 1)
            status, body = await lease(b, BOB)
            assert status == 201 and body["lease"]["member"]["name"] not in a_idle
            status, body = await lease(b, BOB, {"wait_s": 1})
            assert status == 429 and body["error"]["reason"] == "at_max"
            # Their deadline is on them (a restart keeps it), and they go when it passes.
            vms = pool_vms(sim)
            await until(lambda: all(vms[n].extra_config[LABEL_LEASE].startswith("doubt ")
                                    for n in a_idle))
            until_at = {int(vms[n].extra_config[LABEL_LEASE].split()[1]) for n in a_idle}
            assert until_at == {int(b.service.clock()) + 86400}
            b.service.clock.now += 86401  # type: ignore[attr-defined]
            await until(lambda: not a_idle & set(pool_vms(sim)))


async def test_a_client_may_not_clone_another_clients_member_or_a_pool_member(
        tmp_path: Path) -> None:
    """An instant clone copies its source's memory: naming another team's VM (or a
    leased pool member) as a source would copy what runs in it."""
    async with folder_fake() as (vs, sim), api_on(pool_config(tmp_path), vs) as api:
        await filled(api)
        assert (await api.call(ALICE, "POST", "/v1/fleets", {"name": "af", "count": 1}))[0] \
            == 202
        await until(lambda: any(vm.name == "af-0000" for vm in sim.folder_vms("fleet/af")),
                    20)
        member = (await lease(api, BOB))[1]["lease"]["member"]["name"]
        for token, source, word in ((BOB, "af-0000", "fleet af"),
                                    (CAROL, member, "warm pool ci"),
                                    (ALICE, member, "warm pool ci")):
            status, body = await api.call(token, "POST", "/v1/fleets",
                                          {"name": f"steal-{token[:3]}", "count": 1,
                                           "sources": [source]})
            assert status == 422, body
            problem = body["error"]["problems"][0]
            assert problem["key"] == "sources[0]" and word in problem["message"], problem
        # Its own fleet's member is alice's to clone; an admin may clone anything.
        status, body = await api.call(ALICE, "POST", "/v1/fleets",
                                      {"name": "own", "count": 0, "sources": ["af-0000"]})
        assert status == 202, body
        status, body = await api.call(TOKEN, "POST", "/v1/fleets",
                                      {"name": "adm", "count": 0, "sources": [member]})
        assert status == 202, body


async def test_a_changed_spec_replaces_the_idle_members_but_keeps_the_leased(
        tmp_path: Path) -> None:
    """A new golden image in the pool's spec: no lease hands out a VM of the old one."""
    async with folder_fake() as (vs, sim):
        async with api_on(pool_config(tmp_path), vs) as api:
            await filled(api)
            kept = (await lease(api, BOB))[1]["lease"]
            await filled(api)
            old_idle = {m.name for m in api.service.pools["ci"].idle}
        changed = pool_config(tmp_path, spec={"sources": ["frozen-04"]})
        async with api_on(changed, vs) as api:
            pool = await filled(api)
            await until(lambda: not old_idle & set(pool_vms(sim)))
            assert all(m.record is not None and m.record.source == "frozen-04"
                       for m in pool.idle)
            assert (await api.call(BOB, "GET", f"/v1/leases/{kept['id']}"))[0] == 200


async def test_a_pool_gone_from_the_config_is_reported_and_left_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with folder_fake() as (vs, sim):
        async with api_on(pool_config(tmp_path), vs) as api:
            await filled(api)
            await lease(api, BOB)
        before = set(pool_vms(sim))
        config = make_config(tmp_path / "state", pools={"other": {"ready": 0, "max": 1}})
        with caplog.at_level("WARNING", logger="fleet.api"):
            async with api_on(config, vs):
                await until(lambda: "pool ci, which this config does not have"
                            in caplog.text)
        assert "holds 3 members (1 leased)" in caplog.text
        assert set(pool_vms(sim)) == before


async def labelled_lease(api: Api, sim: SimVCenter) -> tuple[dict[str, Any], Any]:
    """A lease (100 s) of a member of the filled pool, once vCenter carries its label;
    and its VM."""
    await filled(api)
    got = (await lease(api, BOB, {"ttl_s": 100}))[1]["lease"]
    vm = pool_vms(sim)[got["member"]["name"]]
    await until(lambda: vm.extra_config[LABEL_LEASE].startswith("leased "))
    return got, vm


async def test_a_journal_line_older_than_another_instances_label_does_not_shorten_a_lease(
        tmp_path: Path) -> None:
    """a grants (its journal's line), b takes the pool over and extends the lease (b's
    label), a takes it back: the lease ends when b said, not when a's older line says."""
    first, second = pool_config(tmp_path, "state-a"), pool_config(tmp_path, "state-b")
    async with folder_fake() as (vs, sim):
        async with api_on(first, vs) as a:
            got, vm = await labelled_lease(a, sim)
        async with api_on(second, vs) as b:
            await until(lambda: b.service.pools["ci"].serving, 30)
            status, body = await b.call(BOB, "PATCH", f"/v1/leases/{got['id']}",
                                        {"ttl_s": 500})
            assert status == 200, body
            extended = body["lease"]["expires_at"]
            await until(lambda: vm.extra_config[LABEL_LEASE].split()[4] == str(int(extended)))
        async with api_on(first, vs) as a:
            await until(lambda: a.service.pools["ci"].serving, 30)
            status, body = await a.call(BOB, "GET", f"/v1/leases/{got['id']}")
            assert status == 200 and body["lease"]["expires_at"] >= extended, body
            await anyio.sleep(0.3)  # a label rewrite would have landed
            assert vm.extra_config[LABEL_LEASE].split()[4] == str(int(extended))


async def test_an_extension_answered_is_in_vcenter_for_another_instance(
        tmp_path: Path) -> None:
    """An extension is answered once vCenter carries it: an instance that takes the pool
    over (it reads no journal but its own) ends the lease when the client was told."""
    first, second = pool_config(tmp_path, "state-a"), pool_config(tmp_path, "state-b")
    async with folder_fake() as (vs, sim):
        async with api_on(first, vs) as a:
            got, _ = await labelled_lease(a, sim)
            # No label write after the answer lands any more (as if killed right then).
            a.service.pools["ci"]._label = lambda lease: None  # type: ignore[method-assign]
            status, body = await a.call(BOB, "PATCH", f"/v1/leases/{got['id']}",
                                        {"ttl_s": 500})
            assert status == 200, body
            extended = body["lease"]["expires_at"]
        async with api_on(second, vs) as b:
            await until(lambda: b.service.pools["ci"].serving, 30)
            status, body = await b.call(BOB, "GET", f"/v1/leases/{got['id']}")
            assert status == 200 and body["lease"]["expires_at"] >= extended, body


async def test_the_label_writes_of_a_lease_land_in_order(tmp_path: Path) -> None:
    """A slow write of a lease's grant label does not land after its extension's,
    leaving vCenter (what another instance reads) with the older end."""
    async with folder_fake() as (vs, sim), api_on(pool_config(tmp_path), vs) as api:
        pool = await filled(api)
        name = pool.idle[0].name  # the next lease's member (the oldest idle one)
        sim.sim.faults.add(FaultRule(method="ReconfigVM_Task", object=name, fault="slow",
                                     phase="call", delay_s=0.5, max_count=1))
        got = (await lease(api, BOB, {"ttl_s": 100}))[1]["lease"]
        assert got["member"]["name"] == name
        status, body = await api.call(BOB, "PATCH", f"/v1/leases/{got['id']}",
                                      {"ttl_s": 500})
        assert status == 200, body
        await until(lambda: not pool._labels and pool._labels_in_flight == 0)
        vm = pool_vms(sim)[name]
        assert vm.extra_config[LABEL_LEASE].split()[4] == str(int(body["lease"]["expires_at"]))


async def test_a_member_being_destroyed_when_its_instance_stops_is_never_leased(
        tmp_path: Path) -> None:
    """An idle member past ready_ttl_s is being destroyed (powered off, its Destroy_Task
    under way in vCenter) when its instance stops. Started again, the instance finds it
    labelled as one of its own idle members, and must not lease it: it is on its way
    out."""
    async with folder_fake() as (vs, sim):
        async with api_on(pool_config(tmp_path), vs) as a:
            doomed = (await filled(a)).idle[0].name
        # Its destroy takes longer than the test (a stop waits for refills under way).
        sim.sim.faults.add(FaultRule(method="Destroy_Task", object=doomed, fault="slow",
                                     delay_s=60.0, max_count=1))
        vm = pool_vms(sim)[doomed]
        async with api_on(pool_config(tmp_path, ready_ttl_s=0.5), vs):
            await until(lambda: vm.power_state == "poweredOff")  # its destroy is under way
        async with api_on(pool_config(tmp_path), vs) as a:
            pool = a.service.pools["ci"]
            await until(lambda: pool.serving, 30)
            assert doomed not in {m.name for m in pool.idle}
            await until(lambda: doomed not in pool_vms(sim))  # destroyed again, not idle


async def test_a_grant_whose_caller_hung_up_meanwhile_is_returned_at_once(
        tmp_path: Path) -> None:
    async with folder_fake() as (vs, sim), api_on(pool_config(tmp_path), vs) as api:
        pool = await filled(api)
        first = pool.idle[0]
        asked = iter([False, True])  # there before the grant, gone once it is recorded
        with pytest.raises(ApiError) as refused:
            await pool.lease("bob", None, None, gone=lambda: next(asked))
        assert refused.value.status == 499 and refused.value.reason == "client_gone"
        (lease_,) = pool.leases.values()
        assert lease_.state == "returned" and lease_.member is first
        await until(lambda: first.name not in pool_vms(sim))  # destroyed, never handed out
        # Gone before the grant: nothing is recorded and the member stays first in line.
        await filled(api)
        head = pool.idle[0]
        with pytest.raises(ApiError):
            await pool.lease("bob", None, None, gone=lambda: True)
        assert pool.idle[0] is head and len(pool.leases) == 1


async def test_a_burst_of_failed_refills_backs_off_once_not_once_per_clone(
        tmp_path: Path) -> None:
    """Four refills queued together fail for one cause: the backoff is one round's (1 s),
    where doubling per clone made it 8 s (and ten made it the 60 s max)."""
    async with folder_fake() as (vs, sim):
        # Before the service starts, so no refill can be made before the fault is there.
        sim.sim.faults.add(FaultRule(method="InstantClone_Task", fault="FileNotFound",
                                     phase="task"))
        async with api_on(pool_config(tmp_path, ready=4), vs) as api:
            pool = api.service.pools["ci"]
            await until(lambda: pool.error is not None and not pool.refilling, 20)
            assert pool._failures == 1, pool.error
            assert pool._backoff_until - pool._backoff_set_at == 1.0


async def test_a_member_that_comes_for_a_caller_who_hung_up_stays_idle(
        tmp_path: Path) -> None:
    """The request waits for a refill, and its caller hangs up once the refill's VM
    exists: the member is not granted to it (whether a tick drops the request first or
    the member finds it gone), it stays idle, and the request ends as client_gone."""
    async with folder_fake() as (vs, _sim), api_on(pool_config(tmp_path), vs) as api:
        await filled(api)
        other = api.service.pools["other"]  # keeps none idle: a request waits
        await until(lambda: other.serving)
        with pytest.raises(ApiError) as refused:
            await other.lease("bob", None, 30, gone=lambda: bool(other.members))
        assert (refused.value.status, refused.value.reason) == (499, "client_gone")
        await until(lambda: len(other.idle) == 1 and not other.refilling, 20)
        assert not other.waiters and not [x for x in other.leases.values() if x.pool == "other"]
