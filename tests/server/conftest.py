import contextlib
import subprocess
import sys

import httpx
import pytest

from lenserve.server.process import ServerProcess, free_port  # noqa: F401 (free_port: the tests' import)


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


@contextlib.contextmanager
def launch_server(cmd: list[str], log_path: str, port: int, *, server_cls=None, api_key: str | None = None,
                  ready=None, timeout_s: float = 180, env: dict | None = None, expect_exit_code: int | None = 0):
    """Runs `cmd` (a server on 127.0.0.1:port) as a ServerProcess, yields a Server once /health
    answers 200 and `ready(server)` holds, then stops it: SIGTERM, kill after 60 s, and whatever is
    left of its session (Ray's processes) is killed. A server the test did not stop itself must exit
    with `expect_exit_code`."""
    with ServerProcess(cmd, log_path, f"http://127.0.0.1:{port}", env=env) as proc:
        server = (server_cls or Server)(proc.proc, port, log_path, api_key)
        proc.wait_healthy(timeout_s, ready=None if ready is None else lambda: ready(server))
        yield server
        running = proc.proc.poll() is None
        code = proc.stop()
        if running and expect_exit_code is not None:
            assert code == expect_exit_code, server.log()[-3000:]


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
