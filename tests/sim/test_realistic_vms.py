"""The simulator's VMs look like real ones, and keyed property paths work as on vCenter.

Unmodified pyVmomi against a ``fleet sim`` process (docs/simulator-vms.md):

- a Linux and a Windows source, and instant clones of each, report a device list and
  an ``extraConfig`` of a real VM's size and shape, with consistent device keys;
- ``config.extraConfig["guestinfo.fleet.state"]`` and ``config.hardware.device[4000]``
  are answered by RetrievePropertiesEx, RetrieveContents and CreateFilter +
  WaitForUpdatesEx: present (the element, named by the path asked), absent (left out,
  no fault) and changed (a change of that path).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from pyVim.connect import Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from tests.sim.conftest import connect, find_vm, vm_folder
from tests.simproc import SimProcess

PC = vmodl.query.PropertyCollector
DEV = vim.vm.device

TOPOLOGY = """
datacenter = "dc1"
cluster = "c1"
[[hosts]]
name = "esx-01"
[[datastores]]
name = "ds-01"
[[networks]]
name = "VM Network"
[[sources]]
name = "lin-src"
state = "frozen"
[sources.extra_config]
"guestinfo.app.role" = "web"
[[sources]]
name = "win-src"
state = "frozen"
disks = 2
[sources.guest]
family = "windows"
[sources.extra_config]
"guestinfo.app.role" = "db"
"""

STATE = 'config.extraConfig["guestinfo.fleet.state"]'
NIC = "config.hardware.device[4000]"


@pytest.fixture(scope="module")
def rsim() -> Iterator[SimProcess]:
    with SimProcess(topology_text=TOPOLOGY, time_scale=0.02) as proc:
        yield proc


@pytest.fixture(scope="module")
def rsi(rsim: SimProcess) -> Iterator[Any]:
    si = connect(rsim)
    yield si
    Disconnect(si)


def extra(vm: Any) -> dict[str, str]:
    return {o.key: o.value for o in vm.config.extraConfig}


def check_devices(vm: Any) -> list[Any]:
    """The device list is consistent as vSphere's is: unique keys; every device on a
    controller is listed by it, on a unit of its own; controllers of a kind on buses
    of their own; disks backed by files on the VM's datastore."""
    devices = list(vm.config.hardware.device)
    by_key = {d.key: d for d in devices}
    assert len(by_key) == len(devices)
    units: Counter[tuple[int, int]] = Counter()
    for device in devices:
        if device.controllerKey:
            controller = by_key[device.controllerKey]
            assert isinstance(controller, DEV.VirtualController), device.key
            assert device.key in controller.device, (device.key, controller.key)
            assert device.unitNumber is not None
            units[(device.controllerKey, device.unitNumber)] += 1
    assert max(units.values()) == 1
    for controller in (d for d in devices if isinstance(d, DEV.VirtualController)):
        assert all(by_key[k].controllerKey == controller.key for k in controller.device or ())
        if isinstance(controller, DEV.VirtualSCSIController):
            assert controller.scsiCtlrUnitNumber not in {
                by_key[k].unitNumber for k in controller.device}
    buses = Counter((type(d), d.busNumber) for d in devices
                    if isinstance(d, DEV.VirtualController))
    assert max(buses.values()) == 1
    datastore = vm.datastore[0]
    for disk in (d for d in devices if isinstance(d, DEV.VirtualDisk)):
        assert disk.backing.fileName.startswith(f"[{datastore.name}] {vm.name}/")
        assert disk.backing.datastore == datastore
        assert disk.capacityInKB > 0
    return devices


@pytest.mark.parametrize(("source", "scsi", "nic"), [
    ("lin-src", DEV.ParaVirtualSCSIController, DEV.VirtualVmxnet3),
    ("win-src", DEV.VirtualLsiLogicSASController, DEV.VirtualE1000e),
])
def test_sources_and_their_clones_carry_a_real_vms_configuration(
        rsi: Any, source: str, scsi: Any, nic: Any) -> None:
    vm = find_vm(rsi, source)
    devices = check_devices(vm)
    assert len(devices) >= 12
    kinds = {type(d) for d in devices}
    assert {DEV.VirtualPCIController, DEV.VirtualIDEController, DEV.VirtualPS2Controller,
            DEV.VirtualSIOController, DEV.VirtualKeyboard, DEV.VirtualPointingDevice,
            DEV.VirtualVideoCard, DEV.VirtualVMCIDevice, DEV.VirtualCdrom, DEV.VirtualDisk,
            scsi, nic} <= kinds
    keys = extra(vm)
    assert len(keys) >= 30
    assert keys["nvram"] == f"{source}.nvram"
    assert keys["pciBridge4.virtualDev"] == "pcieRootPort"
    assert keys["guestinfo.vmtools.versionNumber"] == str(vm.config.tools.toolsVersion)
    assert keys["guestinfo.app.role"] in ("web", "db")  # the topology's own keys too
    windows = source.startswith("win")
    assert any(k.startswith("guestinfo.driver.") for k in keys) is windows
    assert vm.config.guestId == ("windows2019srv_64Guest" if windows else "ubuntu64Guest")

    task = vm.InstantClone_Task(vim.vm.InstantCloneSpec(
        name=f"{source}-clone", location=vim.vm.RelocateSpec(folder=vm_folder(rsi)),
        config=[vim.option.OptionValue(key="guestinfo.fleet.state", value="new")]))
    WaitForTask(task)
    clone = task.info.result
    clone_devices = check_devices(clone)
    # the source's devices, keys and all; new MACs; the disks are the clone's deltas
    assert [(type(d), d.key) for d in clone_devices] == [(type(d), d.key) for d in devices]
    macs = {d.key: d.macAddress for d in devices if isinstance(d, DEV.VirtualEthernetCard)}
    clone_macs = {d.key: d.macAddress for d in clone_devices
                  if isinstance(d, DEV.VirtualEthernetCard)}
    assert clone_macs.keys() == macs.keys()
    assert not set(clone_macs.values()) & set(macs.values())
    clone_keys = extra(clone)
    assert len(clone_keys) >= 30
    assert clone_keys["guestinfo.app.role"] == keys["guestinfo.app.role"]  # inherited
    assert clone_keys["guestinfo.fleet.state"] == "new"  # the spec's
    assert clone_keys["guestinfo.vmtools.buildNumber"] == keys["guestinfo.vmtools.buildNumber"]
    # its own files and identity, the source's settings
    assert clone_keys["nvram"] == f"{source}-clone.nvram"
    assert clone_keys["vm.genid"] != keys["vm.genid"]
    shared = {k for k in keys if k not in ("nvram", "sched.swap.derivedName", "migrate.hostLog",
                                            "vmxstats.filename", "vm.genid", "vm.genidX",
                                            "scsi0.sasWWID")}
    assert {k: clone_keys[k] for k in shared} == {k: keys[k] for k in shared}


def retrieve(si: Any, vm: Any, paths: list[str], *, contents: bool = False) -> dict[str, Any]:
    spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm)],
                         propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=paths)])
    pc = si.content.propertyCollector
    if contents:
        [content] = pc.RetrieveContents([spec])
    else:
        [content] = pc.RetrievePropertiesEx([spec], PC.RetrieveOptions()).objects
    assert not content.missingSet
    return {p.name: p.val for p in content.propSet}


@pytest.mark.parametrize("contents", [False, True], ids=["RetrievePropertiesEx",
                                                         "RetrieveContents"])
def test_keyed_paths_are_answered_present_or_left_out(rsi: Any, contents: bool) -> None:
    vm = find_vm(rsi, "lin-src")
    role = 'config.extraConfig["guestinfo.app.role"]'
    missing = 'config.extraConfig["guestinfo.no.such.key"]'
    label = "config.hardware.device[2000].deviceInfo.label"
    props = retrieve(rsi, vm, ["name", role, missing, NIC, "config.hardware.device[4999]",
                               label, "config.hardware.device[4999].deviceInfo.label"],
                     contents=contents)
    # named by the path asked; an element that is not there is simply not in the reply
    assert set(props) == {"name", role, NIC, label}
    assert isinstance(props[role], vim.option.OptionValue)
    assert (props[role].key, props[role].value) == ("guestinfo.app.role", "web")
    assert isinstance(props[NIC], DEV.VirtualVmxnet3) and props[NIC].key == 4000
    assert props[NIC].macAddress == next(d.macAddress for d in vm.config.hardware.device
                                         if d.key == 4000)
    assert props[label] == "Hard disk 1"
    # a vmx key and a key VMware Tools published are keyed like any other
    assert retrieve(rsi, vm, ['config.extraConfig["pciBridge0.present"]'])[
        'config.extraConfig["pciBridge0.present"]'].value == "TRUE"


@pytest.mark.parametrize("path", ['config.extraConfig["guestinfo.x', "name[1]",
                                  "config.hardware.device[x]", 'config.extraConfig["a"]b'])
def test_malformed_keyed_paths_are_invalid_property(rsi: Any, path: str) -> None:
    with pytest.raises(vmodl.query.InvalidProperty):
        retrieve(rsi, find_vm(rsi, "lin-src"), [path])


def wait(pc: Any, version: str | None) -> Any:
    # maxWaitSeconds=0: what is pending now (the change was made by a finished task)
    return pc.WaitForUpdatesEx(version, PC.WaitOptions(maxWaitSeconds=0))


def changes(update_set: Any) -> dict[str, Any]:
    [fs] = update_set.filterSet
    [obj] = fs.objectSet
    return {c.name: c for c in obj.changeSet}


def reconfigure(vm: Any, **values: str) -> None:
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key=k, value=v) for k, v in values.items()])))


def test_a_filter_on_keyed_paths_reports_their_changes(rsim: SimProcess) -> None:
    si = connect(rsim)  # a session (and update versions) of its own
    try:
        vm = find_vm(si, "lin-src")
        connected = f"{NIC}.connectable.connected"
        pc = si.content.propertyCollector.CreatePropertyCollector()
        pc.CreateFilter(PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=vm)],
            propSet=[PC.PropertySpec(type=vim.VirtualMachine,
                                     pathSet=[STATE, connected])]), True)
        first = wait(pc, None)
        [fs] = first.filterSet
        [enter] = fs.objectSet
        assert enter.kind == "enter"
        # no state yet: the path is left out; the NIC is connected
        assert {c.name: c.val for c in enter.changeSet} == {connected: True}

        reconfigure(vm, **{"guestinfo.fleet.state": "ready"})
        update = wait(pc, first.version)
        change = changes(update)[STATE]
        assert change.op == "assign" and change.val.value == "ready"
        assert set(changes(update)) == {STATE}

        # another key changes the VM's config, not these paths: nothing to report
        reconfigure(vm, **{"guestinfo.other": "x"})
        assert wait(pc, update.version) is None

        reconfigure(vm, **{"guestinfo.fleet.state": ""})  # an empty value removes it
        removed = wait(pc, update.version)
        assert changes(removed)[STATE].op == "remove"
        assert changes(removed)[STATE].val is None

        nic = next(d for d in vm.config.hardware.device if d.key == 4000)
        nic.connectable.connected = False
        WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation="edit", device=nic)])))
        disconnected = wait(pc, removed.version)
        assert changes(disconnected)[connected].val is False
        pc.DestroyPropertyCollector()
    finally:
        Disconnect(si)
