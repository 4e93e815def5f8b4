"""One OpenMP team per process: where the engine's parallel CPU work may run.

libgomp (PyTorch's OpenMP on Linux) gives every thread that starts a parallel region a pool of
worker threads that lives as long as that thread. Once the threads it manages outnumber the
CPUs, it stops letting idle workers spin (GOMP_SPINCOUNT drops from 300,000 to 100 spins), so
every parallel region then has to wake its workers from a futex. A decode step starts ~150
regions (every linear, norm, rotary and attention call), and on the 2-core EPYC a batch-1 step
of the embedded model took 13-15 ms when a single thread ever ran parallel work and 27-31 ms
once a second one had (model loaded in one thread, stepped in another: what `lenserve serve`
did, loading in asyncio's worker pool and stepping in the engine thread; also with
OMP_WAIT_POLICY=ACTIVE, which makes the idle pool's workers burn the CPUs instead).

So the engine is built in a short-lived thread whose pool goes when it exits, and the thread
that steps is the only one left with a team. The server loads its length predictor the same way:
LightGBM's model loading runs OpenMP work, and in the event loop's thread it left a worker behind
that took a served model's batch-1 decode from ~9 to ~22 ms a token.
"""
from __future__ import annotations

import threading
from typing import Any, Callable


def run_in_fresh_thread(fn: Callable[..., Any], *args: Any, name: str = "lenserve-load") -> Any:
    """fn(*args) in a new thread that exits when it returns (with it, any OpenMP pool it started):
    its result, or its exception re-raised here."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")
