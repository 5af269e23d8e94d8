"""Shared helpers for engine tests: specs, fast engine options, fleet invariants.

Engine tests run the engine against the real client on a simulator in the same
process (``fleet.testing.harness``): :func:`vcenter` is ``sim_vsphere`` on
:func:`topology`, the inventory engine tests use (hosts ``esx-NN``, frozen sources
``frozen-NN``, running sources ``running-NN``), with :data:`CREDS` as the guest
login of every source."""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from fleet.engine.limits import AutoTuning
from fleet.engine.reconcile import LABEL_INDEX, LABEL_NAME, LABEL_STATE, labels
from fleet.engine.run import EngineOptions
from fleet.engine.spec import FleetSpec, spec_from_dict
from fleet.sim.topology import GuestConfig, Topology
from fleet.sim.vm import VirtualMachine
from fleet.testing.harness import SimVCenter, sim_vsphere, small_topology
from fleet.vsphere.client import VSphereClient
from fleet.vsphere.model import GuestCredentials, VSphere

GUEST_PASSWORD = "guest-pw-do-not-leak"
VCENTER_PASSWORD = "vc-pw-do-not-leak"
CREDS = GuestCredentials("root", GUEST_PASSWORD)
ENV = {"GUEST_PW": GUEST_PASSWORD, "VC_PW": VCENTER_PASSWORD}
FROZEN4 = ["frozen-01", "frozen-02", "frozen-03", "frozen-04"]

BASE: dict[str, Any] = {
    "name": "lt",
    "count": 10,
    "sources": FROZEN4,
    "network": {"guest_user": "root", "guest_password_env": "GUEST_PW", "refresh": "linux"},
    "readiness": {"wait_for": "guest_ip", "timeout_s": 5.0},
    "retries": {"attempts": 4, "backoff_base_s": 0.001, "backoff_max_s": 0.005},
    "timeouts": {"clone_s": 5.0, "network_s": 5.0, "reconnect_s": 5.0, "call_s": 5.0,
                 "cleanup_s": 5.0, "cancel_grace_s": 5.0, "queue_s": 30.0},
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def spec_data(**over: Any) -> dict[str, Any]:
    return merge(BASE, over)


def make_spec(**over: Any) -> FleetSpec:
    return spec_from_dict(spec_data(**over), source="test.toml", env=ENV)


CLONE_ONLY: dict[str, Any] = {"network": {"refresh": "none", "disconnect_at_clone": False},
                              "readiness": {"wait_for": "none"}}


def options(seed: int = 0, **kw: Any) -> EngineOptions:
    kw.setdefault("refresh_interval_s", 0.02)
    kw.setdefault("tuning", AutoTuning(queued_min_s=0.005))
    return EngineOptions(seed=seed, **kw)


def topology(*, guest_password: str = GUEST_PASSWORD, **kw: Any) -> Topology:
    """``small_topology`` with :data:`CREDS` as the sources' guest login."""
    return small_topology(guest_user=CREDS.username, guest_password=guest_password, **kw)


@asynccontextmanager
async def vcenter(topo: Topology | None = None, **kw: Any
                  ) -> AsyncIterator[tuple[VSphereClient, SimVCenter]]:
    """The client on a simulator of ``topo`` (or of ``topology(**kw)``) in this process."""
    async with sim_vsphere(topo or topology(**kw)) as (vs, vc):
        yield vs, vc


def guest(password: str = GUEST_PASSWORD, **kw: Any) -> GuestConfig:
    """A simulated guest OS that accepts :data:`CREDS` (or ``password``)."""
    return GuestConfig(user=CREDS.username, password=password, **kw)


def add_member(vc: SimVCenter, spec: FleetSpec, index: int, state: str, *,
               source: str = "frozen-01", run_id: str = "earlier",
               host: str = "esx-01") -> VirtualMachine:
    """A member made by an earlier run, left at ``state``. One left ``cloned`` is as a
    fresh clone is: its guest still uses the source's MAC, its NIC is down, no IP."""
    vm = vc.add_vm(spec.vm_name(index), host=host, folder=spec.folder_path, guest=guest(),
                   extra_config=labels(fleet=spec.name, index=index, run_id=run_id,
                                       source=source, state=state))  # type: ignore[arg-type]
    if state == "cloned":
        vm.guest.macs = list(vc.vm(source).guest.macs)
        vm.nics[0].connected = False
        vm.guest.ip = None
        vm.config_changed()
        vm.touch("guest", "summary")
    return vm


class Counted:
    """The client, counting the calls made of it by ``VSphere`` method (what the engine
    asks of vCenter, before the client turns it into SOAP calls)."""

    def __init__(self, vs: VSphereClient) -> None:
        self._vs = vs
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._vs, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(attr) or \
                not hasattr(VSphere, name):
            return attr

        async def counted(*args: Any, **kw: Any) -> Any:
            self.calls[name] += 1
            return await attr(*args, **kw)

        return counted


def members(fake: SimVCenter, spec: FleetSpec) -> dict[int, list[str]]:
    """index -> names of VMs in the fleet folder labelled with that index."""
    out: dict[int, list[str]] = {}
    for vm in fake.folder_vms(spec.folder_path):
        if vm.extra_config.get(LABEL_NAME) == spec.name:
            out.setdefault(int(vm.extra_config[LABEL_INDEX]), []).append(vm.name)
    return out


def assert_complete(fake: SimVCenter, spec: FleetSpec, *, state: str = "ready") -> None:
    """Every index 0..count-1 exists exactly once, under its own name, in ``state``;
    no other member exists."""
    got = members(fake, spec)
    assert sorted(got) == list(range(spec.count))
    for index, names in got.items():
        assert names == [spec.vm_name(index)], (index, names)
    for vm in fake.folder_vms(spec.folder_path):
        if vm.extra_config.get(LABEL_NAME) == spec.name:
            assert vm.extra_config[LABEL_STATE] == state, vm.name
