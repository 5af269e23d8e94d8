"""What a person watching a run reads: clones a stop ended are not called failures."""

from __future__ import annotations

import io

from fleet.engine.events import JobFailed, JobReady, RunStarted
from fleet.engine.summary import Summary
from fleet.report import LiveProgress, print_summary


def test_progress_and_summary_tell_cancelled_clones_from_failed_ones() -> None:
    out = io.StringIO()
    with LiveProgress(stream=out, interactive=False, plain_interval_s=0) as progress:
        progress.on_event(RunStarted(0.0, fleet="lt", run_id="r", requested=4, to_create=4,
                                     to_resume=0, to_remove=0, already_ready=0))
        progress.on_event(JobReady(0.1, index=0, name="lt-0000", source="s", duration_s=0.1))
        progress.on_event(JobFailed(0.2, index=1, name="lt-0001", phase="clone",
                                    reason="fault", message="FileNotFound"))
        for index in (2, 3):
            progress.on_event(JobFailed(0.3, index=index, name=f"lt-000{index}",
                                        phase="queue", reason="cancelled",
                                        message="not started: stopping",
                                        outcome="cancelled"))
    last = out.getvalue().splitlines()[-1]
    assert "1/4 ready, 1 failed, 2 cancelled" in last, last
    summary = Summary(fleet="lt", run_id="r", requested=4, ready=1, failed=3, created=1,
                      adopted=0, removed=0, duration_s=1.0, clones_per_s=1.0, phases={},
                      sources={}, failures={"fault": 1, "cancelled": 2}, cancelled=True)
    shown = io.StringIO()
    print_summary(summary, stream=shown)
    assert "1/4 ready, 1 failed, 2 cancelled, interrupted" in shown.getvalue()
