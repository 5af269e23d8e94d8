"""Which vCenter a command talks to (fleet.engine.connection, docs/connecting.md): the
precedence of flags, spec, FLEET_VCENTER_* and GOVC_*, the pairing of a password with
its URL, govc's own readings of its variables, and every bad value named (exit 2)."""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from fleet.engine.connection import resolve_connection
from fleet.engine.spec import SpecError, spec_from_dict
from fleet.engine.spec_model import VCenterSpec
from fleet.sim import certs
from fleet.vsphere.tls import TlsOptions, ssl_for

THUMB_A = ":".join(["AB"] * 32)
THUMB_B = "cd" * 32

#: each place names its own host and its own password: what wins shows in both
FLAG = {"url": "https://flag.example/sdk", "user": "flag-user"}
SPEC_ENV = {"SPEC_PASSWORD": "pw-spec"}
FLEET = {"FLEET_VCENTER_URL": "https://fleet.example/sdk", "FLEET_VCENTER_USER": "fleet-user",
         "FLEET_VCENTER_PASSWORD": "pw-fleet"}
GOVC = {"GOVC_URL": "govc.example", "GOVC_USERNAME": "govc-user", "GOVC_PASSWORD": "pw-govc"}
SECRETS = ("pw-flag", "pw-spec", "pw-fleet", "pw-govc", "hunter2")


def spec_vcenter(**extra: Any) -> VCenterSpec:
    spec = spec_from_dict({
        "name": "t", "count": 1, "sources": ["s"], "network": {"refresh": "none"},
        "vcenter": {"url": "https://spec.example/sdk", "user": "spec-user",
                    "password_env": "SPEC_PASSWORD", **extra},
    }, env=SPEC_ENV)
    assert spec.vcenter is not None
    return spec.vcenter


def flags(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    secret = tmp_path / "flag-password"
    secret.write_text("pw-flag\n")
    return {**FLAG, "password_file": str(secret), **extra}


def problem(exc: pytest.ExceptionInfo[SpecError]) -> str:
    text = str(exc.value)
    for secret in SECRETS:
        assert secret not in text  # a secret is never echoed
    return text


@pytest.mark.parametrize(("use_flag", "use_spec", "use_fleet", "use_govc"),
                         list(itertools.product([True, False], repeat=4)))
def test_precedence_is_flag_then_spec_then_fleet_then_govc(
        tmp_path: Path, use_flag: bool, use_spec: bool, use_fleet: bool, use_govc: bool) -> None:
    env = {**SPEC_ENV, **(FLEET if use_fleet else {}), **(GOVC if use_govc else {})}
    found = resolve_connection(spec_vcenter() if use_spec else None, env=env,
                               flags=flags(tmp_path) if use_flag else None, cwd=tmp_path)
    places = [("flag", use_flag, "--vcenter-url"), ("spec", use_spec, "the spec's [vcenter]"),
              ("fleet", use_fleet, "FLEET_VCENTER_URL"), ("govc", use_govc, "GOVC_URL")]
    winner = next(((name, origin) for name, on, origin in places if on), None)
    if winner is None:
        assert found.vcenter is None and found.origin is None and found.ignored == ()
        return
    name, origin = winner
    vc = found.vcenter
    assert vc is not None and found.origin == origin
    # URL, user and password all from the one place: never a password of another.
    assert vc.url == f"https://{name}.example/sdk"
    assert vc.user == f"{name}-user"
    assert vc.password.get_secret_value() == f"pw-{name}"
    lost = [n for n, on, _ in places[[p[0] for p in places].index(name) + 1:] if on]
    expected = sorted(({"FLEET_VCENTER_URL", "FLEET_VCENTER_USER", "FLEET_VCENTER_PASSWORD"}
                       if "fleet" in lost else set())
                      | ({"GOVC_URL", "GOVC_USERNAME", "GOVC_PASSWORD"} if "govc" in lost
                         else set()))
    assert list(found.ignored) == expected


def test_the_spec_password_variable_it_names_is_not_reported_as_ignored() -> None:
    env = {"FLEET_VCENTER_PASSWORD": "pw-spec"}
    vc = spec_vcenter()
    vc2 = vc.model_copy(update={"password_env": "FLEET_VCENTER_PASSWORD"})
    found = resolve_connection(vc2, env=env)
    assert found.vcenter is vc2 and found.ignored == ()


def test_a_password_is_never_sent_to_a_url_it_was_not_paired_with() -> None:
    # FLEET_VCENTER_URL without its own password: GOVC_PASSWORD is not borrowed.
    env = {"FLEET_VCENTER_URL": "https://fleet.example/sdk", "FLEET_VCENTER_USER": "u",
           "GOVC_PASSWORD": "pw-govc"}
    with pytest.raises(SpecError) as exc:
        resolve_connection(None, env=env)
    assert "FLEET_VCENTER_URL: names a vCenter but no password is given: set " \
           "FLEET_VCENTER_PASSWORD or FLEET_VCENTER_PASSWORD_FILE" in problem(exc)
    # GOVC_URL's vCenter never gets FLEET_VCENTER_PASSWORD: an error, not a guess.
    env = {"GOVC_URL": "govc.example", "GOVC_USERNAME": "u", "GOVC_PASSWORD": "pw-govc",
           "FLEET_VCENTER_PASSWORD": "pw-fleet"}
    with pytest.raises(SpecError) as exc:
        resolve_connection(None, env=env)
    text = problem(exc)
    assert "FLEET_VCENTER_PASSWORD: is set but FLEET_VCENTER_URL is not" in text
    assert "GOVC_URL's vCenter takes GOVC_USERNAME and GOVC_PASSWORD" in text
    # A user and password on the command line go only with --vcenter-url.
    with pytest.raises(SpecError) as exc:
        resolve_connection(spec_vcenter(), env=SPEC_ENV, flags={"password_file": "/x"})
    assert "--vcenter-password-file: goes with --vcenter-url" in problem(exc)


@pytest.mark.parametrize(("govc_url", "user", "password", "url"), [
    ("vc.example", "govc-user", "pw-govc", "https://vc.example/sdk"),
    ("vc.example:8443", "govc-user", "pw-govc", "https://vc.example:8443/sdk"),
    ("http://vc.example/sdk", "govc-user", "pw-govc", "http://vc.example/sdk"),
    ("https://vc.example/custom", "govc-user", "pw-govc", "https://vc.example/custom"),
    # user:password@ in GOVC_URL, escaped as URLs escape; GOVC_USERNAME/PASSWORD win
    ("me:p%40ss@vc.example", None, None, "https://vc.example/sdk"),
    ("me:p%40ss@vc.example", "govc-user", None, "https://vc.example/sdk"),
    ("me@vc.example", None, "pw-govc", "https://vc.example/sdk"),
])
def test_govc_url_is_read_as_govc_reads_it(govc_url: str, user: str | None,
                                           password: str | None, url: str) -> None:
    env = {"GOVC_URL": govc_url}
    if user:
        env["GOVC_USERNAME"] = user
    if password:
        env["GOVC_PASSWORD"] = password
    if url.startswith("http:"):
        env["GOVC_INSECURE"] = "1"
    vc = resolve_connection(None, env=env).vcenter
    assert vc is not None
    assert vc.url == url  # no user info left in it
    assert vc.user == (user or "me")
    assert vc.password.get_secret_value() == (password or "p@ss")
    assert "@" not in repr(vc) and "p@ss" not in repr(vc) and "pw-govc" not in repr(vc)


def test_govc_username_and_password_naming_a_file_are_read_from_it(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("  from-file\n")
    (tmp_path / "user").write_text("file-user\n")
    vc = resolve_connection(None, env={"GOVC_URL": "vc.example",
                                       "GOVC_USERNAME": str(tmp_path / "user"),
                                       "GOVC_PASSWORD": str(tmp_path / "pw")}).vcenter
    assert vc is not None
    assert vc.user == "file-user" and vc.password.get_secret_value() == "from-file"
    with pytest.raises(SpecError) as exc:
        resolve_connection(None, env={"GOVC_URL": "vc.example", "GOVC_USERNAME": "u",
                                      "GOVC_PASSWORD": str(tmp_path)})
    assert "GOVC_PASSWORD: names a file" in problem(exc) and "directory" in str(exc.value)
    assert str(tmp_path) not in str(exc.value)  # it might have been the password


@pytest.mark.parametrize(("env", "culprit", "words"), [
    ({**FLEET, "FLEET_VCENTER_INSECURE": "maybe"}, "FLEET_VCENTER_INSECURE", '"maybe"'),
    ({**GOVC, "GOVC_INSECURE": "yes"}, "GOVC_INSECURE", "govc would quietly read it as false"),
    ({**FLEET, "FLEET_VCENTER_URL": "https://"}, "FLEET_VCENTER_URL", "not an http(s) URL"),
    ({**GOVC, "GOVC_URL": "https:///sdk"}, "GOVC_URL", "not an http(s) URL"),
    ({**GOVC, "GOVC_URL": "u:hunter2@[::1"}, "GOVC_URL", "IPv6"),
    ({**FLEET, "FLEET_VCENTER_URL": "https://u:hunter2@vc/sdk"}, "FLEET_VCENTER_URL",
     "set FLEET_VCENTER_USER and FLEET_VCENTER_PASSWORD or FLEET_VCENTER_PASSWORD_FILE"),
    ({**FLEET, "FLEET_VCENTER_URL": "http://vc/sdk"}, "FLEET_VCENTER_INSECURE", "plain http"),
    ({**GOVC, "GOVC_URL": "http://vc/sdk"}, "GOVC_INSECURE", "plain http"),
    ({"FLEET_VCENTER_URL": "vc", "FLEET_VCENTER_PASSWORD": "hunter2"}, "FLEET_VCENTER_USER",
     "is required"),
    ({**FLEET, "FLEET_VCENTER_PASSWORD_FILE": "/x"}, "FLEET_VCENTER_PASSWORD_FILE",
     "not both"),
    ({**FLEET, "FLEET_VCENTER_PASSWORD": "", "FLEET_VCENTER_PASSWORD_FILE": "/dev/zero"},
     "FLEET_VCENTER_PASSWORD_FILE", "character device, not a regular file"),
    ({**FLEET, "FLEET_VCENTER_PASSWORD": "", "FLEET_VCENTER_PASSWORD_FILE": "/"},
     "FLEET_VCENTER_PASSWORD_FILE", "directory, not a regular file"),
    ({**FLEET, "FLEET_VCENTER_PASSWORD": "", "FLEET_VCENTER_PASSWORD_FILE": "/no/such/pw"},
     "FLEET_VCENTER_PASSWORD_FILE", "No such file"),
    ({**FLEET, "FLEET_VCENTER_THUMBPRINT": THUMB_A, "FLEET_VCENTER_INSECURE": "1"},
     "FLEET_VCENTER_INSECURE", "choose one of FLEET_VCENTER_THUMBPRINT and"),
    ({**FLEET, "FLEET_VCENTER_THUMBPRINT": "AB:CD"}, "FLEET_VCENTER_THUMBPRINT",
     "not a SHA-256 fingerprint"),
    ({**FLEET, "FLEET_VCENTER_THUMBPRINT": ":".join(["AB"] * 20)}, "FLEET_VCENTER_THUMBPRINT",
     "SHA-1"),
    ({**GOVC, "GOVC_INSECURE": "true", "GOVC_TLS_CA_CERTS": "/no/such.pem"},
     "GOVC_TLS_CA_CERTS", "No such file"),
    ({**GOVC, "GOVC_TLS_CA_CERTS": f"/a.pem{os.pathsep}"}, "GOVC_TLS_CA_CERTS", "empty entry"),
    ({"GOVC_URL": "vc.example", "GOVC_PASSWORD": "hunter2"}, "GOVC_URL", "names no user"),
    ({"GOVC_URL": "me@vc.example"}, "GOVC_URL", "comes with no password"),
    ({"GOVC_USERNAME": "me"}, "GOVC_USERNAME", "no vCenter is named"),
    ({"FLEET_VCENTER_THUMBPRINT": THUMB_A}, "FLEET_VCENTER_THUMBPRINT", "no vCenter is named"),
    ({"FLEET_VCENTER_USER": "me"}, "FLEET_VCENTER_USER", "FLEET_VCENTER_URL is not"),
])
def test_a_bad_or_incomplete_variable_is_named(env: dict[str, str], culprit: str,
                                               words: str) -> None:
    with pytest.raises(SpecError) as exc:
        resolve_connection(None, env=env)
    text = problem(exc)
    assert text.startswith(f"environment: {culprit}: "), text
    assert words in text


def test_a_ca_list_in_govc_tls_ca_certs_is_every_file(tmp_path: Path) -> None:
    one, two = tmp_path / "one.pem", tmp_path / "two.pem"
    one.write_bytes(certs.generate().cert_pem)
    two.write_bytes(certs.generate().cert_pem)
    vc = resolve_connection(None, env={**GOVC, "GOVC_TLS_CA_CERTS":
                                       f"{one}{os.pathsep}{two}"}).vcenter
    assert vc is not None and vc.ca_paths == (str(one), str(two))
    assert not vc.insecure and vc.thumbprint is None
    (tmp_path / "empty.pem").write_text("")
    with pytest.raises(SpecError) as exc:
        resolve_connection(None, env={**GOVC, "GOVC_TLS_CA_CERTS":
                                      f"{one}{os.pathsep}{tmp_path / 'empty.pem'}"})
    assert "GOVC_TLS_CA_CERTS: " in problem(exc) and "holds no PEM certificate" in str(exc.value)


def test_govc_insecure_reads_what_govc_reads() -> None:
    for value, insecure in (("1", True), ("TRUE", True), ("true", True), ("0", False),
                            ("false", False), ("", False)):
        vc = resolve_connection(None, env={**GOVC, "GOVC_INSECURE": value}).vcenter
        assert vc is not None and vc.insecure is insecure, value


def test_fleet_trust_variables_stand_in_for_govcs(tmp_path: Path) -> None:
    """govc has no thumbprint variable: FLEET_VCENTER_THUMBPRINT pins GOVC_URL's server,
    and replaces GOVC_INSECURE (FLEET_* above GOVC_*), which is reported as ignored."""
    found = resolve_connection(None, env={**GOVC, "GOVC_INSECURE": "1",
                                          "FLEET_VCENTER_THUMBPRINT": THUMB_A})
    vc = found.vcenter
    assert vc is not None and found.origin == "GOVC_URL"
    assert vc.thumbprint == THUMB_A and not vc.insecure
    assert vc.password.get_secret_value() == "pw-govc"
    assert found.ignored == ("GOVC_INSECURE",)


def test_fleet_insecure_allows_a_plain_http_govc_url() -> None:
    """FLEET_VCENTER_INSECURE stands in for GOVC_INSECURE, for http too."""
    found = resolve_connection(None, env={**GOVC, "GOVC_URL": "http://127.0.0.1:9/sdk",
                                          "FLEET_VCENTER_INSECURE": "yes"})
    assert found.vcenter is not None and found.vcenter.insecure
    assert found.vcenter.url == "http://127.0.0.1:9/sdk"


def test_trust_flags_apply_to_whichever_vcenter_wins(tmp_path: Path) -> None:
    vc = spec_vcenter(thumbprint=THUMB_A)
    found = resolve_connection(vc, env=SPEC_ENV, flags={"thumbprint": THUMB_B})
    assert found.vcenter is not None and found.vcenter.thumbprint == THUMB_B
    assert found.vcenter.password.get_secret_value() == "pw-spec"
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certs.generate().cert_pem)
    found = resolve_connection(vc, env=SPEC_ENV, flags={"ca_file": str(ca)})
    assert found.vcenter is not None
    assert found.vcenter.thumbprint is None and found.vcenter.ca_paths == (str(ca),)
    assert vc.thumbprint == THUMB_A  # the spec's own table is not changed
    found = resolve_connection(None, env=GOVC, flags={"insecure": True})
    assert found.vcenter is not None and found.vcenter.insecure
    with pytest.raises(SpecError) as exc:
        resolve_connection(None, env={}, flags={"thumbprint": THUMB_B})
    assert "--vcenter-thumbprint: is given but no vCenter is named" in problem(exc)
    with pytest.raises(SpecError) as exc:
        resolve_connection(vc, env=SPEC_ENV, flags={"thumbprint": THUMB_B, "insecure": True})
    assert "choose one of --vcenter-thumbprint and --vcenter-insecure" in problem(exc)


def test_an_empty_variable_is_unset_as_in_govc() -> None:
    assert resolve_connection(None, env={"GOVC_URL": "", "FLEET_VCENTER_URL": "",
                                         "GOVC_INSECURE": ""}).vcenter is None


@pytest.mark.parametrize("env, named", [
    ({**GOVC, "GOVC_INSECURE": "1"}, "GOVC_INSECURE"),
    ({**GOVC, "FLEET_VCENTER_INSECURE": "true"}, "FLEET_VCENTER_INSECURE"),
])
def test_the_insecure_warning_names_the_setting_that_asked_for_it(
        env: dict[str, str], named: str, caplog: pytest.LogCaptureFixture) -> None:
    """A user who set GOVC_INSECURE looks for GOVC_INSECURE, not a spec key never set."""
    vc = resolve_connection(None, env=env).vcenter
    assert vc is not None and vc.insecure and vc.insecure_from == named
    options = TlsOptions(insecure=vc.insecure, insecure_from=vc.insecure_from)
    with caplog.at_level(logging.WARNING, logger="fleet.vsphere"):
        assert ssl_for(options, vc.url) is False
    warned = [r.getMessage() for r in caplog.records if "verification is OFF" in r.getMessage()]
    assert len(warned) == 1 and f"({named})" in warned[0] and "vcenter.insecure" not in warned[0]
