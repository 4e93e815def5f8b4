"""Calls every lenserve._C op once on the device, synchronising after each, so that an illegal
address or a launch failure is pinned to one op before any test runs (and so that
compute-sanitizer has a short program to check).

    python -m benchmarks.gpu.smoke [--device cuda|cpu] [--out DIR]

Exits 1 when an op fails; writes OUT/smoke.json (or OUT/smoke_<tag>.json with --tag).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import traceback

import torch

from benchmarks.gpu.common import sync, write_json


def _cases(device: str) -> list[tuple[str, callable]]:
    dt = torch.bfloat16 if device.startswith("cuda") else torch.float32
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=dt):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    ops = torch.ops.lenserve
    lens = [5, 70, 1]
    cu = torch.tensor([0, *[sum(lens[: i + 1]) for i in range(len(lens))]], dtype=torch.int32, device=device)
    total = sum(lens)
    block_size, num_kv_heads, head_dim, num_heads = 16, 2, 128, 8
    num_blocks = 16
    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    tables = torch.arange(num_blocks, dtype=torch.int32, device=device).view(2, 8)
    ctx = torch.tensor([100, 128], dtype=torch.int32, device=device)
    x = randn(total, 576)
    weight = randn(576)
    qkv = randn(total, (num_heads + 2 * num_kv_heads) * head_dim)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    positions = torch.arange(total, dtype=torch.int64, device=device)
    cos_sin = torch.randn(256, head_dim, generator=gen).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:total].to(device)
    slots[0] = -1
    return [
        ("rms_norm", lambda: ops.rms_norm(x, weight, 1e-6)),
        ("fused_add_rms_norm", lambda: ops.fused_add_rms_norm(x.clone(), x.clone(), weight, 1e-6)),
        ("silu_and_mul", lambda: ops.silu_and_mul(randn(total, 2 * 1536))),
        ("rotary_embedding", lambda: ops.rotary_embedding(positions, q, k, head_dim, cos_sin, True)),
        ("reshape_and_cache", lambda: ops.reshape_and_cache(
            k.reshape(total, num_kv_heads, head_dim), v.reshape(total, num_kv_heads, head_dim), k_cache, v_cache, slots)),
        ("varlen_attention", lambda: ops.varlen_attention(
            q.view(total, num_heads, head_dim), k.view(total, num_kv_heads, head_dim), v.view(total, num_kv_heads, head_dim),
            cu, cu, max(lens), max(lens), 1 / math.sqrt(head_dim), True)),
        ("paged_decode_attention", lambda: ops.paged_decode_attention(randn(2, num_heads, head_dim), k_cache, v_cache, tables, ctx, 0.09)),
        ("paged_decode_attention_fp16_cache", lambda: ops.paged_decode_attention(
            randn(2, num_heads, head_dim), k_cache.half(), v_cache.half(), tables, ctx, 0.09)),
        ("paged_decode_attention_split_k", lambda: ops.paged_decode_attention(
            randn(1, 32, head_dim), randn(300, block_size, 8, head_dim), randn(300, block_size, 8, head_dim),
            torch.arange(300, dtype=torch.int32, device=device).view(1, 300), torch.tensor([4800], dtype=torch.int32, device=device), 0.09)),
    ]


def run(device: str) -> list[dict]:
    import lenserve._C  # noqa: F401  (registers torch.ops.lenserve)

    rows = []
    for name, fn in _cases(device):
        t0 = time.perf_counter()
        try:
            fn()
            sync(device)
            rows.append({"op": name, "ok": True, "ms": round((time.perf_counter() - t0) * 1e3, 3)})
        except Exception as e:  # noqa: BLE001  (report every op, then fail)
            rows.append({"op": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-2000:]})
            if device.startswith("cuda") and "illegal" in str(e).lower():
                break  # the context is gone: later ops would only repeat the error
        print(f"smoke: {name:36s} {'ok' if rows[-1]['ok'] else 'FAILED ' + rows[-1]['error']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write OUT/smoke[_TAG].json")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    rows = run(args.device)
    ok = all(r["ok"] for r in rows)
    if args.out:
        write_json(args.out, "smoke" + (f"_{args.tag}" if args.tag else ""), {"device_arg": args.device, "ok": ok, "ops": rows})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
