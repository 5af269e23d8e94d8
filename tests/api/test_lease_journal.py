"""The pool's lease journal (fleet.api.lease_journal, docs/pools.md): durable before the
answer, written together when lines arrive together, and no hang on a bad file."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from fleet.api.lease_journal import LeaseJournal

pytestmark = pytest.mark.anyio


def entry(i: int) -> dict[str, object]:
    return {"op": "grant", "id": f"{i:016x}", "vm": f"vm-{i}"}


async def test_lines_that_arrive_together_are_written_together_and_all_kept(
        tmp_path: Path) -> None:
    journal = LeaseJournal(tmp_path / "pools", "ci")
    assert await journal.load() == []
    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(journal.append, entry(i))
    # Every line is there, once, and fewer flushes than lines were needed.
    got = await LeaseJournal(tmp_path / "pools", "ci").load()
    assert sorted(e["id"] for e in got) == sorted(f"{i:016x}" for i in range(50))
    assert 1 <= journal.writes < 50
    assert (tmp_path / "pools" / "ci.jsonl").stat().st_mode & 0o777 == 0o600
    await journal.rewrite([entry(7)])
    assert [e["id"] for e in await journal.load()] == [f"{7:016x}"]


async def test_a_torn_last_line_is_ignored_and_a_bad_one_skipped(tmp_path: Path) -> None:
    journal = LeaseJournal(tmp_path, "ci")
    await journal.append(entry(1))
    torn = b'["not", "an entry"]\n{"op": "grant", "id": "00'  # the last torn by a crash
    journal.path.write_bytes(journal.path.read_bytes() + torn)
    assert [e["id"] for e in await journal.load()] == [f"{1:016x}"]


async def test_every_waiting_caller_hears_that_its_line_was_not_written(
        tmp_path: Path) -> None:
    (tmp_path / "ci.jsonl").mkdir()  # not a file: every append fails
    journal = LeaseJournal(tmp_path, "ci")
    failures: list[OSError] = []

    async def one(i: int) -> None:
        try:
            await journal.append(entry(i))
        except OSError as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(one, i)
    assert len(failures) == 10 and all("ci.jsonl" in str(e) for e in failures)


async def test_a_fifo_or_a_device_fails_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "ci.jsonl")
    journal = LeaseJournal(tmp_path, "ci")
    with anyio.fail_after(10):
        with pytest.raises(OSError):
            await journal.append(entry(1))
        with pytest.raises(OSError):
            await journal.load()
    (tmp_path / "ci.jsonl").unlink()
    (tmp_path / "ci.jsonl").symlink_to("/dev/null")
    with anyio.fail_after(10), pytest.raises(OSError, match="not a regular file"):
        await journal.append(entry(1))
