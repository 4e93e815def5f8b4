"""Compare two greedy runs of the same prompt the vLLM way (vllm tests/models/utils.py,
`check_logprobs_close`), in one place for the device check (benchmarks/gpu/e2e.py) and the tests
(tests/engine/helpers.py, tests/engine/test_cuda_engine.py).

Two runs of one model that differ only in batch shape (CUDA-graph padding, chunked prefill, another
attention backend, a float16 KV cache) round their low-precision GEMMs differently. Where the logits
are nearly flat (random weights: most positions' top two are within a fraction of a nat) that flips
near-tied argmaxes, and after the first flip the continuations diverge. So: walk both token lists;
at the first position where they differ each side's token must be among the other side's top
logprobs and within `max_gap` nats of the other side's choice there (a near tie); then stop, the
rest of the sequence is not comparable. A real bug diverges by a wide margin.

Pure Python (no torch): a logprobs entry is anything with `.top`, the (token, logprob) pairs of the
most likely alternatives, as lenserve.engine.sampler.SampleLogprobs.
"""
from __future__ import annotations

from typing import Any, Sequence

# Top alternatives to request per token (SamplingParams.logprobs) for these comparisons.
TOP_K = 5
# Largest gap (nats) between the two tokens at a divergence that still counts as a near tie in a
# bf16 run. bf16 keeps 8 significant bits (7 stored + 1 implicit): relative rounding up to 2^-8 ~
# 0.4%, so a logit of magnitude ~10 moves by ~0.04 when the GEMM's shape changes its rounding;
# two logits moving in opposite directions: ~0.08. 0.1 nats covers that and no more: a bug that
# changes the distribution moves the top tokens by whole nats.
BF16_MAX_GAP = 0.1


def first_divergence(a_tokens: Sequence[Any], a_logprobs: Sequence[Any] | None,
                     b_tokens: Sequence[Any], b_logprobs: Sequence[Any] | None,
                     max_gap: float = BF16_MAX_GAP, name_a: str = "a", name_b: str = "b") -> dict | None:
    """None when the two greedy outputs are identical (same tokens, same length). Otherwise the
    first difference: {"position", "near_tie": bool, "gap_a", "gap_b" (nats, None where unknown),
    "reason"}. A near tie: at the first differing position each token is in the other side's top
    logprobs, and on both sides the gap between the side's own choice and the other's is <= max_gap."""
    for i, (ta, tb) in enumerate(zip(a_tokens, b_tokens)):
        if ta == tb:
            continue
        res = {"position": i, "near_tie": False, "gap_a": None, "gap_b": None}
        if a_logprobs is None or b_logprobs is None or a_logprobs[i] is None or b_logprobs[i] is None:
            return {**res, "reason": f"position {i}: {name_a} {ta!r} vs {name_b} {tb!r}, no logprobs to tell a near tie"}
        top_a, top_b = dict(a_logprobs[i].top), dict(b_logprobs[i].top)
        if tb not in top_a:
            return {**res, "reason": f"position {i}: {name_b}'s token {tb!r} not in {name_a}'s top logprobs {top_a}"}
        if ta not in top_b:
            return {**res, "reason": f"position {i}: {name_a}'s token {ta!r} not in {name_b}'s top logprobs {top_b}"}
        res["gap_a"], res["gap_b"] = top_a[ta] - top_a[tb], top_b[tb] - top_b[ta]
        if res["gap_a"] > max_gap or res["gap_b"] > max_gap:
            return {**res, "reason": f"position {i}: divergence is no near tie "
                                     f"({res['gap_a']:.4f}, {res['gap_b']:.4f} nats > {max_gap})"}
        return {**res, "near_tie": True, "reason": f"position {i}: near tie "
                                                   f"({res['gap_a']:.4f}, {res['gap_b']:.4f} nats <= {max_gap})"}
    if len(a_tokens) != len(b_tokens):
        n = min(len(a_tokens), len(b_tokens))
        return {"position": n, "near_tie": False, "gap_a": None, "gap_b": None,
                "reason": f"{name_a} has {len(a_tokens)} tokens, {name_b} {len(b_tokens)}"}
    return None


def compare_greedy(a: Sequence[Sequence[Any]], b: Sequence[Sequence[Any]],
                   a_logprobs: Sequence[Sequence[Any]] | None = None, b_logprobs: Sequence[Sequence[Any]] | None = None,
                   max_gap: float = BF16_MAX_GAP) -> dict:
    """Greedy token lists of the same prompts (b is the reference), with each token's top logprobs
    when known: how many sequences are identical, which diverge at a near tie (position and gap),
    which really mismatch. ok: no real mismatch."""
    near_ties, mismatches = [], []
    if len(a) != len(b):
        mismatches.append({"sequence": None, "position": None, "reason": f"{len(a)} sequences vs {len(b)}"})
    for s, (ta, tb) in enumerate(zip(a, b)):
        d = first_divergence(ta, None if a_logprobs is None else a_logprobs[s],
                             tb, None if b_logprobs is None else b_logprobs[s], max_gap, "candidate", "reference")
        if d is None:
            continue
        if d["near_tie"]:
            near_ties.append({"sequence": s, "position": d["position"], "gap": round(d["gap_b"], 4),
                              "candidate_gap": round(d["gap_a"], 4)})
        else:
            mismatches.append({"sequence": s, "position": d["position"], "reason": d["reason"]})
    first = min(((x["sequence"], x["position"]) for x in near_ties + mismatches if x["sequence"] is not None), default=None)
    identical = not near_ties and not mismatches
    return {"sequences": len(a), "tokens": sum(len(x) for x in a), "identical": identical,
            "identical_sequences": sum(1 for x, y in zip(a, b) if list(x) == list(y)),
            "first_difference": None if first is None else {"sequence": first[0], "position": first[1]},
            "near_ties": near_ties, "mismatches": mismatches, "max_gap": max_gap, "ok": not mismatches}
