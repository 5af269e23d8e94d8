"""The service's configuration (``fleet serve --config FILE``): TOML in, validated model out.

This module owns the service's keys and their rules; :func:`load_config` is the
only way in and raises :class:`~fleet.engine.spec.SpecError` naming the file,
the dotted key and the bad value, like a fleet spec. Unknown keys are errors.

- ``[vcenter]`` is the fleet spec's table (same keys, same checks). Without it
  the environment names the vCenter as it does for the CLI (``FLEET_VCENTER_*``,
  then govc's ``GOVC_*``: ``fleet.engine.connection``, docs/connecting.md); with
  neither, the service starts the built-in simulator (``[simulator]``). A variable
  set but unusable is an error, never the simulator.
- ``[api]``: the bearer token comes from ``token_env`` or ``token_file``, never
  the file itself or argv; at least 16 characters. It is one admin client; more
  clients, each with its token's hash, role and quotas, come from ``tokens_file``
  (``fleet.api.tokens``). Every state-changing request is written to ``audit_log``
  (default ``<state_dir>/audit.jsonl``; ``fleet.api.audit``). ``tls_cert`` and
  ``tls_key`` (both or neither; relative to the config file) serve HTTPS: their files
  are read and checked when ``fleet serve`` starts, where ``--tls-cert``/``--tls-key``
  override them (fleet.cli.serve, docs/service-tls.md).
- ``[limits]`` (the spec's table) are shared by every fleet the service runs.
- ``[defaults]``: fleet spec keys merged under every request body (tables merge
  key by key; the request wins). Secrets (``network.guest_password_env`` or
  ``_file``) may only come from here: a caller must not make the service read
  its environment or files.

Every fleet lives in ``<root_folder>/<name>``; the service finds fleets by
scanning that folder, so fleets made by ``fleet provision`` with the default
folder (``fleet/<name>``) are found too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError

from fleet.engine.connection import resolve_connection
from fleet.engine.spec import (
    MAX_COUNT,
    MAX_STEP_S,
    FleetSpec,
    LimitsSpec,
    SpecError,
    VCenterSpec,
    is_fleet_name,
    read_toml,
    spec_from_dict,
)
from fleet.engine.spec_checks import (
    folder_problem,
    pydantic_problems,
    read_secret,
    resolve_path,
    resolve_vcenter,
    vcenter_problems,
)
from fleet.engine.spec_model import show
from fleet.errors import ConfigError

if TYPE_CHECKING:
    from fleet.api.tokens import Client
from fleet.urls import redact_url

MIN_TOKEN_CHARS = 16
#: the built-in simulator's slowest time scale: 100 makes a 1 s clone take 100 s
MAX_TIME_SCALE = 100.0
#: spec keys the service owns: a request body may not set them
SERVICE_KEYS = ("vcenter", "limits", "folder")
SECRET_KEYS = ("guest_password_env", "guest_password_file")
_LISTEN = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")


class _Model(BaseModel):
    # No inf/nan: every wait has a finite deadline.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class ApiSection(_Model):
    """Who may call the API, and how much they may send."""

    token_env: str | None = None
    token_file: str | None = None
    #: more clients: names, token hashes, roles, quotas (fleet.api.tokens)
    tokens_file: str | None = None
    #: the audit log (JSON lines, fleet.api.audit); default <state_dir>/audit.jsonl
    audit_log: str | None = None
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # The HTTP edge (fleet.api.edge): what a client may hold without making progress.
    max_connections: int = Field(default=1024, ge=16, le=100_000)
    idle_timeout_s: float = Field(default=15.0, gt=0, le=3600, allow_inf_nan=False)
    body_timeout_s: float = Field(default=60.0, gt=0, le=3600, allow_inf_nan=False)
    # HTTPS (docs/service-tls.md): PEM files, paths relative to the config file.
    tls_cert: str | None = None
    tls_key: str | None = None
    _token: SecretStr = PrivateAttr(default=SecretStr(""))
    _clients: tuple[Client, ...] = PrivateAttr(default=())
    _audit_path: Path | None = PrivateAttr(default=None)

    @property
    def token(self) -> SecretStr:
        """The single token (empty when only ``tokens_file`` names clients)."""
        return self._token

    @property
    def clients(self) -> tuple[Client, ...]:
        """Every client: the single token's admin first, then the tokens file's."""
        return self._clients

    @property
    def audit_path(self) -> Path | None:
        """``audit_log`` resolved; None: the service puts it in its state directory."""
        return self._audit_path


class SimulatorSection(_Model):
    """The built-in simulator, used when there is no ``[vcenter]``."""

    time_scale: float = Field(default=1.0, gt=0, le=MAX_TIME_SCALE)
    topology: str | None = None


#: a pool's lease and idle lifetimes: at most a week (a "forever" lease is a fleet)
MAX_POOL_TTL_S = 7 * 86400.0
#: the longest a lease request may wait for a member (``wait_s``)
MAX_WAIT_S = 600.0


class PoolSection(_Model):
    """A warm pool (docs/pools.md): ``ready`` idle members kept, ``max`` in all.

    ``spec`` holds fleet spec keys merged over ``[defaults]`` (not ``name``,
    ``count`` or the service's own tables): the pool's members are that fleet's."""

    ready: int = Field(ge=0, le=MAX_COUNT)
    max: int = Field(ge=1, le=MAX_COUNT)
    ready_ttl_s: float = Field(default=3600.0, gt=0, le=MAX_POOL_TTL_S)
    lease_ttl_s: float = Field(default=3600.0, gt=0, le=MAX_POOL_TTL_S)
    max_lease_ttl_s: float = Field(default=86400.0, gt=0, le=MAX_POOL_TTL_S)
    #: how long a lease request waits for a member when it does not say (``wait_s``)
    wait_s: float = Field(default=60.0, ge=0, le=MAX_WAIT_S)
    spec: dict[str, Any] = Field(default_factory=dict)
    _spec: FleetSpec | None = PrivateAttr(default=None)
    _digest: str = PrivateAttr(default="")

    @property
    def fleet_spec(self) -> FleetSpec:
        """The pool's members' spec (resolved at load: name, folder, defaults merged)."""
        assert self._spec is not None, "resolved by config_from_dict"
        return self._spec

    @property
    def digest(self) -> str:
        """8 hex digits of what the members are made from (the spec with its defaults,
        not the pool's sizes or limits): an idle member made from another spec is
        replaced, not leased (docs/pools.md)."""
        return self._digest


class ServiceConfig(_Model):
    listen: str = "127.0.0.1:8080"
    root_folder: str = "fleet"
    #: where pools keep their members: ``<pools_folder>/<pool>``; default
    #: ``<root_folder>-pools`` (apart from the fleets, which the scanner discovers)
    pools_folder: str | None = None
    state_dir: str | None = None
    scan_interval_s: float = Field(default=30.0, gt=0, le=86400)
    max_fleets: int = Field(default=100, ge=1, le=10_000)
    max_count: int = Field(default=10_000, ge=1, le=MAX_COUNT)
    shutdown_grace_s: float = Field(default=60.0, ge=0, le=MAX_STEP_S)
    #: lease of the fleet locks the service holds (docs/locking.md)
    lock_lease_s: float = Field(default=60.0, ge=2, le=3600)
    vcenter: VCenterSpec | None = None
    simulator: SimulatorSection = Field(default_factory=SimulatorSection)
    api: ApiSection = Field(default_factory=ApiSection)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    defaults: dict[str, Any] = Field(default_factory=dict)
    pools: dict[str, PoolSection] = Field(default_factory=dict)
    _origin: str = PrivateAttr(default="<config>")
    _base_dir: Path = PrivateAttr(default=Path("."))
    _env: dict[str, str] = PrivateAttr(default_factory=dict)
    _vcenter_origin: str | None = PrivateAttr(default=None)

    @property
    def origin(self) -> str:
        return self._origin

    @property
    def vcenter_origin(self) -> str:
        """Where ``vcenter`` came from: the config's table, or a variable (GOVC_URL...)."""
        return self._vcenter_origin or f"{self._origin}'s [vcenter]"

    @property
    def env(self) -> Mapping[str, str]:
        """The environment secrets are read from (the service's, at load time)."""
        return self._env

    @property
    def base_dir(self) -> Path:
        """The config file's directory: relative paths in it start here."""
        return self._base_dir

    @property
    def tls_files(self) -> tuple[Path, Path] | None:
        """``api.tls_cert`` and ``api.tls_key`` as paths (from the config's directory)."""
        if self.api.tls_cert is None or self.api.tls_key is None:
            return None
        return (resolve_path(self.api.tls_cert, self._base_dir),
                resolve_path(self.api.tls_key, self._base_dir))

    @property
    def listen_address(self) -> tuple[str, int]:
        m = _LISTEN.match(self.listen)
        assert m is not None  # validated at load
        return m.group("host").strip("[]"), int(m.group("port"))

    @property
    def state_path(self) -> Path:
        """Where requested specs are kept (see ``fleet.api.state``)."""
        if self.state_dir is not None:
            p = Path(self.state_dir).expanduser()
            return p if p.is_absolute() else self._base_dir / p
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "fleet" / "serve"

    def fleet_folder(self, name: str) -> str:
        return f"{self.root_folder.strip('/')}/{name}"

    @property
    def pools_root(self) -> str:
        return (self.pools_folder or f"{self.root_folder.strip('/')}-pools").strip("/")

    def pool_folder(self, name: str) -> str:
        return f"{self.pools_root}/{name}"


def parse_listen(value: str, key: str = "listen") -> tuple[str, int]:
    m = _LISTEN.match(value)
    if m is None or not 0 <= int(m.group("port")) <= 65535:
        raise SpecError([(key, f"{show(redact_url(value))} is not HOST:PORT "
                               "(like 127.0.0.1:8080)")],
                        source="--listen" if key == "--listen" else "<config>")
    return m.group("host").strip("[]"), int(m.group("port"))


def load_config(path: str | os.PathLike[str], *,
                env: Mapping[str, str] | None = None) -> ServiceConfig:
    """Read, validate and resolve the service config. Every error is a SpecError."""
    p = Path(path)
    return config_from_dict(read_toml(p, "config"), source=p.name, env=env,
                            base_dir=p.resolve().parent)


def config_from_dict(data: Mapping[str, Any], *, source: str = "<config>",
                     env: Mapping[str, str] | None = None,
                     base_dir: str | os.PathLike[str] | None = None) -> ServiceConfig:
    env = os.environ if env is None else env
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    try:
        config = ServiceConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise SpecError(pydantic_problems(exc), source=source) from None
    problems = list(_problems(config))
    if not problems:
        problems = list(_resolve(config, env, base))
    if not problems and config.vcenter is None:
        config, problems = _from_environment(config, env)
    if not problems:
        problems = list(_defaults_problems(config, env, base))
    if not problems:
        problems = list(_pool_problems(config, env, base))
    if problems:
        raise SpecError(problems, source=source)
    config._origin = source
    config._base_dir = base
    config._env = dict(env)
    return config


def _problems(config: ServiceConfig) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    m = _LISTEN.match(config.listen)
    if m is None or int(m.group("port")) > 65535:
        problems.append(("listen", f"{show(redact_url(config.listen))} is not HOST:PORT "
                                   "(like 127.0.0.1:8080)"))
    root_problem = folder_problem(config.root_folder, "fleet")
    if root_problem:
        problems.append(("root_folder", root_problem))
    problems.extend(vcenter_problems(config.vcenter))
    api = config.api
    if api.token_env is not None and api.token_file is not None:
        problems.append(("api.token_env", "set exactly one of api.token_env and "
                                          "api.token_file (or neither, with "
                                          "api.tokens_file)"))
    elif api.token_env is None and api.token_file is None and api.tokens_file is None:
        problems.append(("api.token_env", "set exactly one of api.token_env and "
                                          "api.token_file, or api.tokens_file (the API "
                                          "needs bearer tokens)"))
    for have, lack in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
        if getattr(api, have) is not None and getattr(api, lack) is None:
            problems.append((f"api.{lack}", f"is missing: api.{have} is set, and HTTPS "
                                            "needs both the certificate and its key"))
    for name in ("tls_cert", "tls_key"):
        if getattr(api, name) == "":
            problems.append((f"api.{name}", "is empty; name a PEM file"))
    if config.pools_folder is not None:
        pools_problem = folder_problem(config.pools_folder, "fleet-pools")
        if pools_problem:
            problems.append(("pools_folder", pools_problem))
        elif config.pools_root.split("/")[:len(config.root_folder.strip("/").split("/"))] \
                == config.root_folder.strip("/").split("/"):
            problems.append(("pools_folder", f"{show(config.pools_folder)} is inside "
                             f"root_folder {show(config.root_folder)}, where every folder "
                             "is a fleet; choose a folder beside it"))
    for name, pool in config.pools.items():
        where = f"pools.{name}"
        if not is_fleet_name(name):
            problems.append((where, f"{show(name)} is not a valid pool name (letters, "
                                    "digits, '-' and '_'; a VM folder's name)"))
            continue
        if pool.ready > pool.max:
            problems.append((f"{where}.ready", f"{pool.ready} is above max ({pool.max}): "
                                               "a pool cannot keep more idle members "
                                               "than it may have"))
        if pool.lease_ttl_s > pool.max_lease_ttl_s:
            problems.append((f"{where}.lease_ttl_s", f"{pool.lease_ttl_s:g} is above "
                             f"max_lease_ttl_s ({pool.max_lease_ttl_s:g})"))
        for key in pool.spec:
            if key in SERVICE_KEYS or key in ("name", "count"):
                problems.append((f"{where}.spec.{key}", "is set by the service for a pool"
                                 + (" (the pool's name)" if key == "name" else
                                    " (from ready and max)" if key == "count" else
                                    f" (from the service's [{key}])"
                                    if key != "folder" else " (pools_folder/<pool>)")))
    if config.simulator.topology is not None and config.vcenter is not None:
        problems.append(("simulator.topology", "is only used without [vcenter]"))
    for key in config.defaults:
        if key in SERVICE_KEYS or key == "name":
            where = f"defaults.{key}"
            what = "the fleet's name" if key == "name" else f"[{key}]"
            problems.append((where, f"{what} is not a default; "
                             + ("every fleet is in root_folder/<name>" if key == "folder" else
                                "it belongs to the service's own table" if key != "name" else
                                "each request names its fleet")))
    return problems


def _resolve(config: ServiceConfig, env: Mapping[str, str],
             base: Path) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if config.vcenter is not None:
        problems.extend(resolve_vcenter(config.vcenter, env, base))
    if config.simulator.topology is not None:
        # Judged now, as the simulator will read it: a bad one is a config error naming
        # the key, not a simulator that "did not start".
        from fleet.sim.topology import load_topology

        try:
            load_topology(config.simulator.topology)
        except ConfigError as exc:
            problems.append(("simulator.topology", str(exc)))
    problems.extend(_resolve_clients(config.api, env, base))
    return problems


def _resolve_clients(api: ApiSection, env: Mapping[str, str], base: Path
                     ) -> list[tuple[str, str]]:
    """Read the single token and the tokens file into ``api.clients``."""
    from fleet.api.tokens import load_tokens, single_token_client

    problems: list[tuple[str, str]] = []
    clients: list[Client] = []
    which = "token_env" if api.token_env is not None else "token_file"
    secret, problem = read_secret(which, api.token_env, api.token_file, env, base)
    if problem:
        problems.append((f"api.{which}", problem))
    elif secret is not None:
        token = secret.get_secret_value().strip()
        if len(token) < MIN_TOKEN_CHARS:
            problems.append((f"api.{which}", f"the token is {len(token)} characters long; "
                             f"use at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 24`)"))
        else:
            api._token = SecretStr(token)
            clients.append(single_token_client(token))
    if api.tokens_file is not None:
        reserved = {c.name: c.digest for c in clients}
        listed, bad = load_tokens(resolve_path(api.tokens_file, base), reserved=reserved)
        problems.extend(("api.tokens_file", p) for p in bad)
        clients.extend(listed)
    if api.audit_log is not None:
        api._audit_path = resolve_path(api.audit_log, base)
    api._clients = tuple(clients)
    return problems


def _from_environment(config: ServiceConfig, env: Mapping[str, str]
                      ) -> tuple[ServiceConfig, list[tuple[str, str]]]:
    """``config`` with the vCenter the environment names, when it has no ``[vcenter]``.
    A bad or incomplete variable raises (source "environment", naming it)."""
    found = resolve_connection(None, env=env)  # its paths are the shell's: from the cwd
    if found.vcenter is None:
        return config, []
    if config.simulator.topology is not None:
        return config, [("simulator.topology", f"is only used with the built-in simulator, and "
                                               f"{found.origin} names a vCenter")]
    out = config.model_copy(update={"vcenter": found.vcenter})
    out._vcenter_origin = found.origin
    return out, []


def _defaults_problems(config: ServiceConfig, env: Mapping[str, str],
                       base: Path) -> list[tuple[str, str]]:
    """Validate the defaults as a spec would see them: merged into a trial fleet."""
    trial: dict[str, Any] = {"name": "defaults", "count": 0, "sources": ["?"]}
    network = config.defaults.get("network")
    if not (isinstance(network, Mapping) and "guest_user" in network):
        # No guest login among the defaults: fleets must then skip the NIC refresh,
        # which each request says for itself; check the rest.
        trial["network"] = {"refresh": "none"}
    trial = merge(trial, config.defaults)
    try:
        spec_from_dict(trial, source=config.origin, env=env, base_dir=base)
    except SpecError as exc:
        return [(f"defaults.{key}" if key else "defaults", message)
                for key, message in exc.problems]
    return []


def _pool_problems(config: ServiceConfig, env: Mapping[str, str],
                   base: Path) -> list[tuple[str, str]]:
    """Build each pool's fleet spec: its ``spec`` over ``[defaults]``, its own name,
    folder and limits; a problem names the pool's key."""
    problems: list[tuple[str, str]] = []
    for name, pool in config.pools.items():
        data = merge(config.defaults, pool.spec)
        made_from = json.dumps(data, sort_keys=True, default=str).encode()
        pool._digest = hashlib.sha256(made_from).hexdigest()[:8]
        data.update(name=name, count=pool.max, folder=config.pool_folder(name),
                    limits=config.limits.model_dump())
        try:
            pool._spec = spec_from_dict(data, source=config.origin, env=env, base_dir=base)
        except SpecError as exc:
            problems.extend((f"pools.{name}.spec.{key}" if key else f"pools.{name}.spec",
                             message) for key, message in exc.problems)
    return problems


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; tables merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out
