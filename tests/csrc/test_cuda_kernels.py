"""lenserve._C's CUDA kernels against the fp32 references (GPU only; skipped without CUDA).

Attention accuracy is judged the way FlashAttention's tests judge it: on the same low-precision
inputs, the kernel's largest error against an fp32 reference must be at most twice the error of
torch SDPA run in that same dtype.
"""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from lenserve.engine import attention, ops
from lenserve.engine._ext import has_op

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16]
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NUM_KV_HEADS = 2
SLACK = 1e-5  # an absolute floor for cases where SDPA happens to be exact


@pytest.fixture(scope="module", autouse=True)
def _cuda_kernels_built():
    if not has_op("varlen_attention", DEV):
        pytest.fail("lenserve._C has no CUDA kernels: rebuild with LENSERVE_CUDA=1 pip install --no-build-isolation -e .")


def _lengths(mix: str, rng: random.Random) -> list[int]:
    if mix == "ones":
        return [1, 1, 2, 1, 3, 64, 65, 1]
    if mix == "primes":
        return [2, 3, 5, 7, 11, 13, 17, 31, 61, 127, 257, 509, 1021]
    if mix == "long_among_short":
        lens = [rng.randint(1, 40) for _ in range(40)]
        lens.insert(rng.randrange(len(lens)), 2048)
        return lens
    if mix == "uniform":
        return [rng.randint(1, 2048) for _ in range(6)]
    raise ValueError(mix)


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEV)


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.float() - ref.float()).abs().max().item()


def _check_varlen(q, k, v, lens_q, lens_k, causal, max_seqlen_q=None):
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    max_q, max_k = max(lens_q), max(lens_k)
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.ops.lenserve.varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q or max_q, max_k, scale, causal)
    ref = attention.reference_varlen_attention(q.float(), k.float(), v.float(), cu_q, cu_k, max_q, max_k, scale, causal)
    # Rows that see no key are NaN in SDPA and zeros in the reference and the kernel.
    sdpa = torch.nan_to_num(attention._sdpa_varlen(q, k, v, cu_q, cu_k, scale, causal))
    assert out.shape == q.shape and out.dtype == q.dtype
    err, sdpa_err = _max_err(out, ref), _max_err(sdpa, ref)
    assert err <= 2 * sdpa_err + SLACK, f"kernel error {err:.3g} > 2 x SDPA error {sdpa_err:.3g}"


@pytest.mark.parametrize("mix", ["ones", "primes", "long_among_short", "uniform"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention_matches_reference(dtype, head_dim, group, causal, mix):
    rng = random.Random(f"{mix}-{head_dim}-{group}-{causal}")
    torch.manual_seed(rng.randrange(1 << 30))
    lens = _lengths(mix, rng)
    total, num_heads = sum(lens), NUM_KV_HEADS * group
    q = torch.randn(total, num_heads, head_dim, device=DEV, dtype=dtype)
    k = torch.randn(total, NUM_KV_HEADS, head_dim, device=DEV, dtype=dtype)
    v = torch.randn(total, NUM_KV_HEADS, head_dim, device=DEV, dtype=dtype)
    _check_varlen(q, k, v, lens, lens, causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention_with_cached_context(dtype, head_dim, causal):
    """Chunked prefill: more keys than queries, causal aligned bottom-right."""
    torch.manual_seed(1)
    lens_q = [1, 7, 64, 100, 333, 5]
    lens_k = [1, 70, 64, 1100, 400, 2048]
    q = torch.randn(sum(lens_q), 6, head_dim, device=DEV, dtype=dtype)
    k = torch.randn(sum(lens_k), 2, head_dim, device=DEV, dtype=dtype)
    v = torch.randn(sum(lens_k), 2, head_dim, device=DEV, dtype=dtype)
    _check_varlen(q, k, v, lens_q, lens_k, causal)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_attention_rows_without_keys_are_zero(head_dim):
    """Causal with fewer keys than queries: the first rows see nothing; empty sequences are fine."""
    torch.manual_seed(2)
    lens_q = [100, 3, 0, 130, 4]
    lens_k = [30, 0, 5, 129, 0]
    q = torch.randn(sum(lens_q), 4, head_dim, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(sum(lens_k), 2, head_dim, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(sum(lens_k), 2, head_dim, device=DEV, dtype=torch.bfloat16)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    out = torch.ops.lenserve.varlen_attention(q, k, v, cu_q, cu_k, 130, 129, 0.125, True)
    assert torch.isfinite(out).all()
    assert out[:70].abs().max() == 0  # sequence 0: rows 0..69 see no key
    assert out[70:100].abs().min() > 0
    assert out[100:103].abs().max() == 0  # sequence 1 has no keys
    assert out[103].abs().max() == 0  # row 0 of sequence 3 sees no key
    assert out[233:].abs().max() == 0  # sequence 4 has no keys
    # SDPA has no answer for key-less sequences, so compare with the reference directly.
    ref = attention.reference_varlen_attention(q.float(), k.float(), v.float(), cu_q, cu_k, 130, 129, 0.125, True)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_attention_on_views_of_fused_qkv(head_dim):
    """q/k/v as the model passes them: views into one [tokens, (H + 2 KVH) * head_dim] projection."""
    torch.manual_seed(3)
    lens = [17, 1, 300, 64]
    num_heads, num_kv_heads = 9, 3
    qkv = torch.randn(sum(lens), (num_heads + 2 * num_kv_heads) * head_dim, device=DEV, dtype=torch.bfloat16)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(-1, num_heads, head_dim)
    k = k.view(-1, num_kv_heads, head_dim)
    v = v.view(-1, num_kv_heads, head_dim)
    _check_varlen(q, k, v, lens, lens, True)
    out_views = torch.ops.lenserve.varlen_attention(q, k, v, _cu(lens), _cu(lens), 300, 300, 0.1, True)
    out_contig = torch.ops.lenserve.varlen_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), _cu(lens), _cu(lens), 300, 300, 0.1, True
    )
    assert torch.equal(out_views, out_contig)


def test_varlen_attention_max_seqlen_is_an_upper_bound():
    torch.manual_seed(4)
    lens = [5, 80]
    q = torch.randn(85, 2, 64, device=DEV, dtype=torch.float16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    a = torch.ops.lenserve.varlen_attention(q, k, v, _cu(lens), _cu(lens), 80, 80, 0.125, True)
    b = torch.ops.lenserve.varlen_attention(q, k, v, _cu(lens), _cu(lens), 4096, 4096, 0.125, True)
    assert torch.equal(a, b)


def test_varlen_attention_on_a_side_stream():
    torch.manual_seed(5)
    lens = [700, 33]
    q = torch.randn(sum(lens), 8, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(sum(lens), 2, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(sum(lens), 2, 128, device=DEV, dtype=torch.bfloat16)
    expected = torch.ops.lenserve.varlen_attention(q, k, v, _cu(lens), _cu(lens), 700, 700, 0.09, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = torch.ops.lenserve.varlen_attention(q, k, v, _cu(lens), _cu(lens), 700, 700, 0.09, True)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(out, expected)


def test_decode_ops_capture_in_a_cuda_graph():
    """Capture fails if a kernel launches anywhere but the current (capturing) stream."""
    q, k_cache, v_cache, tables, lens = _paged_batch([3000, 17], 8, 2, 128, 16, torch.bfloat16, seed=13)
    x = torch.randn(2, 576, device=DEV, dtype=torch.bfloat16)
    weight = torch.rand(576, device=DEV, dtype=torch.bfloat16)

    def step():
        return (
            torch.ops.lenserve.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1),
            torch.ops.lenserve.rms_norm(x, weight, 1e-6),
        )

    expected = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside capture, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], expected[0])
    assert torch.equal(captured[1], expected[1])


# ---- paged decode ------------------------------------------------------------------------------
def _paged_batch(context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, pad_blocks=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in context_lens]
    max_blocks = max(blocks_per_seq) + pad_blocks
    num_blocks = sum(blocks_per_seq) + 7
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)  # padding is never read
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(DEV, dtype)
    v_cache = torch.randn(shape, generator=gen).to(DEV, dtype)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen).to(DEV, dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEV)
    return q, k_cache, v_cache, tables.to(DEV), lens


@pytest.mark.parametrize(
    "context_lens",
    [[1, 2, 15, 16, 17, 100], [511, 512, 513, 1024, 1031], [4099, 1, 8192, 37], [16384]],
    ids=["short", "partition_edges", "long_split_k", "one_very_long"],
)
@pytest.mark.parametrize("group", [1, 3, 8, 16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_paged_decode_matches_reference(dtype, head_dim, group, context_lens):
    block_size = 16 if head_dim == 64 else 32
    q, k_cache, v_cache, tables, lens = _paged_batch(
        context_lens, 2 * group, 2, head_dim, block_size, dtype, seed=len(context_lens) * group + head_dim
    )
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.ops.lenserve.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    ref = attention.reference_paged_decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    else:
        sdpa = attention._sdpa_paged_decode(q, k_cache, v_cache, tables, lens, scale)
        err, sdpa_err = _max_err(out, ref), _max_err(sdpa, ref)
        assert err <= 2 * sdpa_err + SLACK, f"kernel error {err:.3g} > 2 x SDPA error {sdpa_err:.3g}"


def test_paged_decode_on_a_strided_query_view():
    q, k_cache, v_cache, tables, lens = _paged_batch([900, 3], 6, 2, 64, 16, torch.bfloat16, seed=9)
    wide = torch.zeros(q.shape[0], q.shape[1] + 4, 64, device=DEV, dtype=torch.bfloat16)
    wide[:, :6] = q
    a = torch.ops.lenserve.paged_decode_attention(wide[:, :6], k_cache, v_cache, tables, lens, 0.125)
    b = torch.ops.lenserve.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    assert torch.equal(a, b)


def test_paged_decode_batch_equals_each_sequence_alone():
    q, k_cache, v_cache, tables, lens = _paged_batch([3000, 17, 600], 8, 2, 128, 16, torch.bfloat16, pad_blocks=0, seed=11)
    batched = torch.ops.lenserve.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1)
    for i in range(3):
        n_blocks = math.ceil(int(lens[i]) / 16)
        alone = torch.ops.lenserve.paged_decode_attention(
            q[i : i + 1], k_cache, v_cache, tables[i : i + 1, :n_blocks], lens[i : i + 1], 0.1
        )
        # Alone, the table is narrower, so the split count may differ: equal up to rounding.
        torch.testing.assert_close(alone[0], batched[i], atol=1e-2, rtol=1e-2)


# ---- reshape_and_cache -------------------------------------------------------------------------
@pytest.mark.parametrize("cache_dtype", ALL_DTYPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_reshape_and_cache(dtype, cache_dtype):
    torch.manual_seed(6)
    num_tokens, num_kv_heads, head_dim, num_blocks, block_size = 37, 3, 64, 10, 16
    kv = torch.randn(num_tokens, 2 * num_kv_heads * head_dim, device=DEV, dtype=dtype)  # strided views
    key = kv[:, : num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = kv[:, num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, device=DEV)[:num_tokens]
    slots[::5] = -1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.zeros(shape, device=DEV, dtype=cache_dtype)
    v_cache = torch.zeros(shape, device=DEV, dtype=cache_dtype)
    torch.ops.lenserve.reshape_and_cache(key, value, k_cache, v_cache, slots)
    valid = slots >= 0
    expected_k = torch.zeros_like(k_cache).view(-1, num_kv_heads, head_dim)
    expected_v = torch.zeros_like(v_cache).view(-1, num_kv_heads, head_dim)
    expected_k[slots[valid]] = key[valid].to(cache_dtype)
    expected_v[slots[valid]] = value[valid].to(cache_dtype)
    assert torch.equal(k_cache.view(-1, num_kv_heads, head_dim), expected_k)
    assert torch.equal(v_cache.view(-1, num_kv_heads, head_dim), expected_v)


# ---- model ops ---------------------------------------------------------------------------------
# Two ulps: the kernels round where the references round, but fast-math exp and rsqrt may move an
# intermediate by one ulp of the dtype before the last rounding.
_RTOL = {torch.float32: 2e-6, torch.bfloat16: 2**-6, torch.float16: 2**-9}


def _close(out: torch.Tensor, expected: torch.Tensor, fp32_rtol: float = _RTOL[torch.float32]) -> None:
    rtol = fp32_rtol if out.dtype == torch.float32 else _RTOL[out.dtype]
    torch.testing.assert_close(out.cpu(), expected.cpu(), atol=1e-5, rtol=rtol)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("hidden", [576, 4096, 1000])
def test_rms_norm(dtype, hidden):
    torch.manual_seed(7)
    x = torch.randn(33, hidden + 8, device=DEV, dtype=dtype)[:, :hidden]  # strided rows
    weight = torch.rand(hidden, device=DEV, dtype=dtype) + 0.5
    out = torch.ops.lenserve.rms_norm(x, weight, 1e-5)
    _close(out, ops.rms_norm_ref(x, weight, 1e-5))
    if has_op("rms_norm", "cpu"):
        _close(out, torch.ops.lenserve.rms_norm(x.cpu(), weight.cpu(), 1e-5))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_fused_add_rms_norm(dtype):
    torch.manual_seed(8)
    x = torch.randn(19, 576, device=DEV, dtype=dtype)
    residual = torch.randn(19, 576, device=DEV, dtype=dtype)
    weight = torch.rand(576, device=DEV, dtype=dtype) + 0.5
    exp_residual = residual + x
    exp_x = ops.rms_norm_ref(exp_residual, weight, 1e-6)
    torch.ops.lenserve.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(residual, exp_residual)
    _close(x, exp_x)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_silu_and_mul(dtype):
    torch.manual_seed(9)
    x = torch.randn(21, 2 * 1536, device=DEV, dtype=dtype) * 4
    x[0, :8] = torch.tensor([-100.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 100.0, 3.0], dtype=dtype)
    out = torch.ops.lenserve.silu_and_mul(x)
    d = x.shape[1] // 2
    # Computed in fp32 and rounded once, like the CPU kernel; ops.silu_and_mul's torch path rounds twice.
    expected = (F.silu(x[:, :d].float()) * x[:, d:].float()).to(dtype)
    _close(out, expected, fp32_rtol=1e-5)  # __expf is a few ulps off expf
    # engine/ops.py's torch path rounds silu before the product: within one more bf16/fp16 rounding.
    torch.testing.assert_close(out, F.silu(x[:, :d]) * x[:, d:], atol=1e-5, rtol=2e-2)
    if has_op("silu_and_mul", "cpu"):
        _close(out, torch.ops.lenserve.silu_and_mul(x.cpu()), fp32_rtol=1e-5)


def _cos_sin_cache(max_pos: int, rot_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEV)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rot_dim", [64, 32])
def test_rotary_embedding_neox_on_qkv_views(dtype, rot_dim):
    torch.manual_seed(10)
    num_tokens, num_heads, num_kv_heads, head_dim = 29, 9, 3, 64
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEV, dtype=dtype)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 4096, (num_tokens,), device=DEV)
    cache = _cos_sin_cache(4096, rot_dim)
    q_ref, k_ref = q.clone(), k.clone()
    ops.rotary_embedding_ref(positions, q_ref, k_ref, head_dim, cache)
    torch.ops.lenserve.rotary_embedding(positions, q, k, head_dim, cache, True)
    _close(q, q_ref)
    _close(k, k_ref)


def test_rotary_embedding_gptj_style():
    torch.manual_seed(11)
    q = torch.randn(5, 2 * 64, device=DEV)
    k = torch.randn(5, 64, device=DEV)
    positions = torch.tensor([0, 1, 7, 100, 2047], device=DEV)
    cache = _cos_sin_cache(2048, 64)
    expected = []
    for x in (q, k):
        xv = x.view(5, -1, 64)
        cos, sin = cache[positions][:, None, :32], cache[positions][:, None, 32:]
        x1, x2 = xv[..., 0::2], xv[..., 1::2]
        expected.append(torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).view_as(x))
    torch.ops.lenserve.rotary_embedding(positions, q, k, 64, cache, False)
    _close(q, expected[0])
    _close(k, expected[1])


# ---- the engine's attention layer on CUDA ------------------------------------------------------
def test_attention_layer_mixed_prefill_and_decode_on_kernels():
    """The engine's own call pattern (views, slices, paged cache) through the kernels vs torch."""
    torch.manual_seed(12)
    num_heads, num_kv_heads, head_dim, block_size, dtype = 9, 3, 64, 16, torch.bfloat16
    prefill_lens, decode_ctx = [37, 300], [700, 1, 2000]
    num_blocks = 400
    # Random caches stand for the decode sequences' cached context; the step writes its new tokens.
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=DEV, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    free = torch.randperm(num_blocks).tolist()
    tables, slots, ctx = [], [], []
    for n in prefill_lens + decode_ctx:
        tables.append([free.pop() for _ in range(math.ceil(n / block_size))])
        ctx.append(n)
    for blocks, n in zip(tables[:2], prefill_lens):
        slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(n))
    for blocks, n in zip(tables[2:], decode_ctx):
        slots.append(blocks[(n - 1) // block_size] * block_size + (n - 1) % block_size)
    max_blocks = max(len(t) for t in tables)
    table = torch.zeros(len(tables), max_blocks, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    num_tokens = sum(prefill_lens) + len(decode_ctx)
    meta = attention.AttentionMetadata(
        cu_seqlens_q=_cu(prefill_lens + [1] * len(decode_ctx)),
        cu_seqlens_k=_cu(ctx),
        max_seqlen_q=max(prefill_lens),
        max_seqlen_k=max(ctx),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEV),
        block_tables=table.to(DEV),
        context_lens=torch.tensor(ctx, dtype=torch.int32, device=DEV),
        num_prefill_tokens=sum(prefill_lens),
        num_prefill_seqs=len(prefill_lens),
        prefill_max_seqlen_q=max(prefill_lens),
        prefill_max_seqlen_k=max(prefill_lens),
    )
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEV, dtype=dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k, v = q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim), v.view(-1, num_kv_heads, head_dim)
    outs = {}
    for backend in ("kernels", "torch"):
        layer = attention.Attention(num_heads, num_kv_heads, head_dim, backend)
        outs[backend] = layer(q, k, v, k_cache.clone(), v_cache.clone(), meta)
    torch.testing.assert_close(outs["kernels"], outs["torch"], atol=2e-2, rtol=2e-2)


# ---- malformed inputs --------------------------------------------------------------------------
def _varlen_args(**override):
    lens = [3, 5]
    args = dict(
        q=torch.randn(8, 4, 64, device=DEV, dtype=torch.bfloat16),
        k=torch.randn(8, 2, 64, device=DEV, dtype=torch.bfloat16),
        v=torch.randn(8, 2, 64, device=DEV, dtype=torch.bfloat16),
        cu_seqlens_q=_cu(lens),
        cu_seqlens_k=_cu(lens),
        max_seqlen_q=5,
        max_seqlen_k=5,
        softmax_scale=0.125,
        causal=True,
    )
    args.update({name: make() for name, make in override.items()})
    return list(args.values())


def _bf16(*shape, device=None):
    return torch.randn(*shape, device=device or DEV, dtype=torch.bfloat16)


def _int32(values, device=None):
    return torch.tensor(values, dtype=torch.int32, device=device or DEV)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(q=lambda: torch.randn(8, 4, 64, device=DEV)), "float16 or bfloat16"),
        (dict(q=lambda: _bf16(8, 4, 96)), "head_dim 64 and 128"),
        (dict(k=lambda: _bf16(8, 2, 64).half()), "same dtype"),
        (dict(q=lambda: _bf16(8, 3, 64)), "multiple of num_kv_heads"),
        (dict(v=lambda: _bf16(7, 2, 64)), "v must have shape"),
        (dict(k=lambda: _bf16(8, 2, 64, device="cpu")), "same device"),
        (dict(cu_seqlens_q=lambda: torch.tensor([0, 3, 8], device=DEV)), "cu_seqlens_q must be Int"),
        (dict(cu_seqlens_q=lambda: _int32([0, 3, 8], device="cpu")), "same device"),
        (dict(cu_seqlens_q=lambda: _int32([0, 6, 3, 8])), r"num_seqs \+ 1 entries"),
        (dict(q=lambda: _bf16(8, 64, 4).transpose(1, 2)), "contiguous in its last"),
        (dict(q=lambda: _bf16(8, 4, 65)[..., 1:]), "multiples of 8"),
        (dict(max_seqlen_q=lambda: -1), "must be >= 0"),
    ],
)
def test_varlen_attention_rejects_malformed_inputs(override, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lenserve.varlen_attention(*_varlen_args(**override))


def _decode_args(**override):
    q, k_cache, v_cache, tables, lens = _paged_batch([20, 40], 4, 2, 64, 16, torch.bfloat16)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, context_lens=lens, softmax_scale=0.125)
    args.update({name: make(args) for name, make in override.items()})
    return list(args.values())


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(q=lambda a: a["q"][:, :3]), "multiple of num_kv_heads"),
        (dict(block_tables=lambda a: a["block_tables"].long()), "block_tables must be Int"),
        (dict(context_lens=lambda a: a["context_lens"][:1]), "context_lens has 1 entries"),
        (dict(v_cache=lambda a: a["v_cache"][:, :8]), "v_cache must have shape"),
        (dict(v_cache=lambda a: a["v_cache"].half()), "one float dtype"),
        (dict(k_cache=lambda a: a["k_cache"].transpose(0, 1).contiguous().transpose(0, 1)), "k_cache must be contiguous"),
        (dict(q=lambda a: torch.randn(2, 4, 80, device=DEV, dtype=torch.bfloat16)), "head_dim 64 and 128"),
        (dict(context_lens=lambda a: a["context_lens"].cpu()), "same device"),
    ],
)
def test_paged_decode_rejects_malformed_inputs(override, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lenserve.paged_decode_attention(*_decode_args(**override))


def test_small_ops_reject_malformed_inputs():
    x = torch.randn(4, 64, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.lenserve.rms_norm(x, torch.ones(64, device=DEV), 1e-6)
    with pytest.raises(RuntimeError, match="weight size"):
        torch.ops.lenserve.rms_norm(x, torch.ones(32, device=DEV, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="must be even"):
        torch.ops.lenserve.silu_and_mul(x[:, :63].contiguous())
    with pytest.raises(RuntimeError, match="slot_mapping must be Long"):
        kv = x.view(4, 1, 64)
        cache = torch.zeros(2, 4, 1, 64, device=DEV, dtype=torch.bfloat16)
        torch.ops.lenserve.reshape_and_cache(kv, kv, cache, cache.clone(), torch.zeros(4, dtype=torch.int32, device=DEV))
    with pytest.raises(RuntimeError, match="cos_sin_cache must be Float"):
        torch.ops.lenserve.rotary_embedding(
            torch.zeros(4, dtype=torch.long, device=DEV), x, x.clone(), 64, torch.ones(8, 64, device=DEV, dtype=torch.bfloat16), True
        )


# ---- issue 22: GQA groups, block sizes, moving maxima, cache dtypes, strides, split plans --------
# cu_seqlens values are validated on the host (engine/attention.py's check_varlen_metadata, tested
# on CPU); the op takes them on trust, so a grid sized by a max_seqlen_q bound is all it needs.
@pytest.mark.parametrize("group", [1, 2, 3, 4, 7, 8, 12])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_attention_gqa_groups(group, head_dim):
    torch.manual_seed(100 + group)
    lens_q, lens_k = [1, 37, 200, 64], [1, 37, 900, 64]  # q_len < k_len in one sequence
    q = torch.randn(sum(lens_q), 2 * group, head_dim, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(sum(lens_k), 2, head_dim, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    _check_varlen(q, k, v, lens_q, lens_k, True)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 7, 8, 12])
def test_varlen_attention_q_shorter_than_k(group):
    """Chunked prefill at several GQA groups: every query row sees keys up to its own position."""
    torch.manual_seed(200 + group)
    lens_q = [5, 128, 1, 77]
    lens_k = [300, 129, 1000, 2000]
    q = torch.randn(sum(lens_q), group, 128, device=DEV, dtype=torch.float16)
    k = torch.randn(sum(lens_k), 1, 128, device=DEV, dtype=torch.float16)
    v = torch.randn_like(k)
    _check_varlen(q, k, v, lens_q, lens_k, True)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 7, 8, 12])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_decode_gqa_groups(group, head_dim):
    q, k_cache, v_cache, tables, lens = _paged_batch([1, 100, 777, 3000], 2 * group, 2, head_dim, 16, torch.bfloat16, seed=group)
    _check_decode(q, k_cache, v_cache, tables, lens)


@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
def test_paged_decode_block_sizes(block_size):
    q, k_cache, v_cache, tables, lens = _paged_batch([1, 8, 129, 1000, 4097], 8, 2, 128, block_size, torch.bfloat16, seed=block_size)
    _check_decode(q, k_cache, v_cache, tables, lens)


def _check_decode(q, k_cache, v_cache, tables, lens):
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.ops.lenserve.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    ref = attention.reference_paged_decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens, scale)
    sdpa = attention._sdpa_paged_decode(q, k_cache.to(q.dtype), v_cache.to(q.dtype), tables, lens, scale)
    err, sdpa_err = _max_err(out, ref), _max_err(sdpa, ref)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    assert err <= 2 * sdpa_err + SLACK, f"kernel error {err:.3g} > 2 x SDPA error {sdpa_err:.3g}"


def test_varlen_attention_rising_logits_move_the_max_across_key_tiles():
    """Scores that rise along the keys: each key tile raises the running maximum, so every tile's
    rescaling of the accumulator is exercised (a missed rescale shows as a large error)."""
    torch.manual_seed(300)
    n, hd = 700, 128
    pos = torch.arange(n, device=DEV, dtype=torch.float32)
    q = torch.zeros(n, 4, hd, device=DEV)
    q[..., 0] = 1.0
    k = torch.randn(n, 2, hd, device=DEV) * 0.1
    k[..., 0] = pos[:, None] * 0.05  # logit of key j = 0.05 j / sqrt(hd) * scale: rising
    v = torch.randn(n, 2, hd, device=DEV)
    _check_varlen(q.bfloat16(), k.bfloat16(), v.bfloat16(), [n], [n], True)
    _check_varlen(q.bfloat16(), k.bfloat16(), v.bfloat16(), [n], [n], False)


@pytest.mark.parametrize("context_len", [1000, 4000, 8192])
def test_paged_decode_spike_in_the_last_partition(context_len):
    """Rising scores plus one key far above the rest in the last split-K partition: the reduce must
    weight that partition by its log-sum-exp, the others by almost nothing."""
    q, k_cache, v_cache, tables, lens = _paged_batch([context_len], 8, 2, 128, 16, torch.float32, pad_blocks=0, seed=7)
    flat_k = k_cache.view(-1, 2, 128)
    q.zero_()
    q[..., 0] = 1.0
    slots = [int(tables[0, t // 16]) * 16 + t % 16 for t in range(context_len)]
    for t, slot in enumerate(slots):
        flat_k[slot, :, 0] = t * 4.0 / context_len
    flat_k[slots[-3], :, 0] = 60.0
    _check_decode(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), tables, lens)


def test_paged_decode_reads_a_cache_of_another_dtype():
    """--kv-cache-dtype float16 under bfloat16 weights: q is converted to the cache's dtype."""
    q, k_cache, v_cache, tables, lens = _paged_batch([33, 900], 8, 2, 128, 16, torch.float16, seed=21)
    out = torch.ops.lenserve.paged_decode_attention(q.bfloat16(), k_cache, v_cache, tables, lens, 0.1)
    same = torch.ops.lenserve.paged_decode_attention(q.bfloat16().half(), k_cache, v_cache, tables, lens, 0.1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, same.bfloat16(), atol=0, rtol=0)
    layer_out = attention.paged_decode_attention(q.bfloat16(), k_cache, v_cache, tables, lens, 0.1, "auto")
    assert torch.equal(layer_out, out)


def test_one_kv_head_with_stride_one_views():
    """num_kv_heads = 1: a [tokens, 1, head_dim] view may carry any stride in its size-1 dim."""
    torch.manual_seed(400)
    lens = [10, 90]
    q = torch.randn(100, 4, 64, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(100, 64, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(100, 64, device=DEV, dtype=torch.bfloat16)
    k_odd = k.view(100, 64, 1).transpose(1, 2)  # stride of dim 1 is 1
    v_odd = v.view(100, 64, 1).transpose(1, 2)
    assert k_odd.stride(1) == 1
    out = torch.ops.lenserve.varlen_attention(q, k_odd, v_odd, _cu(lens), _cu(lens), 90, 90, 0.125, True)
    expected = torch.ops.lenserve.varlen_attention(q, k[:, None], v[:, None], _cu(lens), _cu(lens), 90, 90, 0.125, True)
    assert torch.equal(out, expected)
    one = torch.randn(1, 4, 64, device=DEV, dtype=torch.bfloat16)
    torch.ops.lenserve.varlen_attention(one, one[:, :1], one[:, :1], _cu([1]), _cu([1]), 1, 1, 0.125, True)


def test_paged_decode_splits_batch_one_over_the_sms():
    """Batch 1 at a 1,000-key context: the plan splits it over the SMs, and the result matches."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits, part = torch.ops.lenserve.paged_decode_split(1008, 1, 2, 4, sms)
    assert splits > 2 and part < 512
    q, k_cache, v_cache, tables, lens = _paged_batch([1000], 8, 2, 128, 16, torch.bfloat16, pad_blocks=0, seed=31)
    _check_decode(q, k_cache, v_cache, tables, lens)


def test_paged_decode_rejects_more_splits_than_the_grid_holds():
    q, k_cache, v_cache, _, lens = _paged_batch([20], 4, 2, 64, 16, torch.bfloat16)
    tables = torch.zeros(1, 600_000, dtype=torch.int32, device=DEV)  # 9.6M keys of table: 18,750 partitions
    with pytest.raises(RuntimeError, match="split-K partitions"):
        torch.ops.lenserve.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1)


def test_varlen_attention_clamps_bad_cu_seqlens_instead_of_faulting():
    """Metadata past the tokens (never checked on the device) is clamped: no illegal address."""
    q = torch.randn(8, 4, 64, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(8, 2, 64, device=DEV, dtype=torch.bfloat16)
    out = torch.ops.lenserve.varlen_attention(q, k, k, _int32([0, 3, 900]), _int32([0, 5, 1 << 30]), 8, 8, 0.1, True)
    torch.cuda.synchronize()
    assert out.shape == q.shape
