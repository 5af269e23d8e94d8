"""vSphere's numbers: what a vCenter allows, defined once for fleet, its client and its
simulator.

The simulator plays these limits (``fleet.sim``), the client reads faults by them
(``fleet.vsphere.faults``) and the engine keeps inside them (``fleet.engine``);
this module imports nothing, so all three can share it. Where each comes from:
docs/vsphere.md.
"""

from __future__ import annotations

#: Delta-disk levels a VM's disk chain may have: a clone that would pass it fails
#: (``GenericVmConfigFault``). A clone's chain is its source's + 1.
MAX_CHAIN_DEPTH = 255
#: Provisioning operations (clones, relocations) one host runs at once; more queue.
HOST_PROVISIONING_SLOTS = 8
#: Cost units of concurrent provisioning one datastore allows.
DATASTORE_COST_UNITS = 128
#: Operations vCenter runs at once before it queues the rest (``info.state = queued``).
MAX_CONCURRENT_OPERATIONS = 640
