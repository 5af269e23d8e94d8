"""The ``fleet`` command's own options and output, apart from what the commands do
(issue 14, "CLI papercuts"): ``--log-level`` on either side of the command, shell
completion, tables that are never cut when piped, and every import declared."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from fleet.cli import build_parser
from tests.specs import run_fleet

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["provision", "plan", "status", "inventory", "destroy", "sources", "lease",
            "release", "renew", "pools", "serve", "sim", "completion"]


# -- --log-level ------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "level"), [
    (["--log-level", "debug", "sim"], "debug"),  # was warning: sim's own default won
    (["sim", "--log-level", "info"], "info"),
    (["sim"], "warning"),
    (["provision", "--log-level", "info"], "info"),  # was "unrecognized arguments"
    (["--log-level", "error", "plan"], "error"),
    (["serve", "--config", "x.toml", "--log-level", "debug"], "debug"),
    (["--log-level", "error", "sources", "list", "--log-level", "debug"], "debug"),
    (["--log-level", "debug", "sources", "freeze"], "debug"),
])
def test_log_level_is_taken_before_or_after_the_command(argv: list[str], level: str) -> None:
    assert build_parser().parse_args(argv).log_level == level


def test_a_log_level_after_the_command_reaches_the_logs(tmp_path: Path) -> None:
    """As a user runs it: the level after ``provision`` (and before ``sim``) is the one
    logging gets. Both commands stop at a bad option once their event loop is up,
    which asyncio announces at debug level."""
    after = run_fleet("provision", "--count", "-1", "--log-level", "debug", cwd=str(tmp_path))
    assert after.returncode == 2, after.stderr
    assert "--count: -1 is negative" in after.stderr
    assert "DEBUG asyncio: Using selector" in after.stderr
    before = run_fleet("--log-level", "debug", "sim", "--listen", "no-port",
                       cwd=str(tmp_path))
    assert before.returncode != 0
    assert "--listen: 'no-port' is not HOST:PORT" in before.stderr
    assert "DEBUG asyncio: Using selector" in before.stderr


# -- shell completion -------------------------------------------------------------

def completion_script(shell: str) -> str:
    result = run_fleet("completion", shell)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_bash_completion_completes_commands_options_and_choices(tmp_path: Path) -> None:
    """The script bash loads, then bash itself asking ``fleet`` for completions, as
    it does at a TAB: the commands, a command's options, an option's choices."""
    script = tmp_path / "fleet.bash"
    script.write_text(completion_script("bash"))
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert syntax.returncode == 0, syntax.stderr
    # The installed `fleet` command, beside this interpreter (pip made it).
    bindir = Path(sys.executable).parent
    assert (bindir / "fleet").exists(), f"no fleet command in {bindir}"
    ask = """
source "$1"
complete -p fleet
for line in "fleet " "fleet provision --metrics-" "fleet --log-level " "fleet sources f" \
            "fleet lease --print i"; do
    COMP_LINE="$line"; COMP_POINT=${#line}; COMP_TYPE=9
    _python_argcomplete fleet
    echo "[$line]" "${COMPREPLY[@]}"
done
"""
    run = subprocess.run(["bash", "-c", ask, "bash", str(script)], capture_output=True,
                         text=True, timeout=120, check=False,
                         env={"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    lines = dict(line.split("] ", 1) for line in run.stdout.splitlines() if "] " in line)
    assert "-F _python_argcomplete fleet" in run.stdout
    assert set(lines["[fleet "].split()) >= set(COMMANDS)
    assert set(lines["[fleet provision --metrics-"].split()) == {"--metrics-port",
                                                                 "--metrics-listen"}
    assert lines["[fleet --log-level "].split() == ["debug", "info", "warning", "error"]
    assert lines["[fleet sources f"].split() == ["freeze"]
    assert set(lines["[fleet lease --print i"].split()) == {"id", "ip", "ip_addresses",
                                                            "instance_uuid"}


@pytest.mark.parametrize(("shell", "registers"), [
    ("zsh", "compdef _python_argcomplete fleet"),
    ("fish", "complete --command fleet"),
])
def test_zsh_and_fish_completion_scripts(shell: str, registers: str) -> None:
    script = completion_script(shell)
    assert registers in script
    if shutil.which(shell):  # neither shell is on CI's machine; where one is, it checks
        syntax = subprocess.run([shell, "-n"], input=script, capture_output=True,
                                text=True, timeout=30, check=False)
        assert syntax.returncode == 0, syntax.stderr


def test_completion_names_the_shell_it_does_not_know() -> None:
    result = run_fleet("completion", "tcsh")
    assert result.returncode == 2
    assert "invalid choice: 'tcsh'" in result.stderr


# -- piped tables -----------------------------------------------------------------

def test_plan_table_is_never_cut_when_piped(tmp_path: Path) -> None:
    """Piped, the placement table was fitted to 120 columns: "golden-r…", and headers
    broken over two lines. Every cell is now whole, whatever COLUMNS says."""
    result = run_fleet("plan", "--count", "2", cwd=str(tmp_path), env={"COLUMNS": "60"})
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    table = result.stdout.split("placement", 1)[1]
    for name in ("frozen-01", "frozen-08", "golden-running"):
        assert re.search(rf"│ {name} +│", table), name
    assert re.search(r"┃ source +┃ host +┃ kind +┃ power +┃ chain depth +┃", table)


# -- dependencies -------------------------------------------------------------------

#: third-party modules fleet may import without declaring them: the pytest plugin
#: (an entry point pytest loads only when it runs) imports pytest
UNDECLARED_OK = {"pytest": {"fleet/pytest_plugin.py"}}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_module_fleet_imports_is_a_declared_dependency() -> None:
    """``yarl`` (and ``multidict``) were imported by the transport but reached the
    install only through aiohttp."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_normal(re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0])
                for dep in project["dependencies"]}
    distributions = packages_distributions()
    missing = []
    for path in sorted((ROOT / "fleet").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "fleet" or \
                        rel in UNDECLARED_OK.get(top, ()):
                    continue
                dists = {_normal(d) for d in distributions.get(top, [top])}
                if not dists & declared:
                    missing.append(f"{rel}: {name} ({', '.join(sorted(dists))})")
    assert not missing, missing
