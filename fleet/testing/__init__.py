"""fleet against its simulator in one process: for tests, fleet's and its users'.

- :mod:`fleet.testing.loopback`: a transport that hands the client's SOAP
  bytes to the simulator's endpoint and its reply bytes back, without sockets
  (the way httpx's ASGI transport serves an app in process);
- :mod:`fleet.testing.harness`: :func:`~fleet.testing.harness.sim_vsphere`, the
  real client (``fleet.vsphere.client``) on a simulator built in process, and
  what a test reads and changes of the simulated vCenter.

This package is the one place that imports both the client (``fleet.vsphere``)
and the simulator (``fleet.sim``): the simulator never imports the client, and
the engine imports neither pyVmomi nor this package.
"""
