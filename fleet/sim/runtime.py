"""The narrow services a simulated inventory object is given, instead of the simulator.

A folder, host or VM needs a few things of the running vCenter: the registry of
managed objects, simulated time, the task manager (and its scheduler's limits),
names held by work in progress, MAC and IP addresses, the statistics it reports
to, and the parts of the topology that set its behaviour. :class:`Runtime`
carries exactly those; ``Simulator`` builds one and hands it to every entity, and
each of its members is usable (and testable) without the others. Nothing here
knows about sessions, dispatch or the HTTP server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from fleet.sim.clock import Clock
from fleet.sim.core import Inventory
from fleet.sim.names import Addresses, NameHolds
from fleet.sim.stats import Stats
from fleet.sim.tasks import Scheduler, TaskManager
from fleet.sim.topology import LatencyConfig, VCenterConfig


def _product_version(api_version: str) -> str:
    parts = api_version.split(".")
    return ".".join(parts[:3]) if len(parts) >= 3 else api_version


def about_info(vc: VCenterConfig, instance_uuid: str, *, esxi: bool = False) -> Any:
    """``AboutInfo`` of the vCenter (or, ``esxi``, of a host in it)."""
    version = _product_version(vc.api_version)
    if esxi or vc.kind == "esxi":
        return vim.AboutInfo(name="VMware ESXi", fullName=f"VMware ESXi {version} build-0",
                             vendor="VMware, Inc.", version=version, build="0",
                             osType="vmnix-x86", productLineId="embeddedEsx",
                             apiType="HostAgent", apiVersion=vc.api_version,
                             instanceUuid=instance_uuid, localeVersion="INTL",
                             localeBuild="000")
    return vim.AboutInfo(name=vc.name, fullName=f"{vc.name} {version} build-0 (fleet-sim)",
                         vendor="VMware, Inc.", version=version, build="0",
                         osType="linux-x64", productLineId="vpx", apiType="VirtualCenter",
                         apiVersion=vc.api_version, instanceUuid=instance_uuid,
                         localeVersion="INTL", localeBuild="000")


@dataclass(eq=False)
class Runtime:
    """What inventory objects use of the running simulator (see the module docstring)."""

    inventory: Inventory
    clock: Clock
    tasks: TaskManager
    scheduler: Scheduler
    names: NameHolds
    addresses: Addresses
    stats: Stats
    latency: LatencyConfig
    vcenter: VCenterConfig
    #: the fraction of an instant clone's memory it shares with its source
    clone_memory_shared: float
    instance_uuid: str

    def about(self, *, esxi: bool = False) -> Any:
        return about_info(self.vcenter, self.instance_uuid, esxi=esxi)
