"""``fleet serve``: load the service config, connect to vCenter, serve the REST API.

Prints ``listening on http://HOST:PORT`` on stdout once the API answers (the
tests and scripts wait for that line). SIGINT or SIGTERM stops it: the HTTP
side closes, runs in progress get their grace period and are cleaned up, and
their requests stay on record so the next start resumes them.

Exit status: 0 after a clean stop, 1 when vCenter cannot be reached at start,
2 for a bad config or option (the message names the key).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from fleet.errors import ConfigError, FleetError
from fleet.urls import redact_url

if TYPE_CHECKING:
    from fleet.api.config import ServiceConfig
    from fleet.metrics import FleetMetrics
    from fleet.vsphere.model import VSphere

# The service's own modules (config, metrics, API) are imported when it runs: every
# ``fleet`` command builds the parser, which only needs ``add_arguments``.

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PAGE_SIZE = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="service config (TOML); see config/serve.example.toml")
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="address to serve on (overrides the config's listen; port 0 "
                             "picks a free one)")


def _eprint(message: str) -> None:
    print(f"fleet serve: {message}", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def connect(config: ServiceConfig, metrics: FleetMetrics,
                  announce: Callable[[str], Any] = _eprint, *,
                  max_connections: int | None = None) -> AsyncIterator[VSphere]:
    """The service's one vCenter client (or a built-in simulator's)."""
    from fleet.target import open_vcenter

    # Small pages: the API shares the event loop with inventory reads, and decoding a
    # 1,000-VM page blocks it for ~0.8 s; 100 VMs a page keeps each pause near 0.15 s.
    options: dict[str, Any] = {"observer": metrics, "page_size": PAGE_SIZE}
    if max_connections is not None:
        options["max_connections"] = max_connections
    sim = config.simulator
    async with open_vcenter(config.vcenter, announce=announce, sim_time_scale=sim.time_scale,
                            sim_topology=sim.topology, **options) as target:
        if not target.simulated:
            announce(f"connected to {target.url} (from {config.vcenter_origin})")
        yield target.client


async def serve(config: ServiceConfig, host: str, port: int, *,
                on_listening: Callable[[str], Any] | None = None,
                stop: anyio.Event | None = None) -> None:
    """Run the service until SIGINT/SIGTERM (or ``stop`` is set)."""
    from fleet.api.app import make_app
    from fleet.api.edge import fd_budget, serve_http
    from fleet.api.service import FleetService
    from fleet.metrics import FleetMetrics

    # Before connecting: the fd limit sizes the vCenter client's pool too.
    budget = fd_budget(config.api.max_connections)
    metrics = FleetMetrics()
    with contextlib.ExitStack() as stack:
        state_path = None
        if config.vcenter is None and config.state_dir is None:
            # A built-in simulator starts empty: requests from an earlier one mean nothing.
            state_path = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="fleet-serve-")))
        async with connect(config, metrics, max_connections=budget.vcenter_connections) as vs, \
                FleetService(config, vs, metrics, state_path=state_path) as service:
            app = make_app(service, config, metrics)
            async with serve_http(app, config.api, budget, host, port) as url:
                if on_listening is not None:
                    on_listening(url)
                async with anyio.create_task_group() as tg:
                    async def signals() -> None:
                        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                            async for signum in sigs:
                                _eprint(f"{signal.Signals(signum).name}: stopping")
                                break
                        tg.cancel_scope.cancel()

                    async def stopped() -> None:
                        if stop is not None:
                            await stop.wait()
                            tg.cancel_scope.cancel()

                    tg.start_soon(signals)
                    tg.start_soon(stopped)


def main(args: argparse.Namespace) -> int:
    from fleet.api.config import config_from_dict, parse_listen
    from fleet.engine.spec import read_toml
    from fleet.target import SIM_GUEST_ENV, SIM_GUEST_PASSWORD

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A service logs its state changes (accepted, run ended, expired) by default.
    api_log = logging.getLogger("fleet.api")
    if api_log.getEffectiveLevel() > logging.INFO:
        api_log.setLevel(logging.INFO)
    env = dict(os.environ)
    try:
        # Read once (fleet.files: a regular file, capped), then judged.
        path = Path(args.config)
        data = read_toml(path, "config")
        if "vcenter" not in data:
            # The built-in simulator's guest password is no secret; defaults may name it.
            env.setdefault(SIM_GUEST_ENV, SIM_GUEST_PASSWORD)
        config = config_from_dict(data, source=path.name, env=env,
                                  base_dir=path.resolve().parent)
        host, port = parse_listen(args.listen, "--listen") if args.listen \
            else config.listen_address
    except ConfigError as exc:
        _eprint(f"error: {exc}")
        return EXIT_USAGE

    def listening(url: str) -> None:
        print(f"listening on {redact_url(url)}", flush=True)

    try:
        anyio.run(lambda: serve(config, host, port, on_listening=listening))
    except ConfigError as exc:
        _eprint(f"error: {exc}")
        return EXIT_USAGE
    except FleetError as exc:
        _eprint(f"error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK
