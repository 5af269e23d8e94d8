"""Guest side of the simulator: freeze, the NIC refresh workflow, network conflicts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.sim.conftest import connect, find_vm, vm_folder
from tests.sim.test_clone import clone_spec, nic_of
from tests.simproc import SimProcess

LINUX_REFRESH = (
    "for dev in /sys/class/net/*; do [ -e \"$dev/device\" ] || continue; "
    "addr=$(basename $(readlink -f \"$dev/device\")); "
    "drv=$(readlink -f \"$dev/device/driver\"); "
    "echo \"$addr\" > \"$drv/unbind\"; echo \"$addr\" > \"$drv/bind\"; done; "
    "dhclient -r; dhclient"
)
WINDOWS_REFRESH = "-NoProfile -Command \"Get-NetAdapter | Restart-NetAdapter -Confirm:$false\""
POWERSHELL = r"C:\Windows\System32\WindowsPowerShell\v1.0\powershell.exe"

TOPOLOGY = """
folders = ["src"]
[latency]
guest_program_s = 0.05
freeze_s = 0.05
guest_boot_s = 0.05
instant_clone_s = 0.05
power_on_s = 0.05
full_clone_s = 0.1
jitter = 0.0
[[hosts]]
name = "esx-01"
[[sources]]
name = "lin-frozen"
state = "frozen"
folder = "src"
[[sources]]
name = "lin-running"
folder = "src"
[sources.guest]
ready_key = "guestinfo.app.ready"
ready_after_s = 0.05
[[sources]]
name = "win-frozen"
state = "frozen"
folder = "src"
[sources.guest]
family = "windows"
user = "Administrator"
password = "win-pass"
"""


@pytest.fixture(scope="module")
def gsim() -> Iterator[SimProcess]:
    with SimProcess(topology_text=TOPOLOGY, time_scale=1.0) as proc:
        yield proc


@pytest.fixture(scope="module")
def gsi(gsim: SimProcess) -> Any:
    return connect(gsim)


def auth(user: str = "root", password: str = "fleet-guest") -> Any:
    return vim.vm.guest.NamePasswordAuthentication(username=user, password=password)


def run(si: Any, vm: Any, path: str, args: str = "", creds: Any = None,
        timeout: float = 10.0) -> int:
    pm = si.content.guestOperationsManager.processManager
    creds = creds or auth()
    pid = pm.StartProgramInGuest(vm, creds, vim.vm.guest.ProcessManager.ProgramSpec(
        programPath=path, arguments=args))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        [proc] = pm.ListProcessesInGuest(vm, creds, [pid])
        if proc.endTime is not None:
            return int(proc.exitCode)
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not finish")


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def connect_nic(vm: Any, connected: bool) -> None:
    nic = nic_of(vm)
    nic.connectable.connected = connected
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[
        vim.vm.device.VirtualDeviceSpec(operation="edit", device=nic)])))


def conflicts(sim: SimProcess) -> int:
    return int(sim.stats()["network_conflicts"])


def test_full_network_workflow_has_no_conflict(gsim: SimProcess, gsi: Any) -> None:
    source = find_vm(gsi, "lin-frozen")
    before = conflicts(gsim)
    task = source.InstantClone_Task(clone_spec("net-ok", vm_folder(gsi),
                                               nic=(nic_of(source), "disconnect")))
    WaitForTask(task)
    clone = task.info.result
    vnic_mac = nic_of(clone).macAddress
    wait_until(lambda: clone.guest.toolsRunningStatus == "guestToolsRunning")
    assert clone.guest.net[0].macAddress == nic_of(source).macAddress  # still the source's
    assert run(gsi, clone, "/bin/sh", f"-c '{LINUX_REFRESH}'") == 0
    assert clone.guest.net[0].macAddress == vnic_mac
    connect_nic(clone, True)
    wait_until(lambda: clone.guest.ipAddress is not None)
    assert clone.guest.ipAddress != source.guest.ipAddress
    assert conflicts(gsim) == before


def test_skipping_the_refresh_is_one_conflict_per_clone(gsim: SimProcess, gsi: Any) -> None:
    source = find_vm(gsi, "lin-frozen")
    before = conflicts(gsim)
    for i in range(3):
        task = source.InstantClone_Task(clone_spec(f"net-bad-{i}", vm_folder(gsi),
                                                   nic=(nic_of(source), "disconnect")))
        WaitForTask(task)
        clone = task.info.result
        connect_nic(clone, True)
        connect_nic(clone, False)
        connect_nic(clone, True)  # counted once per clone, however often it flaps
    assert conflicts(gsim) == before + 3


def test_clone_with_nic_left_connected_conflicts_at_once(gsim: SimProcess, gsi: Any) -> None:
    source = find_vm(gsi, "lin-frozen")
    before = conflicts(gsim)
    WaitForTask(source.InstantClone_Task(clone_spec("net-connected", vm_folder(gsi))))
    assert conflicts(gsim) == before + 1


def test_windows_refresh_recipe(gsim: SimProcess, gsi: Any) -> None:
    source = find_vm(gsi, "win-frozen")
    before = conflicts(gsim)
    task = source.InstantClone_Task(clone_spec("win-ok", vm_folder(gsi),
                                               nic=(nic_of(source), "disconnect")))
    WaitForTask(task)
    clone = task.info.result
    creds = auth("Administrator", "win-pass")
    wait_until(lambda: clone.guest.toolsRunningStatus == "guestToolsRunning")
    with pytest.raises(vim.fault.FileNotFound):
        run(gsi, clone, "/bin/sh", f"-c '{LINUX_REFRESH}'", creds)
    assert run(gsi, clone, POWERSHELL, WINDOWS_REFRESH, creds) == 0
    connect_nic(clone, True)
    assert conflicts(gsim) == before
    assert clone.guest.net[0].macAddress == nic_of(clone).macAddress


def test_wrong_guest_password_is_invalid_guest_login(gsi: Any) -> None:
    vm = find_vm(gsi, "lin-running")
    with pytest.raises(vim.fault.InvalidGuestLogin):
        run(gsi, vm, "/bin/true", creds=auth("root", "nope"))


def test_frozen_vm_refuses_guest_operations(gsi: Any) -> None:
    with pytest.raises(vim.fault.GuestOperationsUnavailable):
        run(gsi, find_vm(gsi, "lin-frozen"), "/bin/true")


def test_exit_codes_and_guestinfo(gsi: Any) -> None:
    vm = find_vm(gsi, "lin-running")
    assert run(gsi, vm, "/bin/true") == 0
    assert run(gsi, vm, "/bin/false") == 1
    assert run(gsi, vm, "/bin/sh", "-c 'echo hi; exit 3'") == 3
    assert run(gsi, vm, "/usr/bin/vmware-rpctool", '"info-get guestinfo.nope"') == 1
    assert run(gsi, vm, "/usr/bin/vmware-rpctool", '"info-set guestinfo.agent.state up"') == 0
    extra = {o.key: o.value for o in vm.config.extraConfig}
    assert extra["guestinfo.agent.state"] == "up"
    assert run(gsi, vm, "/usr/bin/vmware-rpctool", '"info-get guestinfo.agent.state"') == 0


def test_freeze_through_guest_operations_and_unfreeze(gsi: Any) -> None:
    folder = vm_folder(gsi)
    full = find_vm(gsi, "lin-running").CloneVM_Task(folder, "to-freeze", vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(), powerOn=True))
    WaitForTask(full)
    vm = full.info.result
    wait_until(lambda: vm.guest.toolsRunningStatus == "guestToolsRunning")
    assert vm.runtime.instantCloneFrozen is False
    pm = gsi.content.guestOperationsManager.processManager
    pm.StartProgramInGuest(vm, auth(), vim.vm.guest.ProcessManager.ProgramSpec(
        programPath="/usr/bin/vmware-rpctool", arguments='"instantclone.freeze"'))
    wait_until(lambda: vm.runtime.instantCloneFrozen is True)
    assert vm.runtime.powerState == "poweredOn"
    WaitForTask(vm.PowerOffVM_Task())
    assert vm.runtime.instantCloneFrozen is False
    WaitForTask(vm.PowerOnVM_Task())
    wait_until(lambda: vm.guest.toolsRunningStatus == "guestToolsRunning")
    pm.StartProgramInGuest(vm, auth(), vim.vm.guest.ProcessManager.ProgramSpec(
        programPath="/usr/bin/vmware-rpctool", arguments='"instantclone.freeze"'))
    wait_until(lambda: vm.runtime.instantCloneFrozen is True)
    WaitForTask(vm.ResetVM_Task())
    assert vm.runtime.instantCloneFrozen is False


def test_code_after_the_freeze_line_runs_in_each_clone(gsim: SimProcess, gsi: Any) -> None:
    folder = vm_folder(gsi)
    full = find_vm(gsi, "lin-running").CloneVM_Task(folder, "self-refreshing", vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(), powerOn=True))
    WaitForTask(full)
    source = full.info.result
    wait_until(lambda: source.guest.toolsRunningStatus == "guestToolsRunning")
    pm = gsi.content.guestOperationsManager.processManager
    script = f"vmware-rpctool \"instantclone.freeze\" && {LINUX_REFRESH}"
    pid = pm.StartProgramInGuest(source, auth(), vim.vm.guest.ProcessManager.ProgramSpec(
        programPath="/bin/sh", arguments=f"-c '{script}'"))
    wait_until(lambda: source.runtime.instantCloneFrozen is True)
    before = conflicts(gsim)
    task = source.InstantClone_Task(clone_spec("resumed", folder,
                                               nic=(nic_of(source), "disconnect")))
    WaitForTask(task)
    clone = task.info.result
    wait_until(lambda: clone.guest.toolsRunningStatus == "guestToolsRunning")
    [proc] = pm.ListProcessesInGuest(clone, auth(), [pid])
    wait_until(lambda: pm.ListProcessesInGuest(clone, auth(), [pid])[0].exitCode is not None)
    assert proc.pid == pid
    connect_nic(clone, True)
    assert conflicts(gsim) == before
    assert clone.guest.net[0].macAddress == nic_of(clone).macAddress


def test_guest_sets_its_ready_flag_once_networked(gsi: Any) -> None:
    source = find_vm(gsi, "lin-running")
    full = source.CloneVM_Task(vm_folder(gsi), "ready-flag", vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(), powerOn=True))
    WaitForTask(full)
    vm = full.info.result
    wait_until(lambda: any(o.key == "guestinfo.app.ready" and o.value == "1"
                           for o in vm.config.extraConfig))
