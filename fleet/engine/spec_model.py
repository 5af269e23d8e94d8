"""The fleet spec's typed models: every key, its default, its bounds, and the error.

:class:`FleetSpec` and its tables are what the rest of fleet reads. pydantic checks
each key on its own as the data comes in (type, range, a rule about that one
value); rules between keys and the secrets and files a spec names are
``fleet.engine.spec_checks``'s, and ``fleet.engine.spec`` is the way in
(:func:`~fleet.engine.spec.load_spec`, :func:`~fleet.engine.spec.spec_from_dict`),
which also re-exports these names. Secrets are private :class:`pydantic.SecretStr`
attributes, set when the spec is resolved, so they appear in no repr, dump, error or
log line. Every bound here is listed in docs/limits.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    SecretStr,
    field_validator,
)

from fleet.errors import ConfigError
from fleet.urls import redact_url, url_problem
from fleet.vcenter import (
    DATASTORE_COST_UNITS,
    HOST_PROVISIONING_SLOTS,
    MAX_CHAIN_DEPTH,
    MAX_CONCURRENT_OPERATIONS,
)
from fleet.vsphere.model import GuestCredentials

#: vSphere fails a clone past MAX_CHAIN_DEPTH delta-disk levels; a clone of a source at
#: the budget must still fit.
VSPHERE_CHAIN_LIMIT = MAX_CHAIN_DEPTH - 1
#: vCenter runs about this many operations at once and queues the rest (docs/vsphere.md).
VCENTER_MAX_OPERATIONS = MAX_CONCURRENT_OPERATIONS
MAX_VM_NAME = 80
MAX_COUNT = 100_000
#: twice vCenter's 2,500-host maximum: a frozen source on every host, and more
MAX_SOURCES = 5_000
#: the longest wait for one phase, for readiness or in the queue (a day)
MAX_WAIT_S = 86_400.0
#: the longest call, retry backoff, cancel grace or cleanup (an hour). These bound how
#: long one retry sleeps and how long a stopped run lingers (cancel_grace_s + cleanup_s).
MAX_STEP_S = 3_600.0
#: a file's path is shown whole (up to this): it is how the user finds the culprit
PATH_SHOWN = 1024
#: problems shown in one error; the rest are counted
MAX_PROBLEMS_SHOWN = 20
#: fleet's caps on guestinfo: vSphere keeps extraConfig in the VMX file, which
#: has to stay small; these keep well inside what hosts accept.
GUESTINFO_KEY_MAX = 128
GUESTINFO_VALUE_MAX_BYTES = 64 * 1024
GUESTINFO_TOTAL_MAX_BYTES = 1024 * 1024
GUESTINFO_MAX_KEYS = 256
#: labels fleet writes on every member; users may not set keys under it.
LABEL_PREFIX = "guestinfo.fleet."

NAME_FIELDS = frozenset({"index", "fleet"})
GUESTINFO_FIELDS = frozenset({"index", "name", "fleet", "source", "run_id"})
_FLEET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")



class SpecError(ConfigError):
    """A bad spec. ``problems`` lists every (dotted key, message); ``str()`` shows them all."""

    def __init__(self, problems: Sequence[tuple[str, str]], *, source: str):
        first_key, first_message = problems[0]
        super().__init__(first_message, key=first_key, source=source)
        self.problems = list(problems)
        lines = [f"{source}: {k}: {m}" if k else f"{source}: {m}"
                 for k, m in self.problems[:MAX_PROBLEMS_SHOWN]]
        if len(self.problems) > MAX_PROBLEMS_SHOWN:
            lines.append(f"{source}: ... and {len(self.problems) - MAX_PROBLEMS_SHOWN} "
                         "more problems")
        self.args = ("\n".join(lines),)

    def __str__(self) -> str:
        return str(self.args[0])


def _limit(value: object) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'{show(value)} is neither a positive integer nor "auto"')
    if value < 1:
        raise ValueError(f"{value} must be at least 1 (or \"auto\")")
    return value


Limit = Annotated[int | Literal["auto"], PlainValidator(_limit)]


class _Model(BaseModel):
    # No inf/nan: every wait has a finite deadline.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class VCenterSpec(_Model):
    """How to reach vCenter. The password comes from ``password_env`` or ``password_file``."""

    url: str
    user: str = Field(min_length=1)
    password_env: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    thumbprint: str | None = None
    insecure: bool = False
    #: reach vCenter through HTTPS_PROXY/HTTP_PROXY unless NO_PROXY exempts it
    #: (docs/transport.md); off by default, so an environment meant for other tools
    #: never reroutes fleet's session.
    use_env_proxy: bool = False
    _password: SecretStr = PrivateAttr(default=SecretStr(""))
    #: the CA files, resolved (one for ``ca_file``; govc's GOVC_TLS_CA_CERTS may list more)
    _ca_paths: tuple[str, ...] = PrivateAttr(default=())
    #: the setting that turned verification off (a flag or variable may, docs/connecting.md)
    _insecure_from: str = PrivateAttr(default="vcenter.insecure")

    @property
    def password(self) -> SecretStr:
        return self._password

    @property
    def insecure_from(self) -> str:
        """The setting behind ``insecure``, which its warning names."""
        return self._insecure_from

    @property
    def ca_path(self) -> str | None:
        """``ca_file`` resolved against the directory of the file that named it."""
        return self._ca_paths[0] if self._ca_paths else None

    @property
    def ca_paths(self) -> tuple[str, ...]:
        """Every CA file to trust (docs/connecting.md: GOVC_TLS_CA_CERTS lists several)."""
        return self._ca_paths

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        problem = url_problem(v)
        if problem:
            raise ValueError(f"{show(v)} {problem}")
        return v


class SourceSpec(_Model):
    """A source VM by name or inventory path, optionally with its own chain budget."""

    name: str = Field(min_length=1)
    chain_budget: int | None = Field(default=None, ge=1)

    @field_validator("chain_budget")
    @classmethod
    def _budget(cls, v: int | None) -> int | None:
        return _check_budget(v) if v is not None else v


class LimitsSpec(_Model):
    """Operations fleet hands vCenter at once. Each is a positive int or ``"auto"``."""

    in_flight: Limit = "auto"
    per_host: Limit = HOST_PROVISIONING_SLOTS
    per_datastore: Limit = DATASTORE_COST_UNITS
    per_running_source: Limit = 1

    @field_validator("in_flight")
    @classmethod
    def _overall(cls, v: int | Literal["auto"]) -> int | Literal["auto"]:
        if isinstance(v, int) and v > VCENTER_MAX_OPERATIONS:
            raise ValueError(f"{v} is above the {VCENTER_MAX_OPERATIONS} operations vCenter "
                             "runs at once (it would queue the rest)")
        return v


class RetriesSpec(_Model):
    """Retries of transient faults: exponential backoff, capped, with jitter."""

    attempts: int = Field(default=5, ge=1, le=100)
    backoff_base_s: float = Field(default=0.5, gt=0, le=MAX_STEP_S)
    backoff_max_s: float = Field(default=30.0, gt=0, le=MAX_STEP_S)
    jitter: float = Field(default=1.0, ge=0, le=1)


class NetworkSpec(_Model):
    """The guest network workflow: clone disconnected, refresh the NIC in the guest, reconnect."""

    disconnect_at_clone: bool = True
    refresh: Literal["auto", "linux", "windows", "custom", "none"] = "auto"
    command: str | None = None
    arguments: str = ""
    reconnect: bool = True
    guest_user: str | None = None
    guest_password_env: str | None = None
    guest_password_file: str | None = None
    _guest_password: SecretStr = PrivateAttr(default=SecretStr(""))

    @property
    def credentials(self) -> GuestCredentials | None:
        """Guest login, or None when the spec has none."""
        if self.guest_user is None:
            return None
        return GuestCredentials(self.guest_user, self._guest_password.get_secret_value())


class ReadinessSpec(_Model):
    """When a member counts as ready."""

    wait_for: Literal["guest_ip", "guestinfo", "none"] = "guest_ip"
    guestinfo_key: str = "guestinfo.ready"
    timeout_s: float = Field(default=600.0, gt=0, le=MAX_WAIT_S)


class TimeoutsSpec(_Model):
    """Deadlines per phase and for housekeeping (the ready phase uses ``readiness.timeout_s``)."""

    queue_s: float = Field(default=3600.0, gt=0, le=MAX_WAIT_S)
    clone_s: float = Field(default=600.0, gt=0, le=MAX_WAIT_S)
    network_s: float = Field(default=300.0, gt=0, le=MAX_WAIT_S)
    reconnect_s: float = Field(default=120.0, gt=0, le=MAX_WAIT_S)
    call_s: float = Field(default=60.0, gt=0, le=MAX_STEP_S)
    cleanup_s: float = Field(default=120.0, gt=0, le=MAX_STEP_S)
    cancel_grace_s: float = Field(default=60.0, ge=0, le=MAX_STEP_S)


class FleetSpec(_Model):
    """A whole fleet: what to make, from what, how fast, and when it is done."""

    name: str
    count: int = Field(ge=0, le=MAX_COUNT)
    name_template: str = "{fleet}-{index:04d}"
    folder: str | None = None
    sources: list[SourceSpec] = Field(min_length=1)
    chain_budget: int = Field(default=200, ge=1)
    vcenter: VCenterSpec | None = None
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    retries: RetriesSpec = Field(default_factory=RetriesSpec)
    guestinfo: dict[str, str] = Field(default_factory=dict)
    # A factory, not a shared default: resolved secrets live on the instance.
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    readiness: ReadinessSpec = Field(default_factory=ReadinessSpec)
    timeouts: TimeoutsSpec = Field(default_factory=TimeoutsSpec)
    _origin: str = PrivateAttr(default="<spec>")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _FLEET_NAME.fullmatch(v):
            raise ValueError(f"{show(v)} must be 1-63 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        return v

    @field_validator("chain_budget")
    @classmethod
    def _budget(cls, v: int) -> int:
        return _check_budget(v)

    @field_validator("guestinfo", mode="before")
    @classmethod
    def _guestinfo_keys(cls, v: object) -> object:
        if isinstance(v, dict) and len(v) > GUESTINFO_MAX_KEYS:
            raise ValueError(f"{len(v)} keys; the limit is {GUESTINFO_MAX_KEYS}")
        return v

    @field_validator("sources", mode="before")
    @classmethod
    def _sources(cls, v: object) -> object:
        # A source is a bare name/path or a table; tables keep their own validation.
        if isinstance(v, list) and len(v) > MAX_SOURCES:
            # Checked before the entries are: each costs a lookup in vCenter.
            raise ValueError(f"{len(v)} sources; the limit is {MAX_SOURCES}")
        if isinstance(v, list):
            return [{"name": s} if isinstance(s, str) else s for s in v]
        return v

    @property
    def folder_path(self) -> str:
        """The fleet's VM folder (``fleet/<name>`` unless the spec says otherwise)."""
        return self.folder or f"fleet/{self.name}"

    @property
    def origin(self) -> str:
        """Where the spec came from (file name or ``<spec>``), for messages."""
        return self._origin

    @property
    def simulated(self) -> bool:
        """No vCenter section: the built-in simulator is the target."""
        return self.vcenter is None

    def vm_name(self, index: int) -> str:
        return self.name_template.format(index=index, fleet=self.name)

    def budget_for(self, source: str) -> int:
        """The chain budget of a source (its own, else the fleet's)."""
        for s in self.sources:
            if s.name == source and s.chain_budget is not None:
                return s.chain_budget
        return self.chain_budget

    def guestinfo_for(self, *, index: int, name: str, source: str, run_id: str) -> dict[str, str]:
        """The rendered guestinfo templates for one member."""
        return {k: v.format(index=index, name=name, fleet=self.name, source=source,
                            run_id=run_id) for k, v in self.guestinfo.items()}


def _check_budget(v: int) -> int:
    if v > VSPHERE_CHAIN_LIMIT:
        raise ValueError(f"{v} is above the vSphere limit of {VSPHERE_CHAIN_LIMIT}")
    return v


def is_fleet_name(name: str) -> bool:
    """A fleet name: 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    return _FLEET_NAME.fullmatch(name) is not None


def show(value: object, limit: int = 60) -> str:
    """A value as the user wrote it, TOML-ish and short: how every problem quotes a value
    (the spec's, the service config's, an API request's)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        # A URL's user info may be a password (https://user:SECRET@vc/sdk): never shown.
        text = json.dumps(redact_url(value) if "://" in value else value)
    elif isinstance(value, int | float):
        text = repr(value)
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k} = {show(v, 20)}" for k, v in value.items()) + "}"
    elif isinstance(value, list):
        text = "[" + ", ".join(show(v, 20) for v in value) + "]"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
