"""A server subprocess for tools, benchmarks and tests: started in its own session, waited on until
/health answers, and stopped so that nothing of it outlives the caller.

Stopping sends SIGTERM to the server alone (a lenserve server drains its requests on it, and a Ray
driver shuts its deployments down in order), kills its process group after `stop_timeout_s`, then
kills whatever is still left of its session after `sweep_grace_s` (Ray's raylet and workers leave
the process group but not the session).
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """The live processes of session `sid` (zombies, dead but not yet reaped, are left out)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
                if fields[0] != "Z" and int(fields[3]) == sid:
                    out.append(int(name))
    return out


def _wait_gone(sid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.1)


class ServerProcess:
    """`argv` serving on `url`, its output in `log_path`; a context manager that starts and stops it."""

    def __init__(self, argv: list[str], log_path: str | Path, url: str, *, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, stop_timeout_s: float = 60.0, sweep_grace_s: float = 20.0) -> None:
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.url = url.rstrip("/")
        self.env = env
        self.cwd = cwd
        self.stop_timeout_s = stop_timeout_s
        self.sweep_grace_s = sweep_grace_s  # how long the rest of the session gets to exit on its own
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None

    def __enter__(self) -> ServerProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})},
            )
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_healthy(self, timeout_s: float, ready: Callable[[], bool] | None = None) -> None:
        """Returns once GET /health answers 200 and `ready()` holds; raises RuntimeError (with the
        log's tail) if the server exits first or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode} before it was healthy: {self._where()}{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=5.0).status_code == 200 and (ready is None or ready()):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy after {timeout_s:.0f} s: {self._where()}{self.log_tail()}")
            time.sleep(0.3)

    def stop(self) -> int | None:
        """Stops the server (see the module's docstring); returns its exit code (negative: the
        signal that killed it). Calling it again does nothing more."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.exit_code = proc.returncode
        _wait_gone(proc.pid, self.sweep_grace_s)
        for pid in session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(proc.pid, 5.0)
        return self.exit_code

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, num_lines: int = 15) -> str:
        lines = self.log().splitlines()[-num_lines:]
        return ("\n--- server log tail ---\n" + "\n".join(lines)) if lines else ""

    def _where(self) -> str:
        return f"{shlex.join(self.argv)} (log: {self.log_path})"
