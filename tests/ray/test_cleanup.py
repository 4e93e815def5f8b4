"""A pytest runner killed with SIGKILL while its test holds `lenserve serve --replicas 1` (a Ray
driver, its raylet, GCS, Serve controller, proxy and replica): nothing of it is left afterwards."""
import os
import sys

import pytest

from tests.server.test_process import _alive, _run_pytest_then_kill

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(400),
    pytest.mark.skipif(os.environ.get("LENSERVE_RAY_TESTS") == "0", reason="live Ray Serve tests skipped (LENSERVE_RAY_TESTS=0)"),
]


def test_a_sigkilled_runner_leaves_no_ray_process(tmp_path):
    argv = [sys.executable, "-m", "lenserve.cli", "serve", "--replicas", "1", "--port", "PORT", "--predictor", "none",
            "--max-model-len", "512", "--kv-cache-memory-gb", "0.05", "--shutdown-grace-s", "2"]
    pids, left = _run_pytest_then_kill(tmp_path, argv, 9, grace_s=20.0)
    assert left == [], left
    assert not _alive(pids["server"])
