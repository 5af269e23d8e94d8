"""The client's changes to existing VMs: power, destroy, NIC and extraConfig edits.

Each runs a vCenter task to its end through the shared update loop. They converge
to an absolute end state, so the session may repeat them after a lost reply
(``safe=True``), and their "already there" answers count as success: a power
state that is already the wanted one, a VM already gone on destroy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from fleet.errors import NotFound, VSphereError
from fleet.vsphere import inventory as inv
from fleet.vsphere import vim_specs
from fleet.vsphere.client.reads import Reads
from fleet.vsphere.model import Ref

log = logging.getLogger("fleet.vsphere")


class VmChanges(Reads):
    """Power, destroy, NIC and extraConfig edits; see the module docstring."""

    async def _power(self, vm: Ref, method: str, wanted: str) -> None:
        try:
            await self._run_task(self.mo(vm), method, safe=True)
        except VSphereError as exc:
            cause = exc.__cause__
            if exc.fault == "InvalidPowerState" and \
                    getattr(cause, "existingState", None) == wanted:
                return
            raise

    async def _power_state(self, vm: Ref) -> str:
        contents = await self._retrieve_objects([self.mo(vm)], ["runtime.powerState"])
        if not contents:
            raise NotFound(f"{vm} does not exist", obj=vm.id)
        return str(inv.props(contents[0]).get("runtime.powerState"))

    async def power_on(self, vm: Ref) -> None:
        """Power on; a VM already on is fine."""
        await self._power(vm, "PowerOnVM_Task", "poweredOn")

    async def power_off(self, vm: Ref) -> None:
        """Power off (hard); a VM already off is fine."""
        await self._power(vm, "PowerOffVM_Task", "poweredOff")

    async def destroy(self, vm: Ref) -> None:
        """Power off if needed, then destroy. A VM already gone is not an error."""
        try:
            for attempt in range(3):
                if await self._power_state(vm) != "poweredOff":
                    await self.power_off(vm)
                try:
                    await self._run_task(self.mo(vm), "Destroy_Task", safe=True)
                    log.info("destroyed %s", vm.id)
                    return
                except VSphereError as exc:
                    # Powered on again behind our back: once more, from the top.
                    if exc.fault != "InvalidPowerState" or attempt == 2:
                        raise
        except NotFound:
            return

    async def set_nics_connected(self, vm: Ref, connected: bool,
                                 nic_keys: Sequence[int] | None = None, *,
                                 extra_config: Mapping[str, str] | None = None) -> None:
        """Connect or disconnect NICs; ``extra_config`` goes in the same ReconfigVM_Task."""
        mo = self.mo(vm)
        contents = await self._retrieve_objects([mo], ["config.hardware.device"])
        if not contents:
            raise NotFound(f"{vm} does not exist", obj=vm.id)
        nics = inv.nic_devices(inv.props(contents[0]).get("config.hardware.device"))
        if nic_keys is not None:
            unknown = set(nic_keys) - {n.key for n in nics}
            if unknown:
                raise NotFound(f"{vm} has no NIC with key {', '.join(map(str, sorted(unknown)))}",
                               obj=vm.id)
        edits = vim_specs.nic_edits(nics, connected, nic_keys)
        if edits or extra_config:
            await self._run_task(mo, "ReconfigVM_Task",
                                 vim_specs.device_change_spec(edits, extra_config), safe=True)

    async def update_extra_config(self, vm: Ref, values: Mapping[str, str]) -> None:
        """Set extraConfig keys (an empty value removes the key)."""
        if values:
            await self._run_task(self.mo(vm), "ReconfigVM_Task",
                                 vim_specs.extra_config_spec(values), safe=True)
