"""Spec loading: good specs load, every bad one names its key and value, secrets never leak."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleet.engine.spec import SpecError, load_spec, spec_from_dict
from fleet.errors import ConfigError
from tests.engine.conftest import BASE, ENV, GUEST_PASSWORD, VCENTER_PASSWORD, merge, spec_data

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "fleet.example.toml"
VC = {"url": "https://vc.example.com/sdk", "user": "fleet", "password_env": "VC_PW"}


def test_minimal_spec_has_documented_defaults() -> None:
    spec = spec_from_dict({"name": "lt", "count": 3, "sources": ["a"],
                           "network": {"refresh": "none"}})
    assert spec.chain_budget == 200
    assert spec.limits.per_host == 8
    assert spec.limits.per_running_source == 1
    assert spec.limits.in_flight == "auto"
    assert spec.folder_path == "fleet/lt"
    assert spec.vm_name(7) == "lt-0007"
    assert spec.simulated
    assert spec.network.credentials is None


def test_example_loads_with_every_section(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"FLEET_VCENTER_PASSWORD": "x", "FLEET_GUEST_PASSWORD": "y"}
    spec = load_spec(EXAMPLE, env=env)
    assert spec.name == "loadtest" and spec.count == 500
    assert spec.vcenter is not None and spec.vcenter.password.get_secret_value() == "x"
    assert spec.budget_for("golden-running") == 60
    assert spec.budget_for("frozen-01") == 200
    rendered = spec.guestinfo_for(index=4, name="loadtest-0004", source="frozen-01", run_id="r1")
    assert rendered["guestinfo.metadata"] == '{"fleet": "loadtest", "index": 4, "run": "r1"}'
    assert not spec.simulated


def test_example_mentions_every_key() -> None:
    """The example is the documentation: every model field appears in it."""
    from fleet.engine import spec as m

    text = EXAMPLE.read_text()
    for model in (m.FleetSpec, m.VCenterSpec, m.LimitsSpec, m.RetriesSpec, m.NetworkSpec,
                  m.ReadinessSpec, m.TimeoutsSpec, m.SourceSpec):
        for name in model.model_fields:
            assert f"{name} =" in text or f"{name}=" in text or f"[{name}]" in text, name


def test_load_spec_file_and_relative_password_file(tmp_path: Path) -> None:
    (tmp_path / "vc.secret").write_text(VCENTER_PASSWORD + "\n")
    (tmp_path / "fleet.toml").write_text(
        'name = "lt"\ncount = 2\nsources = ["a"]\n'
        '[vcenter]\nurl = "https://vc/sdk"\nuser = "u"\npassword_file = "vc.secret"\n'
        '[network]\nrefresh = "none"\n')
    spec = load_spec(tmp_path / "fleet.toml", env={})
    assert spec.vcenter is not None
    assert spec.vcenter.password.get_secret_value() == VCENTER_PASSWORD
    assert spec.origin == "fleet.toml"


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"chain_budget": 300}, "chain_budget", "300 is above the vSphere limit of 254"),
    ({"chain_budget": 0}, "chain_budget", "0 must be at least 1"),
    ({"sources": ["a", {"name": "b", "chain_budget": 255}]}, "sources[1].chain_budget",
     "255 is above the vSphere limit of 254"),
    ({"sources": []}, "sources", "at least 1"),
    ({"sources": ["a", "a"]}, "sources[1]", '"a" is listed twice'),
    ({"sources": [{"nam": "x"}]}, "sources[0].nam", "unknown key"),
    ({"count": -1}, "count", "-1 must be at least 0"),
    ({"count": "10"}, "count", '"10" must be an integer'),
    ({"count": 1.5}, "count", "1.5 must be an integer"),
    ({"name": "bad name!"}, "name", '"bad name!"'),
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"limits": {"per_host": 0}}, "limits.per_host", "0 must be at least 1"),
    ({"limits": {"per_host": "many"}}, "limits.per_host", '"many" is neither'),
    ({"limits": {"in_flight": 1000}}, "limits.in_flight", "1000 is above the 640"),
    ({"limits": {"per_hots": 4}}, "limits.per_hots", "unknown key"),
    ({"retries": {"attempts": 0}}, "retries.attempts", "0 must be at least 1"),
    ({"retries": {"jitter": 1.5}}, "retries.jitter", "1.5 must be at most 1"),
    ({"retries": {"backoff_base_s": 5.0, "backoff_max_s": 1.0}}, "retries.backoff_max_s",
     "1.0 is below retries.backoff_base_s"),
    ({"timeouts": {"clone_s": 0}}, "timeouts.clone_s", "0 must be above 0"),
    ({"timeouts": {"clone": 10}}, "timeouts.clone", "unknown key"),
    ({"readiness": {"wait_for": "ping"}}, "readiness.wait_for", '"ping" must be one of'),
    ({"readiness": {"wait_for": "guestinfo", "guestinfo_key": "ready"}},
     "readiness.guestinfo_key", '"ready" must start with "guestinfo."'),
    ({"network": {"refresh": "bsd"}}, "network.refresh", '"bsd" must be one of'),
    ({"network": {"refresh": "custom"}}, "network.command", "is required"),
    ({"network": {"command": "/bin/x"}}, "network.command", "only used when"),
    ({"network": {"guest_user": None}}, "network.guest_user", "is required when"),
    ({"network": {"guest_password_file": "/x"}}, "network.guest_password_env",
     "set exactly one of"),
    ({"network": {"guest_password_env": "NOPE"}}, "network.guest_password_env",
     "environment variable NOPE is not set"),
    ({"network": {"guest_password": "hunter2"}}, "network.guest_password", "unknown key"),
    ({"network": {"reconnect": False}}, "readiness.wait_for", "never happens"),
    ({"name_template": "vm"}, "name_template", "has no {index}"),
    ({"name_template": "vm-{index:.1}", "count": 20}, "name_template",
     "is not a valid template"),
    ({"name_template": "vm/{index}"}, "name_template", "contains '/'"),
    ({"name_template": "vm%{index}"}, "name_template", "contains '%'"),
    ({"name_template": "{fleet}" + "x" * 80 + "{index}"}, "name_template",
     "characters long (vSphere allows 80)"),
    ({"name_template": "vm-{idx}"}, "name_template", "uses {idx}"),
    ({"name_template": "vm-{index"}, "name_template", "is not a valid template"),
    ({"name_template": "vm-{index!s:.1}", "count": 20}, "name_template",
     'gives "vm-1" for indexes 1 and 10: names must be unique'),
    ({"folder": "//"}, "folder", "is not a folder path"),
    ({"guestinfo": {"role": "x"}}, "guestinfo.role", 'must start with "guestinfo."'),
    ({"guestinfo": {"guestinfo.fleet.name": "x"}}, 'guestinfo."guestinfo.fleet.name"',
     "reserved"),
    ({"guestinfo": {"guestinfo.a": "{nope}"}}, 'guestinfo."guestinfo.a"', "uses {nope}"),
    ({"guestinfo": {"guestinfo.a": "x" * 70000}}, 'guestinfo."guestinfo.a"',
     "renders to 70000 bytes"),
    ({"guestinfo": {"guestinfo.a": 5}}, 'guestinfo."guestinfo.a"', "5 must be a string"),
    ({"vcenter": {**VC, "url": "vc.example.com"}}, "vcenter.url", "is not an http(s) URL"),
    ({"vcenter": {**VC, "url": "http://vc/sdk"}}, "vcenter.url", "plain http"),
    ({"vcenter": {**VC, "password": "hunter2"}}, "vcenter.password", "never the spec"),
    ({"vcenter": {**VC, "password_env": None}}, "vcenter.password_env", "set exactly one"),
    ({"vcenter": {**VC, "password_env": "1BAD"}}, "vcenter.password_env",
     "not an environment variable name"),
    ({"vcenter": {**VC, "password_env": "MISSING_PW"}}, "vcenter.password_env",
     "MISSING_PW is not set"),
    ({"vcenter": {**VC, "password_env": None, "password_file": "/nonexistent/pw"}},
     "vcenter.password_file", "cannot read"),
    ({"vcenter": {**VC, "thumbprint": "AB:CD"}}, "vcenter.thumbprint", "is not a SHA-256"),
    ({"vcenter": {**VC, "thumbprint": "AB:" * 19 + "CD"}}, "vcenter.thumbprint",
     "is a SHA-1 fingerprint; pin the certificate's SHA-256 one"),
    ({"vcenter": {**VC, "insecure": True, "thumbprint": "AB:" * 19 + "CD"}},
     "vcenter.insecure", "choose one of"),
    ({"vcenter": {**VC, "ca_file": "/nonexistent/ca.pem"}}, "vcenter.ca_file",
     'cannot read "/nonexistent/ca.pem": No such file'),
    ({"vcenter": {**VC, "user": ""}}, "vcenter.user", "must not be empty"),
    # -- issue 6's catalogue: wrong types --------------------------------------------
    ({"name": 5}, "name", "5 must be a string"),
    ({"count": True}, "count", "true must be an integer"),
    ({"sources": "frozen-01"}, "sources", '"frozen-01" must be a list'),
    ({"sources": [5]}, "sources[0]", "5 must be a table"),
    ({"vcenter": "https://vc.example.com/sdk"}, "vcenter", "must be a table"),
    ({"limits": [8]}, "limits", "must be a table"),
    ({"guestinfo": ["guestinfo.a"]}, "guestinfo", "must be a table"),
    ({"chain_budget": 2.5}, "chain_budget", "2.5 must be an integer"),
    ({"timeouts": {"clone_s": "10"}}, "timeouts.clone_s", '"10" must be a number'),
    ({"network": {"reconnect": "yes"}}, "network.reconnect", '"yes" must be true or false'),
    ({"readiness": {"timeout_s": [1]}}, "readiness.timeout_s", "must be a number"),
    # -- out of range ------------------------------------------------------------------
    ({"count": 100_001}, "count", "must be at most 100000"),
    ({"count": -5}, "count", "-5 must be at least 0"),
    ({"chain_budget": -5}, "chain_budget", "-5 must be at least 1"),
    ({"chain_budget": 254 + 1}, "chain_budget", "255 is above the vSphere limit of 254"),
    ({"sources": [{"name": "a", "chain_budget": 0}]}, "sources[0].chain_budget",
     "0 must be at least 1"),
    ({"limits": {"per_datastore": -1}}, "limits.per_datastore", "-1 must be at least 1"),
    ({"retries": {"attempts": 101}}, "retries.attempts", "101 must be at most 100"),
    ({"readiness": {"timeout_s": -1.0}}, "readiness.timeout_s", "-1.0 must be above 0"),
    ({"timeouts": {"clone_s": float("inf")}}, "timeouts.clone_s", "must be a finite number"),
    ({"timeouts": {"call_s": float("nan")}}, "timeouts.call_s", "nan"),
    # -- names: duplicates, names vSphere refuses, templates that reach too far ---------
    ({"name_template": "vm-{index!s:.2}", "count": 101}, "name_template",
     'gives "vm-10" for indexes 10 and 100: names must be unique'),
    ({"name_template": "vm\\{index}"}, "name_template", "contains '\\\\'"),
    ({"name_template": "vm-\t{index}"}, "name_template", "contains control characters"),
    ({"name_template": " vm-{index}"}, "name_template", "leading/trailing spaces"),
    ({"name_template": "{fleet:.0}", "count": 1}, "name_template", "is empty"),
    ({"name_template": "{fleet.real}-{index}"}, "name_template", "reaches into a value"),
    ({"name_template": "{fleet}-{index[0]}"}, "name_template", "reaches into a value"),
    ({"name_template": "{index:{fleet}}"}, "name_template", "contains a field"),
    ({"name_template": "{index:100000000}"}, "name_template",
     "asks for 100000000 characters"),
    ({"name": "lt\n"}, "name", "must be 1-63 letters"),
    ({"folder": "fleet/a%b"}, "folder", "contains '%'"),
    ({"folder": "fleet/\u001b[2J"}, "folder", "contains control characters"),
    ({"sources": ["frozen-01", "bad\u001b[2J"]}, "sources[1]", "contains control characters"),
    # -- guestinfo: keys outside guestinfo., oversized values ---------------------------
    ({"guestinfo": {"guestinfo.": "x"}}, 'guestinfo."guestinfo."', 'must start with'),
    ({"guestinfo": {"guestinfo.a b": "x"}}, 'guestinfo."guestinfo.a b"', "only letters"),
    ({"guestinfo": {"guestinfo.a\n": "x"}}, 'guestinfo."guestinfo.a\\n"', "only letters"),
    ({"guestinfo": {"GuestInfo.a": "x"}}, 'guestinfo."GuestInfo.a"', 'must start with'),
    ({"guestinfo": {"guestinfo." + "k" * 130: "x"}}, f'guestinfo."guestinfo.{"k" * 130}"',
     "longer than 128"),
    ({"guestinfo": {"guestinfo.a": "{name}" * 1000}}, 'guestinfo."guestinfo.a"',
     "renders to 80000 bytes"),
    ({"guestinfo": {f"guestinfo.k{i}": "x" * 60_000 for i in range(20)}}, "guestinfo",
     "in all; the limit is 1048576"),
    ({"guestinfo": {"guestinfo.a": "{name.__class__}"}}, 'guestinfo."guestinfo.a"',
     "reaches into a value"),
    ({"guestinfo": {"guestinfo.a": "{index:9999999}"}}, 'guestinfo."guestinfo.a"',
     "asks for 9999999 characters"),
    # -- vCenter ------------------------------------------------------------------------
    ({"vcenter": {**VC, "url": "https://vc example/sdk"}}, "vcenter.url",
     "is not an http(s) URL"),
    ({"vcenter": {**VC, "thumbprint": "AB:" * 31 + "CD\n"}}, "vcenter.thumbprint",
     "is not a SHA-256"),
    ({"vcenter": {**VC, "password_env": "VC_PW\n"}}, "vcenter.password_env",
     "not an environment variable name"),
    # -- issue 11: URLs checked whole at load time (urllib raised ValueError at connect) ---
    ({"vcenter": {**VC, "url": "https://vc:99999/sdk"}}, "vcenter.url",
     '"https://vc:99999/sdk" is not an http(s) URL: its port is not a number'),
    ({"vcenter": {**VC, "url": "https://vc:abc/sdk"}}, "vcenter.url",
     '"https://vc:abc/sdk" is not an http(s) URL: its port is not a number'),
    ({"vcenter": {**VC, "url": "https://vc:0/sdk"}}, "vcenter.url", "its port is not"),
    ({"vcenter": {**VC, "url": "https://[::1/sdk"}}, "vcenter.url",
     '"https://[::1/sdk" is not an http(s) URL: its host is not an IPv6 address'),
    ({"vcenter": {**VC, "url": "https://[zz::1]/sdk"}}, "vcenter.url", "not an IPv6"),
    ({"vcenter": {**VC, "url": "https://vc/sdk?debug=1"}}, "vcenter.url", "query"),
    ({"vcenter": {**VC, "url": "https:///sdk"}}, "vcenter.url", "is not an http(s) URL"),
    ({"vcenter": {**VC, "url": "https://a..b/sdk"}}, "vcenter.url", "neither a host name"),
    ({"vcenter": {**VC, "url": "https://user%40vsphere.local:hunter2@vc/sdk"}}, "vcenter.url",
     '"https://***@vc/sdk" has a user name or password in it'),
    # -- issue 11: durations have an upper bound -------------------------------------
    ({"retries": {"backoff_base_s": 1e308, "backoff_max_s": 1e308}},
     "retries.backoff_base_s", "1e+308 must be at most 3600 seconds"),
    ({"retries": {"backoff_max_s": 3601}}, "retries.backoff_max_s",
     "3601 must be at most 3600 seconds"),
    ({"timeouts": {"clone_s": 86_401}}, "timeouts.clone_s", "must be at most 86400 seconds"),
    ({"timeouts": {"queue_s": 1e9}}, "timeouts.queue_s", "must be at most 86400 seconds"),
    ({"timeouts": {"network_s": 1e9}}, "timeouts.network_s", "at most 86400 seconds"),
    ({"timeouts": {"reconnect_s": 1e9}}, "timeouts.reconnect_s", "at most 86400 seconds"),
    ({"timeouts": {"call_s": 7200}}, "timeouts.call_s", "at most 3600 seconds"),
    ({"timeouts": {"cleanup_s": 7200}}, "timeouts.cleanup_s", "at most 3600 seconds"),
    ({"timeouts": {"cancel_grace_s": 7200}}, "timeouts.cancel_grace_s",
     "at most 3600 seconds"),
    ({"timeouts": {"cancel_grace_s": float("inf")}}, "timeouts.cancel_grace_s",
     "must be a finite number"),
    ({"readiness": {"timeout_s": 1e308}}, "readiness.timeout_s", "at most 86400 seconds"),
    ({"retries": {"backoff_base_s": float("nan")}}, "retries.backoff_base_s",
     "must be a finite number"),
    # -- issue 11: folder paths have no "." or ".." steps and no empty ones ---------------
    ({"folder": "fleet/../other"}, "folder", 'the folder name ".." is not a folder name'),
    ({"folder": "./fleet"}, "folder", 'the folder name "." is not a folder name'),
    ({"folder": ".."}, "folder", 'the folder name ".."'),
    ({"folder": "fleet//x"}, "folder", "is not a folder path"),
    # -- issue 11: list sizes have a cap -----------------------------------------------
    ({"sources": [f"s{i}" for i in range(5001)]}, "sources", "5001 sources; the limit is 5000"),
    ({"guestinfo": {f"guestinfo.k{i}": "x" for i in range(257)}}, "guestinfo",
     "257 keys; the limit is 256"),
]

REQUIRED = [((), "name"), ((), "count"), ((), "sources"), (("vcenter",), "url"),
            (("vcenter",), "user"), (("sources", 0), "name")]


@pytest.mark.parametrize(("where", "key"), REQUIRED,
                         ids=[".".join(map(str, (*w, k))) for w, k in REQUIRED])
def test_missing_keys_are_named(where: tuple[Any, ...], key: str) -> None:
    data = spec_data(vcenter=dict(VC), sources=[{"name": "a"}])
    node: Any = data
    for part in where:
        node = node[part]
    del node[key]
    dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in (*where, key))
    dotted = dotted.lstrip(".")
    with pytest.raises(SpecError) as info:
        spec_from_dict(data, source="fleet.toml", env=ENV)
    assert (dotted, "is required") in info.value.problems, info.value.problems
    assert f"fleet.toml: {dotted}: is required" in str(info.value)


@pytest.mark.parametrize(("over", "key", "fragment"), BAD, ids=[f"{k}:{f[:30]}" for _, k, f in BAD])
def test_bad_spec_names_key_and_value(over: dict[str, Any], key: str, fragment: str) -> None:
    data = merge(BASE, over)
    if "network" in over and over["network"].get("guest_user", "") is None:
        data["network"].pop("guest_user")
        data["network"].pop("guest_password_env")
    for section in ("vcenter", "network"):
        table = data.get(section)
        for k in [k for k, v in table.items() if v is None] if isinstance(table, dict) else []:
            del table[k]
    with pytest.raises(SpecError) as info:
        spec_from_dict(data, source="fleet.toml", env=ENV)
    err = info.value
    assert isinstance(err, ConfigError)
    messages = [m for k, m in err.problems if k == key]
    assert messages, str(err)
    assert any(fragment in m for m in messages), str(err)
    assert f"fleet.toml: {key}: " in str(err)
    assert err.key == err.problems[0][0]
    assert "pydantic" not in str(err).lower() and "errors.pydantic.dev" not in str(err)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict(spec_data(count=-1, chain_budget=999, bogus=True), source="f.toml",
                       env=ENV)
    keys = {k for k, _ in info.value.problems}
    assert keys == {"count", "chain_budget", "bogus"}
    assert str(info.value).count("f.toml: ") == 3


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match=r"^broken.toml: not valid TOML"):
        load_spec(path)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read the spec"):
        load_spec("/nonexistent/fleet.toml")


def test_secrets_never_appear(tmp_path: Path) -> None:
    spec = spec_from_dict(spec_data(vcenter=VC), env=ENV)
    assert spec.vcenter is not None
    assert spec.vcenter.password.get_secret_value() == VCENTER_PASSWORD
    assert spec.network.credentials is not None
    assert spec.network.credentials.password == GUEST_PASSWORD
    for text in (repr(spec), str(spec), spec.model_dump_json(), repr(spec.model_dump()),
                 repr(spec.network.credentials), repr(spec.vcenter)):
        assert VCENTER_PASSWORD not in text
        assert GUEST_PASSWORD not in text
    # A password written where a key is not allowed is not echoed back either.
    with pytest.raises(SpecError) as info:
        spec_from_dict(spec_data(vcenter={**VC, "password": "hunter2-literal"}), env=ENV)
    assert "hunter2-literal" not in str(info.value)


def test_unknown_top_level_table() -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict(spec_data(vcentre={"url": "x"}), env=ENV)
    assert info.value.key == "vcentre"


def test_name_template_checks_every_index() -> None:
    # Only index 100 goes past 80 characters: the check must reach it.
    template = "{fleet}-" + "x" * 75 + "{index}"
    spec_from_dict(spec_data(name_template=template, count=100), env=ENV)
    with pytest.raises(SpecError, match=r"index 100\)"):
        spec_from_dict(spec_data(name_template=template, count=101), env=ENV)


def test_per_source_budget_and_fallback() -> None:
    spec = spec_from_dict(spec_data(sources=["a", {"name": "b", "chain_budget": 12}]), env=ENV)
    assert spec.budget_for("a") == 200
    assert spec.budget_for("b") == 12


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_ca_file_is_refused_not_taken_for_the_system_cas(tmp_path: Path,
                                                                  content: str) -> None:
    """An empty ``ca_file`` passed as holding certificates: ``ssl.create_default_context``
    takes an empty ``cadata`` for none at all and loads the system's CAs, so a spec
    meant to trust one private CA would have trusted every public one."""
    ca = tmp_path / "ca.pem"
    ca.write_text(content)
    with pytest.raises(SpecError) as exc:
        spec_from_dict(merge(BASE, {"vcenter": {**VC, "ca_file": str(ca)}}), env=ENV)
    assert "vcenter.ca_file" in str(exc.value) and "holds no PEM certificate" in str(exc.value)
