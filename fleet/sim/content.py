"""The service-level managed objects ``ServiceContent`` points to: ServiceInstance,
SessionManager, SearchIndex, guest operations and the provisioning checker.

Each is given what it uses (the session table, the root folder, the task
manager...), not the simulator. Sessions themselves are ``fleet.sim.calls``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pyVmomi import vim, vmodl

from fleet.sim import guest as guestcmd
from fleet.sim.calls import CallContext, Sessions, current_call
from fleet.sim.core import Inventory, SimObject
from fleet.sim.entities import Folder, ManagedEntity, check_entity_name
from fleet.sim.stats import Stats
from fleet.sim.tasks import VC, Task, TaskManager
from fleet.sim.topology import LatencyConfig
from fleet.sim.vm import VirtualMachine


class SessionManager(SimObject):
    vim_type = vim.SessionManager

    def __init__(self, inventory: Inventory, moid: str, *, sessions: Sessions,
                 stats: Stats) -> None:
        super().__init__(inventory, moid)
        self.sessions = sessions
        self.stats = stats

    def prop_currentSession(self) -> Any:
        ctx = current_call.get(None)
        if ctx is None or not ctx.session.authenticated:
            return None
        return ctx.session.user_session()

    def prop_sessionList(self) -> Any:
        return [s.user_session() for s in self.sessions.by_key.values() if s.authenticated]

    def prop_defaultLocale(self) -> str:
        return "en"

    def prop_messageLocaleList(self) -> list[str]:
        return ["en"]

    def Login(self, ctx: CallContext, userName: str, password: str,
              locale: str | None = None) -> Any:
        user = self.sessions.authenticate(userName, password)
        if user is None:
            raise vim.fault.InvalidLogin(msg="Cannot complete login due to an incorrect user "
                                             "name or password.")
        session = ctx.session
        session.user = userName
        session.authenticated = True
        session.login_time = datetime.now(UTC)
        self.stats.counters["logins"] += 1
        return session.user_session()

    def Logout(self, ctx: CallContext) -> None:
        ctx.session.close()
        self.sessions.by_key.pop(ctx.session.key, None)

    def SessionIsActive(self, ctx: CallContext, sessionID: str, userName: str) -> bool:
        session = self.sessions.by_key.get(sessionID)
        return bool(session and session.authenticated and session.user == userName)

    def TerminateSession(self, ctx: CallContext, sessionId: list[str]) -> None:
        for key in sessionId or ():
            session = self.sessions.by_key.pop(key, None)
            if session is None:
                raise vim.fault.NotFound(msg=f"No session {key!r}.")
            session.close()

    def SetLocale(self, ctx: CallContext, locale: str) -> None:
        pass


class SearchIndex(SimObject):
    vim_type = vim.SearchIndex

    def __init__(self, inventory: Inventory, moid: str, *, root: Folder) -> None:
        super().__init__(inventory, moid)
        self.root = root

    def _walk(self, path: str) -> ManagedEntity | None:
        node: ManagedEntity = self.root
        for raw in [p for p in path.strip("/").split("/") if p]:
            name = raw.replace("%2f", "/").replace("%2F", "/").replace("%5c", "\\").replace(
                "%25", "%")
            nxt = self._child(node, name)
            if nxt is None:
                return None
            node = nxt
        return node

    def FindByInventoryPath(self, ctx: CallContext, inventoryPath: str) -> Any:
        found = self._walk(inventoryPath)
        return found.ref if found is not None and found is not self.root else None

    def FindChild(self, ctx: CallContext, entity: Any, name: str) -> Any:
        parent = self.inventory.resolve(entity)
        if isinstance(parent, ManagedEntity):
            child = self._child(parent, name)
            return child.ref if child is not None else None
        return None

    @staticmethod
    def _child(parent: ManagedEntity, name: str) -> ManagedEntity | None:
        """The first child called ``name`` (a folder answers from its index)."""
        if isinstance(parent, Folder):
            return parent.child_named(name)
        return next((c for c in parent.children() if c.name == name), None)

    def _by_uuid(self, uuid: str, instance: bool) -> list[VirtualMachine]:
        out = []
        for vm in self.inventory.of_type(VirtualMachine):
            if (vm.instance_uuid if instance else vm.uuid) == uuid:
                out.append(vm)
        return out

    def FindByUuid(self, ctx: CallContext, datacenter: Any = None, uuid: str = "",
                   vmSearch: bool = True, instanceUuid: bool | None = None) -> Any:
        if not vmSearch:
            return None
        found = self._by_uuid(uuid, bool(instanceUuid))
        return found[0].ref if found else None

    def FindAllByUuid(self, ctx: CallContext, datacenter: Any = None, uuid: str = "",
                      vmSearch: bool = True, instanceUuid: bool | None = None) -> Any:
        if not vmSearch:
            return vim.ManagedEntity.Array()
        return vim.ManagedEntity.Array([v.ref for v in self._by_uuid(uuid, bool(instanceUuid))])


class GuestProcessManager(SimObject):
    vim_type = vim.vm.guest.ProcessManager

    def __init__(self, inventory: Inventory, moid: str, *, stats: Stats) -> None:
        super().__init__(inventory, moid)
        self.stats = stats

    def _vm(self, ctx: CallContext, vm: Any, auth: Any) -> VirtualMachine:
        return guest_vm(self.inventory, vm, auth)

    def StartProgramInGuest(self, ctx: CallContext, vm: Any, auth: Any, spec: Any) -> int:
        target = self._vm(ctx, vm, auth)
        path = spec.programPath or ""
        windows_path = guestcmd.is_windows_path(path)
        if (target.guest.family == "windows") != windows_path or not path:
            raise vim.fault.FileNotFound(
                msg=f"The program '{path}' does not exist in the {target.guest.family} guest.",
                file=path)
        program = guestcmd.parse(path, spec.arguments or "", target.guest.family)
        cmd_line = f'"{path}" {spec.arguments or ""}'.strip()
        proc = target.start_process(program, cmd_line, auth.username)
        self.stats.counters["guest_programs"] += 1
        return proc.pid

    def ListProcessesInGuest(self, ctx: CallContext, vm: Any, auth: Any,
                             pids: list[int] | None = None) -> Any:
        target = self._vm(ctx, vm, auth)
        wanted = set(pids or ())
        out = []
        for proc in target.guest.processes.values():
            if wanted and proc.pid not in wanted:
                continue
            out.append(vim.vm.guest.ProcessManager.ProcessInfo(
                name=proc.name, pid=proc.pid, owner=proc.owner, cmdLine=proc.cmd_line,
                startTime=proc.start, endTime=proc.end, exitCode=proc.exit_code))
        return vim.vm.guest.ProcessManager.ProcessInfo.Array(out)

    def TerminateProcessInGuest(self, ctx: CallContext, vm: Any, auth: Any, pid: int) -> None:
        target = self._vm(ctx, vm, auth)
        proc = target.guest.processes.get(pid)
        if proc is None:
            raise vim.fault.GuestProcessNotFound(msg=f"No process {pid}.", pid=pid)
        if proc.end is None:
            proc.pending = ()
            proc.end = datetime.now(UTC)
            proc.exit_code = 143


def guest_vm(inventory: Inventory, vm: Any, auth: Any) -> VirtualMachine:
    """The VM a guest operation names, once its host answers and ``auth`` logs in to
    its guest (the faults a guest program's start would raise)."""
    target = inventory.resolve(vm)
    if not isinstance(target, VirtualMachine):
        raise vmodl.fault.InvalidArgument(msg="vm is not a virtual machine",
                                          invalidProperty="vm")
    target.check_host()
    target.guest_auth(auth)
    return target


class GuestAuthManager(SimObject):
    """Guest logins: ``ValidateCredentialsInGuest`` answers as a guest program's start
    would (powered off, frozen or Tools not running, wrong user or password)."""

    vim_type = vim.vm.guest.AuthManager

    def ValidateCredentialsInGuest(self, ctx: CallContext, vm: Any, auth: Any) -> None:
        guest_vm(self.inventory, vm, auth)


class GuestOperationsManager(SimObject):
    vim_type = vim.vm.guest.GuestOperationsManager

    def __init__(self, inventory: Inventory, moid: str,
                 process_manager: GuestProcessManager, auth_manager: GuestAuthManager) -> None:
        super().__init__(inventory, moid)
        self.process_manager = process_manager
        self.auth_manager = auth_manager

    def prop_processManager(self) -> Any:
        return self.process_manager.ref

    def prop_authManager(self) -> Any:
        return self.auth_manager.ref


class ProvisioningChecker(SimObject):
    vim_type = vim.vm.check.ProvisioningChecker

    def __init__(self, inventory: Inventory, moid: str, *, tasks: TaskManager,
                 latency: LatencyConfig) -> None:
        super().__init__(inventory, moid)
        self.tasks = tasks
        self.latency = latency

    def CheckInstantClone_Task(self, ctx: CallContext, vm: Any, spec: Any,
                               testType: list[str] | None = None) -> Any:
        source = self.inventory.resolve(vm)
        if not isinstance(source, VirtualMachine):
            raise vmodl.fault.InvalidArgument(msg="vm is not a virtual machine",
                                              invalidProperty="vm")

        async def body(task: Task) -> Any:
            await task.sleep(self.latency.check_s)
            # The spec is judged as InstantClone_Task judges it: where it goes, its NIC
            # edits, its name; then the source as it is now.
            errors: list[Any] = []
            folder = source.parent
            try:
                folder, _, _ = source._clone_target(spec.location)
                source._nic_edits(spec.location)
                check_entity_name(spec.name)
            except vmodl.MethodFault as exc:
                errors.append(exc)
            assert isinstance(folder, Folder)
            errors += source.clone_problems(spec.name, folder)
            warnings = []
            if source.chain_depth() + 1 > 100:
                warnings.append(vim.fault.GenericVmConfigFault(
                    msg=f"The disk chain of '{source.name}' has {source.chain_depth()} levels; "
                        "more than 100 slows the VM down.", reason="deep disk chain"))
            return [vim.vm.check.Result(vm=source.ref, host=source.host.ref, error=errors,
                                        warning=warnings)]

        return self.tasks.start(ctx, entity=source, method="CheckInstantClone_Task",
                                description_id="VirtualMachineProvisioningChecker."
                                               "checkInstantClone",
                                body=body, resources=(VC,))


class ServiceInstance(SimObject):
    vim_type = vim.ServiceInstance

    def __init__(self, inventory: Inventory, moid: str, *,
                 content: Callable[[], Any], now: Callable[[], datetime]) -> None:
        super().__init__(inventory, moid)
        self.content = content  # builds ServiceInstanceContent
        self.now = now  # vCenter's wall clock

    def prop_content(self) -> Any:
        return self.content()

    def prop_serverClock(self) -> Any:
        return self.now()

    def prop_capability(self) -> Any:
        return vim.Capability(provisioningSupported=True, multiHostSupported=True,
                              userShellAccessSupported=False)

    def RetrieveServiceContent(self, ctx: CallContext) -> Any:
        return self.content()

    def CurrentTime(self, ctx: CallContext) -> Any:
        return self.now()
