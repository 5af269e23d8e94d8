"""The real vCenter client: :class:`VSphereClient` implements ``fleet.vsphere.model.VSphere``.

Layers below it, bottom up (each its own module in ``fleet.vsphere``):

- ``transport``: SOAP over aiohttp with pyVmomi's serializer/deserializer, TLS,
  proxy, pool, deadlines, reply caps, version negotiation, and the translation of
  transport failures (docs/transport.md);
- ``session``: login, keep-alive, single-flight re-login, the retry rule;
- ``watch``: one property collector and one ``WaitForUpdatesEx`` loop for all
  tasks in flight and all VM waits;
- ``inventory`` / ``vim_specs``: property paths, conversions, spec builders;
- ``faults``: the one translation of vim faults into ``fleet.errors``.

The client itself is in rooms, one job each, and :class:`VSphereClient` is their sum:
``connection`` (lifecycle, calls, tasks, paged reads; the state they all share),
``reads`` (the inventory), ``folders`` (VM folders, the lock's records), ``clones``
(instant and full clones), ``changes`` (power, destroy, NIC and extraConfig edits),
``guest_ops`` (guest programs, waits for a VM's state), ``preflight`` (the
questions ``fleet plan`` asks: privileges, guest logins, where clones go) and
``addresses`` (members' addresses, for inventories). They are mixins rather
than parts the client delegates to, so each ``VSphere`` method is written once, in
its room, and not again as a forwarding stub; each room inherits from the rooms it
calls (every one from ``reads``), so mypy checks each call across rooms, and
``_implements`` below checks that the sum is the engine's interface.

Use it as an async context manager (entered and left in the same task)::

    async with VSphereClient(url, user, password, tls=TlsOptions(ca_file=...)) as vs:
        info = await vs.server_info()
        task = await vs.start_instant_clone(CloneRequest(...))
        vm = await task.wait(timeout_s=300)

Task-starting operations other than ``start_instant_clone`` wait for their
task (through the same loop) and raise its translated fault. Operations that
converge to an absolute end state (power on/off, destroy, NIC and extraConfig
edits) are idempotent by construction, so the session may repeat them after a
lost reply; their "already there" answers (``InvalidPowerState`` with the wanted
state, ``ManagedObjectNotFound`` on destroy) count as success.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleet.vsphere.client.addresses import Addresses
from fleet.vsphere.client.changes import VmChanges
from fleet.vsphere.client.clones import Clones
from fleet.vsphere.client.connection import endpoint_problem
from fleet.vsphere.client.folders import Folders
from fleet.vsphere.client.guest_ops import GuestOps
from fleet.vsphere.client.preflight import Preflight
from fleet.vsphere.session import RetryPolicy, Secret
from fleet.vsphere.tls import TlsOptions

if TYPE_CHECKING:
    from fleet.vsphere.model import TaskHandle, VSphere
    from fleet.vsphere.tasks import VCenterTask


class VSphereClient(Clones, VmChanges, GuestOps, Folders, Preflight, Addresses):
    """An asyncio vCenter client; see the module docstring."""


if TYPE_CHECKING:
    # mypy proves the client and its task handles implement the engine's interface.
    def _implements(client: VSphereClient, task: VCenterTask) -> tuple[VSphere, TaskHandle]:
        return client, task


__all__ = ["RetryPolicy", "Secret", "TlsOptions", "VSphereClient", "endpoint_problem"]
