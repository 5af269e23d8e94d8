"""The guest command lines are a contract with the simulator: pin their stable forms."""

from __future__ import annotations

import shlex

import pytest

from fleet.sim import guest
from fleet.vsphere import recipes
from fleet.vsphere.model import GuestProgram


def test_linux_refresh_form() -> None:
    p = recipes.linux_refresh()
    assert p.path == "/bin/sh"
    argv = shlex.split(p.arguments)
    assert argv[0] == "-c" and len(argv) == 2  # one quoted script, intact
    script = argv[1]
    assert "'" not in script
    for marker in ("/sys/class/net/", "/unbind", "/bind", "dhclient -r", "dhclient -nw",
                   "networkctl renew", "nmcli", '"$nic" = lo', "/device"):
        assert marker in script, marker
    # unbind comes before bind, and DHCP is renewed after both
    assert script.index("/unbind") < script.index("/bind") < script.index("dhclient")


def test_windows_refresh_form() -> None:
    p = recipes.windows_refresh()
    assert p.path == r"C:\Windows\System32\WindowsPowerShell\v1.0\powershell.exe"
    assert p.arguments == \
        '-NoProfile -Command "Get-NetAdapter | Restart-NetAdapter -Confirm:$false"'


def test_freeze_forms() -> None:
    linux = recipes.freeze_program("linux")
    assert (linux.path, linux.arguments) == ("/usr/bin/vmware-rpctool", '"instantclone.freeze"')
    windows = recipes.freeze_program("windows")
    assert windows.path == r"C:\Program Files\VMware\VMware Tools\vmtoolsd.exe"
    assert windows.arguments == '--cmd "instantclone.freeze"'
    with pytest.raises(ValueError):
        recipes.freeze_program("other")


def test_the_simulated_guest_recognises_the_recipes() -> None:
    """The recipes are a contract with the simulator's guest (fleet.sim.guest), which
    plays each by its markers: a refresh, a freeze, or an ordinary program."""

    def plays(program: GuestProgram, family: str) -> list[str]:
        return [a.kind for a in guest.parse(program.path, program.arguments, family).actions]

    assert plays(recipes.linux_refresh(), "linux") == [guest.REFRESH]
    assert plays(recipes.windows_refresh(), "windows") == [guest.REFRESH]
    assert plays(recipes.custom_program("/bin/true"), "linux") == []
    assert plays(GuestProgram("/bin/sh", "-c 'echo /unbind /bind'"), "linux") == []
    assert plays(recipes.freeze_program("linux"), "linux") == [guest.FREEZE]
    assert plays(recipes.freeze_program("windows"), "windows") == [guest.FREEZE]
    assert plays(recipes.linux_refresh(), "linux") == [guest.REFRESH]  # no freeze in it
    assert recipes.refresh_for("windows") == recipes.windows_refresh()
