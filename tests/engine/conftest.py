"""Shared helpers for engine tests: specs, fast engine options, fleet invariants."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fleet.engine.limits import AutoTuning
from fleet.engine.reconcile import LABEL_INDEX, LABEL_NAME, LABEL_STATE
from fleet.engine.run import EngineOptions
from fleet.engine.spec import FleetSpec, spec_from_dict
from fleet.vsphere.fake import FakeVSphere
from fleet.vsphere.model import GuestCredentials

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


def members(fake: FakeVSphere, spec: FleetSpec) -> dict[int, list[str]]:
    """index -> names of VMs in the fleet folder labelled with that index."""
    out: dict[int, list[str]] = {}
    for vm in fake.folder_vms(spec.folder_path):
        if vm.extra_config.get(LABEL_NAME) == spec.name:
            out.setdefault(int(vm.extra_config[LABEL_INDEX]), []).append(vm.name)
    return out


def assert_complete(fake: FakeVSphere, spec: FleetSpec, *, state: str = "ready") -> None:
    """Every index 0..count-1 exists exactly once, under its own name, in ``state``;
    no other member exists."""
    got = members(fake, spec)
    assert sorted(got) == list(range(spec.count))
    for index, names in got.items():
        assert names == [spec.vm_name(index)], (index, names)
    for vm in fake.folder_vms(spec.folder_path):
        if vm.extra_config.get(LABEL_NAME) == spec.name:
            assert vm.extra_config[LABEL_STATE] == state, vm.name
