"""Building vSphere specs from fleet's requests. Pure functions, no I/O.

- :func:`instant_clone_spec`: ``vim.vm.InstantCloneSpec`` with folder, pool,
  datastore, extraConfig (``config``), biosUuid and per-NIC ``migrateConnect``
  as ``location.deviceChange`` *edits* of the source's VirtualEthernetCard
  devices (the only device change InstantClone allows).
- :func:`nic_edits`: ``deviceChange`` edits that set NICs' ``connected``.
- :func:`extra_config_spec`, :func:`clone_spec`, :func:`relocate_spec`,
  :func:`program_spec`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from pyVmomi import vim

from fleet.vsphere.model import CloneRequest, GuestProgram, NicConnect

Connectable = vim.vm.device.VirtualDevice.ConnectInfo
DeviceSpec = vim.vm.device.VirtualDeviceSpec


def option_values(values: Mapping[str, str]) -> list[Any]:
    """extraConfig entries; an empty value removes the key (vSphere's rule).

    The entries are shared between specs (treat them as read-only): most labels are
    the same for every clone of a run, and pyVmomi builds a data object slowly."""
    return [_option_value(k, v) for k, v in values.items()]


@functools.lru_cache(maxsize=4096)
def _option_value(key: str, value: str) -> Any:
    return vim.option.OptionValue(key=key, value=value)


def migrate_plan(nic_keys: Sequence[int],
                 nic_connect: Mapping[int, NicConnect] | NicConnect | None) -> dict[int, str]:
    """NIC key -> ``migrateConnect`` for the clone: a single value applies to every NIC,
    a mapping to the NICs it names; ``None`` or ``{}`` leaves every NIC as the source has it."""
    if nic_connect is None:
        return {}
    if isinstance(nic_connect, str):
        return dict.fromkeys(nic_keys, nic_connect)
    return {key: value for key, value in nic_connect.items() if key in set(nic_keys)}


def _edited(device: Any, connectable: Any) -> Any:
    edited = copy.copy(device)
    edited.connectable = connectable
    return DeviceSpec(operation=vim.vm.device.VirtualDeviceSpec.Operation.edit, device=edited)


def migrate_connect_edits(nics: Sequence[Any], plan: Mapping[int, str]) -> list[Any]:
    """``location.deviceChange`` for InstantClone: each planned NIC edited with
    ``connectable.migrateConnect`` (and ``connected`` to match)."""
    edits = []
    for nic in nics:
        value = plan.get(nic.key)
        if value is None:
            continue
        old = nic.connectable
        edits.append(_edited(nic, Connectable(
            migrateConnect=value, connected=value == "connect",
            startConnected=bool(old.startConnected) if old is not None else True,
            allowGuestControl=bool(old.allowGuestControl) if old is not None else True)))
    return edits


def nic_edits(nics: Sequence[Any], connected: bool,
              nic_keys: Sequence[int] | None = None) -> list[Any]:
    """ReconfigVM ``deviceChange`` that connects or disconnects NICs (all, or ``nic_keys``)."""
    edits = []
    for nic in nics:
        if nic_keys is not None and nic.key not in nic_keys:
            continue
        old = nic.connectable
        edits.append(_edited(nic, Connectable(
            connected=connected, startConnected=connected,
            allowGuestControl=bool(old.allowGuestControl) if old is not None else True)))
    return edits


def instant_clone_spec(request: CloneRequest, *, folder: Any, pool: Any = None,
                       datastore: Any = None, nic_edits: Sequence[Any] = ()) -> Any:
    location = vim.vm.RelocateSpec(folder=folder, pool=pool, datastore=datastore,
                                   deviceChange=list(nic_edits) or None)
    return vim.vm.InstantCloneSpec(name=request.name, location=location,
                                   config=option_values(request.extra_config) or None,
                                   biosUuid=request.bios_uuid)


def relocate_spec(*, host: Any = None, datastore: Any = None, pool: Any = None) -> Any:
    return vim.vm.RelocateSpec(host=host, datastore=datastore, pool=pool)


def clone_spec(*, host: Any = None, datastore: Any = None, power_on: bool = True) -> Any:
    return vim.vm.CloneSpec(location=relocate_spec(host=host, datastore=datastore),
                            powerOn=power_on, template=False)


def extra_config_spec(values: Mapping[str, str]) -> Any:
    return vim.vm.ConfigSpec(extraConfig=option_values(values))


def device_change_spec(edits: Sequence[Any]) -> Any:
    return vim.vm.ConfigSpec(deviceChange=list(edits))


def program_spec(program: GuestProgram) -> Any:
    return vim.vm.guest.ProcessManager.ProgramSpec(
        programPath=program.path, arguments=program.arguments,
        workingDirectory=program.working_directory,
        envVariables=[f"{k}={v}" for k, v in program.env.items()] or None)
