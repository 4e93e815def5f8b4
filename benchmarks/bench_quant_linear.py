"""Quantized linear (lenserve._C quant_linear) on the embedded model's shapes vs the packed fp32
linear, and the measurements behind the decode path's choices: integer dots against int16
activations or fp32 activations against unpacked rows, and rows in file order or interleaved
eight at a time (Q4_1x8, Q8_0x8: what the engine serves). `quant_embedding` over every row is the
unpacking alone, a lower bound on any fp32-activation decode (it still has to do the FMAs).

Prints JSON: per (type, shape, rows of x) the best ms of the repetitions (the machine is shared:
the best is the least disturbed), GB/s of weight bytes and GFLOP/s. Each matrix alone fits in
L3 except the LM head, so the GB/s of the small ones are cache rates, not memory bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_result  # noqa: E402
from lenserve.engine import quant  # noqa: E402
from lenserve.engine._ext import extension  # noqa: E402
from lenserve.engine.quant import QuantWeight  # noqa: E402

# SmolLM2-135M: fused qkv, o, gate_up, down, and the tied LM head
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def _time_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.min(times) * 1e3)


def _quantized(weight_type: int, w: torch.Tensor) -> QuantWeight:
    from gguf.quants import quantize

    data = quantize(w.numpy(), weight_type)
    return QuantWeight(torch.from_numpy(data.reshape(w.shape[0], -1)), weight_type, w.shape[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,16,64,512")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", default="bench_quant_linear_cpu.json")
    args = ap.parse_args()
    extension()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.05
        packed = torch.ops.lenserve.pack_linear_weight(w)
        weights = {"Q4_1": _quantized(quant.Q4_1, w), "Q8_0": _quantized(quant.Q8_0, w), "F16": QuantWeight.from_float16(w)}
        for name_x8 in ("Q4_1", "Q8_0"):  # rows interleaved eight at a time, as the engine serves them
            x8 = _quantized(getattr(quant, name_x8), w)
            x8.interleave()
            weights[name_x8 + "x8"] = x8
        for m in rows:
            x = torch.randn(m, k)
            reps = max(3, args.reps // (1 + m // 64))
            ms = _time_ms(lambda: torch.ops.lenserve.packed_linear(x, packed, n, None), reps)
            results.append(dict(matrix=name, n=n, k=k, rows=m, weights="fp32_packed", ms=ms, weight_gb_s=n * k * 4 / ms / 1e6, gflop_s=2 * m * n * k / ms / 1e6))
            for wname, qw in weights.items():
                ms = _time_ms(lambda: torch.ops.lenserve.quant_linear(x, qw.data, qw.weight_type, n, None), reps)
                results.append(dict(matrix=name, n=n, k=k, rows=m, weights=wname, ms=ms, weight_gb_s=qw.num_bytes / ms / 1e6, gflop_s=2 * m * n * k / ms / 1e6))
        ids = torch.arange(n)
        for wname, qw in weights.items():
            ms = _time_ms(lambda: torch.ops.lenserve.quant_embedding(ids, qw.data, qw.weight_type, k), args.reps)
            results.append(dict(matrix=name, n=n, k=k, rows=0, weights=wname, op="unpack_all_rows", ms=ms, weight_gb_s=qw.num_bytes / ms / 1e6))
    report = dict(machine=machine(), threads=torch.get_num_threads(), results=results)
    print(json.dumps(report, indent=1))
    print("wrote", write_result(args.out, report))


if __name__ == "__main__":
    main()
