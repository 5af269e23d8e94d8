"""fleet's error hierarchy: every failure fleet reports is one of these.

vSphere faults are translated into this tree in exactly one place
(``fleet.vsphere.faults.map_vsphere_faults``); everything above the client
decides what to do by type, never by message text::

    FleetError
    ├── ConfigError                  bad spec/topology/CLI input (names key and value)
    ├── PlacementError               no source can take a clone (lists each source's reason)
    └── VSphereError                 anything vCenter (or the way to it) said no to
        ├── TransientVSphereError    worth retrying as is, after a backoff
        │   ├── ConnectionFailed     TCP/TLS/HTTP-level failure, reset, 5xx
        │   │   └── NotDelivered     provably never reached vCenter (connect failed, 503)
        │   ├── RequestTimeout       a call or task wait passed its deadline
        │   ├── NotAuthenticated     session expired or logged out (re-login, then retry)
        │   ├── ResourceBusy         TaskInProgress, concurrent access
        │   └── TransientFault       any other fault vCenter marks as retryable
        └── PermanentVSphereError    retrying the same call will fail the same way
            ├── ChainTooDeep         source's delta-disk chain at the 255 limit  (scope: source)
            ├── SourceNotPoweredOn   InvalidState on a powered-off source        (scope: source)
            ├── HostUnavailable      host disconnected / not responding          (scope: host)
            ├── InsufficientResources host memory or slots exhausted             (scope: host)
            ├── DuplicateName        the name is taken in the folder
            ├── NotFound             the managed object no longer exists
            ├── NotEmpty             a folder to destroy holds more than folders
            ├── PermissionDenied     names the missing privilege and the object
            │   └── SourcePermissionDenied  the same, on an instant clone's source (scope: source)
            ├── InvalidLogin         wrong vCenter user or password
            ├── InvalidGuestLogin    wrong guest credentials
            ├── GuestOperationFailed guest program failed / tools unavailable
            ├── TaskCancelled        the task was cancelled
            ├── UnsupportedEndpoint  not vCenter 6.7+ (old API, bare ESXi, no InstantClone)
            ├── TlsVerificationFailed the server certificate is not trusted
            └── VSphereFault         any other fault vCenter reported

``scope`` tells the engine what a permanent fault rules out: ``"call"`` (only
this request), ``"source"`` (stop cloning from this source) or ``"host"`` (stop
placing on this host). Messages never contain credentials.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

Scope = Literal["call", "source", "host"]


def some_of(names: Sequence[str], shown: int = 10) -> str:
    """``a, b, c``: the first ``shown`` names, then how many more. A message listing
    what is missing stays short however long the list it came from."""
    text = ", ".join(names[:shown])
    return text if len(names) <= shown else f"{text} and {len(names) - shown} more"


class FleetError(Exception):
    """Base of every error fleet raises on purpose."""

    #: short, stable, label-safe name used in summaries and metrics
    reason: ClassVar[str] = "error"


class ConfigError(FleetError):
    """A spec, topology or option is wrong. ``key`` is the dotted path of the culprit."""

    reason = "config"

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        self.key = key
        self.source = source
        where = ""
        if source:
            where = f"{source}: "
        if key:
            where += f"{key}: "
        super().__init__(where + message)
        self.message = message


class PlacementError(FleetError):
    """No source can take a job. ``reasons`` maps each source name to why not."""

    reason = "unschedulable"

    def __init__(self, message: str, reasons: dict[str, Sequence[str]] | None = None):
        self.reasons = dict(reasons or {})
        detail = "; ".join(f"{name}: {', '.join(why)}" for name, why in self.reasons.items())
        super().__init__(f"{message} ({detail})" if detail else message)


class VSphereError(FleetError):
    """vCenter refused, failed or could not be reached."""

    reason = "vsphere"
    scope: ClassVar[Scope] = "call"
    transient: ClassVar[bool] = False

    def __init__(self, message: str, *, fault: str | None = None, method: str | None = None,
                 obj: str | None = None):
        self.fault = fault  # vim fault wsdl name, e.g. "InvalidState"
        self.method = method
        self.obj = obj
        super().__init__(message)


class TransientVSphereError(VSphereError):
    reason = "transient"
    transient = True


class ConnectionFailed(TransientVSphereError):
    reason = "connection"


class NotDelivered(ConnectionFailed):
    """The request never reached vCenter (connect failed, HTTP 503): any call may be
    repeated, and a clone submitted this way was certainly not made."""

    reason = "connection"


class RequestTimeout(TransientVSphereError):
    reason = "timeout"


class NotAuthenticated(TransientVSphereError):
    reason = "not_authenticated"


class ResourceBusy(TransientVSphereError):
    reason = "busy"


class TransientFault(TransientVSphereError):
    reason = "transient_fault"


class PermanentVSphereError(VSphereError):
    reason = "permanent"


class ChainTooDeep(PermanentVSphereError):
    reason = "chain_too_deep"
    scope = "source"


class SourceNotPoweredOn(PermanentVSphereError):
    reason = "source_not_powered_on"
    scope = "source"


class HostUnavailable(PermanentVSphereError):
    reason = "host_unavailable"
    scope = "host"


class InsufficientResources(PermanentVSphereError):
    reason = "insufficient_resources"
    scope = "host"


class DuplicateName(PermanentVSphereError):
    reason = "duplicate_name"

    def __init__(self, message: str, *, name: str | None = None, existing: str | None = None,
                 **kw: str | None):
        super().__init__(message, **kw)
        self.name = name
        self.existing = existing  # moref id of the VM holding the name, when vCenter says


class NotFound(PermanentVSphereError):
    reason = "not_found"


class NotEmpty(PermanentVSphereError):
    """A folder fleet was to destroy holds something other than folders (a VM):
    nothing was destroyed."""

    reason = "not_empty"


class PermissionDenied(PermanentVSphereError):
    reason = "permission_denied"

    def __init__(self, message: str, *, privilege: str | None = None, **kw: str | None):
        super().__init__(message, **kw)
        self.privilege = privilege


class SourcePermissionDenied(PermissionDenied):
    """An instant clone refused for a privilege the login lacks on the source itself:
    other sources may still give the clone."""

    scope = "source"


class InvalidLogin(PermanentVSphereError):
    reason = "invalid_login"


class InvalidGuestLogin(PermanentVSphereError):
    reason = "invalid_guest_login"


class GuestOperationFailed(PermanentVSphereError):
    reason = "guest_operation_failed"


class TaskCancelled(PermanentVSphereError):
    reason = "cancelled"


class UnsupportedEndpoint(PermanentVSphereError):
    reason = "unsupported_endpoint"


class TlsVerificationFailed(PermanentVSphereError):
    reason = "tls_verification_failed"


class VSphereFault(PermanentVSphereError):
    reason = "fault"
