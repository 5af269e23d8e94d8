"""The spec's rules between keys, and what it names outside itself (secrets, CA files).

A :class:`~fleet.engine.spec_model.FleetSpec` that pydantic accepted key by key is
checked here as a whole: templates render unique, valid VM names; guestinfo stays
inside vSphere's sizes and off fleet's own labels; the trust and secret keys are
consistent (:func:`semantic_problems`). Then the secrets and the CA file it names are
read (:func:`resolve_secrets`). Each check yields ``(dotted key, message)`` problems
rather than raising, so one :class:`~fleet.engine.spec_model.SpecError` lists them
all; :func:`pydantic_problems` words pydantic's own errors the same way. The
service's config (``fleet.api.config``) runs the ``[vcenter]`` checks too.
"""

from __future__ import annotations

import json
import re
import ssl
import string
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import SecretStr, ValidationError

from fleet.engine.spec_model import (
    GUESTINFO_FIELDS,
    GUESTINFO_KEY_MAX,
    GUESTINFO_TOTAL_MAX_BYTES,
    GUESTINFO_VALUE_MAX_BYTES,
    LABEL_PREFIX,
    MAX_VM_NAME,
    NAME_FIELDS,
    PATH_SHOWN,
    FleetSpec,
    VCenterSpec,
    show,
)
from fleet.files import PEM_MAX_BYTES, FileProblem, decode_utf8, read_secret_file, read_user_file

_GUESTINFO_KEY = re.compile(r"^guestinfo\.[A-Za-z0-9_.-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: SHA-256, as the client pins it (with or without colons); SHA-1 is refused there too
_THUMBPRINT = re.compile(r"([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}|[0-9A-Fa-f]{64}")
_SHA1_THUMBPRINT = re.compile(r"([0-9A-Fa-f]{2}:){19}[0-9A-Fa-f]{2}|[0-9A-Fa-f]{40}")
#: characters vSphere escapes in names (%2f, %5c, %25): a name with them is not what you asked
_NAME_BAD_CHARS = ("/", "\\", "%")
SECRETISH = re.compile(r"pass|secret|token|key", re.IGNORECASE)


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


def pydantic_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """pydantic's errors as (dotted key, message) problems, in fleet's words; secret
    values are never shown."""
    problems: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        key = _dotted(err["loc"])
        kind = err["type"]
        value = err.get("input")
        secret = bool(SECRETISH.search(key)) and not key.endswith(("_env", "_file"))
        shown = "(value hidden)" if secret else show(value)
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
        return f"{show(path)} is not a folder path like {show(example)}"
    for part in path.strip("/").split("/"):
        problem = "is not a folder name (a folder path has no \".\" or \"..\" steps)" \
            if part in (".", "..") else _name_problem(part)
        if problem:
            return f"{show(path)}: the folder name {show(part)} {problem}"
    return None


#: a name with none of the characters ``_name_problem`` looks for (checked first: a
#: spec's every member name is checked, 10,000 of them for a large fleet)
_PLAIN_NAME = re.compile(r"[^/\\%\x00-\x1f\x7f]+")


def _name_problem(name: str) -> str | None:
    if name and len(name) <= MAX_VM_NAME and _PLAIN_NAME.fullmatch(name) \
            and name == name.strip():
        return None
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


def semantic_problems(spec: FleetSpec) -> Iterable[tuple[str, str]]:
    """What is wrong with a spec pydantic accepted: the rules between its keys."""
    yield from _template_problems(spec)
    yield from _guestinfo_problems(spec)
    first: dict[str, int] = {}
    for i, source in enumerate(spec.sources):
        name = source.name
        if name in first:
            yield f"sources[{i}]", f"{show(name)} is listed twice"
        elif any(ord(c) < 32 or ord(c) == 127 for c in name):
            yield f"sources[{i}]", f"{show(name)} contains control characters"
        first.setdefault(name, i)
    if spec.retries.backoff_max_s < spec.retries.backoff_base_s:
        yield ("retries.backoff_max_s", f"{spec.retries.backoff_max_s} is below "
               f"retries.backoff_base_s ({spec.retries.backoff_base_s})")
    if spec.folder is not None:
        problem = folder_problem(spec.folder, "fleet/loadtest")
        if problem:
            yield "folder", problem
    yield from vcenter_problems(spec.vcenter)
    yield from _network_problems(spec)
    r = spec.readiness
    if r.wait_for == "guestinfo" and not _GUESTINFO_KEY.fullmatch(r.guestinfo_key):
        yield ("readiness.guestinfo_key",
               f"{show(r.guestinfo_key)} must start with \"guestinfo.\" (letters, digits, ._-)")


def _template_problems(spec: FleetSpec) -> Iterable[tuple[str, str]]:
    template = spec.name_template
    try:
        fields = _fields(template, MAX_VM_NAME)
    except ValueError as exc:
        yield "name_template", f"{show(template)} is not a valid template: {exc}"
        return
    unknown = sorted(set(fields) - NAME_FIELDS)
    if unknown:
        yield ("name_template", f"{show(template)} uses {{{unknown[0]}}}; "
               "only {index} and {fleet} are known")
        return
    if "index" not in fields and spec.count > 1:
        yield "name_template", f"{show(template)} has no {{index}}, so every name is the same"
        return
    seen: dict[str, int] = {}
    for index in range(spec.count):
        try:
            name = template.format(index=index, fleet=spec.name)
        except _FORMAT_ERRORS as exc:
            yield "name_template", f"{show(template)} is not a valid template: {exc}"
            return
        problem = _name_problem(name)
        if problem:
            yield ("name_template",
                   f"{show(template)} gives {show(name)} (index {index}), which {problem}")
            return
        if name in seen:
            yield ("name_template", f"{show(template)} gives {show(name)} for indexes "
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
            yield where, (f"{show(key)} must start with \"guestinfo.\" and use only letters, "
                          "digits, '.', '_' and '-'")
            continue
        if key.startswith(LABEL_PREFIX) or key == LABEL_PREFIX.rstrip("."):
            yield where, f"{show(key)} is reserved for fleet's own labels"
            continue
        if len(key) > GUESTINFO_KEY_MAX:
            yield where, f"{show(key)} is longer than {GUESTINFO_KEY_MAX} characters"
            continue
        try:
            unknown = sorted(set(_fields(template, GUESTINFO_VALUE_MAX_BYTES))
                             - GUESTINFO_FIELDS)
            if unknown:
                yield where, (f"{show(template)} uses {{{unknown[0]}}}; known fields are "
                              + ", ".join(f"{{{f}}}" for f in sorted(GUESTINFO_FIELDS)))
                continue
            size = len(template.format(**sample).encode())
        except _FORMAT_ERRORS as exc:
            yield where, f"{show(template)} is not a valid template: {exc}"
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
        yield f"{prefix}.{env_key}", f"{show(env_name)} is not an environment variable name"


def vcenter_problems(vc: VCenterSpec | None) -> Iterable[tuple[str, str]]:
    """A ``[vcenter]`` table's rules: one password source, at most one way of trusting
    the server, a SHA-256 thumbprint, no plain http unless insecure."""
    if vc is None:
        return
    yield from _secret_source_problems("vcenter", "password_env", vc.password_env,
                                       "password_file", vc.password_file)
    trust = [k for k, v in (("ca_file", vc.ca_file), ("thumbprint", vc.thumbprint),
                            ("insecure", vc.insecure or None)) if v is not None]
    if len(trust) > 1:
        yield f"vcenter.{trust[1]}", f"choose one of vcenter.{trust[0]} and vcenter.{trust[1]}"
    problem = thumbprint_problem(vc.thumbprint) if vc.thumbprint is not None else None
    if problem:
        yield "vcenter.thumbprint", problem
    if vc.url.startswith("http://") and not vc.insecure:
        yield "vcenter.url", f"{show(vc.url)} is plain http; set vcenter.insecure = true " \
            "to allow it"


def thumbprint_problem(thumbprint: str) -> str | None:
    """Why ``thumbprint`` is not a SHA-256 certificate fingerprint fleet can pin, or None."""
    if _SHA1_THUMBPRINT.fullmatch(thumbprint):
        return (f"{show(thumbprint)} is a SHA-1 fingerprint; pin the certificate's SHA-256 "
                "one (64 hex digits)")
    if not _THUMBPRINT.fullmatch(thumbprint):
        return (f"{show(thumbprint)} is not a SHA-256 fingerprint like \"AB:CD:...\" "
                "(64 hex digits)")
    return None


def _network_problems(spec: FleetSpec) -> Iterable[tuple[str, str]]:
    net = spec.network
    if net.refresh == "custom" and not net.command:
        yield "network.command", "is required when network.refresh is \"custom\""
    if net.refresh != "custom" and net.command is not None:
        yield "network.command", f"is only used when network.refresh is \"custom\" " \
            f"(it is {show(net.refresh)})"
    if net.refresh != "none":
        if not net.guest_user:
            yield "network.guest_user", (f"is required when network.refresh is "
                                         f"{show(net.refresh)} (guest operations log in); "
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


def read_secret(key: str, env_name: str | None, file_name: str | None,
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
            return None, f"cannot read {show(str(path), PATH_SHOWN)}: {exc.reason}"
    return None, None


def check_ca_file(name: str, base: Path) -> tuple[str | None, str | None]:
    """(resolved path, problem) for a ``ca_file``: a PEM file of certificates, read as
    every user's file is (regular, capped), and parsed once now so a bad one is a
    config error naming the key rather than a failure at connect time."""
    path = resolve_path(name, base)
    try:
        text = decode_utf8(read_user_file(path, PEM_MAX_BYTES))
        # An empty cadata is no cadata to ssl.create_default_context, which then loads
        # the system's CAs: an empty file would pass as certificates, and trust them all.
        loaded = ssl.create_default_context(cadata=text).cert_store_stats()["x509"] \
            if text.strip() else 0
    except FileProblem as exc:
        return None, f"cannot read {show(str(path), PATH_SHOWN)}: {exc.reason}"
    except (ssl.SSLError, ValueError):
        loaded = 0
    if not loaded:
        return None, f"{show(str(path), PATH_SHOWN)} holds no PEM certificate"
    return str(path), None


def check_ca_files(names: list[str], base: Path) -> tuple[tuple[str, ...], str | None]:
    """(resolved paths, first problem) for CA files, each checked as :func:`check_ca_file`."""
    paths: list[str] = []
    for name in names:
        path, problem = check_ca_file(name, base)
        if problem:
            return (), problem
        assert path is not None
        paths.append(path)
    return tuple(paths), None


def resolve_vcenter(vc: VCenterSpec, env: Mapping[str, str], base: Path
                    ) -> Iterable[tuple[str, str]]:
    """Read the ``[vcenter]`` password and check its CA file; the problems, if any."""
    which = "password_env" if vc.password_env is not None else "password_file"
    secret, problem = read_secret(which, vc.password_env, vc.password_file, env, base)
    if problem:
        yield f"vcenter.{which}", problem
    elif secret is not None:
        vc._password = secret
    if vc.ca_file is not None:
        vc._ca_paths, problem = check_ca_files([vc.ca_file], base)
        if problem:
            yield "vcenter.ca_file", problem


def resolve_secrets(spec: FleetSpec, env: Mapping[str, str],
                    base: Path) -> Iterable[tuple[str, str]]:
    """Read the secrets and the CA file the spec names into it; the problems, if any."""
    if spec.vcenter is not None:
        yield from resolve_vcenter(spec.vcenter, env, base)
    net = spec.network
    if net.refresh != "none" and net.guest_user:
        which = "guest_password_env" if net.guest_password_env is not None \
            else "guest_password_file"
        secret, problem = read_secret(which, net.guest_password_env, net.guest_password_file,
                                      env, base)
        if problem:
            yield f"network.{which}", problem
        elif secret is not None:
            net._guest_password = secret
