"""Warm pools under fire: no VM is ever leased twice (issue 15's property test).

One simulator, two real ``fleet serve`` instances A and B (state directories of their
own, the same pool). Six client threads lease, extend, return and let leases expire
against either instance, each on its own seeded random schedule (``FLEET_POOL_SEED``
repeats one; every failure names it; ``FLEET_POOL_LOGS=DIR`` keeps the services' logs).
Meanwhile:

- a fifth in, the instance serving the pool is SIGKILLed right after it answered an
  extension and a grant of the schedule's own, while vCenter is slow to act on the
  members' reconfigurations, so both reach their labels only after the next instance
  has read them (the journal's case; the other instance's doubt); it is started
  again with the same state directory, and the other instance or it takes over;
- a little later whoever serves is stopped (SIGTERM) and the other takes over, while
  members the takeover before put in doubt may still be there;
- half-way the instance left, alone, is SIGKILLed the same way and started again: it
  has nothing but its journal and vCenter's labels to go by.

A monitor thread reads the simulator's inventory over and over with plain pyVmomi
(``tests.chaos.audit``: not fleet's client), so what vCenter holds is judged apart
from what the services say. The invariants:

1. No VM (by id, and by instance uuid) is in two 201 answers; and no member made idle
   by one instance (``idle <instance> <spec>``) is leased by another: after a takeover
   such members are *in doubt* (docs/pools.md).
2. A lease is never cut short: its VM exists for as long as the lease is surely
   active; a lease is never ``expired`` before the expiry its client was told; and at
   the end every lease surely active is known to the serving instance (GET 200) with
   an expiry no sooner than told. The one exception is by design: a grant answered
   by an instance SIGKILLed before its label reached vCenter, whose pool the *other*
   instance took over: that instance cannot know the lease, and keeps its VM in doubt
   (the VM's safety is still checked).
3. An ended lease's VM is gone: whenever the serving instance shows a lease ended and
   no member recycling, the VM is no longer in vCenter (an ordering, not a latency);
   and after the load, every lease surely ended has its VM gone (a bounded poll that
   fails only if it never happens).
4. Members in doubt are never leased (1) and are destroyed: the pool ends with none.
5. Every 429, and every 503 of an instance that does not serve the pool, carries
   Retry-After; no other 5xx; no traceback in any service's stderr; a SIGTERMed
   service exits 0.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleet.engine.lifetime import LABEL_LEASE
from tests.api.serveproc import ServeProcess, service_config
from tests.chaos.audit import folder_id, inventory
from tests.simproc import SimProcess

POOL = "ci"
TIME_SCALE = 0.02
#: Around a SIGKILL, vCenter is slow to act on members' reconfigurations (lease labels;
#: seconds of the test's clock): an extension, then a grant, answered right before the
#: kill reach their labels only after the next instance has read the labels. The case
#: the journal is for, and one a takeover by the other instance must keep safe.
SLOW_EXTEND_S = 3.0
SLOW_GRANT_S = 12.0
READY, MAX = 3, 12
LEASE_TTL_S, MAX_LEASE_TTL_S = 3.0, 8.0
THREADS = 6
OPS = 800  # lease, extend, return, look or pause, over all threads
HELD = 3  # leases a client thread holds at most (6 x 3 > MAX: the pool reaches its max)
#: bounds of the test's waits (generous: a wait that ends sooner returns sooner)
SERVE_WAIT_S = 90.0
SETTLE_WAIT_S = 120.0
CALL_TIMEOUT_S = 30.0


def pool_config(sim: SimProcess, state: Path) -> dict[str, Any]:
    return service_config(sim, state, pools={POOL: {
        "ready": READY, "max": MAX, "lease_ttl_s": LEASE_TTL_S,
        "max_lease_ttl_s": MAX_LEASE_TTL_S, "wait_s": 2.0}})


@dataclass
class Held:
    """A lease some 201 answered, and what the client knows of it since."""

    id: str
    vm: str
    uuid: str | None
    name: str
    by: str  # the incarnation that granted it ("A1": A's first process)
    instance: str  # its instance id
    max_until: float
    received: float  # when its 201 was (epoch seconds)
    #: the expiry its client was told (the 201's, or the last extension's)
    told_until: float
    #: surely active before this (epoch seconds): the expiry told, or the earliest a
    #: request under way (or lost) may end it
    active_lb: float
    #: surely ended after this
    end_ub: float
    #: every request about it was answered (a lost one may have changed it)
    certain: bool = True
    returned_at: float | None = None  # a DELETE answered "returned" by then
    expired_seen: bool = False


@dataclass
class Server:
    label: str
    config: dict[str, Any]
    state: Path
    proc: ServeProcess | None = None
    incarnation: str = ""
    instance: str = ""
    starts: int = 0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any
    server: Server
    incarnation: str


class Run:
    """The servers, the clients' ledger, and every violation seen."""

    def __init__(self, sim: SimProcess, tmp: Path, seed: int) -> None:
        self.sim = sim
        self.seed = seed
        self.servers = {label: Server(label, pool_config(sim, tmp / f"state-{label}"),
                                      tmp / f"state-{label}") for label in ("A", "B")}
        self.procs: list[tuple[str, ServeProcess]] = []  # every process started
        self.lock = threading.Lock()
        self.leases: list[Held] = []
        self.by_vm: dict[str, Held] = {}
        self.by_uuid: dict[str, Held] = {}
        self.made_by: dict[str, str] = {}  # VM id -> the instance its first idle label named
        self.violations: list[str] = []
        self.counts: Counter[str] = Counter()
        self.ops = 0
        self.stop_load = threading.Event()
        self.sigkilled: set[str] = set()  # incarnations
        #: (incarnation SIGKILLed, incarnation that served next) for each kill
        self.takeovers: list[tuple[str, str]] = []
        self.folder: str | None = None
        self.hold = threading.Event()  # set: the client threads lease nothing
        self.t0 = time.monotonic()
        self.timeline: list[str] = []  # what the schedule did, when (the failure shows it)

    def mark(self, what: str) -> None:
        with self.lock:
            self.timeline.append(f"{time.monotonic() - self.t0:.1f}s op {self.ops}: {what}")

    # -- bookkeeping ----------------------------------------------------------------
    def violate(self, message: str) -> None:
        with self.lock:
            self.violations.append(message)
        self.stop_load.set()

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def take_op(self) -> bool:
        with self.lock:
            if self.ops >= OPS or self.stop_load.is_set():
                return False
            self.ops += 1
            return True

    # -- servers ----------------------------------------------------------------------
    def start(self, label: str) -> Server:
        server = self.servers[label]
        proc = ServeProcess(server.config)
        server.starts += 1
        instance = (server.state / "instance").read_text().strip()
        with self.lock:
            server.proc, server.instance = proc, instance
            server.incarnation = f"{label}{server.starts}"
            self.procs.append((server.incarnation, proc))
        return server

    def alive(self, rng: random.Random, only: Server | None = None
              ) -> list[tuple[Server, ServeProcess, str]]:
        with self.lock:
            up = [(s, s.proc, s.incarnation) for s in self.servers.values()
                  if s.proc is not None and only in (None, s)]
        rng.shuffle(up)
        return up

    def call(self, server: Server, proc: ServeProcess, incarnation: str, method: str,
             path: str, body: Any = None) -> Answer | None:
        """One request; None if the connection failed (the process died, or is dying)."""
        headers = {"Authorization": f"Bearer {proc.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            status, resp_headers, raw = proc.raw(method, path, data, headers,
                                                 timeout_s=CALL_TIMEOUT_S)
        except (OSError, http.client.HTTPException):
            self.count("connection_failed")
            return None
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        answer = Answer(status, resp_headers, parsed, server, incarnation)
        self._judge_answer(method, path, answer)
        return answer

    def _judge_answer(self, method: str, path: str, answer: Answer) -> None:
        """Invariant 5 for every answer."""
        what = f"{method} {path} on {answer.incarnation}: {answer.status} {answer.body}"
        if answer.status == 429 or (answer.status == 503 and "served by" in str(answer.body)):
            retry = answer.headers.get("retry-after", "")
            if not (retry.isdigit() and int(retry) >= 1):
                self.violate(f"no Retry-After: {what}")
        if answer.status >= 500 and answer.status != 503:
            self.violate(f"a server error: {what}")
        self.count(f"{method.lower()}_{answer.status}")

    # -- grants -----------------------------------------------------------------------
    def granted(self, answer: Answer) -> Held:
        lease = answer.body["lease"]
        member = lease["member"]
        held = Held(lease["id"], member["vm"], member.get("instance_uuid"), member["name"],
                    answer.incarnation, answer.server.instance,
                    max_until=lease["max_expires_at"], received=time.time(),
                    told_until=lease["expires_at"], active_lb=lease["expires_at"],
                    end_ub=lease["expires_at"])
        with self.lock:
            self.leases.append(held)
            problems = []
            first = self.by_vm.get(held.vm)
            if first is not None:
                problems.append(f"VM {held.vm} ({held.name}) leased twice: lease {first.id} "
                                f"by {first.by}, then lease {held.id} by {held.by}")
            self.by_vm.setdefault(held.vm, held)
            if held.uuid is not None:
                first = self.by_uuid.get(held.uuid)
                if first is not None:
                    problems.append(f"instance uuid {held.uuid} leased twice: lease "
                                    f"{first.id} ({first.vm}) by {first.by}, then lease "
                                    f"{held.id} ({held.vm}) by {held.by}")
                self.by_uuid.setdefault(held.uuid, held)
            problems += self._made_elsewhere(held)
            self.counts["granted"] += 1
        for problem in problems:
            self.violate(problem)
        return held

    def _made_elsewhere(self, held: Held) -> list[str]:
        maker = self.made_by.get(held.vm)
        if maker is None or maker == held.instance:
            return []
        return [f"lease {held.id} by {held.by} (instance {held.instance}) is of VM "
                f"{held.vm} ({held.name}), made idle by instance {maker}: a member in doubt"]

    # -- what vCenter holds -------------------------------------------------------------
    def pool_vms(self) -> dict[str, dict[str, str]]:
        """The pool folder's VMs (id -> labels), read with plain pyVmomi."""
        if self.folder is None:
            self.folder = folder_id(self.sim, f"fleet-pools/{POOL}")
            assert self.folder is not None, "the pool's folder was never made"
        return {r.moid: r.labels for r in inventory(self.sim) if r.folder == self.folder}

    def monitor(self) -> None:
        """Invariants 1 (made elsewhere) and 2 (a VM outlives its lease), over and over."""
        try:
            while not self.stop_load.is_set():
                self._look_at_vcenter()
                self.stop_load.wait(0.2)
        except Exception as exc:  # a bug in the test itself: fail with it, not hang
            self.violate(f"monitor crashed: {type(exc).__name__}: {exc}")
            raise

    def _look_at_vcenter(self) -> None:
        t_start = time.time()  # a VM leased before then existed then (the read may be
        vms = self.pool_vms()  # a snapshot of any moment of it)
        t_read = time.time()  # after the read: what was surely active through it
        problems = []
        with self.lock:
            for vm, labels in vms.items():
                said = labels.get(LABEL_LEASE, "").split()  # idle <instance> <spec>
                if len(said) >= 2 and said[0] == "idle":
                    self.made_by.setdefault(vm, said[1])
                    held = self.by_vm.get(vm)
                    if held is not None:
                        problems += self._made_elsewhere(held)
            for held in self.leases:
                if held.received < t_start and held.active_lb > t_read \
                        and held.vm not in vms:
                    problems.append(f"lease {held.id} by {held.by} is active until "
                                    f"{held.active_lb:.3f} but its VM {held.vm} "
                                    f"({held.name}) was gone at {t_read:.3f}")
            self.counts["inventory_reads"] += 1
        for problem in dict.fromkeys(problems):
            self.violate(problem)


def _lease_of(answer: Answer) -> dict[str, Any]:
    return answer.body["lease"]  # type: ignore[no-any-return]


class Client:
    """One client thread: its own seeded schedule over both instances."""

    def __init__(self, run: Run, index: int, only: Server | None = None) -> None:
        self.run = run
        self.rng = random.Random(f"{run.seed}:{index}")
        self.held: list[Held] = []
        self.only = only  # asks this instance only (the schedule's own requests)

    def loop(self) -> None:
        try:
            while self.run.take_op():
                now = time.time()
                # Ended (or no longer ours to judge): left to expire, not touched again.
                self.held = [h for h in self.held if h.end_ub > now and h.certain]
                ops = (self.lease, self.extend, self.give_back, self.look, self.pause)
                weights = (4 if len(self.held) < HELD and not self.run.hold.is_set() else 0,
                           2 if self.held else 0,
                           2 if self.held else 0, 1 if self.held else 0, 1)
                self.rng.choices(ops, weights)[0]()
        except Exception as exc:  # a bug in the test itself: fail with it, not hang
            self.run.violate(f"client thread crashed: {type(exc).__name__}: {exc}")
            raise

    def pause(self) -> None:
        # Part of the schedule (leases expire meanwhile), not a wait for a result.
        time.sleep(self.rng.uniform(0.05, 0.3))

    def lease(self) -> Answer | None:
        """A lease on either instance (the one that serves); its 201, or None."""
        body: dict[str, Any] = {"ttl_s": round(self.rng.uniform(1.0, 4.0), 1)}
        wait = self.rng.choice((0, 1, 2, None))
        if wait is not None:
            body["wait_s"] = wait
        for server, proc, inc in self.run.alive(self.rng, self.only):
            answer = self.run.call(server, proc, inc, "POST", f"/v1/pools/{POOL}/leases",
                                   body)
            if answer is None:
                continue  # a lease may have been granted: nobody will ever know its id
            if answer.status == 201:
                self.held.append(self.run.granted(answer))
                return answer
            if answer.status == 503:
                continue  # the standby (or a stopping instance): try the other
            return None  # 429, or judged as a violation already
        self.pause()  # nobody serves the pool (a takeover under way): retry later
        return None

    def _each(self, method: str, held: Held, body: Any = None
              ) -> Iterator[tuple[Answer | None, float, float]]:
        """The request on each instance in turn: (answer or None if lost, sent, received)."""
        for server, proc, inc in self.run.alive(self.rng, self.only):
            t_send = time.time()
            answer = self.run.call(server, proc, inc, method, f"/v1/leases/{held.id}", body)
            yield answer, t_send, time.time()

    def _lost(self, held: Held, latest: float) -> None:
        """A request about ``held`` whose answer was lost: it may have taken effect."""
        held.certain = False
        held.end_ub = max(held.end_ub, min(held.max_until + 1.0, latest))

    def _ended(self, held: Held, state: str, t_recv: float) -> None:
        """The instance says the lease ended: it must not have before its client's expiry."""
        if state == "expired" and held.certain and held.told_until > t_recv:
            self.run.violate(f"lease {held.id} (VM {held.vm}) shown expired at {t_recv:.3f}, "
                             f"before the expiry its client was told ({held.told_until:.3f})")
        if state == "returned" and held.returned_at is None and held.certain:
            self.run.violate(f"lease {held.id} (VM {held.vm}) shown returned; it never was")
        if state == "expired":
            held.expired_seen = True
        held.end_ub = min(held.end_ub, t_recv)
        held.active_lb = min(held.active_lb, t_recv)

    def extend(self, held: Held | None = None, ttl: float | None = None) -> Answer | None:
        """Extend a lease (by ``ttl``); the answer of the instance that knew it, or None."""
        held = held or self.rng.choice(self.held)
        ttl = ttl or round(self.rng.uniform(1.0, 4.0), 1)
        before = held.active_lb
        # While asked, the lease may end as soon as the new expiry says (a shorter one).
        held.active_lb = min(before, time.time() + ttl)
        for answer, _t_send, t_recv in self._each("PATCH", held, {"ttl_s": ttl}):
            if answer is None:
                self._lost(held, t_recv + ttl)
                continue
            if answer.status == 200:
                lease = _lease_of(answer)
                if lease["member"]["vm"] != held.vm:
                    self.run.violate(f"lease {held.id} was of VM {held.vm}, now "
                                     f"{lease['member']['vm']}")
                held.told_until = held.active_lb = held.end_ub = lease["expires_at"]
                return answer
            if answer.status == 409:
                state = "expired" if "expired" in str(answer.body) else "returned"
                self._ended(held, state, t_recv)
                return answer
            if answer.status == 422:
                break  # past its max: nothing changed
            # 404 (not this instance's), 503 (not serving): nothing changed; the other
        if held.certain:
            held.active_lb = before
        self.pause()
        return None

    def give_back(self) -> None:
        held = self.rng.choice(self.held)
        before = held.active_lb
        held.active_lb = min(before, time.time())  # the client gives it up as it asks
        for answer, _t_send, t_recv in self._each("DELETE", held):
            if answer is None:
                self._lost(held, held.end_ub)
                continue
            if answer.status == 200:
                state = _lease_of(answer)["state"]
                if state == "returned":
                    held.returned_at = t_recv
                self._ended(held, state, t_recv)
                self.held.remove(held)
                return
        if held.certain:
            held.active_lb = before  # nobody had it to return (404, 503): as it was
        else:
            self.held.remove(held)
        self.pause()

    def look(self) -> None:
        held = self.rng.choice(self.held)
        for answer, _t_send, t_recv in self._each("GET", held):
            if answer is None or answer.status != 200:
                continue
            lease = _lease_of(answer)
            if lease["member"]["vm"] != held.vm:
                self.run.violate(f"lease {held.id} was of VM {held.vm}, GET says "
                                 f"{lease['member']['vm']}")
            if lease["state"] == "active":
                check_expiry(self.run, held, lease)
            else:
                self._ended(held, lease["state"], t_recv)
            return
        self.pause()


def check_expiry(run: Run, held: Held, lease: dict[str, Any]) -> None:
    """An active lease's expiry is never sooner than its client was told (a label's
    whole seconds may make it later)."""
    if held.certain and lease["expires_at"] < held.told_until - 1e-3:
        run.violate(f"lease {held.id} (VM {held.vm}) now expires at {lease['expires_at']}, "
                    f"before the {held.told_until:.3f} its client was told")


def wait_serving(run: Run, *, min_idle: int = 0) -> Server:
    """The instance that serves the pool, with ``min_idle`` idle members (bounded poll;
    fails if none does in time)."""
    deadline = time.monotonic() + SERVE_WAIT_S
    rng = random.Random(run.seed)
    while time.monotonic() < deadline:
        for server, proc, inc in run.alive(rng):
            answer = run.call(server, proc, inc, "GET", f"/v1/pools/{POOL}")
            if answer is not None and answer.status == 200 and answer.body["serving"] \
                    and answer.body["members"]["idle"] >= min_idle:
                return server
        time.sleep(0.05)
    raise AssertionError(f"seed {run.seed}: no instance served pool {POOL} within "
                         f"{SERVE_WAIT_S:g} s\n" + tails(run))


def tails(run: Run) -> str:
    return "\n".join(f"--- {inc} stderr:\n" + "".join(proc.stderr_lines[-25:])
                     for inc, proc in run.procs)


def settle(run: Run, server: Server) -> None:
    """After the load: invariants 2 (known), 3 and 4, on the instance left."""
    assert server.proc is not None
    proc, inc = server.proc, server.incarnation
    deadline = time.monotonic() + SETTLE_WAIT_S
    known_checked = False
    pending: list[Held] = []
    doubt = -1
    while time.monotonic() < deadline:
        t_list = time.time()
        leases = run.call(server, proc, inc, "GET", "/v1/leases")  # all: an admin's token
        t_listed = time.time()
        pool = run.call(server, proc, inc, "GET", f"/v1/pools/{POOL}")
        vms = run.pool_vms()
        assert leases is not None and pool is not None and leases.status == 200, \
            f"seed {run.seed}: the last instance stopped answering\n{tails(run)}"
        if not pool.body["serving"]:
            time.sleep(0.1)
            continue
        shown = {x["id"]: x for x in leases.body["leases"]}
        if not known_checked:
            check_known(run, server, shown, vms, t_listed)
            known_checked = True
        # Ordering: shown ended, then no member recycling (both read before vCenter) ->
        # its VM is gone. (No request is under way: a return is recycled before its
        # answer.)
        if pool.body["members"]["recycling"] == 0:
            for x in (x for x in shown.values() if x["state"] != "active"):
                run.count("ended_and_gone_checked")
                if x["member"]["vm"] in vms:
                    run.violate(f"lease {x['id']} is {x['state']} and no member is "
                                f"recycling, but its VM {x['member']['vm']} is still there")
        pending = [h for h in run.leases if h.end_ub < t_list and h.vm in vms]
        doubt = pool.body["members"]["doubt"]
        if not pending and doubt == 0:
            return
        time.sleep(0.2)
    run.violate(f"after {SETTLE_WAIT_S:g} s: {doubt} members still in doubt; VMs of ended "
                "leases still there: "
                + ", ".join(f"{h.id} ({h.vm}, ended by {h.end_ub:.3f})" for h in pending[:10])
                + f"; now {time.time():.3f}")


def check_known(run: Run, server: Server, shown: dict[str, Any],
                vms: dict[str, dict[str, str]], t_listed: float) -> None:
    """Invariant 2 at the end: every lease surely active when listed is known to the
    serving instance, and never shortened."""
    for held in run.leases:
        if not held.certain or held.told_until <= t_listed or held.returned_at is not None:
            continue
        lease = shown.get(held.id)
        if lease is None:
            label = vms.get(held.vm, {}).get(LABEL_LEASE, "")
            if (held.by, server.incarnation) in run.takeovers \
                    and server.instance != held.instance:
                # Killed before its label, and taken over by the other instance, which
                # has served since: it cannot know the lease, and keeps its VM in doubt.
                run.count("unknown_by_design")
                continue
            run.violate(f"lease {held.id} by {held.by} (VM {held.vm}, active until "
                        f"{held.told_until:.3f}) is unknown to the serving instance at "
                        f"{t_listed:.3f}; its label: {label!r}")
            continue
        if lease["member"]["vm"] != held.vm:
            run.violate(f"lease {held.id} was of VM {held.vm}, the service says "
                        f"{lease['member']['vm']}")
        if lease["state"] != "active":
            run.violate(f"lease {held.id} (VM {held.vm}) is {lease['state']} at "
                        f"{t_listed:.3f}, active until {held.told_until:.3f} as told")
        check_expiry(run, held, lease)
        run.count("known_at_end")


def wait_ops(run: Run, ops: int) -> None:
    """Until the clients have started ``ops`` operations (or all of them, or a violation
    stopped them)."""
    deadline = time.monotonic() + SETTLE_WAIT_S
    while run.ops < min(ops, OPS) and not run.stop_load.is_set():
        assert time.monotonic() < deadline, f"seed {run.seed}: the clients stalled at " \
                                            f"op {run.ops}\n" + tails(run)
        time.sleep(0.02)


@pytest.fixture
def sim() -> Iterator[SimProcess]:
    """A simulator of its own: the test slows its pool members' reconfigurations."""
    with SimProcess(time_scale=TIME_SCALE) as proc:
        yield proc


def slow_labels(sim: SimProcess, names: str, seconds: float) -> None:
    sim.add_faults({"method": "ReconfigVM_Task", "object": names, "phase": "call",
                    "fault": "slow", "delay_s": seconds / TIME_SCALE})


def sigkill_serving(run: Run, sim: SimProcess) -> Server:
    """SIGKILL the serving instance right after it answered an extension and then a
    grant of the schedule's own, vCenter slow to label them, and start it again (same
    state directory: the same instance). Returns the instance that serves after."""
    victim = wait_serving(run)
    assert victim.proc is not None
    me = Client(run, 1000 + len(run.sigkilled), only=victim)
    deadline = time.monotonic() + SERVE_WAIT_S
    run.hold.set()  # idle members come back (refills), and stay for this grant
    answers: list[str] = []
    try:
        while not me.held and time.monotonic() < deadline:
            if me.lease() is None:
                me.pause()
        if me.held:
            held = me.held[-1]  # to end 2 s later than now (within its max)
            slow_labels(sim, held.name, SLOW_EXTEND_S)
            ttl = min(held.max_until - time.time() - 0.5, held.told_until - time.time() + 2)
            answer = me.extend(held, round(max(1.0, ttl), 1))
            answers.append(f"extend of {held.id}: {answer.status if answer else None}")
        wait_serving(run, min_idle=1)
        slow_labels(sim, f"{POOL}-*", SLOW_GRANT_S)
        answer = None
        while answer is None and time.monotonic() < deadline:
            answer = me.lease()
            if answer is None:
                me.pause()
        answers.append(f"grant of {_lease_of(answer)['id'] if answer else None}")
    finally:
        victim.proc.proc.send_signal(signal.SIGKILL)  # right after the answer
        run.hold.clear()
    with run.lock:
        killed, victim.proc = victim.proc, None
        victim_incarnation = victim.incarnation
        run.sigkilled.add(victim_incarnation)
    assert killed.kill() == -signal.SIGKILL
    sim.clear_faults()  # what is under way stays slow
    run.mark(f"SIGKILLed {victim_incarnation} right after the " + ", ".join(answers))
    run.start(victim.label)
    run.mark(f"started {run.servers[victim.label].incarnation}")
    taker = wait_serving(run)
    run.takeovers.append((victim_incarnation, taker.incarnation))
    run.mark(f"{taker.incarnation} serves")
    return taker


def test_no_vm_is_ever_leased_twice_across_kills_restarts_and_takeovers(
        sim: SimProcess, tmp_path: Path) -> None:
    seed = int(os.environ.get("FLEET_POOL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    run = Run(sim, tmp_path, seed)
    threads: list[threading.Thread] = []
    try:
        run.start("A")
        run.start("B")
        run.mark(f"{wait_serving(run).incarnation} serves")
        threads = [threading.Thread(target=Client(run, i).loop, name=f"client-{i}",
                                    daemon=True) for i in range(THREADS)]
        threads.append(threading.Thread(target=run.monitor, name="monitor", daemon=True))
        for thread in threads:
            thread.start()

        # A fifth in, with a standby: SIGKILL whoever serves; the standby (or the
        # restarted instance) takes over.
        wait_ops(run, OPS // 5)
        sigkill_serving(run, sim)
        # A little later, stop whoever serves then (SIGTERM): the other takes over,
        # while members the previous takeover put in doubt may still be there.
        wait_ops(run, run.ops + rng.randint(50, 200))
        stopped = wait_serving(run)
        with run.lock:
            leaving, stopped.proc = stopped.proc, None
        assert leaving is not None
        run.mark(f"SIGTERM to {stopped.incarnation}")
        code = leaving.stop()
        if code != 0:
            run.violate(f"{stopped.incarnation} exited {code} on SIGTERM")
        run.mark(f"{stopped.incarnation} exited {code}")
        run.mark(f"{wait_serving(run).incarnation} serves")
        # Half-way, alone: SIGKILL it before its labels land; started again, it has
        # only its journal and vCenter's labels to go by.
        wait_ops(run, OPS // 2)
        last = sigkill_serving(run, sim)

        for thread in threads:
            if thread.name != "monitor":
                thread.join(SETTLE_WAIT_S)
                assert not thread.is_alive(), f"seed {seed}: {thread.name} never finished"
        run.stop_load.set()
        threads[-1].join(SETTLE_WAIT_S)
        run.mark("load done")
        if not run.violations:
            settle(run, last)
            run.mark("settled")
    finally:
        run.stop_load.set()
        for server in run.servers.values():
            if server.proc is not None:
                code = server.proc.stop()
                if code != 0:
                    run.violate(f"{server.incarnation} exited {code} on SIGTERM")

    tracebacks = [inc for inc, proc in run.procs if "Traceback" in "".join(proc.stderr_lines)]
    summary = (f"seed {seed} (FLEET_POOL_SEED={seed} repeats the schedule): "
               + "; ".join(run.timeline) + f"\ncounts {dict(sorted(run.counts.items()))}")
    print(f"\npool-property {summary}")
    keep = os.environ.get("FLEET_POOL_LOGS")  # a directory: every service's log goes there
    if keep:
        for inc, proc in run.procs:
            Path(keep, f"{inc}.log").write_text("".join(proc.stderr_lines))
        Path(keep, "violations").write_text("\n".join(run.violations))
    assert not run.violations, summary + "\n" + "\n".join(run.violations[:20]) \
        + "\n" + tails(run)
    assert not tracebacks, f"{summary}: a traceback in {tracebacks}\n{tails(run)}"
    # The schedule did what it is for: leases granted by three processes, some returned,
    # some extended, some expired; 429s at the max; a standby's 503.
    granters = {h.by for h in run.leases}
    assert len(granters) >= 3, (summary, granters)
    assert run.counts["delete_200"] and run.counts["patch_200"], summary
    assert any(h.expired_seen or (h.returned_at is None and h.end_ub < time.time())
               for h in run.leases), summary
    assert run.counts["post_503"] and run.counts["post_429"], summary
