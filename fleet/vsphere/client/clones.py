"""The client's clones: instant clones (submit and preflight) and full clones.

``start_instant_clone`` is the hot path: the request's body is rendered from a
cached template when it can be (``vim_specs.CloneBodies``), and the NIC edits of a
clone are built once per source while its NIC list is cached. A fault vCenter gives
for a source chain at its limit (a generic one) makes the client re-read the
source's chain, so the translation can say ``ChainTooDeep`` (docs/vsphere.md).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from pyVmomi import vmodl

from fleet.errors import NotFound, UnsupportedEndpoint, VSphereError
from fleet.urls import redact_url
from fleet.vsphere import inventory as inv
from fleet.vsphere import vim_specs
from fleet.vsphere.client.reads import Reads
from fleet.vsphere.faults import translate
from fleet.vsphere.model import CloneRequest, NicConnect, Ref
from fleet.vsphere.session import method_info
from fleet.vsphere.tasks import VCenterTask

log = logging.getLogger("fleet.vsphere")

#: Faults after which an instant clone's source chain is re-read (docs/vsphere.md).
_CHAIN_SUSPECTS = ("GenericVmConfigFault", "SystemError")
_NIC_CACHE_S = 30.0


class Clones(Reads):
    """Instant clones and full clones; see the module docstring."""

    def _check_instant_clone_supported(self) -> None:
        if self._stack is None:
            raise RuntimeError("use VSphereClient as `async with VSphereClient(...) as vs`")
        if self._unsupported:
            raise UnsupportedEndpoint(f"{redact_url(self.url)}: {self._unsupported}")

    async def _source_nics(self, source: Any, fresh: bool = False) -> list[Any]:
        cached = self._nic_cache.get(source._moId)
        now = time.monotonic()
        if cached is not None and not fresh and now - cached[0] < _NIC_CACHE_S:
            return cached[1]
        contents = await self._retrieve_objects([source], ["config.hardware.device"])
        if not contents:
            raise NotFound(f"VirtualMachine {source._moId} does not exist", obj=source._moId)
        nics = inv.nic_devices(inv.props(contents[0]).get("config.hardware.device"))
        self._nic_cache[source._moId] = (now, nics)
        return nics

    async def _clone_where(self, request: CloneRequest, source: Any) -> dict[str, Any]:
        """Where the clone goes and its NIC edits: ``instant_clone_spec``'s keywords."""
        edits: list[Any] = []
        if request.nic_connect:
            nics = await self._source_nics(source)
            edits = self._migrate_edits(source._moId, nics, request.nic_connect)
        return {"folder": self.mo(request.folder),
                "pool": self.mo(request.pool) if request.pool else None,
                "datastore": self.mo(request.datastore) if request.datastore else None,
                "nic_edits": edits}

    async def _clone_spec(self, request: CloneRequest, source: Any) -> Any:
        return vim_specs.instant_clone_spec(request, **await self._clone_where(request, source))

    def _migrate_edits(self, source_id: str, nics: list[Any],
                       connect: Mapping[int, NicConnect] | NicConnect) -> list[Any]:
        """The NIC edits of a clone of the source: the same (read-only) objects for every
        clone while the source's NIC list is cached, as they cost more to build than
        to send."""
        cached = self._nic_edits.get(source_id)
        if cached is not None and cached[0] is nics and cached[1] == connect:
            edits: list[Any] = cached[2]
            return edits
        plan = vim_specs.migrate_plan([n.key for n in nics], connect)
        edits = vim_specs.migrate_connect_edits(nics, plan)
        self._nic_edits[source_id] = (nics, connect if isinstance(connect, str)
                                      else dict(connect), edits)
        return edits

    async def _clone_fault(self, fault: Any, source: Ref, method: str) -> VSphereError:
        """Translate an instant-clone fault, re-reading the source's chain when the fault
        is the generic one vCenter gives for a chain at its limit."""
        depth = None
        if type(fault).__name__.rsplit(".", 1)[-1] in _CHAIN_SUSPECTS:
            with contextlib.suppress(VSphereError):
                depth = await self.chain_depth(source)
        error = translate(fault, method=method, obj=source.id, source_chain_depth=depth)
        if error.reason == "unsupported_endpoint":
            self._unsupported = str(error)
        return error

    async def _clone_call(self, mo: Any, method: str, source: Ref, *args: Any,
                          body: bytes | None = None) -> Any:
        try:
            return await self.session.call(mo, method, *args, body=body)
        except VSphereError as exc:
            cause = exc.__cause__
            if isinstance(cause, vmodl.MethodFault):
                raise await self._clone_fault(cause, source, method) from cause
            raise

    async def start_instant_clone(self, request: CloneRequest) -> VCenterTask:
        """Submit ``InstantClone_Task``; the handle's result is the new VM's Ref."""
        self._check_instant_clone_supported()
        source = self.mo(request.source)
        where = await self._clone_where(request, source)
        method = "InstantClone_Task"
        body = self._clone_bodies.render(self.session.stub, source,
                                         method_info(source, method), request, **where)
        if body is not None:
            task_mo = await self._clone_call(source, method, request.source, body=body)
        else:
            spec = vim_specs.instant_clone_spec(request, **where)
            task_mo = await self._clone_call(source, method, request.source, spec)

        async def translate_error(fault: Any) -> VSphereError:
            return await self._clone_fault(fault, request.source, "InstantClone_Task")

        handle = self.task(task_mo, "InstantClone_Task", translate_error=translate_error)
        log.debug("instant clone %s from %s submitted as %s", request.name, request.source.id,
                  handle.ref.id)
        return handle

    async def check_instant_clone(self, request: CloneRequest) -> list[str]:
        """Preflight (``CheckInstantClone_Task``); returns problems, empty if fine."""
        self._check_instant_clone_supported()
        source = self.mo(request.source)
        spec = await self._clone_spec(request, source)
        checker = self.content.vmProvisioningChecker
        method = "CheckInstantClone_Task"
        task_mo = await self._clone_call(checker, method, request.source, source, spec, None)

        async def translate_error(fault: Any) -> VSphereError:
            return await self._clone_fault(fault, request.source, method)

        results = await self.task(task_mo, method, convert=lambda r: r,
                                  translate_error=translate_error).wait(self.task_timeout_s)
        problems = []
        for result in results or ():
            for fault in result.error or ():
                problems.append(str(await self._clone_fault(fault, request.source,
                                                            "InstantClone_Task")))
            for warning in result.warning or ():
                log.info("instant clone preflight warning for %s: %s", request.name,
                         getattr(warning, "msg", warning))
        return problems

    async def full_clone(self, source: Ref, name: str, folder: Ref, *, host: Ref | None = None,
                         datastore: Ref | None = None, power_on: bool = True) -> Ref:
        """A full clone (``CloneVM_Task``), waited for; the new VM's Ref."""
        spec = vim_specs.clone_spec(host=self.mo(host) if host else None,
                                datastore=self.mo(datastore) if datastore else None,
                                power_on=power_on)
        result: Ref = await self._run_task(self.mo(source), "CloneVM_Task", self.mo(folder),
                                           name, spec)
        return result
