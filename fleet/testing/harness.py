"""The real client on a simulated vCenter in the same process: one model of vCenter for tests.

::

    async with sim_vsphere(small_topology(hosts=2)) as (vs, vc):
        summary = await provision(spec, vs)          # vs: fleet.vsphere.client.VSphereClient
        assert vc.vm("lt-0001").extra_config[...]    # vc: the simulator's own objects

``vs`` is :class:`fleet.vsphere.client.VSphereClient`, exactly as production
builds it, on a :class:`~fleet.testing.loopback.LoopbackTransport`: every call is
serialized by pyVmomi, served by the simulator's SOAP endpoint (``fleet.sim``,
which plays vCenter's rules: host slots, the vCenter-wide cap, chain growth and
its limit, NIC conflicts, guest operations, faults) and read back by pyVmomi.
``vc`` (:class:`SimVCenter`) is what a test reads and changes of that vCenter: the
simulator's objects, statistics and fault rules, and the changes another tool or
an operator would make (a host lost, a source powered off, a deeper chain).

:func:`small_topology` builds the inventories engine tests use: hosts ``esx-NN``,
datastores ``ds-NN``, frozen sources ``frozen-NN`` (one per host) and running
sources ``running-NN`` in folder ``sources``. :data:`FAST` is vCenter's timing
made 500 times faster (an instant clone in 2 ms).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio

from fleet.sim.core import SimObject
from fleet.sim.dispatch import SoapEndpoint
from fleet.sim.injection import ActiveRule
from fleet.sim.simulator import Simulator
from fleet.sim.topology import (
    DatastoreConfig,
    FaultRule,
    GuestConfig,
    HostConfig,
    LatencyConfig,
    Topology,
    VCenterConfig,
    VmConfig,
)
from fleet.sim.vm import VirtualMachine
from fleet.sim.watermarks import CloneWatermarks
from fleet.testing.loopback import LoopbackServer
from fleet.vcenter import HOST_PROVISIONING_SLOTS
from fleet.vsphere.client import VSphereClient
from fleet.vsphere.session import RetryPolicy

#: vCenter's durations (``LatencyConfig``'s defaults) 500 times faster.
FAST = LatencyConfig(**{name: value / 500 for name, value in LatencyConfig().model_dump().items()
                        if name != "jitter"})

USER = VCenterConfig().user
PASSWORD = VCenterConfig().password
#: Client settings for a vCenter in the same process: guest programs polled every few
#: milliseconds instead of 0.1-2 s, retries after a millisecond instead of 50 ms.
CLIENT_OPTIONS: dict[str, Any] = {
    "guest_poll_s": (0.002, 0.02),
    "retry": RetryPolicy(backoff_s=0.001, max_backoff_s=0.01),
}


def small_topology(*, hosts: int = 4, slots: int | Sequence[int] = HOST_PROVISIONING_SLOTS,
                   frozen_per_host: int = 1, running: int = 0, running_depth: int = 1,
                   frozen_depth: int = 2, datastores: int = 2, guest_user: str = "root",
                   guest_password: str = "fleet-guest", host_memory_gb: float = 512.0,
                   latency: Mapping[str, float] | None = None, seed: int = 0,
                   kind: Literal["vcenter", "esxi"] = "vcenter",
                   ready_key: str | None = None, sources: Sequence[VmConfig] = (),
                   **extra: Any) -> Topology:
    """``hosts`` hosts ``esx-NN`` with ``slots`` each, ``datastores`` datastores ``ds-NN``,
    ``frozen_per_host`` frozen sources ``frozen-NN[-k]`` on each host (datastore by host)
    and ``running`` running sources ``running-NN`` spread over the hosts, all in folder
    ``sources`` with guest login ``guest_user``/``guest_password``. ``latency`` overrides
    fields of :data:`FAST` (seconds); ``sources`` are more sources; ``extra`` goes to
    :class:`Topology` as is. ``slots`` may give each host its own."""
    guest = GuestConfig(user=guest_user, password=guest_password, ready_key=ready_key,
                        ready_after_s=FAST.guest_boot_s)
    ds_names = [f"ds-{d + 1:02d}" for d in range(datastores)]
    host_names = [f"esx-{h + 1:02d}" for h in range(hosts)]
    made = []
    for h, host in enumerate(host_names):
        for k in range(frozen_per_host):
            name = f"frozen-{h + 1:02d}" + (f"-{k + 1}" if frozen_per_host > 1 else "")
            made.append(VmConfig(name=name, host=host, datastore=ds_names[h % datastores],
                                    folder="sources", state="frozen", chain_depth=frozen_depth,
                                    guest=guest))
    for r in range(running):
        made.append(VmConfig(name=f"running-{r + 1:02d}", host=host_names[r % hosts],
                                datastore=ds_names[r % datastores], folder="sources",
                                state="running", chain_depth=running_depth, guest=guest))
    return Topology(
        vcenter=VCenterConfig(kind=kind),
        latency=FAST.model_copy(update=dict(latency or {})),
        hosts=[HostConfig(name=n, slots=slots if isinstance(slots, int) else slots[h],
                          memory_gb=host_memory_gb) for h, n in enumerate(host_names)],
        datastores=[DatastoreConfig(name=n) for n in ds_names],
        sources=[*made, *sources], seed=seed, **extra)


class SimVCenter:
    """A :class:`Simulator` in this process and what tests read and change of it."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.endpoint = SoapEndpoint(sim)
        self.server = LoopbackServer(self.endpoint)
        self._hooks: dict[str, list[Callable[[SimObject], None]]] = {}

    def client(self, **options: Any) -> VSphereClient:
        """A client (not yet open) on this vCenter, with :data:`CLIENT_OPTIONS` unless
        ``options`` say otherwise."""
        kw = {**CLIENT_OPTIONS, **options}
        transport = self.server.transport()
        return VSphereClient(transport.url, USER, PASSWORD, transport=transport, **kw)

    async def aclose(self) -> None:
        await self.server.aclose()
        await self.sim.close()

    # -- reading ------------------------------------------------------------------------
    def vms(self) -> list[VirtualMachine]:
        return list(self.sim.inventory.of_type(VirtualMachine))

    def vm(self, name: str) -> VirtualMachine:
        """The (first) VM called ``name``; KeyError if there is none."""
        for vm in self.sim.inventory.of_type(VirtualMachine):
            if vm.name == name:
                return vm
        raise KeyError(name)

    def folder_vms(self, path: str) -> list[VirtualMachine]:
        """The VMs directly in the VM folder at ``path`` (under the datacenter's VM
        folder); none if there is no such folder."""
        folder: Any = self.sim.datacenter.vm_folder
        for part in [p for p in path.strip("/").split("/") if p]:
            folder = folder.child_named(part)
            if folder is None:
                return []
        return [vm for vm in self.sim.inventory.of_type(VirtualMachine) if vm.parent is folder]

    @property
    def clones(self) -> CloneWatermarks:
        """Instant clones in flight at most, per host, datastore and source; queued ones;
        failed ones by fault; deepest clone per source (``fleet.sim.watermarks``)."""
        return self.sim.runtime.stats.clones

    def max_running(self, host: str | None = None) -> int:
        """The most tasks that ever held a slot of ``host`` at once (None: vCenter-wide,
        every task)."""
        key = "vc" if host is None else f"host:{self.sim.hosts[host].moid}"
        return self.sim.scheduler.peak.get(key, 0)

    @property
    def calls(self) -> Mapping[str, int]:
        """SOAP calls served, by WSDL method name."""
        return self.sim.calls

    @property
    def network_conflicts(self) -> int:
        return self.sim.counters["network_conflicts"]

    @property
    def destroyed(self) -> int:
        return self.sim.counters["vms_destroyed"]

    # -- changing -----------------------------------------------------------------------
    def add_vm(self, name: str, *, host: str, folder: str = "", state: str = "running",
               source: bool = False, **fields: Any) -> VirtualMachine:
        """A VM made by someone else, now (``fields`` are :class:`VmConfig`'s)."""
        cfg = VmConfig(name=name, host=host, folder=folder or None, state=state,  # type: ignore[arg-type]
                       **fields)
        return self.sim.add_vm(cfg, source=source)

    def add_fault(self, **rule: Any) -> ActiveRule:
        """Inject faults (:class:`fleet.sim.topology.FaultRule`'s fields); the returned
        rule counts how often it ``fired``."""
        return self.sim.faults.add(FaultRule(**rule))

    def remove_fault(self, rule: ActiveRule) -> None:
        self.sim.faults.remove(rule.id)

    def before_call(self, method: str, hook: Callable[[SimObject], None]) -> None:
        """Call ``hook(obj)`` as each ``method`` call reaches vCenter, before vCenter acts
        on it; ``obj`` is the object the call is made on (an ``InstantClone_Task``'s
        source VM). A test changes vCenter at a point in what the engine handed over,
        not at a point in what the engine has heard back, which lags on a loaded
        machine: a host lost as a clone is handed to it is sure to meet that clone."""
        if not self._hooks:
            invoke = self.sim.invoke

            async def hooked(call: Any, *args: Any, **kw: Any) -> tuple[Any, Any, int]:
                obj = self.sim.inventory.get(call.this._moId)
                if obj is not None:
                    for each in self._hooks.get(call.method, ()):
                        each(obj)
                return await invoke(call, *args, **kw)

            self.sim.invoke = hooked  # type: ignore[method-assign]
        self._hooks.setdefault(method, []).append(hook)

    def set_host_state(self, name: str, state: str) -> None:
        """``connected``, ``disconnected`` or ``notResponding``: a host lost, or back."""
        self.sim.hosts[name].set_connection_state(state)

    def power_off_now(self, name: str) -> None:
        """The VM is powered off at once (someone pulled a source from under fleet)."""
        self.vm(name)._power_off_now()

    @property
    def clock_offset_s(self) -> float:
        """vCenter's clock minus this machine's (``ServiceInstance.CurrentTime``)."""
        return self.sim.clock.offset_s

    @clock_offset_s.setter
    def clock_offset_s(self, value: float) -> None:
        self.sim.clock.offset_s = value

    async def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Wait until no task is queued or running (TimeoutError after ``timeout_s``)."""
        with anyio.fail_after(timeout_s):
            while self.sim.task_manager.active:
                await next(iter(self.sim.task_manager.active.values())).done.wait()


@asynccontextmanager
async def sim_vsphere(topology: Topology | None = None, *, time_scale: float = 1.0,
                      **client_options: Any) -> AsyncIterator[tuple[VSphereClient, SimVCenter]]:
    """An open client on a simulator of ``topology`` (:func:`small_topology` by default)
    in this process; the simulator stops when the block ends."""
    vc = SimVCenter(Simulator(topology or small_topology(), time_scale=time_scale))
    try:
        async with vc.client(**client_options) as vs:
            yield vs, vc
    finally:
        await vc.aclose()
