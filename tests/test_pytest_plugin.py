"""fleet's pytest plugin (fleet/pytest_plugin.py) in a test session of its own, run by
pytester in a subprocess that loads the plugin from its entry point, as a user's
pytest does. The inner session's spec points at a simulator process, so this test
sees the same vCenter and checks what was made and destroyed there."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.simproc import SimProcess
from tests.specs import ENV, spec_data, to_toml
from tests.test_cli_inventory import sim_vms

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(time_scale=0.02) as proc:
        yield proc


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)


INNER = """
import json, pathlib, pytest

def record(name, members):
    path = pathlib.Path("seen.json")
    seen = json.loads(path.read_text()) if path.exists() else {}
    seen[name] = [[m.name, m.ip, m.run_id] for m in members]
    path.write_text(json.dumps(seen))

def test_gets_members(fleet_members):
    record("a", fleet_members)
    assert len(fleet_members) == 3

def test_fails_with_members(fleet_members):
    record("b", fleet_members)
    assert False, "a failing load test"
"""


def test_fixture_provisions_once_yields_members_and_destroys_after_a_failing_session(
        pytester: pytest.Pytester, sim: SimProcess, env: None) -> None:
    pytester.makefile(".toml", plugfleet=to_toml(spec_data(sim, "plugfleet", 3)))
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("--fleet-spec", "plugfleet.toml", "-p",
                                           "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=1, failed=1)
    seen = json.loads((pytester.path / "seen.json").read_text())
    # one fleet for the session: both tests saw the same members, made by one run
    assert seen["a"] == seen["b"]
    names = [name for name, _, _ in seen["a"]]
    assert names == ["plugfleet-0000", "plugfleet-0001", "plugfleet-0002"]
    assert len({ip for _, ip, _ in seen["a"]} - {None}) == 3
    assert len({run for _, _, run in seen["a"]}) == 1
    # and it is gone, although a test failed
    assert sim_vms(sim, "fleet/plugfleet") == {}


def test_marker_names_the_spec_and_a_failed_provision_is_a_clear_error_once(
        pytester: pytest.Pytester, sim: SimProcess, env: None) -> None:
    pytester.makefile(".toml", bad=to_toml(spec_data(sim, "plugbad", 2,
                                                     sources=["no-such-vm"])))
    pytester.makepyfile(test_inner="""
import pytest

pytestmark = pytest.mark.fleet_spec("bad.toml")

def test_one(fleet_members):
    pass

def test_two(fleet_members):
    pass
""", test_none="""
def test_no_spec(fleet_members):
    pass
""")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(errors=3)
    out = result.stdout.str()
    # each test's setup error carries the one provision's message; the short
    # summary repeats it in full only when pytest believes it runs on CI
    errors = [line for line in result.stdout.lines
              if line.startswith("fleet: the fleet of")]
    assert len(errors) == 2 and all("was not provisioned" in line
                                    and "no-such-vm" in line for line in errors)
    assert "fleet_members needs a spec" in out
    assert sim_vms(sim, "fleet/plugbad") == {}


def test_the_plugin_is_inert_unless_asked(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_plain():\n    import sys\n"
                                   "    assert 'fleet.public' not in sys.modules\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)


def test_under_xdist_each_worker_has_a_fleet_of_its_own(
        pytester: pytest.Pytester, sim: SimProcess, env: None) -> None:
    pytester.makefile(".toml", plugx=to_toml(spec_data(sim, "plugx", 2)))
    pytester.makepyfile(test_inner="""
import json, os, pathlib

def test_a(fleet_members):
    pathlib.Path(os.environ["PYTEST_XDIST_WORKER"] + ".json").write_text(
        json.dumps([m.name for m in fleet_members]))

test_b = test_a
""")
    result = pytester.runpytest_subprocess("--fleet-spec", "plugx.toml", "-n", "2",
                                           "--dist", "each", "-p", "no:cacheprovider",
                                           timeout=300)
    result.assert_outcomes(passed=4)
    for worker in ("gw0", "gw1"):
        names = json.loads((pytester.path / f"{worker}.json").read_text())
        assert names == [f"plugx-{worker}-0000", f"plugx-{worker}-0001"]
        assert sim_vms(sim, f"fleet/plugx-{worker}") == {}
