"""Request bodies to fleet specs: parsing, the service's rules, and the errors callers see.

Every problem with a request is an :class:`ApiError` with a 4xx status, a
message and, for bodies, the list of (dotted key, message) the spec validator
produced, so a caller learns which field is wrong. Nothing here touches
vCenter: a bad request never costs a vSphere call.

The body of a create or scale request is a fleet spec in JSON, with the TOML
spec's keys, except those the service owns (``vcenter``, ``limits``,
``folder``, and the guest password's ``*_env``/``*_file``), plus ``ttl_s``.
The service config's ``[defaults]`` are merged underneath it.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleet.api.config import SECRET_KEYS, SERVICE_KEYS, ServiceConfig, merge
from fleet.engine.lifetime import MAX_TTL_S
from fleet.engine.spec import FleetSpec, SpecError, _show, is_fleet_name, spec_from_dict

#: longest template (name_template, guestinfo values) accepted, and the widest field:
#: a format spec like {index:0100000000d} would make the validator render gigabytes
MAX_FORMAT_NUMBER = 256
SCALE_KEYS = ("count", "ttl_s")


@dataclass
class ApiError(Exception):
    """A request the service refuses. ``status`` is always a 4xx (or 503)."""

    status: int
    message: str
    problems: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "message": self.message}
        if self.problems:
            out["problems"] = [{"key": k, "message": m} for k, m in self.problems]
        return {"error": out}


def invalid(problems: list[tuple[str, str]]) -> ApiError:
    first = "; ".join(f"{k}: {m}" if k else m for k, m in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return ApiError(422, f"invalid request body: {first}{more}", tuple(problems))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """Strict JSON (no NaN/Infinity, UTF-8); 400 otherwise."""
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None


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
            return [(key, f"{_show(template)} nests a field in a format spec; "
                          "give widths as numbers")]
        numbers = [int(n) for n in re.findall(r"\d+", spec)]
        if any(n > MAX_FORMAT_NUMBER for n in numbers):
            return [(key, f"{_show(template)} asks for a field wider than "
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


def parse_ttl(value: object, key: str = "ttl_s") -> float | None:
    """``ttl_s`` from a body: None (absent or null) or seconds in (0, MAX_TTL_S]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid([(key, f"{_show(value)} must be a number of seconds")])
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise invalid([(key, f"{_show(value)} must be above 0")])
    if seconds > MAX_TTL_S:
        raise invalid([(key, f"{_show(value)} is above {MAX_TTL_S:g} (366 days); leave ttl_s "
                             "out for a fleet that lives until it is destroyed")])
    return seconds


@dataclass(frozen=True)
class FleetRequest:
    """A validated create/scale request."""

    spec: FleetSpec
    data: dict[str, Any]  # the effective spec (defaults merged, folder set), as JSON data
    ttl_s: float | None


def fleet_request(body: Any, config: ServiceConfig, *, name: str | None = None
                  ) -> FleetRequest:
    """Validate a create/scale body. ``name`` is the fleet named in the URL, if any."""
    if not isinstance(body, dict):
        raise invalid([("", "the body must be a JSON object (a fleet spec)")])
    body = dict(body)
    ttl_s = parse_ttl(body.pop("ttl_s", None))
    if name is not None:
        if "name" in body and body["name"] != name:
            raise invalid([("name", f"{_show(body['name'])} differs from the fleet in the URL "
                                    f"({_show(name)})")])
        body["name"] = name
    problems = _service_key_problems(body, config)
    if problems:
        # Report the rest of the body's problems too, judged without the refused keys.
        body = {k: v for k, v in body.items() if k not in SERVICE_KEYS}
        if isinstance(body.get("network"), Mapping):
            body["network"] = {k: v for k, v in body["network"].items()
                               if k not in SECRET_KEYS}
        for key in ("name_template", "guestinfo"):
            if any(k == key or k.startswith(f"{key}.") for k, _ in problems):
                body.pop(key, None)
    fleet = body.get("name")
    data = merge(config.defaults, body)
    if isinstance(fleet, str) and valid_name(fleet):
        data["folder"] = config.fleet_folder(fleet)
    count = data.get("count")
    if isinstance(count, int) and not isinstance(count, bool) and count > config.max_count:
        problems.append(("count", f"{count} is above this service's max_count of "
                                  f"{config.max_count}"))
        data["count"] = 0
    try:
        spec = spec_from_dict(data, source="request body", env=config.env,
                              base_dir=config.base_dir)
    except SpecError as exc:
        problems.extend(exc.problems)
    if problems:
        raise invalid(problems)
    return FleetRequest(spec, data, ttl_s)


def scale_request(body: Any, current: Mapping[str, Any], config: ServiceConfig
                  ) -> FleetRequest:
    """A PATCH body: ``count`` and/or ``ttl_s`` applied to the fleet's current spec."""
    if not isinstance(body, dict):
        raise invalid([("", "the body must be a JSON object like {\"count\": 10}")])
    unknown = sorted(set(body) - set(SCALE_KEYS))
    if unknown:
        raise invalid([(k, "unknown key (a scale request takes count and ttl_s; PUT the "
                           "whole spec to change more)") for k in unknown])
    if not body:
        raise invalid([("", "give count, ttl_s or both")])
    ttl_s = parse_ttl(body.get("ttl_s"))
    data = dict(current)
    if "count" in body:
        count = body["count"]
        if isinstance(count, int) and not isinstance(count, bool) and count > config.max_count:
            raise invalid([("count", f"{count} is above this service's max_count of "
                                     f"{config.max_count}")])
        data["count"] = count
    try:
        spec = spec_from_dict(data, source="request body", env=config.env,
                              base_dir=config.base_dir)
    except SpecError as exc:
        raise invalid(list(exc.problems)) from None
    return FleetRequest(spec, data, ttl_s)
