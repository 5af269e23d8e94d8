"""``fleet sim``: serve a simulated vCenter until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from fleet.cli.options import parse_listen
from fleet.errors import ConfigError
from fleet.files import FileProblem
from fleet.urls import redact_url

#: the slowest time scale: 100 makes a 1 s clone take 100 s
MAX_TIME_SCALE = 100.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:8989", metavar="HOST:PORT",
                        help="address to serve on (port 0 picks a free one; default %(default)s)")
    parser.add_argument("--topology", metavar="FILE",
                        help="topology TOML (default: the built-in config/sim.toml)")
    parser.add_argument("--http", action="store_true", help="serve plain http instead of https")
    parser.add_argument("--time-scale", type=float, default=1.0, metavar="X",
                        help="multiply every simulated duration by X (default 1)")
    parser.add_argument("--user", help="vCenter user (default: the topology's)")
    parser.add_argument("--password", help="vCenter password (default: the topology's, or "
                                           "$FLEET_SIM_PASSWORD)")
    parser.add_argument("--cert-file", metavar="PEM", help="serve this certificate ...")
    parser.add_argument("--key-file", metavar="PEM", help="... with this key")
    parser.add_argument("--write-cert", metavar="PATH",
                        help="write the certificate served (PEM) here, for clients to trust")


async def _run(args: argparse.Namespace) -> int:
    from fleet.sim import certs
    from fleet.sim.server import serve
    from fleet.sim.simulator import Simulator
    from fleet.sim.topology import load_topology

    host, port = parse_listen(args.listen)
    if not 0 < args.time_scale <= MAX_TIME_SCALE:  # NaN fails both
        raise ConfigError(f"{args.time_scale} must be above 0 and at most {MAX_TIME_SCALE:g}",
                          key="--time-scale")
    if bool(args.cert_file) != bool(args.key_file):
        raise ConfigError("give both --cert-file and --key-file, or neither", key="--cert-file")
    topology = load_topology(args.topology)
    password = args.password if args.password is not None else os.environ.get(
        "FLEET_SIM_PASSWORD")
    sim = Simulator(topology, time_scale=args.time_scale, user=args.user, password=password)
    context = None
    if not args.http:
        try:
            cert = (certs.load(args.cert_file, args.key_file) if args.cert_file
                    else certs.generate())
            context = cert.server_context()
        except (OSError, ValueError, FileProblem) as exc:
            raise ConfigError(f"cannot use the certificate: {exc}", key="--cert-file") from None
        if args.write_cert:
            try:
                await asyncio.to_thread(Path(args.write_cert).write_bytes, cert.cert_pem)
            except OSError as exc:
                raise ConfigError(f"cannot write {args.write_cert}: {exc.strerror}",
                                  key="--write-cert") from None
        print(f"certificate SHA-256 thumbprint {cert.sha256_thumbprint}", file=sys.stderr)
    try:
        running = await serve(sim, host, port, context)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}",
                          key="--listen") from None
    print(f"listening on {redact_url(running.url)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await running.close()
    return 0


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A simulator holds a large, long-lived heap (VMs, up to 10,000 finished tasks kept
    # for 600 s) and makes much short-lived garbage per call. With the default first
    # threshold (700) that garbage reaches the old generation, and full collections
    # (~1 s at 10k clones) came ever more often as a scale run went on. Collect the
    # young generation less often so call garbage dies there.
    gc.set_threshold(10_000, 10, 10)
    return asyncio.run(_run(args))
