"""A real two-node Ray cluster on one machine: a head and a worker, each started by its own `ray start
--block` (a second raylet, as a second machine would run), `lenserve serve --ray-address` with one
engine replica on each node (--max-replicas-per-node 1). Killing every process of the worker node
mid-run fails the requests its replica was serving with a clear replica_died error, later requests
go to the head's replica, and the ingress's books balance.

Each `ray start` runs as a ServerProcess (its own session, tied to the test run by PR_SET_PDEATHSIG
and a watchdog), so nothing of either node outlives the run. Token authentication is off
(RAY_AUTH_MODE=disabled): every port is on 127.0.0.1. Skipped only where a Ray node cannot start."""
import asyncio
import json
import os
import signal
import socket
import sys
import time

import httpx
import pytest

from lenserve.server.process import ServerProcess, free_port, session_pids
from tests.ray.conftest import API_KEY, RayServer
from tests.ray.test_scale_out import _complete, _long_streams_under_way
from tests.server.conftest import launch_server

pytestmark = [
    pytest.mark.timeout(480),
    pytest.mark.skipif(os.environ.get("LENSERVE_RAY_TESTS") == "0", reason="live Ray Serve tests skipped (LENSERVE_RAY_TESTS=0)"),
]

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _node_argv(*extra: str) -> list[str]:
    ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(), "--metrics-export-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port()}
    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
            "--disable-usage-stats", *extra]
    for flag, port in ports.items():
        argv += [flag, str(port)]
    return argv


class RayNode(ServerProcess):
    """A `ray start --block` node; ready when its port answers (the head's GCS) or after it joined."""

    def wait_started(self, timeout_s: float, ready) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.proc.poll() is not None:
                pytest.skip(f"a Ray node could not start (exit {self.proc.returncode}): {self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.skip(f"a Ray node did not start within {timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(0.5)


def _replica_pids_in(sid: int) -> list[int]:
    out = []
    for pid in session_pids(sid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::ServeReplica:lenserve:EngineReplica"):
                    out.append(pid)
        except OSError:
            continue
    return out


def test_killing_the_worker_node_mid_run(tmp_path):
    gcs_port = free_port()
    head_argv = _node_argv("--head", "--port", str(gcs_port), "--include-dashboard", "false", "--ray-client-server-port", str(free_port()),
                           "--resources", '{"node_head": 1}')
    worker_argv = _node_argv("--address", f"127.0.0.1:{gcs_port}", "--resources", '{"node_worker": 1}',
                             "--min-worker-port", str(20000 + gcs_port % 20000), "--max-worker-port", str(20100 + gcs_port % 20000))
    with RayNode(head_argv, tmp_path / "head.log", "http://127.0.0.1", env=RAY_ENV, stop_timeout_s=30, sweep_grace_s=5) as head:
        head.wait_started(120, lambda: _port_open(gcs_port))
        with RayNode(worker_argv, tmp_path / "worker.log", "http://127.0.0.1", env=RAY_ENV, stop_timeout_s=30, sweep_grace_s=5) as worker:
            worker.wait_started(120, lambda: "Ray runtime started" in worker.log())
            port = free_port()
            cmd = [sys.executable, "-m", "lenserve.cli", "serve", "--ray-address", f"127.0.0.1:{gcs_port}", "--replicas", "2",
                   "--max-replicas-per-node", "1", "--port", str(port), "--kv-cache-memory-gb", "0.1", "--max-model-len", "512",
                   "--predictor", "none", "--api-key", API_KEY, "--shutdown-grace-s", "5", "--num-threads", "1"]
            with launch_server(cmd, str(tmp_path / "server.log"), port, server_cls=RayServer, api_key=API_KEY, timeout_s=300,
                               ready=lambda s: len(s.serving_replicas()) == 2, env=RAY_ENV, expect_exit_code=None) as server:
                # one replica in each node's processes
                on_head, on_worker = _replica_pids_in(head.proc.pid), _replica_pids_in(worker.proc.pid)
                assert len(on_head) == 1 and len(on_worker) == 1, (on_head, on_worker)
                _kill_worker_mid_run(server, worker)


async def _stream_or_error(client, body: dict, on_chunk) -> dict:
    """A streamed completion: its replica, text chunks, error (an SSE error event, or the OpenAI
    error body of an answer that is not a stream) and whether [DONE] came."""
    out = {"replica": None, "chunks": 0, "error": None, "done": False, "status": None}
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        out["status"] = r.status_code
        out["replica"] = r.headers.get("x-lenserve-replica")
        if r.status_code != 200:
            await r.aread()
            out["error"] = r.json().get("error")
            return out
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                out["done"] = True
            elif line.startswith("data: {"):
                data = json.loads(line[6:])
                if "error" in data:
                    out["error"] = data["error"]
                else:
                    out["chunks"] += 1
                    on_chunk()
    return out


def _kill_worker_mid_run(server, worker: RayNode) -> None:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as c:
        before = c.get("/books").json()

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=headers) as c:
            streams = await _long_streams_under_way(c, _stream_or_error, 120)
            for pid in session_pids(worker.proc.pid):  # the whole worker node: its raylet, workers, replica
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            t_kill = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*streams), 150)
            ended_s = time.monotonic() - t_kill
            later = await asyncio.gather(*[_complete(c, i, max_tokens=4) for i in range(6)])
            return results, ended_s, later

    results, ended_s, later = asyncio.run(run())
    assert session_pids(worker.proc.pid) == []
    failed = [r for r in results if r["error"] is not None]
    finished = [r for r in results if r["error"] is None]
    assert failed and finished, results
    # a stream the dead replica had begun ends with an SSE error event; one it had not yet answered
    # (its prompt still in prefill on a 1-core replica) gets a 503 body: both say replica_died
    for r in failed:
        assert r["error"]["code"] == "replica_died" and "died" in r["error"]["message"], r
        assert (r["status"] == 200 and r["done"]) or r["status"] == 503, r
    survivors = {r["replica"] for r in finished}
    assert len(survivors) == 1 and all(r["chunks"] == 200 and r["done"] for r in finished), results
    survivor = survivors.pop()
    assert all(r["replica"] != survivor for r in failed), results
    assert ended_s < 120
    assert [r.status_code for r in later] == [200] * 6, [r.text for r in later]
    assert {r.headers["x-lenserve-replica"] for r in later} == {survivor}
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as c:
        after = c.get("/books").json()
    delta = {k: after[k] - before[k] for k in after}
    assert delta["accepted"] == len(results) + len(later)
    assert delta["accepted"] == delta["completed"] + delta["errored"] + delta["aborted"]
    assert delta["errored"] == len(failed) and delta["completed"] == len(finished) + len(later)
