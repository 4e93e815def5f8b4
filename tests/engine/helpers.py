"""Test helpers: run a model's packed forward directly, and compare greedy runs the vLLM way."""
from __future__ import annotations

from benchmarks.gpu.ties import first_divergence
from lenserve.engine.model_runner import packed_prefill_logits as full_logits  # noqa: F401  (the tests' name)


def check_logprobs_close(a_tokens, a_logprobs, b_tokens, b_logprobs, name_a="a", name_b="b", max_gap=0.02):
    """Greedy outputs must agree until the first divergence; there, each run's token must be among
    the other's top logprobs and within `max_gap` nats of the other's choice (a near tie).
    A real bug diverges early and by a wide margin. Returns the divergence position, or None when
    identical. The rule itself is benchmarks.gpu.ties.first_divergence (shared with the device check)."""
    d = first_divergence(a_tokens, a_logprobs, b_tokens, b_logprobs, max_gap, name_a, name_b)
    if d is None:
        return None
    assert d["near_tie"], d["reason"]
    return d["position"]
