"""Attention kernels on packed length mixes: prints one JSON row per (op, shape, mix, backend).

Rows: {op, backend, device, dtype, shape, mix, num_seqs, num_tokens, padding_ratio, time_ms,
tokens_per_s, speedup_vs_padded}. Mixes: `azure` (prompt lengths drawn with a fixed seed from the
shipped Azure conversation trace, capped at --max-len), `uniform` (lengths uniform in
[16, --max-len]) and `skewed` (one 2,000-token sequence among short ones).

Prefill (causal self-attention over the whole mix):
- lenserve: our varlen kernel over the packed tokens, no padding;
- sdpa_padded: torch SDPA on the same batch padded to the longest sequence ([B, H, L, D], right
  padding, is_causal, enable_gqa) — padding is built outside the timed region, which favours it;
- sdpa_per_seq: one SDPA call per sequence (the engine's torch fallback);
- torch_reference: the fp32 reference the tests check against (CPU only: O(L^2) memory);
- on CUDA also flash_varlen: torch.ops.aten._flash_attention_forward over the packed tokens.
Decode (one query per sequence against a paged cache of the mix's lengths):
- lenserve: our paged decode kernel; sdpa_gather: gather the pages, then SDPA (the engine's
  torch fallback, the baseline); on CUDA also flash_attn_with_kvcache when flash-attn imports.

    python benchmarks/bench_attention.py [--device cpu|cuda] [--quick] [--save NAME.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import azure_prompt_lengths, machine, write_result  # noqa: E402

from lenserve.engine import attention  # noqa: E402
from lenserve.engine._ext import has_op  # noqa: E402

SHAPES = {"smollm2": (9, 3, 64), "llama-32-8-128": (32, 8, 128)}  # (num_heads, num_kv_heads, head_dim)
BLOCK_SIZE = 16


def length_mix(name: str, num_seqs: int, max_len: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    if name == "azure":
        return azure_prompt_lengths(num_seqs, seed=seed, max_len=max_len)
    if name == "uniform":
        return [rng.randint(16, max_len) for _ in range(num_seqs)]
    if name == "skewed":
        lens = [rng.randint(8, 128) for _ in range(num_seqs - 1)]
        lens.insert(num_seqs // 2, min(2000, max_len))
        return lens
    raise ValueError(f"unknown mix {name!r}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter


def time_ms(fn, device: str, repeats: int, min_time_s: float = 0.0) -> float:
    """Best time of `repeats` calls after one warm-up (the minimum is the least noisy on a shared machine)."""
    fn()
    _sync(device)
    best, spent, n = math.inf, 0.0, 0
    while n < repeats or spent < min_time_s:
        t = CLOCK()
        fn()
        _sync(device)
        dt = CLOCK() - t
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best * 1e3


def _cu(lens: list[int], device: str) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def prefill_backends(lens, num_heads, num_kv_heads, head_dim, dtype, device, with_reference):
    """{backend: zero-argument callable} computing causal attention over the mix."""
    total, max_len = sum(lens), max(lens)
    gen = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(total, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(device=device, dtype=dtype)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)  # strided views, as the engine passes them
    q = q.view(total, num_heads, head_dim)
    k = k.view(total, num_kv_heads, head_dim)
    v = v.view(total, num_kv_heads, head_dim)
    cu = _cu(lens, device)
    scale = 1.0 / math.sqrt(head_dim)

    def padded(x, heads):
        out = x.new_zeros(len(lens), heads, max_len, head_dim)
        for i, (a, b) in enumerate(itertools.pairwise([0, *itertools.accumulate(lens)])):
            out[i, :, : b - a] = x[a:b].transpose(0, 1)
        return out

    qp, kp, vp = padded(q, num_heads), padded(k, num_kv_heads), padded(v, num_kv_heads)
    fns = {
        "sdpa_padded": lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True),
        "sdpa_per_seq": lambda: attention._sdpa_varlen(q, k, v, cu, cu, scale, True),
    }
    if has_op("varlen_attention", device):
        fns["lenserve"] = lambda: torch.ops.lenserve.varlen_attention(q, k, v, cu, cu, max_len, max_len, scale, True)
    if device == "cuda":
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        fns["flash_varlen"] = lambda: torch.ops.aten._flash_attention_forward(
            qc, kc, vc, cu, cu, max_len, max_len, 0.0, True, False, scale=scale
        )[0]
    if with_reference:
        fns["torch_reference"] = lambda: attention.reference_varlen_attention(q, k, v, cu, cu, max_len, max_len, scale, True)
    return fns


def decode_backends(lens, num_heads, num_kv_heads, head_dim, dtype, cache_dtype, device, cold_layers=0):
    num_seqs = len(lens)
    max_blocks = max(math.ceil(n / BLOCK_SIZE) for n in lens)
    num_blocks = num_seqs * max_blocks
    gen = torch.Generator(device="cpu").manual_seed(0)
    block_tables = torch.randperm(num_blocks, generator=gen).view(num_seqs, max_blocks).to(device=device, dtype=torch.int32)
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device=device, dtype=cache_dtype)
    v_cache = torch.randn(shape, generator=gen).to(device=device, dtype=cache_dtype)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = 1.0 / math.sqrt(head_dim)
    args = (q, k_cache, v_cache, block_tables, context_lens, scale)
    fns = {"sdpa_gather": lambda: attention._sdpa_paged_decode(*args)}
    if has_op("paged_decode_attention", device):
        fns["lenserve"] = lambda: torch.ops.lenserve.paged_decode_attention(*args)
        if cold_layers > 0:
            # as in a model's decode step: each call reads another layer's cache (cold_layers of
            # them, cycled), so the rows come from DRAM rather than from a cache the last call left
            # in L3; a kernel's access pattern can win there and lose here
            caches = itertools.cycle([(torch.randn(shape, generator=gen).to(device=device, dtype=cache_dtype),
                                       torch.randn(shape, generator=gen).to(device=device, dtype=cache_dtype))
                                      for _ in range(cold_layers)])

            def cold():
                k, v = next(caches)
                return torch.ops.lenserve.paged_decode_attention(q, k, v, block_tables, context_lens, scale)

            fns["lenserve_cold"] = cold
    if device == "cuda":
        try:
            from flash_attn import flash_attn_with_kvcache

            fns["flash_attn_kvcache"] = lambda: flash_attn_with_kvcache(
                q[:, None], k_cache, v_cache, cache_seqlens=context_lens, block_table=block_tables,
                softmax_scale=scale, causal=True,
            )
        except ImportError:
            pass
    return fns


def run(args) -> list[dict]:
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    cache_dtype = getattr(torch, args.cache_dtype) if args.cache_dtype else (dtype if device == "cuda" else torch.float16)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for shape_name in args.shapes:
        num_heads, num_kv_heads, head_dim = SHAPES[shape_name]
        for mix in args.mixes:
            lens = length_mix(mix, args.num_seqs, args.max_len)
            total, max_len = sum(lens), max(lens)
            base = {"device": device, "dtype": str(dtype).removeprefix("torch."), "shape": shape_name,
                    "num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim, "mix": mix,
                    "num_seqs": len(lens), "num_tokens": total, "max_len": max_len,
                    "padding_ratio": round(1 - total / (len(lens) * max_len), 3)}
            fns = prefill_backends(lens, num_heads, num_kv_heads, head_dim, dtype, device,
                                   with_reference=device == "cpu" and not args.quick)
            times = {name: time_ms(fn, device, args.repeats) for name, fn in fns.items()}
            for name, ms in times.items():
                emit({"op": "prefill", "backend": name, **base, "time_ms": round(ms, 3),
                      "tokens_per_s": round(total / ms * 1e3, 1),
                      "speedup_vs_padded": round(times["sdpa_padded"] / ms, 2)})
            del fns

            dec_lens = length_mix(mix, args.decode_seqs, args.max_len, seed=1)
            dec_base = {**base, "num_seqs": len(dec_lens), "num_tokens": len(dec_lens), "max_len": max(dec_lens),
                        "context_tokens": sum(dec_lens), "cache_dtype": str(cache_dtype).removeprefix("torch."),
                        "padding_ratio": round(1 - sum(dec_lens) / (len(dec_lens) * max(dec_lens)), 3)}
            fns = decode_backends(dec_lens, num_heads, num_kv_heads, head_dim, dtype, cache_dtype, device,
                                  cold_layers=args.cold_layers if device == "cpu" else 0)
            times = {name: time_ms(fn, device, args.repeats * 3) for name, fn in fns.items()}
            for name, ms in times.items():
                emit({"op": "decode", "backend": name, **dec_base, "time_ms": round(ms, 3),
                      "tokens_per_s": round(len(dec_lens) / ms * 1e3, 1),
                      "speedup_vs_gather": round(times["sdpa_gather"] / ms, 2)})
            del fns
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, help="q/k/v dtype (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--cache-dtype", default=None, help="KV cache dtype for decode (default: float16 on CPU, the q dtype on CUDA)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--mixes", nargs="+", default=["azure", "uniform", "skewed"])
    ap.add_argument("--num-seqs", type=int, default=None, help="prefill sequences per mix (default: 16 on CPU, 64 on CUDA)")
    ap.add_argument("--decode-seqs", type=int, default=32)
    ap.add_argument("--cold-layers", type=int, default=30,
                    help="CPU decode: also time the kernel on this many layers' caches in turn (lenserve_cold; 0: skip)")
    ap.add_argument("--max-len", type=int, default=2048, help="cap on sequence lengths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: process CPU time, with --threads 1 — immune to other processes on a shared machine")
    ap.add_argument("--quick", action="store_true", help="one shape, 8 sequences, no fp32 reference")
    ap.add_argument("--save", default=None, help="also write {machine, args, rows} to benchmarks/results/SAVE")
    args = ap.parse_args()
    if args.num_seqs is None:
        args.num_seqs = 64 if args.device == "cuda" else 16
    if args.quick:
        args.shapes, args.num_seqs, args.repeats = args.shapes[:1], 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.device != "cpu" or torch.get_num_threads() != 1:
            ap.error("--clock cpu measures one CPU thread's work: use it with --device cpu --threads 1")
        global CLOCK
        CLOCK = time.process_time
    load_before = os.getloadavg()
    rows = run(args)
    if args.save:
        info = machine()
        info["torch_threads"] = torch.get_num_threads()
        info["clock"] = args.clock
        # Other processes on a shared machine slow the short multi-threaded calls most.
        info["loadavg_1min_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        path = write_result(args.save, {"machine": info, "args": vars(args), "rows": rows})
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
