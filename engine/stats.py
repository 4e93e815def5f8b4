"""Statistics the engine emits each step; server/metrics.py turns them into Prometheus metrics."""
from __future__ import annotations

from dataclasses import dataclass, field

from lenserve.scheduler.output import SchedulerStats


@dataclass
class FinishedRequestStats:
    finish_reason: str
    e2e_s: float
    queue_s: float
    prefill_s: float
    decode_s: float
    ttft_s: float | None
    num_prompt_tokens: int
    num_generation_tokens: int
    predicted_tokens: float | None = None
    bucket: int | None = None
    refined_tokens: float | None = None  # the length probe's mean, read at the end of the prefill


@dataclass
class IterationStats:
    step_time_s: float = 0.0
    num_prompt_tokens: int = 0  # prompt tokens computed this step
    num_generation_tokens: int = 0  # tokens sampled this step
    num_batched_tokens: int = 0
    token_budget: int = 0  # the scheduler's token budget for this step (max_num_batched_tokens or by target_itl_s)
    num_itl_target_misses: int = 0  # inter-token gaps this step longer than the scheduler's target_itl_s
    cost_model: dict[str, float] | None = None  # the step cost model's terms, when a refit changed them this step
    cost_model_lifetime: dict[str, float] | None = None  # the fit over every step so far, refreshed with cost_model
    # that fit's measured over predicted step time at quantiles {q: ratio}, refreshed with it
    cost_model_lifetime_scatter: dict[float, float] | None = None
    step_time_over_predicted: float | None = None  # step_time_s / the cost model's prediction for the step (None: no model)
    num_preemptions: int = 0
    padding_ratio: float = 0.0  # padded rows / rows in the forward (0 when packed)
    bitmask_time_s: float | None = None  # filling and applying grammar masks (None: no constrained row)
    time_to_first_tokens_s: list[float] = field(default_factory=list)
    inter_token_latencies_s: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)
    scheduler: SchedulerStats = field(default_factory=SchedulerStats)
