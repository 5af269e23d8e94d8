"""Which vCenter a command talks to: command-line flags, the spec's ``[vcenter]``, the
environment (``FLEET_VCENTER_*``, then govc's ``GOVC_*``), or none.

:func:`resolve_connection` is the one place that decides, for the CLI and for
``fleet serve``'s config alike. The rules (docs/connecting.md):

1. The vCenter is named by the first of ``--vcenter-url``, the spec's ``[vcenter]``
   table, ``FLEET_VCENTER_URL`` and ``GOVC_URL``.
2. A password goes only where it was paired: the user and password come from the
   same place as the URL (the flags, the spec's table, the ``FLEET_VCENTER_*`` set or
   the ``GOVC_*`` set), never from another. ``GOVC_PASSWORD`` is never sent to
   ``FLEET_VCENTER_URL``'s host, nor ``FLEET_VCENTER_PASSWORD`` to ``GOVC_URL``'s.
3. How the server is trusted (a pinned thumbprint, a CA file, or not at all) comes
   from the trust flags when given; else from the URL's own place; for ``GOVC_URL``,
   ``FLEET_VCENTER_THUMBPRINT``/``_CA_FILE``/``_INSECURE`` take the place of
   ``GOVC_TLS_CA_CERTS``/``GOVC_INSECURE`` (govc has no thumbprint variable).
4. Variables below the place that won are ignored, and the caller is told which
   (:attr:`Connection.ignored`). Variables that were meant to reach a vCenter but
   cannot (a password without its URL, a URL without a user) are errors: fleet never
   falls back to the built-in simulator when the user evidently meant a vCenter.

``GOVC_*`` values are read as govc reads them (govmomi's ``soap.ParseURL``,
``session.Secret`` and ``SetRootCAs``): ``GOVC_URL`` may be a bare host (https and
``/sdk`` by default) and may carry ``user:password@``, which ``GOVC_USERNAME`` and
``GOVC_PASSWORD`` override; a ``GOVC_USERNAME`` or ``GOVC_PASSWORD`` that names a
file is read from it; ``GOVC_TLS_CA_CERTS`` lists files separated by ``os.pathsep``.
Where govc silently reads a value as false (``GOVC_INSECURE=yes``) fleet refuses it.

Every problem is a :class:`~fleet.engine.spec_model.SpecError` naming the variable or
flag; a secret's value is never shown, and a URL only redacted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr, ValidationError

from fleet.engine.spec_checks import (
    check_ca_files,
    read_secret,
    thumbprint_problem,
)
from fleet.engine.spec_model import PATH_SHOWN, SpecError, VCenterSpec, show
from fleet.files import FileProblem, read_secret_file
from fleet.urls import redact_url, url_problem

#: fleet's own variables, by the field of ``[vcenter]`` each stands for
FLEET_VARS = {
    "url": "FLEET_VCENTER_URL", "user": "FLEET_VCENTER_USER",
    "password": "FLEET_VCENTER_PASSWORD", "password_file": "FLEET_VCENTER_PASSWORD_FILE",
    "thumbprint": "FLEET_VCENTER_THUMBPRINT", "ca_file": "FLEET_VCENTER_CA_FILE",
    "insecure": "FLEET_VCENTER_INSECURE",
}
#: govc's, read when fleet's name no vCenter
GOVC_VARS = {
    "url": "GOVC_URL", "user": "GOVC_USERNAME", "password": "GOVC_PASSWORD",
    "ca_file": "GOVC_TLS_CA_CERTS", "insecure": "GOVC_INSECURE",
}
#: the command line's (a password never: only a file holding it)
FLAGS = {
    "url": "--vcenter-url", "user": "--vcenter-user",
    "password_file": "--vcenter-password-file", "thumbprint": "--vcenter-thumbprint",
    "ca_file": "--vcenter-ca-file", "insecure": "--vcenter-insecure",
}
TRUST = ("thumbprint", "ca_file", "insecure")
#: every variable that means "a vCenter, please"
CONNECTION_VARS = (*FLEET_VARS.values(), *GOVC_VARS.values())
HOW_TO_POINT = ("name one with --spec FILE whose [vcenter] table says where it is, or "
                "set FLEET_VCENTER_URL (with FLEET_VCENTER_USER and FLEET_VCENTER_PASSWORD "
                "or FLEET_VCENTER_PASSWORD_FILE), or govc's GOVC_URL (with GOVC_USERNAME and "
                "GOVC_PASSWORD); see docs/connecting.md")

_SCHEME = re.compile(r"^\w+://")
_FLEET_TRUE = {"1", "true", "yes", "on"}
_FLEET_FALSE = {"0", "false", "no", "off"}
# govc reads exactly these as true (strings.ToLower, then "1" or "true"); fleet also
# takes their opposites, and refuses the rest, which govc would quietly read as false.
_GOVC_TRUE = {"1", "true"}
_GOVC_FALSE = {"0", "false"}


@dataclass(frozen=True)
class Connection:
    """The vCenter chosen, or None for none. ``origin`` says where it came from
    ("the spec's [vcenter]", "GOVC_URL", ...); ``ignored`` lists what was set but lost
    to a place above it."""

    vcenter: VCenterSpec | None
    origin: str | None = None
    ignored: tuple[str, ...] = field(default=())


def _set(env: Mapping[str, str], names: Mapping[str, str]) -> dict[str, str]:
    """The fields whose variable is set and not empty (empty is unset, as in govc)."""
    return {f: env[v] for f, v in names.items() if env.get(v)}


def _flag_values(flags: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (flags or {}).items() if v not in (None, False, "")}


def resolve_connection(spec_vc: VCenterSpec | None, *, env: Mapping[str, str] | None = None,
                       flags: Mapping[str, Any] | None = None,
                       spec_origin: str = "the spec's [vcenter]",
                       cwd: Path | None = None) -> Connection:
    """The vCenter to use under the rules of this module's docstring. ``spec_vc`` is a
    spec's (or the service config's) resolved ``[vcenter]``, ``flags`` maps the fields of
    :data:`FLAGS` to what the command line gave. A :class:`SpecError` when what was given
    is wrong or incomplete."""
    env = os.environ if env is None else env
    base = Path.cwd() if cwd is None else cwd
    given = _flag_values(flags)
    fleet = _set(env, FLEET_VARS)
    govc = _set(env, GOVC_VARS)
    unknown = set(given) - set(FLAGS)
    if unknown:
        raise ValueError(f"no such vCenter flag: {sorted(unknown)}")
    if given.keys() & {"user", "password_file"} and "url" not in given:
        which = FLAGS["user" if "user" in given else "password_file"]
        raise SpecError([(which, "goes with --vcenter-url (a user and password are only sent "
                                 "to the URL given beside them)")], source="command line")
    trust_flags = {k: v for k, v in given.items() if k in TRUST}

    vc: VCenterSpec | None
    if "url" in given:
        vc, origin = _from_fleet_style(given, FLAGS, "command line", base), FLAGS["url"]
        below = {**{FLEET_VARS[f]: v for f, v in fleet.items()},
                 **{GOVC_VARS[f]: v for f, v in govc.items()}}
    elif spec_vc is not None:
        vc, origin = spec_vc, spec_origin
        below = {**{FLEET_VARS[f]: v for f, v in fleet.items()},
                 **{GOVC_VARS[f]: v for f, v in govc.items()}}
        # The spec's own password variable is not "ignored": it is in use.
        below.pop(spec_vc.password_env or "", None)
    elif "url" in fleet:
        vc, origin = _from_fleet_style(fleet, FLEET_VARS, "environment", base), \
            FLEET_VARS["url"]
        below = {GOVC_VARS[f]: v for f, v in govc.items()}
    else:
        paired = [FLEET_VARS[f] for f in ("user", "password", "password_file") if f in fleet]
        if paired:
            raise SpecError([(paired[0], "is set but FLEET_VCENTER_URL is not: a user and "
                              "password are only sent to the vCenter named beside them; "
                              "set FLEET_VCENTER_URL" + (
                                  f" (GOVC_URL's vCenter takes GOVC_USERNAME and "
                                  f"GOVC_PASSWORD, not {paired[0]})" if "url" in govc
                                  else ""))], source="environment")
        if "url" in govc:
            # FLEET_* above GOVC_*: fleet's trust variables, if any, stand in for govc's.
            fleet_trust = {f: v for f, v in fleet.items() if f in TRUST}
            vc, origin = _from_govc(govc, base, fleet_trust), GOVC_VARS["url"]
            below = {GOVC_VARS[f]: v for f, v in govc.items() if f in TRUST} \
                if fleet_trust else {}
        elif fleet or govc:
            name = next(iter([FLEET_VARS[f] for f in fleet] + [GOVC_VARS[f] for f in govc]))
            raise SpecError([(name, "is set but no vCenter is named: set FLEET_VCENTER_URL "
                                    "or GOVC_URL (or unset it to use the built-in "
                                    "simulator)")], source="environment")
        else:
            vc, origin, below = None, None, {}
    if trust_flags:
        if vc is None:
            name = FLAGS[next(iter(trust_flags))]
            raise SpecError([(name, "is given but no vCenter is named; " + HOW_TO_POINT)],
                            source="command line")
        vc = _with_trust(vc, trust_flags, FLAGS, "command line", base)
    return Connection(vc, origin, tuple(sorted(below)))


def _problem(key: str, message: str, source: str) -> SpecError:
    return SpecError([(key, message)], source=source)


def _insecure(value: Any, name: str, source: str, *, govc: bool = False) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    true, false = (_GOVC_TRUE, _GOVC_FALSE) if govc else (_FLEET_TRUE, _FLEET_FALSE)
    if text in true:
        return True
    if text in false:
        return False
    words = "1 or true, 0 or false" if govc else "1, true, yes or on; 0, false, no or off"
    extra = " (govc would quietly read it as false)" if govc else ""
    raise _problem(name, f"{show(str(value))} is not a boolean: use {words}{extra}", source)


def _endpoint(raw: str, name: str, source: str) -> tuple[str, str | None, str | None]:
    """(URL without user info, user, password) from a URL as govc takes it: no scheme
    means https, no path means /sdk. Messages show the URL redacted."""
    text = raw if _SCHEME.match(raw) else "https://" + raw
    user = password = None
    scheme = _SCHEME.match(text)
    assert scheme is not None
    rest = text[scheme.end():]
    if "@" in rest:
        # User info is everything up to the last "@", as redact_url takes it: a password
        # may hold "@", "/" or "?" unescaped.
        userinfo, _, rest = rest.rpartition("@")
        u, colon, p = userinfo.partition(":")
        user, password = unquote(u) or None, (unquote(p) if colon else None) or None
        text = scheme.group() + rest
    problem = url_problem(text)
    if problem:
        raise _problem(name, f"{show(redact_url(raw))} {problem}", source)
    if not urlsplit(text).path:
        text += "/sdk"
    return text, user, password


def _from_fleet_style(values: Mapping[str, Any], names: Mapping[str, str], source: str,
                      base: Path) -> VCenterSpec:
    """A connection from fleet's own variables or the flags: URL, user and one password
    source, all from ``values``."""
    url, url_user, url_password = _endpoint(str(values["url"]), names["url"], source)
    if url_user is not None or url_password is not None:
        raise _problem(names["url"], f"{show(redact_url(str(values['url'])))} has a user name "
                       f"or password in it; set {names['user']} and "
                       + (f"{names['password']} or " if "password" in names else "")
                       + f"{names['password_file']} instead", source)
    if "user" not in values:
        raise _problem(names["user"], f"is required with {names['url']} (the vCenter login, "
                       "like administrator@vsphere.local)", source)
    has_value = "password" in values
    if has_value and "password_file" in values:
        raise _problem(names["password_file"], f"set one of {names['password']} and "
                       f"{names['password_file']}, not both", source)
    if not has_value and "password_file" not in values:
        options = " or ".join(n for f, n in names.items() if f in ("password", "password_file"))
        raise _problem(names["url"], f"names a vCenter but no password is given: set "
                       f"{options}", source)
    vc = _model(url, str(values["user"]), names["url"], source)
    if has_value:
        vc._password = SecretStr(str(values["password"]))
    else:
        secret, problem = read_secret(names["password_file"], None,
                                      str(values["password_file"]), {}, base)
        if problem:
            raise _problem(names["password_file"], problem, source)
        assert secret is not None
        vc._password = secret
    return _with_trust(vc, values, names, source, base)


def _govc_secret(value: str, name: str) -> str:
    """govc's ``session.Secret``: a value naming a file is that file's content, trimmed.
    Read as every user's file is (fleet.files); the value is never shown, since it is a
    password when it is not a path."""
    try:
        is_path = os.path.exists(value)
    except (OSError, ValueError):
        is_path = False
    if not is_path:
        return value
    try:
        content = read_secret_file(value).strip()
    except FileProblem as exc:
        raise _problem(name, f"names a file (govc reads a value that is a path from the "
                       f"file) that cannot be read: {exc.reason}", "environment") from None
    if not content:
        raise _problem(name, "names a file (govc reads a value that is a path from the file) "
                       "that holds only white space", "environment")
    return content


def _from_govc(govc: Mapping[str, str], base: Path,
               fleet_trust: Mapping[str, str]) -> VCenterSpec:
    url, user, password = _endpoint(govc["url"], "GOVC_URL", "environment")
    # As govc: GOVC_USERNAME and GOVC_PASSWORD override what GOVC_URL carries.
    if "user" in govc:
        user = _govc_secret(govc["user"], "GOVC_USERNAME")
    if "password" in govc:
        password = _govc_secret(govc["password"], "GOVC_PASSWORD")
    if not user:
        raise _problem("GOVC_URL", f"{show(redact_url(govc['url']))} names no user: set "
                       "GOVC_USERNAME (or write user:password@ before the host)", "environment")
    if not password:
        raise _problem("GOVC_URL", f"{show(redact_url(govc['url']))} comes with no password: "
                       "set GOVC_PASSWORD (or write user:password@ before the host)",
                       "environment")
    vc = _model(url, user, "GOVC_URL", "environment")
    vc._password = SecretStr(password)
    if fleet_trust:
        return _with_trust(vc, fleet_trust, FLEET_VARS, "environment", base)
    return _with_trust(vc, govc, GOVC_VARS, "environment", base, govc=True)


def _model(url: str, user: str, name: str, source: str) -> VCenterSpec:
    """The ``[vcenter]`` model of a checked URL and a non-empty user (password and trust
    are set after)."""
    try:
        return VCenterSpec(url=url, user=user)
    except ValidationError as exc:  # not expected: both were checked before
        first = exc.errors(include_url=False)[0]
        raise _problem(name, str(first["msg"]).removeprefix("Value error, "), source) from None


def _with_trust(vc: VCenterSpec, values: Mapping[str, Any], names: Mapping[str, str],
                source: str, base: Path, *, govc: bool = False) -> VCenterSpec:
    """``vc`` trusting its server as ``values`` say (thumbprint, CA files, insecure),
    replacing what it had; ``vc`` itself when they say nothing."""
    chosen: dict[str, Any] = {}
    if "insecure" in values:
        chosen["insecure"] = _insecure(values["insecure"], names["insecure"], source,
                                       govc=govc)
    if "thumbprint" in values:
        problem = thumbprint_problem(str(values["thumbprint"]))
        if problem:
            raise _problem(names["thumbprint"], problem, source)
        chosen["thumbprint"] = str(values["thumbprint"])
    paths: tuple[str, ...] = ()
    if "ca_file" in values:
        raw = str(values["ca_file"])
        entries = raw.split(os.pathsep) if govc else [raw]
        if any(not e for e in entries):
            raise _problem(names["ca_file"], f"{show(raw, PATH_SHOWN)} has an empty entry "
                           f"(files are separated by {os.pathsep!r})", source)
        paths, problem = check_ca_files(entries, base)
        if problem:
            raise _problem(names["ca_file"], problem, source)
        chosen["ca_file"] = raw
    out = vc
    if chosen:
        on = [f for f in TRUST if chosen.get(f)]
        if len(on) > 1:
            raise _problem(names[on[1]], f"choose one of {names[on[0]]} and {names[on[1]]}",
                           source)
        # The copy keeps the password (private attributes are copied); the CA paths are
        # this trust's own.
        out = vc.model_copy(update={"thumbprint": chosen.get("thumbprint"),
                                    "ca_file": chosen.get("ca_file"),
                                    "insecure": bool(chosen.get("insecure"))})
        out._ca_paths = paths
        if out.insecure:
            out._insecure_from = names["insecure"]
    if out.url.startswith("http://") and not out.insecure:
        raise _problem(names["insecure"], f"{show(out.url)} is plain http; set "
                       f"{names['insecure']} to allow it", source)
    return out

