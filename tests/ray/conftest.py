"""One Ray Serve application (2 engine replicas, small KV caches) shared by the tests of this folder.

Without `ray` installed the folder is skipped, except in CI (env CI set), where that is a failure.
The server runs in its own session so that a signal meant for it never reaches its Ray processes;
at the end it gets SIGTERM (it deletes the application and stops its Ray), then anything of its
session that is left is killed."""
import contextlib
import os
import sys

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

from tests.server.conftest import Server, free_port, launch_server

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

    def serving_replicas(self) -> set[str]:
        """Replicas that have finished starting (each pushes its metrics once its engine is up)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {s.labels["replica"] for f in text_string_to_metric_families(text) if f.name == "lenserve:num_requests_running"
                for s in f.samples if s.labels.get("replica")}


@contextlib.contextmanager
def start_ray_server(tmp_path_factory, *args: str, replicas: int = 2):
    port = free_port()
    log_path = str(tmp_path_factory.mktemp("ray_server") / "server.log")
    cmd = [sys.executable, "-m", "lenserve.cli", "serve", "--replicas", str(replicas), "--port", str(port),
           "--kv-cache-memory-gb", "0.1", "--max-model-len", "512", "--predictor", "none", "--api-key", API_KEY,
           "--shutdown-grace-s", "5", *args]
    with launch_server(cmd, log_path, port, server_cls=RayServer, api_key=API_KEY, timeout_s=240,
                       ready=lambda s: len(s.replica_pids()) == replicas and len(s.serving_replicas()) == replicas, env={"RAY_USAGE_STATS_ENABLED": "0"},
                       expect_exit_code=None) as server:
        yield server


@pytest.fixture(scope="session")
def ray_server(tmp_path_factory):
    with start_ray_server(tmp_path_factory, "--router", "least-work", "--session-affinity") as s:
        yield s
