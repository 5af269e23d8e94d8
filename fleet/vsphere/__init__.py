"""Talking to vCenter. ``model`` is pyVmomi-free and safe for the engine to import;
the client modules are the only place (besides ``fleet.sim``) that use pyVmomi.

- ``model``: domain objects and the ``VSphere`` / ``TaskHandle`` interfaces.
- ``client``: :class:`~fleet.vsphere.client.VSphereClient`, the real implementation
  (a package: one module per job, see its docstring).
- ``session``: login, keep-alive, re-login, the rule for repeating calls.
- ``watch``: one property collector and one ``WaitForUpdatesEx`` loop for all waits.
- ``transport``: SOAP over aiohttp, and the translation of transport failures.
- ``tls``: how the server certificate is trusted (CA file, pinned thumbprint).
- ``faults``: the one translation of vim faults into ``fleet.errors``.
- ``inventory`` / ``specs``: property paths, conversions and spec builders.

Tests run the client on a simulator in the same process (``fleet.testing``).
"""
