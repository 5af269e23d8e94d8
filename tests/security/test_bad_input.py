"""Bad specs end in a clear error naming the key, never a traceback, before any vSphere call.

- A hypothesis fuzz of random mutations of ``config/fleet.example.toml`` (keys
  dropped, renamed or added, values replaced by other types, random strings and
  numbers, nesting): every mutation is either a valid spec or a ``SpecError``
  whose every problem names a key related to what was mutated.
- The same mutations through ``fleet provision --spec FILE`` (in-process, the
  vSphere client and the built-in simulator replaced by tripwires): a bad spec
  exits 2 with the spec's message and neither tripwire is touched; a good one
  reaches the client (so the tripwire does work).
- The real CLI against an unreachable vCenter URL: catalogue specs fail with the
  spec's message (exit 2), not a connection error; a good one fails to connect.
- Unknown sources: the error names the source, and no clone was made.

The catalogue of bad specs is in tests/engine/test_spec.py.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet import cli
from fleet.engine.spec import SpecError, spec_from_dict
from tests.chaos.conftest import ENV as SIM_ENV
from tests.simproc import USER, SimProcess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "fleet.example.toml"
EXAMPLE_DATA: dict[str, Any] = tomllib.loads(EXAMPLE.read_text())
ENV = {"FLEET_VCENTER_PASSWORD": "vc-secret", "FLEET_GUEST_PASSWORD": "guest-secret"}
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

# Keys whose values other keys are checked against: a bad value here may be reported
# at the key that uses it (a fleet name too long for the name template, a network
# workflow that leaves readiness impossible...).
RELATED = {
    "name": {"name_template", "folder", "guestinfo"},
    "count": {"name_template", "guestinfo"},
    "sources": {"guestinfo"},
    "network": {"readiness"},
    "readiness": {"network"},
}

# -- random mutations ---------------------------------------------------------------

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
scalars = st.one_of(st.booleans(), st.integers(), st.integers(-300, 300),
                    st.floats(allow_nan=True, allow_infinity=True), text,
                    st.sampled_from(["auto", "none", "linux", "guestinfo.x", "{index}",
                                     "{fleet}-{index}", "{name.__class__}", "", " ", "\n",
                                     "https://vc/sdk", "AB:CD"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(text, inner, max_size=3), max_leaves=6)


def all_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    items = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append((*prefix, key))
        out.extend(all_paths(child, (*prefix, key)))
    return out


def tables(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return [p for p in [prefix, *all_paths(node, prefix)] if isinstance(get(node, p), dict)]


def get(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


@st.composite
def mutated_example(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """The example spec with 1-3 random mutations, and the top-level keys they touched."""
    data = copy.deepcopy(EXAMPLE_DATA)
    touched: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "set", "set", "add", "rename"]))
        if kind == "add":
            where = draw(st.sampled_from(tables(data)))
            key = draw(st.one_of(text, st.sampled_from(["password", "guest_password",
                                                        "folder", "count"])))
            get(data, where)[key] = draw(values)
            touched.append(str(where[0]) if where else key)
            continue
        paths = all_paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = get(data, path[:-1])
        touched.append(str(path[0]))
        if kind == "drop":
            del parent[path[-1]]
        elif kind == "set":
            parent[path[-1]] = draw(values)
        elif isinstance(parent, dict):
            new = draw(text)
            parent[new] = parent.pop(path[-1])
            if len(path) == 1:
                touched.append(new)
    return data, touched


def top(key: str) -> str:
    """The top-level spec key of a dotted key (``limits.per_host`` -> ``limits``)."""
    if key.startswith('"'):
        return str(json.JSONDecoder().raw_decode(key)[0])
    for i, ch in enumerate(key):
        if ch in ".[":
            return key[:i]
    return key


def check_error(err: SpecError, touched: list[str], source: str) -> None:
    """Every problem names its key; at least one is a key the mutation touched (or one
    checked against it)."""
    assert err.problems
    text_ = str(err)
    for key, message in err.problems:
        assert key, err.problems
        assert message
        assert f"{source}: {key}: {message}" in text_
    assert "Traceback" not in text_ and "pydantic" not in text_.lower()
    related = set(touched)
    for t in touched:
        related |= RELATED.get(t, set())
    assert {top(k) for k, _ in err.problems} & related, (touched, err.problems)


@SETTINGS
@given(mutated_example())
def test_random_mutations_of_the_example_end_in_a_clear_error(
        case: tuple[dict[str, Any], list[str]]) -> None:
    data, touched = case
    try:
        spec_from_dict(data, source="fleet.example.toml", env=ENV, base_dir=EXAMPLE.parent)
    except SpecError as err:
        check_error(err, touched, "fleet.example.toml")


# -- the same through the CLI: the spec is judged before anything touches vSphere ------


def toml_string(value: str) -> str:
    # JSON's escapes are TOML's, except that TOML wants characters beyond the BMP raw
    # (not as surrogate pairs) and DEL escaped.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") \
            if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(data: dict[str, Any]) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in data.items())


class Tripwire(Exception):
    """Raised by the stand-ins for the vSphere client and the built-in simulator."""


def _tripwire(*args: Any, **kwargs: Any) -> Any:
    raise Tripwire


@SETTINGS
@given(mutated_example())
def test_the_cli_judges_the_spec_before_any_vsphere_call(
        tmp_path_factory: pytest.TempPathFactory, case: tuple[dict[str, Any], list[str]]
) -> None:
    data, touched = case
    data = json.loads(json.dumps(data, allow_nan=True))  # TOML has no null: none were drawn
    path = tmp_path_factory.mktemp("spec") / "fleet.toml"
    path.write_text(toml_document(data), encoding="utf-8")
    assert tomllib.loads(path.read_text()) == data or any(
        isinstance(v, float) and math.isnan(v) for v in _leaves(data))
    try:
        spec_from_dict(data, source="fleet.toml", env=ENV, base_dir=path.parent)
        valid = True
    except SpecError as err:
        valid = False
        expected = str(err)
        check_error(err, touched, "fleet.toml")
    stderr = io.StringIO()
    with mock.patch.dict(os.environ, ENV), \
            mock.patch("fleet.target.VSphereClient", _tripwire), \
            mock.patch("fleet.target.builtin_simulator", _tripwire), \
            contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(["provision", "--spec", str(path), "--json"])
        except Tripwire:
            code = None
    if valid and "vcenter" not in data:
        # ENV's FLEET_VCENTER_PASSWORD now means "a vCenter" (docs/connecting.md): with no
        # [vcenter] and no FLEET_VCENTER_URL beside it, the CLI refuses, still before any
        # vSphere call and without starting the built-in simulator.
        assert code == cli.EXIT_USAGE, stderr.getvalue()
        assert "FLEET_VCENTER_PASSWORD: is set but FLEET_VCENTER_URL is not" in \
            stderr.getvalue()
    elif valid:
        assert code is None or data.get("count") == 0, stderr.getvalue()
    else:
        assert code == cli.EXIT_USAGE, stderr.getvalue()
        assert stderr.getvalue().strip() == f"fleet: error: {expected}"


def _leaves(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [x for v in node.values() for x in _leaves(v)]
    if isinstance(node, list):
        return [x for v in node for x in _leaves(v)]
    return [node]


# -- the real CLI against an unreachable vCenter ------------------------------------------

UNREACHABLE = "https://127.0.0.1:1/sdk"  # nothing listens on port 1


def _spec_text(**over: Any) -> str:
    data = copy.deepcopy(EXAMPLE_DATA)
    data["vcenter"]["url"] = UNREACHABLE
    for key, value in over.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return toml_document(data)


@pytest.mark.parametrize(("over", "key", "fragment"), [
    ({"count": -1}, "count", "-1 must be at least 0"),
    ({"chain_budget": 255}, "chain_budget", "255 is above the vSphere limit of 254"),
    ({"name_template": "vm-{index!s:.1}"}, "name_template", "names must be unique"),
    ({"name_template": "vm/{index}"}, "name_template", "contains '/'"),
    ({"guestinfo": {"role": "x"}}, "guestinfo.role", 'must start with "guestinfo."'),
    ({"guestinfo": {"guestinfo.big": "x" * 70_000}}, 'guestinfo."guestinfo.big"',
     "renders to 70000 bytes"),
    ({"limits": {"per_host": "eight"}}, "limits.per_host", '"eight" is neither'),
    ({"sources": []}, "sources", "must have at least 1 item"),
    ({"count": 0}, "count", "0 would remove every member"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_bad_spec_fails_before_connecting(tmp_path: Path, over: dict[str, Any], key: str,
                                            fragment: str) -> None:
    spec = tmp_path / "fleet.toml"
    spec.write_text(_spec_text(**over))
    run = subprocess.run([sys.executable, "-m", "fleet", "provision", "--spec", str(spec),
                          "--json"], env=dict(os.environ, **ENV), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    assert f"fleet: error: fleet.toml: {key}: " in run.stderr and fragment in run.stderr
    assert "Traceback" not in run.stderr
    assert "127.0.0.1:1" not in run.stderr  # never got as far as the vCenter


def test_a_good_spec_does_try_the_unreachable_vcenter(tmp_path: Path) -> None:
    """The contrast that makes the test above a proof: with a valid spec, fleet does go
    to the URL (and says it cannot reach it)."""
    spec = tmp_path / "fleet.toml"
    spec.write_text(_spec_text())
    run = subprocess.run([sys.executable, "-m", "fleet", "provision", "--spec", str(spec),
                          "--json"], env=dict(os.environ, **ENV), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "127.0.0.1:1" in run.stderr and "Traceback" not in run.stderr


# -- unknown sources ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["provision", "plan"])
def test_an_unknown_source_is_named_before_any_clone(tmp_path: Path, command: str) -> None:
    with SimProcess(time_scale=0.05) as sim:
        spec = tmp_path / "fleet.toml"
        spec.write_text(f"""
name = "typo"
count = 20
sources = ["frozen-01", "frozen-O2", "sources/frozen-03", "dc1/vm/nowhere/frozen-04"]
[vcenter]
url = "{sim.url}"
user = "{USER}"
password_env = "SIM_PASSWORD"
thumbprint = "{sim.thumbprint}"
[network]
refresh = "none"
""")
        run = subprocess.run([sys.executable, "-m", "fleet", command, "--spec", str(spec)],
                             env=dict(os.environ, **SIM_ENV), capture_output=True,
                             text=True, timeout=60)
        stats = sim.stats()
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "fleet: error: fleet.toml: sources: " in run.stderr
    for missing in ("frozen-O2", "dc1/vm/nowhere/frozen-04"):
        assert missing in run.stderr
    assert "frozen-01," not in run.stderr  # only the missing ones are named
    assert stats["clones_total"] == 0
    assert stats["calls_by_method"].get("InstantClone_Task", 0) == 0
    assert stats["calls_by_method"].get("CheckInstantClone_Task", 0) == 0
    assert stats["calls_by_method"].get("CreateFolder", 0) == 0  # nothing was changed
