"""schemathesis against the live server's /openapi.json: every route, >= 1,000 generated cases,
no 5xx, every 4xx an OpenAI error body (the check lives in schemathesis_hooks.py)."""
import glob
import json
import os
import subprocess
import sys

import pytest

from tests.server.conftest import start_server

from .helpers import assert_books_balance, wait_idle

pytest.importorskip("schemathesis")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIN_CASES = 1000
# The seed makes CI runs repeatable; set LENSERVE_FUZZ_SEED to explore other inputs.
SEED = os.environ.get("LENSERVE_FUZZ_SEED", "20251123")


@pytest.mark.slow
def test_schemathesis_every_route(tmp_path_factory):
    # A 48-token context and a 5 s timeout keep the valid generation requests cheap.
    args = ("--predictor", "none", "--max-model-len", "48", "--request-timeout-s", "5", "--max-num-seqs", "16")
    with start_server(tmp_path_factory, *args) as server:
        work = tmp_path_factory.mktemp("schemathesis")
        cmd = [
            sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
            "--checks", "not_a_server_error,openai_error_body",
            "--phases", "coverage,fuzzing",
            "--max-examples", "40",
            "--workers", "4",
            "--request-timeout", "30",  # a hang fails the run
            "--seed", SEED,
            "--generation-database", "none",
            "--no-color",
            "--report", "json", "--report-dir", str(work),
        ]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.reliability.schemathesis_hooks", "PYTHONPATH": REPO}
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=480, check=False)
        output = proc.stdout[-6000:] + proc.stderr[-3000:]
        reports = glob.glob(str(work / "*.json"))
        assert reports, output
        with open(reports[0]) as f:
            report = json.load(f)
        assert proc.returncode == 0, output
        assert report["operations"]["tested"] == report["operations"]["total"] == 8, report["operations"]
        cases = report["test_cases"]
        print(f"schemathesis: {cases} in {report['running_time']:.0f}s")
        assert cases["generated"] >= MIN_CASES and cases["with_failures"] == 0 and cases["errored"] == 0, cases
        assert not report["failures"] and not report["errors"], output

        wait_idle(server)
        assert_books_balance(server)
        assert "Traceback" not in server.log(), server.log()[-3000:]
