"""Talking to vCenter. ``model`` is pyVmomi-free and safe for the engine to import;
the client modules are the only place (besides ``fleet.sim``) that use pyVmomi."""
