"""``fleet serve`` under unauthenticated resource exhaustion (fleet.api.edge).

A real service process, started with a low open-file limit it cannot raise
(256, soft and hard), is attacked from the test with more half-open
connections than it has file descriptors, with responses it is never let
write, with bodies that never end and with malformed requests. It must keep
answering ``/healthz`` and ``/v1``, close what makes no progress, and keep
its log short. Timeouts here are generous: these tests check service, not
speed (benchmarks/bench_service.py measures the latency).
"""

from __future__ import annotations

import json
import selectors
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from tests.api.serveproc import TOKEN, ServeProcess, service_config
from tests.simproc import SimProcess

NOFILE = 256
ATTACKERS = 400  # more than the service has file descriptors
IDLE_TIMEOUT_S = 2.0
HALF_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture(scope="module")
def small(sim: SimProcess) -> Iterator[ServeProcess]:
    with tempfile.TemporaryDirectory(prefix="fleet-serve-edge-") as state:
        config = service_config(sim, state)
        config["api"] = {**config["api"], "idle_timeout_s": IDLE_TIMEOUT_S,
                         "body_timeout_s": IDLE_TIMEOUT_S}
        proc = ServeProcess(config, nofile=NOFILE)
        try:
            yield proc
        finally:
            proc.stop()


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (1 = established; 7 closed, 8 close-wait)."""
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]


def closed_by_peer(sock: socket.socket) -> bool:
    return tcp_state(sock) != 1


def wait_until(what: str, condition: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not {what} after {timeout_s} s"
        time.sleep(0.05)


class Slowloris(threading.Thread):
    """Keeps ``n`` connections open, each with half a request sent; reopens closed ones."""

    def __init__(self, port: int, n: int) -> None:
        super().__init__(daemon=True)
        self.port, self.n = port, n
        self.socks: set[socket.socket] = set()
        self.opened = self.closed_by_server = 0
        self.done = threading.Event()
        self.lock = threading.Lock()

    def _open_one(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(HALF_REQUEST)
        except OSError:
            return  # refused or timed out: try again on the next round
        sock.setblocking(False)
        with self.lock:
            self.socks.add(sock)
            self.opened += 1

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        while not self.done.is_set():
            with self.lock:
                socks = list(self.socks)
            if len(socks) < self.n:
                for _ in range(min(50, self.n - len(socks))):
                    if self.done.is_set():
                        break
                    self._open_one()
            for sock in socks:
                sel.register(sock, selectors.EVENT_READ)
            for key, _ in sel.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    with self.lock:
                        self.socks.discard(sock)
                        self.closed_by_server += 1
                    sock.close()
            for sock in socks:
                sel.unregister(sock)
        sel.close()  # the sockets still open are left to the test


def status_of(head: bytes) -> int:
    version, code = head.split(b" ", 2)[:2]
    assert version in (b"HTTP/1.0", b"HTTP/1.1"), head
    return int(code)


def test_half_open_connections_beyond_the_fd_limit_do_not_stop_the_service(
        small: ServeProcess) -> None:
    # The fd budget is logged at start (stderr is read by a thread: wait for it).
    wait_until("the fd budget logged", lambda: any(
        "API connections" in line for line in small.stderr_lines))
    budget = next(line for line in small.stderr_lines if "API connections" in line)
    assert f"open-file limit {NOFILE})" in budget, budget
    lines_before = len(small.stderr_lines)
    attack = Slowloris(small.port, ATTACKERS)
    attack.start()
    try:
        wait_until(f"{ATTACKERS} connections opened", lambda: attack.opened >= ATTACKERS)
        for _ in range(5):
            status, body = small.call("GET", "/healthz", token=None)
            assert status == 200 and body["status"] == "ok", body
            status, body = small.call("GET", "/v1/fleets")
            assert status == 200 and "fleets" in body, body
        # Stop: what is still open was sent half a request and nothing more.
        attack.done.set()
        attack.join(timeout=30)
        assert not attack.is_alive()
        held = list(attack.socks)
        assert held, "no half-open connection is left to time out"
        wait_until("every half-open connection closed by the service",
                   lambda: all(closed_by_peer(s) for s in held))
    finally:
        attack.done.set()
        attack.join(timeout=30)
        if not attack.is_alive():
            for sock in attack.socks:
                sock.close()
    assert small.call("GET", "/healthz", token=None)[0] == 200
    new = small.stderr_lines[lines_before:]
    assert len(new) <= 10, "".join(new[:40])
    text = "".join(new)
    assert "out of system resource" not in text and "cannot accept" not in text, text
    assert "Traceback" not in text, text


def test_a_response_left_unread_does_not_hold_its_connection(small: ServeProcess) -> None:
    """Pipelined requests whose answers are never read: the connection is closed once
    its responses stop draining, instead of being held forever."""
    sock = socket.create_connection(("127.0.0.1", small.port), timeout=10)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        sent = 0
        deadline = time.monotonic() + 30
        stalled_since: float | None = None
        while time.monotonic() < deadline:
            try:
                sent += sock.send(request * 64)
                stalled_since = None
            except BlockingIOError:
                # The service stopped reading: its responses are piling up unread.
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 0.5:
                    break
                time.sleep(0.01)
            except OSError:
                break  # already closed by the service
        requests = sent // len(request)
        assert requests > 0
        wait_until("the stalled connection closed by the service",
                   lambda: closed_by_peer(sock))
        # Read what was sent before the close: fewer answers than requests.
        sock.setblocking(True)
        sock.settimeout(10)
        received = b""
        try:
            while chunk := sock.recv(1 << 20):
                received += chunk
        except OSError:
            pass
        assert received.count(b"HTTP/1.1 200 OK") < requests
    finally:
        sock.close()
    assert small.call("GET", "/healthz", token=None)[0] == 200


def test_a_body_that_never_ends_is_408(small: ServeProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", small.port), timeout=60)
    try:
        sock.sendall(b"POST /v1/fleets HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     b'{"name": "slow", ')
        received = b""
        while chunk := sock.recv(65536):  # the service closes after answering
            received += chunk
    finally:
        sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert status_of(head) == 408, received[:200]
    error = json.loads(body)["error"]
    assert error["status"] == 408 and "body" in error["message"]
    assert small.call("GET", "/v1/fleets/slow")[0] == 404


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"A" * 9000 + b"\r\n\r\n", 431),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"B" * 9000
     + b"\r\n\r\n", 431),
    (b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(100))
     + b"\r\n", 431),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-\x01bad: CCCC\r\n\r\n", 400),
])
def test_an_unparseable_request_gets_a_json_error_and_one_log_line(
        small: ServeProcess, raw: bytes, status: int) -> None:
    lines_before = len(small.stderr_lines)
    sock = socket.create_connection(("127.0.0.1", small.port), timeout=30)
    try:
        sock.sendall(raw)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    finally:
        sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert status_of(head) == status, received[:200]
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["status"] == status and error["message"].startswith("refused: ")
    for echoed in (b"AAAA", b"BBBB", b"CCCC"):
        assert echoed not in received
    wait_until("the refusal logged", lambda: any(
        "refused a request" in line for line in small.stderr_lines[lines_before:]))
    new = small.stderr_lines[lines_before:]
    refusals = [line for line in new if "refused a request" in line]
    assert len(refusals) == 1 and f"({status})" in refusals[0], "".join(new)
    assert "Traceback" not in "".join(new)
    assert not any(c * 4 in line for c in "ABC" for line in new), new


# -- the parts, in-process ----------------------------------------------------------------

def test_the_fd_budget_fits_under_the_limit() -> None:
    from fleet.api import edge

    for nofile in (edge.MIN_NOFILE, 200, NOFILE, 1000, 1024, 4096, 1 << 20):
        for wanted in (16, 512, 100_000):
            budget = edge.share_fds(nofile, wanted)
            peak = (edge.BASE_FDS + 2 * budget.backlog + budget.api_connections
                    + budget.vcenter_connections)
            assert peak <= nofile, (nofile, wanted, budget)
            assert budget.api_connections >= edge.MIN_CONNECTIONS
            assert budget.vcenter_connections >= edge.MIN_CONNECTIONS
            assert budget.api_connections <= wanted
            if budget.api_connections < wanted:  # the fds are the limit
                assert budget.api_connections >= 5 * budget.backlog, budget
    assert edge.share_fds(1 << 20, 512).vcenter_connections == edge.VCENTER_CONNECTIONS
    from fleet.errors import FleetError

    with pytest.raises(FleetError, match=r"limit .* is 127; fleet serve needs at least 128"):
        edge.share_fds(127, 512)


def test_the_soft_fd_limit_is_raised_as_far_as_needed() -> None:
    import subprocess
    import sys

    code = ("import resource; from fleet.api.edge import fd_budget; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)); "
            "b = fd_budget(512); "
            "print(b.raised_from, b.nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[0], "
            "b.api_connections)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out[0] == "256" and out[1] == out[2] and int(out[1]) > 256 and out[3] == "512"


def test_accept_failures_are_logged_once_not_per_attempt(
        caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import errno
    import logging

    from fleet.api.edge import quiet_accept_errors

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.socket() as sock, quiet_accept_errors(loop, 256):
            for _ in range(10_000):  # what asyncio does, per failed accept()
                loop.call_exception_handler({
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(errno.EMFILE, "Too many open files"),
                    "socket": sock})

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    records = [r for r in caplog.records if "accept" in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in records[:5]]
    assert "Too many open files" in records[0].getMessage()
    assert "256" in records[0].getMessage()


def test_a_burst_of_connections_waits_in_the_queue_instead_of_being_dropped(
        small: ServeProcess) -> None:
    """The kernel's accept queue is long (asyncio would make it as short as its accept
    batch): while the service is busy, a burst of connects completes instead of having
    SYNs dropped and retried a second later."""
    import os
    import signal

    burst = 300  # well beyond the accept batch at this fd limit (16)
    socks: list[socket.socket] = []
    os.kill(small.proc.pid, signal.SIGSTOP)
    try:
        for _ in range(burst):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", small.port))
            socks.append(sock)
        wait_until("every connection established by the kernel while the service is stopped",
                   lambda: all(tcp_state(s) == 1 for s in socks), timeout_s=30)
    finally:
        os.kill(small.proc.pid, signal.SIGCONT)
        for sock in socks:
            sock.close()
    assert small.call("GET", "/healthz", token=None)[0] == 200
