"""Service-level managed objects: ServiceInstance, sessions, search, guest operations,
provisioning checks.

Sessions follow vCenter: the first request gets a ``vmware_soap_session``
cookie; ``Login`` authenticates it; a session idle for longer than the
topology's ``session_idle_timeout_s`` expires and every call on it then fails
with ``NotAuthenticated`` until the client logs in again. Property-collector
state (filters, versions) and views belong to the session and die with it.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pyVmomi import vim, vmodl

from fleet.sim import guest as guestcmd
from fleet.sim.core import CallContext, SimObject, current_call
from fleet.sim.entities import Folder, ManagedEntity
from fleet.sim.propcollector import CollectorState
from fleet.sim.tasks import VC, Task
from fleet.sim.vm import VirtualMachine

if TYPE_CHECKING:
    from fleet.sim.simulator import Simulator


class Session:
    """One client session (one cookie)."""

    def __init__(self, sim: Simulator, ip: str = "127.0.0.1", user_agent: str = "") -> None:
        self.sim = sim
        self.key = secrets.token_hex(20)
        self.user: str | None = None
        self.authenticated = False
        self.alive = True
        self.login_time: datetime | None = None
        self.last_active = time.monotonic()
        self.last_active_wall = datetime.now(UTC)
        self.ip = ip
        self.user_agent = user_agent
        self.call_count = 0
        self._collectors: dict[str, CollectorState] = {}
        self.retrieve_tokens: dict[str, Any] = {}
        self.views: set[str] = set()
        self.owned_collectors: set[str] = set()

    def collector_state(self, moid: str) -> CollectorState:
        state = self._collectors.get(moid)
        if state is None:
            state = self._collectors[moid] = CollectorState(self)
        return state

    def drop_collector(self, moid: str) -> None:
        state = self._collectors.pop(moid, None)
        if state is not None:
            state.close()
        self.owned_collectors.discard(moid)

    def touch(self) -> None:
        self.last_active = time.monotonic()
        self.last_active_wall = datetime.now(UTC)
        self.call_count += 1

    def idle_s(self) -> float:
        return time.monotonic() - self.last_active

    def close(self) -> None:
        """Logout or expiry: the session's filters, views and collectors go away."""
        self.alive = False
        self.authenticated = False
        for moid in list(self._collectors):
            self._collectors.pop(moid).close()
        for moid in self.views | self.owned_collectors:
            self.sim.inventory.objects.pop(moid, None)
        self.views.clear()
        self.owned_collectors.clear()
        self.retrieve_tokens.clear()

    def user_session(self) -> Any:
        return vim.UserSession(
            key=self.key, userName=self.user or "", fullName=self.user or "",
            loginTime=self.login_time or datetime.now(UTC),
            lastActiveTime=self.last_active_wall, locale="en", messageLocale="en",
            extensionSession=False, ipAddress=self.ip, userAgent=self.user_agent,
            callCount=self.call_count)


class SessionManager(SimObject):
    vim_type = vim.SessionManager

    def prop_currentSession(self) -> Any:
        ctx = current_call.get(None)
        if ctx is None or not ctx.session.authenticated:
            return None
        return ctx.session.user_session()

    def prop_sessionList(self) -> Any:
        return [s.user_session() for s in self.sim.sessions.values() if s.authenticated]

    def prop_defaultLocale(self) -> str:
        return "en"

    def prop_messageLocaleList(self) -> list[str]:
        return ["en"]

    def Login(self, ctx: CallContext, userName: str, password: str,
              locale: str | None = None) -> Any:
        user = self.sim.authenticate(userName, password)
        if user is None:
            raise vim.fault.InvalidLogin(msg="Cannot complete login due to an incorrect user "
                                             "name or password.")
        session = ctx.session
        session.user = userName
        session.authenticated = True
        session.login_time = datetime.now(UTC)
        self.sim.counters["logins"] += 1
        return session.user_session()

    def Logout(self, ctx: CallContext) -> None:
        ctx.session.close()
        self.sim.sessions.pop(ctx.session.key, None)

    def SessionIsActive(self, ctx: CallContext, sessionID: str, userName: str) -> bool:
        session = self.sim.sessions.get(sessionID)
        return bool(session and session.authenticated and session.user == userName)

    def TerminateSession(self, ctx: CallContext, sessionId: list[str]) -> None:
        for key in sessionId or ():
            session = self.sim.sessions.pop(key, None)
            if session is None:
                raise vim.fault.NotFound(msg=f"No session {key!r}.")
            session.close()

    def SetLocale(self, ctx: CallContext, locale: str) -> None:
        pass


class SearchIndex(SimObject):
    vim_type = vim.SearchIndex

    def _walk(self, path: str) -> ManagedEntity | None:
        node: ManagedEntity = self.sim.root_folder
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
        return found.ref if found is not None and found is not self.sim.root_folder else None

    def FindChild(self, ctx: CallContext, entity: Any, name: str) -> Any:
        parent = ctx.sim.inventory.resolve(entity)
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
        for vm in self.sim.inventory.of_type(VirtualMachine):
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

    def _vm(self, ctx: CallContext, vm: Any, auth: Any) -> VirtualMachine:
        target = ctx.sim.inventory.resolve(vm)
        if not isinstance(target, VirtualMachine):
            raise vmodl.fault.InvalidArgument(msg="vm is not a virtual machine",
                                              invalidProperty="vm")
        target.check_host()
        target.guest_auth(auth)
        return target

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
        ctx.sim.counters["guest_programs"] += 1
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


class GuestOperationsManager(SimObject):
    vim_type = vim.vm.guest.GuestOperationsManager

    def __init__(self, sim: Simulator, moid: str, process_manager: GuestProcessManager) -> None:
        super().__init__(sim, moid)
        self.process_manager = process_manager

    def prop_processManager(self) -> Any:
        return self.process_manager.ref


class ProvisioningChecker(SimObject):
    vim_type = vim.vm.check.ProvisioningChecker

    def CheckInstantClone_Task(self, ctx: CallContext, vm: Any, spec: Any,
                               testType: list[str] | None = None) -> Any:
        source = ctx.sim.inventory.resolve(vm)
        if not isinstance(source, VirtualMachine):
            raise vmodl.fault.InvalidArgument(msg="vm is not a virtual machine",
                                              invalidProperty="vm")

        async def body(task: Task) -> Any:
            await task.sleep(ctx.sim.topology.latency.check_s)
            folder = source.parent
            location = spec.location
            if location is not None and location.folder is not None:
                target = ctx.sim.inventory.get(location.folder._moId)
                if isinstance(target, Folder):
                    folder = target
            assert isinstance(folder, Folder)
            errors = source.clone_problems(ctx, spec.name, folder)
            warnings = []
            if source.chain_depth() + 1 > 100:
                warnings.append(vim.fault.GenericVmConfigFault(
                    msg=f"The disk chain of '{source.name}' has {source.chain_depth()} levels; "
                        "more than 100 slows the VM down.", reason="deep disk chain"))
            return [vim.vm.check.Result(vm=source.ref, host=source.host.ref, error=errors,
                                        warning=warnings)]

        return ctx.sim.start_task(ctx, entity=source, method="CheckInstantClone_Task",
                                  description_id="VirtualMachineProvisioningChecker."
                                                 "checkInstantClone",
                                  body=body, resources=(VC,))


class ServiceInstance(SimObject):
    vim_type = vim.ServiceInstance

    def prop_content(self) -> Any:
        return self.sim.service_content()

    def prop_serverClock(self) -> Any:
        return datetime.now(UTC)

    def prop_capability(self) -> Any:
        return vim.Capability(provisioningSupported=True, multiHostSupported=True,
                              userShellAccessSupported=False)

    def RetrieveServiceContent(self, ctx: CallContext) -> Any:
        return self.sim.service_content()

    def CurrentTime(self, ctx: CallContext) -> Any:
        return datetime.now(UTC)
