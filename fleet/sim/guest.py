"""What the simulated guest OS does with a program started through guest operations.

A command line (program path + arguments) is read into an ordered list of
actions the simulator knows how to play:

- ``freeze``: ``vmware-rpctool "instantclone.freeze"`` (Linux) or
  ``vmtoolsd.exe --cmd "instantclone.freeze"`` (Windows). The VM freezes; the
  rest of the command line runs later, inside each clone when it resumes.
- ``refresh``: the NIC refresh recipes of the instant-clone network workflow.
  Linux: a shell script that writes the NIC's PCI address to the driver's
  ``.../unbind`` and ``.../bind`` files, then renews DHCP (``dhclient``,
  ``networkctl renew``, ``nmcli`` or ``udhcpc``). Windows: ``Restart-NetAdapter``.
  Afterwards the guest uses the vNIC's current MAC.
- ``info-set guestinfo.K V`` / ``info-get guestinfo.K``: the guest writes or
  tests a guestinfo variable (``info-get`` exits 1 when it is unset).
- ``exit N`` at the end of a shell script: the exit code.

Anything else is an ordinary program that succeeds. Which actions appear where
in the text decides their order, so ``sh -c 'vmware-rpctool "instantclone.freeze";
<refresh>'`` freezes the source and refreshes each clone's NIC as it resumes.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

FREEZE = "freeze"
REFRESH = "refresh"
INFO_SET = "info-set"
INFO_GET = "info-get"

_FREEZE = re.compile(r"instantclone\.freeze")
_LINUX_REFRESH = re.compile(r"/unbind\b")
_LINUX_BIND = re.compile(r"/bind\b")
_DHCP = re.compile(r"\b(dhclient|networkctl\s+(renew|reconfigure)|nmcli|udhcpc|dhcpcd)\b")
_WINDOWS_REFRESH = re.compile(r"Restart-NetAdapter", re.IGNORECASE)
_INFO_SET = re.compile(r"info-set\s+(guestinfo\.[\w.\-/]+)\s+([^\"';&|]*)")
_INFO_GET = re.compile(r"info-get\s+(guestinfo\.[\w.\-/]+)")
_EXIT = re.compile(r"\bexit\s+(\d+)\s*['\"]?\s*$")


@dataclass(frozen=True)
class Action:
    kind: str
    key: str | None = None
    value: str | None = None


@dataclass(frozen=True)
class Program:
    actions: tuple[Action, ...]
    exit_code: int
    name: str


def is_windows_path(path: str) -> bool:
    return bool(re.match(r"^[A-Za-z]:[\\/]", path)) or path.lower().endswith(".exe")


def parse(path: str, arguments: str, family: str) -> Program:
    """Read a program start into actions. ``family`` is ``linux`` or ``windows``."""
    text = f"{path} {arguments or ''}"
    found: list[tuple[int, Action]] = []
    for match in _FREEZE.finditer(text):
        found.append((match.start(), Action(FREEZE)))
    if family == "windows":
        for match in _WINDOWS_REFRESH.finditer(text):
            found.append((match.start(), Action(REFRESH)))
    else:
        unbind = _LINUX_REFRESH.search(text)
        if unbind and _LINUX_BIND.search(text, unbind.end()) and _DHCP.search(text):
            found.append((unbind.start(), Action(REFRESH)))
    for match in _INFO_SET.finditer(text):
        found.append((match.start(), Action(INFO_SET, match.group(1),
                                            match.group(2).strip())))
    for match in _INFO_GET.finditer(text):
        found.append((match.start(), Action(INFO_GET, match.group(1))))
    found.sort(key=lambda item: item[0])
    exit_match = _EXIT.search(text.strip())
    exit_code = int(exit_match.group(1)) if exit_match else 0
    if path.rstrip("/").endswith("/false"):
        exit_code = 1
    try:
        name = shlex.split(path)[0].replace("\\", "/").rsplit("/", 1)[-1]
    except ValueError:
        name = path
    return Program(tuple(a for _, a in found), exit_code, name)
