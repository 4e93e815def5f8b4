"""One Ray Serve application (2 engine replicas, small KV caches) shared by the tests of this folder.

Without `ray` installed the folder is skipped, except in CI (env CI set), where that is a failure.
The server runs in its own session so that a signal meant for it never reaches its Ray processes;
at the end it gets SIGTERM (it deletes the application and stops its Ray), then anything of its
session that is left is killed."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False
    if os.environ.get("CI"):
        raise
    collect_ignore_glob = ["test_*.py"]

from tests.server.conftest import Server, free_port

API_KEY = "ray-test-key"


class RayServer(Server):
    def replica_pids(self) -> list[int]:
        """The engine replicas' processes (of this server's session)."""
        pids = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmdline = f.read()
                if cmdline.startswith(b"ray::ServeReplica:lenserve:EngineReplica") and os.getsid(int(name)) == self.proc.pid:
                    pids.append(int(name))
            except (OSError, ProcessLookupError):
                continue
        return pids


def _session_pids(sid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    out.append(int(name))
            except (OSError, ProcessLookupError):
                pass
    return out


@contextlib.contextmanager
def start_ray_server(tmp_path_factory, *args: str, replicas: int = 2):
    port = free_port()
    log_path = str(tmp_path_factory.mktemp("ray_server") / "server.log")
    cmd = [sys.executable, "-m", "lenserve.cli", "serve", "--replicas", str(replicas), "--port", str(port),
           "--kv-cache-memory-gb", "0.1", "--max-model-len", "512", "--predictor", "none", "--api-key", API_KEY,
           "--shutdown-grace-s", "5", *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    server = RayServer(proc, port, log_path, API_KEY)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-5000:]}")
            try:
                if httpx.get(server.url + "/health", timeout=5).status_code == 200 and len(server.replica_pids()) == replicas:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not come up:\n{server.log()[-5000:]}")
            time.sleep(1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 20
        while _session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _session_pids(proc.pid):  # nothing of this server may outlive the tests
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def ray_server(tmp_path_factory):
    with start_ray_server(tmp_path_factory, "--router", "least-work", "--session-affinity") as s:
        yield s
