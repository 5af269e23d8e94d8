"""Reading the inventory: property specs, paged retrieval and conversion to domain objects.

Bulk reads use ``RetrievePropertiesEx`` (continued with
``ContinueRetrievePropertiesEx`` while vCenter returns a token) over a
``ContainerView`` or an explicit object list, and ask only for the property
paths fleet uses. The functions that turn ``ObjectContent`` into
``fleet.vsphere.model`` objects are pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC
from typing import Any

from pyVmomi import vim, vmodl

from fleet.vsphere.model import (
    DatastoreInfo,
    GuestFamily,
    GuestNic,
    HostInfo,
    Labels,
    ListedVm,
    NicInfo,
    PowerState,
    Ref,
    VmAddresses,
    VmInfo,
)
from fleet.vsphere.plain import PlainContent

PC = vmodl.query.PropertyCollector

VM_PATHS = (
    "name", "parent", "runtime.powerState", "runtime.instantCloneFrozen", "runtime.host",
    "datastore", "layoutEx.disk", "config.hardware.memoryMB", "config.hardware.device",
    "config.extraConfig", "config.guestId", "config.instanceUuid", "guest.toolsRunningStatus",
    "guest.ipAddress", "guest.net", "guest.guestFamily",
)
#: What a folder listing decides on (docs/reads.md); the labels come as keyed paths.
LISTED_PATHS = ("name", "runtime.powerState", "runtime.host")
#: What an inventory of members reads (docs/inventory.md): the listing's paths, where the
#: VM lives and what its guest reports of its network. ``guest.net`` is not a plain
#: value (fleet.vsphere.plain): this read is for callers that show addresses only.
ADDRESS_PATHS = (*LISTED_PATHS, "datastore", "config.instanceUuid", "config.createDate",
                 "guest.ipAddress", "guest.net")
#: What a source needs to be judged (power, frozen, host, datastores, chain).
SOURCE_PATHS = ("name", "runtime.powerState", "runtime.instantCloneFrozen", "runtime.host",
                "datastore", "layoutEx.disk")
HOST_PATHS = ("name", "parent", "runtime.connectionState", "runtime.inMaintenanceMode",
              "summary.hardware.memorySize", "summary.quickStats.overallMemoryUsage")
DATASTORE_PATHS = ("name", "summary.capacity", "summary.freeSpace", "summary.accessible")

_LINUX_HINTS = ("linux", "ubuntu", "debian", "rhel", "centos", "sles", "suse", "fedora",
                "photon", "rocky", "alma", "oracle", "coreos", "amazon", "asianux", "mandr",
                "turbo", "redhat", "other3x", "other4x", "other5x", "other6x", "other26x",
                "other24x", "vmwarePhoton", "genericLinux")



def _power(value: Any) -> PowerState:
    """A power state as a plain ``str``: pyVmomi gives vCenter's enum type (a subclass of
    ``str`` that YAML and other writers refuse), the plain decoder a ``str``."""
    return str(value) if value else "poweredOff"  # type: ignore[return-value]

def ref_of(mo: Any) -> Ref:
    """The model's reference to a pyVmomi managed object."""
    return Ref(str(mo._wsdlName), str(mo._moId))


def props(content: Any) -> dict[str, Any]:
    """An ObjectContent's properties as a dict (unset properties are absent); not to
    be changed (a plain decoder's content hands its own)."""
    if isinstance(content, PlainContent):
        return content.values
    return {p.name: p.val for p in content.propSet or ()}


def object_spec_view(view: Any, type_name: str) -> Any:
    """Select every object of a ContainerView."""
    traverse = PC.TraversalSpec(name="view", type=vim.view.ContainerView, path="view",
                                skip=False)
    return PC.ObjectSpec(obj=view, skip=True, selectSet=[traverse])


def object_spec_children(folder: Any) -> Any:
    """Select the direct children of a folder."""
    traverse = PC.TraversalSpec(name="children", type=vim.Folder, path="childEntity",
                                skip=False)
    return PC.ObjectSpec(obj=folder, skip=True, selectSet=[traverse])


def filter_spec(object_specs: Iterable[Any], mo_type: Any, paths: Iterable[str]) -> Any:
    return PC.FilterSpec(objectSet=list(object_specs),
                         propSet=[PC.PropertySpec(type=mo_type, all=False, pathSet=list(paths))])


def keyed(path: str, key: str | int) -> str:
    """A keyed property path (docs/simulator-vms.md): ``config.extraConfig["k"]`` for a
    string key (quote and backslash escaped), ``config.hardware.device[4000]`` for an
    integer one."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    escaped = key.replace("\\", "\\\\").replace('"', '\\"')
    return f'{path}["{escaped}"]'


def extra_config_path(key: str) -> str:
    return keyed("config.extraConfig", key)


def device_path(key: int) -> str:
    return keyed("config.hardware.device", key)


def listed_paths(labels: Iterable[str]) -> list[str]:
    return [*LISTED_PATHS, *(extra_config_path(k) for k in labels)]


def listed_vms(contents: Iterable[Any], host_names: Mapping[str, str],
               labels: Iterable[str]) -> list[ListedVm]:
    """A folder listing's VMs from ``listed_paths(labels)``: a label a VM does not have
    is absent from the reply (no error), so it is read as not set. The label paths
    and the hosts' references are made once for the listing, not once per VM."""
    keys = tuple(labels)
    read = frozenset(keys)
    label_paths = [(key, extra_config_path(key)) for key in keys]
    hosts: dict[str, tuple[Ref, str | None]] = {}
    listed = []
    for content in contents:
        p = props(content)
        host = p.get("runtime.host")
        host_ref = host_name = None
        if host is not None:
            known = hosts.get(host._moId)
            if known is None:
                ref = ref_of(host)
                known = hosts[host._moId] = (ref, host_names.get(ref.id))
            host_ref, host_name = known
        power: PowerState = _power(p.get("runtime.powerState"))
        values = {}
        for key, path in label_paths:
            option = p.get(path)
            if option is not None:
                values[key] = "" if option.value is None else str(option.value)
        listed.append(ListedVm(ref=ref_of(content.obj),
                               name=str(p.get("name", content.obj._moId)),
                               power_state=power, host=host_ref, host_name=host_name,
                               labels=Labels(values, read)))
    return listed


def chain_depth(layout_disks: Any) -> int:
    """The deepest delta-disk chain over a VM's disks (``layoutEx.disk[].chain[]``)."""
    depth = 0
    for disk in layout_disks or ():
        depth = max(depth, len(disk.chain or ()))
    return depth


def guest_family(guest_id: str | None, tools_family: str | None) -> GuestFamily:
    if tools_family:
        if tools_family.startswith("windows"):
            return "windows"
        if tools_family.startswith("linux"):
            return "linux"
    gid = (guest_id or "").lower()
    if gid.startswith("win"):
        return "windows"
    if any(hint.lower() in gid for hint in _LINUX_HINTS):
        return "linux"
    return "other"


def nics_of(devices: Any) -> tuple[NicInfo, ...]:
    out = []
    for dev in devices or ():
        if not isinstance(dev, vim.vm.device.VirtualEthernetCard):
            continue
        conn = dev.connectable
        backing = dev.backing
        network = getattr(backing, "deviceName", None) or None
        out.append(NicInfo(key=int(dev.key),
                           label=str(dev.deviceInfo.label if dev.deviceInfo else dev.key),
                           mac=str(dev.macAddress or ""),
                           connected=bool(conn.connected) if conn else False,
                           start_connected=bool(conn.startConnected) if conn else False,
                           network=network))
    return tuple(out)


def nic_devices(devices: Any) -> list[Any]:
    return [d for d in devices or () if isinstance(d, vim.vm.device.VirtualEthernetCard)]


def extra_config(options: Any) -> dict[str, str]:
    return {str(o.key): "" if o.value is None else str(o.value) for o in options or ()}


def vm_info(content: Any, host_names: Mapping[str, str]) -> VmInfo:
    p = props(content)
    host = p.get("runtime.host")
    host_ref = ref_of(host) if host is not None else None
    parent = p.get("parent")
    power: PowerState = _power(p.get("runtime.powerState"))
    guest_macs = tuple(str(n.macAddress) for n in p.get("guest.net") or () if n.macAddress)
    return VmInfo(
        ref=ref_of(content.obj), name=str(p.get("name", content.obj._moId)),
        power_state=power, frozen=bool(p.get("runtime.instantCloneFrozen", False)),
        host=host_ref, host_name=host_names.get(host_ref.id) if host_ref else None,
        folder=ref_of(parent) if parent is not None else None,
        datastores=tuple(ref_of(d) for d in p.get("datastore") or ()),
        chain_depth=chain_depth(p.get("layoutEx.disk")),
        memory_mb=int(p.get("config.hardware.memoryMB") or 0),
        guest_family=guest_family(p.get("config.guestId"), p.get("guest.guestFamily")),
        nics=nics_of(p.get("config.hardware.device")),
        extra_config=extra_config(p.get("config.extraConfig")),
        tools_running=p.get("guest.toolsRunningStatus") == "guestToolsRunning",
        guest_ip=p.get("guest.ipAddress") or None, guest_macs=guest_macs,
        instance_uuid=p.get("config.instanceUuid"))


def host_info(content: Any, cluster_names: Mapping[str, str]) -> HostInfo:
    p = props(content)
    parent = p.get("parent")
    memory = int(p.get("summary.hardware.memorySize") or 0) // (1024 * 1024)
    return HostInfo(ref=ref_of(content.obj), name=str(p.get("name", content.obj._moId)),
                    connection_state=str(p.get("runtime.connectionState") or "disconnected"),
                    in_maintenance=bool(p.get("runtime.inMaintenanceMode", False)),
                    memory_mb=memory,
                    memory_used_mb=int(p.get("summary.quickStats.overallMemoryUsage") or 0),
                    cluster=cluster_names.get(parent._moId) if parent is not None else None)


def datastore_info(content: Any) -> DatastoreInfo:
    p = props(content)
    return DatastoreInfo(ref=ref_of(content.obj), name=str(p.get("name", content.obj._moId)),
                         capacity_bytes=int(p.get("summary.capacity") or 0),
                         free_bytes=int(p.get("summary.freeSpace") or 0),
                         accessible=bool(p.get("summary.accessible", True)))


def guest_nics(nets: Any) -> tuple[GuestNic, ...]:
    """``guest.net[]`` as the model's :class:`GuestNic` values (addresses de-duplicated,
    in the guest's order)."""
    out = []
    for net in nets or ():
        key = getattr(net, "deviceConfigId", None)
        out.append(GuestNic(
            mac=str(net.macAddress).lower() if net.macAddress else None,
            ip_addresses=tuple(dict.fromkeys(str(a) for a in net.ipAddress or () if a)),
            device_key=int(key) if key is not None and int(key) >= 0 else None,
            connected=bool(net.connected)))
    return tuple(out)


def epoch_of(value: Any) -> float | None:
    """An ``xsd:dateTime`` (pyVmomi's datetime) as epoch seconds; one without a zone is
    UTC, as in vim25."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def vm_addresses(contents: list[Any], host_names: Mapping[str, str],
                 datastore_names: Mapping[str, str], labels: Iterable[str],
                 devices: Mapping[str, Mapping[int, Any]]) -> list[VmAddresses]:
    """VMs read with ``ADDRESS_PATHS`` and ``labels``; ``devices``: VM id -> its virtual
    NICs read by key (key -> device)."""
    out = []
    for content, listed in zip(contents, listed_vms(contents, host_names, labels),
                               strict=True):
        p = props(content)
        macs = {key: str(dev.macAddress).lower()
                for key, dev in devices.get(listed.ref.id, {}).items()
                if isinstance(dev, vim.vm.device.VirtualEthernetCard) and dev.macAddress}
        out.append(VmAddresses(
            vm=listed,
            datastores=tuple(datastore_names.get(d._moId, d._moId)
                             for d in p.get("datastore") or ()),
            instance_uuid=p.get("config.instanceUuid") or None,
            created_at=epoch_of(p.get("config.createDate")),
            guest_ip=p.get("guest.ipAddress") or None,
            guest_nics=guest_nics(p.get("guest.net")),
            nic_macs=macs))
    return out
