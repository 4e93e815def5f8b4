import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: str, api_key: str | None = None):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.api_key = api_key

    def client(self, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, timeout=120, headers=headers, **kw)

    def metric(self, name: str) -> float:
        """Sum of a metric's samples on /metrics (0 if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        total, found = 0.0, False
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name:
                    total += s.value
                    found = True
        return total if found else 0.0

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (a server started with start_new_session and its children)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, ProcessLookupError):
                if os.getsid(int(name)) == sid:
                    out.append(int(name))
    return out


@contextlib.contextmanager
def launch_server(cmd: list[str], log_path: str, port: int, *, server_cls=None, api_key: str | None = None,
                  ready=None, timeout_s: float = 180, env: dict | None = None, new_session: bool = False,
                  expect_exit_code: int | None = 0):
    """Runs `cmd` (a server on 127.0.0.1:port), yields a Server once /health answers 200 and
    `ready(server)` holds, then SIGTERMs it (kill after 60 s). With `new_session`, whatever is left of
    its session afterwards (Ray's processes) is killed too."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    server = (server_cls or Server)(proc, port, log_path, api_key)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-5000:]}")
            try:
                if httpx.get(server.url + "/health", timeout=5).status_code == 200 and (ready is None or ready(server)):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not come up:\n{server.log()[-5000:]}")
            time.sleep(0.5)
        yield server
    finally:
        code = proc.poll()
        if code is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if expect_exit_code is not None:
                assert code == expect_exit_code, server.log()[-3000:]
        if new_session:
            deadline = time.monotonic() + 20
            while session_pids(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            for pid in session_pids(proc.pid):  # nothing of this server may outlive the tests
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def start_server(tmp_path_factory, *args: str, api_key: str | None = None, expect_exit_code: int | None = 0):
    port = free_port()
    log_path = str(tmp_path_factory.mktemp("server") / "server.log")
    cmd = [sys.executable, "-m", "lenserve.cli", "serve", "--port", str(port), "--max-model-len", "2048", *args]
    if api_key:
        cmd += ["--api-key", api_key]
    with launch_server(cmd, log_path, port, api_key=api_key, expect_exit_code=expect_exit_code) as server:
        yield server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    with start_server(tmp_path_factory, "--predictor", "none", "--max-num-seqs", "64") as s:
        yield s
