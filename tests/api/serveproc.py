"""Run ``fleet serve`` as a real server process for tests and benchmarks.

The service is started as a user would start it (``python -m fleet serve
--config FILE --listen 127.0.0.1:0``) with a config written from a dict; the
token is passed through the environment. :meth:`ServeProcess.call` speaks
plain ``http.client`` so tests control every byte (methods, headers, bodies).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.simproc import PASSWORD, USER, SimProcess
from tests.specs import FROZEN, GUEST_PASSWORD, to_toml

__all__ = ["FROZEN", "GUEST_PASSWORD", "TOKEN", "ServeProcess", "service_config", "to_toml"]

TOKEN = "test-token-0123456789abcdef"
_WITH_NOFILE = ("import os, resource, sys; n = int(sys.argv[1]); "
                "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
                "os.execv(sys.argv[2], sys.argv[2:])")


def service_config(sim: SimProcess, state_dir: str | Path, **over: Any) -> dict[str, Any]:
    """A service config for a test simulator: fast timeouts, small scan interval."""
    config: dict[str, Any] = {
        "root_folder": "fleet",
        "state_dir": str(state_dir),
        "scan_interval_s": 1.0,
        "shutdown_grace_s": 5.0,
        "vcenter": {"url": sim.url, "user": USER, "password_env": "SIM_PASSWORD",
                    "thumbprint": sim.thumbprint},
        "api": {"token_env": "FLEET_API_TOKEN", "max_body_bytes": 65536},
        "limits": {"in_flight": 64},
        "defaults": {
            "sources": FROZEN,
            "network": {"guest_user": "root", "guest_password_env": "GUEST_PASSWORD"},
            "retries": {"backoff_base_s": 0.02, "backoff_max_s": 0.2},
            "timeouts": {"cancel_grace_s": 2.0, "cleanup_s": 10.0, "call_s": 10.0},
        },
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


class ServeProcess:
    def __init__(self, config: dict[str, Any], *, token: str = TOKEN,
                 env: dict[str, str] | None = None, start_timeout_s: float = 30.0,
                 nofile: int | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fleet-serve-test-")
        self.config_path = Path(self._tmp.name) / "serve.toml"
        self.config_path.write_text(to_toml(config))
        self.token = token
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", FLEET_API_TOKEN=token,
                        SIM_PASSWORD=PASSWORD, GUEST_PASSWORD=GUEST_PASSWORD, **(env or {}))
        args = [sys.executable, "-m", "fleet", "serve", "--config", str(self.config_path),
                "--listen", "127.0.0.1:0"]
        if nofile is not None:
            # Soft and hard: the service cannot raise it. Set in the child before exec
            # (not by preexec_fn, which is unsafe in a process with threads).
            args = [sys.executable, "-c", _WITH_NOFILE, str(nofile), *args]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=full_env)
        self.stderr_lines: list[str] = []
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()
        assert self.proc.stdout is not None
        line = self._readline(start_timeout_s)
        if not line.startswith("listening on "):
            self.kill()
            raise RuntimeError(f"fleet serve did not start: {line!r}\n"
                               + "".join(self.stderr_lines[-30:]))
        self.url = line.split("listening on ", 1)[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1])

    def _readline(self, timeout_s: float) -> str:
        box: list[str] = []
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        reader = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        return box[0] if box else ""

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    # -- HTTP ---------------------------------------------------------------------
    def raw(self, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout_s: float = 30.0
            ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def call(self, method: str, path: str, body: Any = None, *, token: str | bool | None = True,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """JSON in, (status, JSON or text out). ``token``: True = the right one."""
        hdrs = dict(headers or {})
        if token is True:
            hdrs["Authorization"] = f"Bearer {self.token}"
        elif isinstance(token, str):
            hdrs["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        status, resp_headers, raw = self.raw(method, path, data, hdrs)
        if resp_headers.get("content-type", "").startswith("application/json"):
            return status, json.loads(raw)
        return status, raw.decode("utf-8", "replace")

    def fleet(self, name: str) -> dict[str, Any]:
        status, body = self.call("GET", f"/v1/fleets/{name}?limit=100000")
        assert status == 200, (status, body)
        return body  # type: ignore[no-any-return]

    def wait_for(self, name: str, statuses: tuple[str, ...] = ("ready",),
                 timeout_s: float = 30.0) -> dict[str, Any]:
        """Poll a fleet until its status is one of ``statuses`` (or it is gone: "gone")."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            status, body = self.call("GET", f"/v1/fleets/{name}?limit=100000")
            if status == 404 and "gone" in statuses:
                return {"status": "gone"}
            if status == 200 and body["status"] in statuses:
                return body  # type: ignore[no-any-return]
            last = (status, body if status != 200 else
                    {k: body[k] for k in ("status", "by_state", "error")})
            time.sleep(0.05)
        raise AssertionError(f"fleet {name} not {statuses} after {timeout_s}s: {last}\n"
                             + "".join(self.stderr_lines[-20:]))

    def progress(self, names: tuple[str, ...], done: Callable[[dict[str, Any]], bool], *,
                 stall_s: float) -> dict[str, dict[str, Any]]:
        """Poll fleets ``names`` until ``done({name: body})`` holds; fail only if their ready
        members stop increasing (and nothing is done) for ``stall_s``.

        A build on a loaded machine takes what the machine gives it; what it must never
        do is stop. The wait is bounded all the same: the ready count only grows, up to
        the fleets' sizes, so it ends within (members + 1) * ``stall_s``."""
        best = -1
        since = time.monotonic()
        last: dict[str, Any] = {}
        while True:
            bodies: dict[str, Any] = {}
            for name in names:
                status, body = self.call("GET", f"/v1/fleets/{name}?limit=100000")
                bodies[name] = body if status == 200 else {"status": "gone", "http": status}
            if done(bodies):
                return bodies
            ready = sum(b.get("by_state", {}).get("ready", 0) for b in bodies.values())
            if ready > best:
                best, since = ready, time.monotonic()
            last = {n: {k: b.get(k) for k in ("status", "by_state", "error")}
                    for n, b in bodies.items()}
            if time.monotonic() - since > stall_s:
                raise AssertionError(f"fleets {names}: no member became ready for {stall_s}s "
                                     f"and not done: {last}\n"
                                     + "".join(self.stderr_lines[-20:]))
            time.sleep(0.05)

    # -- lifecycle -----------------------------------------------------------------
    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self._close()

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self._close()

    def _close(self) -> int:
        self._stderr_thread.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        self._tmp.cleanup()
        return int(self.proc.returncode)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
