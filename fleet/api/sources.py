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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio

from fleet.engine.spec import FleetSpec
from fleet.engine.spec_model import show
from fleet.errors import ConfigError, FleetError, NotFound
from fleet.vsphere.model import VSphere

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
        self._found: dict[str, float] = {}  # name or path -> when vCenter last had it

    async def problems(self, spec: FleetSpec) -> list[tuple[str, str]]:
        """(``sources[i]``, message) for each source vCenter does not have (or has more
        than one VM by that name); none when it has them all, or did not answer."""
        now = anyio.current_time()
        names = [s.name for s in spec.sources]
        unknown = list(dict.fromkeys(n for n in names
                                     if now - self._found.get(n, -self.fresh_s) >= self.fresh_s))
        if not unknown:
            return []
        try:
            with anyio.fail_after(self.timeout_s):
                wrong = await self._wrong(unknown)
        except (FleetError, TimeoutError) as exc:
            log.warning("fleet %s: could not check its sources in vCenter (%s); its run "
                        "will check them", spec.name, exc or "no answer in time")
            return []
        now = anyio.current_time()
        for name in unknown:
            if name not in wrong:
                self._remember(name, now)
        return [(f"sources[{i}]", wrong[name]) for i, name in enumerate(names)
                if name in wrong]

    async def _wrong(self, names: Sequence[str]) -> dict[str, str]:
        """What is wrong with each of ``names`` that vCenter does not resolve to one VM.
        One call when all are there; else the list is halved until each culprit is
        alone (a few calls for a few culprits, whatever the length of the list)."""
        try:
            await self.vs.find_vms(names)
            return {}
        except NotFound:
            if len(names) == 1:
                return {names[0]: f"vCenter has no VM {show(names[0])} (by name or "
                                  "inventory path)"}
        except ConfigError as exc:  # several VMs answer to one name
            if len(names) == 1:
                return {names[0]: exc.message}
        half = len(names) // 2
        return {**await self._wrong(names[:half]), **await self._wrong(names[half:])}

    def _remember(self, name: str, at: float) -> None:
        self._found.pop(name, None)
        self._found[name] = at
        while len(self._found) > MAX_REMEMBERED:
            del self._found[next(iter(self._found))]
