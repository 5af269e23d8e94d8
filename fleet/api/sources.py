"""Does vCenter have the sources a request names? Asked when the request comes in.

A fleet whose sources vCenter does not have can never be built: the service refuses
the request at once (422, each missing source at its key, ``sources[i]``) rather
than accept it and fail it in the background. What it cannot know it does not
judge: if vCenter does not answer within :data:`CHECK_TIMEOUT_S`, or cannot be
reached, the request is accepted and its run checks the sources again (a fleet
then shows ``failed`` or ``retrying``, as before). See docs/api.md.

A source found is remembered for :data:`FOUND_FRESH_S`, so a caller sending the
same sources again (a scale by ``PUT``, a burst of fleets) costs no vCenter call.
A source that was missing is asked about again each time: it may have been made since.

An instant clone starts from its source's memory: whoever names a VM as a source gets
a copy of what runs in it. So a client (not an admin) may not name a member of a
fleet that is not its own (another client's, or one made outside the service), nor a
member of a warm pool (leased to someone, or about to be): 422 naming the source. Its
own fleets' members, and VMs that are no fleet's, are fine (docs/api.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio

from fleet.api.tokens import Client
from fleet.engine.lifetime import LABEL_OWNER, LABEL_POOL
from fleet.engine.reconcile import LABEL_NAME
from fleet.engine.spec import FleetSpec
from fleet.engine.spec_model import show
from fleet.errors import ConfigError, FleetError, NotFound
from fleet.vsphere.model import VmInfo, VSphere

#: what decides whether a client may clone a source: (fleet, owner, pool) labels
Marks = tuple[str | None, str | None, str | None]

log = logging.getLogger("fleet.api")

#: how long a request waits for vCenter to say whether its sources exist
CHECK_TIMEOUT_S = 10.0
#: how long a source vCenter had counts as there without asking again
FOUND_FRESH_S = 30.0
#: sources remembered at most (the oldest are forgotten first)
MAX_REMEMBERED = 10_000


class SourceCheck:
    """Looks the sources of a request up in vCenter (``find_vms``), with a deadline."""

    def __init__(self, vs: VSphere, *, timeout_s: float = CHECK_TIMEOUT_S,
                 fresh_s: float = FOUND_FRESH_S) -> None:
        self.vs = vs
        self.timeout_s = timeout_s
        self.fresh_s = fresh_s
        # name or path -> when vCenter last had it, and its marks
        self._found: dict[str, tuple[float, Marks]] = {}

    async def problems(self, spec: FleetSpec, client: Client | None = None
                       ) -> list[tuple[str, str]]:
        """(``sources[i]``, message) for each source vCenter does not have (or has more
        than one VM by that name), or that ``client`` may not clone (module docstring);
        none when all are fine, or vCenter did not answer."""
        now = anyio.current_time()
        names = [s.name for s in spec.sources]
        unknown = list(dict.fromkeys(
            n for n in names if now - self._found.get(n, (-self.fresh_s, _NONE))[0]
            >= self.fresh_s))
        wrong: dict[str, str] = {}
        if unknown:
            marks: dict[str, Marks] = {}
            try:
                with anyio.fail_after(self.timeout_s):
                    wrong = await self._wrong(unknown, marks)
            except (FleetError, TimeoutError) as exc:
                log.warning("fleet %s: could not check its sources in vCenter (%s); its run "
                            "will check them", spec.name, exc or "no answer in time")
                return []
            now = anyio.current_time()
            for name, found in marks.items():
                self._remember(name, now, found)
        for name in names:
            if name not in wrong and name in self._found:
                refusal = _forbidden(name, self._found[name][1], client)
                if refusal:
                    wrong[name] = refusal
        return [(f"sources[{i}]", wrong[name]) for i, name in enumerate(names)
                if name in wrong]

    async def _wrong(self, names: Sequence[str], marks: dict[str, Marks]) -> dict[str, str]:
        """What is wrong with each of ``names`` that vCenter does not resolve to one VM;
        the marks of those it does go into ``marks``. One call when all are there; else
        the list is halved until each culprit is alone (a few calls for a few culprits,
        whatever the length of the list)."""
        try:
            for name, info in zip(names, await self.vs.find_vms(names), strict=True):
                marks[name] = _marks(info)
            return {}
        except NotFound:
            if len(names) == 1:
                return {names[0]: f"vCenter has no VM {show(names[0])} (by name or "
                                  "inventory path)"}
        except ConfigError as exc:  # several VMs answer to one name
            if len(names) == 1:
                return {names[0]: exc.message}
        half = len(names) // 2
        return {**await self._wrong(names[:half], marks),
                **await self._wrong(names[half:], marks)}

    def _remember(self, name: str, at: float, marks: Marks) -> None:
        self._found.pop(name, None)
        self._found[name] = (at, marks)
        while len(self._found) > MAX_REMEMBERED:
            del self._found[next(iter(self._found))]


_NONE: Marks = (None, None, None)


def _marks(info: VmInfo) -> Marks:
    extra = info.extra_config
    return (extra.get(LABEL_NAME) or None, extra.get(LABEL_OWNER) or None,
            extra.get(LABEL_POOL) or None)


def _forbidden(name: str, marks: Marks, client: Client | None) -> str | None:
    """Why ``client`` may not clone the source ``name``, or None."""
    fleet, owner, pool = marks
    if client is None or client.admin:
        return None
    if pool is not None:
        return (f"{show(name)} is a member of warm pool {pool}: a pool's members are "
                "leased to their clients, never cloned")
    if fleet is not None and owner != client.name:
        return (f"{show(name)} is a member of fleet {fleet}, which is not this client's; "
                "clone a golden image, or a member of one of your own fleets")
    return None
