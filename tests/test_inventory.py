"""Inventories (fleet.inventory): each format read back by its own parser, and files
written whole or not at all."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleet.engine.members import MemberRecord
from fleet.errors import ConfigError
from fleet.inventory import (
    CSV_COLUMNS,
    FORMATS,
    check_output,
    format_for,
    group_name,
    render,
    write_output,
)


def record(index: int, *, ip: str | None = "10.0.0.2", host: str = "esx-01",
           source: str = "frozen-01") -> MemberRecord:
    addresses = () if ip is None else (ip, f"fd00::{index + 1:x}")
    return MemberRecord(
        name=f"lt-{index:04d}", index=index, fleet="lt", state="ready", vm=f"vm-{index + 40}",
        power_state="poweredOn", ip=ip, ip_addresses=addresses,
        macs=(f"00:50:56:80:00:{index:02x}",), address_status="ok" if ip else "inherited",
        host=host, datastore="ds-01", datastores=("ds-01",), source=source,
        instance_uuid=f"uuid-{index}", run_id="r1", created_at=1_800_000_000.25,
        ready_at=1_800_000_003.0, expires_at=1_800_003_600.0)


RECORDS = [record(0, ip="10.0.0.2"), record(1, ip="10.0.0.3", host="esx-02"),
           record(2, ip=None, source="fleet/other/other-0000")]


def test_json_holds_every_record_field() -> None:
    data = json.loads(render("json", "lt", RECORDS))
    assert data["fleet"] == "lt"
    assert data["members"] == [r.to_dict() for r in RECORDS]
    assert data["members"][2]["ip"] is None and data["members"][2]["ip_addresses"] == []


def test_ansible_inventory_groups_by_fleet_host_and_source_with_host_vars() -> None:
    data = yaml.safe_load(render("ansible", "lt", RECORDS))
    groups = data["all"]["children"]
    hosts = groups["fleet_lt"]["hosts"]
    assert list(hosts) == ["lt-0000", "lt-0001", "lt-0002"]
    assert hosts["lt-0000"]["ansible_host"] == "10.0.0.2"
    assert hosts["lt-0000"]["member_ip_addresses"] == ["10.0.0.2", "fd00::1"]
    assert hosts["lt-0001"]["member_host"] == "esx-02"
    assert "ansible_host" not in hosts["lt-0002"]  # no address of its own: none invented
    assert hosts["lt-0002"]["member_address_status"] == "inherited"
    assert list(groups["fleet_lt_no_address"]["hosts"]) == ["lt-0002"]
    assert list(groups["host_esx_01"]["hosts"]) == ["lt-0000", "lt-0002"]
    assert list(groups["host_esx_02"]["hosts"]) == ["lt-0001"]
    assert list(groups["source_frozen_01"]["hosts"]) == ["lt-0000", "lt-0001"]
    assert list(groups["source_fleet_other_other_0000"]["hosts"]) == ["lt-0002"]
    assert group_name("fleet", "a.b-c d") == "fleet_a_b_c_d"


def test_hosts_lines_name_each_member_with_an_address_and_say_why_not_otherwise() -> None:
    lines = render("hosts", "lt", RECORDS).splitlines()
    entries = [line.split() for line in lines if line and not line.startswith("#")]
    assert entries == [["10.0.0.2", "lt-0000"], ["10.0.0.3", "lt-0001"]]
    assert any("lt-0002" in line and "inherited" in line for line in lines
               if line.startswith("#"))


def test_csv_has_a_header_and_a_row_per_member() -> None:
    rows = list(csv.DictReader(io.StringIO(render("csv", "lt", RECORDS), newline="")))
    assert len(rows) == 3
    assert tuple(rows[0]) == CSV_COLUMNS
    assert rows[0]["ip"] == "10.0.0.2" and rows[0]["ip_addresses"] == "10.0.0.2 fd00::1"
    assert rows[2]["ip"] == "" and rows[2]["source"] == "fleet/other/other-0000"
    assert rows[1]["index"] == "1" and rows[1]["created_at"] == "1800000000.25"


def test_format_comes_from_the_option_then_the_files_suffix() -> None:
    assert format_for("x.yml", None, key="--format") == "ansible"
    assert format_for("x.YAML", None, key="--format") == "ansible"
    assert format_for("out/x.csv", None, key="--format") == "csv"
    assert format_for("/etc/hosts", None, key="--format") == "hosts"
    assert format_for("x.txt", None, key="--format") == "json"
    assert format_for(None, None, key="--format") == "json"
    assert format_for("x.yml", "csv", key="--format") == "csv"
    with pytest.raises(ConfigError, match=r"--format: 'xml' is not an inventory format"):
        format_for("x.yml", "xml", key="--format")
    assert set(FORMATS) == {"json", "ansible", "hosts", "csv"}


def test_a_file_is_replaced_whole_keeping_its_mode_and_no_temporary_file(tmp_path: Path
                                                                         ) -> None:
    out = tmp_path / "inv.yml"
    out.write_text("old\n")
    out.chmod(0o640)
    write_output(str(out), "new\n", key="--output")
    assert out.read_text() == "new\n"
    assert (out.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inv.yml"]
    # A symbolic link is followed and stays a link.
    link = tmp_path / "link.yml"
    link.symlink_to(out)
    write_output(str(link), "via link\n", key="--output")
    assert link.is_symlink() and out.read_text() == "via link\n"


def test_a_failed_write_leaves_the_old_file_and_nothing_else(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    out = tmp_path / "inv.json"
    out.write_text("old\n")

    def full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(ConfigError, match=r"--output: .*inv.json: cannot write: No space"):
        write_output(str(out), "new\n", key="--output")
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inv.json"]


def test_what_cannot_be_an_inventory_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--output: .* is a directory"):
        check_output(str(tmp_path), key="--output")
    with pytest.raises(ConfigError, match=r"--inventory: .*nope/inv.yml: the directory "
                                          r".*nope does not exist"):
        check_output(str(tmp_path / "nope" / "inv.yml"), key="--inventory")
    plain = tmp_path / "file"
    plain.write_text("")
    with pytest.raises(ConfigError, match=r"--output: "):
        check_output(str(plain / "below"), key="--output")
    sock_path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(ConfigError, match=r"--output: .*sock is a socket"):
            write_output(str(sock_path), "x\n", key="--output")


def test_streams_are_written_in_place(tmp_path: Path) -> None:
    write_output("/dev/null", "discarded\n", key="--output")  # not replaced by a file
    assert Path("/dev/null").is_char_device()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # Nobody reads it: refused at once rather than waited for.
    with pytest.raises(ConfigError, match=r"--output: .*pipe: cannot write"):
        write_output(str(fifo), "x\n", key="--output")
    # A reader: the write goes through (into the pipe's buffer), then the reader has it.
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        write_output(str(fifo), "through the pipe\n", key="--output")
        assert os.read(fd, 1024) == b"through the pipe\n"
    finally:
        os.close(fd)
    assert fifo.is_fifo()


def test_ansible_inventory_reads_the_yaml_inventory(tmp_path: Path) -> None:
    command = shutil.which("ansible-inventory") or shutil.which(
        "ansible-inventory", path=os.path.dirname(sys.executable))
    if command is None:
        pytest.skip("ansible-inventory is not installed (the dev extra installs ansible-core)")
    path = tmp_path / "inv.yml"
    write_output(str(path), render("ansible", "lt", RECORDS), key="--output")
    listed = subprocess.run([command, "-i", str(path), "--list"], capture_output=True,
                            text=True, timeout=120, check=False,
                            env=dict(os.environ, ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"),
                                     ANSIBLE_HOME=str(tmp_path / "home")))
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert sorted(data["fleet_lt"]["hosts"]) == ["lt-0000", "lt-0001", "lt-0002"]
    assert data["_meta"]["hostvars"]["lt-0001"]["ansible_host"] == "10.0.0.3"
    assert data["host_esx_01"]["hosts"] == ["lt-0000", "lt-0002"]
