"""vCenter loses its state mid-run (``fleet sim`` restarted on the same port): the
fleet's folder, which the run looked up once, no longer exists. The run looks it up
(makes it) again and carries on, instead of failing every clone still to come."""

from __future__ import annotations

import anyio
import pytest

from fleet.engine.events import Event, JobReady
from fleet.engine.operations import provision, status
from fleet.engine.run import Provisioner
from fleet.vsphere.client import VSphereClient
from tests.simproc import PASSWORD, USER, SimProcess
from tests.specs import make_spec

pytestmark = pytest.mark.anyio

COUNT = 60
IN_FLIGHT = 2


async def test_a_run_survives_vcenter_losing_its_state() -> None:
    with SimProcess(http=True, time_scale=0.05) as sim:
        # Clones only (no guest phases), two at a time, and patient retries: the
        # simulator is down for a moment while it restarts.
        spec = make_spec(sim, "restart", COUNT, sources=["frozen-01", "frozen-02"],
                         vcenter={"insecure": True},
                         network={"refresh": "none", "disconnect_at_clone": False},
                         readiness={"wait_for": "none"}, limits={"in_flight": IN_FLIGHT},
                         retries={"attempts": 40, "backoff_base_s": 0.05,
                                  "backoff_max_s": 0.3})
        async with VSphereClient(sim.url, USER, PASSWORD) as vs:
            ten_ready = anyio.Event()
            ready = 0

            def on_event(event: Event) -> None:
                nonlocal ready
                if isinstance(event, JobReady):
                    ready += 1
                    if ready == 10:
                        ten_ready.set()

            run = Provisioner(spec, vs, on_event=on_event)
            async with anyio.create_task_group() as tg:
                tg.start_soon(run.run)
                with anyio.fail_after(60):
                    await ten_ready.wait()
                await anyio.to_thread.run_sync(sim.restart)
            summary = run.summary
            assert summary is not None
            # Every job went on: clones still to come were made in the folder found anew
            # (not one failed on the lost one), and clones in flight at the restart,
            # whose tasks vCenter forgot, were looked up and made again.
            assert summary.failed == 0, summary.failure_messages
            made_after = sim.stats()["clones_total"]
            assert 0 < made_after < COUNT  # the restart did come mid-run
            now = await status(spec, vs)
            assert now.members == made_after
            # A second run makes what the lost vCenter took with it.
            again = await provision(spec, vs)
            assert again.ready == COUNT and again.created == COUNT - made_after, again
