"""The one place where vSphere faults become ``fleet.errors``.

pyVmomi faults (raised by a call, or the ``error`` of a task) and replies that
are not readable SOAP go through :func:`translate`; :func:`map_vsphere_faults`
is the context-manager form. Failures of the HTTP exchange itself (aiohttp,
TLS, sockets, HTTP statuses, deadlines) never get here untranslated: the
transport turns them into fleet errors where they happen
(``fleet.vsphere.transport.transport_error``; docs/transport.md), and
:func:`translate` passes fleet errors through. Decisions are made on types and
fault fields, never on message text:

=============================================  ==========================================
vSphere says                                   fleet raises
=============================================  ==========================================
NotAuthenticated                               NotAuthenticated (transient)
InvalidLogin                                   InvalidLogin
NoPermission (``privilegeId``)                 PermissionDenied(privilege=...);
                                                 SourcePermissionDenied (scope source)
                                                 on InstantClone when it names the source
InvalidGuestLogin                              InvalidGuestLogin
GuestOperationsFault, ToolsUnavailable,        GuestOperationFailed
  FileFault in a guest operation
DuplicateName (``name``, ``object``)           DuplicateName(existing=<object id>)
InvalidHostState, HostCommunication            HostUnavailable (scope host)
InsufficientResourcesFault                     InsufficientResources (scope host)
InvalidState/InvalidPowerState on InstantClone SourceNotPoweredOn (scope source)
GenericVmConfigFault/SystemError on            ChainTooDeep (scope source) when the
  InstantClone                                   caller re-read the source's chain and it
                                                 is at the 255 limit; otherwise as below
MethodNotFound/NotSupported on InstantClone    UnsupportedEndpoint
TaskInProgress, ConcurrentAccess, ResourceInUse ResourceBusy (transient)
Timedout                                       RequestTimeout (transient)
SystemError                                    TransientFault
RequestCanceled                                TaskCancelled
ManagedObjectNotFound, NotFound                NotFound
anything else                                  VSphereFault
a reply that is not readable SOAP              ConnectionFailed
=============================================  ==========================================

:class:`NotDelivered` (from the transport) marks failures that prove vCenter
never ran the call (the TCP connection was never made, or a proxy answered
503): the session may repeat *any* call after one of those; after other
transport failures only calls that are safe to repeat are retried (see
``fleet.vsphere.session``).

Messages name the method and the object and carry vCenter's own message; they
never contain credentials (no request bodies, headers or cookies are ever
quoted).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from xml.parsers.expat import ExpatError

from pyVmomi import vim, vmodl

from fleet.errors import (
    ChainTooDeep,
    ConnectionFailed,
    DuplicateName,
    GuestOperationFailed,
    HostUnavailable,
    InsufficientResources,
    InvalidGuestLogin,
    InvalidLogin,
    NotAuthenticated,
    NotFound,
    PermissionDenied,
    RequestTimeout,
    ResourceBusy,
    SourceNotPoweredOn,
    SourcePermissionDenied,
    TaskCancelled,
    TransientFault,
    UnsupportedEndpoint,
    VSphereError,
    VSphereFault,
)
from fleet.vcenter import MAX_CHAIN_DEPTH

#: Methods whose faults describe the *source* of an instant clone.
INSTANT_CLONE_METHODS = frozenset({"InstantClone_Task", "CheckInstantClone_Task"})
#: Guest operations: a file fault there is the guest program's, not the datastore's.
GUEST_METHODS = frozenset({"StartProgramInGuest", "ListProcessesInGuest",
                           "TerminateProcessInGuest"})


def fault_name(fault: Any) -> str:
    """The WSDL name of a vim fault (``InvalidPowerState``)."""
    return str(getattr(fault, "_wsdlName", None) or type(fault).__name__.rsplit(".", 1)[-1])


def _moid(value: Any) -> str | None:
    moid = getattr(value, "_moId", None)
    return str(moid) if moid is not None else None


def _mo_type(value: Any) -> str | None:
    name = getattr(value, "_wsdlName", None)
    return str(name) if name is not None and _moid(value) is not None else None


def where_prefix(method: str | None, obj: str | None) -> str:
    """The start of every vSphere error message, naming the call: ``"Destroy_Task on
    vm-7: "``, ``"Login: "``, ``"vm-7: "`` or nothing. Shared with the transport's
    translation (``fleet.vsphere.transport.transport_error``), so a failure reads
    the same whichever layer saw it."""
    if method and obj:
        return f"{method} on {obj}: "
    if method:
        return f"{method}: "
    if obj:
        return f"{obj}: "
    return ""


def _missing_privilege(fault: Any) -> str | None:
    privilege = getattr(fault, "privilegeId", None)
    if privilege:
        return str(privilege)
    for missing in getattr(fault, "missingPrivileges", None) or ():
        for pid in getattr(missing, "privilegeIds", None) or ():
            return str(pid)
    return None


def translate_fault(fault: Any, *, method: str | None = None, obj: str | None = None,
                    source_chain_depth: int | None = None) -> VSphereError:
    """The fleet error for a vim fault raised by ``method`` on ``obj``.

    ``source_chain_depth`` is the source's chain depth as re-read by the caller
    after an instant clone failed; at the limit, a generic config fault or
    system error is the chain being too deep."""
    name = fault_name(fault)
    text = getattr(fault, "msg", None) or getattr(fault, "faultMessage", None) or name
    if not isinstance(text, str):
        text = name
    message = where_prefix(method, obj) + text
    kw: dict[str, Any] = {"fault": name, "method": method, "obj": obj}
    clone = method in INSTANT_CLONE_METHODS

    if isinstance(fault, vim.fault.NotAuthenticated):
        return NotAuthenticated(message, **kw)
    if isinstance(fault, vim.fault.InvalidLogin):
        return InvalidLogin(message, **kw)
    if isinstance(fault, vim.fault.NoPermission):
        privilege = _missing_privilege(fault)
        target = _moid(getattr(fault, "object", None)) or obj
        detail = f" (missing privilege {privilege} on {target})" if privilege else ""
        # Denied on the source itself: the source is out, not the clone (the folder,
        # pool or datastore it goes to would refuse every source's clone alike).
        denied = SourcePermissionDenied if clone and obj is not None and \
            _moid(getattr(fault, "object", None)) == obj else PermissionDenied
        return denied(message + detail, privilege=privilege, fault=name, method=method,
                      obj=target)
    if isinstance(fault, vim.fault.InvalidGuestLogin):
        return InvalidGuestLogin(message, **kw)
    if isinstance(fault, vim.fault.GuestOperationsFault | vim.fault.ToolsUnavailable) or (
            method in GUEST_METHODS and isinstance(fault, vim.fault.FileFault)):
        return GuestOperationFailed(message, **kw)
    if isinstance(fault, vim.fault.DuplicateName):
        holder = getattr(fault, "object", None)
        existing = _moid(holder) if _mo_type(holder) == "VirtualMachine" else None
        return DuplicateName(message, name=getattr(fault, "name", None), existing=existing,
                             **kw)
    if isinstance(fault, vim.fault.InvalidHostState | vmodl.fault.HostCommunication):
        host = _moid(getattr(fault, "host", None))
        return HostUnavailable(message, fault=name, method=method, obj=host or obj)
    if isinstance(fault, vim.fault.InsufficientResourcesFault):
        return InsufficientResources(message, **kw)
    if clone and isinstance(fault, vim.fault.InvalidState):
        return SourceNotPoweredOn(message, **kw)
    if clone and isinstance(fault, vim.fault.GenericVmConfigFault | vmodl.fault.SystemError) \
            and source_chain_depth is not None and source_chain_depth >= MAX_CHAIN_DEPTH:
        return ChainTooDeep(f"{message} (the source's disk chain is {source_chain_depth} "
                            f"levels deep; the limit is {MAX_CHAIN_DEPTH})", **kw)
    if clone and isinstance(fault, vmodl.fault.MethodNotFound | vmodl.fault.NotSupported):
        return UnsupportedEndpoint(
            f"{message} (instant clone needs vCenter Server 6.7 or later)", **kw)
    if isinstance(fault, vim.fault.TaskInProgress | vim.fault.ConcurrentAccess
                  | vim.fault.ResourceInUse):
        return ResourceBusy(message, **kw)
    if isinstance(fault, vim.fault.Timedout):
        return RequestTimeout(message, **kw)
    if isinstance(fault, vmodl.fault.RequestCanceled):
        return TaskCancelled(message, **kw)
    if isinstance(fault, vmodl.fault.ManagedObjectNotFound):
        return NotFound(message, fault=name, method=method,
                        obj=_moid(getattr(fault, "obj", None)) or obj)
    if isinstance(fault, vim.fault.NotFound):
        return NotFound(message, **kw)
    if isinstance(fault, vmodl.fault.SystemError):
        return TransientFault(message, **kw)
    return VSphereFault(message, **kw)


def translate(exc: BaseException, *, method: str | None = None, obj: str | None = None,
              source_chain_depth: int | None = None) -> VSphereError:
    """The fleet error for a vim fault or an unreadable reply; fleet errors (the
    transport's among them) pass through."""
    if isinstance(exc, VSphereError):
        return exc
    if isinstance(exc, vmodl.MethodFault):
        return translate_fault(exc, method=method, obj=obj,
                               source_chain_depth=source_chain_depth)
    where = where_prefix(method, obj)
    if isinstance(exc, ExpatError):
        return ConnectionFailed(f"{where}unreadable reply ({exc})", method=method, obj=obj)
    return VSphereFault(f"{where}{type(exc).__name__}: {exc}", method=method, obj=obj)


@contextmanager
def map_vsphere_faults(*, method: str | None = None, obj: str | None = None,
                       source_chain_depth: int | None = None) -> Iterator[None]:
    """Re-raise whatever a vSphere call raises as its fleet error (``from`` the original)."""
    try:
        yield
    except VSphereError:
        raise
    except (vmodl.MethodFault, ExpatError) as exc:
        raise translate(exc, method=method, obj=obj,
                        source_chain_depth=source_chain_depth) from exc
