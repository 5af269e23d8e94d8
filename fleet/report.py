"""What the CLI shows: live progress during a run and the closing summary.

On a terminal, progress is a bar with clones/s and ETA (rich); otherwise one
plain line every few seconds, so CI logs stay readable. Both consume the
engine's event stream. Summaries and tables are printed with rich, which falls
back to plain text when stdout is not a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fleet.engine.events import Event
from fleet.engine.summary import RemovalSummary, Summary


class LiveProgress:
    """Progress of a provisioning run, fed with engine events."""

    def __init__(self, *, stream: IO[str] | None = None, interactive: bool | None = None,
                 plain_interval_s: float = 2.0) -> None:
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.total = 0
        self.ready = 0
        self.failed = 0
        #: jobs a stop ended (Ctrl-C, a lost lock): not failures, and shown apart
        self.cancelled = 0
        self.in_flight = 0
        self.fleet = ""
        self._t0 = time.monotonic()
        self._last_plain = 0.0
        self._interval = plain_interval_s
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> LiveProgress:
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>6.1f} clones/s"),
                TextColumn("failed {task.fields[failed]}"),
                TextColumn("in flight {task.fields[in_flight]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task("provisioning", total=None, rate=0.0,
                                                 failed=0, in_flight=0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._update()
            self._progress.__exit__(None, None, None)
        elif self.total:
            self._plain(force=True)

    def rate(self) -> float:
        elapsed = time.monotonic() - self._t0
        return self.ready / elapsed if elapsed > 0 else 0.0

    def on_event(self, event: Event) -> None:
        kind = event.kind
        if kind == "run_started":
            self.fleet = getattr(event, "fleet", "")
            self.total = int(getattr(event, "requested", 0)) - int(
                getattr(event, "already_ready", 0))
            self.total = max(self.total, 0)
            self._t0 = time.monotonic()
        elif kind == "job_started":
            self.in_flight += 1
        elif kind == "phase_done" and getattr(event, "phase", "") == "clone":
            self.in_flight = max(0, self.in_flight - 1)
        elif kind in ("job_retried", "job_replaced"):
            if getattr(event, "phase", "clone") == "clone":
                self.in_flight = max(0, self.in_flight - 1)
        elif kind == "job_ready":
            self.ready += 1
        elif kind == "job_failed":
            if getattr(event, "outcome", "failed") == "cancelled":
                self.cancelled += 1
            else:
                self.failed += 1
            if getattr(event, "phase", "") == "clone":
                self.in_flight = max(0, self.in_flight - 1)
        else:
            return
        if self._progress is not None:
            self._update()
        else:
            self._plain()

    def _update(self) -> None:
        assert self._progress is not None
        self._progress.update(self._task, total=self.total or None,
                              completed=self.ready + self.failed + self.cancelled,
                              description=f"provisioning {self.fleet}", rate=self.rate(),
                              failed=self.failed, in_flight=self.in_flight)

    def _plain(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_plain < self._interval:
            return
        self._last_plain = now
        done = self.ready + self.failed + self.cancelled
        rate = self.rate()
        eta = (self.total - done) / rate if rate > 0 and self.total > done else 0.0
        cancelled = f"{self.cancelled} cancelled, " if self.cancelled else ""
        print(f"{self.fleet}: {self.ready}/{self.total} ready, {self.failed} failed, "
              f"{cancelled}{self.in_flight} in flight, {rate:.1f} clones/s, "
              f"elapsed {now - self._t0:.0f}s, eta {eta:.0f}s", file=self.stream, flush=True)


#: the width of text when stdout is not a terminal; a table that needs more gets more
PIPE_WIDTH = 120


def _console(stream: IO[str] | None = None) -> Console:
    return Console(file=stream or sys.stdout, width=None if (stream or sys.stdout).isatty()
                   else PIPE_WIDTH)


def _print_table(console: Console, table: Table) -> None:
    """``table`` whole when it goes to a file or a pipe: as wide as its widest cells
    need, never a cell cut to "golden-r…" or a header wrapped. On a terminal rich
    fits it to the window, as usual."""
    if not console.file.isatty():
        unbounded = console.options.update_width(1 << 20)
        console.width = max(PIPE_WIDTH, console.measure(table, options=unbounded).maximum)
    console.print(table)


def print_summary(summary: Summary, stream: IO[str] | None = None) -> None:
    console = _console(stream)
    verdict = "complete" if summary.complete else (
        "interrupted" if summary.cancelled else "INCOMPLETE")
    # Clones a stop ended are no failures (the metrics count them apart too).
    cancelled = summary.failures.get("cancelled", 0)
    stopped = f", {cancelled} cancelled" if cancelled else ""
    console.print(f"fleet {summary.fleet}: {summary.ready}/{summary.requested} ready, "
                  f"{summary.failed - cancelled} failed{stopped}, {verdict} — "
                  f"{summary.duration_s:.1f} s, "
                  f"{summary.clones_per_s:.2f} clones/s "
                  f"(created {summary.created}, adopted {summary.adopted}, "
                  f"removed {summary.removed})", highlight=False)
    phases = Table(title="phases (seconds)", title_justify="left")
    for col in ("phase", "count", "p50", "p95", "p99", "max"):
        phases.add_column(col, justify="right" if col != "phase" else "left")
    for name, st in summary.phases.items():
        if st.count:
            phases.add_row(name, str(st.count), f"{st.p50_s:.3f}", f"{st.p95_s:.3f}",
                           f"{st.p99_s:.3f}", f"{st.max_s:.3f}")
    _print_table(console, phases)
    sources = Table(title="sources", title_justify="left")
    for col in ("source", "host", "kind", "clones", "chain depth", "clones left", "retired"):
        sources.add_column(col, justify="right" if col in ("clones", "chain depth",
                                                           "clones left") else "left")
    for name, src in summary.sources.items():
        sources.add_row(name, src.host or "-", "frozen" if src.frozen else "running",
                        str(src.clones), str(src.chain_depth),
                        "unlimited" if src.clones_left is None else str(src.clones_left),
                        src.retired or "")
    _print_table(console, sources)
    if summary.failures:
        failures = Table(title="failures by reason", title_justify="left")
        failures.add_column("reason")
        failures.add_column("count", justify="right")
        ordered = sorted(summary.failures.items(), key=lambda kv: -kv[1])
        for reason, count in ordered:
            failures.add_row(reason, str(count))
        _print_table(console, failures)
        for reason, _ in ordered:
            message = summary.failure_messages.get(reason)
            if message:  # one line each, unwrapped, so it can be read and searched whole
                console.print(f"{reason}: {message}", soft_wrap=True, highlight=False,
                              markup=False)


def print_removal(summary: RemovalSummary, stream: IO[str] | None = None) -> None:
    console = _console(stream)
    console.print(f"fleet {summary.fleet}: removed {summary.removed}, failed {summary.failed} "
                  f"in {summary.duration_s:.1f} s; {summary.untouched} VMs in the folder "
                  "without the fleet's labels were left alone", highlight=False)
    for reason, count in summary.failures.items():
        console.print(f"  {reason}: {count}", highlight=False)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                stream: IO[str] | None = None) -> None:
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row))
    _print_table(_console(stream), table)
