"""Quantized linear (lenserve._C quant_linear) on the embedded model's shapes vs the packed fp32
linear, and the measurements behind the decode path's choices: integer dots against int16
activations or fp32 activations against unpacked rows, and rows in file order or interleaved
eight at a time (Q4_1x8, Q8_0x8, Q5_0x8, Q5_1x8: what the engine serves). `quant_embedding` over every row is the
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

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import best_ms, machine, write_result  # noqa: E402
from lenserve.engine import quant  # noqa: E402
from lenserve.engine._ext import extension  # noqa: E402
from lenserve.engine.quant import QuantWeight  # noqa: E402

# SmolLM2-135M: fused qkv, o, gate_up, down, and the tied LM head
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def _quantized(weight_type: int, w: torch.Tensor) -> QuantWeight:
    from gguf.quants import quantize

    data = quantize(w.numpy(), weight_type)
    return QuantWeight(torch.from_numpy(data.reshape(w.shape[0], -1)), weight_type, w.shape[1])


# K must be a multiple of 256: SmolLM2's down projection, and a 1B Llama's attention and MLP shapes
KQUANT_SHAPES = {"down_135m": (576, 1536), "attn_1b": (2048, 2048), "mlp_down_1b": (2048, 8192)}
_KQUANT_CHILD = """
import json, sys
import numpy as np, torch
sys.path.insert(0, {bench_dir!r})
from bench_quant_linear import random_blocks
from common import best_ms
from lenserve.engine._ext import extension
extension()
out = []
for name, (n, k) in {shapes!r}.items():
    for tname in ("Q4_K", "Q4_Kx8", "Q5_K", "Q6_K", "Q4_1x8"):
        w = random_blocks(tname.removesuffix("x8"), n, k)
        if tname.endswith("x8"):  # interleaved eight rows at a time, as the engine holds them
            w.interleave()
        for m in {rows!r}:
            x = torch.randn(m, k)
            ms = best_ms(lambda: torch.ops.lenserve.quant_linear(x, w.data, w.weight_type, n, None), {reps})
            out.append(dict(matrix=name, n=n, k=k, rows=m, weights=tname, ms=ms, weight_gb_s=w.num_bytes / ms / 1e6))
print(json.dumps(out))
"""


def random_blocks(type_name: str, n: int, k: int) -> QuantWeight:
    """n rows of well-formed blocks of a GGUF type with random quants and fp16 scales of a
    plausible size (the speed does not depend on the values; gguf-py cannot quantize K-quants)."""
    weight_type = getattr(quant, type_name)
    elems, nbytes = quant._BLOCK[weight_type]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(n, k // elems, nbytes), dtype=np.uint8)
    for off in {quant.Q6_K: [208], quant.Q4_1: [0, 2]}.get(weight_type, [0, 2]):
        scale = rng.uniform(0.002, 0.05, size=blocks.shape[:2]).astype(np.float16)
        blocks[:, :, off : off + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return QuantWeight(torch.from_numpy(blocks.reshape(n, -1).copy()), weight_type, k)


def _kquants(args) -> None:
    """The integer K-quant dots against the fp32 path they replaced, each in its own process (the
    choice is read once at start), on the same shapes, rows and machine."""
    import subprocess

    rows = [int(r) for r in args.rows.split(",")] if args.rows != "1,4,16,64,512" else [1, 4, 16]
    code = _KQUANT_CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), shapes=KQUANT_SHAPES, rows=rows,
                                reps=args.reps)
    runs = {}
    for label, dots in (("integer", None), ("fp32_unpacked", "fp32")):
        env = {k: v for k, v in os.environ.items() if k != "LENSERVE_KQUANT_DOTS"}
        if dots:
            env["LENSERVE_KQUANT_DOTS"] = dots
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        runs[label] = json.loads(out.strip().splitlines()[-1])
    speedup = {}
    for a, b in zip(runs["integer"], runs["fp32_unpacked"]):
        if not a["weights"].endswith("x8"):  # the interleaved rows have no fp32-unpacked decode
            speedup[f"{a['weights']} {a['matrix']} rows={a['rows']}"] = round(b["ms"] / a["ms"], 2)
    ms = {(a["weights"], a["matrix"], a["rows"]): a["ms"] for a in runs["integer"]}
    x8_speedup = {f"{matrix} rows={m}": round(t / ms[("Q4_Kx8", matrix, m)], 2) for (w, matrix, m), t in ms.items() if w == "Q4_K"}
    report = dict(machine=machine(), threads=args.threads or os.cpu_count(), results=runs,
                  integer_over_fp32_speedup=speedup, q4_k_x8_over_file_rows_speedup=x8_speedup)
    print(json.dumps(report, indent=1))
    print("wrote", write_result(args.out or "bench_quant_linear_kquants_cpu.json", report))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,16,64,512")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", default=None, help="default: bench_quant_linear_cpu.json (--kquants: bench_quant_linear_kquants_cpu.json)")
    ap.add_argument("--kquants", action="store_true",
                    help="Q4_K / Q5_K / Q6_K decode: integer dots against fp32 activations on unpacked rows "
                         "(LENSERVE_KQUANT_DOTS=fp32, in a second process), Q4_Kx8 and Q4_1x8 beside them")
    args = ap.parse_args()
    if args.kquants:
        _kquants(args)
        return
    args.out = args.out or "bench_quant_linear_cpu.json"
    extension()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.05
        packed = torch.ops.lenserve.pack_linear_weight(w)
        weights = {"Q4_1": _quantized(quant.Q4_1, w), "Q8_0": _quantized(quant.Q8_0, w), "F16": QuantWeight.from_float16(w)}
        # Q5_0 / Q5_1: what Q4_K_M / Q5_K_M files hold where rows are not whole 256-blocks (SmolLM2's
        # 576-wide matrices); before their kernels the engine held them as F16 rows
        weights.update({name: _quantized(getattr(quant, name), w) for name in ("Q5_0", "Q5_1")})
        for name_x8 in ("Q4_1", "Q8_0", "Q5_0", "Q5_1"):  # rows interleaved eight at a time, as the engine serves them
            x8 = _quantized(getattr(quant, name_x8), w)
            x8.interleave()
            weights[name_x8 + "x8"] = x8
        for m in rows:
            x = torch.randn(m, k)
            reps = max(3, args.reps // (1 + m // 64))
            ms = best_ms(lambda: torch.ops.lenserve.packed_linear(x, packed, n, None), reps)
            results.append(dict(matrix=name, n=n, k=k, rows=m, weights="fp32_packed", ms=ms, weight_gb_s=n * k * 4 / ms / 1e6, gflop_s=2 * m * n * k / ms / 1e6))
            for wname, qw in weights.items():
                ms = best_ms(lambda: torch.ops.lenserve.quant_linear(x, qw.data, qw.weight_type, n, None), reps)
                results.append(dict(matrix=name, n=n, k=k, rows=m, weights=wname, ms=ms, weight_gb_s=qw.num_bytes / ms / 1e6, gflop_s=2 * m * n * k / ms / 1e6))
        ids = torch.arange(n)
        for wname, qw in weights.items():
            ms = best_ms(lambda: torch.ops.lenserve.quant_embedding(ids, qw.data, qw.weight_type, k), args.reps)
            results.append(dict(matrix=name, n=n, k=k, rows=0, weights=wname, op="unpack_all_rows", ms=ms, weight_gb_s=qw.num_bytes / ms / 1e6))
    report = dict(machine=machine(), threads=torch.get_num_threads(), results=results)
    print(json.dumps(report, indent=1))
    print("wrote", write_result(args.out, report))


if __name__ == "__main__":
    main()
