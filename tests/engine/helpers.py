"""Test helpers: run a model's packed forward directly, and compare greedy runs the vLLM way."""
from __future__ import annotations

import torch

from lenserve.engine.kv_cache import KVCache
from lenserve.engine.model_runner import ModelRunner
from lenserve.scheduler import BlockManager, SchedulerOutput, Sequence


def full_logits(model, prompts: list[list[int]], kv_dtype=torch.float32) -> list[torch.Tensor]:
    """Logits at every position of each prompt, all prompts packed into one forward."""
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
    out = SchedulerOutput(seqs, n, sum(1 for x in n if x > 1))
    order = [i for i, x in enumerate(n) if x > 1] + [i for i, x in enumerate(n) if x == 1]
    out = SchedulerOutput([seqs[i] for i in order], [n[i] for i in order], sum(1 for x in n if x > 1))
    input_ids, positions, meta, _, _ = ModelRunner(model, kv).prepare(out)
    logits = model.forward(input_ids, positions, meta, kv.layers, None)
    rows = torch.split(logits, [n[i] for i in order])
    result = [None] * len(prompts)
    for i, r in zip(order, rows):
        result[i] = r
    return result


def check_logprobs_close(a_tokens, a_logprobs, b_tokens, b_logprobs, name_a="a", name_b="b", max_gap=0.02):
    """Greedy outputs must agree until the first divergence; there, each run's token must be among
    the other's top logprobs and within `max_gap` nats of the other's choice (a near tie).
    A real bug diverges early and by a wide margin."""
    for i, (ta, tb) in enumerate(zip(a_tokens, b_tokens)):
        if ta == tb:
            continue
        top_a = dict(a_logprobs[i].top)
        top_b = dict(b_logprobs[i].top)
        assert tb in top_a, f"position {i}: {name_b}'s token {tb} not in {name_a}'s top logprobs {top_a}"
        assert ta in top_b, f"position {i}: {name_a}'s token {ta} not in {name_b}'s top logprobs {top_b}"
        gap_a = top_a[ta] - top_a[tb]
        gap_b = top_b[tb] - top_b[ta]
        assert gap_a <= max_gap and gap_b <= max_gap, f"position {i}: divergence is no near tie ({gap_a:.4f}, {gap_b:.4f})"
        return i
    assert len(a_tokens) == len(b_tokens), f"{name_a} has {len(a_tokens)} tokens, {name_b} {len(b_tokens)}"
    return None
