"""The engine loads in a thread that exits (engine/cpu_threads.py): its OpenMP workers go with it,
so the thread that steps is the process's only OpenMP team."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from lenserve.engine.cpu_threads import run_in_fresh_thread


def test_run_in_fresh_thread_returns_raises_and_exits():
    seen = []
    assert run_in_fresh_thread(lambda a, b: seen.append(threading.current_thread()) or a + b, 2, 3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(KeyError, match="boom"):
        run_in_fresh_thread(lambda: {}["boom"])


_COUNT = r"""
import os, sys, time
import torch
from lenserve.config import EngineConfig
from lenserve.engine.llm_engine import LLMEngine

def threads():
    return len(os.listdir("/proc/self/task"))

cfg = EngineConfig(num_threads=2, kv_cache_memory_gb=0.05)
if sys.argv[1] == "in_caller":  # what `lenserve serve` did before: load in the calling thread
    eng = LLMEngine.__new__(LLMEngine)
    eng._init(cfg)
else:
    eng = LLMEngine(cfg)
time.sleep(0.5)  # exiting threads leave /proc
print(threads())
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not sys.platform.startswith("linux"), reason="needs 2 cores and /proc")
def test_loading_leaves_no_openmp_workers_behind():
    def count(mode):
        out = subprocess.run([sys.executable, "-c", _COUNT, mode], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.strip().splitlines()[-1])

    # loading in the caller keeps its OpenMP worker (one more thread) for the process's life
    assert count("fresh_thread") < count("in_caller")


_PREDICTOR = r"""
import os, sys, time
from lenserve.engine.cpu_threads import run_in_fresh_thread
import numpy, torch  # noqa: F401  (their own thread pools start at import, before the count)
from lenserve.predictor.model import _import_lightgbm
from lenserve.server.app import _load_predictor

_import_lightgbm()
before = len(os.listdir("/proc/self/task"))
if sys.argv[1] == "in_caller":
    _load_predictor("default")
else:
    run_in_fresh_thread(_load_predictor, "default")  # what the server does (server/app.py, ray_serve.py)
# an exited thread's OpenMP workers leave /proc on their own schedule (slowly on a loaded machine)
deadline = time.monotonic() + 5
while len(os.listdir("/proc/self/task")) > before and time.monotonic() < deadline:
    time.sleep(0.1)
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not sys.platform.startswith("linux"), reason="needs 2 cores and /proc")
def test_predictor_loading_leaves_no_openmp_workers_behind():
    """LightGBM's model loading runs OpenMP work: in the event loop's thread it left a worker (a
    second team beside the engine's, which halved a served model's decode speed on 2 cores)."""
    pytest.importorskip("lightgbm")

    def extra_threads(mode):
        out = subprocess.run([sys.executable, "-c", _PREDICTOR, mode], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.strip().splitlines()[-1])

    assert extra_threads("in_caller") >= 1
    assert extra_threads("fresh_thread") == 0
