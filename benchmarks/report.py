"""The benchmark report: a short Markdown file quoting every figure against its
target, and the PNG plots it links (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PHASE_ORDER = ("queue", "clone", "network", "reconnect", "ready")


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def plot_throughput(results: dict[str, Any], out: Path) -> str:
    burst = results["burst"]
    tools = results.get("tools") or {}  # absent with --only burst, or if it failed
    fig, ax = plt.subplots(figsize=(8, 4))
    s = burst["series"]["throughput"]
    ax.plot(s["t"], s["rate"], label=f"fleet ({burst['fleet']['ready']} clones)")
    for key, label in (("pool", "pyVmomi, 64 threads"), ("sequential", "pyVmomi, sequential")):
        run = tools.get(key)
        if not run:
            continue
        ax.plot(run["throughput"]["t"], run["throughput"]["rate"],
                label=f"{label} ({run['clones']} clones)")
    ax.axhline(burst["slot_capacity_per_s"], color="grey", linestyle="--",
               label="what the host slots allow")
    ax.set_xlabel("seconds since the first clone was started")
    ax.set_ylabel("clones finished per second")
    ax.set_title("Burst on the default topology (8 hosts x 8 slots), "
                 f"time scale {burst['time_scale']}")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, out / "throughput.png")


def plot_in_flight(results: dict[str, Any], out: Path) -> str:
    series = results["burst"]["series"]["in_flight"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for host, values in sorted(series["hosts"].items()):
        ax.step(series["t"], values, where="post", label=host, linewidth=1)
    slots = sorted(set(series["slots"].values()))
    for s in slots:
        ax.axhline(s, color="grey", linestyle="--")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("fleet's clones at vCenter")
    ax.set_title("In flight per host during the burst (dashed: the host's slots)")
    ax.legend(loc="lower center", ncol=4, fontsize=7)
    return _save(fig, out / "in_flight.png")


def plot_latency(phase_values: dict[str, list[float]], out: Path, time_scale: float) -> str:
    fig, ax = plt.subplots(figsize=(8, 4))
    for phase in PHASE_ORDER:
        values = sorted(phase_values.get(phase, []))
        if not values:
            continue
        n = len(values)
        ax.plot([max(v, 1e-4) for v in values], [(i + 1) / n for i in range(n)], label=phase)
    ax.set_xscale("log")
    ax.set_xlabel(f"seconds (simulator at time scale {time_scale})")
    ax.set_ylabel("fraction of clones")
    ax.set_title("Latency per phase, full network workflow, 64 hosts")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out / "latency.png")


def plot_scale(results: dict[str, Any], out: Path) -> str:
    sc = results["scale"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("clone_only", "clone phase only"), ("workflow", "full workflow")):
        s = sc[key]["throughput"]
        left.plot(s["t"], s["rate"], label=label)
    left.set_xlabel("seconds since the first clone was started")
    left.set_ylabel("clones finished per second")
    left.set_title(f"{sc['clone_only']['ready']} clones, 64 hosts")
    left.legend(fontsize=8)
    for i, key in enumerate(("clone_only", "workflow")):
        rates = sc[key]["tenth_rates"]
        right.bar([x + 0.4 * i for x in range(len(rates))], rates, width=0.4,
                  label="clone phase only" if key == "clone_only" else "full workflow")
    right.set_xlabel("tenth of the clones (by completion)")
    right.set_ylabel("clones/s")
    right.set_title("Throughput per tenth")
    right.legend(fontsize=8)
    return _save(fig, out / "scale.png")


def plot_chains(results: dict[str, Any], out: Path) -> str:
    ch = results["chains"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("fleet", "fleet"), ("naive", "naive round-robin")):
        s = ch["series"][key]
        left.plot(s["t"], s["rate"], label=label)
    left.set_xlabel("seconds")
    left.set_ylabel("clones finished per second")
    left.set_title("1 running + 3 frozen sources")
    left.legend(fontsize=8)
    names = list(ch["fleet"]["source_chains"])
    x = range(len(names))
    right.bar([i - 0.2 for i in x], [ch["fleet"]["source_chains"][n] for n in names],
              width=0.4, label="fleet")
    right.bar([i + 0.2 for i in x], [ch["naive"]["source_chains"][n] for n in names],
              width=0.4, label="naive")
    right.axhline(255, color="red", linestyle="--", label="vSphere's limit")
    right.set_xticks(list(x), names, fontsize=7)
    right.set_ylabel("source's disk chain at the end")
    right.legend(fontsize=8)
    return _save(fig, out / "chains.png")


def plot_adaptive(results: dict[str, Any], out: Path) -> str:
    """Clones finished against time: the slope is the throughput, and a cumulative
    curve shows a slow start plainly where binned rates would only show waves."""
    ad = results["adaptive"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, label in zip(axes, ("wide", "narrow"), strict=True):
        topo = ad[label]
        for key, run in topo["runs"].items():
            name = {"true": f"per_host = {topo['slots']} (true)", "auto": "per_host = auto",
                    "8": "per_host = 8 (default)"}[key]
            done = run["done_s"]
            ax.plot(done, range(1, len(done) + 1), label=name)
        ax.set_title(f"hosts with {topo['slots']} slots")
        ax.set_xlabel("seconds since the first clone was started")
        ax.set_ylabel("clones finished")
        ax.legend(fontsize=8)
    return _save(fig, out / "adaptive.png")


def plot_pools(results: dict[str, Any], out: Path) -> str:
    """The pool's members and waiting requests over time, and each lease's wait."""
    pl = results["pools"]
    s = pl["series"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for key in ("idle", "waiting", "leased", "refilling"):
        top.plot(s["t"], s[key], label=key, linewidth=1)
    window = pl["outrun"].get("window")
    for ax in (top, bottom):
        if window:
            ax.axvspan(window["start_s"], window["end_s"], color="grey", alpha=0.15)
    top.set_ylabel("members / requests")
    top.set_title(f"Warm pool, ready = {pl['ready']}: members by state and requests waiting "
                  "(shaded: leases outrun refills)")
    top.legend(loc="upper right", fontsize=8, ncol=4)
    for key, label in (("outrun", f"{pl['outrun']['rate_per_s']:g} requests/s"),
                       ("steady", f"{pl['steady']['rate_per_s']:g} requests/s")):
        seg = pl[key]["series"]
        bottom.scatter(seg["sent"], [max(w, 1e-4) for w in seg["wait_s"]], s=4, label=label)
    bottom.axhline(0.05, color="grey", linestyle="--", label="50 ms")
    bottom.set_yscale("log")
    bottom.set_xlabel("seconds since the client started")
    bottom.set_ylabel("lease wait, client side (s)")
    bottom.legend(loc="upper right", fontsize=8)
    return _save(fig, out / "pools.png")


# -- Markdown -----------------------------------------------------------------------------


def _met(target: dict[str, Any]) -> str:
    return "met" if target["met"] else "**missed**"


def _num(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def _row(label: str, target: dict[str, Any], digits: int, unit: str = "", *,
         bound: str | None = None, shown: str | None = None) -> tuple[str, str, str, str]:
    """A line of the targets table; the bound is the one the scenario judged by."""
    return (label, shown if shown is not None else f"{_num(target['value'], digits)}{unit}",
            bound if bound is not None else f"{target['op']} {target['bound']:g}{unit}",
            _met(target))


def _steady_note(tenths: list[float]) -> str:
    """What the last-tenth/first-tenth ratio says, in words chosen by the figures: each
    end is compared with the median of the tenths between."""
    if len(tenths) < 10:
        return ""
    ratio = tenths[-1] / tenths[0]
    middle = sorted(tenths[1:9])
    median = (middle[3] + middle[4]) / 2
    first, last = tenths[0] / median, tenths[-1] / median
    words = [f"The last tenth ran at {ratio:.2f}x the first; against the median of tenths "
             f"2-9 ({median:.0f} clones/s) the first ran at {first:.2f} and the last at "
             f"{last:.2f}."]
    if first < 0.9:
        words.append("The first tenth is the slow one: it holds the start (the first "
                     "replies, the limits' slow start).")
    if last > 1.1:
        words.append("The last tenth is fast: fleet has no new clones left to hand over, "
                     "only completions to take in, on two cores it shares with the "
                     "simulator.")
    if last < 0.9:
        words.append("The last tenth is slow: throughput fell as the inventory grew.")
    if abs(ratio - 1) <= 0.10 and 0.9 <= last <= 1.1:
        words.append("No slowdown as the inventory grew.")
    return " ".join(words)


def _workflow_note(tenths: list[float]) -> str:
    if len(tenths) < 10:
        return ""
    later = tenths[3:]
    return ("In the full-workflow run the clones of the first tenths finish before most "
            "network phases (guest programs, reconfigures, readiness waits) compete for the "
            f"same two cores; from the fourth tenth on, clones/s stays between "
            f"{min(later):.0f} and {max(later):.0f} (last tenth / fourth = "
            f"{later[-1] / later[0]:.2f}).")


def markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    meta = results["meta"]
    header = [f"# fleet benchmark report, {meta['date']}", "",
             f"`python -m benchmarks` at commit `{meta['commit']}`"
             + (f" (text re-rendered at `{meta['rendered_at']}`)" if meta.get("rendered_at")
                else "") + f", {meta['cpus']} CPUs "
             f"({meta['machine']}), Python {meta['python']}, {meta['elapsed_s']:.0f} s in all. "
             "Every figure below was measured in this one run, each tool on a fresh "
             "simulator in its own process; fleet and the scripts run as processes of "
             "their own too, and their CPU time and peak RSS are the kernel's (`wait4`).",
             ""]
    lines: list[str] = []
    rows: list[tuple[str, str, str, str]] = []
    failed = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    results = {k: v for k, v in results.items() if k not in failed}
    if failed:
        lines += ["## Scenarios that did not finish", ""]
        lines += [f"- **{name}**: {why}" for name, why in failed.items()]
        lines.append("")

    b = results.get("burst")
    t = results.get("tools")
    if b:
        f = b["fleet"]
        lines += ["## 1. Burst efficiency", "",
                  f"{f['ready']} clones, clone phase only, default topology ({b['slots']} host "
                  f"slots) at time scale {b['time_scale']}. The slots allow {b['slots']} / "
                  f"{_num(b['mean_clone_task_s'], 3)} s (mean clone task, from the "
                  f"simulator's records of the same run) = "
                  f"{_num(b['slot_capacity_per_s'], 1)} clones/s; fleet made "
                  f"{_num(f['clones_per_s'], 1)} clones/s from the first clone started to "
                  f"the last finished ({_num(f['clone_phase_s'], 1)} s).", "",
                  f"![throughput]({plots['throughput']})", "",
                  f"![in flight per host]({plots['in_flight']})", ""]
        rows.append(_row("1 burst: fraction of slot capacity", b["fraction_of_capacity"], 3))
    if t:
        p, s = t["pool"], t["sequential"]
        lines += ["## 2. Against today's tools", "",
                  "| | fleet | pyVmomi, 64 threads | pyVmomi, sequential |",
                  "| --- | ---: | ---: | ---: |",
                  f"| clones | {b['fleet']['ready'] if b else ''} | {p['clones']} | "
                  f"{s['clones']} |",
                  f"| sources | {len(b['sources']) if b else ''} | {p['sources']} | "
                  f"{s['sources']} |",
                  f"| clones/s | {_num(t['fleet_clones_per_s'], 1)} | "
                  f"{_num(p['clones_per_s'], 1)} | {_num(s['clones_per_s'], 2)} |",
                  f"| client CPU per clone (ms) | {_num(t['fleet_cpu_ms_per_clone'])} | "
                  f"{_num(p['cpu_ms_per_clone'])} | {_num(s['cpu_ms_per_clone'])} |",
                  f"| peak RSS (MB) | {_num(b['fleet']['max_rss_mb'], 0) if b else ''} | "
                  f"{_num(p['max_rss_mb'], 0)} | {_num(s['max_rss_mb'], 0)} |", "",
                  "The scripts make fewer clones than fleet (they are slow; the sizes are in "
                  "the JSON); every comparison is of rates. The thread pool cycles over the "
                  "same nine sources as fleet, the sequential script uses one frozen "
                  f"source. fleet: {_num(t['speedup_vs_pool']['value'], 1)}x the thread "
                  f"pool's clones/s at {_num(t['cpu_vs_pool']['value'], 3)}x its CPU per "
                  f"clone; {_num(t['speedup_vs_sequential'], 0)}x the sequential script's "
                  f"clones/s at {_num(t['cpu_vs_sequential'], 3)}x its CPU per clone.", ""]
        rows.append(_row("2 clones/s vs pyVmomi thread pool", t["speedup_vs_pool"], 1, "x"))
        rows.append(_row("2 CPU per clone vs pyVmomi thread pool", t["cpu_vs_pool"], 3, "x"))

    c = results.get("chains")
    if c:
        fl, nv = c["fleet"], c["naive"]
        lines += ["## 3. Chain depth", "",
                  f"Sources `golden-running` (running, chain 1 at the start) and `frozen-01..03`;"
                  f" time scale {c['time_scale']} (clone times below are scaled back to "
                  "vCenter seconds). The naive script cycles over the four sources with 64 "
                  "clones in flight, through fleet's own client, so only placement differs.",
                  "", "| | fleet | naive round-robin |", "| --- | ---: | ---: |",
                  f"| clones made / asked | {fl['ready']} / {fl['ready'] + fl['failed']} | "
                  f"{nv['clones']} / {nv['clones'] + nv['failed']} |",
                  f"| chain faults | {fl['chain_faults']} | {nv['chain_faults']} |",
                  f"| deepest clone chain | {fl['deepest_clone_chain']} | "
                  f"{nv['deepest_clone_chain']} |",
                  f"| running source's chain at the end | "
                  f"{fl['source_chains'].get('golden-running')} | "
                  f"{nv['source_chains'].get('golden-running')} |",
                  f"| clones from the running source | "
                  f"{fl['clones_by_source'].get('golden-running')} | "
                  f"{nv['clones_by_source'].get('golden-running')} |",
                  f"| mean clone time as the caller waits (s) | "
                  f"{_num(fl['mean_clone_wait_s'], 2)} | {_num(nv['mean_clone_wait_s'], 2)} |",
                  f"| p95 of it (s) | {_num(fl['p95_clone_wait_s'], 2)} | "
                  f"{_num(nv['p95_clone_wait_s'], 2)} |",
                  f"| mean clone task run time at vCenter (s) | "
                  f"{_num(fl['mean_clone_task_s'], 2)} | {_num(nv['mean_clone_task_s'], 2)} |",
                  f"| wall time (s) | {_num(fl['wall_s'], 1)} | {_num(nv['wall_s'], 1)} |",
                  "", f"![chains]({plots['chains']})", ""]
        rows.append(_row("3 chain faults, fleet", c["fleet_chain_faults"], 0, bound="0"))

    sc = results.get("scale")
    if sc:
        co, wf = sc["clone_only"], sc["workflow"]
        lines += ["## 4. Scale", "",
                  f"{co['ready']} clones on 64 hosts x 8 slots at time scale "
                  f"{sc['time_scale']}, clone phase only; then {wf['ready']} with the full "
                  "network workflow (clone disconnected, refresh the NIC in the guest, "
                  "reconnect, wait for the guest IP), each on a fresh simulator.", "",
                  "| | clone phase only | full workflow |", "| --- | ---: | ---: |",
                  f"| ready | {co['ready']} | {wf['ready']} |",
                  f"| wall time (s) | {_num(co['wall_s'], 1)} | {_num(wf['wall_s'], 1)} |",
                  f"| clones/s (clone phase) | {_num(co['clones_per_s'], 1)} | "
                  f"{_num(wf['clones_per_s'], 1)} |",
                  f"| client CPU per clone (ms) | {_num(co['cpu_ms_per_clone'])} | "
                  f"{_num(wf['cpu_ms_per_clone'])} |",
                  f"| peak RSS of the fleet process (MB) | {_num(co['max_rss_mb'], 0)} | "
                  f"{_num(wf['max_rss_mb'], 0)} |",
                  f"| clones/s, first tenth / last tenth | "
                  f"{_num(co['tenth_rates'][0], 0)} / {_num(co['tenth_rates'][-1], 0)} | "
                  f"{_num(wf['tenth_rates'][0], 0)} / {_num(wf['tenth_rates'][-1], 0)} |",
                  f"| network conflicts | {co['network_conflicts']} | "
                  f"{wf['network_conflicts']} |", "",
                  "Clones/s in each tenth of the clones, by completion:", "",
                  "| run | " + " | ".join(str(i) for i in range(1, 11)) + " |",
                  "| --- |" + " ---: |" * 10,
                  "| clone phase only | " + " | ".join(_num(r, 0) for r in co["tenth_rates"])
                  + " |",
                  "| full workflow | " + " | ".join(_num(r, 0) for r in wf["tenth_rates"])
                  + " |", "", _steady_note(co["tenth_rates"]), "",
                  _workflow_note(wf["tenth_rates"]), "",
                  "Clone phase only leaves each clone's NIC connected with its source's MAC, "
                  "so every clone is a network conflict there: that is what the workflow "
                  "exists to prevent.", "",
                  f"![scale]({plots['scale']})", "", f"![latency]({plots['latency']})", ""]
        rows.append(_row("4 peak RSS", sc["peak_rss_mb"], 0, " MB"))
        rows.append(_row("4 client CPU per clone, clone phase only", sc["cpu_ms_per_clone"], 2,
                         " ms"))
        if "workflow_cpu_ms_per_clone" in sc:  # reports written before it was a target
            rows.append(_row("4 client CPU per clone, full workflow",
                             sc["workflow_cpu_ms_per_clone"], 2, " ms"))
        steady = sc["steady_throughput"]  # its value is |ratio - 1|: show the ratio
        rows.append(_row("4 last tenth vs first tenth", steady, 2, bound="within 10%",
                         shown=_num(steady["ratio"])))

    a = results.get("adaptive")
    if a:
        lines += ["## 5. Adaptive limits", "",
                  f"Four hosts whose slots fleet is not told, at time scale {a['time_scale']}: "
                  "clones/s over the clone phase with `limits.per_host` set to the true slot "
                  "count, to `auto`, and left at fleet's default of 8.", "",
                  "| hosts' slots | clones | true | auto | 8 | auto / true |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for label in ("wide", "narrow"):
            topo = a[label]
            r = topo["runs"]
            cell = [(_num(r[k]["clones_per_s"], 1) if k in r else "=true")
                    for k in ("true", "auto", "8")]
            lines.append(f"| {topo['slots']} | {topo['count']} | {' | '.join(cell)} | "
                         f"{_num(topo['auto_vs_true']['value'], 3)} |")
            rows.append(_row(f"5 auto vs true limits, {topo['slots']}-slot hosts",
                             topo["auto_vs_true"], 3))
        lines += ["", f"![adaptive]({plots['adaptive']})", ""]

    r = results.get("reconcile")
    if r:
        section, reconcile_rows = reconcile_section(r)
        lines += section
        rows += reconcile_rows

    pl = results.get("pools")
    if pl:
        section, pool_rows = pools_section(pl, plots.get("pools"))
        lines += section
        rows += pool_rows

    summary = ["## Targets", "", "| figure | measured | target | |", "| --- | ---: | ---: | --- |"]
    summary += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows]
    return "\n".join(header + summary + [""] + lines) + "\n"


RECONCILE_STEPS = (("create", "1 create"), ("rerun", "2 rerun, no change"),
                   ("status", "3 status"), ("scale_down", "4 scale-down"),
                   ("serve_start", "5 serve: start until the fleet shows"),
                   ("serve_idle", "5 serve: idle"))
RECONCILE_TARGETS = (
    ("rerun_cpu_vs_create", "no-op rerun: client CPU / the create's", 3, "x"),
    ("rerun_wall_vs_create", "no-op rerun: wall / the create's", 3, "x"),
    ("status_wall_s", "status: wall", 2, " s"),
    ("idle_serve_cpu_percent", "idle fleet serve: client CPU, % of one core", 2, "%"),
    ("change_reflected_s", "member destroyed in vCenter: shown by /v1/fleets/{name}", 2,
     " s"),
    ("peak_rss_mb", "peak RSS of the client", 0, " MB"),
    ("extra_config_keys", "a member's extraConfig keys (pyVmomi)", 0, ""),
    ("devices", "a member's devices (pyVmomi)", 0, ""),
)


def _reconcile_value(target: dict[str, Any], digits: int, unit: str) -> str:
    if target.get("reflected") is False:
        return f"not within {_num(target['value'], 0)} s"
    return f"{_num(target['value'], digits)}{unit}"


def reconcile_section(r: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, str, str]]]:
    """Section 6 and its rows of the targets table: this commit's figures beside
    today's way's, step by step, then issue 16's targets for both."""
    n, after = r["members"], r["members"] - r["destroyed"]
    sides = [("this commit", r["this_commit"])]
    baseline = r.get("todays_way")
    note = ""
    if "baseline_skipped" in r:
        note = f"Today's way was skipped: {r['baseline_skipped']}"
    elif baseline is not None:
        sides.append((f"today's way (`{r['baseline_commit']}`)", baseline))
        if "error" in baseline:
            note = ("Today's way did not finish; its figures stop at the step that failed:"
                    f"\n\n```\n{baseline['error']}\n```")
    lines = [
        "## 6. Reconcile at scale", "",
        f"One fleet of {n:,} members on 64 hosts (`scale64.toml`), realistic VMs, clone "
        f"phase only (no NIC refresh, no readiness wait), time scale {r['time_scale']}: "
        f"create; the same `fleet provision` again; `fleet status`; `fleet provision "
        f"--count {after}` (destroys {r['destroyed']:,}); `fleet serve` finding the fleet "
        f"under its root folder and holding it idle for {_num(r['idle_s'], 0)} s. This "
        "commit against today's way, the client at "
        f"`{r['baseline_commit']}` taken with `git archive` (every member read with all its "
        "property paths, the service re-scanning its root folder every 30 s), each on a "
        "fresh simulator of this commit; each side's package compiled to bytecode first, "
        "as `pip install` leaves it. Client CPU is user + system of the fleet process "
        "(`wait4`; `/proc` for `fleet serve`), simulator CPU is the simulator process's "
        "over the step (`/proc`), on the wire is the SOAP request and response bodies the "
        "simulator carried (MB = 10^6 bytes)."
        + (f" The spec's `timeouts.call_s` is {_num(r['call_s'], 0)} s on both sides: with "
           "the default 60 s, today's way's rerun failed, its listing of every member "
           "whole took longer." if r.get("call_s") else ""), ""]
    if note:
        lines += [note, ""]
    lines += ["| step | client | wall (s) | client CPU (s) | simulator CPU (s) | "
              "on the wire (MB) | client peak RSS (MB) |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, label in RECONCILE_STEPS:
        for side, figures in sides:
            if key not in figures:
                continue
            f = figures[key]
            lines.append(f"| {label} | {side} | {_num(f['wall_s'])} | "
                         f"{_num(f['client_cpu_s'])} | {_num(f['sim_cpu_s'])} | "
                         f"{_num(f['wire_bytes'] / 1e6, 1)} | {_num(f['peak_rss_mb'], 0)} |")
    lines.append("")
    for side, figures in sides:
        if "external_change" not in figures:
            continue
        change = figures["external_change"]
        seen = change["reflected_s"]
        lines.append(
            f"- {side}: idle `fleet serve` used {_num(figures['serve_idle']['client_cpu_percent'])}"
            "% of one core; a member powered off and destroyed by pyVmomi was "
            + (f"gone from `/v1/fleets/{{name}}` {_num(seen)} s after its destroy task ended"
               if seen is not None else
               f"still shown by `/v1/fleets/{{name}}` {_num(change['bound_s'], 0)} s after "
               "its destroy task ended")
            + " (polled every 50 ms).")
    shape = r["this_commit"]["shape"]
    value = shape["keyed_value"]
    lines += ["", f"A member as stock pyVmomi reads it from the simulator (`{shape['vm']}`, "
              f"guest `{shape['guest_id']}`): {shape['extra_config_keys']} `extraConfig` keys "
              f"and {shape['devices']} devices; the keyed path `{shape['keyed_path']}` "
              + (f"answered `{value}`." if value is not None else "answered nothing."), "",
              "| issue 16: done when | target | this commit | | today's way |",
              "| --- | ---: | ---: | --- | ---: |"]
    targets = r["targets"]
    theirs = r.get("todays_way_targets", {})
    rows = []
    for key, label, digits, unit in RECONCILE_TARGETS:
        t = targets.get(key)
        if t is None:
            continue
        b = theirs.get(key)
        bound = f"{t['op']} {t['bound']:g}{unit}"
        lines.append(f"| {label} | {bound} | {_reconcile_value(t, digits, unit)} | {_met(t)} | "
                     + (f"{_reconcile_value(b, digits, unit)} |" if b else "— |"))
        rows.append(_row(f"6 reconcile: {label}", t, digits, unit,
                         shown=_reconcile_value(t, digits, unit)))
    return [*lines, ""], rows


def write(results: dict[str, Any], phase_values: dict[str, list[float]] | None,
          out_dir: Path, stem: str, *, plot: bool = True) -> Path:
    """Plots into ``out_dir/stem/``, the Markdown as ``out_dir/stem.md``. Without
    ``plot`` the PNGs already there are linked (re-rendering the text only)."""
    plot_dir = out_dir / stem
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    if not plot:
        plots = {png.stem: f"{stem}/{png.name}" for png in sorted(plot_dir.glob("*.png"))}
        path = out_dir / f"{stem}.md"
        path.write_text(markdown(results, plots))
        return path
    makers = {"throughput": ("burst", plot_throughput), "in_flight": ("burst", plot_in_flight),
              "chains": ("chains", plot_chains), "scale": ("scale", plot_scale),
              "adaptive": ("adaptive", plot_adaptive), "pools": ("pools", plot_pools)}
    done = {k for k, v in results.items() if not (isinstance(v, dict) and "error" in v)}
    for name, (needs, maker) in makers.items():
        if needs in done:
            plots[name] = f"{stem}/{maker(results, plot_dir)}"
    if phase_values:
        plots["latency"] = f"{stem}/" + plot_latency(
            phase_values, plot_dir, results["scale"]["time_scale"])
    path = out_dir / f"{stem}.md"
    path.write_text(markdown(results, plots))
    return path


POOL_TARGETS = (
    ("idle_within_50ms", "leases with an idle member: answered within 50 ms, service side", 3,
     ""),
    ("waited_p99_vs_refill_p99", "leases that waited: p99 wait / least the refills' p99 "
     "can be", 2, "x"),
    ("waited_max_vs_refill_max", "leases that waited: longest wait / least the longest "
     "refill can be", 2, "x"),
    ("refills_vs_capacity", "refills/s while leases outrun them / slot capacity", 3, ""),
    ("refused", "lease requests refused (or not answered)", 0, ""),
)


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else _num(1000 * seconds, 1)


def _s(seconds: float | None) -> str:
    return "—" if seconds is None else _num(seconds, 2)


def _bucket(figures: dict[str, Any], which: str) -> str:
    """A histogram bucket as the interval holding a value: (above, at most]."""
    above, le = figures.get(f"{which}_above_s"), figures.get(f"{which}_le_s")
    if above is None or le is None:
        return "—"
    return f"({above:g}, {le:g}]"


def _contention_note(seg: dict[str, Any], label: str) -> str:
    """What the scheduler figures say about who set the pace in a segment."""
    cpu = seg["cpu"]
    ran, queued = cpu["service_loop_ran_percent"], cpu["service_loop_runqueue_percent"]
    words = (f"{label}, the service's event loop ran {_num(ran, 0)}% of the time and waited "
             f"{_num(queued, 0)}% for a CPU while runnable (the simulator's "
             f"{_num(cpu['sim_loop_ran_percent'], 0)}% and "
             f"{_num(cpu['sim_loop_runqueue_percent'], 0)}%), with all CPUs "
             f"{_num(cpu['machine_busy_percent'], 0)}% busy")
    if queued > ran:
        words += ("; it waited for a CPU longer than it ran: the machine's other work, not "
                  "the service's own, set its pace.")
    elif ran > 80:
        words += "; the loop itself was nearly saturated."
    else:
        words += "."
    return words + " "


def pools_section(pl: dict[str, Any], plot: str | None
                  ) -> tuple[list[str], list[tuple[str, str, str, str]]]:
    """Section 7 and its rows of the targets table."""
    out, st = pl["outrun"], pl["steady"]
    segments = (out, st)
    window = out.get("window")

    def cells(get: Any) -> str:
        return " | ".join(get(seg) for seg in segments)

    def refused(seg: dict[str, Any]) -> str:
        return ", ".join([f"{n} {why}" for why, n in seg["refused"].items()]
                         + [f"{n} without an answer ({why})"
                            for why, n in seg["failed"].items()]) or "0"

    lines = [
        "## 7. Warm pools", "",
        f"`fleet serve` with one pool (`ready = {pl['ready']}`, `max = {pl['max']}`) of the "
        f"default topology's {pl['hosts']} hosts ({pl['host_slots']} host slots), full "
        f"workflow (clone, guest NIC refresh, reconnect, guest IP), time scale "
        f"{pl['time_scale']}. The service's `[limits] per_host = {pl['per_host']}` lets "
        f"{pl['per_host'] * pl['hosts']} refill clones run at once: the slot capacity is "
        f"{pl['per_host'] * pl['hosts']} / {_num(pl['mean_clone_task_s'], 3)} s (mean clone "
        f"task, the simulator's records of the run) = {_num(pl['slot_capacity_per_s'], 1)} "
        f"refills/s against the first segment's {out['rate_per_s']:g} requests/s "
        f"(with the default limits the host slots would allow about "
        f"{_num(pl['host_slots'] / pl['mean_clone_task_s'], 0)} clones/s, "
        f"{_num(pl['host_slots'] / pl['mean_clone_task_s'] / out['rate_per_s'], 1)}x the "
        "requests" + (", and leases would not outrun refills). "
                      if pl["host_slots"] / pl["mean_clone_task_s"] > out["rate_per_s"]
                      else "). ")
        + "The client sends each request at its scheduled time (open loop, asyncio and "
        f"aiohttp), with `wait_s = {pl['wait_s']:g}`, and returns each lease a random "
        f"{pl['hold_s'][0]:g}-{pl['hold_s'][1]:g} s after its grant. Client-side wait is "
        "request sent to 201 read, and a lease answered later than 50 ms counts as one "
        "that waited (for a refill, in the first segment); service-side is "
        "`fleet_lease_wait_seconds` (request "
        "arrival to answer) and `fleet_pool_refill_seconds` (refill clone queued to "
        "member idle), their buckets differenced between scrapes at each segment's start "
        "and end, quantiles estimated as Prometheus' `histogram_quantile` does. The "
        f"steady segment starts once the pool is back at {pl['ready']} idle members; "
        f"its lowest sampled idle count (every second) is {st['min_idle_sampled']}"
        + (", so each of its leases had an idle member and its service-side waits are "
           "those of such leases." if (st["min_idle_sampled"] or 0) > 0 else
           ": some of its leases may have waited for a refill, and its service-side waits "
           "are not those of leases with an idle member alone."), "",
        "| | leases outrun refills | steady |", "| --- | ---: | ---: |",
        "| requests, requests/s | " + cells(lambda g: f"{g['requests']}, "
                                            f"{g['rate_per_s']:g}") + " |",
        "| granted; refused | " + cells(lambda g: f"{g['granted']}; {refused(g)}") + " |",
        "| client wait p50 / p99 / max (ms) | " + cells(
            lambda g: " / ".join(_ms(g["client_wait"][k]) for k in ("p50_s", "p99_s", "max_s")))
        + " |",
        "| answered within 50 ms, client side: leases; p99 (ms) | " + cells(
            lambda g: f"{g['client_wait_at_once']['count']}; "
                      f"{_ms(g['client_wait_at_once']['p99_s'])}") + " |",
        "| longer, client side (outrun: leases that waited): leases; p50 / p99 / max (s) | "
        + cells(
            lambda g: f"{g['client_wait_waited']['count']}; " + " / ".join(
                _s(g["client_wait_waited"][k]) if g["client_wait_waited"]["count"] else "—"
                for k in ("p50_s", "p99_s", "max_s"))) + " |",
        "| service side: fraction within 50 ms | " + cells(
            lambda g: _num(g["service_wait"]["fraction_within"] or 0.0, 3)) + " |",
        "| service side: p50 / p99, estimated (ms); p99 in bucket (s) | " + cells(
            lambda g: f"{_ms(g['service_wait']['p50_s'])} / {_ms(g['service_wait']['p99_s'])}; "
                      f"{_bucket(g['service_wait'], 'p99')}") + " |",
        "| refills: count; p50 / p99 estimated (s); p99, longest in buckets (s) | " + cells(
            lambda g: f"{g['refill']['count']}; {_s(g['refill']['p50_s'])} / "
                      f"{_s(g['refill']['p99_s'])}; {_bucket(g['refill'], 'p99')}, "
                      f"{_bucket(g['refill'], 'max')}") + " |",
        "| lowest idle; most requests waiting; most members (sampled) | " + cells(
            lambda g: f"{g['min_idle_sampled']}; {g['peak_waiting_sampled']}; "
                      f"{g['peak_members_sampled']}") + " |",
        "| request sent after its scheduled time: p99 (ms) | " + cells(
            lambda g: _ms(g["send_lag"]["p99_s"])) + " |",
        "| return (DELETE) p99 (ms); returns failed | " + cells(
            lambda g: f"{_ms(g['return_latency']['p99_s'])}; {g['returns_failed']}") + " |",
        "| CPU, % of one core: service / simulator / client | " + cells(
            lambda g: " / ".join(_num(g["cpu"][f"{k}_cpu_percent"], 0)
                                 for k in ("service", "sim", "client"))) + " |",
        "| main thread (event loop) ran / waited for a CPU, % of the time: service; "
        "simulator; client | " + cells(
            lambda g: "; ".join(f"{_num(g['cpu'][f'{k}_loop_ran_percent'], 0)} / "
                                f"{_num(g['cpu'][f'{k}_loop_runqueue_percent'], 0)}"
                                for k in ("service", "sim", "client"))) + " |",
        "| `GET /healthz` every 0.1 s: p50 / p99 / max (ms) | " + cells(
            lambda g: " / ".join(_ms(g["healthz"][k]) for k in ("p50_s", "p99_s", "max_s")))
        + " |",
        "| machine: all CPUs busy; 1-min load at start, end | " + cells(
            lambda g: f"{_num(g['cpu']['machine_busy_percent'], 0)}%; "
                      + ", ".join(_num(x, 1) for x in g["cpu"]["loadavg_1m"])) + " |",
        ""]
    if window:
        lines += [
            f"Leases outran refills (no idle member, requests waiting) from "
            f"{_num(window['start_s'], 1)} s to {_num(window['end_s'], 1)} s "
            f"({_num(window['duration_s'], 1)} s, up to {window['peak_waiting']} requests "
            f"waiting): the service counted {window['refills']:.0f} refills, "
            f"{_num(window['refills_per_s'], 2)}/s, against the slot capacity's "
            f"{_num(pl['slot_capacity_per_s'], 2)}/s. A lease that waited took at most "
            f"{_s(out['client_wait_waited']['max_s'])} s (p99 "
            f"{_s(out['client_wait_waited']['p99_s'])} s) client side; the refills' "
            f"histogram over the segment puts its p99 in {_bucket(out['refill'], 'p99')} s "
            f"(about {_s(out['refill']['p99_s'])} s) and the longest refill in "
            f"{_bucket(out['refill'], 'max')} s; the targets compare the waits with the "
            "lower ends of those buckets, the least the histogram shows the refills took. "
            "In the engine's view "
            f"over the same span (`fleet_clones_in_flight`, "
            f"`fleet_clone_phase_duration_seconds`): {_num(window['mean_in_flight'], 1)} "
            f"clones at vCenter on average, each {_s(window['mean_clone_phase_s'])} s from "
            "hand-over to seen done, against the simulator's "
            f"{_num(pl['mean_clone_task_s'], 2)} s task; "
            f"{_num(window['clones_made_per_s'], 2)} clones made/s.", ""]
    else:
        lines += ["Leases never outran refills in the first segment (no two samples with "
                  "no idle member and requests waiting): its refill rate is not measured.",
                  ""]
    handlers = pl.get("api_handler_mean_ms") or {}
    shown = [(route, handlers[route]) for route in
             ("/v1/pools/{pool}/leases", "/v1/leases/{lease}", "/metrics", "/healthz")
             if route in handlers]
    if shown:
        lines += ["Mean handler time over the run, the service's own "
                  "`fleet_api_request_duration_seconds` (a lease's includes its wait): "
                  + ", ".join(f"`{route}` {_num(ms)} ms" for route, ms in shown) + ".", ""]
    lines += [_contention_note(seg, label) for seg, label in
              ((out, "While leases outran refills"), (st, "In the steady segment"))]
    lines.append("")
    if plot:
        lines += [f"![pools]({plot})", ""]
    rows = []
    targets = pl["targets"]
    for key, label, digits, unit in POOL_TARGETS:
        t = targets.get(key)
        if t is not None:
            rows.append(_row(f"7 pools: {label}", t, digits, unit))
    return lines, rows
