"""Replay and locust against a real `lenserve serve` on the embedded model.

In the suite by default (about a minute on a 2-core CPU); LENSERVE_LIVE_TESTS=0 skips them.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lenserve.traces import prompts
from lenserve.server.process import ServerProcess, free_port
from lenserve.traces.replay import ReplayConfig, replay
from lenserve.traces.synth import LengthDist, SynthConfig, synthesize, write_burstgpt_csv

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("LENSERVE_LIVE_TESTS") == "0", reason="live server tests skipped (LENSERVE_LIVE_TESTS=0)"),
]


def small_trace(num_requests: int, rate: float, seed: int):
    return synthesize(
        SynthConfig(
            num_requests=num_requests,
            gamma_shape=1.0,
            gamma_scale=1.0 / rate,
            prompt=LengthDist("lognormal", mu=4.2, sigma=0.5, max_tokens=256),
            output=LengthDist("lognormal", mu=2.5, sigma=0.4, max_tokens=24),
            seed=seed,
        )
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if importlib.util.find_spec("lenserve.server.cli") is None:
        pytest.skip("lenserve.server is not there yet")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "lenserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with ServerProcess(argv, tmp_path_factory.mktemp("server") / "server.log", url) as proc:
        proc.wait_healthy(600)
        yield url


@pytest.mark.timeout(900)
def test_replay_50_requests_against_the_embedded_model(server, tmp_path):
    out = tmp_path / "replay"
    report = replay(small_trace(50, rate=2.0, seed=11), ReplayConfig(url=server, show_progress=False, metrics_interval_s=0.5), out)
    assert report["num_requests"] == 50 and report["num_failed"] == 0, report["failures_by_status"]
    assert report["num_prompt_tokens_mismatched"] == 0  # exact prompts match the server's tokenizer
    for name in ("report.json", "report.md", "latency_cdf.png", "throughput.png", "server_metrics.png"):
        assert (out / name).stat().st_size > 0
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert all(r["output_tokens"] == r["max_tokens"] for r in records)  # ignore_eos
    samples = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(s["num_requests_running"] for s in samples)


@pytest.mark.timeout(900)
def test_locust_headless_against_the_embedded_model(server, tmp_path):
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed")
    trace_path = tmp_path / "trace.csv"
    write_burstgpt_csv(small_trace(12, rate=2.0, seed=12), trace_path)
    env = {**os.environ, "LENSERVE_TRACE": str(trace_path), "LENSERVE_DRAIN_S": "300"}
    locustfile = Path(prompts.__file__).parent / "locustfile.py"
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", server, "--csv", str(tmp_path / "loc"), "--only-summary"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split(",")[1]: line.split(",") for line in (tmp_path / "loc_stats.csv").read_text().splitlines()[1:]}
    assert rows["/v1/completions"][2] == "12" and rows["/v1/completions"][3] == "0"
