"""Turns a SchedulerOutput into packed tensors and runs the model.

All packing metadata (positions, slot mapping, cu_seqlens, block tables) is built once per step
and reused by every layer.
"""
from __future__ import annotations

import itertools

import torch

from lenserve.engine.attention import AttentionMetadata
from lenserve.engine.kv_cache import KVCache
from lenserve.engine.model import LlamaModel
from lenserve.scheduler.output import SchedulerOutput


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, padded: bool = False) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = model.device
        self.padded = padded
        self.last_padding_ratio = 0.0
        self.last_states: torch.Tensor | None = None

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, list[int]]:
        """Returns input_ids, positions, metadata, logits row indices, and which sequences sample."""
        bs = self.block_size
        seqs, num_new = out.seqs, out.num_new_tokens
        pad_to = max(num_new) if self.padded else 0
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_q, cu_k = [0], [0]
        context_lens: list[int] = []
        logits_rows: list[int] = []
        sampling: list[int] = []
        need_gather = False
        for i, (seq, n) in enumerate(zip(seqs, num_new)):
            start = seq.num_computed_tokens
            end = start + n
            if i < out.num_prefill_seqs and start > 0:
                need_gather = True
            row0 = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = seq.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            if pad_to:
                pad = pad_to - n
                input_ids.extend(itertools.repeat(0, pad))
                positions.extend(itertools.repeat(0, pad))
                slots.extend(itertools.repeat(-1, pad))
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + end)
            context_lens.append(end)
            if end == seq.num_tokens:
                logits_rows.append(row0 + n - 1)
                sampling.append(i)
        num_prefill = out.num_prefill_seqs
        max_blocks = max(len(s.block_ids) for s in seqs)
        block_tables = torch.zeros((len(seqs), max_blocks), dtype=torch.int32)
        for i, seq in enumerate(seqs):
            block_tables[i, : len(seq.block_ids)] = torch.tensor(seq.block_ids, dtype=torch.int32)
        prefill_kv_slots = None
        if need_gather:
            ctx_slots: list[int] = []
            for seq, end in zip(seqs[:num_prefill], context_lens[:num_prefill]):
                ctx_slots.extend(seq.block_ids[p // bs] * bs + p % bs for p in range(end))
            prefill_kv_slots = torch.tensor(ctx_slots, dtype=torch.int64, device=self.device)
        dev = self.device
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=dev),
            cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=dev),
            max_seqlen_q=max(num_new),
            max_seqlen_k=max(context_lens),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=block_tables.to(dev),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            num_prefill_tokens=cu_q[num_prefill] if not pad_to else 0,
            num_prefill_seqs=num_prefill,
            prefill_max_seqlen_q=max(num_new[:num_prefill], default=0),
            prefill_max_seqlen_k=max(context_lens[:num_prefill], default=0),
            prefill_kv_slots=prefill_kv_slots,
            padded_len_q=pad_to,
        )
        real = cu_q[-1]
        self.last_padding_ratio = 1.0 - real / len(input_ids) if input_ids else 0.0
        return (
            torch.tensor(input_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            meta,
            torch.tensor(logits_rows, dtype=torch.int64, device=dev),
            sampling,
        )

    def execute(self, out: SchedulerOutput, capture_layers: tuple[int, ...] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Runs one step; returns logits [num_sampling, vocab] (float32) and the indices of the sampling
        sequences. With `capture_layers`, when some sequence samples its first token this step,
        `last_states` holds the residual stream after those layers at every sampling row (else None)."""
        input_ids, positions, meta, logits_rows, sampling = self.prepare(out)
        if capture_layers is not None and not any(out.seqs[i].num_output_tokens == 0 for i in sampling):
            capture_layers = None  # no prompt completes this step: nothing to read
        result = self.model.forward(input_ids, positions, meta, self.kv_cache.layers, logits_rows, capture_layers)
        logits, self.last_states = result if capture_layers is not None else (result, None)
        return logits, sampling
