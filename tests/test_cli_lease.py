"""``fleet lease``, ``release``, ``renew`` and ``pools`` as a CI job runs them: the real
command against a real ``fleet serve`` over HTTPS (one per module, with two small
pools), and the bad input they refuse before sending anything (README, "CI pools")."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import re
import shlex
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from fleet.cli import main
from fleet.sim.certs import generate
from tests.api.serveproc import ServeProcess, service_config
from tests.cli_json import assert_documented, documented_keys
from tests.simproc import SimProcess

ROOT = Path(__file__).resolve().parents[1]
BOT = "ci-bot-token-0123456789abcdef"
CLIENT_VARS = ("FLEET_SERVER", "FLEET_API_TOKEN", "FLEET_API_TOKEN_FILE",
               "FLEET_SERVER_CA_FILE")
POOLS = {
    "ci": {"ready": 2, "max": 4, "lease_ttl_s": 600.0, "max_lease_ttl_s": 3600.0},
    # one member at most: a second lease finds the pool at its max
    "one": {"ready": 1, "max": 1},
    # a pool the CI client may not use (never leased: no clone is made)
    "other": {"ready": 0, "max": 1},
}


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


class Service:
    """The module's ``fleet serve`` (HTTPS, with a CA file), and its client's environment."""

    def __init__(self, proc: ServeProcess, ca: Path, tmp: Path, sim: SimProcess) -> None:
        self.proc = proc
        self.sim = sim
        self.url = proc.url
        self.ca = ca
        self.tmp = tmp
        #: the CI client's variables
        self.vars = {"FLEET_SERVER": self.url, "FLEET_SERVER_CA_FILE": str(ca),
                     "FLEET_API_TOKEN": BOT}
        self.env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS}
        self.env.update(self.vars)
        self._tls = ssl.create_default_context(cafile=str(ca))

    def fleet(self, *args: str, env: dict[str, str] | None = None,
              drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """``python -m fleet ARGS`` as the CI client (``env`` over its environment)."""
        full = {k: v for k, v in {**self.env, **(env or {})}.items() if k not in drop}
        return subprocess.run([sys.executable, "-m", "fleet", *args], capture_output=True,
                              text=True, timeout=120, env=full, stdin=subprocess.DEVNULL)

    def api(self, path: str) -> Any:
        """GET ``path`` as the service's admin (what the test sees, apart from the CLI)."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.proc.port, context=self._tls,
                                           timeout=30)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {self.proc.token}"})
            resp = conn.getresponse()
            assert resp.status == 200, (resp.status, resp.read())
            return json.loads(resp.read())
        finally:
            conn.close()

    def until(self, what: str, check: Any, timeout_s: float = 60.0) -> Any:
        """Poll ``check()`` until it is truthy: progress, not a timed assertion (the
        bound only keeps a broken build from hanging)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"not {what} after {timeout_s} s\n"
                             + "".join(self.proc.stderr_lines[-20:]))

    def pool(self, name: str) -> dict[str, Any]:
        return self.api(f"/v1/pools/{name}")  # type: ignore[no-any-return]

    def filled(self, name: str) -> dict[str, Any]:
        want = POOLS[name]["ready"]
        return self.until(f"pool {name} filled", lambda: (
            p if (p := self.pool(name))["serving"] and p["members"]["idle"] >= want
            and not p["members"]["refilling"] else None))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    with tempfile.TemporaryDirectory(prefix="fleet-lease-cli-") as tmp_name, \
            SimProcess(time_scale=0.02) as sim:
        tmp = Path(tmp_name)
        cert = generate("fleet lease test")
        (tmp / "cert.pem").write_bytes(cert.cert_pem)
        (tmp / "key.pem").write_bytes(cert.key_pem)
        (tmp / "tokens.toml").write_text(
            "[[clients]]\nname = \"ci-bot\"\n"
            f"token_sha256 = \"{hashlib.sha256(BOT.encode()).hexdigest()}\"\n"
            "pools = [\"ci\", \"one\"]\n")
        config = service_config(sim, tmp / "state", pools=POOLS, api={
            "tokens_file": str(tmp / "tokens.toml"), "tls_cert": str(tmp / "cert.pem"),
            "tls_key": str(tmp / "key.pem")})
        proc = ServeProcess(config)
        try:
            assert proc.url.startswith("https://127.0.0.1:")
            yield Service(proc, tmp / "cert.pem", tmp, sim)
        finally:
            proc.stop()


def lease_id(text: str) -> str:
    m = re.search(r"^  lease +([0-9a-f]{16})$", text, re.MULTILINE)
    assert m, text
    return m.group(1)


def test_lease_prints_the_member_and_release_destroys_it(service: Service) -> None:
    service.filled("ci")
    got = service.fleet("lease", "--pool", "ci", "--ttl", "10m", "--wait", "30s")
    assert got.returncode == 0, got.stderr
    lid = lease_id(got.stdout)
    lease = service.api(f"/v1/leases/{lid}")["lease"]
    member = lease["member"]
    assert lease["client"] == "ci-bot" and lease["state"] == "active"
    assert lease["expires_at"] - lease["granted_at"] == pytest.approx(600, abs=1)
    # The record, as a person reads it: name, address, MACs, host, lease id, expiry.
    assert got.stdout.startswith(f"leased {member['name']} from pool ci\n")
    for label, value in (("name", member["name"]), ("host", member["host"]),
                         ("vm", member["vm"]), ("macs", " ".join(member["macs"])),
                         ("ip", member["ip"] or f"- ({member['address_status']})")):
        assert re.search(rf"^  {label} +{re.escape(str(value))}$", got.stdout, re.MULTILINE), \
            (label, got.stdout)
    assert re.search(r"^  expires +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d .*\(in (10m00s|9m5\ds)\)$",
                     got.stdout, re.MULTILINE), got.stdout
    assert f"fleet release {lid}" in got.stderr
    assert service.pool("ci")["members"]["leased"] >= 1

    done = service.fleet("release", lid)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"lease {lid} of pool ci returned: {member['name']} is destroyed, "
                           "never handed out again\n")
    assert service.api(f"/v1/leases/{lid}")["lease"]["state"] == "returned"
    # The member is destroyed: nothing is leased any more, and nothing is left
    # recycling (a member leaves that state once vCenter has destroyed it).
    service.until("the returned member destroyed", lambda: (
        (p := service.pool("ci"))["members"]["leased"] == 0
        and p["members"]["recycling"] == 0))
    # Returning it again is no error (a CI job's cleanup may run twice).
    again = service.fleet("release", lid)
    assert again.returncode == 0, again.stderr


def test_a_lease_given_up_while_waiting_stops_waiting_and_leases_nothing(
        service: Service) -> None:
    """A CI job cancelled while its ``fleet lease`` waits (SIGTERM). ``fleet serve`` does not
    cancel a request whose caller hung up; the pool sees the connection closed and
    drops the request within a tick, instead of letting it wait out its wait_s and
    ask for a clone nobody will take. Nothing is leased to it."""
    admin = {"FLEET_API_TOKEN": service.proc.token}
    full = {**service.env, **admin}
    # The pool's clones fail while the request waits, so no member can come for it.
    service.sim.add_faults({"method": "InstantClone_Task", "object": "other-*",
                            "fault": "FileNotFound", "phase": "task"})
    try:
        waiting = subprocess.Popen([sys.executable, "-m", "fleet", "lease", "--pool",
                                    "other", "--wait", "600s", "--json"], env=full,
                                   text=True, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            service.until("the request waiting",
                          lambda: service.pool("other")["waiting"] == 1)
            # SIGTERM, as a CI runner cancels a job. (Not SIGINT: a process started in
            # the background by a non-interactive shell, as CI often is, inherits
            # SIGINT ignored, and Python then installs no KeyboardInterrupt for it.)
            waiting.terminate()
            out, err = waiting.communicate(timeout=120)
        finally:
            waiting.kill()
        assert waiting.returncode != 0 and out == "", (out, err)
        # Dropped long before its 600 s were up (the bound only guards against a hang).
        service.until("the request dropped", lambda: (
            (p := service.pool("other"))["waiting"] == 0 and p["members"]["refilling"] == 0))
        assert not [x for x in service.api("/v1/leases")["leases"] if x["pool"] == "other"]
    finally:
        service.sim.clear_faults()
    got = service.fleet("lease", "--pool", "other", "--wait", "120s", "--json", env=admin)
    assert got.returncode == 0, got.stderr
    lid = json.loads(got.stdout)["lease"]["id"]
    assert service.fleet("release", lid, env=admin).returncode == 0

def test_json_env_and_print_give_the_lease_to_a_script(service: Service) -> None:
    service.filled("ci")
    got = service.fleet("lease", "--pool", "ci", "--json")
    assert got.returncode == 0, got.stderr
    out = json.loads(got.stdout)
    assert_documented(out, "`fleet lease --json`")
    lease = out["lease"]
    assert set(lease) == documented_keys("The lease object")[0]
    assert set(lease["member"]) >= {"name", "index", "vm", "ip", "ip_addresses", "macs",
                                    "host", "datastore", "source", "instance_uuid"}
    assert lease == {**service.api(f"/v1/leases/{lease['id']}")["lease"],
                     "expires_in_s": lease["expires_in_s"]}
    # Without --ttl the pool's lease_ttl_s; the stdout is the one object, nothing else.
    assert lease["expires_at"] - lease["granted_at"] == pytest.approx(600, abs=1)
    assert got.stdout.count("\n") == 1

    renewed = service.fleet("renew", lease["id"], "--ttl", "45m", "--json")
    assert renewed.returncode == 0, renewed.stderr
    after = json.loads(renewed.stdout)
    assert_documented(after, "`fleet lease --json`")
    assert after["lease"]["expires_at"] > lease["expires_at"] + 30 * 60
    too_long = service.fleet("renew", lease["id"], "--ttl", "2h")
    assert too_long.returncode == 1 and "answered 422" in too_long.stderr
    assert "max_lease_ttl_s" in too_long.stderr

    env = service.fleet("lease", "--pool", "ci", "--format", "env")
    assert env.returncode == 0, env.stderr
    values = dict(line.split("=", 1) for line in env.stdout.splitlines())
    assert set(values) == {f"FLEET_LEASE_{k.upper()}" for k in (
        "id", "pool", "expires_at", "name", "ip", "ip_addresses", "macs", "host",
        "datastore", "vm", "instance_uuid")}
    # What a shell reads back is what the service holds.
    shown = service.api(f"/v1/leases/{shlex.split(values['FLEET_LEASE_ID'])[0]}")["lease"]
    assert shlex.split(values["FLEET_LEASE_NAME"]) == [shown["member"]["name"]]
    assert shlex.split(values["FLEET_LEASE_MACS"]) == [",".join(shown["member"]["macs"])]
    assert int(values["FLEET_LEASE_EXPIRES_AT"]) >= shown["expires_at"]

    def active() -> dict[str, Any]:
        return {x["id"]: x for x in service.api("/v1/leases")["leases"]
                if x["state"] == "active"}

    before = active()
    ip = service.fleet("lease", "--pool", "ci", "--print", "ip", "--wait", "60")
    assert ip.returncode == 0, ip.stderr
    (mine,) = [x for lid, x in active().items() if lid not in before]
    assert ip.stdout == f"{mine['member']['ip'] or ''}\n"

    for lid in (lease["id"], shown["id"], mine["id"]):
        gone = service.fleet("release", lid, "--json")
        assert gone.returncode == 0, gone.stderr
        back = json.loads(gone.stdout)
        assert_documented(back, "`fleet lease --json`")
        assert back["lease"]["state"] == "returned"


def test_pools_shows_each_pool_by_state(service: Service) -> None:
    service.filled("one")
    table = service.fleet("pools")
    assert table.returncode == 0, table.stderr
    assert f"pools at {service.url}" in table.stdout
    assert re.search(r"┃ pool +┃ served here +┃ idle +┃ leased +┃ refilling +┃ recycling +┃"
                     r" in doubt +┃ ready/max +┃ waiting +┃ error +┃", table.stdout), table.stdout
    assert re.search(r"│ ci +│ yes +│ \d+ +│ \d+ +│ \d+ +│ \d+ +│ 0 +│ 2/4 +│ 0 +│ - +│",
                     table.stdout), table.stdout
    assert re.search(r"│ one +│ yes +│ 1 +│ 0 +│ 0 +│ 0 +│ 0 +│ 1/1 +│", table.stdout)
    assert "other" not in table.stdout  # not this client's
    got = service.fleet("pools", "--json")
    assert got.returncode == 0, got.stderr
    out = json.loads(got.stdout)
    assert_documented(out, "`fleet pools --json`")
    assert [p["name"] for p in out["pools"]] == ["ci", "one"]
    for p in out["pools"]:
        assert set(p) == documented_keys("The pool object")[0]
    one = service.fleet("pools", "one", "--json")
    assert [p["name"] for p in json.loads(one.stdout)["pools"]] == ["one"]


def test_a_pool_at_its_max_exits_75_with_the_retry_after(service: Service) -> None:
    service.filled("one")
    first = service.fleet("lease", "--pool", "one", "--print", "id")
    assert first.returncode == 0, first.stderr
    lid = first.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{16}", lid)
    for output in ("--json", "--format=text"):
        refused = service.fleet("lease", "--pool", "one", "--wait", "0", output)
        assert refused.returncode == 75, refused.stderr
        assert refused.stdout == ""  # nothing for `| jq` or $(...) to take for an answer
        assert re.fullmatch(
            rf"fleet: {re.escape(service.url)} answered 429: pool one is at its max of 1 "
            r"members, .*; try again in \d+ s \(Retry-After\)\n", refused.stderr), \
            refused.stderr
    assert service.fleet("release", lid).returncode == 0


def test_refusals_name_the_server_and_the_cause(service: Service,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Run in this process (``main`` is what ``python -m fleet`` runs), to keep a dozen
    refusals cheap; the commands above run as processes."""

    def run(*args: str, env: dict[str, str] | None = None,
            drop: tuple[str, ...] = ()) -> tuple[int, str, str]:
        with monkeypatch.context() as m:
            for name in CLIENT_VARS:
                m.delenv(name, raising=False)
            for name, value in {**service.vars, **(env or {})}.items():
                if name not in drop:
                    m.setenv(name, value)
            return run_main(list(args), capsys)

    assert run("pools", env={"FLEET_API_TOKEN": "not-the-token-0123456789"}) == (
        1, "", f"fleet: error: {service.url} answered 401: the bearer token is not valid "
               "(the token from FLEET_API_TOKEN)\n")
    token_file = service.tmp / "wrong-token"
    token_file.write_text("not-the-token-either-0123\n")
    code, _, err = run("pools", "--token-file", str(token_file))
    assert code == 1 and f"(the token from --token-file {token_file})\n" in err
    right_file = service.tmp / "token"
    right_file.write_text(BOT + "\n")
    code, out, err = run("pools", "one", env={"FLEET_API_TOKEN_FILE": str(right_file)},
                         drop=("FLEET_API_TOKEN",))
    assert code == 0 and "│ one " in out, err

    for args, status, says in (
            (("lease", "--pool", "other"), 403,
             "client ci-bot may not lease from pool other (its pools: ci, one)"),
            (("lease", "--pool", "nope", "--wait", "0"), 404, "no pool called 'nope'"),
            (("release", "0123456789abcdef"), 404, "no lease '0123456789abcdef' here")):
        assert run(*args) == (1, "", f"fleet: error: {service.url} answered {status}: "
                                     f"{says}\n"), args

    # Verified by default: without the CA file the service's certificate is not trusted.
    code, out, err = run("pools", drop=("FLEET_SERVER_CA_FILE",))
    assert (code, out) == (1, "")
    assert err.startswith(f"fleet: error: {service.url}: its certificate is not trusted (")
    assert err.endswith("; name its CA with --ca-file or FLEET_SERVER_CA_FILE\n")
    code, out, err = run("pools", "one", "--ca-file", str(service.ca),
                         drop=("FLEET_SERVER_CA_FILE",))
    assert code == 0 and "│ one " in out, err


# -- bad input: exit status 2 before anything is sent ------------------------------------

@pytest.fixture
def client_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in CLIENT_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLEET_API_TOKEN", "t" * 20)
    return monkeypatch


@pytest.mark.parametrize(("argv", "env", "says"), [
    (["lease", "--pool", "ci"], {"FLEET_API_TOKEN": "t" * 20},
     "fleet: error: --server: no service to call: pass --server URL or set FLEET_SERVER"),
    (["lease", "--pool", "ci"], {"FLEET_SERVER": "https://127.0.0.1:9"},
     "fleet: error: token: no API token: set FLEET_API_TOKEN, or name a file"),
    (["pools"], {"FLEET_SERVER": "https://127.0.0.1:9", "FLEET_API_TOKEN": "t" * 20,
                 "FLEET_API_TOKEN_FILE": "/dev/null"},
     "FLEET_API_TOKEN: both FLEET_API_TOKEN and FLEET_API_TOKEN_FILE are set"),
    (["pools", "--token-file", "/nonexistent/token"], {"FLEET_SERVER": "https://127.0.0.1:9"},
     "fleet: error: --token-file: cannot read /nonexistent/token: No such file or directory"),
    (["pools"], {"FLEET_SERVER": "https://127.0.0.1:9", "FLEET_API_TOKEN": "has space"},
     "FLEET_API_TOKEN: the token from FLEET_API_TOKEN holds spaces, control or non-ASCII"),
    (["lease", "--pool", "ci", "--ttl", "1x"], {},
     "argument --ttl: '1x' is not a duration like 90s, 15m, 2h, 1d or 1h30m"),
    (["lease", "--pool", "ci", "--wait", "-5"], {},
     "argument --wait: '-5' is not a duration"),
    (["renew", "0123456789abcdef", "--ttl", "0"], {},
     "argument --ttl: 0.0 must be a positive number of seconds"),
    (["lease", "--pool", "ci", "--server", "fleet.example.com:8443"],
     {"FLEET_API_TOKEN": "t" * 20},
     "--server: 'fleet.example.com:8443' is not an http(s) URL like https://"),
    (["pools"], {"FLEET_SERVER": "https://ci:s3cret@127.0.0.1:9", "FLEET_API_TOKEN": "t" * 20},
     "FLEET_SERVER: 'https://***@127.0.0.1:9' has a user name or password in it"),
    (["pools", "--server", "http://192.0.2.7:8080"], {"FLEET_API_TOKEN": "t" * 20},
     "--server: http://192.0.2.7:8080 is plain http to an address that is not loopback"),
    (["pools", "--server", "https://127.0.0.1:9", "--ca-file", "/nonexistent/ca.pem"],
     {"FLEET_API_TOKEN": "t" * 20}, "--ca-file: cannot read \"/nonexistent/ca.pem\": No such file"),
    (["pools", "--server", "https://127.0.0.1:9"],
     {"FLEET_API_TOKEN": "t" * 20, "FLEET_SERVER_CA_FILE": "/dev/null"},
     "FLEET_SERVER_CA_FILE: cannot read \"/dev/null\": it is a character device"),
], ids=["no-server", "no-token", "two-tokens", "token-file", "bad-token", "ttl", "wait",
        "zero-ttl", "not-a-url", "password-in-url", "plain-http", "ca-file", "ca-env"])
def test_bad_input_exits_2_naming_the_culprit(argv: list[str], env: dict[str, str], says: str,
                                              client_env: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    client_env.delenv("FLEET_API_TOKEN")
    for name, value in env.items():
        client_env.setenv(name, value)
    code, out, err = run_main(argv, capsys)
    assert code == 2, err
    assert says in err
    assert out == "" and "s3cret" not in err


def test_a_server_that_is_not_there_is_named() -> None:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS}
    got = subprocess.run([sys.executable, "-m", "fleet", "lease", "--pool", "ci", "--wait",
                          "0", "--server", "http://127.0.0.1:1"], capture_output=True,
                         text=True, timeout=60, env={**env, "FLEET_API_TOKEN": "t" * 20})
    assert got.returncode == 1
    assert got.stderr == "fleet: error: cannot connect to http://127.0.0.1:1: Connection refused\n"


# -- answers that are not a grant -------------------------------------------------------------

class Canned(http.server.BaseHTTPRequestHandler):
    """What a service in trouble, or a proxy in front of it, may answer."""

    ANSWERS: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {
        "/v1/pools/ci": (503, {"Retry-After": "5", "Content-Type": "application/json"},
                         json.dumps({"error": {
                             "status": 503, "message": "pool ci is served by \x1b[31mfleet-b"
                                                       "; send lease requests there"}}).encode()),
        "/v1/pools": (502, {"Content-Type": "text/html"}, b"<html>Bad Gateway</html>"),
        "/v1/leases/0123456789abcdef": (200, {"Content-Type": "text/html"}, b"<html></html>"),
    }

    def do_GET(self) -> None:
        status, headers, body = self.ANSWERS[self.path]
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_DELETE = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def canned() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_503_exits_75_and_what_is_not_fleet_is_named(
        canned: str, client_env: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["lease", "--pool", "ci", "--server", canned], capsys)
    assert (code, out) == (75, "")
    # The service's message, without the terminal escape it carried; its Retry-After.
    assert err == (f"fleet: {canned} answered 503: pool ci is served by ?[31mfleet-b; send "
                   "lease requests there; try again in 5 s (Retry-After)\n")
    code, out, err = run_main(["pools", "--server", canned], capsys)
    assert (code, out) == (1, "")
    assert err == (f"fleet: error: {canned} answered 502: Bad Gateway (not fleet's JSON "
                   f"error; is {canned} fleet serve?)\n")
    code, out, err = run_main(["release", "0123456789abcdef", "--server", canned], capsys)
    assert (code, out) == (1, "")
    assert err == (f"fleet: error: {canned} answered 200 without a JSON object; is it "
                   "fleet serve?\n")


def test_a_service_that_does_not_answer_is_given_up(
        client_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Every wait is bounded: a server that takes the connection and never answers."""
    from fleet.cli import lease

    client_env.setattr(lease, "ANSWER_TIMEOUT_S", 0.2)
    client_env.setattr(lease, "CONNECT_TIMEOUT_S", 0.1)
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        url = f"http://127.0.0.1:{mute.getsockname()[1]}"
        code, out, err = run_main(["lease", "--pool", "ci", "--wait", "0", "--server", url],
                                  capsys)
    assert (code, out) == (1, "")
    assert err == (f"fleet: error: {url} did not answer within 0.3 s; a lease granted "
                   "meanwhile ends at its TTL\n")


# -- the README's CI pools section ----------------------------------------------------------

def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_the_readme_pool_config_and_tokens_are_valid(tmp_path: Path) -> None:
    """The serve.toml and tokens file the README shows load as written."""
    from fleet.api.config import config_from_dict
    from fleet.api.tokens import load_tokens

    blocks = re.findall(r"```toml\n(.*?)```", readme_section("CI pools"), re.S)
    serve = next(b for b in blocks if "[pools.ci]" in b)
    tokens = next(b for b in blocks if "[[clients]]" in b)
    (tmp_path / "tokens.toml").write_text(tokens)
    clients, problems = load_tokens(tmp_path / "tokens.toml")
    assert not problems
    assert [(c.name, c.pools, c.max_leases) for c in clients] == [("ci-runners", ("ci",), 10)]
    data = tomllib.loads(serve)
    # "beside its [defaults]": the guest login every fleet and pool shares
    data["defaults"] = {"network": {"guest_user": "root",
                                    "guest_password_env": "GUEST_PASSWORD"}}
    config = config_from_dict(data, source="README serve.toml",
                              env={"FLEET_API_TOKEN": "t" * 20, "GUEST_PASSWORD": "x"},
                              base_dir=tmp_path)
    pool = config.pools["ci"]
    assert (pool.ready, pool.max, pool.wait_s) == (4, 20, 120)
    assert pool.fleet_spec.folder_path.endswith("fleet-pools/ci")
