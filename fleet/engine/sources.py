"""Instant-clone sources: list them, freeze them, and make one per host.

- :func:`list_sources`: power state, frozen, host, chain depth, and how many
  clones the chain budget still allows (unlimited for a frozen source).
- :func:`freeze_sources`: run the freeze command (``fleet.vsphere.recipes``) in
  each running source through guest operations and wait for
  ``runtime.instantCloneFrozen``.
- :func:`prepare_sources`: from one golden VM, full-clone, power on and freeze
  a source on every connected host that has no usable source yet.
- :func:`resolve_sources`: the spec's sources as vCenter has them, one per VM
  whatever the spelling (every path that builds a view of the sources uses it).
- :func:`clone_config`: what an instant clone of a source must be told to carry,
  so that it has exactly its own fleet's labels (a clone copies its source's
  extraConfig).

Guest operations log in with the spec's guest credentials (``network.guest_user``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from fleet.engine.events import Emitter, EventCallback, SourceFrozen, SourcePrepared
from fleet.engine.lifetime import FLEET_LABELS
from fleet.engine.placement import SourceState
from fleet.engine.reconcile import LABEL_READY_AT
from fleet.engine.spec import DEMO_ORIGIN, LABEL_PREFIX, FleetSpec, SpecError
from fleet.errors import ConfigError, DuplicateName, GuestOperationFailed, NotFound
from fleet.vsphere import recipes
from fleet.vsphere.model import GuestCredentials, Ref, VmInfo, VSphere


@dataclass(frozen=True)
class SourceStatus:
    name: str
    vm: str
    power_state: str
    frozen: bool
    host: str | None
    chain_depth: int
    budget: int
    clones_left: int | None  # None: unlimited (frozen)
    guest_family: str

    @classmethod
    def of(cls, name: str, info: VmInfo, budget: int) -> SourceStatus:
        return cls(name, info.ref.id, info.power_state, info.frozen, info.host_name,
                   info.chain_depth, budget, SourceState(name, info, budget).clones_left,
                   info.guest_family)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def clone_config(own: Mapping[str, str], source: VmInfo, *,
                 readiness_key: str | None = None) -> dict[str, str]:
    """The extraConfig an instant clone of ``source`` is given: ``own`` (its labels and
    guestinfo) plus an empty value, which vSphere takes as "remove the key", for every
    key the clone would otherwise inherit and must not carry.

    An instant clone is born with its source's extraConfig, so a clone of another
    fleet's member would carry that fleet's labels (its expiry among them, and a fleet
    made without a TTL would be destroyed with it). Cleared in the clone spec itself,
    so no moment exists at which the clone carries a foreign label:

    - every ``guestinfo.fleet.*`` key the source shows (labels of any fleet version);
    - every label fleet writes (:data:`FLEET_LABELS` and the ready time), whatever the
      view shows;
    - ``readiness_key``, the flag the guest sets when it is ready: a clone of a ready
      VM must not count as ready before its own guest says so.

    ``own`` wins over a clear; keys come in a stable order (own first, then the
    clears sorted), so the clone bodies of one source keep one shape."""
    clears = {k for k in source.extra_config
              if k.startswith(LABEL_PREFIX) or k == LABEL_PREFIX.rstrip(".")}
    clears.update(FLEET_LABELS)
    clears.add(LABEL_READY_AT)
    if readiness_key:
        clears.add(readiness_key)
    config = dict(own)
    for key in sorted(clears - config.keys()):
        config[key] = ""
    return config


async def _find(vs: VSphere, names: Sequence[str], timeout_s: float) -> dict[str, VmInfo]:
    """Resolve names one by one, skipping missing ones."""
    found: dict[str, VmInfo] = {}
    for name in names:
        try:
            with anyio.fail_after(timeout_s):
                found[name] = (await vs.find_vms([name]))[0]
        except NotFound:
            continue
    return found


async def resolve_sources(spec: FleetSpec, vsphere: VSphere) -> list[VmInfo]:
    """The spec's sources as vCenter has them, in the spec's order.

    A source is one VM (one managed object id), whatever the spelling: a name and an
    inventory path of one VM are one source named twice, and counting it twice would
    let its chain grow past its budget and clone it twice at once. That, and a source
    vCenter does not know, is a :class:`ConfigError` naming the entries."""
    with anyio.fail_after(spec.timeouts.call_s):
        try:
            infos = await vsphere.find_vms([s.name for s in spec.sources])
        except NotFound as exc:
            hint = ""
            if spec.origin == DEMO_ORIGIN and spec.vcenter is not None:
                # GOVC_URL set, no --spec: a vCenter that is no fleet simulator
                hint = ("; without --spec the demo fleet clones the built-in simulator's "
                        "sources: name yours in a spec and pass --spec FILE "
                        "(docs/connecting.md)")
            raise ConfigError(f"{exc}{hint}", key="sources", source=spec.origin) from None
    first: dict[Ref, int] = {}
    problems: list[tuple[str, str]] = []
    for i, info in enumerate(infos):
        j = first.setdefault(info.ref, i)
        if j != i:
            problems.append((f"sources[{i}]", f"{json.dumps(spec.sources[i].name)} is the same "
                             f"VM ({info.ref.id}) as sources[{j}] "
                             f"{json.dumps(spec.sources[j].name)}; name each source once"))
    if problems:
        raise SpecError(problems, source=spec.origin)
    return infos


async def list_sources(spec: FleetSpec, vsphere: VSphere) -> list[SourceStatus]:
    """Every source of the spec as vCenter has it. A missing or repeated one is a
    ConfigError."""
    infos = await resolve_sources(spec, vsphere)
    return [SourceStatus.of(s.name, info, spec.budget_for(s.name))
            for s, info in zip(spec.sources, infos, strict=True)]


def _credentials(spec: FleetSpec, what: str) -> GuestCredentials:
    creds = spec.network.credentials
    if creds is None:
        raise ConfigError(f"{what} needs guest credentials (network.guest_user and "
                          "network.guest_password_env or _file)", key="network.guest_user",
                          source=spec.origin)
    return creds


async def freeze(vs: VSphere, vm: VmInfo, credentials: GuestCredentials, *,
                 timeout_s: float) -> VmInfo:
    """Freeze one running VM and wait until vCenter reports it frozen.

    The freeze command does not return inside the source (the guest stops at
    that line), so the program and the wait race: the wait decides."""
    if vm.frozen:
        return vm
    program = recipes.freeze_program(vm.guest_family)

    async def run_program() -> None:
        code = await vs.run_in_guest(vm.ref, credentials, program, timeout_s=timeout_s)
        if code != 0:  # it failed before freezing: stop waiting for a freeze
            raise GuestOperationFailed(f"{program.path} exited with {code} in {vm.name}")

    try:
        with anyio.fail_after(timeout_s):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_program)
                frozen = await vs.wait_for_vm(vm.ref, timeout_s=timeout_s, frozen=True)
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _first(group) from None
    return frozen


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real error of a (nested) task-group failure: callers want a fleet error,
    not a group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _gather(jobs: list[tuple[Any, ...]], fn: Any) -> None:
    """Run ``fn(*args)`` for every job concurrently; raise the first error (after all
    have finished, so none is left half-done) rather than an exception group."""
    errors: list[BaseException] = []

    async def guarded(*args: Any) -> None:
        try:
            await fn(*args)
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for args in jobs:
            tg.start_soon(guarded, *args)
    if errors:
        raise errors[0]


async def freeze_sources(spec: FleetSpec, vsphere: VSphere, names: Sequence[str] | None = None,
                         *, on_event: EventCallback | None = None) -> list[SourceStatus]:
    """Freeze the spec's running sources (or just ``names``); frozen ones are left as is.
    Waits up to ``timeouts.network_s`` for each."""
    creds = _credentials(spec, "sources freeze")
    emit = Emitter(on_event, anyio.current_time)
    wanted = list(names) if names else [s.name for s in spec.sources]
    with anyio.fail_after(spec.timeouts.call_s):
        infos = await vsphere.find_vms(wanted)
    results: dict[str, VmInfo] = {}

    async def one(name: str, info: VmInfo) -> None:
        if not info.powered_on:
            raise GuestOperationFailed(f"{name} is {info.power_state}; power it on first")
        frozen = await freeze(vsphere, info, creds, timeout_s=spec.timeouts.network_s)
        results[name] = frozen
        if not info.frozen:
            emit(SourceFrozen, source=name, host=frozen.host_name or "")

    await _gather(list(zip(wanted, infos, strict=True)), one)
    return [SourceStatus.of(n, results[n], spec.budget_for(n)) for n in wanted]


async def prepare_sources(spec: FleetSpec, vsphere: VSphere, golden: str, *,
                          name_template: str = "{golden}-{host}", folder: str | None = None,
                          on_event: EventCallback | None = None,
                          concurrency: int = 4) -> list[SourceStatus]:
    """Make a frozen source on every connected host lacking a powered-on source of the spec.

    Each is a full clone of ``golden`` named by ``name_template`` (``{golden}``,
    ``{host}``), placed on the host, powered on, and frozen. A VM of that name
    that already exists (an earlier, interrupted prepare) is reused. Returns the
    sources made or reused; add their names to the spec's ``sources``."""
    creds = _credentials(spec, "sources prepare")
    emit = Emitter(on_event, anyio.current_time)
    t = spec.timeouts
    with anyio.fail_after(t.call_s):
        try:
            gold = (await vsphere.find_vms([golden]))[0]
        except NotFound as exc:
            raise ConfigError(str(exc), key="golden") from None
        hosts = await vsphere.list_hosts()
    existing = await _find(vsphere, [s.name for s in spec.sources], t.call_s)
    covered = {info.host for info in existing.values() if info.powered_on}
    target_folder = gold.folder
    if folder is not None:
        with anyio.fail_after(t.call_s):
            target_folder = await vsphere.ensure_folder(folder)
    assert target_folder is not None
    made: list[SourceStatus] = []
    limiter = anyio.CapacityLimiter(max(1, concurrency))

    async def one(host_ref: Ref, host_name: str) -> None:
        name = name_template.format(golden=gold.name, host=host_name)
        async with limiter:
            try:
                with anyio.fail_after(t.clone_s):
                    ref = await vsphere.full_clone(gold.ref, name, target_folder, host=host_ref,
                                                   power_on=True)
            except DuplicateName as exc:  # an earlier, interrupted prepare made it
                with anyio.fail_after(t.call_s):
                    ref = Ref("VirtualMachine", exc.existing) if exc.existing else \
                        (await vsphere.find_vms([name]))[0].ref
            with anyio.fail_after(t.call_s):
                info = await vsphere.get_vm(ref)
                if not info.powered_on:
                    await vsphere.power_on(ref)
            with anyio.fail_after(spec.readiness.timeout_s):
                info = await vsphere.wait_for_vm(ref, timeout_s=spec.readiness.timeout_s,
                                                 tools_running=True)
            info = await freeze(vsphere, info, creds, timeout_s=t.network_s)
        made.append(SourceStatus.of(name, info, spec.chain_budget))
        emit(SourcePrepared, source=name, host=host_name)

    await _gather([(h.ref, h.name) for h in hosts if h.connected and h.ref not in covered], one)
    return sorted(made, key=lambda s: s.name)


__all__ = ["FLEET_LABELS", "SourceStatus", "clone_config", "freeze", "freeze_sources",
           "list_sources", "prepare_sources", "resolve_sources"]
