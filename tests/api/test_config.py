"""The service config: every mistake is an error naming the file, the key and the value;
secrets come from the environment or files only; the shipped example loads."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from fleet.api.config import config_from_dict, load_config, parse_listen
from fleet.cli import build_parser
from fleet.cli.serve import connect
from fleet.cli.serve import main as serve_main
from fleet.engine.spec import SpecError
from fleet.errors import TlsVerificationFailed
from fleet.metrics import FleetMetrics
from tests.simproc import PASSWORD, USER, SimProcess

ROOT = Path(__file__).resolve().parents[2]
ENV = {"TOKEN": "a-good-long-token-123456", "VC_PW": "vc-secret", "GUEST": "guest-secret"}


def problems(data: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        config_from_dict({"api": {"token_env": "TOKEN"}, **data}, source="serve.toml",
                         env=ENV if env is None else env)
    assert "serve.toml" in str(info.value)
    return dict(info.value.problems)


def test_the_example_config_loads(tmp_path: Path) -> None:
    config = load_config(ROOT / "config" / "serve.example.toml",
                         env={"FLEET_API_TOKEN": "x" * 24,
                              "FLEET_SIM_GUEST_PASSWORD": "fleet-guest"})
    assert config.vcenter is None and config.root_folder == "fleet"
    assert config.listen_address == ("127.0.0.1", 8080)
    assert config.api.token.get_secret_value() == "x" * 24
    assert "x" * 24 not in repr(config) and "x" * 24 not in config.model_dump_json()


@pytest.mark.parametrize(("data", "key", "words"), [
    ({"listen": "8080"}, "listen", '"8080"'),
    ({"listen": "host:99999"}, "listen", "HOST:PORT"),
    ({"root_folder": "/"}, "root_folder", "folder path"),
    ({"scan_interval_s": 0}, "scan_interval_s", "above 0"),
    ({"max_count": 10**9}, "max_count", "at most"),
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"api": {"token_env": "TOKEN", "token": "inline"}}, "api.token", "unknown key"),
    ({"api": {}}, "api.token_env", "exactly one"),
    ({"api": {"token_env": "TOKEN", "token_file": "/x"}}, "api.token_env", "exactly one"),
    ({"api": {"token_env": "UNSET"}}, "api.token_env", "UNSET is not set"),
    ({"api": {"token_env": "TOKEN", "max_body_bytes": 10}}, "api.max_body_bytes", "1024"),
    ({"vcenter": {"url": "https://vc/sdk", "user": "u"}}, "vcenter.password_env", "exactly"),
    ({"vcenter": {"url": "ftp://vc", "user": "u", "password_env": "VC_PW"}}, "vcenter.url",
     "http(s)"),
    ({"vcenter": {"url": "https://vc/sdk", "user": "u", "password_env": "VC_PW",
                  "thumbprint": "zz"}}, "vcenter.thumbprint", "fingerprint"),
    ({"limits": {"in_flight": 1000}}, "limits.in_flight", "640"),
    ({"limits": {"per_host": "lots"}}, "limits.per_host", '"lots"'),
    ({"defaults": {"vcenter": {}}}, "defaults.vcenter", "not a default"),
    ({"defaults": {"name": "x"}}, "defaults.name", "each request names"),
    ({"defaults": {"folder": "x"}}, "defaults.folder", "root_folder"),
    ({"defaults": {"chain_budget": 300}}, "defaults.chain_budget", "254"),
    ({"defaults": {"nope": 1}}, "defaults.nope", "unknown key"),
    ({"defaults": {"network": {"guest_user": "root", "guest_password_env": "UNSET"}}},
     "defaults.network.guest_password_env", "UNSET is not set"),
    ({"simulator": {"time_scale": -1}}, "simulator.time_scale", "above 0"),
])
def test_config_errors_name_the_key_and_value(data: dict[str, Any], key: str,
                                              words: str) -> None:
    found = problems(data)
    assert key in found, found
    assert words in found[key], found[key]


def test_tokens_must_be_long_and_come_from_env_or_file(tmp_path: Path) -> None:
    found = problems({}, env={"TOKEN": "short"})
    assert "at least 16" in found["api.token_env"] and "short" not in found["api.token_env"]
    token_file = tmp_path / "token"
    token_file.write_text("file-token-0123456789\n")
    config = config_from_dict({"api": {"token_file": "token"}}, env={}, base_dir=tmp_path)
    assert config.api.token.get_secret_value() == "file-token-0123456789"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    from fleet.sim.certs import generate

    # A real certificate: the CA file is parsed at load time now.
    (tmp_path / "ca.pem").write_bytes(generate().cert_pem)
    config = config_from_dict({"api": {"token_env": "TOKEN"}, "state_dir": "state",
                               "vcenter": {"url": "https://vc/sdk", "user": "u",
                                           "password_env": "VC_PW", "ca_file": "ca.pem"}},
                              env=ENV, base_dir=tmp_path)
    assert config.state_path == tmp_path / "state"
    assert config.vcenter is not None
    assert config.vcenter.ca_path == str(tmp_path / "ca.pem")
    assert config.vcenter.password.get_secret_value() == "vc-secret"


@pytest.mark.anyio
async def test_the_service_trusts_the_configured_ca_file(sim: SimProcess, tmp_path: Path) -> None:
    """``vcenter.ca_file`` (relative to the config file) is what the service's client
    trusts: with it the simulator's self-signed certificate is accepted, and the same
    config without it is refused at the handshake, so nothing else made it work."""
    shutil.copy(sim.cert_path, tmp_path / "ca.pem")
    vcenter = {"url": sim.url, "user": USER, "password_env": "VC_PW"}
    env = {**ENV, "VC_PW": PASSWORD}
    config = config_from_dict({"api": {"token_env": "TOKEN"},
                               "vcenter": {**vcenter, "ca_file": "ca.pem"}},
                              env=env, base_dir=tmp_path)
    async with connect(config, FleetMetrics(), lambda _: None) as vs:
        assert (await vs.server_info()).api_type == "VirtualCenter"
    untrusted = config_from_dict({"api": {"token_env": "TOKEN"}, "vcenter": vcenter},
                                 env=env, base_dir=tmp_path)
    with pytest.raises(TlsVerificationFailed):
        async with connect(untrusted, FleetMetrics(), lambda _: None):
            pass


def test_listen_option_is_checked() -> None:
    assert parse_listen("127.0.0.1:0", "--listen") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8080", "--listen") == ("::1", 8080)
    with pytest.raises(SpecError, match="--listen"):
        parse_listen("localhost", "--listen")


def test_bad_config_exits_2_naming_the_key(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "serve.toml"
    path.write_text('[api]\ntoken_env = "FLEET_TEST_NO_SUCH_TOKEN"\n')
    args = build_parser().parse_args(["serve", "--config", str(path)])
    assert serve_main(args) == 2
    err = capsys.readouterr().err
    assert "serve.toml: api.token_env: environment variable FLEET_TEST_NO_SUCH_TOKEN is not set" \
        in err
    path.write_text("listen = [")
    assert serve_main(args) == 2
    assert "not valid TOML" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["web\n", "web\r", "..", ".", "", "-web", "a/b", "x" * 64])
def test_names_the_service_refuses(tmp_path: Path, name: str) -> None:
    from fleet.api.requests import valid_name
    from fleet.api.state import StateStore

    assert not valid_name(name)
    with pytest.raises(ValueError):
        StateStore(tmp_path)._file(name)


def test_state_files_a_user_could_break_do_not_hang_or_sink_the_start(tmp_path: Path) -> None:
    """The service reads its state directory at start: a FIFO there hung it, a link to
    /dev/zero read without end, JSON nested 100,000 deep raised RecursionError. Each is
    now ignored (and logged); a good file next to them still loads."""
    import os
    import threading

    from fleet.api.state import SavedFleet, StateStore

    store = StateStore(tmp_path)
    store._save(SavedFleet(name="good", spec={"count": 1}, generation=1, status="ready"))
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    loaded: list[list[SavedFleet]] = []
    reader = threading.Thread(target=lambda: loaded.append(store._load_all()), daemon=True)
    reader.start()
    reader.join(60)
    if reader.is_alive():
        with open(tmp_path / "fifo.json", "wb"):
            pass  # release the reader stuck in open()
        reader.join(60)
        pytest.fail("loading the state directory blocked on a FIFO")
    assert [s.name for s in loaded[0]] == ["good"]


GOVC = {"GOVC_URL": "vc.example", "GOVC_USERNAME": "govc-user", "GOVC_PASSWORD": "pw-govc"}


def test_without_vcenter_the_environment_names_it_as_for_the_cli() -> None:
    """docs/connecting.md: the service follows the CLI's rules. A config without
    [vcenter] takes FLEET_VCENTER_* (then GOVC_*); with one, the config wins whole."""
    config = config_from_dict({"api": {"token_env": "TOKEN"}}, env={**ENV, **GOVC})
    assert config.vcenter is not None and config.vcenter_origin == "GOVC_URL"
    assert config.vcenter.url == "https://vc.example/sdk" and config.vcenter.user == "govc-user"
    assert config.vcenter.password.get_secret_value() == "pw-govc"
    assert "pw-govc" not in repr(config) and "pw-govc" not in config.model_dump_json()
    own = config_from_dict({"api": {"token_env": "TOKEN"},
                            "vcenter": {"url": "https://vc/sdk", "user": "u",
                                        "password_env": "VC_PW"}}, env={**ENV, **GOVC})
    assert own.vcenter is not None and own.vcenter.url == "https://vc/sdk"
    assert own.vcenter_origin == "<config>'s [vcenter]"
    assert config_from_dict({"api": {"token_env": "TOKEN"}}, env=ENV).vcenter is None


@pytest.mark.parametrize(("env", "culprit"), [
    ({"GOVC_PASSWORD": "pw-govc"}, "GOVC_PASSWORD: is set but no vCenter is named"),
    ({**GOVC, "GOVC_INSECURE": "maybe"}, 'GOVC_INSECURE: "maybe" is not a boolean'),
    ({"FLEET_VCENTER_URL": "https://vc/sdk", "FLEET_VCENTER_USER": "u"},
     "FLEET_VCENTER_URL: names a vCenter but no password is given"),
])
def test_a_vcenter_meant_but_unusable_is_a_config_error_not_the_simulator(
        env: dict[str, str], culprit: str) -> None:
    with pytest.raises(SpecError) as info:
        config_from_dict({"api": {"token_env": "TOKEN"}}, env={**ENV, **env})
    assert str(info.value) == f"environment: {culprit}" or \
        str(info.value).startswith(f"environment: {culprit}")
    assert "pw-govc" not in str(info.value)


def test_a_simulator_topology_with_a_vcenter_from_the_environment_is_refused() -> None:
    topology = str(ROOT / "config" / "sim.toml")
    found = problems({"simulator": {"topology": topology}}, env={**ENV, **GOVC})
    assert found == {"simulator.topology": "is only used with the built-in simulator, and "
                                           "GOVC_URL names a vCenter"}
