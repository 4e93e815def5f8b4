"""A real Prometheus scrapes /metrics; PromQL over its HTTP API counts the requests we sent."""
import os
import shutil
import subprocess
import time

import httpx
import pytest

from .conftest import free_port

PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(PROMETHEUS is None and not os.environ.get("CI"), reason="Debian package 'prometheus' not installed (.ci/run installs it)")
def test_prometheus_scrapes_request_count(server, tmp_path):
    assert PROMETHEUS, "prometheus must be installed in CI"
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: lenserve\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.port}']\n"
    )
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        query = 'sum(lenserve:request_success_total{job="lenserve"})'
        api = f"http://127.0.0.1:{port}/api/v1/query"

        def value():
            r = httpx.get(api, params={"query": query}, timeout=5)
            if r.status_code != 200:  # 503 "Service Unavailable" while Prometheus starts up
                raise LookupError(f"prometheus answered {r.status_code}")
            res = r.json()["data"]["result"]
            return float(res[0]["value"][1]) if res else None

        with server.client() as c:  # the counter exists before the first scrape
            assert c.post("/v1/completions", json={"prompt": "warm-up", "max_tokens": 1}).status_code == 200
        deadline = time.monotonic() + 60
        baseline = None
        while baseline is None:
            try:
                baseline = value()
            except (httpx.HTTPError, KeyError, LookupError):
                pass
            assert time.monotonic() < deadline, "prometheus did not scrape the server"
            time.sleep(0.5)
        sent = 7
        with server.client() as c:
            for i in range(sent):
                assert c.post("/v1/completions", json={"prompt": f"Number {i}", "max_tokens": 2}).status_code == 200
        deadline = time.monotonic() + 30
        while (value() or 0) < baseline + sent and time.monotonic() < deadline:
            time.sleep(0.5)
        assert value() == baseline + sent
    finally:
        proc.terminate()
        proc.wait(20)
