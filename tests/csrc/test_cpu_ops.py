"""lenserve._C's small CPU ops against the torch references in lenserve.engine.ops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lenserve.engine import ops
from lenserve.engine._ext import has_op

pytestmark = pytest.mark.skipif(not has_op("rms_norm", "cpu"), reason="lenserve._C is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2), torch.float16: dict(atol=2e-3, rtol=1e-3)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,d", [(1, 1536), (32, 1536), (5, 13), (300, 64)])
def test_silu_and_mul(dtype, num_tokens, d):
    x = (3 * torch.randn(num_tokens, 2 * d, generator=torch.Generator().manual_seed(d))).to(dtype)
    out = torch.ops.lenserve.silu_and_mul(x)
    ref = (F.silu(x[:, :d].float()) * x[:, d:].float()).to(dtype)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_silu_and_mul_extremes():
    x = torch.tensor([[-1000.0, -88.0, -20.0, 0.0, 20.0, 88.0, 1000.0, 1.0] + [2.0] * 8])
    out = torch.ops.lenserve.silu_and_mul(x)
    ref = F.silu(x[:, :8]) * x[:, 8:]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 576, generator=gen).to(dtype)
    w = torch.randn(576, generator=gen).to(dtype)
    torch.testing.assert_close(torch.ops.lenserve.rms_norm(x, w, 1e-5), ops.rms_norm_ref(x, w, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(19, 576, generator=gen).to(dtype)
    residual = torch.randn(19, 576, generator=gen).to(dtype)
    w = torch.randn(576, generator=gen).to(dtype)
    exp_residual = (residual.float() + x.float()).to(dtype)
    exp_x = ops.rms_norm_ref(exp_residual, w, 1e-6)
    torch.ops.lenserve.fused_add_rms_norm(x, residual, w, 1e-6)
    torch.testing.assert_close(residual, exp_residual, **TOL[dtype])
    torch.testing.assert_close(x, exp_x, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_embedding_on_strided_views(dtype):
    gen = torch.Generator().manual_seed(2)
    num_tokens, num_heads, num_kv_heads, head_dim = 11, 9, 3, 64
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, 100, (num_tokens,), generator=gen)
    cos_sin = torch.randn(128, head_dim, generator=gen)
    q, k = qkv[:, : num_heads * head_dim], qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim]
    q_ref, k_ref = q.clone(), k.clone()
    ops.rotary_embedding_ref(positions, q_ref, k_ref, head_dim, cos_sin)
    torch.ops.lenserve.rotary_embedding(positions, q, k, head_dim, cos_sin, True)
    torch.testing.assert_close(q, q_ref, **TOL[dtype])
    torch.testing.assert_close(k, k_ref, **TOL[dtype])


@pytest.mark.parametrize("src_dtype,cache_dtype", [(torch.float32, torch.float16), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_reshape_and_cache(src_dtype, cache_dtype):
    gen = torch.Generator().manual_seed(3)
    key = torch.randn(6, 3, 64, generator=gen).to(src_dtype)
    value = torch.randn(6, 3, 64, generator=gen).to(src_dtype)
    slots = torch.tensor([5, 0, -1, 17, 31, 2])
    caches = [torch.zeros(2, 16, 3, 64, dtype=cache_dtype) for _ in range(4)]
    torch.ops.lenserve.reshape_and_cache(key, value, caches[0], caches[1], slots)
    valid = slots >= 0
    caches[2].view(-1, 3, 64)[slots[valid]] = key[valid].to(cache_dtype)
    caches[3].view(-1, 3, 64)[slots[valid]] = value[valid].to(cache_dtype)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_reshape_and_cache_rejects_slot_outside_cache():
    cache = torch.zeros(2, 16, 3, 64)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.lenserve.reshape_and_cache(torch.randn(1, 3, 64), torch.randn(1, 3, 64), cache, cache.clone(), torch.tensor([32]))
