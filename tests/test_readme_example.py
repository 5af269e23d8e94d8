"""The README's Python example runs as written: taken from README.md and run as a script,
with no vCenter named, so on the built-in simulator it starts (docs/python-api.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from fleet.engine.connection import CONNECTION_VARS

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- the example run by tests/test_readme_example.py -->"


def example() -> str:
    text = README.read_text()
    assert MARK in text, "the README lost its Python example's marker"
    block = re.search(r"```python\n(.*?)```", text[text.index(MARK):], re.S)
    assert block is not None
    return block.group(1)


def test_the_readme_python_example_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "loadtest.py"
    script.write_text(example())
    env = {k: v for k, v in os.environ.items() if k not in CONNECTION_VARS}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    ready = re.fullmatch(r"(\d+) members ready: (.*)", line)
    assert ready is not None, done.stdout
    assert ready.group(1) == "10" and len(set(ready.group(2).split(", "))) == 10
    # said on stderr (the fleet logger), never silently
    assert "built-in simulator" in done.stderr
