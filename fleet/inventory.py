"""A fleet's members as inventories for other tools, and writing one to a file.

The four formats of ``fleet inventory``, ``fleet provision --inventory`` and
``GET /v1/fleets/{name}/inventory`` (docs/inventory.md), each made from the same
:class:`~fleet.engine.members.MemberRecord` values:

- ``json``: ``{"fleet": NAME, "members": [record, ...]}``, every field of each record;
- ``ansible``: a YAML inventory (``ansible-inventory -i FILE --list`` reads it): every
  member a host of the group ``fleet_<name>``, with ``ansible_host`` its primary
  address and its record's fields as host variables ``member_<field>``; groups by
  ESXi host (``host_<host>``) and by source (``source_<source>``); members without
  an address of their own yet are also in ``fleet_<name>_no_address`` (so a play
  can say ``hosts: fleet_lt:!fleet_lt_no_address``) and have no ``ansible_host``;
- ``hosts``: ``/etc/hosts`` lines, ``ADDRESS NAME``, the primary address of each
  member that has one; a member without one is a comment saying why;
- ``csv``: a header, then one row per member (RFC 4180, the standard library's
  writer; lists space-separated).

:func:`write_output` writes one where the user said, without ever leaving half a
file behind (see its docstring); :func:`check_output` says beforehand whether it
will be able to, so ``provision --inventory`` refuses a bad path before it
changes anything.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import stat
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import yaml

from fleet.engine.members import MemberRecord
from fleet.errors import ConfigError

FORMATS = ("json", "ansible", "hosts", "csv")
CONTENT_TYPES = {"json": "application/json", "ansible": "application/yaml",
                 "hosts": "text/plain", "csv": "text/csv"}
#: the format a file's suffix implies when none is given
_BY_SUFFIX = {".json": "json", ".yml": "ansible", ".yaml": "ansible", ".csv": "csv",
              ".hosts": "hosts"}
CSV_COLUMNS = ("name", "index", "fleet", "state", "ip", "ip_addresses", "macs",
               "address_status", "host", "datastore", "datastores", "source", "vm",
               "power_state", "instance_uuid", "run_id", "created_at", "ready_at",
               "expires_at")
_GROUP_CHARS = re.compile(r"[^A-Za-z0-9_]")


def check_format(value: str, *, key: str) -> str:
    """``value`` if it is a format, else ConfigError naming ``key`` and the value."""
    if value not in FORMATS:
        raise ConfigError(f"{value!r} is not an inventory format; use one of "
                          f"{', '.join(FORMATS)}", key=key)
    return value


def format_for(path: str | None, given: str | None, *, key: str) -> str:
    """The format asked for, else the one ``path``'s suffix implies, else json."""
    if given is not None:
        return check_format(given, key=key)
    if path is not None and path != "-":
        suffix = os.path.splitext(path)[1].lower()
        if suffix in _BY_SUFFIX:
            return _BY_SUFFIX[suffix]
        if os.path.basename(path) == "hosts":
            return "hosts"
    return "json"


def render(fmt: str, fleet: str, records: Sequence[MemberRecord]) -> str:
    """The inventory of ``records`` in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "json":
        return json.dumps({"fleet": fleet, "members": [r.to_dict() for r in records]},
                          indent=2) + "\n"
    if fmt == "ansible":
        return _ansible(fleet, records)
    if fmt == "hosts":
        return _hosts(fleet, records)
    if fmt == "csv":
        return _csv(records)
    raise ConfigError(f"{fmt!r} is not an inventory format; use one of "
                      f"{', '.join(FORMATS)}", key="format")


def group_name(prefix: str, name: str) -> str:
    """An Ansible group name: letters, digits and underscores only (Ansible warns about,
    and may rewrite, any other character)."""
    return f"{prefix}_{_GROUP_CHARS.sub('_', name)}"


def _host_vars(record: MemberRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if record.ip is not None:
        out["ansible_host"] = record.ip
    for key, value in record.to_dict().items():
        out[f"member_{key}"] = value
    return out


def _ansible(fleet: str, records: Sequence[MemberRecord]) -> str:
    fleet_group = group_name("fleet", fleet)
    children: dict[str, dict[str, Any]] = {
        fleet_group: {"hosts": {r.name: _host_vars(r) for r in records}}}
    missing = [r.name for r in records if r.ip is None]
    if missing:
        children[f"{fleet_group}_no_address"] = {"hosts": dict.fromkeys(missing)}
    for prefix, attr in (("host", "host"), ("source", "source")):
        groups: dict[str, dict[str, None]] = {}
        for r in records:
            value = getattr(r, attr)
            if value:
                groups.setdefault(group_name(prefix, value), {})[r.name] = None
        for name in sorted(groups):
            children.setdefault(name, {"hosts": {}})["hosts"].update(groups[name])
    header = (f"# Ansible inventory of fleet {fleet}: {len(records)} members, "
              f"{len(records) - len(missing)} with an address (made by fleet)\n")
    body = yaml.safe_dump({"all": {"children": children}}, default_flow_style=False,
                          sort_keys=False, allow_unicode=True)
    return header + body


def _hosts(fleet: str, records: Sequence[MemberRecord]) -> str:
    lines = [f"# fleet {fleet}: {len(records)} members"]
    for r in records:
        if r.ip is None:
            lines.append(f"# {r.name}: no address of its own yet ({r.address_status})")
        else:
            lines.append(f"{r.ip}\t{r.name}")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def _csv(records: Sequence[MemberRecord]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for r in records:
        row = r.to_dict()
        writer.writerow([_cell(row[c]) for c in CSV_COLUMNS])
    return out.getvalue()


# -- writing -----------------------------------------------------------------------

def _kind(path: str) -> str:
    """``new``, ``regular``, ``stream`` (a FIFO or character device: written in place),
    or what makes it refused."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "new"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return "regular"
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return "stream"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_output(path: str, *, key: str) -> None:
    """ConfigError (naming ``key`` and ``path``) if :func:`write_output` cannot write
    there: checked before a run, so a typo does not cost a provisioning."""
    if path == "-":
        return
    try:
        kind = _kind(path)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}", key=key) from None
    if kind == "stream":
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{path}: not writable", key=key)
        return
    if kind not in ("new", "regular"):
        raise ConfigError(f"{path} is {kind}; give a file to write the inventory to",
                          key=key)
    real = os.path.realpath(path)
    parent = os.path.dirname(real) or "."
    if not os.path.isdir(parent):
        raise ConfigError(f"{path}: the directory {parent} does not exist", key=key)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: the directory {parent} is not writable (the file is "
                          "written beside it first, then renamed)", key=key)
    if kind == "regular" and not os.access(real, os.W_OK):
        raise ConfigError(f"{path}: not writable", key=key)


def write_output(path: str, text: str, *, key: str) -> None:
    """Write ``text`` to ``path``: ``-`` is standard output; a regular file (or a new
    one) is written whole beside its target, flushed to disk, then renamed over it
    (``os.replace``), so a reader sees the old file or the new one, never part of one,
    and a failure leaves the old one (a symbolic link is followed, and stays); a FIFO
    or character device (``/dev/stdout``, a pipe, ``/dev/null``) is written in place,
    since it cannot be replaced (a FIFO without a reader is refused rather than waited
    for); anything else (a directory, a block device, a socket) is refused.
    ConfigError names ``key``, the path and the reason."""
    data = text.encode("utf-8")
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    check_output(path, key=key)
    try:
        if _kind(path) == "stream":
            _write_stream(path, data)
        else:
            _write_replacing(os.path.realpath(path), data)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}", key=key) from None


def _write_stream(path: str, data: bytes) -> None:
    # O_NONBLOCK: opening a FIFO nobody reads fails (ENXIO) instead of hanging.
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        os.set_blocking(fd, True)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    finally:
        os.close(fd)


def _write_replacing(real: str, data: bytes) -> None:
    parent = os.path.dirname(real) or "."
    try:
        mode = stat.S_IMODE(os.stat(real).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(real)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
