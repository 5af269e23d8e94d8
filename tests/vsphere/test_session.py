"""Session life: keep-alive, idle expiry, logout, per-call deadlines, idempotent repeats."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from fleet import errors
from fleet.vsphere.model import CloneRequest, Ref
from tests.simproc import SimProcess
from tests.vsphere.conftest import client_for, unique

pytestmark = pytest.mark.anyio

TOPOLOGY = """
[vcenter]
session_idle_timeout_s = 0.6

[[hosts]]
name = "esx-{index:02d}"
count = 2

[[sources]]
name = "src-{index:02d}"
count = 2
host = "esx-{index:02d}"
state = "frozen"
"""


@pytest.fixture(scope="module")
def ssim() -> Iterator[SimProcess]:
    with SimProcess(topology_text=TOPOLOGY, time_scale=0.05) as process:
        yield process


@pytest.fixture(autouse=True)
def _clear_faults(ssim: SimProcess) -> Iterator[None]:
    yield
    ssim.clear_faults()


async def faults(sim: SimProcess, *rules: dict[str, Any]) -> None:
    await anyio.to_thread.run_sync(lambda: sim.add_faults(*rules))


async def test_keepalive_keeps_an_idle_session(ssim: SimProcess) -> None:
    async with client_for(ssim, keepalive_s=0.2) as vs:
        await anyio.sleep(1.5)  # well past the 0.6 s idle timeout
        await vs.find_vms(["src-01"])
        assert vs.stats["relogins"] == 0
        assert vs.stats["calls"]["CurrentTime"] >= 3


async def test_idle_expiry_is_healed_by_a_relogin(ssim: SimProcess) -> None:
    async with client_for(ssim, keepalive_s=600) as vs:
        await anyio.sleep(1.0)
        (vm,) = await vs.find_vms(["src-02"])
        assert vm.name == "src-02" and vs.stats["relogins"] == 1


async def test_logout_on_close(ssim: SimProcess) -> None:
    before = (await anyio.to_thread.run_sync(ssim.stats))["sessions"]
    async with client_for(ssim) as vs:
        await vs.server_info()
        during = (await anyio.to_thread.run_sync(ssim.stats))["sessions"]
        assert during == before + 1
    after = (await anyio.to_thread.run_sync(ssim.stats))["sessions"]
    assert after == before
    with pytest.raises(RuntimeError):  # a closed client refuses work
        await vs.start_instant_clone(CloneRequest(source=Ref("VirtualMachine", "vm-1"),
                                                  name="x", folder=Ref("Folder", "group-v1")))


async def test_call_deadlines(ssim: SimProcess) -> None:
    async with client_for(ssim, call_timeout_s=0.5) as vs:
        (vm,) = await vs.find_vms(["src-01"])
        # A read that times out once is repeated.
        await faults(ssim, {"method": "RetrievePropertiesEx", "fault": "http:503",
                            "delay_s": 30, "max_count": 1})
        assert (await vs.get_vm(vm.ref)).name == "src-01"
        assert vs.stats["retries"]["RetrievePropertiesEx"] == 1
        # A clone call that times out is not: the caller hears of it.
        await faults(ssim, {"method": "InstantClone_Task", "fault": "http:503",
                            "delay_s": 30, "max_count": 1})
        folder = await vs.ensure_folder("deadline")
        with pytest.raises(errors.RequestTimeout):
            await vs.start_instant_clone(CloneRequest(source=vm.ref, name=unique("d"),
                                                      folder=folder))
        assert vs.stats["calls"]["InstantClone_Task"] == 1


async def test_idempotent_operations_survive_lost_replies(ssim: SimProcess) -> None:
    async with client_for(ssim) as vs:
        (src,) = await vs.find_vms(["src-02"])
        folder = await vs.ensure_folder("lost")
        made = await (await vs.start_instant_clone(CloneRequest(
            source=src.ref, name=unique("l"), folder=folder))).wait(timeout_s=30)
        await faults(ssim, *({"method": m, "fault": "http:lost_reply", "max_count": 1}
                             for m in ("ReconfigVM_Task", "PowerOffVM_Task", "Destroy_Task")))
        await vs.update_extra_config(made, {"guestinfo.k": "v"})
        assert (await vs.get_vm(made)).extra_config["guestinfo.k"] == "v"
        await vs.destroy(made)
        with pytest.raises(errors.NotFound):
            await vs.get_vm(made)
        for method in ("ReconfigVM_Task", "PowerOffVM_Task", "Destroy_Task"):
            assert vs.stats["retries"][method] == 1


async def test_wait_for_a_vm_that_disappears(ssim: SimProcess) -> None:
    async with client_for(ssim) as vs:
        (src,) = await vs.find_vms(["src-01"])
        folder = await vs.ensure_folder("gone")
        made = await (await vs.start_instant_clone(CloneRequest(
            source=src.ref, name=unique("g"), folder=folder))).wait(timeout_s=30)

        async def destroy_soon() -> None:
            await anyio.sleep(0.2)
            await vs.destroy(made)

        async with anyio.create_task_group() as tg:
            tg.start_soon(destroy_soon)
            with pytest.raises(errors.NotFound):
                await vs.wait_for_vm(made, timeout_s=10, extra_config_key="guestinfo.never")
