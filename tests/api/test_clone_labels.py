"""``fleet serve``: a fleet sourcing another fleet's member has no lifetime of its own
unless asked, and outlives the other fleet's expiry (against a real ``fleet sim``).

A service of its own, with a root folder of its own (not the package's): this test
expires a fleet, and the shared service's expiry counter is asserted on elsewhere.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest

from tests.api.serveproc import ServeProcess, service_config
from tests.simproc import SimProcess


@pytest.fixture
def own_service(sim: SimProcess) -> Iterator[ServeProcess]:
    with tempfile.TemporaryDirectory(prefix="fleet-serve-labels-") as state:
        proc = ServeProcess(service_config(sim, state, root_folder="labels",
                                                scan_interval_s=0.5))
        try:
            yield proc
        finally:
            proc.stop()


def test_a_fleet_without_ttl_sourcing_a_ttl_fleets_member_survives_its_expiry(
        own_service: ServeProcess) -> None:
    service = own_service
    status, body = service.call("POST", "/v1/fleets", {"name": "ttlsrc", "count": 1,
                                                       "ttl_s": 3600})
    assert status == 202, body
    assert service.wait_for("ttlsrc")["expires_at"] is not None
    status, body = service.call("POST", "/v1/fleets", {
        "name": "gamma", "count": 3, "sources": ["labels/ttlsrc/ttlsrc-0000"]})
    assert status == 202, body
    gamma = service.wait_for("gamma")
    # Asked for no lifetime, it has none: its members carry no expiry of ttlsrc's.
    assert gamma["members"] == 3 and gamma["expires_at"] is None, gamma

    # ttlsrc now expires (its TTL cut short): it goes, gamma stays, as it was.
    status, body = service.call("PATCH", "/v1/fleets/ttlsrc", {"ttl_s": 1})
    assert status == 202, body
    service.wait_for("ttlsrc", ("gone",), timeout_s=30)
    after = service.wait_for("gamma")
    assert after["members"] == 3 and after["ready"] == 3 and after["expires_at"] is None
    status, text = service.call("GET", "/metrics", token=None)
    assert "fleet_fleets_expired_total 1.0" in text  # ttlsrc, and only ttlsrc
    assert service.call("DELETE", "/v1/fleets/gamma")[0] == 202
    service.wait_for("gamma", ("gone",), timeout_s=30)
