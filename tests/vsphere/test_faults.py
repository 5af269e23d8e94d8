"""The one translation point of vim faults -> fleet.errors (transport failures:
tests/vsphere/test_transport.py)."""

from __future__ import annotations

from xml.parsers.expat import ExpatError

import pytest
from pyVmomi import vim, vmodl

from fleet import errors
from fleet.vsphere.faults import map_vsphere_faults, translate, translate_fault

IC = "InstantClone_Task"


def vm(moid: str) -> object:
    return vim.VirtualMachine(moid)


@pytest.mark.parametrize(("fault", "method", "expected", "transient"), [
    (vim.fault.NotAuthenticated(msg="x"), "RetrievePropertiesEx", errors.NotAuthenticated, True),
    (vim.fault.InvalidLogin(msg="x"), "Login", errors.InvalidLogin, False),
    (vim.fault.InvalidGuestLogin(msg="x"), "StartProgramInGuest", errors.InvalidGuestLogin,
     False),
    (vim.fault.GuestOperationsUnavailable(msg="x"), "ListProcessesInGuest",
     errors.GuestOperationFailed, False),
    (vim.fault.InvalidHostConnectionState(msg="x", host=vim.HostSystem("host-1")), IC,
     errors.HostUnavailable, False),
    (vmodl.fault.HostNotConnected(msg="x"), "PowerOnVM_Task", errors.HostUnavailable, False),
    (vim.fault.InsufficientHostMemoryCapacityFault(msg="x"), IC, errors.InsufficientResources,
     False),
    (vim.fault.InvalidPowerState(msg="x", existingState="poweredOff"), IC,
     errors.SourceNotPoweredOn, False),
    (vim.fault.InvalidState(msg="x"), IC, errors.SourceNotPoweredOn, False),
    (vim.fault.InvalidPowerState(msg="x"), "PowerOffVM_Task", errors.VSphereFault, False),
    (vim.fault.TaskInProgress(msg="x"), IC, errors.ResourceBusy, True),
    (vim.fault.Timedout(msg="x"), "CloneVM_Task", errors.RequestTimeout, True),
    (vmodl.fault.SystemError(msg="x", reason="y"), "ReconfigVM_Task", errors.TransientFault,
     True),
    (vmodl.fault.RequestCanceled(msg="x"), IC, errors.TaskCancelled, False),
    (vmodl.fault.ManagedObjectNotFound(msg="x", obj=vm("vm-9")), "Destroy_Task",
     errors.NotFound, False),
    (vmodl.fault.MethodNotFound(msg="x", method="InstantClone_Task"), IC,
     errors.UnsupportedEndpoint, False),
    (vmodl.fault.NotSupported(msg="x"), IC, errors.UnsupportedEndpoint, False),
    (vmodl.fault.MethodNotFound(msg="x"), "Frobnicate", errors.VSphereFault, False),
    (vim.fault.DisallowedMigrationDeviceAttached(msg="x"), IC, errors.VSphereFault, False),
])
def test_fault_types(fault: object, method: str, expected: type[errors.VSphereError],
                     transient: bool) -> None:
    error = translate(fault, method=method, obj="vm-1")  # type: ignore[arg-type]
    assert type(error) is expected
    assert error.transient is transient
    assert error.method == method
    assert error.fault == type(fault).__name__.rsplit(".", 1)[-1]
    assert method in str(error) and "x" in str(error)


def test_scopes() -> None:
    assert translate_fault(vim.fault.InvalidPowerState(msg="x"), method=IC).scope == "source"
    assert translate_fault(vim.fault.InvalidHostConnectionState(msg="x"), method=IC
                           ).scope == "host"
    assert translate_fault(vim.fault.InsufficientResourcesFault(msg="x"), method=IC
                           ).scope == "host"


def test_chain_too_deep_is_decided_by_the_reread_depth_not_the_message() -> None:
    fault = vim.fault.GenericVmConfigFault(msg="Unable to prepare migration",
                                           reason="Unable to prepare migration")
    deep = translate(fault, method=IC, obj="vm-1", source_chain_depth=255)
    assert isinstance(deep, errors.ChainTooDeep) and deep.scope == "source"
    assert "255" in str(deep)
    # Same message, a shallow chain: just a fault.
    assert type(translate(fault, method=IC, source_chain_depth=12)) is errors.VSphereFault
    # No depth known: never guess from the text.
    assert type(translate(fault, method=IC)) is errors.VSphereFault
    system = vmodl.fault.SystemError(msg="A general system error occurred", reason="x")
    assert isinstance(translate(system, method=IC, source_chain_depth=255), errors.ChainTooDeep)
    # Outside instant clones depth means nothing.
    assert type(translate(fault, method="ReconfigVM_Task", source_chain_depth=255)) is \
        errors.VSphereFault


def test_permission_denied_names_the_privilege_and_object() -> None:
    fault = vim.fault.NoPermission(msg="Permission to perform this operation was denied.",
                                   object=vm("vm-7"),
                                   privilegeId="VirtualMachine.Provisioning.Clone")
    error = translate(fault, method=IC, obj="vm-3")
    assert isinstance(error, errors.PermissionDenied)
    assert error.privilege == "VirtualMachine.Provisioning.Clone"
    assert error.obj == "vm-7"
    assert "VirtualMachine.Provisioning.Clone" in str(error)


def test_a_clone_denied_on_its_source_rules_out_the_source_only() -> None:
    """Denied on the source: the source is out (scope source), other sources may clone.
    Denied on the folder, pool or datastore the clone goes to: only that call failed."""
    on_source = translate(vim.fault.NoPermission(msg="denied", object=vm("vm-3"),
                                                 privilegeId="VirtualMachine.Provisioning.Clone"),
                          method=IC, obj="vm-3")
    assert type(on_source) is errors.SourcePermissionDenied and on_source.scope == "source"
    assert on_source.reason == "permission_denied" and on_source.obj == "vm-3"
    on_folder = translate(vim.fault.NoPermission(
        msg="denied", object=vim.Folder("group-v9"),
        privilegeId="VirtualMachine.Inventory.CreateFromExisting"), method=IC, obj="vm-3")
    assert type(on_folder) is errors.PermissionDenied and on_folder.scope == "call"
    elsewhere = translate(vim.fault.NoPermission(msg="denied", object=vm("vm-3"),
                                                 privilegeId="VirtualMachine.Interact.PowerOn"),
                          method="PowerOnVM_Task", obj="vm-3")
    assert type(elsewhere) is errors.PermissionDenied


def test_permission_denied_from_missing_privileges_list() -> None:
    fault = vim.fault.NoPermission(msg="denied", missingPrivileges=[
        vim.fault.NoPermission.EntityPrivileges(entity=vm("vm-7"),
                                                privilegeIds=["VirtualMachine.Interact.PowerOn"])])
    error = translate(fault, method="PowerOnVM_Task")
    assert isinstance(error, errors.PermissionDenied)
    assert error.privilege == "VirtualMachine.Interact.PowerOn"


def test_not_authenticated_is_not_mistaken_for_no_permission() -> None:
    # NotAuthenticated is a subclass of NoPermission in the vim type tree.
    assert type(translate(vim.fault.NotAuthenticated(msg="x"))) is errors.NotAuthenticated


def test_duplicate_name_carries_the_existing_vm() -> None:
    error = translate(vim.fault.DuplicateName(msg="taken", name="web-1", object=vm("vm-42")),
                      method=IC)
    assert isinstance(error, errors.DuplicateName)
    assert error.name == "web-1" and error.existing == "vm-42"
    # A folder holding the name (a clone still in flight) is not an existing VM.
    pending = translate(vim.fault.DuplicateName(msg="taken", name="web-1",
                                                object=vim.Folder("group-v3")), method=IC)
    assert isinstance(pending, errors.DuplicateName) and pending.existing is None


def test_unreadable_reply_is_a_connection_failure() -> None:
    with pytest.raises(errors.ConnectionFailed, match="unreadable reply") as info, \
            map_vsphere_faults(method="RetrievePropertiesEx", obj="propertyCollector"):
        raise ExpatError("not well-formed")
    assert info.value.transient and not isinstance(info.value, errors.NotDelivered)


def test_map_vsphere_faults_chains_the_original() -> None:
    fault = vim.fault.TaskInProgress(msg="busy")
    with pytest.raises(errors.ResourceBusy) as info, \
            map_vsphere_faults(method="PowerOnVM_Task", obj="vm-1"):
        raise fault
    assert info.value.__cause__ is fault
    # fleet errors pass through untouched
    original = errors.NotFound("gone")
    with pytest.raises(errors.NotFound) as again, map_vsphere_faults(method="x"):
        raise original
    assert again.value is original
