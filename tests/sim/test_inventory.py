"""The simulator through unmodified pyVmomi: connection, inventory, property collector."""

from __future__ import annotations

import ssl
import threading
import urllib.request
from typing import Any

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from tests.sim.conftest import connect, find_vm, vm_folder
from tests.simproc import PASSWORD, USER, SimProcess

PC = vmodl.query.PropertyCollector


def test_smartconnect_negotiates_and_reads_service_content(sim: SimProcess, si: Any) -> None:
    about = si.content.about
    assert about.apiType == "VirtualCenter"
    assert about.apiVersion == "8.0.3.0"
    assert si._stub.version == "vim.version.v8_0_3_0"
    assert si.content.sessionManager.currentSession.userName == USER
    assert isinstance(si.CurrentTime().year, int)


def test_versions_document_lists_prior_versions(sim: SimProcess) -> None:
    ctx = ssl.create_default_context(cafile=str(sim.cert_path))
    body = urllib.request.urlopen(sim.url + "/vimServiceVersions.xml", context=ctx).read()
    text = body.decode()
    assert "<version>8.0.3.0</version>" in text
    assert "<version>6.7</version>" in text  # priorVersions: InstantClone's level


def test_wrong_password_is_invalid_login(sim: SimProcess) -> None:
    with pytest.raises(vim.fault.InvalidLogin):
        connect(sim, pwd="wrong")


def test_self_signed_certificate_is_refused_by_a_verifying_client(sim: SimProcess) -> None:
    strict = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        SmartConnect(host=sim.host, port=sim.port, user=USER, pwd=PASSWORD, sslContext=strict)


def test_default_topology_shape(si: Any) -> None:
    content = si.content
    [dc] = content.rootFolder.childEntity
    assert isinstance(dc, vim.Datacenter)
    [cluster] = dc.hostFolder.childEntity
    assert isinstance(cluster, vim.ClusterComputeResource)
    hosts = cluster.host
    assert [h.name for h in hosts] == [f"esx-{i:02d}" for i in range(1, 9)]
    assert all(h.runtime.connectionState == "connected" for h in hosts)
    assert hosts[0].summary.hardware.memorySize == 512 * 1024**3
    assert len(dc.datastore) == 4
    assert dc.datastore[0].summary.capacity == 8192 * 1024**3
    assert [n.name for n in dc.network] == ["VM Network"]
    sources = content.searchIndex.FindByInventoryPath("dc1/vm/sources")
    names = sorted(vm.name for vm in sources.childEntity)
    assert names == sorted([f"frozen-{i:02d}" for i in range(1, 9)] + ["golden-running"])
    for i in range(1, 9):
        vm = content.searchIndex.FindByInventoryPath(f"dc1/vm/sources/frozen-{i:02d}")
        assert vm.runtime.instantCloneFrozen is True
        assert vm.runtime.powerState == "poweredOn"
        assert vm.runtime.host.name == f"esx-{i:02d}"
    running = content.searchIndex.FindByInventoryPath("dc1/vm/sources/golden-running")
    assert running.runtime.instantCloneFrozen is False
    assert len(running.layoutEx.disk[0].chain) == 1


def test_vm_properties_are_typed(si: Any) -> None:
    vm = si.content.searchIndex.FindByInventoryPath("dc1/vm/sources/golden-running")
    cfg = vm.config
    assert isinstance(cfg, vim.vm.ConfigInfo)
    assert len(cfg.uuid) == 36 and cfg.instanceUuid != cfg.uuid
    [nic] = [d for d in cfg.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    assert nic.macAddress.startswith("00:50:56:")
    assert nic.connectable.connected is True
    [disk] = [d for d in cfg.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    assert disk.backing.fileName.endswith(".vmdk")
    assert vm.guest.toolsRunningStatus == "guestToolsRunning"
    assert vm.guest.ipAddress
    assert vm.guest.net[0].macAddress == nic.macAddress
    assert vm.summary.config.name == "golden-running"
    assert vm.resourcePool.name == "Resources"
    assert vm.datastore[0].name == "ds-01"
    assert vm.parent.name == "sources"
    layout = vm.layoutEx
    assert layout.disk[0].key == disk.key
    assert all(len(unit.fileKey) == 2 for unit in layout.disk[0].chain)


def test_enumerations_come_typed_as_their_enumeration(si: Any) -> None:
    """vCenter writes ``runtime.powerState`` as ``xsi:type="VirtualMachinePowerState"``,
    and pyVmomi then gives its enum type; an ``xsd:string`` would come back a plain str.
    The same for a nested path and for the values a watch reports."""
    vm = si.content.searchIndex.FindByInventoryPath("dc1/vm/sources/frozen-01")
    paths = ["runtime.powerState", "runtime.connectionState", "summary.runtime.powerState",
             "guest.toolsRunningStatus", "name"]
    spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm)],
                         propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=paths)])
    [content] = si.content.propertyCollector.RetrievePropertiesEx(
        [spec], PC.RetrieveOptions()).objects
    read = {p.name: p.val for p in content.propSet}
    assert type(read["runtime.powerState"]) is vim.VirtualMachine.PowerState
    assert type(read["summary.runtime.powerState"]) is vim.VirtualMachine.PowerState
    assert type(read["runtime.connectionState"]) is vim.VirtualMachine.ConnectionState
    assert read["runtime.powerState"] == "poweredOn"
    assert type(read["name"]) is str  # a plain string stays one
    pc = si.content.propertyCollector.CreatePropertyCollector()
    try:
        pc.CreateFilter(spec, True)
        first = pc.WaitForUpdatesEx("", PC.WaitOptions(maxWaitSeconds=0))
        [obj] = first.filterSet[0].objectSet
        watched = {c.name: c.val for c in obj.changeSet}
        assert type(watched["runtime.powerState"]) is vim.VirtualMachine.PowerState
    finally:
        pc.Destroy()


def test_unknown_property_is_invalid_property(si: Any) -> None:
    pc = si.content.propertyCollector
    vm = si.content.searchIndex.FindByInventoryPath("dc1/vm/sources/frozen-01")
    spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm)],
                         propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=["nope"])])
    with pytest.raises(vmodl.query.InvalidProperty):
        pc.RetrievePropertiesEx([spec], PC.RetrieveOptions())


def test_keyed_property_path(si: Any) -> None:
    vm = si.content.searchIndex.FindByInventoryPath("dc1/vm/sources/frozen-01")
    pc = si.content.propertyCollector
    spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm)], propSet=[PC.PropertySpec(
        type=vim.VirtualMachine, pathSet=["config.hardware.device[4000].deviceInfo.label"])])
    [content] = pc.RetrievePropertiesEx([spec], PC.RetrieveOptions()).objects
    assert content.propSet[0].val == "Network adapter 1"


def test_container_view_paging(si: Any) -> None:
    content = si.content
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    traversal = PC.TraversalSpec(name="view", type=vim.view.ContainerView, path="view")
    spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[traversal])],
                         propSet=[PC.PropertySpec(type=vim.VirtualMachine,
                                                  pathSet=["name", "runtime.powerState"])])
    pc = content.propertyCollector
    result = pc.RetrievePropertiesEx([spec], PC.RetrieveOptions(maxObjects=4))
    pages = [result.objects]
    while result.token:
        result = pc.ContinueRetrievePropertiesEx(result.token)
        pages.append(result.objects)
    names = [p.val for page in pages for o in page for p in o.propSet if p.name == "name"]
    assert [len(p) for p in pages][:2] == [4, 4]
    assert len(names) == len(set(names)) == len(view.view)
    view.DestroyView()


def test_a_continuation_reads_its_page_when_asked(si: Any) -> None:
    """Objects are chosen at RetrievePropertiesEx, each page's properties are read
    when it is asked for: a VM reconfigured after the first page shows its new value,
    one destroyed is left out, and no VM is in two pages."""
    label = 'config.extraConfig["guestinfo.pr"]'
    folder = si.content.rootFolder.childEntity[0].vmFolder.CreateFolder("paged-reads")
    source = find_vm(si, "frozen-01")
    for i in range(6):
        WaitForTask(source.InstantClone_Task(vim.vm.InstantCloneSpec(
            name=f"pr-{i}", location=vim.vm.RelocateSpec(folder=folder))))
    traversal = PC.TraversalSpec(name="children", type=vim.Folder, path="childEntity")
    spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=folder, skip=True, selectSet=[traversal])],
                         propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=[label])])
    pc = si.content.propertyCollector
    result = pc.RetrievePropertiesEx([spec], PC.RetrieveOptions(maxObjects=2))
    assert all(not o.propSet for o in result.objects)  # not set yet: absent
    first = {o.obj._moId for o in result.objects}
    later = [vm for vm in folder.childEntity if vm._moId not in first]
    changed, destroyed = later[0], later[1]
    WaitForTask(changed.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key="guestinfo.pr", value="changed")])))
    WaitForTask(destroyed.PowerOffVM_Task())
    WaitForTask(destroyed.Destroy_Task())
    rest: dict[str, str] = {}
    while result.token:
        result = pc.ContinueRetrievePropertiesEx(result.token)
        for o in result.objects:
            assert o.obj._moId not in first and o.obj._moId not in rest
            rest[o.obj._moId] = o.propSet[0].val.value if o.propSet else ""
    assert len(first) == 2
    assert rest[changed._moId] == "changed"
    assert destroyed._moId not in rest
    assert len(rest) == 3
    for vm in folder.childEntity:
        WaitForTask(vm.PowerOffVM_Task())
        WaitForTask(vm.Destroy_Task())
    WaitForTask(folder.Destroy_Task())


def test_classic_traversal_from_root_folder(si: Any) -> None:
    """The folder/datacenter traversal specs older tools build by hand."""
    folder_to_child = PC.TraversalSpec(name="f2c", type=vim.Folder, path="childEntity",
                                       selectSet=[PC.SelectionSpec(name="f2c"),
                                                  PC.SelectionSpec(name="dc2vm")])
    dc_to_vm = PC.TraversalSpec(name="dc2vm", type=vim.Datacenter, path="vmFolder",
                                selectSet=[PC.SelectionSpec(name="f2c")])
    spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=si.content.rootFolder,
                                                  selectSet=[folder_to_child, dc_to_vm])],
                         propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=["name"])])
    objects = si.content.propertyCollector.RetrieveContents([spec])
    names = {o.propSet[0].val for o in objects}
    assert {"frozen-01", "golden-running"} <= names


def test_find_by_inventory_path_and_uuid(si: Any) -> None:
    index = si.content.searchIndex
    assert index.FindByInventoryPath("dc1/vm/nope") is None
    host = index.FindByInventoryPath("dc1/host/cluster1/esx-03")
    assert isinstance(host, vim.HostSystem) and host.name == "esx-03"
    vm = index.FindByInventoryPath("dc1/vm/sources/frozen-02")
    assert index.FindByUuid(None, vm.config.uuid, True).name == "frozen-02"
    assert index.FindByUuid(None, vm.config.instanceUuid, True, True).name == "frozen-02"
    assert index.FindChild(vm.parent, "frozen-02") == vm


def test_create_folder_and_duplicate(si: Any) -> None:
    root = vm_folder(si)
    folder = root.CreateFolder("inv-test")
    assert folder.name == "inv-test" and folder.parent == root
    with pytest.raises(vim.fault.DuplicateName):
        root.CreateFolder("inv-test")
    with pytest.raises(vim.fault.InvalidName):
        root.CreateFolder("bad/name")
    assert si.content.searchIndex.FindByInventoryPath("dc1/vm/inv-test") == folder


def test_fetch_of_missing_object_is_managed_object_not_found(si: Any) -> None:
    ghost = vim.VirtualMachine("vm-999999", si._stub)
    with pytest.raises(vmodl.fault.ManagedObjectNotFound):
        _ = ghost.name


def test_wait_for_updates_ex_reports_changes_and_times_out(sim: SimProcess, si: Any) -> None:
    pc = si.content.propertyCollector.CreatePropertyCollector()
    vm = find_vm(si, "golden-running")
    spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm)], propSet=[PC.PropertySpec(
        type=vim.VirtualMachine, pathSet=["config.extraConfig", "name"])])
    flt = pc.CreateFilter(spec, True)
    first = pc.WaitForUpdatesEx("", vmodl.query.PropertyCollector.WaitOptions(maxWaitSeconds=0))
    assert first.filterSet[0].objectSet[0].kind == "enter"
    idle = pc.WaitForUpdatesEx(first.version, PC.WaitOptions(maxWaitSeconds=0))
    assert idle is None  # nothing changed
    vm.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key="guestinfo.wfu", value="1")]))
    update = pc.WaitForUpdatesEx(first.version, PC.WaitOptions(maxWaitSeconds=10))
    assert update is not None
    [obj] = update.filterSet[0].objectSet
    assert obj.kind == "modify"
    [change] = obj.changeSet
    assert change.name == "config.extraConfig"
    assert {o.key: o.value for o in change.val}["guestinfo.wfu"] == "1"
    # A repeated call with the same version (a lost reply) gets the same answer.
    again = pc.WaitForUpdatesEx(first.version, PC.WaitOptions(maxWaitSeconds=0))
    assert again.version == update.version
    flt.Destroy()
    pc.Destroy()


def test_cancel_wait_for_updates(sim: SimProcess) -> None:
    si = connect(sim)
    pc = si.content.propertyCollector.CreatePropertyCollector()
    vm = find_vm(si, "frozen-03")
    pc.CreateFilter(PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm)], propSet=[PC.PropertySpec(
        type=vim.VirtualMachine, pathSet=["name"])]), True)
    version = pc.WaitForUpdatesEx("", PC.WaitOptions(maxWaitSeconds=0)).version
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            pc.WaitForUpdatesEx(version, PC.WaitOptions(maxWaitSeconds=30))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    other = connect(sim)
    # Cancel from the same session (collector state is per session).
    pc2 = vmodl.query.PropertyCollector(pc._moId, si._stub)
    del other
    # A cancel ends the wait pending at that moment; the waiter's call may not have
    # reached the simulator yet (a sleep would only make that unlikely): cancel until
    # the waiter returns.
    for _ in range(100):
        pc2.CancelWaitForUpdates()
        thread.join(0.1)
        if not thread.is_alive():
            break
    assert not thread.is_alive()
    # Ended by the cancel, not by its 30 s maxWait (that returns no update, no fault).
    assert errors and isinstance(errors[0], vmodl.fault.RequestCanceled)
    Disconnect(si)


def test_truncated_updates_continue(sim: SimProcess, si: Any) -> None:
    pc = si.content.propertyCollector.CreatePropertyCollector()
    vms = [find_vm(si, f"frozen-{i:02d}") for i in range(1, 9)]
    pc.CreateFilter(PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm) for vm in vms],
                                  propSet=[PC.PropertySpec(type=vim.VirtualMachine,
                                                           pathSet=["name"])]), True)
    seen = []
    version = ""
    while True:
        update = pc.WaitForUpdatesEx(version, PC.WaitOptions(maxWaitSeconds=0,
                                                             maxObjectUpdates=3))
        if update is None:
            break
        seen += [o.obj._moId for f in update.filterSet for o in f.objectSet]
        version = update.version
        if not update.truncated:
            break
    assert sorted(seen) == sorted(vm._moId for vm in vms)
    pc.Destroy()


def test_unchanged_values_are_not_reported_again(si: Any) -> None:
    """A touch that leaves a watched value equal is no update (vCenter sends changes)."""
    pc = si.content.propertyCollector.CreatePropertyCollector()
    vm = find_vm(si, "frozen-05")
    pc.CreateFilter(PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=vm)], propSet=[PC.PropertySpec(
        type=vim.VirtualMachine, pathSet=["config.uuid", "config.extraConfig"])]), True)
    version = pc.WaitForUpdatesEx("", PC.WaitOptions(maxWaitSeconds=0)).version
    # Changes config.extraConfig, touches config; config.uuid stays as it was.
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key="guestinfo.same", value="x")])))
    update = pc.WaitForUpdatesEx(version, PC.WaitOptions(maxWaitSeconds=5))
    [obj] = update.filterSet[0].objectSet
    assert [c.name for c in obj.changeSet] == ["config.extraConfig"]
    # The same value again: nothing to report.
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key="guestinfo.same", value="x")])))
    assert pc.WaitForUpdatesEx(update.version, PC.WaitOptions(maxWaitSeconds=0)) is None
    pc.Destroy()


def test_calls_with_a_dead_cookie_do_not_pile_up_sessions(sim: SimProcess) -> None:
    si = connect(sim)
    sim.expire_sessions()
    open_before = sim.stats()["sessions_open"]
    for _ in range(20):
        with pytest.raises(vim.fault.NotAuthenticated):
            _ = si.content.rootFolder.childEntity
    si.content.sessionManager.Login(USER, PASSWORD, None)
    assert si.content.rootFolder.childEntity[0].name == "dc1"
    # one new session for the Login, not one per refused call
    assert sim.stats()["sessions_open"] <= open_before + 1
