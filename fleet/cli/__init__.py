"""The ``fleet`` command; its subcommands ``serve`` and ``sim``, and the warm-pool
clients ``lease``, ``release``, ``renew`` and ``pools``, are in this package
(``fleet.cli.serve``, ``fleet.cli.sim``, ``fleet.cli.lease``).

Exit status: 0 when the command did what was asked (``provision``: every member
ready), 1 when it did not (an incomplete fleet, failures, the run lost the fleet's
lock, or an ``--events`` log that could not be written: see
:class:`fleet.cli.eventlog.EventLog`), 2 for bad input (a wrong spec, option or
topology: the message names the culprit), 75 when another run holds the fleet's
lock and this one did not wait (or gave up waiting: ``--wait-lock``; 75 is sysexits'
EX_TEMPFAIL, "try again later"), 130 when interrupted. ``provision`` and ``destroy``
hold the fleet's lock in vCenter while they run (docs/locking.md). The pool commands
use the same statuses, 75 for a pool with no member to give now
(:mod:`fleet.cli.lease`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn

import anyio

from fleet.cli.common import (
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    eprint,
    print_json,
)
from fleet.cli.eventlog import EventLog
from fleet.errors import ConfigError, FleetError
from fleet.version import __version__

EXIT_LOCKED = EXIT_TEMPFAIL
LOG_LEVELS = ["debug", "info", "warning", "error"]
COMPLETION_SHELLS = ["bash", "zsh", "fish"]
#: the slowest time scale of the built-in simulator: 100 makes a 1 s clone take 100 s
MAX_SIM_TIME_SCALE = 100.0


# -- shared option groups --------------------------------------------------------

def _spec_options(parser: argparse.ArgumentParser, *, count: bool = True) -> None:
    parser.add_argument("--spec", metavar="FILE",
                        help="fleet spec (TOML); without it, a demo fleet on the built-in "
                             "simulator")
    if count:
        parser.add_argument("--count", type=int, metavar="N",
                            help="members wanted (overrides the spec's count)")
    parser.add_argument("--name", metavar="NAME",
                        help="fleet name (overrides the spec's; default 'demo' without a spec)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--sim-time-scale", type=float, default=1.0, metavar="X",
                        help="time scale of the built-in simulator (when the spec names no "
                             "vCenter); default 1")
    _vcenter_options(parser)


def _vcenter_options(parser: argparse.ArgumentParser) -> None:
    vc = parser.add_argument_group(
        "vCenter", "where vCenter is, above the spec's [vcenter] and the FLEET_VCENTER_* and "
                   "GOVC_* variables (docs/connecting.md); never a password on the command line")
    vc.add_argument("--vcenter-url", metavar="URL",
                    help="vCenter's SDK URL (https://host/sdk; a bare host means that)")
    vc.add_argument("--vcenter-user", metavar="USER", help="the login (with --vcenter-url)")
    vc.add_argument("--vcenter-password-file", metavar="FILE",
                    help="a file holding the password (with --vcenter-url)")
    vc.add_argument("--vcenter-thumbprint", metavar="SHA256",
                    help="trust the server certificate with this SHA-256 thumbprint")
    vc.add_argument("--vcenter-ca-file", metavar="FILE", help="trust the CAs in this PEM file")
    vc.add_argument("--vcenter-insecure", action="store_true",
                    help="do not verify the server certificate at all")


def _vcenter_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {"url": args.vcenter_url, "user": args.vcenter_user,
            "password_file": args.vcenter_password_file,
            "thumbprint": args.vcenter_thumbprint, "ca_file": args.vcenter_ca_file,
            "insecure": args.vcenter_insecure}


def _load_spec(args: argparse.Namespace) -> Any:
    """The spec the command runs (``--spec``, or the demo fleet), pointing at the vCenter
    the flags, the spec and the environment name (docs/connecting.md), if any."""
    from fleet.target import connect_spec

    return connect_spec(_read_spec(args), flags=_vcenter_flags(args), announce=eprint)


def _read_spec(args: argparse.Namespace) -> Any:
    from fleet.engine.spec import spec_from_dict
    from fleet.target import demo_spec

    count = getattr(args, "count", None)
    if count is not None and count < 0:
        raise ConfigError(f"{count} is negative; give 0 or more", key="--count")
    if not 0 < args.sim_time_scale <= MAX_SIM_TIME_SCALE:  # NaN fails both
        raise ConfigError(f"{args.sim_time_scale} must be above 0 and at most "
                          f"{MAX_SIM_TIME_SCALE:g}", key="--sim-time-scale")
    if args.spec is None:
        return demo_spec(count if count is not None else 10, args.name or "demo")
    from pathlib import Path

    from fleet.engine.spec import read_toml

    path = Path(args.spec)
    raw = read_toml(path)
    source = path.name
    # Overrides are validated with the rest, so templates and limits are checked with them.
    if count is not None:
        raw["count"] = count
    if args.name:
        raw["name"] = args.name
    if count is not None or args.name:
        source += " (with command-line overrides)"
    return spec_from_dict(raw, source=source, base_dir=path.resolve().parent)


def _metrics_listen(args: argparse.Namespace) -> tuple[str, int, str] | None:
    """(host, port, the flag that named them) of the run's /metrics, if asked for:
    ``--metrics-port N`` is ``--metrics-listen 127.0.0.1:N``."""
    if args.metrics_listen is not None:
        return (*args.metrics_listen, "--metrics-listen")
    if args.metrics_port is not None:
        return "127.0.0.1", args.metrics_port, "--metrics-port"
    return None


@contextlib.asynccontextmanager
async def _metrics_server(listen: tuple[str, int, str] | None,
                          metrics: Any) -> AsyncIterator[None]:
    if listen is None:
        yield
        return
    from aiohttp import web

    from fleet.metrics import CONTENT_TYPE
    from fleet.urls import host_port

    host, port, key = listen

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    shown = host_port(host, port)
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {shown}: {exc.strerror}", key=key) from None
        eprint(f"metrics at http://{shown}/metrics")
        yield
    finally:
        await runner.cleanup()


def _pusher(args: argparse.Namespace, fleet: str, metrics: Any) -> Any:
    """The run's Pushgateway pusher (``--pushgateway``), or None; docs/pushgateway.md."""
    if args.pushgateway is None:
        return None
    from fleet.pushgateway import Pusher

    pusher = Pusher(args.pushgateway, metrics.registry, {"fleet": fleet}, warn=eprint)
    eprint(f"pushing metrics to {pusher.describe()} every {pusher.interval_s:g} s and "
           "when the run ends")
    return pusher


# -- the fleet lock (docs/locking.md) -----------------------------------------------

def _lock_options_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait-lock", nargs="?", const=math.inf, default=0.0,
                        type=_wait_seconds, metavar="SECONDS",
                        help="when another run holds the fleet's lock, wait for it (for ever, "
                             f"or SECONDS) instead of refusing at once (exit status "
                             f"{EXIT_LOCKED})")
    parser.add_argument("--lock-lease", type=float, default=None, metavar="SECONDS",
                        help="the lease of this run's lock, renewed every quarter of it; if "
                             "this process dies, others take the lock over once it expires "
                             "(default 60)")


def _wait_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 30 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 2592000 seconds")
    return value


def _lock_options(args: argparse.Namespace, fleet: str) -> Any:
    from fleet.engine.lock import DEFAULT_LEASE_S, MAX_LEASE_S, MIN_LEASE_S, LockOptions

    lease = DEFAULT_LEASE_S if args.lock_lease is None else args.lock_lease
    if not MIN_LEASE_S <= lease <= MAX_LEASE_S:
        raise ConfigError(f"{args.lock_lease} is not between {MIN_LEASE_S:g} and "
                          f"{MAX_LEASE_S:g} seconds", key="--lock-lease")
    wait = None if math.isinf(args.wait_lock) else float(args.wait_lock)
    return LockOptions(lease_s=lease, wait_s=wait, on_wait=_lock_waiter(fleet, wait))


def _lock_waiter(fleet: str, wait_s: float | None) -> Callable[[Any], None]:
    """Progress while waiting for the lock: when the holder changes, and every 10 s."""
    import time

    started = time.monotonic()
    last: list[Any] = [None, -math.inf]

    def on_wait(view: Any) -> None:
        now = time.monotonic()
        who = (view.lock, view.holder.run_id if view.holder else None)
        if who != last[0] or now - last[1] >= 10.0:
            last[:] = [who, now]
            limit = "" if wait_s is None else f" of {wait_s:g}"
            eprint(f"waiting for the lock of fleet {fleet} ({now - started:.0f} s{limit} so "
                   f"far): held by {view.describe()}")

    return on_wait


def _refused(exc: Any, args: argparse.Namespace) -> int:
    hint = "" if args.wait_lock else "; pass --wait-lock[=SECONDS] to wait for it"
    eprint(f"{exc}{hint}")
    if args.json:
        print_json({"error": "locked", "message": str(exc), "lock": exc.view.to_dict()})
    return EXIT_LOCKED


def _fanout(*consumers: Callable[[Any], None] | None) -> Callable[[Any], None]:
    active = [c for c in consumers if c is not None]

    def on_event(event: Any) -> None:
        for consumer in active:
            consumer(event)

    return on_event


# -- commands ------------------------------------------------------------------------

async def _provision(args: argparse.Namespace) -> int:
    import time
    import uuid

    from fleet.engine.lifetime import expiry_labels, parse_duration, stamp_expiry
    from fleet.engine.lock import FleetLock, LockHeld
    from fleet.engine.operations import check_spec, lost_message
    from fleet.engine.run import EngineOptions, Provisioner
    from fleet.metrics import FleetMetrics
    from fleet.report import LiveProgress, print_summary
    from fleet.target import open_target

    ttl_s = parse_duration(args.ttl) if args.ttl is not None else None
    inventory = _inventory_target(args, "--inventory", "--inventory-format")
    spec = _load_spec(args)
    if spec.count == 0:
        # Scaling to zero removes every member without asking: a slip of the finger
        # must not do that. `fleet destroy` removes them, and asks first.
        raise ConfigError(f"0 would remove every member of fleet {spec.name}; use "
                          "`fleet destroy` for that (it asks first)",
                          key="--count" if args.count is not None else "count",
                          source=None if args.count is not None else spec.origin)
    lock_options = _lock_options(args, spec.name)
    run_id = uuid.uuid4().hex[:12]
    metrics = FleetMetrics()
    pusher = _pusher(args, spec.name, metrics)
    show_progress = not args.json and not args.no_progress
    progress = LiveProgress() if show_progress else None
    interrupted = False
    event_log = EventLog(args.events) if args.events is not None else None
    async with contextlib.AsyncExitStack() as stack:
        if pusher is not None:
            # The last thing the run does, however it ends (failed, cancelled, refused).
            stack.push_async_callback(pusher.push_final)
        if event_log is not None:
            stack.callback(event_log.close)
        target = await stack.enter_async_context(
            open_target(spec, observer=metrics, announce=eprint,
                        sim_time_scale=args.sim_time_scale))
        await stack.enter_async_context(_metrics_server(_metrics_listen(args), metrics))
        # A wrong spec changes nothing, locks nothing; the view it reads starts the run.
        checked = await check_spec(spec, target.client)
        checked_at = anyio.current_time()
        lock = FleetLock(target.client, spec.name, spec.folder_path, op="provision",
                         run_id=run_id, options=lock_options)
        try:
            await stack.enter_async_context(lock)  # released when the stack closes
        except LockHeld as exc:
            return _refused(exc, args)
        expires_at: float | None
        if ttl_s is not None:
            expires_at = time.time() + ttl_s
            await stamp_expiry(spec, target.client, expires_at)
            eprint(f"fleet {spec.name} expires at "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(expires_at))}")
        else:
            expires_at = None  # the members' own: the run reads it in its listing
        provisioner = Provisioner(spec, target.client,
                                  on_event=_fanout(metrics.on_event,
                                                   event_log.write if event_log else None,
                                                   progress.on_event if progress else None),
                                  run_id=run_id,
                                  options=EngineOptions(seed=args.seed,
                                                        labels=expiry_labels(expires_at),
                                                        keep_expiry=ttl_s is None))
        provisioner.use_view(checked, checked_at)
        # Lost: dispatch nothing more, at once (in-flight clones finish or are cleaned up).
        lock.on_lost(lambda why: provisioner.stop(f"lost the fleet's lock: {why}"))
        with progress if progress is not None else contextlib.nullcontext():
            async with anyio.create_task_group() as tg:
                async def watch_signals() -> None:
                    nonlocal interrupted
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for signum in signals:
                            if not interrupted:
                                interrupted = True
                                eprint(f"{signal.Signals(signum).name}: stopping; in-flight "
                                       "clones finish or are cleaned up (again to abort)")
                                provisioner.stop(f"interrupted ({signal.Signals(signum).name})")
                                # The whole stop, lock release included, within its bound.
                                lock.release_by(anyio.current_time()
                                                + spec.timeouts.cancel_grace_s
                                                + spec.timeouts.cleanup_s)
                            else:
                                tg.cancel_scope.cancel()

                async def run() -> None:
                    await provisioner.run()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_signals)
                tg.start_soon(run)
                if pusher is not None:
                    tg.start_soon(pusher.run)
        inventory_error: str | None = None
        if inventory is not None and provisioner.summary is not None:
            # What is there, also after an incomplete or interrupted run.
            try:
                await _write_inventory(spec, target.client, *inventory, "--inventory")
            except (FleetError, TimeoutError) as exc:
                inventory_error = f"the inventory was not written: {exc or 'timed out'}"
    summary = provisioner.summary
    if ttl_s is None:
        expires_at = provisioner.expires_at
    if summary is None:
        eprint("aborted before a summary could be made")
        return EXIT_INTERRUPTED
    if lock.lost_reason is not None:
        # What it did is reported, but not as the fleet's state: another run may have
        # changed the fleet since this one stopped.
        eprint(lost_message(spec.name, lock.lost_reason))
    if args.json:
        out = summary.to_dict()
        out["target"] = "simulator" if target.simulated else "vcenter"
        out["expires_at"] = None if expires_at is None else math.ceil(expires_at)
        out["lock_lost"] = lock.lost_reason
        out["inventory"] = None if inventory is None or inventory_error else inventory[0]
        print_json(out)
    else:
        print_summary(summary)
    if inventory_error is not None:
        eprint(inventory_error)
    elif inventory is not None and inventory[0] != "-":
        eprint(f"wrote the {inventory[1]} inventory of fleet {spec.name} to {inventory[0]}")
    loss = event_log.loss() if event_log is not None else None
    if loss is not None:
        eprint(loss)
    lost_events = loss is not None
    if interrupted:
        return EXIT_INTERRUPTED
    if lock.lost_reason is not None or inventory_error is not None:
        return EXIT_INCOMPLETE
    return EXIT_OK if summary.complete and not lost_events else EXIT_INCOMPLETE


async def _plan(args: argparse.Namespace) -> int:
    from fleet.engine.operations import plan
    from fleet.report import print_table
    from fleet.target import open_target

    spec = _load_spec(args)
    async with open_target(spec, announce=eprint, sim_time_scale=args.sim_time_scale) as target:
        result = await plan(spec, target.client)
    if args.json:
        print_json(result.to_dict())
    else:
        print(f"fleet {result.fleet}: {result.requested} wanted — create {result.create}, "
              f"resume {result.resume}, remove {result.remove}, already ready {result.ready}"
              + (f", {result.foreign} VMs in the folder are not members" if result.foreign
                 else ""))
        print_table("placement (dry run: nothing was changed)",
                    ["source", "host", "kind", "power", "chain depth", "budget", "clones left",
                     "planned", "depth after", "status", "preflight"],
                    [[r.source, r.host, "frozen" if r.frozen else "running", r.power_state,
                      r.chain_depth, r.budget,
                      "unlimited" if r.clones_left is None else r.clones_left, r.planned,
                      r.final_depth, r.status, "; ".join(r.preflight) or "ok"]
                     for r in result.rows])
        if result.unplaced:
            print(f"{result.unplaced} clones fit nowhere:")
            for source, reasons in result.unplaced_reasons.items():
                print(f"  {source}: {', '.join(reasons)}")
        for index, why in result.blocked.items():
            print(f"  index {index} blocked: {why}")
        if result.lock is not None:
            print(f"the fleet's lock is held by {result.lock['description']}")
        _print_findings(result)
        print("feasible" if result.feasible else "NOT feasible as it stands")
    return EXIT_OK if result.feasible else EXIT_INCOMPLETE


def _print_findings(result: Any) -> None:
    """The preflight's view of the sources, then each finding with its fix
    (docs/preflight.md)."""
    from fleet.report import print_table

    print_table("sources, as a run would use them",
                ["source", "power", "frozen", "VMware Tools", "guest OS", "guest login"],
                [[c.source, c.power_state, "yes" if c.frozen else "no",
                  "- (frozen)" if c.frozen else "running" if c.tools_running
                  else "not running", c.guest_family,
                  c.guest_login] for c in result.sources])
    if not result.findings:
        print(f"preflight: nothing found (API {result.api_version})")
        return
    errors = len(result.errors)
    warnings = len(result.findings) - errors
    print(f"preflight: {errors} error{'s' * (errors != 1)}, {warnings} "
          f"warning{'s' * (warnings != 1)} (API {result.api_version or 'unsupported'})")
    order = {"error": 0, "warning": 1}
    for f in sorted(result.findings, key=lambda f: order[f.severity]):
        print(f"  {f.severity.upper():7} {f.object}: {f.problem}")
        print(f"          fix: {f.fix}")


async def _status(args: argparse.Namespace) -> int:
    from fleet.engine.operations import status
    from fleet.target import open_target

    spec = _load_spec(args)
    records = None
    async with open_target(spec, simulator=False, command="status", announce=eprint,
                           sim_time_scale=args.sim_time_scale) as target:
        result = await status(spec, target.client)
        if args.members:
            # Only when asked: addresses cost a read of every member (docs/inventory.md),
            # and `status` alone stays the listing it was (docs/reads.md).
            from fleet.engine.members import member_records

            records = await member_records(spec, target.client)
    if args.json:
        out = result.to_dict()
        if records is not None:
            out["member_list"] = [r.to_dict() for r in records]
        print_json(out)
    else:
        states = ", ".join(f"{k} {v}" for k, v in sorted(result.by_state.items())) or "none"
        print(f"fleet {result.fleet} in {result.folder}: {result.ready}/{result.requested} "
              f"ready ({states}); missing {len(result.missing)}, extra {len(result.extra)}, "
              f"not members {result.foreign}")
        if result.lock is not None:
            print(f"locked by {result.lock['description']}")
        if records is not None:
            _print_members(records)
    return EXIT_OK if result.complete else EXIT_INCOMPLETE


def _print_members(records: Sequence[Any]) -> None:
    from fleet.report import print_table

    print_table("members", ["name", "index", "state", "ip", "other addresses", "host",
                            "datastore", "source", "vm"],
                [[r.name, r.index, r.state, r.ip or f"- ({r.address_status})",
                  " ".join(r.ip_addresses[1:]) or None, r.host, r.datastore, r.source, r.vm]
                 for r in records])


def _inventory_target(args: argparse.Namespace, path_key: str, format_key: str
                      ) -> tuple[str, str] | None:
    """(path, format) of the inventory a command is to write, checked before anything
    else is done (docs/inventory.md); None when none is asked."""
    from fleet.inventory import check_output, format_for

    path = getattr(args, path_key.lstrip("-").replace("-", "_"))
    given = getattr(args, format_key.lstrip("-").replace("-", "_"))
    if path is None:
        if given is not None and path_key == "--inventory":
            raise ConfigError("an inventory format without --inventory FILE to write it to",
                              key=format_key)
        return None
    if not path:
        raise ConfigError("an empty path; give a file (or - for standard output)",
                          key=path_key)
    fmt = format_for(path, given, key=format_key)
    check_output(path, key=path_key)
    return path, fmt


async def _write_inventory(spec: Any, client: Any, path: str, fmt: str, key: str) -> int:
    """Read the fleet's member records and write them to ``path`` in ``fmt``."""
    from fleet.engine.members import member_records
    from fleet.inventory import render, write_output

    records = await member_records(spec, client)
    write_output(path, render(fmt, spec.name, records), key=key)
    return len(records)


async def _inventory(args: argparse.Namespace) -> int:
    from fleet.inventory import format_for
    from fleet.target import open_target

    target_file = _inventory_target(args, "--output", "--format")
    path, fmt = target_file if target_file is not None else \
        ("-", format_for(None, args.format, key="--format"))
    spec = _load_spec(args)
    # A fresh built-in simulator has no fleet to list: vCenter must be named.
    async with open_target(spec, simulator=False, command="inventory", announce=eprint,
                           sim_time_scale=args.sim_time_scale) as target:
        count = await _write_inventory(spec, target.client, path, fmt, "--output")
    if path != "-":
        eprint(f"wrote the {fmt} inventory of fleet {spec.name} ({count} members) to {path}")
    return EXIT_OK


async def _destroy(args: argparse.Namespace) -> int:
    from fleet.engine.lock import LockHeld, LockLost
    from fleet.engine.operations import destroy, status
    from fleet.report import print_removal
    from fleet.target import open_target

    spec = _load_spec(args)
    lock_options = _lock_options(args, spec.name)
    async with open_target(spec, simulator=False, command="destroy", announce=eprint,
                           sim_time_scale=args.sim_time_scale) as target:
        if not args.yes:
            current = await status(spec, target.client)
            if current.members == 0:
                eprint(f"fleet {spec.name} has no members; nothing to destroy")
                return EXIT_OK
            if not sys.stdin.isatty():
                raise ConfigError(f"refusing to destroy {current.members} members of fleet "
                                  f"{spec.name} without confirmation; pass --yes", key="--yes")
            answer = await anyio.to_thread.run_sync(
                input, f"Destroy all {current.members} members of fleet {spec.name} in "
                       f"{spec.folder_path}? Type the fleet name to confirm: ")
            if answer.strip() != spec.name:
                eprint("not confirmed; nothing destroyed")
                return EXIT_INCOMPLETE
        try:
            # The fleet's own folder (fleet/<name>) goes too once empty; a folder the
            # spec names is the user's, and stays.
            result = await destroy(spec, target.client, lock=lock_options,
                                   remove_folder=spec.folder is None)
        except LockHeld as exc:
            return _refused(exc, args)
        except LockLost as exc:
            eprint(str(exc))
            result, lost = exc.result, True
        else:
            lost = False
    if args.json:
        out = result.to_dict()
        out["lock_lost"] = lost
        print_json(out)
    else:
        print_removal(result)
    return EXIT_OK if result.failed == 0 and not lost else EXIT_INCOMPLETE


async def _sources(args: argparse.Namespace) -> int:
    from fleet.engine import sources as src_api
    from fleet.report import print_table
    from fleet.target import open_target

    spec = _load_spec(args)
    async with open_target(spec, announce=eprint, sim_time_scale=args.sim_time_scale) as target:
        vs = target.client
        if args.sources_command == "list":
            result = await src_api.list_sources(spec, vs)
        elif args.sources_command == "freeze":
            result = await src_api.freeze_sources(spec, vs, args.names or None)
        else:
            if not args.per_host:
                raise ConfigError("only --per-host preparation exists; pass --per-host",
                                  key="--per-host")
            result = await src_api.prepare_sources(spec, vs, args.golden)
    if args.json:
        print_json({"fleet": spec.name, "sources": [s.to_dict() for s in result]})
    else:
        print_table("sources", ["source", "power", "frozen", "host", "chain depth", "budget",
                                "clones left", "guest"],
                    [[s.name, s.power_state, "yes" if s.frozen else "no", s.host, s.chain_depth,
                      s.budget, "unlimited" if s.clones_left is None else s.clones_left,
                      s.guest_family] for s in result])
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet",
        description="Provision fleets of vSphere Instant Clones fast, within vCenter's limits. "
                    "vCenter is named by --vcenter-url, the spec's [vcenter], "
                    "FLEET_VCENTER_* or govc's GOVC_* variables, in that order "
                    "(docs/connecting.md). Without one, provision, plan and sources run "
                    "against a built-in simulator; status and destroy refuse.")
    parser.add_argument("--version", action="version", version=f"fleet {__version__}")
    parser.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                        help="log to stderr at this level (default warning); before or "
                             "after the command")
    # The same option after the command: its default is no value, so that it does not
    # undo one given before the command (`fleet --log-level debug sim`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                        help="log to stderr at this level (default warning)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(subs: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return subs.add_parser(name, parents=[common], **kwargs)  # type: ignore[no-any-return]

    p = command(sub, "provision", help="bring a fleet to its count of ready members",
                description="Create missing members, finish half-configured ones and "
                            "remove extras, within vCenter's limits.")
    _spec_options(p)
    _metrics_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.add_argument("--ttl", metavar="DURATION",
                   help="the fleet's lifetime from now (90s, 15m, 2h, 1d, 1h30m): recorded on "
                        "every member; 'fleet serve' destroys the fleet when it ends. Without "
                        "it the fleet keeps the expiry it has, if any")
    p.add_argument("--events", metavar="FILE",
                   help="write every engine event to FILE as JSON lines (one object per "
                        "event, with its elapsed seconds), for analysis after the run")
    p.add_argument("--inventory", metavar="FILE",
                   help="when the run ends (complete or not), write the members and their "
                        "addresses to FILE (- for standard output), replacing it whole")
    p.add_argument("--inventory-format", "--format", dest="inventory_format",
                   metavar="FORMAT",
                   help="the inventory's format: json, ansible, hosts or csv (default: "
                        "from FILE's suffix, .yml/.yaml ansible, .csv csv, else json)")
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    _lock_options_args(p)
    p.set_defaults(afunc=_provision)

    p = command(sub, "plan", help="dry run: placement table and preflight checks, no changes",
                description="What provisioning would do, and everything that would "
                            "stop it (API version, privileges, sources, guest login, "
                            "hosts, datastore space, vCenter's own clone check), each "
                            "with its fix. Changes nothing. Exit status 1 when a "
                            "finding is an error or clones fit nowhere "
                            "(docs/preflight.md).")
    _spec_options(p)
    p.set_defaults(afunc=_plan)

    p = command(sub, "status", help="members by state, missing and extra indexes")
    _spec_options(p, count=True)
    p.add_argument("--members", action="store_true",
                   help="also list every member: state, addresses, host, datastore, source "
                        "(reads each member; --json: as member_list)")
    p.set_defaults(afunc=_status)

    p = command(sub, "inventory", help="the members and their addresses, for Ansible, "
                                       "/etc/hosts, a spreadsheet or a script",
                description="Write every member of a fleet with its addresses, host, "
                            "datastore and source, as JSON, an Ansible YAML "
                            "inventory, /etc/hosts lines or CSV. A member whose guest "
                            "has no address of its own yet shows none "
                            "(docs/inventory.md).")
    p.add_argument("--spec", metavar="FILE", help="fleet spec (TOML)")
    p.add_argument("--name", metavar="NAME", help="fleet name (overrides the spec's)")
    p.add_argument("--format", metavar="FORMAT",
                   help="json, ansible, hosts or csv (default: from --output's suffix, "
                        ".yml/.yaml ansible, .csv csv, else json)")
    p.add_argument("--output", "-o", metavar="FILE",
                   help="write to FILE, replaced whole (a new file renamed over it); "
                        "default standard output")
    p.add_argument("--sim-time-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    _vcenter_options(p)
    p.set_defaults(afunc=_inventory)

    p = command(sub, "destroy", help="power off and destroy every member of a fleet")
    _spec_options(p, count=False)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _lock_options_args(p)
    p.set_defaults(afunc=_destroy)

    p = command(sub, "sources", help="inspect, freeze or prepare instant-clone sources")
    ssub = p.add_subparsers(dest="sources_command", metavar="ACTION")
    ssub.required = True
    sp = command(ssub, "list", help="power state, frozen, host, chain depth, clones left")
    _spec_options(sp, count=False)
    sp = command(ssub, "freeze", help="freeze running sources through guest operations")
    _spec_options(sp, count=False)
    sp.add_argument("names", nargs="*", help="sources to freeze (default: the spec's)")
    sp = command(ssub, "prepare", help="make a frozen source on every host lacking one")
    _spec_options(sp, count=False)
    sp.add_argument("--per-host", action="store_true", help="one frozen source per host")
    sp.add_argument("--golden", required=True, metavar="VM", help="the VM to clone them from")
    p.set_defaults(afunc=_sources)

    from fleet.cli import lease as lease_cli

    lease_cli.add_commands(sub, command)

    from fleet.cli import serve as serve_cli

    p = command(sub, "serve", help="serve the REST API for fleets (many callers, one vCenter)",
                description="A long-running service that owns the vCenter session and "
                            "the limits, so many callers' bursts share them fairly. "
                            "Prints 'listening on URL' when ready.")
    serve_cli.add_arguments(p)
    p.set_defaults(func=serve_cli.main)

    from fleet.cli import sim as sim_cli

    p = command(sub, "sim", help="serve a simulated vCenter (vim25 SOAP)",
                description="Serve a simulated vCenter that unmodified pyVmomi and fleet "
                            "talk to. Prints 'listening on URL' when ready.")
    sim_cli.add_arguments(p)
    p.set_defaults(func=sim_cli.main)

    p = command(sub, "completion",
                help="print the shell completion script for bash, zsh or fish",
                description="Print the script that completes fleet's commands and options "
                            "in SHELL; load it from the shell's startup file (README, "
                            "'Shell completion').")
    p.add_argument("shell", choices=COMPLETION_SHELLS, help="the shell")
    p.set_defaults(func=_completion)
    return parser


def _metrics_options(parser: argparse.ArgumentParser) -> None:
    from fleet.cli.options import checked, parse_listen, tcp_port

    m = parser.add_argument_group(
        "metrics", "Prometheus metrics of the run (docs/pushgateway.md)")
    where = m.add_mutually_exclusive_group()
    where.add_argument("--metrics-port", type=tcp_port, metavar="N",
                       help="serve them on 127.0.0.1:N/metrics during the run")
    where.add_argument("--metrics-listen", metavar="HOST:PORT",
                       type=checked(lambda v: parse_listen(v, "--metrics-listen",
                                                           any_port=False)),
                       help="serve them on HOST:PORT/metrics during the run ([v6]:PORT for "
                            "IPv6)")
    m.add_argument("--pushgateway", metavar="URL", type=checked(_gateway),
                   help="push them to the Prometheus Pushgateway at URL (job 'fleet', "
                        "grouped by fleet) every few seconds and when the run ends; a "
                        "gateway that fails is a warning, never the run's failure")


def _gateway(text: str) -> Any:
    from fleet.pushgateway import parse_gateway

    return parse_gateway(text)


def _completion(args: argparse.Namespace) -> int:
    """``fleet completion SHELL``: argcomplete's script for the ``fleet`` command."""
    from argcomplete.shell_integration import shellcode

    print(shellcode(["fleet"], shell=args.shell), end="")
    return EXIT_OK


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, as task groups raise them."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _report(errors: list[BaseException]) -> int:
    if any(isinstance(e, KeyboardInterrupt) for e in errors):
        eprint("interrupted")
        return EXIT_INTERRUPTED
    for exc in errors:
        eprint(f"error: {exc}")
    return EXIT_USAGE if any(isinstance(e, ConfigError) for e in errors) else EXIT_INCOMPLETE


#: allocations between two young collections for the ``fleet`` command (Python's
#: default is 700; docs/reads.md, "Collecting garbage")
GC_YOUNG_THRESHOLD = 50_000


def entry() -> NoReturn:
    """The ``fleet`` command (and ``python -m fleet``): run it, then leave without a last
    collection. By the time a command returns, the heap holds pyVmomi's type tables,
    pydantic's schemas and whatever the command built (a simulator: every VM and task),
    all living as long as the process; the interpreter would collect them all once
    more at exit, which took longer than a short command itself (about 1 s per
    ``fleet sim`` on a loaded 2-core machine, 0.2 s frozen). Frozen, they are
    skipped, and the operating system frees the memory.

    While it runs, the cyclic collector looks at young objects every
    ``GC_YOUNG_THRESHOLD`` allocations rather than every 700: a listing of 10,000
    members makes hundreds of thousands of objects without a cycle among them, and
    the default collected 324 times during one ``status``, 0.22 s of its 1.7 s of
    CPU. Refcounting still frees everything at once; only garbage in cycles waits a
    little longer."""
    gc.set_threshold(GC_YOUNG_THRESHOLD)
    code = main()
    gc.freeze()
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:
        # A shell asking for completions (`fleet completion`): argcomplete answers on
        # the descriptor the shell gave it and exits.
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "afunc", None) is not None:
            return int(anyio.run(args.afunc, args))
        return int(args.func(args) or 0)
    except (FleetError, KeyboardInterrupt) as exc:
        return _report([exc])
    except TimeoutError:
        return _report([_timed_out()])
    except BaseExceptionGroup as group:
        errors = [_timed_out() if isinstance(e, TimeoutError) else e
                  for e in _leaves(group)]
        if all(isinstance(e, FleetError | KeyboardInterrupt) for e in errors):
            return _report(errors)
        raise


def _timed_out() -> FleetError:
    """A deadline of the spec passed (``anyio.fail_after``): say which knob it was."""
    return FleetError("vCenter did not answer within the spec's deadline "
                      "(timeouts.call_s for a single call); it may be overloaded, or the "
                      "fleet large enough to need a longer one")


if __name__ == "__main__":
    sys.exit(main())
