"""Fake (meta) implementations of lenserve's operators so they trace under torch.compile."""
from __future__ import annotations

import torch


def _register(name: str, fn) -> None:
    qualname = f"lenserve::{name}"
    try:
        torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    except RuntimeError:
        return  # the extension does not define this op
    try:
        torch.library.register_fake(qualname)(fn)
    except RuntimeError:
        pass  # already registered (module reloaded)


def _rms_norm(input, weight, eps):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _inplace(*args, **kwargs):
    return None


def _silu_and_mul(x):
    return x.new_empty(x.shape[0], x.shape[1] // 2)


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return torch.empty_like(q)


def _varlen_attention_indexed(q, k, v, k_index, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return torch.empty_like(q)


def _paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, softmax_scale):
    return torch.empty_like(q)


def _pack_linear_weight(weight):
    return weight.new_empty(-(-weight.shape[0] // 16), weight.shape[1], 16)


def _packed_linear(x, packed, out_features, bias):
    return x.new_empty(x.shape[0], out_features)


def _quant_linear(x, weight, weight_type, out_features, bias):
    return x.new_empty(x.shape[0], out_features)


def _quant_embedding(ids, weight, weight_type, dim):
    return weight.new_empty(ids.shape[0], dim, dtype=torch.float32)


def _decode_layer(hidden, residual, *args):
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


_register("rms_norm", _rms_norm)
_register("fused_add_rms_norm", _inplace)
_register("silu_and_mul", _silu_and_mul)
_register("rotary_embedding", _inplace)
_register("reshape_and_cache", _inplace)
_register("varlen_attention", _varlen_attention)
_register("varlen_attention_indexed", _varlen_attention_indexed)
_register("paged_decode_attention", _paged_decode_attention)
_register("pack_linear_weight", _pack_linear_weight)
_register("packed_linear", _packed_linear)
_register("quant_linear", _quant_linear)
_register("quant_embedding", _quant_embedding)
_register("quant_interleave", _inplace)
_register("decode_layer", _decode_layer)
_register("decode_layers", _decode_layer)
