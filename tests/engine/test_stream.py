"""The Provisioner's stream mode (a warm pool's refills, docs/pools.md): jobs come while
it runs, it never removes what it finds, and it ends only when closed or stopped."""

from __future__ import annotations

from dataclasses import replace

import anyio
import pytest

from fleet.engine import provision
from fleet.engine.events import Event, JobReady
from fleet.engine.run import Provisioner
from tests.api.test_service import until
from tests.engine.conftest import CLONE_ONLY, FROZEN4, make_spec, vcenter
from tests.engine.conftest import options as opts

pytestmark = pytest.mark.anyio


async def test_a_stream_clones_what_it_is_handed_and_touches_nothing_else() -> None:
    spec = make_spec(name="pool", count=2, sources=FROZEN4[:2], **CLONE_ONLY)
    async with vcenter(hosts=2) as (vs, vc):
        # Two members already there; a normal run of a spec with count 1 would remove
        # one of them, a stream leaves both.
        assert (await provision(spec, vs, options=opts())).complete
        spec = make_spec(name="pool", count=1, sources=FROZEN4[:2], **CLONE_ONLY)
        ready: list[int] = []

        def seen(event: Event) -> None:
            if isinstance(event, JobReady):
                ready.append(event.index)

        stream = Provisioner(spec, vs, on_event=seen,
                             options=replace(opts(), stream=True))
        with pytest.raises(RuntimeError):
            stream.add(5)  # not started yet
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run)
            with anyio.fail_after(20):
                await stream.started.wait()
            jobs = [stream.add(i) for i in (7, 8, 9)]
            await until(lambda: len(ready) == 3, 20)
            # Idle and open: still running, and it takes more.
            assert stream.summary is None
            stream.add(10)
            await until(lambda: len(ready) == 4, 20)
            stream.close()
        assert stream.summary is not None and not stream.summary.cancelled
        assert sorted(ready) == [7, 8, 9, 10]
        assert all(j.vm is not None for j in jobs)
        names = sorted(vm.name for vm in vc.folder_vms(spec.folder_path))
        assert names == ["pool-0000", "pool-0001", "pool-0007", "pool-0008", "pool-0009",
                         "pool-0010"]


async def test_a_long_stream_forgets_the_jobs_that_ended(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setattr("fleet.engine.run.STREAM_JOBS_KEPT", 2)
    spec = make_spec(name="long", count=1, sources=FROZEN4[:2], **CLONE_ONLY)
    async with vcenter(hosts=2) as (vs, _):
        ready = []
        stream = Provisioner(spec, vs, on_event=lambda e: ready.append(e)
                             if isinstance(e, JobReady) else None,
                             options=replace(opts(), stream=True))
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run)
            with anyio.fail_after(20):
                await stream.started.wait()
            for i in range(12):
                stream.add(i)
                await until(lambda: len(ready) > i, 20)  # noqa: B023 (awaited at once)
                assert len(stream._jobs) <= 2 * 2 + 1
            stream.close()
        assert len(ready) == 12
