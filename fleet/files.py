"""Reading the files users name: specs, service configs, topologies, secrets, certificates.

Every file fleet reads because a user named it goes through :func:`read_user_file`:

- opened with ``O_NONBLOCK``, so opening a FIFO returns at once instead of
  waiting for a writer that may never come;
- checked on the open descriptor (``fstat``): only a regular file is read. A
  FIFO, device (``/dev/zero``), socket or directory is refused before a byte is
  read. Checking the path first and opening it after would leave a window in
  which it can be swapped;
- read up to a cap (:data:`SECRET_MAX_BYTES` for a password or token,
  :data:`CONFIG_MAX_BYTES` for TOML, :data:`PEM_MAX_BYTES` for certificates):
  past it the file is refused without reading the rest.

TOML goes through :func:`parse_toml`, which also refuses nesting deeper than
:data:`MAX_NESTING` (``a = [[[[...`` 5,000 deep made tomllib recurse until
``RecursionError``; a shallower but deep document would do the same to the
validators after it), tables or arrays larger than :data:`MAX_TABLE_KEYS` or
:data:`MAX_ARRAY_ITEMS`, and documents of more than :data:`MAX_VALUES` values.

Errors are :class:`FileProblem`: the reason, never the file's content (a
secret file's bytes must not reach a message); callers add the file and key.
The caps and why each is where it is: docs/limits.md.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from typing import Any

#: a password or API token: a few KiB is far more than any real one
SECRET_MAX_BYTES = 4 * 1024
#: a fleet spec, service config or simulator topology (real ones are a few KiB;
#: tomllib parses about 1 MiB a second, so this also bounds the time spent)
CONFIG_MAX_BYTES = 2 * 1024 * 1024
#: a PEM certificate or CA bundle (the system's whole bundle is about 200 KiB)
PEM_MAX_BYTES = 1024 * 1024
#: tables and arrays inside each other; fleet's own files need fewer than 5
MAX_NESTING = 32
#: keys in one table, items in one array: far past any real file (a spec lists at most
#: 5,000 sources), short of what makes validating and reporting on it slow (a 2 MiB
#: file of 184,000 unknown keys took 5 s and 250 MB to refuse)
MAX_TABLE_KEYS = 1_000
MAX_ARRAY_ITEMS = 10_000
#: keys and items in the whole document: a spec listing 5,000 sources as tables with
#: a chain budget each holds 15,000; 5,000 tables of 40 unknown keys (1.2 MB) made
#: 205,000 problems, 4.7 s and 290 MB to report
MAX_VALUES = 50_000

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


class FileProblem(Exception):
    """A file fleet will not use. ``str()`` is the reason; ``key`` is where in it
    (a dotted TOML key), when known."""

    def __init__(self, reason: str, *, key: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key = key


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` (mode 0600) so that a crash leaves the old file or
    the new one, never a mix: a temporary file beside it, fsynced, renamed over it."""
    target = os.fspath(path)
    head, name = os.path.split(target)
    tmp = os.path.join(head, f".{name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)


def read_user_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; :class:`FileProblem` if
    it cannot be opened, is not a regular file or is larger."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FileProblem(exc.strerror or type(exc).__name__) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
            raise FileProblem(f"it is {kind}, not a regular file")
        if st.st_size > limit:
            raise FileProblem(f"it is {st.st_size} bytes; the limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # the file may grow while read (or lie about its size: /proc)
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FileProblem(f"it is larger than the limit of {limit} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise FileProblem(exc.strerror or type(exc).__name__) from None
    finally:
        os.close(fd)


def decode_utf8(raw: bytes) -> str:
    """UTF-8 text; the problem names the offset of the first bad byte, never the bytes."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileProblem(f"it is not UTF-8 text (invalid byte at offset {exc.start})") \
            from None


def read_secret_file(path: str | os.PathLike[str]) -> str:
    """A password or token kept in a file: UTF-8, at most :data:`SECRET_MAX_BYTES`,
    without its trailing line break. Empty is a :class:`FileProblem`."""
    value = decode_utf8(read_user_file(path, SECRET_MAX_BYTES)).rstrip("\r\n")
    if not value:
        raise FileProblem("it is empty")
    return value


def parse_toml(raw: bytes) -> dict[str, Any]:
    """Parse TOML; :class:`FileProblem` ("not valid TOML: ...") naming the line or key."""
    text = decode_utf8(raw)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FileProblem(f"not valid TOML: {exc}") from None
    except RecursionError:
        # Arrays or inline tables nested hundreds deep: tomllib recurses per level.
        line, key = _deep_line(text)
        raise FileProblem(f"arrays or tables nested more than {MAX_NESTING} deep (line {line})",
                          key=key) from None
    problem = _shape_problem(data)
    if problem is not None:
        path, reason = problem
        raise FileProblem(reason, key=_dotted(path) or None)
    return data


def _shape_problem(data: dict[str, Any]) -> tuple[tuple[str | int, ...], str] | None:
    """(path, reason) of the first value nested deeper than MAX_NESTING or larger than
    the caps, or None. Iterative: no recursion over a hostile document."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    values = 0
    while stack:
        node, path = stack.pop()
        if len(path) > MAX_NESTING:
            return path, f"arrays or tables nested more than {MAX_NESTING} deep"
        if isinstance(node, dict) and len(node) > MAX_TABLE_KEYS:
            return path, f"a table of {len(node)} keys; the limit is {MAX_TABLE_KEYS}"
        if isinstance(node, list) and len(node) > MAX_ARRAY_ITEMS:
            return path, f"an array of {len(node)} items; the limit is {MAX_ARRAY_ITEMS}"
        values += len(node)
        if values > MAX_VALUES:
            return (), f"it holds more than {MAX_VALUES} keys and array items in all"
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(value, dict | list):
                stack.append((value, (*path, key)))
    return None


def _dotted(path: tuple[str | int, ...], shown: int = 4) -> str:
    out = ""
    for part in path[:shown]:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            plain = re.fullmatch(r"[A-Za-z0-9_-]+", part) is not None
            out += ("." if out else "") + (part if plain else json.dumps(part))
    return out + ("..." if len(path) > shown else "")


# Outside strings and comments, only brackets and braces change the nesting.
_TOKENS = re.compile(r'"""(?:[^"\\]|\\.|"(?!""))*"""|\'\'\'.*?\'\'\'|"(?:[^"\\\n]|\\.)*"'
                     r"|'[^'\n]*'|#[^\n]*|[\[\]{}\n]", re.S)
_KEY = re.compile(r"\s*([^=#\[\]{}]+?)\s*=")


def _deep_line(text: str) -> tuple[int, str | None]:
    """(line, key) where nesting first passes MAX_NESTING: a lexical scan, used only to
    say where a document too deep for tomllib goes wrong."""
    depth, line, start_line = 0, 1, 1
    for m in _TOKENS.finditer(text):
        token = m.group()
        if token in "[{":
            if depth == 0:
                start_line = line
            depth += 1
            if depth > MAX_NESTING:
                break
        elif token in "]}":
            depth = max(0, depth - 1)
        else:
            line += token.count("\n")
    else:
        return line, None
    lines = text.split("\n", start_line)
    key = _KEY.match(lines[start_line - 1]) if len(lines) >= start_line else None
    return line, (key.group(1)[:60] if key else None)
