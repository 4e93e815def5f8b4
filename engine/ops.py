"""Elementwise and normalisation ops of the model: lenserve._C kernels where built, else torch.

Each function has one meaning; the torch versions below are the reference the kernels are tested
against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lenserve.engine._ext import has_op


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if has_op("rms_norm", x.device):
        return torch.ops.lenserve.rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual += x; x = rms_norm(residual) * weight."""
    if has_op("fused_add_rms_norm", x.device):
        torch.ops.lenserve.fused_add_rms_norm(x, residual, weight, eps)
        return
    residual.add_(x)
    x.copy_(rms_norm_ref(residual, weight, eps))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if has_op("silu_and_mul", x.device):
        return torch.ops.lenserve.silu_and_mul(x)
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head_dim: int, cos_sin_cache: torch.Tensor
) -> None:
    """NeoX-style rotation in place of q [T, H*hd] and k [T, KVH*hd]."""
    cos_sin = cos_sin_cache[positions]
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    for x in (q, k):
        xv = x.view(x.shape[0], -1, head_dim)
        x1, x2 = xv[..., :half].float(), xv[..., half : 2 * half].float()
        out1 = x1 * cos - x2 * sin
        out2 = x2 * cos + x1 * sin
        xv[..., :half] = out1.to(x.dtype)
        xv[..., half : 2 * half] = out2.to(x.dtype)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head_dim: int, cos_sin_cache: torch.Tensor) -> None:
    if has_op("rotary_embedding", q.device):
        torch.ops.lenserve.rotary_embedding(positions, q, k, head_dim, cos_sin_cache, True)
        return
    rotary_embedding_ref(positions, q, k, head_dim, cos_sin_cache)


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Writes key/value [T, KVH, hd] into the paged caches [num_blocks, block_size, KVH, hd] at slot_mapping."""
    if has_op("reshape_and_cache", key.device):
        torch.ops.lenserve.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
        return
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    kc = key_cache.view(-1, *key_cache.shape[2:])
    vc = value_cache.view(-1, *value_cache.shape[2:])
    kc[slots] = key[valid].to(kc.dtype)
    vc[slots] = value[valid].to(vc.dtype)
