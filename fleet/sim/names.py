"""Names held by work in progress, and the network identities handed to VMs.

vCenter holds a name in a folder from the start of a create, clone or rename,
so a concurrent one of the same name gets ``DuplicateName`` (fleet's lock relies
on it: docs/locking.md). MACs come from VMware's ``00:50:56`` range; IPs from
10.0.0.0/8 as a DHCP server would give them, a destroyed VM's first again, and an
IPv6 address from the MAC as SLAAC makes one (EUI-64, in a unique local prefix).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


class NameHolds:
    """Names taken in a folder (by id) by a call or task still in progress."""

    def __init__(self) -> None:
        self._held: dict[str, set[str]] = {}

    def pending(self, folder_id: str, name: str) -> bool:
        return name in self._held.get(folder_id, ())

    def hold(self, folder_id: str, name: str) -> None:
        self._held.setdefault(folder_id, set()).add(name)

    def release(self, folder_id: str, name: str) -> None:
        names = self._held.get(folder_id)
        if names is not None:
            names.discard(name)


class Addresses:
    """MACs for new NICs, and the IP each MAC's guest gets from DHCP."""

    def __init__(self) -> None:
        self._mac_counter = 0x800000
        self.ips: dict[str, str] = {}  # MAC -> IP, for the NICs of VMs that exist
        self._free_ips: list[str] = []  # IPs of destroyed VMs, handed out again first
        self._ip_pool = ipaddress.IPv4Network("10.0.0.0/8").hosts()
        next(self._ip_pool)

    def new_mac(self) -> str:
        self._mac_counter += 1
        n = self._mac_counter
        return f"00:50:56:{(n >> 16) & 0xFF:02x}:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}"

    def ip_for(self, mac: str) -> str:
        ip = self.ips.get(mac)
        if ip is None:
            ip = self._free_ips.pop() if self._free_ips else str(next(self._ip_pool))
            self.ips[mac] = ip
        return ip

    def release(self, macs: Iterable[str]) -> None:
        """The NICs with these MACs are gone: their IPs may be handed out again."""
        for mac in macs:
            ip = self.ips.pop(mac, None)
            if ip is not None:
                self._free_ips.append(ip)


#: the unique local /64 the simulated network's routers advertise (RFC 4193)
IPV6_PREFIX = ipaddress.IPv6Network("fd00:f1ee:0:1::/64")


def ipv6_for(mac: str) -> str:
    """The SLAAC address a guest using ``mac`` takes: the prefix and the MAC's EUI-64
    interface id (the universal/local bit flipped, ``ff:fe`` in the middle)."""
    octets = [int(part, 16) for part in mac.split(":")]
    eui = [octets[0] ^ 0x02, *octets[1:3], 0xFF, 0xFE, *octets[3:6]]
    return str(IPV6_PREFIX[int.from_bytes(bytes(eui), "big")])
