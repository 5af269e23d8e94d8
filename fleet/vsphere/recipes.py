"""Guest programs fleet runs through VMware Tools: NIC refresh recipes and the freeze command.

They live beside the client (not in the engine): they are what fleet sends into
a guest. These command lines are a contract: the simulator's guest
(``fleet.sim.guest``) recognises them by their stable markers, so change them
only together with it (``tests/engine/test_recipes.py`` holds the two equal).

NIC refresh (docs/vsphere.md: after an instant clone the guest still uses
its source's MAC; refreshing the NIC makes it pick up the new one):

- Linux: ``/bin/sh -c '<script>'``. For every interface under
  ``/sys/class/net`` except ``lo`` that has a ``device`` link, the script writes
  the device's PCI address to ``<driver>/unbind`` and then ``<driver>/bind``,
  then renews DHCP with the first tool present: ``dhclient -r; dhclient -nw``,
  else ``networkctl renew <ifaces>``, else ``nmcli networking off/on``.
  Markers: the arguments contain ``/unbind``, ``/bind`` and ``dhclient``
  (and ``networkctl renew`` / ``nmcli`` as fallbacks).
- Windows: ``C:\\Windows\\System32\\WindowsPowerShell\\v1.0\\powershell.exe`` with
  arguments ``-NoProfile -Command "Get-NetAdapter | Restart-NetAdapter -Confirm:$false"``.
  Marker: ``Restart-NetAdapter``.

Freeze (makes a running VM a frozen instant-clone source):

- Linux: ``/usr/bin/vmware-rpctool`` with arguments ``"instantclone.freeze"``.
- Windows: ``C:\\Program Files\\VMware\\VMware Tools\\vmtoolsd.exe`` with arguments
  ``--cmd "instantclone.freeze"``.

The Linux script contains no single quote, so it survives being wrapped in
``'...'`` for ``/bin/sh -c``.
"""

from __future__ import annotations

from fleet.vsphere.model import GuestFamily, GuestProgram

LINUX_SHELL = "/bin/sh"
WINDOWS_POWERSHELL = r"C:\Windows\System32\WindowsPowerShell\v1.0\powershell.exe"
LINUX_RPCTOOL = "/usr/bin/vmware-rpctool"
WINDOWS_VMTOOLSD = r"C:\Program Files\VMware\VMware Tools\vmtoolsd.exe"
FREEZE_COMMAND = "instantclone.freeze"

# Driver paths are resolved before unbinding because the net device (and with
# it /sys/class/net/<nic>/device/driver) disappears once the driver lets go.
LINUX_REFRESH_SCRIPT = (
    "for dev in /sys/class/net/*; do"
    ' nic="${dev##*/}";'
    ' [ "$nic" = lo ] && continue;'
    ' [ -e "$dev/device/driver" ] || continue;'
    ' addr="$(basename "$(readlink -f "$dev/device")")";'
    ' drv="$(readlink -f "$dev/device/driver")";'
    ' echo "$addr" > "$drv/unbind";'
    ' echo "$addr" > "$drv/bind";'
    " done;"
    " sleep 1;"
    " if command -v dhclient >/dev/null 2>&1; then dhclient -r; dhclient -nw;"
    " elif command -v networkctl >/dev/null 2>&1; then"
    " networkctl renew $(ls /sys/class/net | grep -v -x lo);"
    " elif command -v nmcli >/dev/null 2>&1; then nmcli networking off; nmcli networking on;"
    " fi"
)

WINDOWS_REFRESH_COMMAND = "Get-NetAdapter | Restart-NetAdapter -Confirm:$false"


def linux_refresh() -> GuestProgram:
    """Unbind/bind every NIC's PCI driver, then renew DHCP (see the module docstring)."""
    return GuestProgram(path=LINUX_SHELL, arguments=f"-c '{LINUX_REFRESH_SCRIPT}'")


def windows_refresh() -> GuestProgram:
    """``Restart-NetAdapter`` on every adapter."""
    return GuestProgram(path=WINDOWS_POWERSHELL,
                        arguments=f'-NoProfile -Command "{WINDOWS_REFRESH_COMMAND}"')


def custom_program(path: str, arguments: str = "") -> GuestProgram:
    """A user's own refresh command from the spec (``network.command``/``network.arguments``)."""
    return GuestProgram(path=path, arguments=arguments)


def refresh_for(family: GuestFamily) -> GuestProgram:
    """The built-in refresh recipe for a guest family; ``other`` has none."""
    if family == "linux":
        return linux_refresh()
    if family == "windows":
        return windows_refresh()
    raise ValueError(f"no built-in NIC refresh recipe for guest family {family!r}")


def freeze_program(family: GuestFamily) -> GuestProgram:
    """The command that freezes a running VM from inside its guest."""
    if family == "linux":
        return GuestProgram(path=LINUX_RPCTOOL, arguments=f'"{FREEZE_COMMAND}"')
    if family == "windows":
        return GuestProgram(path=WINDOWS_VMTOOLSD, arguments=f'--cmd "{FREEZE_COMMAND}"')
    raise ValueError(f"no freeze command for guest family {family!r}")
