"""Building vSphere specs from fleet's requests. Pure functions, no I/O.

- :func:`instant_clone_spec`: ``vim.vm.InstantCloneSpec`` with folder, pool,
  datastore, extraConfig (``config``), biosUuid and per-NIC ``migrateConnect``
  as ``location.deviceChange`` *edits* of the source's VirtualEthernetCard
  devices (the only device change InstantClone allows). An edit names the NIC
  (type and key) and carries its ``connectable``, never the source's MAC.
- :func:`nic_edits`: ``deviceChange`` edits that set NICs' ``connected``.
- :func:`extra_config_spec`, :func:`clone_spec`, :func:`relocate_spec`,
  :func:`program_spec`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from pyVmomi import VmomiSupport, vim
from pyVmomi.SoapAdapter import XML_ENCODING, XmlEscape

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
    """An edit of NIC ``device`` that sets ``connectable`` and never sends its MAC.

    The edit is the device as vCenter reported it (type, key, backing: the shape every
    field-proven instant clone script sends, so a real vCenter never sees a NIC edit
    without its backing) with two things taken out. ``macAddress``: vCenter sets the
    address it is given, so a clone would take its source's MAC instead of the one
    vCenter generates for it (docs/vsphere.md). A distributed switch ``port.portKey``:
    the running source still holds that port, so the clone must be given a new one (the
    port group and switch stay)."""
    edited = copy.copy(device)
    edited.macAddress = None
    edited.connectable = connectable
    port = getattr(device.backing, "port", None)
    if port is not None and port.portKey is not None:
        backing = copy.copy(device.backing)
        backing.port = copy.copy(port)
        backing.port.portKey = None
        edited.backing = backing
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


def device_change_spec(edits: Sequence[Any],
                       extra_config: Mapping[str, str] | None = None) -> Any:
    """Device edits and, in the same reconfiguration, extraConfig entries."""
    return vim.vm.ConfigSpec(deviceChange=list(edits) or None,
                             extraConfig=option_values(extra_config or {}) or None)


def program_spec(program: GuestProgram) -> Any:
    return vim.vm.guest.ProcessManager.ProgramSpec(
        programPath=program.path, arguments=program.arguments,
        workingDirectory=program.working_directory,
        envVariables=[f"{k}={v}" for k, v in program.env.items()] or None)


class CloneBodies:
    """``InstantClone_Task`` request bodies, from one pyVmomi serialization per shape.

    Building and serializing a clone spec with pyVmomi costs about 250 us, and a
    burst sends thousands that differ only in the clone's name and its label
    values. The first request of a shape (stub version, source, folder, pool,
    datastore, NIC edits, label keys, with or without a BIOS UUID) is serialized
    by pyVmomi with markers in place of those strings; later ones are that text
    with each marker replaced by its value escaped with pyVmomi's own
    ``XmlEscape``: byte for byte what pyVmomi would send (``tests/vsphere``
    checks). ``render`` returns None when it cannot promise that (a value that is
    not a string, a pyVmomi request context in use, a marker pyVmomi did not
    echo once); the caller then serializes as usual.
    """

    _MAX_SHAPES = 256

    def __init__(self) -> None:
        self._shapes: dict[tuple[Any, ...], tuple[Any, list[str]]] = {}

    def render(self, stub: Any, source: Any, info: Any, request: CloneRequest, *, folder: Any,
               pool: Any = None, datastore: Any = None,
               nic_edits: Sequence[Any] = ()) -> bytes | None:
        values = [request.name, *request.extra_config.values()]
        if request.bios_uuid is not None:
            values.append(request.bios_uuid)
        if not all(type(v) is str for v in values) or VmomiSupport.GetRequestContext():
            return None
        # NIC edits by identity (the client reuses a source's list); none is none.
        key = (stub.version, type(source), source._moId, source._serverGuid, request.folder,
               request.pool, request.datastore, id(nic_edits) if nic_edits else 0,
               tuple(request.extra_config), request.bios_uuid is None)
        shape = self._shapes.get(key)
        if shape is None or (nic_edits and shape[0] is not nic_edits):
            shape = self._shape(stub, source, info, request, folder, pool, datastore, nic_edits,
                                len(values))
            if shape is None:
                return None
            if len(self._shapes) >= self._MAX_SHAPES:
                self._shapes.clear()
            self._shapes[key] = shape
        pieces = shape[1]
        out = [pieces[0]]
        for value, piece in zip(values, pieces[1:], strict=True):
            out.append(XmlEscape(value))
            out.append(piece)
        return "".join(out).encode(XML_ENCODING)

    @staticmethod
    def _shape(stub: Any, source: Any, info: Any, request: CloneRequest, folder: Any, pool: Any,
               datastore: Any, nic_edits: Sequence[Any], count: int
               ) -> tuple[Any, list[str]] | None:
        markers = [f"\x00{i}\x00" for i in range(count)]
        marked = replace(request, name=markers[0],
                         extra_config=dict(zip(request.extra_config, markers[1:], strict=False)),
                         bios_uuid=markers[-1] if request.bios_uuid is not None else None)
        spec = instant_clone_spec(marked, folder=folder, pool=pool, datastore=datastore,
                                  nic_edits=nic_edits)
        try:
            text = stub.serialize(source, info, [spec]).decode(XML_ENCODING)
        except Exception:  # whatever pyVmomi objects to, the usual path reports properly
            return None
        pieces: list[str] = []
        for marker in markers:
            if text.count(marker) != 1:
                return None
            head, text = text.split(marker)
            pieces.append(head)
        pieces.append(text)
        return nic_edits, pieces
