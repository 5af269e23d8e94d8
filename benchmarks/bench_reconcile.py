"""Scenario 6 of ``python -m benchmarks``: reconcile at scale (issue 16), this commit
against today's way, in one run.

On realistic simulated VMs (docs/simulator-vms.md), 10,000 members on 64 hosts
(``scale64.toml``), clone phase only (no NIC refresh, no readiness wait), each side
on a fresh simulator of this commit's code:

1. ``create``: ``fleet provision`` of the fleet;
2. ``rerun``: the same ``fleet provision`` again, which changes nothing;
3. ``status``: ``fleet status`` of the fleet;
4. ``scale_down``: ``fleet provision --count`` 1,000 fewer, which destroys them;
5. ``fleet serve`` with the fleet under its root folder: ``serve_start`` until
   ``GET /v1/fleets/{name}`` shows the members it found, ``serve_idle`` with no
   caller for ``reconcile_idle_s``, then one member destroyed in vCenter by
   pyVmomi and the time until ``/v1/fleets/{name}`` shows one member fewer. The
   service is measured as it is: a periodic re-scan of its root folder, or a watch
   once it has one. A member read by stock pyVmomi (its devices, its extraConfig
   and a keyed path) shows the simulator's VMs have a real VM's shape.

Each step reports wall time, client CPU (user + system of the fleet process:
``wait4`` for a command, ``/proc`` for the service), simulator CPU (``/proc`` of
the simulator process, before and after), the SOAP body bytes the simulator
carried (``soap_bytes`` of ``/_sim/stats``) and the client's peak RSS.

"Today's way" is the client at :data:`BASELINE_COMMIT`, taken from git with ``git
archive`` (no checkout is touched) and run from its own directory with the same
interpreter and libraries. Without git or that commit, the baseline is skipped
and the result says why.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyVim.connect import SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from benchmarks.harness import (
    CLONE_ONLY,
    ROOT,
    BenchmarkError,
    ProcessResult,
    run_process,
    sim_process,
    spec_for,
)
from tests.simproc import PASSWORD, USER, SimProcess
from tests.specs import GUEST_PASSWORD, to_toml

if TYPE_CHECKING:
    from benchmarks.scenarios import Sizes

#: "Today's way": main just before issue 16's client changes (every member read with
#: all its property paths, full re-reads, the service re-scanning its root folder
#: every ``scan_interval_s``). A fixed commit, not main, since main moves on as
#: issue 16 lands and the comparison must stay with the code the issue measured.
BASELINE_COMMIT = "45978d9"

FLEET = "reconcile"
SOURCES = [f"frozen-{i:02d}" for i in range(1, 65)]
TOKEN = "reconcile-benchmark-token-0123456789"
STEP_TIMEOUT_S = 1800.0
START_TIMEOUT_S = 600.0
POLL_S = 0.05
#: ``timeouts.call_s`` of the fleet's spec, on both sides. Today's way reads every member
#: whole, and its rerun's listing of 10,000 realistic members took longer than the
#: default 60 s on the 2-core machine (its rerun failed with a TimeoutError); with a
#: longer deadline both sides finish and their figures can be set side by side.
CALL_S = 600.0
#: a member's label read through a keyed path by the shape probe
PROBE_LABEL = "guestinfo.fleet.state"
#: the flags each command is run with, checked against the side's ``--help``
FLAGS = {"provision": ("--spec", "--count", "--json", "--no-progress"),
         "status": ("--spec", "--json"), "serve": ("--config", "--listen")}


@dataclass(frozen=True)
class Side:
    """Whose client runs: ``cwd`` comes first on ``python -m fleet``'s path."""

    label: str
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)

    def fleet(self, *args: str, timeout_s: float = STEP_TIMEOUT_S) -> ProcessResult:
        return run_process([sys.executable, "-m", "fleet", *args],
                           env={**self.env, "SIM_PASSWORD": PASSWORD,
                                "GUEST_PASSWORD": GUEST_PASSWORD},
                           cwd=self.cwd, timeout_s=timeout_s)

    def check(self) -> str:
        """Where the side's ``fleet`` package is; BenchmarkError if it is not the
        side's own, or a flag the side is run with is missing at its commit. The
        side's package is compiled to bytecode first, as ``pip install`` leaves an
        installed package (a machine with PYTHONDONTWRITEBYTECODE, like these, would
        otherwise compile every module of every command again: 0.1-0.2 s a command)."""
        compiled = run_process([sys.executable, "-m", "compileall", "-q", str(self.cwd / "fleet")],
                               env=self.env, cwd=self.cwd, timeout_s=300)
        if compiled.returncode != 0:
            raise BenchmarkError(f"{self.label}: compileall: {compiled.stderr[-500:]}")
        where = run_process([sys.executable, "-c", "import fleet; print(fleet.__file__)"],
                            env=self.env, cwd=self.cwd, timeout_s=60)
        if where.returncode != 0:
            raise BenchmarkError(f"{self.label}: cannot import fleet: {where.stderr[-500:]}")
        package = Path(where.stdout.strip())
        if not package.resolve().is_relative_to(self.cwd.resolve()):
            raise BenchmarkError(f"{self.label}: fleet comes from {package}, not {self.cwd}")
        for command, flags in FLAGS.items():
            text = self.fleet(command, "--help", timeout_s=60).stdout
            missing = [f for f in flags if f not in text]
            if missing:
                raise BenchmarkError(f"{self.label}: 'fleet {command}' has no "
                                     f"{', '.join(missing)}")
        return str(package)


def current_side() -> Side:
    return Side("this commit", ROOT)


def baseline_side(work: Path) -> Side:
    """Today's way from git, unpacked under ``work``; BenchmarkError if it cannot be."""
    tree = work / f"baseline-{BASELINE_COMMIT}"
    archive = work / f"baseline-{BASELINE_COMMIT}.tar"
    try:
        with archive.open("wb") as out:
            done = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE_COMMIT],
                                  stdout=out, stderr=subprocess.PIPE, timeout=120,
                                  check=False)
        if done.returncode != 0:
            raise BenchmarkError(f"git archive {BASELINE_COMMIT}: "
                                 f"{done.stderr.decode(errors='replace').strip()[-500:]}")
        tree.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tree, filter="data")
    except (OSError, subprocess.SubprocessError, tarfile.TarError) as exc:
        raise BenchmarkError(f"git archive {BASELINE_COMMIT}: {exc}") from exc
    finally:
        archive.unlink(missing_ok=True)
    return Side(f"today's way ({BASELINE_COMMIT})", tree,
                {"PYTHONPATH": str(tree)})


# -- what the kernel says about a running process -------------------------------------


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads), from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchmarkError(f"cannot read the CPU time of process {pid}: {exc}") from exc
    rest = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set so far (``VmHWM``), in MiB like ``wait4``'s."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise BenchmarkError(f"cannot read the memory of process {pid}: {exc}") from exc
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchmarkError(f"process {pid} reports no VmHWM")


def _wire(sim: SimProcess) -> int:
    counted = sim.stats()["soap_bytes"]
    return int(counted["requests"]) + int(counted["responses"])


class Meter:
    """The simulator's CPU and SOAP bytes over one step. The stats call is made
    outside the CPU window: listing 10,000 VMs for it is not the step's cost."""

    def __init__(self, sim: SimProcess) -> None:
        self.sim = sim
        self.wire0 = _wire(sim)
        self.cpu0 = cpu_s(sim.proc.pid)
        self.t0 = time.monotonic()

    def done(self, *, wall_s: float | None = None, **figures: float) -> dict[str, float]:
        """The step's figures; its wall time is from the meter's start unless given."""
        wall = time.monotonic() - self.t0 if wall_s is None else wall_s
        sim_cpu = cpu_s(self.sim.proc.pid) - self.cpu0
        return {"wall_s": wall, **figures, "sim_cpu_s": sim_cpu,
                "wire_bytes": _wire(self.sim) - self.wire0}


# -- the steps ------------------------------------------------------------------------


def _command(sim: SimProcess, side: Side, step: str, *args: str
             ) -> tuple[dict[str, Any], Any]:
    meter = Meter(sim)
    result = side.fleet(*args)
    figures = meter.done(wall_s=result.wall_s, client_cpu_s=result.cpu_s,
                         peak_rss_mb=result.max_rss_mb)
    if result.returncode != 0:
        raise BenchmarkError(f"{side.label}, step {step}: fleet {args[0]} exited "
                             f"{result.returncode} after {result.wall_s:.1f} s: "
                             f"{result.stderr[-1500:]}")
    return figures, result.json()


def _expect(what: str, got: Any, want: Any) -> None:
    if got != want:
        raise BenchmarkError(f"{what}: {got!r}, expected {want!r}")


class Service:
    """``fleet serve`` of one side, as a user starts it; HTTP by ``http.client``."""

    def __init__(self, side: Side, config: Path) -> None:
        env = dict(os.environ, **side.env, PYTHONUNBUFFERED="1", FLEET_API_TOKEN=TOKEN,
                   SIM_PASSWORD=PASSWORD)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet", "serve", "--config", str(config), "--listen",
             "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env, cwd=side.cwd)
        self.stderr: list[str] = []
        lines: list[str] = []
        got_line = threading.Event()

        def stdout() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.append(line)
                got_line.set()
            got_line.set()

        def stderr() -> None:
            assert self.proc.stderr is not None
            self.stderr.extend(self.proc.stderr)

        self._readers = [threading.Thread(target=f, daemon=True) for f in (stdout, stderr)]
        for reader in self._readers:
            reader.start()
        got_line.wait(START_TIMEOUT_S)
        if not lines or not lines[0].startswith("listening on "):
            self.stop()
            raise BenchmarkError(f"{side.label}: fleet serve did not start: "
                                 f"{lines[:1]} {''.join(self.stderr[-20:])}")
        self.port = int(lines[0].strip().rsplit(":", 1)[1])

    def fleet(self, limit: int = 0) -> dict[str, Any] | None:
        """The fleet as ``GET /v1/fleets/{name}`` shows it; None before it is known."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", f"/v1/fleets/{FLEET}?limit={limit}",
                         headers={"Authorization": f"Bearer {TOKEN}"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise BenchmarkError(f"GET /v1/fleets/{FLEET}: {resp.status} {body[:300]!r}")
        return json.loads(body)  # type: ignore[no-any-return]

    def until(self, members: int, bound_s: float) -> float | None:
        """Poll every ``POLL_S`` until the fleet shows ``members``; seconds, or None
        if it did not within ``bound_s``."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < bound_s:
            view = self.fleet()
            if view is not None and view["members"] == members:
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                raise BenchmarkError(f"fleet serve exited {self.proc.returncode}: "
                                     f"{''.join(self.stderr[-20:])}")
            time.sleep(POLL_S)
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=10)


def _connect(sim: SimProcess) -> Any:
    ctx = ssl.create_default_context(cafile=str(sim.cert_path))
    return SmartConnect(host=sim.host, port=sim.port, user=USER, pwd=PASSWORD,
                        sslContext=ctx)


def shape_probe(si: Any, ref: str) -> dict[str, Any]:
    """A member as pyVmomi reads it from the simulator: its devices and extraConfig,
    and one label through a keyed path (docs/simulator-vms.md)."""
    pc = vmodl.query.PropertyCollector
    vm = vim.VirtualMachine(ref, si._stub)
    keyed = f'config.extraConfig["{PROBE_LABEL}"]'

    def read(path: str) -> Any:
        spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=vm, skip=False)],
                             propSet=[pc.PropertySpec(type=vim.VirtualMachine, all=False,
                                                      pathSet=[path])])
        result = si.content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
        props = result.objects[0].propSet if result and result.objects else []
        return props[0].val if props else None

    config = read("config")
    label = read(keyed)
    return {"vm": ref, "guest_id": config.guestId,
            "extra_config_keys": len(config.extraConfig),
            "devices": len(config.hardware.device),
            "keyed_path": keyed, "keyed_value": None if label is None else label.value}


def _destroy(si: Any, ref: str) -> None:
    """What another tool does: power the VM off and destroy it."""
    vm = vim.VirtualMachine(ref, si._stub)
    WaitForTask(vm.PowerOffVM_Task())
    WaitForTask(vm.Destroy_Task())


def _serve(sim: SimProcess, side: Side, work: Path, members: int, idle_s: float,
           bound_s: float, out: dict[str, Any]) -> None:
    config = work / "serve.toml"
    config.write_text(to_toml({
        "root_folder": "fleet", "state_dir": str(work / "state"),
        "vcenter": {"url": sim.url, "user": USER, "password_env": "SIM_PASSWORD",
                    "thumbprint": sim.thumbprint},
        "api": {"token_env": "FLEET_API_TOKEN"}}))
    meter = Meter(sim)
    service = Service(side, config)
    try:
        found = service.until(members, START_TIMEOUT_S)
        if found is None:
            raise BenchmarkError(f"{side.label}: fleet serve did not show {members} members "
                                 f"in {START_TIMEOUT_S:.0f} s: {service.fleet()}")
        out["serve_start"] = meter.done(client_cpu_s=cpu_s(service.proc.pid),
                                        peak_rss_mb=peak_rss_mb(service.proc.pid))
        meter, cpu0 = Meter(sim), cpu_s(service.proc.pid)
        time.sleep(idle_s)
        cpu = cpu_s(service.proc.pid) - cpu0
        idle = meter.done(client_cpu_s=cpu, peak_rss_mb=peak_rss_mb(service.proc.pid))
        idle["client_cpu_percent"] = 100 * cpu / idle["wall_s"]
        out["serve_idle"] = idle
        view = service.fleet(limit=1)
        assert view is not None
        ref = view["member_list"][0]["vm"]
        si = _connect(sim)
        try:
            out["shape"] = shape_probe(si, ref)
            _destroy(si, ref)
        finally:
            si.content.sessionManager.Logout()
        reflected = service.until(members - 1, bound_s)
        out["external_change"] = {"reflected_s": reflected, "bound_s": bound_s,
                                  "peak_rss_mb": peak_rss_mb(service.proc.pid)}
    finally:
        service.stop()


def run_side(side: Side, sizes: Sizes, work: Path, out: dict[str, Any]) -> None:
    """The whole sequence for one side, on a fresh simulator. Each step's figures go
    into ``out`` as they are measured, so a step that fails (BenchmarkError) leaves
    those before it."""
    work.mkdir(parents=True, exist_ok=True)
    count, after = sizes.reconcile, sizes.reconcile - sizes.reconcile_destroy
    with sim_process(time_scale=sizes.reconcile_time_scale, topology="scale64.toml") as sim:
        spec = work / f"{FLEET}.toml"
        spec.write_text(to_toml(spec_for(sim, FLEET, count, SOURCES, **CLONE_ONLY,
                                         timeouts={"call_s": CALL_S})))
        provision = ("provision", "--spec", str(spec), "--json", "--no-progress")
        out["create"], summary = _command(sim, side, "create", *provision)
        _expect(f"{side.label}: create, members ready", summary["ready"], count)
        out["rerun"], summary = _command(sim, side, "rerun", *provision)
        _expect(f"{side.label}: rerun, members created and removed",
                (summary["created"], summary["removed"], summary["ready"]), (0, 0, count))
        out["status"], status = _command(sim, side, "status", "status", "--spec", str(spec),
                                         "--json")
        _expect(f"{side.label}: status, members", status["members"], count)
        out["scale_down"], summary = _command(sim, side, "scale-down", *provision,
                                              "--count", str(after))
        _expect(f"{side.label}: scale-down, members removed and ready",
                (summary["removed"], summary["ready"]), (sizes.reconcile_destroy, after))
        _serve(sim, side, work, after, sizes.reconcile_idle_s,
               sizes.reconcile_change_bound_s, out)
