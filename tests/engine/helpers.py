"""Test helpers: run a model's packed forward directly, and compare greedy runs the vLLM way."""
from __future__ import annotations

from lenserve.engine.model_runner import packed_prefill_logits as full_logits  # noqa: F401  (the tests' name)


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
