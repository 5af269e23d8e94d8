"""A deleted fleet stays deleted (issue 11, item 6): its folder goes with it, and a
scan that read vCenter before the delete finished does not bring it back.

The first test plays the interleaving in process (a simulator in process): the
service's view of vCenter (its folder tree, kept by a watch) is held behind while the
delete finishes, so it still shows the members when the service scans it.
The second is the reported repro, scaled down: ``fleet serve`` against the
simulator, fleets created and deleted in cycles under a short scan interval.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from fleet.metrics import GONE_FLEET_HOLD_S, FleetMetrics
from fleet.vsphere.model import FolderTree, ListedVm
from tests.api.serveproc import ServeProcess, service_config
from tests.api.test_service import Clock, apply, folder_fake, make_config, running, until
from tests.integration.test_provision import pyvmomi
from tests.simproc import SimProcess

pytestmark = pytest.mark.anyio


async def test_a_view_that_lags_behind_a_delete_does_not_bring_the_fleet_back(
        tmp_path: Path) -> None:
    metrics = FleetMetrics()
    # Scans only when the view changes or when asked.
    config = make_config(tmp_path, scan_interval_s=3600.0)
    async with folder_fake() as (fake, _), running(config, fake, Clock(), metrics) as service:
        tree = await _ghost_in_view(service)

        # From now on the view lags: updates are held, not applied.
        held: list[tuple[Any, Any]] = []
        apply_update = tree._apply  # type: ignore[attr-defined]
        tree._apply = lambda view, update: held.append((view, update)) or False  # type: ignore[attr-defined]
        await service.remove("ghost")
        await until(lambda: "ghost" not in service.fleets)
        # The view still shows the three members, and a scan of it does not bring them back.
        assert len(_vms(tree, "ghost")) == 3 and held
        await service.scan()
        assert "ghost" not in service.fleets

        # The view catches up; later scans find nothing either.
        tree._apply = apply_update  # type: ignore[attr-defined]
        for view, update in held:
            apply_update(view, update)
        tree._notify()  # type: ignore[attr-defined]
        assert "ghost" not in dict(tree.folders())
        await service.scan()
        assert "ghost" not in service.fleets and service.ready
        service.update_gauges()
        assert _ghost_lines(metrics.exposition().decode(), ["ghost"]) == []
        # Its clone outcomes stay a while, as history (fleet.metrics.GONE_FLEET_HOLD_S);
        # then nothing names it.
        metrics.clock = lambda: time.monotonic() + GONE_FLEET_HOLD_S + 1
        service.update_gauges()
        assert 'fleet="ghost"' not in metrics.exposition().decode()
        assert await fake.find_folder("fleet/ghost") is None


def _ghost_lines(text: str, names: list[str]) -> list[str]:
    """Lines of a scrape that name a gone fleet, but for its clone outcomes' history."""
    return [line for line in text.splitlines()
            if any(f'fleet="{n}"' in line for n in names)
            and not line.startswith("fleet_clones_total{")]


async def test_a_scan_while_the_delete_is_forgotten_does_not_unbury_it(
        tmp_path: Path) -> None:
    """A scan that lands after the fleet is buried but before it leaves the table (its
    record's file is being removed) still sees it as a fleet; that must not lift the
    burial, or the next scan of the lagging view brings it back."""
    config = make_config(tmp_path, scan_interval_s=3600.0)
    async with folder_fake() as (fake, _), running(config, fake, Clock(),
                                                     FleetMetrics()) as service:
        tree = await _ghost_in_view(service)
        tree._apply = lambda view, update: False  # type: ignore[attr-defined]
        real_delete = service.store.delete
        scanned: list[bool] = []

        async def delete_after_a_scan(name: str) -> None:
            await service.scan()
            scanned.append(name in service.fleets)
            await real_delete(name)

        service.store.delete = delete_after_a_scan  # type: ignore[method-assign]
        await service.remove("ghost")
        await until(lambda: "ghost" not in service.fleets)
        assert scanned == [True] and len(_vms(tree, "ghost")) == 3
        await service.scan()
        assert "ghost" not in service.fleets


async def _ghost_in_view(service: Any) -> FolderTree:
    """Fleet "ghost" of three, ready and shown by the service's view of vCenter."""
    rec = await apply(service, {"name": "ghost", "count": 3})
    await until(lambda: rec.status == "ready")
    # The run made the root folder: the service watches it from now on.
    await until(lambda: service.scanner.tree is not None)
    tree = service.scanner.tree
    assert tree is not None
    await until(lambda: len(_vms(tree, "ghost")) == 3)
    return tree


def _vms(tree: FolderTree, name: str) -> list[ListedVm]:
    folder = dict(tree.folders()).get(name)
    return [] if folder is None else tree.vms_in(folder)


def _fleet_folders(sim: SimProcess) -> list[str]:
    si = pyvmomi(sim)
    root = si.content.searchIndex.FindByInventoryPath("dc1/vm/fleet")
    if root is None:
        return []
    return [e.name for e in root.childEntity if isinstance(e, vim.Folder)]


def test_create_and_delete_in_cycles_leaves_no_ghost_and_no_folder(tmp_path: Path) -> None:
    names = [f"cyc{i}" for i in range(4)]
    with SimProcess(time_scale=0.02) as sim, \
            ServeProcess(service_config(sim, tmp_path / "state", scan_interval_s=0.1)) as svc:
        for _cycle in range(3):
            for name in names:
                status, body = svc.call("POST", "/v1/fleets", {"name": name, "count": 10})
                assert status == 202, body
            for name in names:
                svc.wait_for(name, timeout_s=120)
            for name in names:
                status, body = svc.call("DELETE", f"/v1/fleets/{name}")
                assert status == 202, body
            for name in names:
                svc.wait_for(name, ("gone",), timeout_s=120)
        # Several scans after the last delete: none brings a fleet back.
        status, ready = svc.call("GET", "/readyz", token=None)
        scans = ready["scans"]
        deadline = time.monotonic() + 60
        while ready["scans"] < scans + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
            status, ready = svc.call("GET", "/readyz", token=None)
        assert status == 200 and ready["scans"] >= scans + 3, ready
        assert ready["fleets"] == 0, ready
        status, listed = svc.call("GET", "/v1/fleets")
        assert status == 200 and _names(listed) == [], listed
        status, text = svc.call("GET", "/metrics", token=None)
        assert status == 200 and _ghost_lines(text, names) == []
        assert _fleet_folders(sim) == []
        assert sim.stats()["vms"] == 9  # the sources, nothing else


def _names(listed: Any) -> list[str]:
    fleets = listed["fleets"] if isinstance(listed, dict) else listed
    return [f["name"] for f in fleets]
