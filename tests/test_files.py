"""fleet.files: every file a user names is read regular-only, capped, without blocking,
and TOML is refused past the nesting and size caps, naming where."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from fleet.files import (
    MAX_NESTING,
    FileProblem,
    decode_utf8,
    parse_toml,
    read_secret_file,
    read_user_file,
)


def test_a_regular_file_within_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_user_file(path, 100) == b"x" * 100
    with pytest.raises(FileProblem, match="it is 101 bytes; the limit is 100"):
        path.write_bytes(b"x" * 101)
        read_user_file(path, 100)


@pytest.mark.parametrize(("path", "kind"), [("/dev/zero", "a character device"),
                                            ("/", "a directory")])
def test_devices_and_directories_are_refused(path: str, kind: str) -> None:
    with pytest.raises(FileProblem, match=f"it is {kind}, not a regular file"):
        read_user_file(path, 4096)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(read_user_file(fifo, 4096))
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():  # blocked in open(): release it, then fail
        with open(fifo, "wb"):
            pass
        reader.join(10)
        pytest.fail("opening a FIFO blocked until a writer came")
    assert isinstance(outcome[0], FileProblem), outcome
    assert str(outcome[0]) == "it is a FIFO, not a regular file"


def test_a_socket_and_a_missing_file(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        with pytest.raises(FileProblem):
            read_user_file(tmp_path / "sock", 4096)
    with pytest.raises(FileProblem, match="No such file or directory"):
        read_user_file(tmp_path / "nope", 4096)


def test_a_file_whose_size_lies_is_still_capped() -> None:
    """/proc files say 0 bytes and hold more: the read stops at the cap + 1."""
    with pytest.raises(FileProblem, match="larger than the limit of 10 bytes"):
        read_user_file("/proc/self/status", 10)


def test_secrets_are_utf8_without_the_line_break(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_bytes("pässword\r\n".encode())
    assert read_secret_file(path) == "pässword"
    path.write_bytes(b"\n")
    with pytest.raises(FileProblem, match="it is empty"):
        read_secret_file(path)
    path.write_bytes(b"ab\xffcd")
    with pytest.raises(FileProblem) as info:
        read_secret_file(path)
    assert str(info.value) == "it is not UTF-8 text (invalid byte at offset 2)"
    assert decode_utf8(b"ok") == "ok"


def test_toml_nesting_names_the_key() -> None:
    ok = "a = " + "[" * MAX_NESTING + "]" * MAX_NESTING
    assert parse_toml(ok.encode())["a"]
    deep = "x = 1\nb = " + "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1)
    with pytest.raises(FileProblem) as info:
        parse_toml(deep.encode())
    assert info.value.key == "b[0][0][0]..."
    hopeless = '# [[[\ns = "[[[["\nc = ' + "{x = " * 3000 + "1" + "}" * 3000
    with pytest.raises(FileProblem) as info:
        parse_toml(hopeless.encode())
    assert info.value.key == "c"
    assert str(info.value) == f"arrays or tables nested more than {MAX_NESTING} deep (line 3)"


def test_toml_syntax_and_size_errors() -> None:
    with pytest.raises(FileProblem, match=r"^not valid TOML: "):
        parse_toml(b"a = ")
    with pytest.raises(FileProblem, match="not UTF-8"):
        parse_toml(b"a = '\xff'")
    with pytest.raises(FileProblem) as info:
        parse_toml(("[t]\n" + "".join(f"k{i} = 1\n" for i in range(1001))).encode())
    assert (info.value.key, str(info.value)) == ("t", "a table of 1001 keys; the limit is 1000")
    many = "".join(f"[t{i}]\n" + "".join(f"k{j} = 1\n" for j in range(100)) for i in range(501))
    with pytest.raises(FileProblem, match="more than 50000 keys and array items in all"):
        parse_toml(many.encode())
