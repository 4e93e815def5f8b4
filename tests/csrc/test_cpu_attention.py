"""lenserve._C's CPU attention kernels against the fp32 references in lenserve.engine.attention.

Accuracy is judged the way FlashAttention's tests judge it: on the same inputs, the kernel's
largest error against an fp32 reference must be at most twice the error of torch SDPA run in the
same dtype, plus a small absolute floor (in fp32 SDPA can be nearly exact).
"""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from lenserve.engine import attention
from lenserve.engine._ext import has_op

pytestmark = pytest.mark.skipif(not has_op("varlen_attention", "cpu"), reason="lenserve._C is not built")

FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1e-3, torch.float16: 2e-4}
GQA = [(4, 4), (9, 3), (8, 1), (14, 2)]  # (num_heads, num_kv_heads): ratios 1, 3, 8, 7
HEAD_DIMS = [64, 80, 96, 128]


def _lengths(mix: str, rng: random.Random) -> list[int]:
    if mix == "primes":
        return [1, 2, 3, 5, 7, 11, 13, 17, 31, 61, 127, 251]
    if mix == "long_among_short":
        lens = [rng.randint(1, 40) for _ in range(30)]
        lens.insert(rng.randrange(len(lens)), 2048)
        return lens
    raise ValueError(mix)


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.float() - ref.float()).abs().max().item()


def _packed_qkv(total: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype, gen) -> tuple:
    """q, k, v as the engine passes them: views of one fused [tokens, q + 2kv] projection."""
    qkv = torch.randn(total, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return q.view(total, num_heads, head_dim), k.view(total, num_kv_heads, head_dim), v.view(total, num_kv_heads, head_dim)


def _check_varlen(q, k, v, lens_q, lens_k, causal):
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    scale = 1.0 / math.sqrt(q.shape[-1])
    args = (cu_q, cu_k, max(lens_q), max(lens_k), scale, causal)
    out = torch.ops.lenserve.varlen_attention(q, k, v, *args)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    ref = attention.reference_varlen_attention(q.float(), k.float(), v.float(), *args)
    sdpa = attention._sdpa_varlen(q, k, v, cu_q, cu_k, scale, causal)
    # SDPA gives NaN where a causal query sees no key; the kernel and the reference give zeros.
    sdpa = torch.nan_to_num(sdpa)
    err, sdpa_err = _max_err(out, ref), _max_err(sdpa, ref)
    assert err <= 2 * sdpa_err + FLOOR[q.dtype], f"kernel error {err:.3g} vs SDPA error {sdpa_err:.3g}"
    return out, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_varlen_primes(dtype, causal, num_heads, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(head_dim * 100 + num_heads)
    lens = _lengths("primes", random.Random(0))
    q, k, v = _packed_qkv(sum(lens), num_heads, num_kv_heads, head_dim, dtype, gen)
    _check_varlen(q, k, v, lens, lens, causal)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,dtype,causal",
    [
        (9, 3, 64, torch.float32, True),
        (9, 3, 64, torch.bfloat16, False),
        (8, 1, 128, torch.bfloat16, True),
        (8, 1, 128, torch.float32, False),
    ],
)
def test_varlen_long_among_short(num_heads, num_kv_heads, head_dim, dtype, causal):
    gen = torch.Generator().manual_seed(7)
    lens = _lengths("long_among_short", random.Random(head_dim))
    q, k, v = _packed_qkv(sum(lens), num_heads, num_kv_heads, head_dim, dtype, gen)
    _check_varlen(q, k, v, lens, lens, causal)


def test_varlen_float16():
    gen = torch.Generator().manual_seed(3)
    lens = [1, 17, 130, 64]
    q, k, v = _packed_qkv(sum(lens), 6, 2, 64, torch.float16, gen)
    _check_varlen(q, k, v, lens, lens, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_queries_after_cached_context(dtype):
    """Chunked prefill / prefix hits: fewer queries than keys, causal aligned bottom-right."""
    gen = torch.Generator().manual_seed(5)
    lens_q, lens_k = [1, 5, 64, 3, 100], [9, 5, 200, 131, 100]
    q = torch.randn(sum(lens_q), 9, 64, generator=gen).to(dtype)
    k = torch.randn(sum(lens_k), 3, 64, generator=gen).to(dtype)
    v = torch.randn(sum(lens_k), 3, 64, generator=gen).to(dtype)
    for causal in (True, False):
        _check_varlen(q, k, v, lens_q, lens_k, causal)


def test_varlen_query_without_visible_key_outputs_zeros():
    gen = torch.Generator().manual_seed(11)
    lens_q, lens_k = [6, 4], [2, 4]  # the first 4 queries of sequence 0 see no key under causal
    q = torch.randn(sum(lens_q), 2, 64, generator=gen)
    k = torch.randn(sum(lens_k), 2, 64, generator=gen)
    v = torch.randn(sum(lens_k), 2, 64, generator=gen)
    out = torch.ops.lenserve.varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), 6, 4, 0.125, True)
    assert torch.all(out[:4] == 0)
    ref = attention.reference_varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), 6, 4, 0.125, True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_varlen_empty_sequences_and_batch():
    gen = torch.Generator().manual_seed(13)
    lens = [0, 3, 0, 5]
    q, k, v = _packed_qkv(sum(lens), 4, 2, 64, torch.float32, gen)
    out = torch.ops.lenserve.varlen_attention(q, k, v, _cu(lens), _cu(lens), 5, 5, 0.125, True)
    ref = attention.reference_varlen_attention(q, k, v, _cu(lens), _cu(lens), 5, 5, 0.125, True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    empty = torch.empty(0, 4, 64)
    out = torch.ops.lenserve.varlen_attention(empty, empty[:, :2], empty[:, :2], _cu([]), _cu([]), 0, 0, 0.125, True)
    assert out.shape == (0, 4, 64)


def test_varlen_does_not_depend_on_thread_count():
    gen = torch.Generator().manual_seed(17)
    lens = _lengths("long_among_short", random.Random(1))[:12]
    q, k, v = _packed_qkv(sum(lens), 9, 3, 64, torch.float32, gen)
    args = (q, k, v, _cu(lens), _cu(lens), max(lens), max(lens), 0.125, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.lenserve.varlen_attention(*args)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, torch.ops.lenserve.varlen_attention(*args))


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (8, 1, 128), (4, 4, 80)])
def test_varlen_indexed_reads_the_context_in_place(cache_dtype, q_dtype, num_heads, num_kv_heads, head_dim):
    """Chunked prefill over a paged cache: each sequence's keys are rows of the flattened cache in
    its block table's (scattered) order; the kernel must equal plain varlen attention on the
    gathered keys, whatever the cache's dtype against q's, over odd chunk and context lengths."""
    gen = torch.Generator().manual_seed(11)
    block_size = 16
    lens_q, lens_k = [1, 7, 64, 33, 129, 5], [1, 300, 64, 1000, 257, 5]
    blocks = [math.ceil(n / block_size) for n in lens_k]
    num_blocks = sum(blocks) + 7
    order = torch.randperm(num_blocks, generator=gen)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(cache_dtype)
    slots, used = [], 0
    for n, b in zip(lens_k, blocks):
        table = order[used: used + b]
        used += b
        slots.append((table[:, None] * block_size + torch.arange(block_size)).flatten()[:n])
    slots = torch.cat(slots)
    q = torch.randn(sum(lens_q), num_heads, head_dim, generator=gen).to(q_dtype)
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    scale = 1.0 / math.sqrt(head_dim)
    for causal in (True, False):
        args = (cu_q, cu_k, max(lens_q), max(lens_k), scale, causal)
        out = torch.ops.lenserve.varlen_attention_indexed(q, flat_k, flat_v, slots, *args)
        assert out.shape == q.shape and out.dtype == q.dtype
        gathered_k, gathered_v = flat_k[slots].to(q_dtype), flat_v[slots].to(q_dtype)
        # the keys as fp32 exactly as the cache holds them: the reference sees what the kernel reads
        ref = attention.reference_varlen_attention(q.float(), flat_k[slots].float(), flat_v[slots].float(), *args)
        plain = torch.ops.lenserve.varlen_attention(q, gathered_k, gathered_v, *args)
        tol = 2 * _max_err(plain, ref) + FLOOR[q_dtype]
        assert _max_err(out, ref) <= tol
        if q_dtype == torch.float32 or q_dtype == cache_dtype:
            assert torch.equal(out, plain)  # the same arithmetic on the same numbers (the gather lost nothing)


def test_varlen_indexed_rejects_bad_indices():
    q, k, v = torch.randn(4, 4, 64), torch.randn(10, 2, 64).half(), torch.randn(10, 2, 64).half()
    cu = _cu([4])
    with pytest.raises(RuntimeError, match="outside k's 10 rows"):
        torch.ops.lenserve.varlen_attention_indexed(q, k, v, torch.tensor([0, 1, 2, 10]), cu, cu, 4, 4, 0.125, True)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.lenserve.varlen_attention_indexed(q, k, v, torch.tensor([0, 1, 2, 3], dtype=torch.int32), cu, cu, 4, 4, 0.125, True)
    with pytest.raises(RuntimeError, match="k and v must share a dtype"):
        torch.ops.lenserve.varlen_attention_indexed(q, k, v.float(), torch.arange(4), cu, cu, 4, 4, 0.125, True)
    with pytest.raises(RuntimeError, match="must equal the number of tokens"):
        torch.ops.lenserve.varlen_attention_indexed(q, k, v, torch.arange(5), cu, cu, 4, 4, 0.125, True)


def test_engine_dispatches_to_the_kernels():
    assert attention.resolve_backend("auto", torch.device("cpu")) == "kernels"


# ---- paged decode -------------------------------------------------------------------------------
def _paged_problem(lens, num_heads, num_kv_heads, head_dim, block_size, q_dtype, cache_dtype, gen):
    max_blocks = max(math.ceil(n / block_size) for n in lens) + 1
    num_blocks = len(lens) * max_blocks + 3
    # Random, non-contiguous block tables; unused entries point at arbitrary valid blocks.
    block_tables = torch.randperm(num_blocks, generator=gen)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(cache_dtype)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen).to(q_dtype)
    return q, k_cache, v_cache, block_tables.to(torch.int32), torch.tensor(lens, dtype=torch.int32)


def _check_decode(q, k_cache, v_cache, block_tables, context_lens):
    scale = 1.0 / math.sqrt(q.shape[-1])
    args = (k_cache, v_cache, block_tables, context_lens, scale)
    out = torch.ops.lenserve.paged_decode_attention(q, *args)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = attention.reference_paged_decode_attention(q.float(), *args)
    base = attention._sdpa_paged_decode(q, *args)
    err, base_err = _max_err(out, ref), _max_err(base, ref)
    assert err <= 2 * base_err + FLOOR[q.dtype], f"kernel error {err:.3g} vs gather+SDPA error {base_err:.3g}"


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
def test_paged_decode(cache_dtype, q_dtype, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(num_heads)
    lens = [1, 15, 16, 17, 100, 333, 64, 2]
    _check_decode(*_paged_problem(lens, num_heads, num_kv_heads, 64, 16, q_dtype, cache_dtype, gen))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_paged_decode_head_dims_and_block_sizes(head_dim, block_size):
    gen = torch.Generator().manual_seed(head_dim + block_size)
    lens = [3, 70, 129]
    _check_decode(*_paged_problem(lens, 8, 2, head_dim, block_size, torch.float32, torch.float16, gen))


@pytest.mark.parametrize("num_seqs", [1, 3])
def test_paged_decode_long_context_is_split(num_seqs):
    """Fewer sequences than work slots: the context is split across threads and recombined."""
    gen = torch.Generator().manual_seed(num_seqs)
    lens = [3000, 700, 1][:num_seqs]
    _check_decode(*_paged_problem(lens, 9, 3, 64, 16, torch.float32, torch.float16, gen))


@pytest.mark.parametrize("lens", [[150], [129], [300], [200, 150, 90]])
def test_paged_decode_few_short_sequences_are_split_for_balance(lens):
    """A few sequences that do not divide among the threads (one or three on two): each context
    is cut into pieces that do, down to 64 keys (at one thread nothing is split), and recombined."""
    gen = torch.Generator().manual_seed(lens[0])
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    try:
        _check_decode(*_paged_problem(lens, 9, 3, 64, 16, torch.float32, torch.float16, gen))
    finally:
        torch.set_num_threads(before)


def test_paged_decode_empty_context_outputs_zeros():
    gen = torch.Generator().manual_seed(1)
    q, kc, vc, bt, _ = _paged_problem([4, 4], 4, 2, 64, 16, torch.float32, torch.float16, gen)
    out = torch.ops.lenserve.paged_decode_attention(q, kc, vc, bt, torch.tensor([0, 4], dtype=torch.int32), 0.125)
    assert torch.all(out[0] == 0)


def test_paged_decode_strided_query():
    """The engine passes q as a view into the fused qkv projection."""
    gen = torch.Generator().manual_seed(2)
    q, kc, vc, bt, lens = _paged_problem([5, 40, 90], 9, 3, 64, 16, torch.float32, torch.float16, gen)
    wide = torch.randn(3, 15 * 64, generator=gen)
    wide[:, : 9 * 64] = q.reshape(3, -1)
    strided = wide[:, : 9 * 64].view(3, 9, 64)
    assert not strided.is_contiguous()
    out = torch.ops.lenserve.paged_decode_attention(strided, kc, vc, bt, lens, 0.125)
    torch.testing.assert_close(out, torch.ops.lenserve.paged_decode_attention(q, kc, vc, bt, lens, 0.125))


# ---- malformed inputs -----------------------------------------------------------------------------
def _varlen_args(**overrides):
    lens = [3, 5]
    args = dict(
        q=torch.randn(8, 4, 64),
        k=torch.randn(8, 2, 64),
        v=torch.randn(8, 2, 64),
        cu_seqlens_q=_cu(lens),
        cu_seqlens_k=_cu(lens),
        max_seqlen_q=5,
        max_seqlen_k=5,
        softmax_scale=0.125,
        causal=True,
    )
    args.update(overrides)
    return list(args.values())


VARLEN_BAD = {
    "q must be": dict(q=torch.randn(8, 256)),
    "share a dtype": dict(k=torch.randn(8, 2, 64).double()),
    "float32, bfloat16 or float16": dict(q=torch.randn(8, 4, 64).double(), k=torch.randn(8, 2, 64).double(), v=torch.randn(8, 2, 64).double()),
    "shapes differ": dict(v=torch.randn(8, 1, 64)),
    "head_dim must be": dict(q=torch.randn(8, 4, 72), k=torch.randn(8, 2, 72), v=torch.randn(8, 2, 72)),
    "q head_dim": dict(q=torch.randn(8, 4, 128)),
    "multiple of num_kv_heads": dict(q=torch.randn(8, 3, 64)),
    "contiguous \\[heads, head_dim\\] rows": dict(q=torch.randn(8, 64, 4).transpose(1, 2)),
    "cu_seqlens_q must be int32": dict(cu_seqlens_q=_cu([3, 5]).long()),
    "non-decreasing": dict(cu_seqlens_q=torch.tensor([0, 5, 3, 8], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 3, 5, 8], dtype=torch.int32)),
    "must equal the number of tokens": dict(cu_seqlens_k=torch.tensor([0, 3, 7], dtype=torch.int32)),
    "\\[0\\] must be 0": dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)),
    "both be \\[num_seqs \\+ 1\\]": dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)),
    "max_seqlen_q": dict(max_seqlen_q=4),
    "max_seqlen_k": dict(max_seqlen_k=2),
}


@pytest.mark.parametrize("message", list(VARLEN_BAD))
def test_varlen_rejects_malformed_inputs(message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lenserve.varlen_attention(*_varlen_args(**VARLEN_BAD[message]))


def _decode_args(**overrides):
    args = dict(
        q=torch.randn(2, 4, 64),
        k_cache=torch.randn(6, 16, 2, 64).half(),
        v_cache=torch.randn(6, 16, 2, 64).half(),
        block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        context_lens=torch.tensor([20, 3], dtype=torch.int32),
        softmax_scale=0.125,
    )
    args.update(overrides)
    return list(args.values())


DECODE_BAD = {
    "block_tables\\[1, 0\\] = 6": dict(block_tables=torch.tensor([[0, 1], [6, 3]], dtype=torch.int32)),
    "block_tables\\[0, 1\\] = -1": dict(block_tables=torch.tensor([[0, -1], [2, 3]], dtype=torch.int32)),
    "context_lens\\[0\\] = 33": dict(context_lens=torch.tensor([33, 3], dtype=torch.int32)),
    "context_lens\\[1\\] = -1": dict(context_lens=torch.tensor([20, -1], dtype=torch.int32)),
    "block_tables must be a contiguous int32": dict(block_tables=torch.tensor([[0, 1], [2, 3]])),
    "context_lens must be a contiguous int32": dict(context_lens=torch.tensor([20, 3])),
    "one row per sequence": dict(context_lens=torch.tensor([20], dtype=torch.int32)),
    "shapes differ": dict(v_cache=torch.randn(6, 16, 1, 64).half()),
    "dtypes differ": dict(v_cache=torch.randn(6, 16, 2, 64)),
    "multiple of num_kv_heads": dict(q=torch.randn(2, 3, 64)),
    "cache head_dim": dict(q=torch.randn(2, 4, 128)),
    "k_cache must be \\[num_blocks": dict(k_cache=torch.randn(6, 16, 128).half()),
    "float32, bfloat16 or float16": dict(q=torch.randn(2, 4, 64).double()),
}


@pytest.mark.parametrize("message", list(DECODE_BAD))
def test_paged_decode_rejects_malformed_inputs(message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lenserve.paged_decode_attention(*_decode_args(**DECODE_BAD[message]))


def test_ops_pass_torch_library_checks():
    """Schema, fake (meta) implementation and dispatch agree, so the ops trace under torch.compile."""
    torch.library.opcheck(torch.ops.lenserve.varlen_attention.default, _varlen_args())
    torch.library.opcheck(torch.ops.lenserve.paged_decode_attention.default, _decode_args())
