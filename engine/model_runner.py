"""Turns a SchedulerOutput into packed tensors and runs the model.

All packing metadata (positions, slot mapping, cu_seqlens, block tables) is built once per step
on the host, sent to the device in one copy (engine/step_buffer.py) and reused by every layer.
Decode-only steps replay a captured CUDA graph when one fits (engine/cuda_graph.py).
"""
from __future__ import annotations

import array
import itertools

import torch

from lenserve.engine.attention import AttentionMetadata, check_varlen_metadata
from lenserve.engine.cuda_graph import DecodeGraphRunner
from lenserve.engine.kv_cache import KVCache
from lenserve.engine.model import LlamaModel
from lenserve.engine.step_buffer import StepBuffer
from lenserve.scheduler.output import SchedulerOutput


def _extend_block_table(out: list[int], seqs, max_blocks: int) -> None:
    """Appends each sequence's block ids, padded with block 0 to max_blocks: the flat
    [num_seqs, max_blocks] block table."""
    for seq in seqs:
        out += seq.block_ids
        out += itertools.repeat(0, max_blocks - len(seq.block_ids))


class _DecodeBuffers:
    """A decode-only step's metadata in two persistent CPU buffers (int64: input ids, positions,
    slots; int32: cu_seqlens_k, context lens, block tables), written as Python arrays (no numpy on
    the device machine), with the tensor views for one (num_seqs, max_blocks) made once and kept
    until the shape changes (at batch 1, when the sequence takes a new block). Each `write`
    overwrites the last one's values."""

    def __init__(self) -> None:
        self._shape: tuple[int, int] | None = None
        self._longs = array.array("q")
        self._ints = array.array("i")
        self._views: tuple[torch.Tensor, ...] = ()

    def _reshape(self, n: int, max_blocks: int) -> None:
        # Never resized in place: a bigger shape gets new arrays, and views still held keep the old.
        num_ints = (n + 1) + (n + 1) + n + n * max_blocks
        if len(self._longs) < 4 * n:
            self._longs = array.array("q", bytes(8 * max(4 * n, 2 * len(self._longs))))
        if len(self._ints) < num_ints:
            self._ints = array.array("i", bytes(4 * max(num_ints, 2 * len(self._ints))))
        longs, ints = torch.frombuffer(self._longs, dtype=torch.int64), torch.frombuffer(self._ints, dtype=torch.int32)
        # The last n longs and the first n + 1 ints are constant: logits row i is sequence i, and
        # each sequence has one new token (cu_seqlens_q = 0, 1, ..., n).
        self._longs[3 * n : 4 * n] = array.array("q", range(n))
        self._ints[: n + 1] = array.array("i", range(n + 1))
        self._views = (longs[:n], longs[n : 2 * n], longs[2 * n : 3 * n], ints[: n + 1], ints[n + 1 : 2 * n + 2],
                       ints[2 * n + 2 : 3 * n + 2], ints[3 * n + 2 : 3 * n + 2 + n * max_blocks].view(n, max_blocks),
                       longs[3 * n : 4 * n])
        self._shape = (n, max_blocks)

    def write(self, n: int, max_blocks: int, longs: list[int], ints: list[int]) -> tuple[torch.Tensor, ...]:
        """Views (input_ids, positions, slot_mapping, cu_seqlens_q, cu_seqlens_k, context_lens,
        block_tables, logits rows 0..n-1) holding `longs` (3n values) and `ints` (cu_seqlens_k,
        context lens, then the n x max_blocks table)."""
        if self._shape != (n, max_blocks):
            self._reshape(n, max_blocks)
        self._longs[: 3 * n] = array.array("q", longs)
        self._ints[n + 1 : n + 1 + len(ints)] = array.array("i", ints)
        return self._views


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, padded: bool = False) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = model.device
        self.padded = padded
        self.last_padding_ratio = 0.0
        self.last_states: torch.Tensor | None = None
        self.step_buffer = StepBuffer(self.device)
        self.decode_graphs: DecodeGraphRunner | None = None
        self.last_used_graph = False
        self._decode_buffers = _DecodeBuffers()

    def enable_decode_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool = True) -> DecodeGraphRunner:
        """Static buffers for decode batches up to max_num_seqs (padded to the captured sizes) and,
        with `capture` (CUDA), one CUDA graph per size. Without capture the same padded static
        forward runs eagerly: how CPU tests exercise this path."""
        self.decode_graphs = DecodeGraphRunner(self.model, self.kv_cache, max_num_seqs, max_model_len)
        if capture:
            self.decode_graphs.capture()
        return self.decode_graphs

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, list[int]]:
        """Returns input_ids, positions, metadata, logits row indices, and which sequences sample."""
        if not out.num_prefill_seqs and not self.step_buffer.pack and not self.padded and sum(out.num_new_tokens) == len(out.seqs):
            return self._prepare_decode(out)
        return self._prepare_packed(out)

    def _prepare_decode(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, list[int]]:
        """prepare for a decode-only step on CPU (one new token per sequence, no padding): the same
        values as _prepare_packed, written into the runner's persistent decode buffers (valid until
        the next prepare, as a CUDA graph's static inputs are). Right after a forward has streamed
        every weight through the caches, a batch-1 step's Python runs cold: the general path's
        loops, nine new tensors and their splits and views took ~125 us there (~45 us warm), the
        largest cost of a batch-1 step outside the kernels."""
        bs = self.block_size
        seqs = out.seqs
        longs: list[int] = []  # input_ids, positions, slots
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        sampling: list[int] = []
        max_blocks = 0
        for i, seq in enumerate(seqs):
            p = seq.num_computed_tokens
            blocks = seq.block_ids
            longs.append(seq.token_ids[p])
            positions.append(p)
            slots.append(blocks[p // bs] * bs + p % bs)
            context_lens.append(p + 1)
            if len(blocks) > max_blocks:
                max_blocks = len(blocks)
            if p + 1 == seq.num_tokens:
                sampling.append(i)  # its one row is row i
        longs += positions
        longs += slots
        ints = list(itertools.accumulate(context_lens, initial=0))  # cu_seqlens_k
        ints += context_lens
        _extend_block_table(ints, seqs, max_blocks)
        views = self._decode_buffers.write(len(seqs), max_blocks, longs, ints)
        input_ids, positions_t, slot_mapping, cu_q, cu_k, context_lens_t, block_tables, all_rows = views
        meta = AttentionMetadata(
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=1,
            max_seqlen_k=max(context_lens),
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            context_lens=context_lens_t,
            num_prefill_tokens=0,
        )
        self.last_padding_ratio = 0.0
        rows = all_rows if len(sampling) == len(seqs) else torch.tensor(sampling, dtype=torch.int64)
        return input_ids, positions_t, meta, rows, sampling

    def _prepare_packed(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, list[int]]:
        """prepare for any step: prefill and decode rows packed, padded when the runner pads."""
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
        table: list[int] = []
        _extend_block_table(table, seqs, max_blocks)
        ctx_slots: list[int] = []
        if need_gather:
            for seq, end in zip(seqs[:num_prefill], context_lens[:num_prefill]):
                ctx_slots.extend(seq.block_ids[p // bs] * bs + p % bs for p in range(end))
        prefill_max_q = max(num_new[:num_prefill], default=0)
        prefill_max_k = max(context_lens[:num_prefill], default=0)
        if num_prefill and not pad_to:
            # The CUDA op takes these on trust (reading them back would sync): check them here.
            check_varlen_metadata(cu_q[: num_prefill + 1], cu_k[: num_prefill + 1], prefill_max_q, prefill_max_k,
                                  cu_q[num_prefill], cu_k[num_prefill])
        i64, i32 = torch.int64, torch.int32
        t = self.step_buffer.stage([
            ("input_ids", i64, (len(input_ids),), input_ids),
            ("positions", i64, (len(positions),), positions),
            ("slot_mapping", i64, (len(slots),), slots),
            ("logits_rows", i64, (len(logits_rows),), logits_rows),
            ("prefill_kv_slots", i64, (len(ctx_slots),), ctx_slots),
            ("cu_seqlens_q", i32, (len(cu_q),), cu_q),
            ("cu_seqlens_k", i32, (len(cu_k),), cu_k),
            ("context_lens", i32, (len(context_lens),), context_lens),
            ("block_tables", i32, (len(seqs), max_blocks), table),
        ])
        meta = AttentionMetadata(
            cu_seqlens_q=t["cu_seqlens_q"],
            cu_seqlens_k=t["cu_seqlens_k"],
            max_seqlen_q=max(num_new),
            max_seqlen_k=max(context_lens),
            slot_mapping=t["slot_mapping"],
            block_tables=t["block_tables"],
            context_lens=t["context_lens"],
            num_prefill_tokens=cu_q[num_prefill] if not pad_to else 0,
            num_prefill_seqs=num_prefill,
            prefill_max_seqlen_q=prefill_max_q,
            prefill_max_seqlen_k=prefill_max_k,
            prefill_kv_slots=t["prefill_kv_slots"] if need_gather else None,
            padded_len_q=pad_to,
        )
        real = cu_q[-1]
        self.last_padding_ratio = 1.0 - real / len(input_ids) if input_ids else 0.0
        return t["input_ids"], t["positions"], meta, t["logits_rows"], sampling

    def _rows_are_sequences(self, out: SchedulerOutput, sampling: list[int]) -> bool:
        """A decode-only step in which every sequence samples from its one unpadded row: logits row i
        is sequence i, with no gather of the rows."""
        return (
            len(sampling) == len(out.seqs)
            and not self.padded
            and out.num_prefill_seqs == 0
            and all(n == 1 for n in out.num_new_tokens)
        )

    def _graph_fits(self, out: SchedulerOutput, sampling: list[int], capture_layers: tuple[int, ...] | None) -> bool:
        graphs = self.decode_graphs
        return (
            graphs is not None
            and capture_layers is None
            and self._rows_are_sequences(out, sampling)
            and graphs.fits(len(out.seqs), max(len(s.block_ids) for s in out.seqs))
        )

    def execute(self, out: SchedulerOutput, capture_layers: tuple[int, ...] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Runs one step; returns logits [num_sampling, vocab] (float32) and the indices of the sampling
        sequences. With `capture_layers`, when some sequence samples its first token this step,
        `last_states` holds the residual stream after those layers at every sampling row (else None)."""
        input_ids, positions, meta, logits_rows, sampling = self.prepare(out)
        if capture_layers is not None and not any(out.seqs[i].num_output_tokens == 0 for i in sampling):
            capture_layers = None  # no prompt completes this step: nothing to read
        self.last_used_graph = self._graph_fits(out, sampling, capture_layers)
        if self.last_used_graph:
            # Every decoding sequence samples, in order: logits row i is sequence i.
            self.last_states = None
            return self.decode_graphs.run(input_ids, positions, meta), sampling
        if self._rows_are_sequences(out, sampling):
            logits_rows = None  # no gather (two index ops, ~20 us)
        result = self.model.forward(input_ids, positions, meta, self.kv_cache.layers, logits_rows, capture_layers)
        logits, self.last_states = result if capture_layers is not None else (result, None)
        return logits, sampling


def packed_prefill_logits(model: LlamaModel, prompts: list[list[int]], kv_dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Logits at every position of each prompt, all prompts packed into one forward through a
    fresh KV cache (no scheduler, no sampling): the reference the tests and the device check compare
    engines, backends and devices with. One-token prompts go last, as decode rows do in a step."""
    from lenserve.scheduler import BlockManager, Sequence

    block_size = 16
    num_blocks = sum(len(p) // block_size + 1 for p in prompts) + 1
    kv = KVCache(model.cfg, num_blocks, block_size, kv_dtype, model.device)
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    seqs = []
    for i, p in enumerate(prompts):
        s = Sequence(f"p{i}", p, max_tokens=1)
        bm.allocate(s, len(p))
        seqs.append(s)
    n = [len(p) for p in prompts]
    order = [i for i, x in enumerate(n) if x > 1] + [i for i, x in enumerate(n) if x == 1]
    out = SchedulerOutput([seqs[i] for i in order], [n[i] for i in order], sum(1 for x in n if x > 1))
    input_ids, positions, meta, _, _ = ModelRunner(model, kv).prepare(out)
    logits = model.forward(input_ids, positions, meta, kv.layers, None)
    result: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    for i, r in zip(order, torch.split(logits, [n[i] for i in order])):
        result[i] = r
    return result
