"""What every part of the fleet service works with, handed to each part once.

The service (``fleet.api.service``) builds one :class:`ServiceContext` and gives
it to its scanner (``fleet.api.scanner``) and its workers (``fleet.api.worker``):
the table of fleets they all read and write, the vCenter they talk to, the
metrics they feed, the clock expiries are measured with, and the one set of
limits every run draws from. Anything else a part needs from another, it gets
through a callback named in its constructor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fleet.api.config import ServiceConfig
from fleet.api.records import FleetRecord
from fleet.engine.shared import SharedLimits
from fleet.metrics import FleetMetrics
from fleet.vsphere.model import VSphere


@dataclass(frozen=True)
class ServiceContext:
    config: ServiceConfig
    vs: VSphere
    metrics: FleetMetrics
    #: wall-clock epoch seconds (expiries, timestamps shown to callers)
    clock: Callable[[], float]
    #: the service's table of fleets (name -> record), shared by every part
    fleets: dict[str, FleetRecord]
    #: one set of limits for every run, fairest to the run with fewest clones at vCenter
    shared: SharedLimits
