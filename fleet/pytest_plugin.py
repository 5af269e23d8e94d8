"""fleet's pytest plugin: a fleet provisioned for a test session (docs/python-api.md).

Registered as the ``pytest11`` entry point ``fleet``, so pytest loads it in every run
where fleet is installed, this project's own suite included. It is inert unless a test
asks for its fixtures: importing it loads nothing of fleet, and no option or marker
changes anything by itself.

- ``fleet_members``: the member records (``fleet.MemberRecord``) of the fleet of the
  spec named by the test's closest ``@pytest.mark.fleet_spec("FILE")`` (on the test,
  its class or its module's ``pytestmark``; a relative path is taken from the test
  file's directory) or else by ``--fleet-spec FILE`` (from the directory pytest was
  started in). Each spec's fleet is provisioned once per session, when a test first
  asks for it, and destroyed when the session ends, whatever the tests did
  (``--fleet-keep`` keeps them). A run that leaves members not ready is an error of
  every test that asks for that fleet, provisioned (and destroyed) once.
- ``fleet_session``: the session-scoped object behind it, for session-scoped
  fixtures of one's own: ``fleet_session.members(path)``.

The async API runs on an event loop of its own, in a thread (anyio's blocking portal),
so the fixtures work in plain tests, under the anyio plugin or any other.

pytest-xdist: every worker is a session of its own, so each would provision the
spec's fleet. Two runs on one fleet exclude each other (the fleet's lock) and one
worker's teardown would destroy what another uses: under xdist each worker's fleet is
named ``<name>-<worker id>`` (``loadtest-gw0``), one fleet of the spec's count per
worker.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from anyio.from_thread import BlockingPortal

    from fleet.engine.members import MemberRecord

MARKER = "fleet_spec"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fleet", "fleet: a fleet of instant clones for the session")
    group.addoption("--fleet-spec", metavar="FILE", default=None,
                    help="the fleet spec (TOML) whose fleet the fleet_members fixture "
                         "provisions, for tests without a fleet_spec marker")
    group.addoption("--fleet-keep", action="store_true", default=False,
                    help="keep the fleets provisioned for the session instead of "
                         "destroying them when it ends")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(path): the fleet spec whose fleet the fleet_members fixture "
                   "provisions for this test (once per session; fleet's plugin)")


class FleetSession:
    """The fleets of one test session, one per spec file, provisioned on first use and
    destroyed by :meth:`close`."""

    def __init__(self, config: pytest.Config) -> None:
        self._keep = bool(config.getoption("fleet_keep"))
        workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
        self._worker = None if workerinput is None else str(workerinput["workerid"])
        self._stack = contextlib.ExitStack()
        self._portal: BlockingPortal | None = None
        self._fleets: dict[Path, list[MemberRecord] | BaseException] = {}

    def members(self, path: str | Path) -> list[MemberRecord]:
        """The member records of ``path``'s fleet, provisioning it first if this session
        has not. Fails the calling test (clearly, at once) if it could not be."""
        key = Path(path).resolve()
        if key not in self._fleets:
            self._fleets[key] = self._provision(key)
        found = self._fleets[key]
        if isinstance(found, BaseException):
            pytest.fail(f"fleet: the fleet of {key} was not provisioned: {found}",
                        pytrace=False)
        return list(found)

    def _provision(self, path: Path) -> list[MemberRecord] | BaseException:
        import fleet

        try:
            spec = fleet.load_spec(path)
            if self._worker is not None:
                spec = fleet.load_spec(path, name=f"{spec.name}-{self._worker}")
            if self._portal is None:
                from anyio.from_thread import start_blocking_portal

                self._portal = self._stack.enter_context(start_blocking_portal())
            return self._stack.enter_context(self._portal.wrap_async_context_manager(
                fleet.provisioned(spec, keep=self._keep)))
        except Exception as exc:  # every test asking for it says why
            return exc

    def close(self) -> None:
        """Destroy every fleet provisioned (unless kept), then stop the event loop."""
        self._stack.close()


@pytest.fixture(scope="session")
def fleet_session(request: pytest.FixtureRequest) -> Iterator[FleetSession]:
    """The session's fleets (see the module's docstring); destroyed at its end."""
    session = FleetSession(request.config)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def fleet_members(request: pytest.FixtureRequest,
                  fleet_session: FleetSession) -> list[MemberRecord]:
    """The member records of the fleet of the test's ``fleet_spec`` marker, or of
    ``--fleet-spec``: provisioned once per session, destroyed when it ends."""
    marker = request.node.get_closest_marker(MARKER)
    if marker is not None:
        if len(marker.args) != 1 or not isinstance(marker.args[0], str | Path):
            pytest.fail(f"fleet: @pytest.mark.{MARKER} takes one path, not "
                        f"{marker.args!r}", pytrace=False)
        path = Path(request.node.path).parent / marker.args[0]
    else:
        option = request.config.getoption("fleet_spec")
        if not option:
            pytest.fail(f"fleet: fleet_members needs a spec: @pytest.mark.{MARKER}(FILE) "
                        "on the test, its class or module, or --fleet-spec FILE",
                        pytrace=False)
        path = Path(request.config.invocation_params.dir) / option
    return fleet_session.members(path)
