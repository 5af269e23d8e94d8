"""The fleet spec: TOML in, validated typed models out.

This module owns the spec's keys, their defaults and every rule about them.
:func:`load_spec` (a file) and :func:`spec_from_dict` (anything that already has
the data, such as the CLI) are the only ways in; both raise :class:`SpecError`
(a :class:`~fleet.errors.ConfigError`) naming the file, the dotted key and the
bad value, never a pydantic traceback. Unknown keys are errors.

Secrets (vCenter and guest passwords) come from an environment variable or a
file named in the spec, never from the spec itself or argv; they are resolved at
load time into :class:`pydantic.SecretStr` private attributes, so they appear in
no repr, dump, error or log line.

No ``[vcenter]`` table means the built-in simulator is the target. Every
bound on sizes, durations, files and URLs is listed in docs/limits.md.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
)

from fleet.errors import ConfigError
from fleet.files import (
    CONFIG_MAX_BYTES,
    PEM_MAX_BYTES,
    FileProblem,
    decode_utf8,
    parse_toml,
    read_secret_file,
    read_user_file,
)
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
_GUESTINFO_KEY = re.compile(r"^guestinfo\.[A-Za-z0-9_.-]+$")
_FLEET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: SHA-256, as the client pins it (with or without colons); SHA-1 is refused there too
_THUMBPRINT = re.compile(r"([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}|[0-9A-Fa-f]{64}")
_SHA1_THUMBPRINT = re.compile(r"([0-9A-Fa-f]{2}:){19}[0-9A-Fa-f]{2}|[0-9A-Fa-f]{40}")
#: characters vSphere escapes in names (%2f, %5c, %25): a name with them is not what you asked
_NAME_BAD_CHARS = ("/", "\\", "%")
_SECRETISH = re.compile(r"pass|secret|token|key", re.IGNORECASE)


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
        raise ValueError(f'{_show(value)} is neither a positive integer nor "auto"')
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
    _ca_path: str | None = PrivateAttr(default=None)

    @property
    def password(self) -> SecretStr:
        return self._password

    @property
    def ca_path(self) -> str | None:
        """``ca_file`` resolved against the directory of the file that named it."""
        return self._ca_path

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        problem = url_problem(v)
        if problem:
            raise ValueError(f"{_show(v)} {problem}")
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
            raise ValueError(f"{_show(v)} must be 1-63 letters, digits, '.', '_' or '-', "
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


# -- loading -------------------------------------------------------------------------


def is_fleet_name(name: str) -> bool:
    """A fleet name: 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    return _FLEET_NAME.fullmatch(name) is not None


def read_toml(path: str | os.PathLike[str], what: str = "spec") -> dict[str, Any]:
    """A TOML file's data; a :class:`SpecError` naming the file (and the key, when the
    trouble is inside it) if it cannot be had. Read as :mod:`fleet.files` reads every
    user's file: a regular file of at most a few MiB, nesting bounded."""
    p = Path(path)
    try:
        raw = read_user_file(p, CONFIG_MAX_BYTES)
    except FileProblem as exc:
        raise SpecError([("", f"cannot read the {what}: {exc.reason}")],
                        source=str(p)) from None
    try:
        return parse_toml(raw)
    except FileProblem as exc:
        raise SpecError([(exc.key or "", exc.reason)], source=p.name) from None


def load_spec(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> FleetSpec:
    """Read, validate and resolve a TOML fleet spec. Every error is a :class:`SpecError`."""
    p = Path(path)
    return spec_from_dict(read_toml(p), source=p.name, env=env, base_dir=p.parent)


def spec_from_dict(data: Mapping[str, Any], *, source: str = "<spec>",
                   env: Mapping[str, str] | None = None,
                   base_dir: str | os.PathLike[str] | None = None) -> FleetSpec:
    """Validate already-parsed spec data (TOML shape). Secrets are read from ``env``
    (default: the process environment) and files relative to ``base_dir``."""
    env = os.environ if env is None else env
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    try:
        spec = FleetSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise SpecError(_pydantic_problems(exc), source=source) from None
    problems = list(_semantic_problems(spec))
    if not problems:
        problems = list(_resolve_secrets(spec, env, base))
    if problems:
        raise SpecError(problems, source=source)
    spec._origin = source
    return spec


def _show(value: object, limit: int = 60) -> str:
    """A value as the user wrote it, TOML-ish and short."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        # A URL's user info may be a password (https://user:SECRET@vc/sdk): never shown.
        text = json.dumps(redact_url(value) if "://" in value else value)
    elif isinstance(value, int | float):
        text = repr(value)
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k} = {_show(v, 20)}" for k, v in value.items()) + "}"
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(v, 20) for v in value) + "]"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dotted(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # Quoted unless plain, so a key with dots, spaces or control characters
            # reads unambiguously (and cannot move the terminal's cursor).
            plain = re.fullmatch(r"[A-Za-z0-9_-]+", part) is not None
            out += ("." if out else "") + (part if plain else json.dumps(part))
    return out


_PHRASES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be above {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be below {lt}",
    "literal_error": "must be one of {expected}",
    "too_short": "must have at least {min_length} item(s)",
    "string_too_short": "must not be empty",
    "finite_number": "must be a finite number",
}


def _pydantic_problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        key = _dotted(err["loc"])
        kind = err["type"]
        value = err.get("input")
        secret = bool(_SECRETISH.search(key)) and not key.endswith(("_env", "_file"))
        shown = "(value hidden)" if secret else _show(value)
        if kind == "missing":
            message = "is required"
        elif kind == "extra_forbidden":
            message = "unknown key"
            if key.split(".")[-1] in ("password", "guest_password"):
                message += " (secrets come from *_env or *_file keys, never the spec itself)"
        elif kind == "value_error":
            message = err["msg"].removeprefix("Value error, ")
        elif kind in _PHRASES:
            ctx = {k: f"{v:g}" if isinstance(v, float) else v
                   for k, v in err.get("ctx", {}).items()}
            message = f"{shown} " + _PHRASES[kind].format(**ctx)
            if kind in ("less_than_equal", "greater_than", "greater_than_equal") and \
                    key.endswith("_s"):
                message += " seconds"
        else:
            message = f"{shown}: {err['msg']}"
        problems.append((key, message))
    return problems


_FORMAT_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError)


def _fields(template: str, max_width: int) -> list[str]:
    """The replacement field names of a str.format template. ValueError if it is
    malformed, reaches into a value (``{fleet.real}``, ``{index[0]}``: templates come
    from specs and API callers, and attribute access is how format strings leak),
    nests fields in a format spec, or asks for a width above ``max_width`` (which
    could only render a value too long, after allocating all of it)."""
    names = []
    for _, field, spec, _ in string.Formatter().parse(template):
        if field is None:
            continue
        if "." in field or "[" in field:
            raise ValueError(f"{{{field}}} reaches into a value; use plain fields like "
                             "{index}")
        names.append(field)
        if spec and "{" in spec:
            raise ValueError(f"the format spec of {{{field}}} contains a field")
        widest = max((int(n) for n in re.findall(r"\d+", spec or "")), default=0)
        if widest > max_width:
            raise ValueError(f"the format spec of {{{field}}} asks for {widest} characters; "
                             f"the value may be at most {max_width}")
    return names


def folder_problem(path: str, example: str) -> str | None:
    """Why ``path`` is not a VM folder path (``a/b/c`` under the datacenter's VM folder),
    or None. vSphere takes every segment as a folder's name, so "." and ".." would
    be folders called that, not steps up or across."""
    if not path.strip("/") or "//" in path:
        return f"{_show(path)} is not a folder path like {_show(example)}"
    for part in path.strip("/").split("/"):
        problem = "is not a folder name (a folder path has no \".\" or \"..\" steps)" \
            if part in (".", "..") else _name_problem(part)
        if problem:
            return f"{_show(path)}: the folder name {_show(part)} {problem}"
    return None


def _name_problem(name: str) -> str | None:
    if not name or name != name.strip():
        return "is empty or has leading/trailing spaces"
    if len(name) > MAX_VM_NAME:
        return f"is {len(name)} characters long (vSphere allows {MAX_VM_NAME})"
    for ch in _NAME_BAD_CHARS:
        if ch in name:
            return f"contains {ch!r}, which vSphere escapes"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains control characters"
    return None


def _semantic_problems(spec: FleetSpec) -> Iterable[tuple[str, str]]:
    yield from _template_problems(spec)
    yield from _guestinfo_problems(spec)
    first: dict[str, int] = {}
    for i, source in enumerate(spec.sources):
        name = source.name
        if name in first:
            yield f"sources[{i}]", f"{_show(name)} is listed twice"
        elif any(ord(c) < 32 or ord(c) == 127 for c in name):
            yield f"sources[{i}]", f"{_show(name)} contains control characters"
        first.setdefault(name, i)
    if spec.retries.backoff_max_s < spec.retries.backoff_base_s:
        yield ("retries.backoff_max_s", f"{spec.retries.backoff_max_s} is below "
               f"retries.backoff_base_s ({spec.retries.backoff_base_s})")
    if spec.folder is not None:
        problem = folder_problem(spec.folder, "fleet/loadtest")
        if problem:
            yield "folder", problem
    yield from _vcenter_problems(spec.vcenter)
    yield from _network_problems(spec)
    r = spec.readiness
    if r.wait_for == "guestinfo" and not _GUESTINFO_KEY.fullmatch(r.guestinfo_key):
        yield ("readiness.guestinfo_key",
               f"{_show(r.guestinfo_key)} must start with \"guestinfo.\" (letters, digits, ._-)")


def _template_problems(spec: FleetSpec) -> Iterable[tuple[str, str]]:
    template = spec.name_template
    try:
        fields = _fields(template, MAX_VM_NAME)
    except ValueError as exc:
        yield "name_template", f"{_show(template)} is not a valid template: {exc}"
        return
    unknown = sorted(set(fields) - NAME_FIELDS)
    if unknown:
        yield ("name_template", f"{_show(template)} uses {{{unknown[0]}}}; "
               "only {index} and {fleet} are known")
        return
    if "index" not in fields and spec.count > 1:
        yield "name_template", f"{_show(template)} has no {{index}}, so every name is the same"
        return
    seen: dict[str, int] = {}
    for index in range(spec.count):
        try:
            name = template.format(index=index, fleet=spec.name)
        except _FORMAT_ERRORS as exc:
            yield "name_template", f"{_show(template)} is not a valid template: {exc}"
            return
        problem = _name_problem(name)
        if problem:
            yield ("name_template",
                   f"{_show(template)} gives {_show(name)} (index {index}), which {problem}")
            return
        if name in seen:
            yield ("name_template", f"{_show(template)} gives {_show(name)} for indexes "
                   f"{seen[name]} and {index}: names must be unique")
            return
        seen[name] = index


def _guestinfo_problems(spec: FleetSpec) -> Iterable[tuple[str, str]]:
    # Render with the longest values each field can take, so the size check is an upper bound.
    sample = {"index": max(spec.count - 1, 0), "name": "x" * MAX_VM_NAME, "fleet": spec.name,
              "source": max((s.name for s in spec.sources), key=len), "run_id": "r" * 32}
    total = 0
    for key, template in spec.guestinfo.items():
        where = _dotted(("guestinfo", key))
        if not _GUESTINFO_KEY.fullmatch(key):
            yield where, (f"{_show(key)} must start with \"guestinfo.\" and use only letters, "
                          "digits, '.', '_' and '-'")
            continue
        if key.startswith(LABEL_PREFIX) or key == LABEL_PREFIX.rstrip("."):
            yield where, f"{_show(key)} is reserved for fleet's own labels"
            continue
        if len(key) > GUESTINFO_KEY_MAX:
            yield where, f"{_show(key)} is longer than {GUESTINFO_KEY_MAX} characters"
            continue
        try:
            unknown = sorted(set(_fields(template, GUESTINFO_VALUE_MAX_BYTES))
                             - GUESTINFO_FIELDS)
            if unknown:
                yield where, (f"{_show(template)} uses {{{unknown[0]}}}; known fields are "
                              + ", ".join(f"{{{f}}}" for f in sorted(GUESTINFO_FIELDS)))
                continue
            size = len(template.format(**sample).encode())
        except _FORMAT_ERRORS as exc:
            yield where, f"{_show(template)} is not a valid template: {exc}"
            continue
        if size > GUESTINFO_VALUE_MAX_BYTES:
            yield where, f"renders to {size} bytes; the limit is {GUESTINFO_VALUE_MAX_BYTES}"
        total += size + len(key)
    if total > GUESTINFO_TOTAL_MAX_BYTES:
        yield "guestinfo", f"renders to {total} bytes in all; the limit is " \
            f"{GUESTINFO_TOTAL_MAX_BYTES}"


def _secret_source_problems(prefix: str, env_key: str, env_name: str | None, file_key: str,
                            file_name: str | None) -> Iterable[tuple[str, str]]:
    if (env_name is None) == (file_name is None):
        yield f"{prefix}.{env_key}", f"set exactly one of {prefix}.{env_key} and " \
            f"{prefix}.{file_key}"
    elif env_name is not None and not _ENV_NAME.fullmatch(env_name):
        yield f"{prefix}.{env_key}", f"{_show(env_name)} is not an environment variable name"


def _vcenter_problems(vc: VCenterSpec | None) -> Iterable[tuple[str, str]]:
    if vc is None:
        return
    yield from _secret_source_problems("vcenter", "password_env", vc.password_env,
                                       "password_file", vc.password_file)
    trust = [k for k, v in (("ca_file", vc.ca_file), ("thumbprint", vc.thumbprint),
                            ("insecure", vc.insecure or None)) if v is not None]
    if len(trust) > 1:
        yield f"vcenter.{trust[1]}", f"choose one of vcenter.{trust[0]} and vcenter.{trust[1]}"
    if vc.thumbprint is not None and _SHA1_THUMBPRINT.fullmatch(vc.thumbprint):
        yield "vcenter.thumbprint", (f"{_show(vc.thumbprint)} is a SHA-1 fingerprint; pin the "
                                     "certificate's SHA-256 one (64 hex digits)")
    elif vc.thumbprint is not None and not _THUMBPRINT.fullmatch(vc.thumbprint):
        yield "vcenter.thumbprint", (f"{_show(vc.thumbprint)} is not a SHA-256 fingerprint "
                                     "like \"AB:CD:...\" (64 hex digits)")
    if vc.url.startswith("http://") and not vc.insecure:
        yield "vcenter.url", f"{_show(vc.url)} is plain http; set vcenter.insecure = true " \
            "to allow it"


def _network_problems(spec: FleetSpec) -> Iterable[tuple[str, str]]:
    net = spec.network
    if net.refresh == "custom" and not net.command:
        yield "network.command", "is required when network.refresh is \"custom\""
    if net.refresh != "custom" and net.command is not None:
        yield "network.command", f"is only used when network.refresh is \"custom\" " \
            f"(it is {_show(net.refresh)})"
    if net.refresh != "none":
        if not net.guest_user:
            yield "network.guest_user", (f"is required when network.refresh is "
                                         f"{_show(net.refresh)} (guest operations log in); "
                                         "set network.refresh = \"none\" to skip the refresh")
        else:
            yield from _secret_source_problems("network", "guest_password_env",
                                               net.guest_password_env, "guest_password_file",
                                               net.guest_password_file)
    if spec.readiness.wait_for == "guest_ip" and net.disconnect_at_clone and not net.reconnect:
        yield "readiness.wait_for", ("\"guest_ip\" never happens: clones are disconnected at "
                                     "clone time and network.reconnect is false")


def resolve_path(name: str, base: Path) -> Path:
    """A path from a spec or config: ``~`` expanded, relative to ``base`` (its directory)."""
    path = Path(name).expanduser()
    return path if path.is_absolute() else base / path


def _read_secret(key: str, env_name: str | None, file_name: str | None,
                 env: Mapping[str, str], base: Path) -> tuple[SecretStr | None, str | None]:
    """(secret, problem). Messages name the variable or file, never the secret."""
    if env_name is not None:
        value = env.get(env_name)
        if value is None:
            return None, f"environment variable {env_name} is not set"
        if not value:
            return None, f"environment variable {env_name} is empty"
        return SecretStr(value), None
    if file_name is not None:
        path = resolve_path(file_name, base)
        try:
            return SecretStr(read_secret_file(path)), None
        except FileProblem as exc:
            return None, f"cannot read {_show(str(path), PATH_SHOWN)}: {exc.reason}"
    return None, None


def check_ca_file(name: str, base: Path) -> tuple[str | None, str | None]:
    """(resolved path, problem) for a ``ca_file``: a PEM file of certificates, read as
    every user's file is (regular, capped), and parsed once now so a bad one is a
    config error naming the key rather than a failure at connect time."""
    path = resolve_path(name, base)
    try:
        text = decode_utf8(read_user_file(path, PEM_MAX_BYTES))
        loaded = ssl.create_default_context(cadata=text).cert_store_stats()["x509"]
    except FileProblem as exc:
        return None, f"cannot read {_show(str(path), PATH_SHOWN)}: {exc.reason}"
    except (ssl.SSLError, ValueError):
        loaded = 0
    if not loaded:
        return None, f"{_show(str(path), PATH_SHOWN)} holds no PEM certificate"
    return str(path), None


def resolve_vcenter(vc: VCenterSpec, env: Mapping[str, str], base: Path
                    ) -> Iterable[tuple[str, str]]:
    """Read the ``[vcenter]`` password and check its CA file; the problems, if any."""
    which = "password_env" if vc.password_env is not None else "password_file"
    secret, problem = _read_secret(which, vc.password_env, vc.password_file, env, base)
    if problem:
        yield f"vcenter.{which}", problem
    elif secret is not None:
        vc._password = secret
    if vc.ca_file is not None:
        vc._ca_path, problem = check_ca_file(vc.ca_file, base)
        if problem:
            yield "vcenter.ca_file", problem


def _resolve_secrets(spec: FleetSpec, env: Mapping[str, str],
                     base: Path) -> Iterable[tuple[str, str]]:
    if spec.vcenter is not None:
        yield from resolve_vcenter(spec.vcenter, env, base)
    net = spec.network
    if net.refresh != "none" and net.guest_user:
        which = "guest_password_env" if net.guest_password_env is not None \
            else "guest_password_file"
        secret, problem = _read_secret(which, net.guest_password_env, net.guest_password_file,
                                       env, base)
        if problem:
            yield f"network.{which}", problem
        elif secret is not None:
            net._guest_password = secret
