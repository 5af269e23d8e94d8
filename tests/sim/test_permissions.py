"""Privileges per entity, guest logins, Tools stopped and maintenance mode, as unmodified
pyVmomi sees them: the queries (HasPrivilegeOnEntities, FetchUserPrivilegeOnEntities,
ValidateCredentialsInGuest) answer what the calls then do."""

from __future__ import annotations

import time
import urllib.error
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from fleet.errors import ConfigError
from fleet.sim.topology import parse_topology
from tests.sim.conftest import connect, find_vm, vm_folder
from tests.sim.test_clone import clone_spec
from tests.simproc import SimProcess

TOPOLOGY = """
folders = ["fleets/lt"]
[latency]
instant_clone_s = 0.05
jitter = 0.0
[[hosts]]
name = "esx-01"
[[hosts]]
name = "esx-02"
maintenance = true
[[sources]]
name = "src-a"
host = "esx-01"
state = "frozen"
[[sources]]
name = "src-b"
host = "esx-01"
state = "running"
guest = { password = "right", tools_running = false }
[[sources]]
name = "src-c"
host = "esx-02"
state = "frozen"
[[users]]
name = "tester"
password = "tester-pw"
[users.denied_on]
"src-a" = ["VirtualMachine.Provisioning.Clone"]
"fleets" = ["VirtualMachine.Inventory.Delete"]
"lt" = ["VirtualMachine.Config.AdvancedConfig"]
"""


@pytest.fixture(scope="module")
def psim() -> Any:
    with SimProcess(topology_text=TOPOLOGY) as proc:
        yield proc


def granted(si: Any, entities: list[Any], privs: list[str]) -> dict[tuple[str, str], bool]:
    auth = si.content.authorizationManager
    key = si.content.sessionManager.currentSession.key
    return {(e.entity._moId, a.privId): a.isGranted
            for e in auth.HasPrivilegeOnEntities(entities, key, privs)
            for a in e.privAvailability}


def test_a_denial_on_an_entity_is_seen_by_the_queries_and_enforced_by_the_call(
        psim: SimProcess) -> None:
    si = connect(psim, user="tester", pwd="tester-pw")
    a, b = find_vm(si, "src-a"), find_vm(si, "src-b")
    clone = "VirtualMachine.Provisioning.Clone"
    answers = granted(si, [a, b], [clone, "System.View"])
    assert answers == {(a._moId, clone): False, (a._moId, "System.View"): True,
                       (b._moId, clone): True, (b._moId, "System.View"): True}
    fetched = {r.entity._moId: set(r.privileges)
               for r in si.content.authorizationManager.FetchUserPrivilegeOnEntities(
                   [a, b], "tester")}
    assert clone not in fetched[a._moId] and clone in fetched[b._moId]
    with pytest.raises(vim.fault.NoPermission) as err:
        a.InstantClone_Task(clone_spec("np", vm_folder(si)))
    assert (err.value.privilegeId, err.value.object) == (clone, a)


def test_a_denial_on_a_folder_propagates_to_what_is_in_it(psim: SimProcess) -> None:
    si = connect(psim, user="tester", pwd="tester-pw")
    index = si.content.searchIndex
    lt = index.FindByInventoryPath("dc1/vm/fleets/lt")
    delete = "VirtualMachine.Inventory.Delete"
    assert granted(si, [lt, vm_folder(si)], [delete]) == {
        (lt._moId, delete): False, (vm_folder(si)._moId, delete): True}
    # the clone's target folder is checked too: CreateFromExisting is held there
    task = find_vm(si, "src-b").InstantClone_Task(clone_spec("in-lt", lt))
    WaitForTask(task)
    made = task.info.result
    # a reconfiguration needs what it changes: extraConfig is refused here, a NIC edit is not
    with pytest.raises(vim.fault.NoPermission) as refused:
        made.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
            vim.option.OptionValue(key="guestinfo.x", value="1")]))
    assert refused.value.privilegeId == "VirtualMachine.Config.AdvancedConfig"
    nic = next(d for d in made.config.hardware.device
               if isinstance(d, vim.vm.device.VirtualEthernetCard))
    nic.connectable.connected = False
    WaitForTask(made.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[
        vim.vm.device.VirtualDeviceSpec(operation="edit", device=nic)])))
    WaitForTask(made.PowerOffVM_Task())
    with pytest.raises(vim.fault.NoPermission) as err:
        made.Destroy_Task()
    assert err.value.privilegeId == delete


def test_guest_credentials_tools_and_maintenance(psim: SimProcess) -> None:
    si = connect(psim)
    auth_manager = si.content.guestOperationsManager.authManager
    b = find_vm(si, "src-b")
    assert b.guest.toolsRunningStatus == "guestToolsNotRunning"
    assert b.guest.toolsStatus == "toolsNotRunning"
    wrong = vim.vm.guest.NamePasswordAuthentication(username="root", password="wrong",
                                                    interactiveSession=False)
    with pytest.raises(vim.fault.GuestOperationsUnavailable):
        auth_manager.ValidateCredentialsInGuest(b, wrong)
    # after a reboot the Tools service runs again, and the password is what is checked
    WaitForTask(b.ResetVM_Task())
    for _ in range(1000):  # a bounded wait for the guest to boot (not a timing assertion)
        if b.guest.toolsRunningStatus == "guestToolsRunning":
            break
        time.sleep(0.01)
    with pytest.raises(vim.fault.InvalidGuestLogin):
        auth_manager.ValidateCredentialsInGuest(b, wrong)
    right = vim.vm.guest.NamePasswordAuthentication(username="root", password="right",
                                                    interactiveSession=False)
    auth_manager.ValidateCredentialsInGuest(b, right)
    host = find_vm(si, "src-c").runtime.host
    assert host.runtime.inMaintenanceMode is True
    task = find_vm(si, "src-c").InstantClone_Task(clone_spec("in-maint", vm_folder(si)))
    with pytest.raises(vim.fault.InvalidHostState):
        WaitForTask(task)


def test_denied_on_names_an_entity_and_a_privilege() -> None:
    base = {"hosts": [{"name": "esx-01"}],
            "users": [{"name": "u", "password": "p", "denied_on": {"nowhere": ["Folder.Create"]}}]}
    with pytest.raises(ConfigError) as err:
        parse_topology(base, "t.toml")
    assert "users[0].denied_on" in str(err.value) and "'nowhere'" in str(err.value)
    base["users"] = [{"name": "u", "password": "p", "denied_on": {"esx-01": ["not a priv"]}}]
    with pytest.raises(ConfigError) as err:
        parse_topology(base, "t.toml")
    assert "users[0].denied_on.esx-01[0]" in str(err.value)


def test_maintenance_mode_from_the_control_api(psim: SimProcess) -> None:
    si = connect(psim)
    host = find_vm(si, "src-a").runtime.host  # esx-01
    assert psim._call("POST", "/_sim/hosts/esx-01", {"maintenance": True}) == {
        "host": "esx-01", "connection_state": "connected", "maintenance": True}
    assert host.runtime.inMaintenanceMode is True
    psim._call("POST", "/_sim/hosts/esx-01", {"maintenance": False})
    assert host.runtime.inMaintenanceMode is False
    for bad in ({"maintenance": "yes"}, {"maintenance": True, "colour": "red"}, {}):
        with pytest.raises(urllib.error.HTTPError) as err:
            psim._call("POST", "/_sim/hosts/esx-01", bad)
        assert err.value.code == 400
    assert host.runtime.inMaintenanceMode is False
