"""Request bodies to fleet specs: parsing, the service's rules, and the errors callers see.

Every problem with a request is an :class:`ApiError` with a 4xx status, a
message and, for bodies, every :class:`Problem` at once (its dotted key, JSON
Pointer, message, and the value sent unless it is a secret), so a caller learns
which fields are wrong in one round trip. Nothing here touches
vCenter: a malformed request never costs a vSphere call (whether its sources
exist is asked afterwards, by ``fleet.api.sources``).

The body of a create request is a fleet spec in JSON, with the TOML spec's keys,
except those the service owns (``vcenter``, ``limits``, ``folder``, and the
guest password's ``*_env``/``*_file``), plus ``ttl_s``; a scale request's is
``count`` and/or ``ttl_s``. Each is judged by the model the API's schema is made
from (``fleet.api.bodies``); a key left out or null takes its default from the
service config's ``[defaults]``, merged underneath, or the spec's. See docs/api.md.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from fleet.api.bodies import LeaseCreate, LeaseExtend, body_models
from fleet.api.config import SECRET_KEYS, SERVICE_KEYS, ServiceConfig, merge
from fleet.engine.spec import FleetSpec, SpecError, is_fleet_name, spec_from_dict
from fleet.engine.spec_checks import SECRETISH
from fleet.engine.spec_model import show

#: longest template (name_template, guestinfo values) accepted, and the widest field:
#: a format spec like {index:0100000000d} would make the validator render gigabytes
MAX_FORMAT_NUMBER = 256
SCALE_KEYS = ("count", "ttl_s")


#: the deepest JSON a body may be (a fleet spec is 4 deep); deeper nests would reach
#: Python's recursion limit in the code that reads them
MAX_DEPTH = 32
#: the largest ``offset`` and ``limit`` a fleet's page takes (GET /v1/fleets/{name})
MAX_OFFSET = 10**9
MAX_LIMIT = 100_000
#: longest string a problem repeats back to the caller
MAX_SHOWN_CHARS = 200
_PLAIN = re.compile(r"[A-Za-z0-9_-]+")
_MISSING = object()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request body."""

    key: str        # dotted, as the spec and config errors name keys: sources[1].name
    message: str
    path: str | None = None   # the same place as a JSON Pointer (RFC 6901): /sources/1/name
    value: Any = _MISSING     # the scalar the body holds there, unless secret or long

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "message": self.message}
        if self.path is not None:
            out["path"] = self.path
        if self.value is not _MISSING:
            out["value"] = self.value
        return out


@dataclass
class ApiError(Exception):
    """A request the service refuses. ``status`` is always a 4xx (or 503)."""

    status: int
    message: str
    problems: tuple[Problem, ...] = ()
    #: seconds, sent as ``Retry-After`` (a 429 or 503 that a retry may pass)
    retry_after: int | None = None
    #: a short, label-safe cause (a lease refused: ``at_max``, ``wait_timeout``...)
    reason: str | None = None

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "message": self.message}
        if self.problems:
            out["problems"] = [p.to_dict() for p in self.problems]
        if self.reason is not None:
            out["reason"] = self.reason
        if self.retry_after is not None:
            out["retry_after_s"] = self.retry_after
        return {"error": out}



def stopping_error() -> ApiError:
    """The refusal of a service that is stopping (its fleets' and pools' alike); the
    error middleware adds its Retry-After."""
    return ApiError(503, "the service is stopping; retry (against it once it is back, or "
                         "another instance)")

def key_parts(key: str) -> list[str | int] | None:
    """A dotted key (``sources[1].name``, ``guestinfo."guestinfo.x"``) as its parts."""
    parts: list[str | int] = []
    i = 0
    decoder = json.JSONDecoder()
    while i < len(key):
        if key[i] == "[":
            end = key.find("]", i)
            if end < 0 or not key[i + 1:end].isdigit():
                return None
            parts.append(int(key[i + 1:end]))
            i = end + 1
            continue
        if parts:
            if key[i] != ".":
                return None
            i += 1
        if key.startswith('"', i):
            try:
                part, i = decoder.raw_decode(key, i)
            except ValueError:
                return None
            if not isinstance(part, str):
                return None
            parts.append(part)
            continue
        m = _PLAIN.match(key, i)
        if m is None:
            return None
        parts.append(m.group())
        i = m.end()
    return parts


def _pointer(parts: list[str | int]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _secret(parts: list[str | int]) -> bool:
    names = [p for p in parts if isinstance(p, str)]
    return any(SECRETISH.search(n) for n in names) and not (
        names and names[-1].endswith(("_env", "_file")))


def _value_at(body: Any, parts: list[str | int]) -> Any:
    for part in parts:
        if isinstance(body, list) and isinstance(part, int):
            found = part < len(body)
        else:
            found = isinstance(body, dict) and part in body
        if not found:
            return _MISSING
        body = body[part]
    return body


def problem(key: str, message: str, body: Any = _MISSING) -> Problem:
    """A problem at ``key``, with the value ``body`` holds there when it may be shown."""
    parts = key_parts(key)
    if parts is None:
        return Problem(key, message)
    value = _MISSING if body is _MISSING or _secret(parts) else _value_at(body, parts)
    # Scalars only: a table or list could hold a secret under a key of its own.
    if not isinstance(value, str | int | float | bool | None) or (
            isinstance(value, str) and len(value) > MAX_SHOWN_CHARS):
        value = _MISSING
    return Problem(key, message, _pointer(parts), value)


def invalid(problems: list[tuple[str, str]], body: Any = _MISSING) -> ApiError:
    """422 listing every problem; values are looked up in ``body`` (as the caller sent it)."""
    first = "; ".join(f"{k}: {m}" if k else m for k, m in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return ApiError(422, f"invalid request body: {first}{more}",
                    tuple(problem(k, m, body) for k, m in problems))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _too_deep(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:  # not recursive: the point is to refuse what recursion cannot take
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_json(raw: bytes) -> Any:
    """Strict JSON (no NaN/Infinity, UTF-8, at most MAX_DEPTH deep); 400 otherwise."""
    try:
        text = raw.decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8") from None
    except RecursionError:
        data = None
        too_deep = True
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    else:
        too_deep = _too_deep(data)
    if too_deep:
        raise ApiError(400, f"the body nests arrays and objects deeper than {MAX_DEPTH} levels")
    return data


def valid_name(name: str) -> bool:
    return is_fleet_name(name)


def _template_problems(key: str, template: object) -> list[tuple[str, str]]:
    if not isinstance(template, str):
        return []  # the spec validator names the wrong type
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return []  # the spec validator explains malformed templates
    for _, field, spec, _ in parsed:
        if field is None or not spec:
            continue
        if "{" in spec or "}" in spec:
            return [(key, f"{show(template)} nests a field in a format spec; "
                          "give widths as numbers")]
        numbers = [int(n) for n in re.findall(r"\d+", spec)]
        if any(n > MAX_FORMAT_NUMBER for n in numbers):
            return [(key, f"{show(template)} asks for a field wider than "
                          f"{MAX_FORMAT_NUMBER} characters")]
    return []


def _service_key_problems(body: Mapping[str, Any], config: ServiceConfig
                          ) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if "vcenter" in body:
        problems.append(("vcenter", "the service owns the vCenter connection; leave vcenter "
                                    "out"))
    if "limits" in body:
        problems.append(("limits", "every fleet shares the service's [limits]; leave limits "
                                   "out"))
    if "folder" in body:
        problems.append(("folder", f"every fleet lives in {config.root_folder}/<name>; "
                                   "leave folder out"))
    network = body.get("network")
    if isinstance(network, Mapping):
        for key in SECRET_KEYS:
            if key in network:
                problems.append((f"network.{key}", "guest passwords come from the service's "
                                 "[defaults.network], never from a request"))
    if "name_template" in body:
        problems.extend(_template_problems("name_template", body["name_template"]))
    guestinfo = body.get("guestinfo")
    if isinstance(guestinfo, Mapping):
        for k, v in guestinfo.items():
            problems.extend(_template_problems(f"guestinfo.{json.dumps(k)}", v))
    return problems


@dataclass(frozen=True)
class FleetRequest:
    """A validated create/scale request."""

    spec: FleetSpec
    data: dict[str, Any]  # the effective spec (defaults merged, folder set), as JSON data
    ttl_s: float | None


def fleet_request(body: Any, config: ServiceConfig, *, name: str | None = None
                  ) -> FleetRequest:
    """Validate a create body. ``name`` is the fleet named in the URL (a PUT), if any.

    The body is judged by its model (``fleet.api.bodies``: the one the API's schema
    describes), then merged over the service's ``[defaults]`` (a key left out or null
    takes its default) and judged as a whole spec. Every problem of a stage is
    reported at once (422), each at its key."""
    if not isinstance(body, dict):
        raise invalid([("", "the body must be a JSON object (a fleet spec)")])
    models = body_models(config)
    problems = _service_key_problems(body, config)
    if name is not None and body.get("name") not in (None, name):
        problems.append(("name", f"{show(body['name'])} differs from the fleet in the URL "
                                 f"({show(name)})"))
    # The rest of the body is judged without the keys already refused.
    judged = {k: v for k, v in body.items() if k not in SERVICE_KEYS}
    if isinstance(judged.get("network"), Mapping):
        judged["network"] = {k: v for k, v in judged["network"].items()
                             if k not in SECRET_KEYS}
    for key in ("name_template", "guestinfo"):
        if any(k == key or k.startswith(f"{key}.") for k, _ in problems):
            judged.pop(key, None)
    if name is not None:
        judged.pop("name", None)
    try:
        parsed = (models.put if name is not None else models.create).model_validate(judged)
    except ValidationError as exc:
        problems.extend(models.problems(exc))
    if problems:
        raise invalid(problems, body)
    given = parsed.model_dump(exclude_none=True)
    ttl_s = given.pop("ttl_s", None)
    if "sources" in given:  # as the spec writes them: a source with no table of its own
        given["sources"] = [s["name"] if set(s) == {"name"} else s for s in given["sources"]]
    if name is not None:
        given["name"] = name
    data = merge(config.defaults, given)
    data["folder"] = config.fleet_folder(data["name"])
    try:
        spec = spec_from_dict(data, source="request body", env=config.env,
                              base_dir=config.base_dir)
    except SpecError as exc:
        raise invalid(exc.problems, body) from None
    return FleetRequest(spec, data, ttl_s)


def scale_request(body: Any, current: Mapping[str, Any], config: ServiceConfig
                  ) -> FleetRequest:
    """A PATCH body: ``count`` and/or ``ttl_s`` applied to the fleet's current spec (a
    key left out or null keeps its value).

    Every problem is reported at once (422), each at its key."""
    if not isinstance(body, dict):
        raise invalid([("", "the body must be a JSON object like {\"count\": 10}")])
    models = body_models(config)
    problems = [(k, "unknown key (a scale request takes count and ttl_s; PUT the whole spec "
                    "to change more)") for k in sorted(set(body) - set(SCALE_KEYS))]
    try:
        parsed = models.scale.model_validate({k: v for k, v in body.items()
                                              if k in SCALE_KEYS} if problems else body)
    except ValidationError as exc:
        problems.extend(models.problems(exc))
    if problems:
        raise invalid(problems, body)
    given = parsed.model_dump(exclude_none=True)
    data = dict(current)
    if "count" in given:
        data["count"] = given["count"]
    try:
        spec = spec_from_dict(data, source="request body", env=config.env,
                              base_dir=config.base_dir)
    except SpecError as exc:
        # The current spec was valid: what is wrong now came from this body.
        raise invalid(exc.problems, body) from None
    return FleetRequest(spec, data, given.get("ttl_s"))


def lease_request(body: Any, config: ServiceConfig) -> tuple[float | None, float | None]:
    """A lease request's ``(ttl_s, wait_s)``; None: the pool's. 422 naming each problem."""
    return _lease_body(LeaseCreate, body, config, '{"ttl_s": 3600, "wait_s": 30}')


def extend_request(body: Any, config: ServiceConfig) -> float:
    """A lease extension's ``ttl_s``. 422 naming each problem."""
    ttl, _ = _lease_body(LeaseExtend, body, config, '{"ttl_s": 3600}')
    assert ttl is not None
    return ttl


def _lease_body(model: type[LeaseCreate] | type[LeaseExtend], body: Any,
                config: ServiceConfig, example: str) -> tuple[float | None, float | None]:
    if not isinstance(body, dict):
        raise invalid([("", f"the body must be a JSON object like {example}")])
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        raise invalid(body_models(config).problems(exc), body) from None
    return parsed.ttl_s, getattr(parsed, "wait_s", None)
