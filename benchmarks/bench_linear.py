"""fp32 linear layers on CPU: lenserve's packed panels vs oneDNN prepacked vs F.linear (BLAS).

SmolLM2-135M's shapes (qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536, lm_head
49152x576) at batch rows 1 (decode), 8, 32 and 256. Many copies of each weight are cycled so
every call reads its weight from memory, as decode does. Prints JSON rows {impl, m, n, k,
time_us, gb_s, gflop_s} and per-step totals (30 layers + head), and writes results/.

    python benchmarks/bench_linear.py [--rows 1,8,32,256] [--out bench_linear_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_result  # noqa: E402

import lenserve._C  # noqa: E402,F401  (registers torch.ops.lenserve)

SHAPES = {"qkv": (960, 576, 30), "o": (576, 576, 30), "gate_up": (3072, 576, 30), "down": (576, 1536, 30), "lm_head": (49152, 576, 1)}


def _time(fn, weights, repeats=3) -> float:
    for w in weights:
        fn(w)
    t = time.perf_counter()
    for _ in range(repeats):
        for w in weights:
            fn(w)
    return (time.perf_counter() - t) / (repeats * len(weights))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,32,256")
    ap.add_argument("--out", default="bench_linear_cpu.json")
    ap.add_argument("--bytes-per-shape", type=float, default=150e6, help="weight bytes cycled per shape (beyond the caches)")
    args = ap.parse_args()
    rows, step = [], {}
    for m in [int(r) for r in args.rows.split(",")]:
        totals = {"lenserve": 0.0, "onednn": 0.0, "blas": 0.0}
        for name, (n, k, per_step) in SHAPES.items():
            copies = max(1, int(args.bytes_per_shape / (n * k * 4)))
            plain = [torch.randn(n, k) for _ in range(copies)]
            impls = {
                "lenserve": ([torch.ops.lenserve.pack_linear_weight(w) for w in plain], lambda w: torch.ops.lenserve.packed_linear(x, w, n, None)),
                "onednn": ([torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in plain], lambda w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")),
                "blas": (plain, lambda w: F.linear(x, w)),
            }
            x = torch.randn(m, k)
            for impl, (weights, fn) in impls.items():
                dt = _time(fn, weights)
                totals[impl] += dt * per_step
                rows.append({"impl": impl, "layer": name, "m": m, "n": n, "k": k, "time_us": round(dt * 1e6, 1),
                             "gb_s": round(n * k * 4 / dt / 1e9, 2), "gflop_s": round(2 * m * n * k / dt / 1e9, 1)})
            del impls, plain
        step[f"m_{m}"] = {impl: round(t * 1e3, 2) for impl, t in totals.items()}
        step[f"m_{m}"]["lenserve_vs_onednn"] = round(totals["onednn"] / totals["lenserve"], 3)
        step[f"m_{m}"]["lenserve_vs_blas"] = round(totals["blas"] / totals["lenserve"], 3)
    result = {"machine": {**machine(), "torch_threads": torch.get_num_threads()}, "per_step_linear_ms": step, "rows": rows}
    print(json.dumps(result, indent=1))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
