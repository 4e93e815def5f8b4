"""Sizing the KV cache on a GPU: what is left of gpu_memory_utilization * total once the weights,
everything else on the device (other engines in this process, other processes), the peak of a
forward at max_num_batched_tokens and the CUDA graphs' pool are counted.

The peaks are measured, not guessed: `profile_forward_peak` runs a forward over dummy tokens with
a one-block cache whose slots are never written (slot -1) and reads torch's peak-allocation
counter. The arithmetic is a pure function, tested on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lenserve.engine.attention import AttentionMetadata
from lenserve.engine.model import LlamaModel

GiB = 2**30


@dataclass
class KVBudget:
    total_bytes: int  # the device's memory
    free_bytes: int  # free on the device after loading the weights (cudaMemGetInfo)
    gpu_memory_utilization: float
    activation_peak_bytes: int  # a forward at max_num_batched_tokens (and its sampling), above the weights
    graph_pool_bytes: int  # reserved for decode CUDA graphs (0 with enforce_eager)

    @property
    def kv_bytes(self) -> int:
        in_use = self.total_bytes - self.free_bytes
        return int(self.gpu_memory_utilization * self.total_bytes) - in_use - self.activation_peak_bytes - self.graph_pool_bytes

    def describe(self) -> str:
        return (
            f"{self.gpu_memory_utilization:.2f} of {self.total_bytes / GiB:.2f} GiB, "
            f"{(self.total_bytes - self.free_bytes) / GiB:.2f} GiB already in use (this engine's weights, other engines "
            f"and processes), {self.activation_peak_bytes / GiB:.2f} GiB for a forward at max_num_batched_tokens, "
            f"{self.graph_pool_bytes / GiB:.2f} GiB for CUDA graphs"
        )


def num_kv_blocks(budget: KVBudget, bytes_per_block: int, max_useful_blocks: int) -> int:
    """Blocks of the KV cache: what the budget holds, at most what max_num_seqs sequences of
    max_model_len tokens can use (so that several engines can share a device). A budget that holds
    no block is an error naming the figures, never a silent one-block cache."""
    blocks = budget.kv_bytes // bytes_per_block if budget.kv_bytes > 0 else 0
    if blocks < 1:
        raise ValueError(
            f"gpu_memory_utilization leaves no memory for the KV cache ({budget.kv_bytes / GiB:.2f} GiB: "
            f"{budget.describe()}; one block needs {bytes_per_block / 2**20:.2f} MiB). Raise --gpu-memory-utilization, "
            "lower --max-num-batched-tokens or --max-num-seqs, pass --enforce-eager, or free the device"
        )
    return min(blocks, max_useful_blocks)


def _dummy_cache(model: LlamaModel, block_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = model.cfg
    one = torch.zeros((1, block_size, cfg.num_kv_heads, cfg.head_dim), dtype=dtype, device=model.device)
    return [(one, one)] * cfg.num_layers


def profile_forward_peak(model: LlamaModel, num_tokens: int, max_model_len: int, num_sampling_rows: int,
                         block_size: int, kv_dtype: torch.dtype) -> int:
    """Peak bytes allocated above what was allocated before, over a prefill forward of num_tokens
    (in sequences of at most max_model_len) that computes num_sampling_rows logits rows, then the
    sampler's sort of those rows (top-p)."""
    dev = model.device
    lens = [min(max_model_len, num_tokens - s) for s in range(0, num_tokens, max_model_len)]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
    meta = AttentionMetadata(
        cu_seqlens_q=cu_t, cu_seqlens_k=cu_t, max_seqlen_q=max(lens), max_seqlen_k=max(lens),
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=dev),
        block_tables=torch.zeros((len(lens), 1), dtype=torch.int32, device=dev),
        context_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
        num_prefill_tokens=num_tokens, num_prefill_seqs=len(lens),
        prefill_max_seqlen_q=max(lens), prefill_max_seqlen_k=max(lens),
    )
    positions = torch.cat([torch.arange(n, device=dev) for n in lens])
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=dev)
    rows = torch.arange(num_tokens - min(num_sampling_rows, num_tokens), num_tokens, device=dev)
    return _peak(model, lambda: _forward_and_sort(model, input_ids, positions, meta, block_size, kv_dtype, rows))


def profile_decode_peak(model: LlamaModel, num_seqs: int, max_model_len: int, block_size: int, kv_dtype: torch.dtype) -> int:
    """Peak bytes above the baseline of an eager decode step of num_seqs sequences whose block
    tables span max_model_len: what a CUDA graph of that size keeps in its pool."""
    dev = model.device
    width = -(-max_model_len // block_size)
    meta = AttentionMetadata(
        cu_seqlens_q=torch.arange(num_seqs + 1, dtype=torch.int32, device=dev),
        cu_seqlens_k=torch.arange(num_seqs + 1, dtype=torch.int32, device=dev),
        max_seqlen_q=1, max_seqlen_k=max_model_len,
        slot_mapping=torch.full((num_seqs,), -1, dtype=torch.int64, device=dev),
        block_tables=torch.zeros((num_seqs, width), dtype=torch.int32, device=dev),
        context_lens=torch.ones(num_seqs, dtype=torch.int32, device=dev),
        num_prefill_tokens=0,
    )
    ids = torch.zeros(num_seqs, dtype=torch.int64, device=dev)
    cache = _dummy_cache(model, block_size, kv_dtype)
    return _peak(model, lambda: model.forward(ids, ids, meta, cache, None))


def _forward_and_sort(model, input_ids, positions, meta, block_size, kv_dtype, rows) -> None:
    logits = model.forward(input_ids, positions, meta, _dummy_cache(model, block_size, kv_dtype), rows)
    torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)


def _peak(model: LlamaModel, fn) -> int:
    dev = model.device
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    torch.cuda.empty_cache()
    return max(peak, 0)
