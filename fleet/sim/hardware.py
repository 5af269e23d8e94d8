"""A VM's devices and guest as plain data: NICs, disks, the guest OS and its processes.

Also the size of a fresh delta disk (the chain limit is ``fleet.vcenter``'s). Device
keys and what a VM reports of its devices are ``fleet.sim.shapes``'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pyVmomi import vim

from fleet.sim import guest as guestcmd
from fleet.sim.entities import MB, Datastore, Network
from fleet.sim.shapes import DISK_KEY_BASE, NIC_KEY_BASE

DELTA_BYTES = 64 * MB  # a fresh instant-clone delta disk, roughly

__all__ = ["DELTA_BYTES", "DISK_KEY_BASE", "NIC_KEY_BASE", "Disk", "Guest", "Nic", "Process",
           "check_nic_type"]


@dataclass
class Nic:
    key: int
    mac: str
    network: Network | None
    connected: bool
    start_connected: bool

    @property
    def label(self) -> str:
        return f"Network adapter {self.key - NIC_KEY_BASE + 1}"


@dataclass
class Disk:
    key: int
    capacity_kb: int
    datastore: Datastore
    chain: list[str]  # vmdk descriptor paths, base first


@dataclass
class Process:
    pid: int
    name: str
    owner: str
    cmd_line: str
    start: datetime
    end: datetime | None = None
    exit_code: int | None = None
    # actions still to play: what follows a freeze runs in each clone on resume
    pending: tuple[guestcmd.Action, ...] = ()
    exit_on_finish: int = 0


@dataclass
class Guest:
    family: str
    user: str
    password: str
    tools_installed: bool
    ready_key: str | None = None
    ready_after_s: float = 1.0
    tools_running: bool = False
    # the Tools service was stopped in the running guest: it stays down until a boot
    tools_stopped: bool = False
    macs: list[str] = field(default_factory=list)  # what the guest OS uses, per NIC
    ip: str | None = None
    processes: dict[int, Process] = field(default_factory=dict)
    next_pid: int = 1000
    generation: int = 0  # bumped on every boot, so stale timers do nothing


def check_nic_type(device: Any, nic_type: Any, prop: str, index: int) -> None:
    """An edit names a NIC by key and keeps its adapter type (``nic_type``: VMXNET 3 on
    a Linux VM, E1000e on a Windows one): a change of type is not an edit."""
    if type(device) is not nic_type:
        raise vim.fault.InvalidDeviceSpec(
            msg=f"Device {device.key} is a {nic_type.__name__}; an edit cannot make it a "
                f"{type(device).__name__}.", property=prop, deviceIndex=index)
