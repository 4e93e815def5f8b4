"""Attention over packed tokens: metadata, backends, and the fp32 references.

Every forward pass attends over all scheduled tokens of all sequences concatenated, located by
prefix sums (cu_seqlens) computed once per step. Prefill sequences come first and go through
`varlen_attention`; single-token (decode) sequences read their context from the paged cache
through `paged_decode_attention`. Both dispatch to lenserve._C's kernels for the tensor's
device when built, else to torch. The `padded` mode is the baseline benchmarks compare
against: every sequence padded to the longest, with a mask, the way a plain HF batch runs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lenserve.engine import ops
from lenserve.engine._ext import has_op

logger = logging.getLogger("lenserve")

BACKENDS = ("auto", "kernels", "torch", "flash-attn")


@dataclass
class AttentionMetadata:
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1], prefix sums of new-token counts
    cu_seqlens_k: torch.Tensor  # int32 [num_seqs + 1], prefix sums of context lengths
    max_seqlen_q: int
    max_seqlen_k: int
    slot_mapping: torch.Tensor  # int64 [num_tokens], KV-cache slot of each new token (-1: padding)
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    context_lens: torch.Tensor  # int32 [num_seqs]
    num_prefill_tokens: int  # prefill tokens come first, then one token per decoding sequence
    num_prefill_seqs: int = 0
    prefill_max_seqlen_q: int = 0
    prefill_max_seqlen_k: int = 0
    # int64 [cu_seqlens_k[num_prefill_seqs]]: cache slots of the prefill sequences' whole contexts,
    # set when some prefill continues a context already in the cache (chunked prefill, prefix hit).
    prefill_kv_slots: torch.Tensor | None = None
    # > 0 in padded mode: each sequence occupies padded_len_q query rows (a [num_seqs, padded_len_q] batch).
    padded_len_q: int = 0

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def num_decode_seqs(self) -> int:
        return self.num_seqs - self.num_prefill_seqs


def check_cu_seqlens(cu_seqlens: list[int], total: int, name: str) -> int:
    """Host-side check of a cu_seqlens list before it goes to the device (the CUDA op never reads it
    back: that would sync the device twice a layer). Returns the longest run."""
    if not cu_seqlens or cu_seqlens[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {cu_seqlens[:1]}")
    longest = 0
    for i in range(len(cu_seqlens) - 1):
        run = cu_seqlens[i + 1] - cu_seqlens[i]
        if run < 0:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i + 1}] = {cu_seqlens[i + 1]} < {name}[{i}] = {cu_seqlens[i]}")
        longest = max(longest, run)
    if cu_seqlens[-1] != total:
        raise ValueError(f"{name}[-1] ({cu_seqlens[-1]}) must equal the number of tokens ({total})")
    return longest


def check_varlen_metadata(cu_seqlens_q: list[int], cu_seqlens_k: list[int], max_seqlen_q: int, max_seqlen_k: int,
                          total_q: int, total_k: int) -> None:
    """What varlen_attention's kernels assume of their metadata, checked on the host lists it came from."""
    if len(cu_seqlens_q) != len(cu_seqlens_k):
        raise ValueError(f"cu_seqlens_q ({len(cu_seqlens_q)}) and cu_seqlens_k ({len(cu_seqlens_k)}) must have num_seqs + 1 entries both")
    longest_q = check_cu_seqlens(cu_seqlens_q, total_q, "cu_seqlens_q")
    longest_k = check_cu_seqlens(cu_seqlens_k, total_k, "cu_seqlens_k")
    if max_seqlen_q < longest_q:
        raise ValueError(f"max_seqlen_q ({max_seqlen_q}) is below the longest query run ({longest_q})")
    if max_seqlen_k < longest_k:
        raise ValueError(f"max_seqlen_k ({max_seqlen_k}) is below the longest key run ({longest_k})")


# ---- fp32 references (what the kernels are tested against) -----------------------------------------
def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be [total_tokens, num_heads, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} shapes differ")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head_dim {q.shape[2]} != k head_dim {k.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"num_heads ({q.shape[1]}) must be a multiple of num_kv_heads ({k.shape[1]})")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length")
    if int(cu_seqlens_q[-1]) != q.shape[0] or int(cu_seqlens_k[-1]) != k.shape[0]:
        raise ValueError("the last entry of cu_seqlens must equal the number of tokens")


def reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
) -> torch.Tensor:
    """Plain fp32 attention per sequence; causal is aligned bottom-right (the last query sees every key)."""
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k)
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qs, ks = q[cq[i] : cq[i + 1]].float(), k[ck[i] : ck[i + 1]].float()
        vs = v[ck[i] : ck[i + 1]].float()
        lq, lk = qs.shape[0], ks.shape[0]
        if lq == 0:
            continue
        ks = ks.repeat_interleave(group, dim=1)
        vs = vs.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * softmax_scale
        if causal:
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
            scores = scores.masked_fill(~mask, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        p = torch.nan_to_num(p)  # a query with no visible key (lk < lq under causal) outputs zeros
        out[cq[i] : cq[i + 1]] = torch.einsum("hqk,khd->qhd", p, vs)
    return out.to(q.dtype)


def gather_paged_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_seqs, max_len, num_kv_heads, head_dim] of each sequence's cached keys (or values), and the valid mask."""
    block_size = cache.shape[1]
    pos = torch.arange(max_len, device=cache.device)
    blocks = block_tables.long().gather(1, (pos // block_size).clamp(max=block_tables.shape[1] - 1).expand(block_tables.shape[0], -1))
    slots = blocks * block_size + pos % block_size
    valid = pos[None, :] < context_lens.long()[:, None]
    slots = torch.where(valid, slots, torch.zeros_like(slots))
    flat = cache.view(-1, *cache.shape[2:])
    return flat[slots], valid


def reference_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """q [num_seqs, num_heads, head_dim] against each sequence's cached context, in fp32."""
    num_seqs = q.shape[0]
    if num_seqs == 0:
        return torch.empty_like(q)
    lens = context_lens.tolist()
    max_len = max(lens)
    k, valid = gather_paged_kv(k_cache, block_tables, context_lens, max_len)
    v, _ = gather_paged_kv(v_cache, block_tables, context_lens, max_len)
    group = q.shape[1] // k.shape[2]
    k = k.float().repeat_interleave(group, dim=2)
    v = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,bkhd->bhk", q.float(), k) * softmax_scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhk,bkhd->bhd", p, v).to(q.dtype)


# ---- torch implementations used by the engine when no kernel is built ---------------------------------
def _sdpa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal) -> torch.Tensor:
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        lq, lk = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        if lq == 0:
            continue
        qs = q[cq[i] : cq[i + 1]].transpose(0, 1)
        ks = k[ck[i] : ck[i + 1]].transpose(0, 1)
        vs = v[ck[i] : ck[i + 1]].transpose(0, 1)
        if group > 1:
            ks = ks.repeat_interleave(group, dim=0)
            vs = vs.repeat_interleave(group, dim=0)
        if causal and lq == lk:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=softmax_scale)
        elif causal:
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=softmax_scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=softmax_scale)
        out[cq[i] : cq[i + 1]] = o.transpose(0, 1)
    return out


def _sdpa_paged_decode(q, k_cache, v_cache, block_tables, context_lens, softmax_scale) -> torch.Tensor:
    """Gather-then-SDPA: the baseline that the paged decode kernel is measured against."""
    max_len = int(context_lens.max())
    k, valid = gather_paged_kv(k_cache, block_tables, context_lens, max_len)
    v, _ = gather_paged_kv(v_cache, block_tables, context_lens, max_len)
    group = q.shape[1] // k.shape[2]
    k = k.to(q.dtype).transpose(1, 2)
    v = v.to(q.dtype).transpose(1, 2)
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=valid[:, None, None, :], scale=softmax_scale)
    return o[:, :, 0, :]


# ---- dispatch ----------------------------------------------------------------------------------------
_logged: set[tuple[str, str]] = set()


def _log_choice(op: str, impl: str) -> None:
    if (op, impl) not in _logged:
        _logged.add((op, impl))
        logger.info("attention: %s runs on %s", op, impl)


def _flash_attn():
    try:
        import flash_attn  # noqa: F401

        return flash_attn
    except ImportError:
        return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' → our kernels when built for the device, else torch. Errors name the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; choose from {list(BACKENDS)}")
    if backend == "flash-attn":
        if device.type != "cuda" or _flash_attn() is None:
            raise ValueError("attention backend 'flash-attn' needs a CUDA device and the flash-attn package")
        return backend
    if backend == "kernels":
        if not has_op("varlen_attention", device):
            raise ValueError(f"attention backend 'kernels' needs lenserve._C built with {device.type} kernels")
        return backend
    if backend == "auto":
        return "kernels" if has_op("varlen_attention", device) and has_op("paged_decode_attention", device) else "torch"
    return backend


# What the CUDA kernels are built for; anything else on CUDA goes to torch under 'auto'
# (an explicit 'kernels' still reaches the op, whose checks name what it supports).
_CUDA_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_KERNEL_HEAD_DIMS = (64, 128)


def backend_for(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """resolve_backend, then under 'auto' on CUDA the torch path for dtypes and head sizes our
    CUDA kernels are not built for (fp32, head_dim 80/96, ...). The KV cache's dtype does not
    matter: the decode op reads a cache of any float dtype (it converts q to it)."""
    resolved = resolve_backend(backend, device)
    if (
        backend == "auto"
        and resolved == "kernels"
        and device.type == "cuda"
        and (dtype not in _CUDA_KERNEL_DTYPES or head_dim not in _CUDA_KERNEL_HEAD_DIMS)
    ):
        return "torch"
    return resolved


def _backend_for(backend: str, q: torch.Tensor) -> str:
    return backend_for(backend, q.device, q.dtype, q.shape[-1])


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """q [total_q, num_heads, head_dim], k/v [total_k, num_kv_heads, head_dim] → [total_q, num_heads, head_dim]."""
    backend = _backend_for(backend, q)
    if backend == "kernels":
        _log_choice("varlen_attention", f"lenserve._C ({q.device.type})")
        return torch.ops.lenserve.varlen_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal
        )
    if backend == "flash-attn":
        from flash_attn import flash_attn_varlen_func

        _log_choice("varlen_attention", "flash-attn")
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=softmax_scale, causal=causal
        )
    _log_choice("varlen_attention", "torch SDPA")
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k)
    return _sdpa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """q [num_seqs, num_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads, head_dim]."""
    backend = _backend_for(backend, q)
    if backend == "kernels":
        _log_choice("paged_decode_attention", f"lenserve._C ({q.device.type})")
        return torch.ops.lenserve.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, softmax_scale)
    if backend == "flash-attn":
        from flash_attn import flash_attn_with_kvcache

        _log_choice("paged_decode_attention", "flash-attn")
        out = flash_attn_with_kvcache(
            q[:, None], k_cache, v_cache, cache_seqlens=context_lens, block_table=block_tables, softmax_scale=softmax_scale, causal=True
        )
        return out[:, 0]
    _log_choice("paged_decode_attention", "torch gather + SDPA")
    return _sdpa_paged_decode(q, k_cache, v_cache, block_tables, context_lens, softmax_scale)


def _padded_attention(q, k_cache, v_cache, meta: AttentionMetadata, softmax_scale: float) -> torch.Tensor:
    """The baseline: [num_seqs, padded_len_q] queries against [num_seqs, max_context] keys under a mask."""
    b, lq = meta.num_seqs, meta.padded_len_q
    lk = meta.max_seqlen_k
    k, valid = gather_paged_kv(k_cache, meta.block_tables, meta.context_lens, lk)
    v, _ = gather_paged_kv(v_cache, meta.block_tables, meta.context_lens, lk)
    group = q.shape[1] // k.shape[2]
    qlens = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).long()
    ctx = meta.context_lens.long()
    qpos = ctx[:, None] - qlens[:, None] + torch.arange(lq, device=q.device)[None, :]  # [b, lq]
    kpos = torch.arange(lk, device=q.device)
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & valid[:, None, :]
    mask[:, :, 0] |= ~mask.any(-1)  # padding rows see one key so softmax stays finite
    qb = q.view(b, lq, q.shape[1], q.shape[2]).transpose(1, 2)
    kb = k.to(q.dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    vb = v.to(q.dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=softmax_scale)
    return o.transpose(1, 2).reshape(b * lq, q.shape[1], q.shape[2])


class Attention:
    """One layer's attention over packed tokens, reading and writing its slice of the paged cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, backend: str = "auto") -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.backend = backend

    def __call__(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        ops.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.padded_len_q:
            return _padded_attention(q, k_cache, v_cache, meta, self.scale)
        num_prefill = meta.num_prefill_tokens
        if num_prefill == q.shape[0]:
            return self._prefill(q, k, v, k_cache, v_cache, meta)
        if num_prefill == 0:
            return self._decode(q, k_cache, v_cache, meta)
        out = torch.empty_like(q)
        out[:num_prefill] = self._prefill(q[:num_prefill], k[:num_prefill], v[:num_prefill], k_cache, v_cache, meta)
        out[num_prefill:] = self._decode(q[num_prefill:], k_cache, v_cache, meta)
        return out

    def _prefill(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        p = meta.num_prefill_seqs
        if meta.prefill_kv_slots is not None and _backend_for(self.backend, q) == "kernels" \
                and has_op("varlen_attention_indexed", q.device):
            # The chunk attends to its context in place in the cache (converted tile by tile): a
            # gathered fp32 copy of the whole context per layer costs as much as the attention
            # itself for a small chunk over a long context.
            _log_choice("varlen_attention", "lenserve._C indexed (cpu)")
            return torch.ops.lenserve.varlen_attention_indexed(
                q, k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:]), meta.prefill_kv_slots,
                meta.cu_seqlens_q[: p + 1], meta.cu_seqlens_k[: p + 1], meta.prefill_max_seqlen_q,
                meta.prefill_max_seqlen_k, self.scale, True,
            )
        if meta.prefill_kv_slots is not None:
            k = k_cache.view(-1, *k_cache.shape[2:])[meta.prefill_kv_slots].to(q.dtype)
            v = v_cache.view(-1, *v_cache.shape[2:])[meta.prefill_kv_slots].to(q.dtype)
        elif k_cache.dtype != k.dtype:
            # Attend to exactly what decode steps will read back from the cache.
            k = k.to(k_cache.dtype).to(k.dtype)
            v = v.to(v_cache.dtype).to(v.dtype)
        return varlen_attention(
            q,
            k,
            v,
            meta.cu_seqlens_q[: p + 1],
            meta.cu_seqlens_k[: p + 1],
            meta.prefill_max_seqlen_q,
            meta.prefill_max_seqlen_k,
            self.scale,
            True,
            self.backend,
        )

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        p = meta.num_prefill_seqs
        return paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables[p:], meta.context_lens[p:], self.scale, self.backend
        )
