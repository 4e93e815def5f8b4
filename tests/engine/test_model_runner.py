"""ModelRunner.prepare: the decode-only path's persistent buffers hold what the general path builds."""
from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from lenserve.engine.model_runner import ModelRunner
from lenserve.scheduler.output import SchedulerOutput
from lenserve.scheduler.sequence import Sequence

BLOCK = 16


def _runner() -> ModelRunner:
    model = SimpleNamespace(device=torch.device("cpu"))
    return ModelRunner(model, SimpleNamespace(block_size=BLOCK))


def _decoding(rng: random.Random, i: int, pool: list[int]) -> Sequence:
    prompt = [rng.randrange(1, 50000) for _ in range(rng.randrange(1, 70))]
    seq = Sequence(f"s{i}", prompt, max_tokens=100)
    seq.token_ids += [rng.randrange(1, 50000) for _ in range(rng.randrange(1, 40))]
    seq.num_computed_tokens = seq.num_tokens - 1
    seq.block_ids = [pool.pop() for _ in range(-(-seq.num_tokens // BLOCK))]
    return seq


def _fields(prepared) -> dict:
    input_ids, positions, meta, rows, sampling = prepared
    return {"input_ids": input_ids.tolist(), "positions": positions.tolist(), "rows": rows.tolist(), "sampling": sampling,
            "cu_q": meta.cu_seqlens_q.tolist(), "cu_k": meta.cu_seqlens_k.tolist(), "slots": meta.slot_mapping.tolist(),
            "tables": meta.block_tables.tolist(), "ctx": meta.context_lens.tolist(), "max_q": meta.max_seqlen_q,
            "max_k": meta.max_seqlen_k, "prefill": (meta.num_prefill_tokens, meta.num_prefill_seqs, meta.prefill_kv_slots),
            "dtypes": [t.dtype for t in (input_ids, positions, rows, meta.cu_seqlens_q, meta.slot_mapping, meta.block_tables)]}


def test_decode_path_equals_the_packed_path_step_after_step():
    rng = random.Random(0)
    runner = _runner()
    pool = list(range(2000))
    rng.shuffle(pool)
    seqs = [_decoding(rng, i, pool) for i in range(6)]
    for step in range(40):
        # batches grow, shrink and reorder; tables grow by a block now and then
        batch = rng.sample(seqs, rng.randrange(1, len(seqs) + 1))
        out = SchedulerOutput(seqs=batch, num_new_tokens=[1] * len(batch))
        fast = runner.prepare(out)
        assert fast[1].data_ptr() == runner.prepare(out)[1].data_ptr(), "the decode path reuses its buffers"
        assert _fields(fast) == _fields(runner._prepare_packed(out)), step
        for seq in batch:  # the step samples a token: one more to compute, a block at a boundary
            seq.token_ids.append(rng.randrange(1, 50000))
            seq.num_computed_tokens += 1
            if seq.num_tokens > len(seq.block_ids) * BLOCK:
                seq.block_ids.append(pool.pop())


def test_decode_path_gathers_rows_when_a_sequence_does_not_sample():
    rng = random.Random(1)
    runner = _runner()
    pool = list(range(100))
    seqs = [_decoding(rng, i, pool) for i in range(3)]
    seqs[1].token_ids.append(7)  # two tokens left: this step computes one and samples nothing
    out = SchedulerOutput(seqs=seqs, num_new_tokens=[1, 1, 1])
    fast = _fields(runner.prepare(out))
    assert fast["sampling"] == [0, 2] and fast["rows"] == [0, 2]
    assert fast == _fields(runner._prepare_packed(out))
