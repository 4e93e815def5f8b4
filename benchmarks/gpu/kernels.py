"""Prefill attention over packed length mixes: lenserve's varlen kernel vs FlashAttention-2 varlen
inside PyTorch (torch.ops.aten._flash_attention_forward) vs padded scaled_dot_product_attention
(flash backend on CUDA) vs naive padded multi-head attention (matmul, mask, softmax, matmul).

Mixes: `azure` — 63 prompt lengths drawn (seed 0) from the shipped Azure LLM inference trace
(traces/data/azure_llm_2023_conv.csv.gz, via benchmarks/common.py; 65,988 tokens) — and
`uniform` — 63 lengths uniform in [1, 2048]. Shapes: Llama-3-8B (32/8 heads, head_dim 128) and
SmolLM2 (9/3, 64). Causal, bf16 on CUDA. Padding is built outside the timed region (it favours
the padded baselines). `--tiny` shrinks everything for a CPU run of the harness in CI.

    python -m benchmarks.gpu.kernels [--device cuda|cpu] [--tiny] [--out DIR]
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import azure_prompt_lengths
from benchmarks.gpu.common import time_ms, write_json

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}  # num_heads, num_kv_heads, head_dim
TINY_SHAPES = {"tiny": (4, 2, 64)}
NAIVE_MAX_SCORE_BYTES = 8 * 2**30  # naive MHA runs in batch chunks whose fp32 scores fit this


def length_mix(name: str, tiny: bool = False) -> list[int]:
    if name == "azure":
        lens = azure_prompt_lengths(63, seed=0)
        return [max(1, n // 64) for n in lens[:8]] if tiny else lens
    if name == "uniform":
        rng = random.Random(0)
        return [rng.randint(1, 64 if tiny else 2048) for _ in range(8 if tiny else 63)]
    raise ValueError(f"unknown mix {name!r} (azure, uniform)")


def pad(x: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """[total, heads, dim] -> [batch, heads, max_len, dim], zeros after each sequence."""
    out = x.new_zeros(len(lens), max(lens), x.shape[1], x.shape[2])
    start = 0
    for i, n in enumerate(lens):
        out[i, :n] = x[start : start + n]
        start += n
    return out.transpose(1, 2).contiguous()


def unpad(x: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """[batch, heads, max_len, dim] -> [total, heads, dim]."""
    x = x.transpose(1, 2)
    return torch.cat([x[i, :n] for i, n in enumerate(lens)])


def naive_padded(qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal MHA on the padded batch (KV heads repeated), in chunks of the batch."""
    b, h, length, _ = qp.shape
    group = h // kp.shape[1]
    chunk = max(1, NAIVE_MAX_SCORE_BYTES // (h * length * length * 4))
    mask = torch.ones(length, length, dtype=torch.bool, device=qp.device).tril()
    outs = []
    for s in range(0, b, chunk):
        q, k, v = qp[s : s + chunk], kp[s : s + chunk], vp[s : s + chunk]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)).float() * scale
        scores.masked_fill_(~mask, float("-inf"))
        outs.append((scores.softmax(-1).to(q.dtype) @ v))
    return torch.cat(outs)


def with_env(name: str, value: str, fn):
    """fn run with the environment variable set (the extension reads it at each call)."""
    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
    return run


def bench_mix(mix: str, shape: str, heads: tuple[int, int, int], device: str, tiny: bool, iters: int) -> list[dict]:
    num_heads, num_kv_heads, head_dim = heads
    lens = length_mix(mix, tiny)
    total = sum(lens)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(total, num_heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    cu = torch.tensor([0, *[sum(lens[: i + 1]) for i in range(len(lens))]], dtype=torch.int32, device=device)
    max_len, scale = max(lens), 1.0 / math.sqrt(head_dim)
    qp, kp, vp = pad(q, lens), pad(k, lens), pad(v, lens)

    impls = {"lenserve": lambda: torch.ops.lenserve.varlen_attention(q, k, v, cu, cu, max_len, max_len, scale, True)}
    if device.startswith("cuda") and head_dim == 128:
        # The kernel's other tiling at head_dim 128 (one m-tile per warp, 64-key tiles), timed beside
        # the default so the choice between them is a measurement of this run.
        impls["lenserve_64x64"] = with_env("LENSERVE_VARLEN_TILES", "64x64", impls["lenserve"])
    if device.startswith("cuda"):
        impls["fa2_varlen"] = lambda: torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)[0]

        from torch.nn.attention import SDPBackend, sdpa_kernel

        group = num_heads // num_kv_heads
        kp_rep, vp_rep = kp.repeat_interleave(group, dim=1), vp.repeat_interleave(group, dim=1)

        def sdpa():
            # KV heads repeated outside the timed region, as an HF padded batch holds them; the flash
            # backend forced, so a padded batch runs the fastest kernel torch has for it.
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qp, kp_rep, vp_rep, is_causal=True, scale=scale)
        impls["sdpa_padded_flash"] = sdpa
    else:
        impls["sdpa_padded"] = lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
    impls["naive_padded"] = lambda: naive_padded(qp, kp, vp, scale)

    reference = impls["lenserve"]().float()
    rows = []
    for name, fn in impls.items():
        row = {"mix": mix, "shape": shape, "num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
               "num_seqs": len(lens), "num_tokens": total, "max_len": max_len, "impl": name, "dtype": str(dtype).replace("torch.", "")}
        try:
            out = fn()
            if out.dim() == 4:
                out = unpad(out, lens)
            row["max_abs_diff_vs_lenserve"] = float((out.float() - reference).abs().max())
            row["ms"] = round(time_ms(fn, device, warmup=1, iters=iters if name != "naive_padded" else max(1, iters // 3)), 4)
            row["tokens_per_s"] = round(total / row["ms"] * 1e3)
        except Exception as e:  # noqa: BLE001  (a baseline torch lacks here is recorded, not fatal)
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
        print(f"kernels: {mix:8s} {shape:10s} {name:18s} {row.get('ms', row.get('error'))}", flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Per (mix, shape): lenserve's speed relative to each baseline (> 1: lenserve is faster)."""
    out = []
    for key in sorted({(r["mix"], r["shape"]) for r in rows}):
        group = {r["impl"]: r for r in rows if (r["mix"], r["shape"]) == key and "ms" in r}
        if "lenserve" not in group:
            continue
        ours = group["lenserve"]["ms"]
        out.append({"mix": key[0], "shape": key[1], **{f"speedup_vs_{k}": round(r["ms"] / ours, 3) for k, r in group.items() if k != "lenserve"}})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small mixes and heads (the CPU run of the harness)")
    ap.add_argument("--mixes", nargs="+", default=["azure", "uniform"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import lenserve._C  # noqa: F401

    shapes = TINY_SHAPES if args.tiny else SHAPES
    rows = [r for mix in args.mixes for shape, heads in shapes.items() for r in bench_mix(mix, shape, heads, args.device, args.tiny, args.iters)]
    summary = ratios(rows)
    for s in summary:
        print("kernels:", s, flush=True)
    if args.out:
        write_json(args.out, "kernels", {"device_arg": args.device, "tiny": args.tiny, "rows": rows, "speedups": summary})
    return 0 if all("error" not in r for r in rows if r["impl"] == "lenserve") else 1


if __name__ == "__main__":
    sys.exit(main())
