"""fleet: provision fleets of vSphere Instant Clones fast, within vCenter's limits.

The layers (``engine`` decides, ``vsphere`` talks, ``sim`` is vCenter) and how a clone
flows through them: docs/architecture.md.
"""

__version__ = "0.1.0"
