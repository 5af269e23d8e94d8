"""The request bodies' models: what the service validates a body with, and what
``GET /v1/openapi.json`` says a body is (their ``model_json_schema``), one and the same.

A create body (``POST /v1/fleets``, ``PUT /v1/fleets/{name}``) is a fleet spec's
keys as JSON, so its models are derived from the spec's own
(``fleet.engine.spec_model``), key by key, with what a request changes:

- the keys the service owns (``vcenter``, ``limits``, ``folder``, the guest
  password's ``*_env``/``*_file``) are not there; ``ttl_s`` is;
- every key the spec or the service's ``[defaults]`` has a default for may be left
  out or sent as ``null``: either way the default holds (the request is merged
  over ``[defaults]`` key by key, then over the spec's defaults). So ``sources``
  and ``count`` are required only when ``[defaults]`` lacks them, and ``name``
  only in a ``POST`` (a ``PUT`` takes it from the URL);
- the service's own limits apply: ``count`` is at most ``max_count``;
- a number with nothing after the point is a whole number where one is
  wanted: JSON (and JSON Schema's ``integer``) does not tell ``4.0`` from ``4``.

The spec's validators run here too, so each key is judged in one round trip, and
what JSON Schema can say of them is in the schema (:data:`_SCHEMA_OF_CHECKS`).
Rules between keys (a name template must give unique names...) and whether the
sources exist are judged after the merge (``fleet.api.requests``,
``fleet.api.sources``): no schema can say them. See docs/api.md.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Annotated, Any, Union, get_args, get_origin

from annotated_types import Le
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic.json_schema import models_json_schema

from fleet.api.config import MAX_POOL_TTL_S, MAX_WAIT_S, SECRET_KEYS, SERVICE_KEYS, ServiceConfig
from fleet.engine.lifetime import MAX_TTL_S
from fleet.engine.spec import (
    GUESTINFO_KEY_MAX,
    GUESTINFO_MAX_KEYS,
    LABEL_PREFIX,
    MAX_SOURCES,
    VSPHERE_CHAIN_LIMIT,
    FleetSpec,
    NetworkSpec,
    SourceSpec,
)
from fleet.engine.spec_checks import pydantic_problems
from fleet.engine.spec_model import (
    _FLEET_NAME,  # the very rule FleetSpec.name checks
    show,
)

#: a fleet's name, as the URL's ``{name}`` and the body's ``name`` take it
NAME_PATTERN = f"^{_FLEET_NAME.pattern}$"
_GUESTINFO_KEY_PATTERN = r"^guestinfo\.[A-Za-z0-9_.-]+$"
_RESERVED_LABELS = "^" + LABEL_PREFIX.rstrip(".").replace(".", r"\.") + r"(\..*)?$"


def _sources_schema(schema: dict[str, Any]) -> None:
    schema["maxItems"] = MAX_SOURCES
    # FleetSpec's `sources` validator takes a bare name or inventory path for a table.
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "array":
            branch["items"] = {"anyOf": [{"type": "string", "minLength": 1},
                                         branch["items"]]}


#: What the spec models' validators (and its per-key rules) check, as JSON Schema says
#: it; the checks themselves run as well, with their own words.
_SCHEMA_OF_CHECKS: dict[tuple[type[BaseModel], str], Any] = {
    (FleetSpec, "name"): {"pattern": NAME_PATTERN},
    (FleetSpec, "chain_budget"): {"maximum": VSPHERE_CHAIN_LIMIT},
    (SourceSpec, "chain_budget"): {"maximum": VSPHERE_CHAIN_LIMIT},
    (FleetSpec, "sources"): _sources_schema,
    (FleetSpec, "guestinfo"): {"maxProperties": GUESTINFO_MAX_KEYS, "propertyNames": {
        "pattern": _GUESTINFO_KEY_PATTERN, "maxLength": GUESTINFO_KEY_MAX,
        "not": {"pattern": _RESERVED_LABELS}}},
}
#: keys of the spec's tables a request may not set (the service owns them)
_LEFT_OUT: dict[type[BaseModel], tuple[str, ...]] = {FleetSpec: SERVICE_KEYS,
                                                      NetworkSpec: SECRET_KEYS}


class _Body(BaseModel):
    # As the spec's models: unknown keys are errors, no coercion, no inf/nan.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _whole(value: object) -> object:
    """4.0 -> 4: a JSON number is a whole number when nothing follows its point."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _unless_null(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: value if value is None else check(value)


def _body_type(annotation: Any) -> tuple[Any, list[Any]]:
    """The request's type for a spec key's type, and validators to apply around it."""
    if annotation is int:
        return int, [BeforeValidator(_whole)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _table(annotation), []
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:  # null is allowed anyway (it means the default)
            return _body_type(rest[0])
    if origin is list:
        return list[_annotated(*_body_type(args[0]))], []  # type: ignore[misc]
    if origin is dict:
        key, value = args
        return dict[key, _annotated(*_body_type(value))], []  # type: ignore[misc,valid-type]
    return annotation, []


def _annotated(tp: Any, extra: list[Any]) -> Any:
    return Annotated[tp, *extra] if extra else tp


def _capped(metadata: list[Any], maximum: int) -> list[Any]:
    """A field's constraints with its upper bound replaced by the service's own."""
    return [m for m in metadata if not isinstance(m, Le)] + [Le(maximum)]


def _fields(model: type[BaseModel], *, required: Callable[[str], bool],
            limits: Mapping[str, int] | None = None) -> dict[str, Any]:
    """pydantic field definitions for a request's version of the spec table ``model``."""
    decorators = model.__pydantic_decorators__.field_validators.values()
    fields: dict[str, Any] = {}
    for key, info in model.model_fields.items():
        if key in _LEFT_OUT.get(model, ()):
            continue
        tp, wrappers = _body_type(info.annotation)
        metadata = list(info.metadata)
        if limits and key in limits:
            metadata = _capped(metadata, limits[key])
        # The spec's validators of this key (a null never reaches them: it is no value).
        for dec in decorators:
            if key in dec.info.fields and dec.info.mode in ("before", "after"):
                kind = BeforeValidator if dec.info.mode == "before" else AfterValidator
                wrappers.append(kind(_unless_null(dec.func)))
        # Constraints first, so they show in the schema; validators wrap them.
        tp = _annotated(tp, metadata + wrappers)
        extra = _SCHEMA_OF_CHECKS.get((model, key))
        title = info.title or key.replace("_", " ").title()
        if required(key):
            fields[key] = (tp, Field(title=title, json_schema_extra=extra))
        else:
            fields[key] = (tp | None, Field(default=None, title=title,
                                            json_schema_extra=extra))
    return fields


@cache
def _table(model: type[BaseModel]) -> type[BaseModel]:
    """A spec table as a request sends it: its required keys stay required, the rest
    may be left out or null."""
    fields = _fields(model, required=lambda key: model.model_fields[key].is_required())
    out: type[BaseModel] = create_model(model.__name__, __base__=_Body,
                                        __doc__=model.__doc__, **fields)
    return out


def _ttl(value: float | None) -> float | None:
    if value is not None and value > MAX_TTL_S:
        raise ValueError(f"{show(value)} is above {MAX_TTL_S:.0f} (366 days); leave ttl_s out "
                         "for a fleet that lives until it is destroyed")
    return value


#: ``ttl_s``: seconds from this request; null or absent keeps the fleet's expiry, if any
Ttl = Annotated[float, Field(gt=0, json_schema_extra={"maximum": MAX_TTL_S}),
                AfterValidator(_ttl)]
_TTL_DESCRIPTION = ("Lifetime in seconds from this request; the service destroys the fleet "
                    "when it ends (also across restarts). Absent or null: keep the fleet's "
                    "current expiry, if any.")


class LeaseCreate(_Body):
    """A lease request (docs/pools.md). Both keys are optional; an empty body (or none)
    takes the pool's lease_ttl_s and wait_s."""

    ttl_s: float | None = Field(default=None, gt=0, le=MAX_POOL_TTL_S, title="Ttl S",
                                description="The lease's lifetime in seconds, at most the "
                                            "pool's max_lease_ttl_s; absent or null: the "
                                            "pool's lease_ttl_s.")
    wait_s: float | None = Field(default=None, ge=0, le=MAX_WAIT_S, title="Wait S",
                                 description="How long to wait for a member when none is "
                                             "idle (0: answer at once); absent or null: "
                                             "the pool's wait_s.")


class LeaseExtend(_Body):
    """A lease's new lifetime: it ends ``ttl_s`` seconds from this request, within its
    pool's max_lease_ttl_s counted from the grant."""

    ttl_s: float = Field(gt=0, le=MAX_POOL_TTL_S, title="Ttl S")


@dataclass(frozen=True)
class BodyModels:
    """The request models of one service config (its ``max_count`` and ``[defaults]``)."""

    create: type[BaseModel]   # POST /v1/fleets
    put: type[BaseModel]      # PUT /v1/fleets/{name}: as create, the name optional
    scale: type[BaseModel]    # PATCH /v1/fleets/{name}
    max_count: int

    def schemas(self, ref_template: str) -> dict[str, Any]:
        """Every model's JSON Schema (validation mode), by name, refs to each other."""
        _, top = models_json_schema([(m, "validation") for m in
                                     (self.create, self.put, self.scale, LeaseCreate,
                                      LeaseExtend)],
                                    ref_template=ref_template)
        defs: dict[str, Any] = top["$defs"]
        return defs

    def problems(self, exc: ValidationError) -> list[tuple[str, str]]:
        """A body model's errors as (dotted key, message), in the spec's words."""
        out = []
        for err, (key, message) in zip(exc.errors(include_url=False), pydantic_problems(exc),
                                       strict=True):
            if err["type"] == "less_than_equal" and key == "count":
                message = (f"{show(err.get('input'))} is above this service's max_count of "
                           f"{self.max_count}")
            elif err.get("input", "") is None and err["type"] != "missing" and \
                    isinstance(err["loc"][-1], str):
                message = "has no default, so it cannot be null: give a value"
            out.append((key, message))
        return out


def _create_model(max_count: int, defaults: frozenset[str], *, put: bool
                  ) -> type[BaseModel]:
    given = set(defaults)
    if put:
        given.add("name")

    def required(key: str) -> bool:
        return FleetSpec.model_fields[key].is_required() and key not in given

    fields = _fields(FleetSpec, required=required, limits={"count": max_count})
    fields["ttl_s"] = (Ttl | None, Field(default=None, title="Ttl S",
                                         description=_TTL_DESCRIPTION))
    doc = ("A fleet spec: the TOML spec's keys as JSON, without vcenter, limits, folder and "
           "the guest password's *_env/*_file (the service owns them), plus ttl_s. The "
           "service's [defaults] are merged underneath, table by table: a key left out or "
           "null takes its default. Unknown keys are errors.")
    if put:
        doc += " The name comes from the URL; a name in the body must be the same."
    model: type[BaseModel] = create_model("FleetSpecPut" if put else "FleetSpec",
                                          __base__=_Body, __doc__=doc, **fields)
    return model


class _ScaleBase(_Body):
    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    @model_validator(mode="before")
    @classmethod
    def _something(cls, data: object) -> object:
        if isinstance(data, dict) and not data:
            raise ValueError("give count, ttl_s or both")
        return data


def _scale_model(max_count: int) -> type[BaseModel]:
    metadata = _capped(FleetSpec.model_fields["count"].metadata, max_count)
    model: type[BaseModel] = create_model(
        "Scale", __base__=_ScaleBase,
        __doc__="A new count and/or lifetime for a fleet; the rest of its spec stays. A key "
                "left out or null keeps the fleet's current value.",
        count=(Annotated[int, *metadata, BeforeValidator(_whole)] | None,
               Field(default=None, title="Count")),
        ttl_s=(Ttl | None, Field(default=None, title="Ttl S", description=_TTL_DESCRIPTION)))
    return model


def body_models(config: ServiceConfig) -> BodyModels:
    """The request models for ``config``: they depend on its ``max_count`` and on which
    keys its ``[defaults]`` give (made once for each)."""
    return _body_models(config.max_count, frozenset(config.defaults))


@lru_cache(maxsize=32)
def _body_models(max_count: int, defaults: frozenset[str]) -> BodyModels:
    return BodyModels(_create_model(max_count, defaults, put=False),
                      _create_model(max_count, defaults, put=True),
                      _scale_model(max_count), max_count)
