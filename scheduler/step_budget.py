"""Stall-free batching: the step's token budget from an inter-token latency target.

Every running decode gets its token each step, and prompt chunks fill the rest of the step. With a
fixed token budget, one step that carries a long chunk stalls every stream for as long as that
chunk takes (seconds on a CPU). Sarathi-Serve (Agrawal et al., OSDI 2024) picks the chunk size
from the time-between-tokens objective instead; here the budget is recomputed every step from the
cost model (refitted online from measured steps, `OnlineCostModel`), so it follows the machine,
the model, the batch and the context as they are now:

- no decode running: the budget is the cap (`max_num_batched_tokens`): no stream to stall, the
  prompt's first token comes soonest;
- otherwise the most prompt tokens whose predicted step time, next to the running decodes,
  stays within the target, and never fewer than `min_chunk` (so a prompt always progresses,
  even when the decodes alone fill the target) nor more than the cap;
- the decode set itself is held to the target: a waiting request is admitted only while a plain
  decode step of every running sequence and it stays within the target (the first always is),
  so under overload the queue grows (and `--max-queue` refuses the excess) instead of every
  stream slowing down;
- length awareness: a decode predicted to end within HORIZON_TOKENS tokens can be stalled only
  that many more times, so it counts as remaining/horizon of a stream. When the decode set weighs
  less than one whole stream (a few streams about to end), the target stretches as 1/weight, by
  at most MAX_GROWTH: the step takes more prompt tokens where few token gaps can suffer for it.
  Prompts in progress take the budget in the scheduler's policy order (sjf: least predicted work).

`prefill_token_budget` is the one rule: the scheduler calls it for the engine and the simulator
alike. The scheduler aims it at the target divided by the online model's overrun (how much longer
than predicted recent steps ran), so that noise does not carry most steps past the target.
"""
from __future__ import annotations

import math
from typing import Iterable

from lenserve.scheduler.cost_model import CostModel
from lenserve.scheduler.sequence import Sequence

HORIZON_TOKENS = 32  # a decode predicted to end within this many tokens counts as a fraction of a stream
MAX_GROWTH = 1.25  # the furthest the target stretches for a light decode set


def stall_weight(decodes: Iterable[Sequence], horizon: int = HORIZON_TOKENS) -> float:
    """How many whole streams a stalled step would hurt: each decode counts min(1, predicted
    remaining tokens / horizon) (without a prediction, its max_tokens left)."""
    return sum(min(1.0, seq.predicted_remaining / horizon) for seq in decodes)


def growth_factor(weight: float, max_growth: float = MAX_GROWTH) -> float:
    """The target's stretch for a decode set of this stall weight: 1 from one whole stream up,
    1/weight below it, at most `max_growth`."""
    if weight >= 1.0:
        return 1.0
    return min(max_growth, 1.0 / max(weight, 1e-9))


def max_prefill_tokens(
    cost: CostModel, num_decodes: int, decode_context: int, target_s: float, chunk_context: int = 0
) -> int:
    """The most prompt tokens a step may carry beside `num_decodes` decodes (attending to
    `decode_context` tokens in all) while the predicted step time stays within `target_s`; the
    chunk attends to `chunk_context` cached tokens before it. 0 when the decodes alone reach it.

    step(n) = base + token_s (d + n) + sample_s (d + 1) + decode_context_s ctx
              + prefill_attention_s n (c + (n + 1) / 2)      (a quadratic in n)
    """
    fixed = (cost.step_base_s + cost.token_s * num_decodes + cost.sample_s * (num_decodes + 1)
             + cost.decode_context_s * decode_context)
    slack = target_s - fixed
    if slack <= 0:
        return 0
    a = cost.prefill_attention_s / 2
    b = cost.token_s + cost.prefill_attention_s * (chunk_context + 0.5)
    if a > 0:
        n = (-b + math.sqrt(b * b + 4 * a * slack)) / (2 * a)
    elif b > 0:
        n = slack / b
    else:
        return 1 << 30
    return int(n)


def prefill_token_budget(
    cost: CostModel | None,
    decodes: list[Sequence],
    target_s: float,
    cap: int,
    min_chunk: int,
    chunk_context: int = 0,
) -> int:
    """The step's whole token budget (decodes included) under the latency target `target_s`."""
    num_decodes = len(decodes)
    if not decodes or cost is None:
        return cap
    target = target_s * growth_factor(stall_weight(decodes))
    context = sum(seq.num_computed_tokens + 1 for seq in decodes)
    n = max_prefill_tokens(cost, num_decodes, context, target, chunk_context)
    return min(cap, num_decodes + max(n, min_chunk))


def max_throughput(cost: CostModel, prompt_tokens, output_tokens, target_s: float | None = None, max_num_seqs: int = 64) -> float:
    """The most output tokens per second any schedule can sustain on requests shaped like these
    (arrays of prompt and output lengths), under the linear cost model: a reference that knows
    every length and wastes nothing.

    Over a long run every output token brings its share of work: one decode row, sampling, its
    context's attention, and prompt tokens (and their query-key pairs) in the ratio of the
    requests' totals, m seconds in all; a step producing D tokens costs step_base_s + D m on
    average. So the throughput is D / (step_base_s + D m), with D at most max_num_seqs, and, for a
    schedule that keeps every step within `target_s`, at most (target_s - step_base_s) / m by
    averaging the steps' times. The ITL target's price in capacity is the ratio of the two."""
    import numpy as np

    p = np.asarray(prompt_tokens, np.float64)
    o = np.asarray(output_tokens, np.float64)
    total = o.sum()
    per_token = (cost.token_s * (1.0 + p.sum() / total) + cost.sample_s
                 + cost.prefill_attention_s * float((p * (p + 1) / 2).sum()) / total
                 + cost.decode_context_s * float((p * o + o * (o + 1) / 2).sum()) / total)
    streams = float(max_num_seqs)
    if target_s is not None:
        streams = min(streams, (target_s - cost.step_base_s) / per_token)
    if streams <= 0:
        return 0.0
    return streams / (cost.step_base_s + streams * per_token)
