"""fleet: provision fleets of vSphere Instant Clones fast, within vCenter's limits."""

__version__ = "0.1.0"
