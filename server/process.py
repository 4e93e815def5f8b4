"""A server subprocess for tools, benchmarks and tests: started in its own session, waited on until
/health answers, and stopped so that nothing of it outlives the caller.

Stopping sends SIGTERM to the server alone (a lenserve server drains its requests on it, and a Ray
driver shuts its deployments down in order), kills its process group after `stop_timeout_s`, then
kills whatever is still left of its session after `sweep_grace_s` (Ray's raylet and workers leave
the process group but not the session).

The server never outlives its caller, even one killed with SIGKILL (a test runner, say), which
cannot run `stop`: the server gets SIGTERM when the thread that started it exits
(PR_SET_PDEATHSIG, set between fork and exec), and a watchdog process of its own (`python -m
lenserve.server.process --watch CALLER SESSION GRACE`) waits for the caller to die, gives the
server's session `sweep_grace_s` to exit, then kills what is left of it. `stop` ends the watchdog.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
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


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int, sig: int = signal.SIGTERM):
    """A preexec_fn: the child gets `sig` when the thread that forked it exits (at once if the
    parent is already gone). Linux only; elsewhere the watchdog alone does the job."""

    def preexec() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), sig)

    return preexec


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def watch(caller_pid: int, sid: int, grace_s: float, poll_s: float = 0.2) -> None:
    """The watchdog: once `caller_pid` is gone (or the session is empty), wait up to `grace_s` for
    session `sid` to exit on its own (SIGTERM from PR_SET_PDEATHSIG starts that), then kill the rest."""
    while _pid_alive(caller_pid) and session_pids(sid):
        time.sleep(poll_s)
    if not session_pids(sid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(sid, signal.SIGTERM)  # the session leader is the server (already signalled, unless a thread started it)
    _wait_gone(sid, grace_s)
    for _ in range(3):  # a process may fork while we sweep
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(sid, 2.0)


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
        self.watchdog: subprocess.Popen | None = None
        self.exit_code: int | None = None

    def __enter__(self) -> ServerProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}, preexec_fn=_die_with_parent(os.getpid()),
            )
        # its own session: a signal to the caller's process group does not reach it
        self.watchdog = subprocess.Popen(
            [sys.executable, "-m", "lenserve.server.process", "--watch", str(os.getpid()), str(self.proc.pid), str(self.sweep_grace_s)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
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
        if self.watchdog is not None and self.watchdog.poll() is None:
            self.watchdog.kill()
            self.watchdog.wait()
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


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--watch":
        watch(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        sys.exit("usage: python -m lenserve.server.process --watch CALLER_PID SESSION_ID GRACE_S")
