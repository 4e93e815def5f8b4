"""CUDA graphs for decode steps.

A decode step of a small model on a GPU is a few hundred short kernel launches; replaying them as
one CUDA graph removes the launch overhead that otherwise dominates. A graph replays fixed
shapes and fixed addresses, so one graph is captured per batch size in CAPTURE_SIZES, each
reading static input buffers; a batch of n sequences is padded (in the batch dimension only) to
the next captured size: padding rows write no KV slot (slot -1) and attend to no key (context
length 0). Prefill steps, larger batches and contexts wider than the static block table run
eagerly. All graphs share one memory pool, sized by the largest capture.
"""
from __future__ import annotations

import logging
import math

import torch

from lenserve.engine.attention import AttentionMetadata
from lenserve.engine.kv_cache import KVCache
from lenserve.engine.model import LlamaModel

logger = logging.getLogger("lenserve")

CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def graph_batch_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """The captured sizes a server with max_num_seqs needs: up to the first size that holds
    max_num_seqs (all of CAPTURE_SIZES past 256)."""
    sizes = []
    for size in CAPTURE_SIZES:
        sizes.append(size)
        if size >= max_num_seqs:
            break
    return tuple(sizes)


def padded_batch_size(num_seqs: int, sizes: tuple[int, ...]) -> int | None:
    """The captured size a batch of num_seqs runs at, or None (eager) when none holds it."""
    return next((s for s in sizes if s >= num_seqs), None) if num_seqs > 0 else None


class DecodeGraphRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, max_num_seqs: int, max_model_len: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_blocks = math.ceil(max_model_len / kv_cache.block_size)
        self.max_model_len = max_model_len
        dev, max_bs = model.device, self.sizes[-1]
        # Static inputs: every replay reads these addresses.
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=dev)
        self.context_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((max_bs, self.max_blocks), dtype=torch.int32, device=dev)
        self.cu_seqlens = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)  # one query token a sequence
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # [size, vocab] logits each graph writes
        self.pool_bytes = 0  # device memory the graphs' pool holds, measured at capture
        self.num_runs = 0  # decode steps through the static buffers
        self.num_replays = 0  # of them, replayed from a graph

    def fits(self, num_seqs: int, num_blocks: int) -> bool:
        return padded_batch_size(num_seqs, self.sizes) is not None and num_blocks <= self.max_blocks

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens[: size + 1],
            cu_seqlens_k=self.cu_seqlens[: size + 1],
            max_seqlen_q=1,
            max_seqlen_k=self.max_model_len,
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            context_lens=self.context_lens[:size],
            num_prefill_tokens=0,
        )

    def _forward(self, size: int) -> torch.Tensor:
        return self.model.forward(self.input_ids[:size], self.positions[:size], self._meta(size), self.kv_cache.layers, None)

    def capture(self) -> None:
        """One graph per size, largest first so that the smaller ones reuse its pool."""
        if self.model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device (pass enforce_eager)")
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved(self.model.device)
        pool = None
        for size in reversed(self.sizes):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(size)  # warm-up outside capture, as torch.cuda.graph asks
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.pool_bytes = torch.cuda.memory_reserved(self.model.device) - before
        logger.info("captured CUDA graphs for decode batches %s (%.0f MiB)", list(self.sizes), self.pool_bytes / 2**20)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [num_seqs, vocab] of a decode-only step whose metadata `meta` holds (on the device)."""
        n = input_ids.shape[0]
        size = padded_batch_size(n, self.sizes)
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.context_lens[:n].copy_(meta.context_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if size > n:  # padding rows: no cache write, no key read
            self.slot_mapping[n:size].fill_(-1)
            self.context_lens[n:size].zero_()
        self.num_runs += 1
        graph = self.graphs.get(size)
        if graph is None:
            return self._forward(size)[:n]
        graph.replay()
        self.num_replays += 1
        return self.outputs[size][:n]
