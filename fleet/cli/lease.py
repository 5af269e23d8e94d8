"""``fleet lease``, ``fleet release``, ``fleet renew`` and ``fleet pools``: the warm
pools of a ``fleet serve`` from a CI job or a terminal (README, "CI pools";
docs/pools.md). They are HTTP clients of the service's ``/v1/pools`` and
``/v1/leases`` (docs/api.md); nothing here talks to vCenter.

Where and as whom:

- the service's URL from ``--server`` or ``FLEET_SERVER`` (``https://host:port``,
  maybe with a path prefix behind a proxy; no user name or password in it);
- the bearer token from ``--token-file``, else ``FLEET_API_TOKEN``, else the file
  ``FLEET_API_TOKEN_FILE`` names; never from the command line, where other users of
  the machine and the shell's history would see it. Both variables set is an error;
- HTTPS is verified, against the system's CAs or those of ``--ca-file`` /
  ``FLEET_SERVER_CA_FILE``. Plain ``http://`` is for a loopback server only (the
  token would cross the network in clear), unless ``--insecure-http`` (a warning).

Every request is bounded: connecting within :data:`CONNECT_TIMEOUT_S`, an answer
within :data:`ANSWER_TIMEOUT_S`, and a lease request within its wait plus that
(without ``--wait``, the pool's ``wait_s``, read first).

Exit status: 0 done (``release`` of a lease that had already ended too); 1 the
service refused (401, 403, 404, 409, 422...), could not be reached, or answered
something that is not fleet's; 2 bad input found before any request was sent (an
option, a duration, the server's URL, the token, the CA file), the message naming
it; 75 (sysexits' EX_TEMPFAIL, as for a held fleet lock) for "try again later": a
429 (the pool at its max, no member within the wait, a quota) or a 503 (another
instance serves the pool, the service is stopping or cannot record leases), with
the service's message and its Retry-After; 130 interrupted. A refusal prints no
JSON, even with ``--json``: standard output then stays empty.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fleet.cli.common import EXIT_OK, EXIT_TEMPFAIL, eprint, print_json
from fleet.cli.options import checked
from fleet.errors import ConfigError, FleetError
from fleet.urls import redact_url, url_problem

SERVER_ENV = "FLEET_SERVER"
TOKEN_ENV = "FLEET_API_TOKEN"
TOKEN_FILE_ENV = "FLEET_API_TOKEN_FILE"
CA_FILE_ENV = "FLEET_SERVER_CA_FILE"
#: a TCP (and TLS) connection to the service, at most
CONNECT_TIMEOUT_S = 10.0
#: the service's answer, at most, beyond any wait the request asks for
ANSWER_TIMEOUT_S = 30.0
#: the largest answer read (a list of leases is a few KiB per lease)
MAX_ANSWER_BYTES = 16 * 1024 * 1024
#: a --wait of no time: answer at once
_ZERO = re.compile(r"0+(\.0*)?[smhdw]?")
_TOKEN_OK = re.compile(r"[\x21-\x7e]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: the most of a message (or header) from the service that fleet repeats
MAX_SHOWN_CHARS = 2000


# -- where, as whom, trusting what ----------------------------------------------------

@dataclass(frozen=True)
class Server:
    """The service to call: its base URL, the token and the TLS context to use."""

    url: str  # without a trailing "/"
    token: str = field(repr=False)
    token_origin: str  # where the token came from, for a 401's message
    tls: ssl.SSLContext | None = None  # None: plain http


def parse_server(text: str, key: str) -> str:
    """The service's base URL from ``text``; ConfigError naming ``key`` otherwise."""
    shown = redact_url(text)
    example = "https://fleet.example.com:8443"
    scheme = text.split("://", 1)[0] if "://" in text else None
    if scheme not in ("http", "https"):
        raise ConfigError(f"{shown!r} is not an http(s) URL like {example}", key=key)
    netloc = text.split("://", 1)[1].split("/", 1)[0]
    if "@" in netloc:
        raise ConfigError(f"{shown!r} has a user name or password in it; the token comes "
                          f"from {TOKEN_ENV}, {TOKEN_FILE_ENV} or --token-file", key=key)
    if "?" in text or "#" in text:
        raise ConfigError(f"{shown!r} has a query or fragment; give the service's base URL "
                          f"only, like {example}", key=key)
    problem = url_problem(text)
    if problem is not None:
        raise ConfigError(f"{shown!r} {problem}", key=key)
    return text.rstrip("/")


def _plain_http_problem(url: str) -> str | None:
    """Why the token must not go to ``url`` in clear (a host off loopback), or None."""
    from fleet.cli.serve import off_loopback

    host = urlsplit(url).hostname or ""
    try:
        where = off_loopback(host)
    except ConfigError as exc:
        where = f"a host whose addresses are unknown ({exc})"
    if where is None:
        return None
    return (f"{url} is plain http to {where}: the bearer token would cross the network "
            "in clear. Use the service's https URL (docs/service-tls.md), or pass "
            "--insecure-http on a network nothing can read")


def _token(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[str, str]:
    """(token, where it came from); ConfigError naming the flag or variable."""
    from fleet.files import FileProblem, read_secret_file

    if args.token_file is not None:
        path, origin = args.token_file, "--token-file"
    elif env.get(TOKEN_ENV) is not None:
        if env.get(TOKEN_FILE_ENV) is not None:
            raise ConfigError(f"both {TOKEN_ENV} and {TOKEN_FILE_ENV} are set; unset one "
                              "(or pass --token-file, which comes first)", key=TOKEN_ENV)
        return _checked_token(env[TOKEN_ENV], TOKEN_ENV, TOKEN_ENV), TOKEN_ENV
    elif env.get(TOKEN_FILE_ENV) is not None:
        path, origin = env[TOKEN_FILE_ENV], TOKEN_FILE_ENV
    else:
        raise ConfigError(f"no API token: set {TOKEN_ENV}, or name a file holding it with "
                          f"--token-file or {TOKEN_FILE_ENV} (never on the command line)",
                          key="token")
    try:
        value = read_secret_file(Path(path).expanduser())
    except FileProblem as exc:
        raise ConfigError(f"cannot read {path}: {exc.reason}", key=origin) from None
    return _checked_token(value, origin, f"{origin} {path}"), f"{origin} {path}"


def _checked_token(value: str, key: str, origin: str) -> str:
    token = value.strip()
    if not token:
        raise ConfigError("the token is empty", key=key)
    if not _TOKEN_OK.fullmatch(token):
        # Never shown: it may be most of a real token.
        raise ConfigError(f"the token from {origin} holds spaces, control or non-ASCII "
                          "characters; an API token is printable ASCII", key=key)
    return token


def _tls_context(args: argparse.Namespace, env: Mapping[str, str]) -> ssl.SSLContext:
    """Verifying, against the system's CAs or the ``--ca-file`` (FLEET_SERVER_CA_FILE)."""
    from fleet.engine.spec_checks import check_ca_file

    name, key = (args.ca_file, "--ca-file") if args.ca_file is not None else \
        (env.get(CA_FILE_ENV), CA_FILE_ENV)
    if name is None:
        return ssl.create_default_context()
    path, problem = check_ca_file(name, Path.cwd())
    if problem is not None:
        raise ConfigError(problem, key=key)
    return ssl.create_default_context(cafile=path)


def server_from(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Server:
    """The server, token and trust the options and the environment name; ConfigError
    (exit status 2) naming the culprit, before anything is sent."""
    env = os.environ if env is None else env
    if args.server is not None:
        url = parse_server(args.server, "--server")
    elif env.get(SERVER_ENV):
        url = parse_server(env[SERVER_ENV], SERVER_ENV)
    else:
        raise ConfigError(f"no service to call: pass --server URL or set {SERVER_ENV} "
                          "(like https://fleet.example.com:8443)", key="--server")
    token, origin = _token(args, env)
    if url.startswith("https://"):
        return Server(url, token, origin, _tls_context(args, env))
    if args.ca_file is not None:
        raise ConfigError(f"is for an https server; {url} is plain http", key="--ca-file")
    problem = _plain_http_problem(url)
    if problem is not None:
        if not args.insecure_http:
            raise ConfigError(problem, key="--server")
        eprint(f"warning: {url} is plain http off loopback (--insecure-http): the token "
               "crosses the network in clear")
    return Server(url, token, origin)


# -- calls ------------------------------------------------------------------------------

class Refused(FleetError):
    """The service answered with an error (or not as fleet would)."""

    def __init__(self, server: Server, status: int, message: str,
                 retry_after: str | None = None) -> None:
        self.status = status
        self.retry_after = retry_after = shown(retry_after)
        text = f"{server.url} answered {status}: {shown(message)}"
        if status == 401:
            text += f" (the token from {server.token_origin})"
        if retry_after is not None:
            text += f"; try again in {retry_after} s (Retry-After)" \
                if retry_after.isdigit() else f"; try again after {retry_after} (Retry-After)"
        super().__init__(text)

    @property
    def later(self) -> bool:
        """A refusal that a later try may pass (exit status 75)."""
        return self.status in (429, 503)


def shown(text: str | None) -> str | None:
    """Text from the service as a message may repeat it: no control characters (a
    terminal would act on them), at most :data:`MAX_SHOWN_CHARS`."""
    if text is None:
        return None
    text = _CONTROL.sub("?", text)
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "..."


async def call(server: Server, method: str, path: str, body: Any = None, *,
               wait_s: float = 0.0) -> Any:
    """One request; the JSON answer of a 2xx. :class:`Refused` for any other answer,
    FleetError naming the server when there is none (within ``wait_s`` plus
    :data:`ANSWER_TIMEOUT_S`)."""
    import json

    import aiohttp

    timeout = aiohttp.ClientTimeout(total=wait_s + ANSWER_TIMEOUT_S + CONNECT_TIMEOUT_S,
                                    sock_connect=CONNECT_TIMEOUT_S)
    headers = {"Authorization": f"Bearer {server.token}", "Accept": "application/json"}
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.request(method, server.url + path, json=body, headers=headers,
                                ssl=server.tls if server.tls is not None else True,
                                allow_redirects=False) as resp:
            raw = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                raw += chunk
                if len(raw) > MAX_ANSWER_BYTES:
                    raise FleetError(f"{server.url} answered more than {MAX_ANSWER_BYTES} "
                                     "bytes; that is not fleet serve")
            status, reason = resp.status, resp.reason or ""
            retry_after = resp.headers.get("Retry-After")
            is_json = resp.content_type == "application/json"
    except aiohttp.ClientConnectorCertificateError as exc:
        raise FleetError(f"{server.url}: its certificate is not trusted "
                         f"({getattr(exc.certificate_error, 'verify_message', None) or exc}); "
                         f"name its CA with --ca-file or {CA_FILE_ENV}") from None
    except aiohttp.ClientConnectorError as exc:
        err = exc.os_error
        # asyncio's own text repeats the address; a resolver's names the problem.
        why = os.strerror(err.errno) if err.errno and err.errno > 0 else \
            err.strerror or str(err) or type(err).__name__
        raise FleetError(f"cannot connect to {server.url}: {why}") from None
    except TimeoutError:
        # A lease may have been granted all the same: it ends at its TTL.
        raise FleetError(f"{server.url} did not answer within {timeout.total:g} s"
                         + ("; a lease granted meanwhile ends at its TTL" if method == "POST"
                            else "")) from None
    except aiohttp.ClientError as exc:
        raise FleetError(f"{server.url}: {type(exc).__name__}: {exc}") from None
    try:
        data = json.loads(bytes(raw)) if is_json else None
    except ValueError:
        data = None
    if 200 <= status < 300:
        if not isinstance(data, dict):
            raise FleetError(f"{server.url} answered {status} without a JSON object; is it "
                             "fleet serve?")
        return data
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        message = f"{reason} (not fleet's JSON error; is {server.url} fleet serve?)"
    raise Refused(server, status, message, retry_after)


#: what a lease must have for fleet to show it (docs/cli-json.md, "The lease object")
_LEASE_KEYS: dict[str, type | tuple[type, ...]] = {
    "id": str, "pool": str, "state": str, "expires_at": (int, float),
    "max_expires_at": (int, float), "member": dict}


def _lease_of(server: Server, answer: Any) -> dict[str, Any]:
    lease = answer.get("lease")
    if not isinstance(lease, dict) or not all(isinstance(lease.get(k), t)
                                              for k, t in _LEASE_KEYS.items()):
        raise FleetError(f"{server.url} answered without a lease; is it fleet serve?")
    return lease


# -- what a lease shows --------------------------------------------------------------------

def _joined(values: Any) -> str | None:
    return ",".join(str(v) for v in values) if values else None


#: the values ``--print`` and ``--format env`` show, by name (docs/cli-json.md)
FIELDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "id": lambda lease: lease["id"],
    "pool": lambda lease: lease["pool"],
    "expires_at": lambda lease: math.ceil(lease["expires_at"]),
    "name": lambda lease: lease["member"].get("name"),
    "ip": lambda lease: lease["member"].get("ip"),
    "ip_addresses": lambda lease: _joined(lease["member"].get("ip_addresses")),
    "macs": lambda lease: _joined(lease["member"].get("macs")),
    "host": lambda lease: lease["member"].get("host"),
    "datastore": lambda lease: lease["member"].get("datastore"),
    "vm": lambda lease: lease["member"].get("vm"),
    "instance_uuid": lambda lease: lease["member"].get("instance_uuid"),
}
FORMATS = ["text", "json", "env"]


def env_lines(lease: dict[str, Any]) -> list[str]:
    """``FLEET_LEASE_<FIELD>=value`` lines, for ``eval``, ``.`` or ``$GITHUB_ENV``:
    a value is quoted only if a shell would read something into it; none is empty."""
    out = []
    for name, get in FIELDS.items():
        value = get(lease)
        text = "" if value is None else shlex.quote(str(value))
        out.append(f"FLEET_LEASE_{name.upper()}={text}")
    return out


def _when(epoch: float, now: float) -> str:
    left = max(0, round(epoch - now))
    hours, rest = divmod(left, 3600)
    span = f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(epoch))} (in {span})"


def print_lease(lease: dict[str, Any], headline: str) -> None:
    m = lease["member"]
    addresses = m.get("ip_addresses") or []
    ip = m.get("ip") or f"- ({m.get('address_status') or 'no address'})"
    print(headline)
    rows = [("lease", lease["id"]), ("pool", lease["pool"]), ("client", lease.get("client")),
            ("expires", _when(lease["expires_at"], time.time())),
            ("at most until", _when(lease["max_expires_at"], time.time())),
            ("name", m.get("name")), ("ip", ip),
            ("other addresses", " ".join(addresses[1:]) or None),
            ("macs", " ".join(m.get("macs") or []) or None), ("host", m.get("host")),
            ("datastore", m.get("datastore")), ("vm", m.get("vm")),
            ("instance uuid", m.get("instance_uuid"))]
    for label, value in rows:
        if value is not None:
            print(f"  {label:<16}{value}")


# -- commands --------------------------------------------------------------------------

async def _lease(args: argparse.Namespace) -> int:
    server = server_from(args)
    pool = quote(args.pool, safe="")
    body: dict[str, float] = {}
    if args.ttl is not None:
        body["ttl_s"] = args.ttl
    if args.wait is not None:
        wait_s = body["wait_s"] = args.wait
    else:
        # The request waits as long as the pool's wait_s: read it to bound the call.
        wait_s = (await call(server, "GET", f"/v1/pools/{pool}")).get("wait_s")
        if not isinstance(wait_s, int | float) or not 0 <= wait_s < math.inf:
            raise FleetError(f"{server.url} answered without pool {args.pool}'s wait_s; is "
                             "it fleet serve?")
    lease = _lease_of(server, await call(server, "POST", f"/v1/pools/{pool}/leases", body,
                                         wait_s=wait_s))
    fmt = "json" if args.json else args.format
    if args.print is not None:
        value = FIELDS[args.print](lease)
        if value is None:
            eprint(f"lease {lease['id']}: member {lease['member'].get('name')} has no "
                   f"{args.print} (address status: "
                   f"{lease['member'].get('address_status')}); printed an empty line")
        print("" if value is None else value)
    elif fmt == "json":
        print_json({"lease": lease})
    elif fmt == "env":
        print("\n".join(env_lines(lease)))
    else:
        print_lease(lease, f"leased {lease['member'].get('name')} from pool {lease['pool']}")
        eprint(f"return it with: fleet release {lease['id']}")
    return EXIT_OK


async def _release(args: argparse.Namespace) -> int:
    server = server_from(args)
    lease = _lease_of(server, await call(server, "DELETE",
                                         f"/v1/leases/{quote(args.lease, safe='')}"))
    if args.json:
        print_json({"lease": lease})
    else:
        name = lease["member"].get("name")
        ended = {"returned": "returned", "expired": "had already expired"}.get(
            lease["state"], lease["state"])
        print(f"lease {lease['id']} of pool {lease['pool']} {ended}: {name} is destroyed, "
              "never handed out again")
    return EXIT_OK


async def _renew(args: argparse.Namespace) -> int:
    server = server_from(args)
    lease = _lease_of(server, await call(server, "PATCH",
                                         f"/v1/leases/{quote(args.lease, safe='')}",
                                         {"ttl_s": args.ttl}))
    if args.json:
        print_json({"lease": lease})
    else:
        now = time.time()
        print(f"lease {lease['id']} of pool {lease['pool']} ({lease['member'].get('name')}) "
              f"now ends {_when(lease['expires_at'], now)}; it can be renewed until "
              f"{_when(lease['max_expires_at'], now)}")
    return EXIT_OK


async def _pools(args: argparse.Namespace) -> int:
    from fleet.report import print_table

    server = server_from(args)
    if args.pool is not None:
        pools = [await call(server, "GET", f"/v1/pools/{quote(args.pool, safe='')}")]
    else:
        answer = await call(server, "GET", "/v1/pools")
        pools = answer.get("pools")
        if not isinstance(pools, list):
            raise FleetError(f"{server.url} answered without pools; is it fleet serve?")
    if args.json:
        print_json({"pools": pools})
        return EXIT_OK

    def served(p: dict[str, Any]) -> str:
        if p.get("serving"):
            return "yes"
        return f"no: {p['holder']}" if p.get("holder") else "no (taking it over)"

    def count(p: dict[str, Any], state: str) -> Any:
        return (p.get("members") or {}).get(state)

    print_table(f"pools at {server.url}",
                ["pool", "served here", "idle", "leased", "refilling", "recycling",
                 "in doubt", "ready/max", "waiting", "error"],
                [[p.get("name"), served(p), count(p, "idle"), count(p, "leased"),
                  count(p, "refilling"), count(p, "recycling"), count(p, "doubt"),
                  f"{p.get('ready')}/{p.get('max')}", p.get("waiting"), p.get("error")]
                 for p in pools])
    return EXIT_OK


def _tempfail(command: Callable[[argparse.Namespace], Any]) -> Callable[..., Any]:
    """A command whose "try again later" refusals (429, 503) exit 75; others raise."""

    async def run(args: argparse.Namespace) -> int:
        try:
            return int(await command(args))
        except Refused as exc:
            if not exc.later:
                raise
            eprint(str(exc))
            return EXIT_TEMPFAIL

    return run


# -- the parser --------------------------------------------------------------------------

def _wait(text: str) -> float:
    from fleet.engine.lifetime import parse_duration

    return 0.0 if _ZERO.fullmatch(text.strip().lower()) else \
        parse_duration(text, key="--wait")


def _ttl(text: str) -> float:
    from fleet.engine.lifetime import parse_duration

    return parse_duration(text, key="--ttl")


def _client_options(parser: argparse.ArgumentParser,
                    run: Callable[[argparse.Namespace], Any], *,
                    json_help: str | None = None) -> None:
    """The options every pool command shares (``--json`` if ``json_help``), and what
    runs it."""
    if json_help is not None:
        parser.add_argument("--json", action="store_true", help=json_help)
    g = parser.add_argument_group(
        "service", "which fleet serve, as whom; the token never on the command line "
                   "(README, 'CI pools')")
    g.add_argument("--server", metavar="URL",
                   help=f"the service's URL, like https://fleet.example.com:8443 (default: "
                        f"${SERVER_ENV})")
    g.add_argument("--token-file", metavar="FILE",
                   help=f"a file holding the API token (default: ${TOKEN_ENV}, or the file "
                        f"${TOKEN_FILE_ENV} names)")
    g.add_argument("--ca-file", metavar="FILE",
                   help=f"trust the CAs in this PEM file for the service's certificate "
                        f"(default: ${CA_FILE_ENV}, else the system's CAs)")
    g.add_argument("--insecure-http", action="store_true",
                   help="allow a plain http URL off loopback: the token then crosses the "
                        "network in clear")
    parser.set_defaults(afunc=_tempfail(run))


def add_commands(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """``lease``, ``release``, ``renew`` and ``pools`` on the ``fleet`` parser; ``command``
    adds one subparser with the options every command shares."""
    p = command(sub, "lease", help="lease a ready member of a fleet serve's warm pool",
                description="Lease an idle member of a warm pool (at once, or when a "
                            "refill is ready) and print its record: name, addresses, "
                            "MACs, host, the lease's id and expiry. The member is "
                            "destroyed when the lease is returned (fleet release) or "
                            "expires. Exit status 75 when the pool has none to give "
                            "(try again after the Retry-After it prints).")
    p.add_argument("--pool", required=True, metavar="POOL", help="the pool to lease from")
    p.add_argument("--ttl", type=checked(_ttl), metavar="DURATION",
                   help="the lease's lifetime (90s, 30m, 2h, 1h30m); default the pool's "
                        "lease_ttl_s, at most its max_lease_ttl_s")
    p.add_argument("--wait", type=checked(_wait), metavar="DURATION",
                   help="how long to wait for a member when none is idle (0: not at all); "
                        "default the pool's wait_s")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="print the lease as one JSON object (docs/cli-json.md)")
    out.add_argument("--format", choices=FORMATS, default="text",
                     help="text (default), json, or env: FLEET_LEASE_<FIELD>=value lines "
                          "for eval or $GITHUB_ENV")
    out.add_argument("--print", choices=list(FIELDS), metavar="FIELD",
                     help=f"print only this value, for $(...): {', '.join(FIELDS)}")
    _client_options(p, _lease)

    p = command(sub, "release", help="return a lease: its member is destroyed",
                description="Return a lease to its pool; the member is destroyed, never "
                            "handed out again. A lease that has already ended is no error.")
    p.add_argument("lease", metavar="LEASE_ID", help="the lease's id (fleet lease printed it)")
    _client_options(p, _release, json_help="print the lease as one JSON object")

    p = command(sub, "renew", help="extend a lease: it ends --ttl from now",
                description="Extend a lease: it now ends DURATION from now, within its "
                            "pool's max_lease_ttl_s counted from the grant.")
    p.add_argument("lease", metavar="LEASE_ID", help="the lease's id")
    p.add_argument("--ttl", type=checked(_ttl), metavar="DURATION", required=True,
                   help="the new lifetime from now (30m, 2h...)")
    _client_options(p, _renew, json_help="print the lease as one JSON object")

    p = command(sub, "pools", help="a fleet serve's warm pools: members by state",
                description="The warm pools this client may lease from: who serves each, "
                            "its members idle, leased, refilling, recycling and in doubt, "
                            "its targets, the requests waiting and its last error.")
    p.add_argument("pool", nargs="?", metavar="POOL", help="only this pool")
    _client_options(p, _pools, json_help="print them as one JSON object")
