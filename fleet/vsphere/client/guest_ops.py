"""The client's waits on a VM: programs run in its guest, and states it reaches.

``run_in_guest`` starts a program through VMware Tools and polls its end (vSphere
has no update for a guest process) at a gentle backoff; ``wait_for_vm`` and
``wait_for_vm_state`` wait on the shared ``WaitForUpdatesEx`` loop for an IP
address, an extraConfig key, the frozen state or running Tools, never polling.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from pyVmomi import vim

from fleet.errors import GuestOperationFailed, RequestTimeout
from fleet.vsphere import inventory as inv
from fleet.vsphere import vim_specs
from fleet.vsphere.client.reads import Reads
from fleet.vsphere.model import GuestCredentials, GuestProgram, Ref, VmInfo
from fleet.vsphere.watch import Watch

log = logging.getLogger("fleet.vsphere")


class GuestOps(Reads):
    """Guest programs and waits for a VM's state; see the module docstring."""

    async def _processes(self) -> Any:
        if self._process_manager is None:
            contents = await self._retrieve_objects([self.content.guestOperationsManager],
                                                    ["processManager"])
            self._process_manager = inv.props(contents[0])["processManager"]
        return self._process_manager

    async def run_in_guest(self, vm: Ref, credentials: GuestCredentials, program: GuestProgram,
                           *, timeout_s: float) -> int:
        """Run a program through VMware Tools and return its exit code.

        vSphere has no update for a guest process, so its end is polled with
        ``ListProcessesInGuest`` at a gentle backoff (``guest_poll_s``). A program
        that freezes the VM (``instantclone.freeze``) never ends inside it: once
        the VM is frozen, 0 is returned."""
        manager = await self._processes()
        mo = self.mo(vm)
        auth = vim.vm.guest.NamePasswordAuthentication(
            username=credentials.username, password=credentials.password,
            interactiveSession=False)
        deadline = anyio.current_time() + timeout_s
        with anyio.move_on_after(timeout_s):
            pid = await self.session.call(manager, "StartProgramInGuest", mo, auth,
                                          vim_specs.program_spec(program))
            log.debug("started %s in %s as pid %s", program.path, vm.id, pid)
            delay, max_delay = self.guest_poll_s
            while True:
                await anyio.sleep(min(delay, max(0.0, deadline - anyio.current_time())))
                delay = min(delay * 1.5, max_delay)
                try:
                    listed = await self.session.call(manager, "ListProcessesInGuest", mo, auth,
                                                     [pid])
                except GuestOperationFailed as exc:
                    if exc.fault == "GuestOperationsUnavailable" and await self._frozen(vm):
                        return 0
                    raise
                for proc in listed or ():
                    if proc.pid == pid and proc.endTime is not None:
                        return int(proc.exitCode if proc.exitCode is not None else 0)
        raise RequestTimeout(f"{program.path} in {vm.id} still running after {timeout_s} s",
                             method="ListProcessesInGuest", obj=vm.id)

    async def _frozen(self, vm: Ref) -> bool:
        contents = await self._retrieve_objects([self.mo(vm)], ["runtime.instantCloneFrozen"])
        return bool(contents and inv.props(contents[0]).get("runtime.instantCloneFrozen"))

    async def wait_for_vm(self, vm: Ref, *, timeout_s: float, guest_ip: bool = False,
                          extra_config_key: str | None = None, frozen: bool | None = None,
                          tools_running: bool = False) -> VmInfo:
        """Wait (with WaitForUpdatesEx, no polling) until every asked condition holds."""
        if guest_ip or extra_config_key is not None or frozen is not None or tools_running:
            await self.wait_for_vm_state(vm, timeout_s=timeout_s, guest_ip=guest_ip,
                                         extra_config_key=extra_config_key, frozen=frozen,
                                         tools_running=tools_running)
        return await self.get_vm(vm)

    async def wait_for_vm_state(self, vm: Ref, *, timeout_s: float, guest_ip: bool = False,
                                extra_config_key: str | None = None,
                                frozen: bool | None = None, tools_running: bool = False) -> None:
        """``wait_for_vm`` without the read of the whole VM afterwards."""
        paths: list[str] = []
        if guest_ip:
            paths.append("guest.ipAddress")
        if extra_config_key is not None:
            paths.append("config.extraConfig")
        if frozen is not None:
            paths.append("runtime.instantCloneFrozen")
        if tools_running:
            paths.append("guest.toolsRunningStatus")
        if not paths:
            await self.get_vm(vm)  # it must exist (NotFound otherwise)
            return

        def ready(w: Watch) -> bool:
            values = w.values
            if guest_ip and not values.get("guest.ipAddress"):
                return False
            if extra_config_key is not None and not any(
                    o.key == extra_config_key and o.value not in (None, "")
                    for o in values.get("config.extraConfig") or ()):
                return False
            if frozen is not None and values.get("runtime.instantCloneFrozen") is not frozen:
                return False
            return not tools_running or \
                values.get("guest.toolsRunningStatus") == "guestToolsRunning"

        wanted = ", ".join(paths)
        w = self.watcher.watch(self.mo(vm), paths)
        try:
            await w.wait_for(ready, timeout_s=timeout_s, what=f"wanted {wanted}")
        finally:
            w.release()
