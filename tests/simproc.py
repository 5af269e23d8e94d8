"""Run ``fleet sim`` as a real server process for tests and benchmarks.

The simulator is started exactly as a user would start it (``python -m fleet
sim``) on a free loopback port; ``url`` is its SOAP endpoint. The control API
(``/_sim/...``) is reached with plain urllib so tests need no client of ours.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

USER = "administrator@vsphere.local"
PASSWORD = "fleet-sim"


class SimProcess:
    def __init__(self, *, topology: str | Path | None = None, topology_text: str | None = None,
                 http: bool = False, time_scale: float = 0.05,
                 extra_args: tuple[str, ...] = ()) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fleet-sim-")
        self.cert_path = Path(self._tmp.name) / "sim-cert.pem"
        if topology_text is not None:
            topology = Path(self._tmp.name) / "topology.toml"
            topology.write_text(textwrap.dedent(topology_text))
        self._args = ["--time-scale", str(time_scale), *extra_args]
        if topology is not None:
            self._args += ["--topology", str(topology)]
        if http:
            self._args.append("--http")
        else:
            self._args += ["--write-cert", str(self.cert_path)]
        self.stderr_lines: list[str] = []
        self._start("127.0.0.1:0")
        self.url = self._listening.split("listening on ", 1)[1].strip()
        self.base_url = self.url.rsplit("/sdk", 1)[0]
        self.host = "127.0.0.1"
        self.port = int(self.base_url.rsplit(":", 1)[1])
        self.http = http
        self.thumbprint = self._wait_thumbprint() if not http else None
        self._opener = self._make_opener()

    def _start(self, listen: str) -> None:
        args = [sys.executable, "-m", "fleet", "sim", "--listen", listen, *self._args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self._stderr_thread = threading.Thread(target=self._drain_stderr, args=(self.proc,),
                                               daemon=True)
        self._stderr_thread.start()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            self.proc.wait()
            self._stderr_thread.join(timeout=5)
            raise RuntimeError(f"fleet sim did not start: {line!r} {''.join(self.stderr_lines)}")
        self._listening = line

    def restart(self) -> None:
        """Stop the simulator and start a fresh one on the same port: vCenter lost its
        state (sessions, tasks, every object made since it started). Plain http only:
        a restarted https simulator would serve a new certificate."""
        if not self.http:
            raise RuntimeError("restart() needs a simulator started with http=True")
        self._stop()
        self._start(f"127.0.0.1:{self.port}")

    def _drain_stderr(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.stderr_lines.append(line)

    def _wait_thumbprint(self) -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for line in self.stderr_lines:
                m = re.search(r"thumbprint ([0-9A-F:]+)", line)
                if m:
                    return m.group(1)
            time.sleep(0.01)
        raise RuntimeError("no thumbprint printed")

    def _make_opener(self) -> urllib.request.OpenerDirector:
        import ssl

        if self.http:
            return urllib.request.build_opener()
        ctx = ssl.create_default_context(cafile=str(self.cert_path))
        return urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))

    # -- control API -----------------------------------------------------------
    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with self._opener.open(req, timeout=30) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/_sim/stats")  # type: ignore[no-any-return]

    def add_faults(self, *rules: dict[str, Any]) -> Any:
        return self._call("POST", "/_sim/faults", list(rules))

    def clear_faults(self) -> Any:
        return self._call("DELETE", "/_sim/faults")

    def expire_sessions(self) -> int:
        return int(self._call("POST", "/_sim/sessions/expire", {})["expired"])

    def set_host(self, name: str, state: str) -> Any:
        return self._call("POST", f"/_sim/hosts/{name}", {"connection_state": state})

    def set_vm(self, name: str, **fields: Any) -> Any:
        return self._call("POST", f"/_sim/vms/{name}", fields)

    def set_updates(self, **fields: Any) -> Any:
        """How the update stream fails: ``withhold_initial``, ``drop_fraction``."""
        return self._call("POST", "/_sim/updates", fields)

    def close(self) -> None:
        self._stop()
        self._tmp.cleanup()

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr_thread.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
