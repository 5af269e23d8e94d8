"""fleet's own check for the schemathesis run of ``.ci/schemathesis`` (docs/api.md).

A body the OpenAPI document admits must pass the model the service judges bodies
with (``fleet.api.bodies``), made for the same service config (``FLEET_SERVE_CONFIG``).
That is what "the schema is the service's truth" means for request bodies, and it is
checked on every body schemathesis generates as valid, whatever the service answered.

It stands in for schemathesis' ``positive_data_acceptance`` on the three operations
that take a fleet spec, where a schema-valid body may still be refused with a 422 for
what no JSON Schema can say: rules between keys (a name template must give unique
names), the fleet's current spec (a PATCH), and vCenter's inventory (the sources must
exist). ``.ci/schemathesis.toml`` lets those operations answer 422; this check makes
sure such a 422 never comes from a rule the schema could have stated.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import schemathesis
from pydantic import BaseModel, ValidationError
from schemathesis.core.parameters import ParameterLocation

from fleet.api.bodies import body_models
from fleet.api.config import config_from_dict
from fleet.engine.spec import read_toml
from fleet.target import SIM_GUEST_ENV, SIM_GUEST_PASSWORD

_path = Path(os.environ["FLEET_SERVE_CONFIG"])
_config = config_from_dict(read_toml(_path, "config"), source=_path.name,
                           env={SIM_GUEST_ENV: SIM_GUEST_PASSWORD, **os.environ},
                           base_dir=_path.parent)
_models = body_models(_config)
MODELS: dict[tuple[str, str], type[BaseModel]] = {
    ("POST", "/v1/fleets"): _models.create,
    ("PUT", "/v1/fleets/{name}"): _models.put,
    ("PATCH", "/v1/fleets/{name}"): _models.scale,
}


@schemathesis.check
def schema_valid_bodies_pass_the_body_model(ctx: Any, response: Any, case: Any) -> None:
    model = MODELS.get((case.operation.method.upper(), case.operation.path))
    if model is None or case.meta is None or not isinstance(case.body, dict):
        return
    if case.meta.is_negative_at(ParameterLocation.BODY):
        return
    try:
        model.model_validate(case.body)
    except ValidationError as exc:
        raise AssertionError(
            f"a body the schema admits is refused by {model.__name__}: "
            + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None
