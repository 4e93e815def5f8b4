"""Scheduler configuration (plain dataclass; the CLI and lenserve.config fill it)."""
from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("fcfs", "sjf", "oracle")
BATCHING_MODES = ("continuous", "bucketed")
KV_RESERVE_MODES = ("none", "predicted", "max")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    # fcfs | sjf (predicted remaining length, aged) | oracle (true length from a trace; analysis only)
    policy: str = "fcfs"
    # sjf/oracle aging: each engine step a request waits counts as this many tokens less predicted
    # work. Counted in steps, not seconds, so one setting suits any hardware (at 1 a waiting
    # request gains on later arrivals as fast as a running one generates). The default trades
    # mean latency against the tail; benchmarks/bench_scheduler.py sweeps it.
    aging_tok_per_step: float = 0.3
    # sjf/oracle: a prompt token still to prefill counts as this many response tokens of work
    # (prefill compute per token relative to one decoded token of one sequence in a full batch).
    prompt_weight: float = 0.3
    # Requests that have waited longer than this go first, whatever the policy (None: no bound).
    max_wait_s: float | None = None
    # An end-to-end latency objective, in seconds from arrival: a waiting request goes first,
    # whatever the policy, once starting it any later would make it finish after the objective
    # by its expected decode time (predicted remaining tokens at the engine's measured time per
    # step; without a prediction, max_tokens). Unlike max_wait_s it starts a request predicted
    # long early enough to finish in time, so it bounds the tail that sjf trades for its mean
    # where that tail is made: the long responses (None: no objective).
    max_latency_s: float | None = None
    # A request goes first, whatever the policy, once the engine has done this many times the
    # predicted work that was queued ahead of it when it arrived, i.e. once it has waited that
    # multiple of what fcfs would have made it wait. Bounds the tail that sjf trades for its mean,
    # whatever the load (None: no bound).
    fcfs_wait_bound: float | None = None
    # continuous: admit every step (vLLM-style); bucketed: static batches from one length bucket
    # (S3 / Zheng et al. style), kept as a comparison baseline.
    batching: str = "continuous"
    # Continuous batching: fill a step's admissions from the head's predicted-length bucket (and
    # its neighbours) first, so requests admitted together finish together.
    bucket_affinity: bool = False
    # Admission looks this far into the waiting queue (in policy order) to pick and prepack prompts.
    admission_window: int = 32
    # KV blocks reserved at admission: none (the prompt only; decode grows on demand), predicted
    # (prompt + predicted p90) or max (prompt + max_tokens; never preempts, admits fewest).
    kv_reserve: str = "none"
    enable_chunked_prefill: bool = True
    # Stall-free batching: each step takes prompt tokens only up to the count whose predicted step
    # time (the live cost model) keeps the running decodes' inter-token latency within this many
    # seconds; max_num_batched_tokens stays the cap, and with no decode running the budget is the
    # cap (None: the budget is always max_num_batched_tokens). See scheduler/step_budget.py.
    target_itl_s: float | None = None
    # The fewest prompt tokens a step takes under target_itl_s, so a prompt always progresses.
    min_prefill_chunk: int = 16
    # Under target_itl_s with a length-aware policy (sjf, oracle): a waiting request whose policy
    # key is below that of the first prompt in progress starts ahead of that prompt's remaining
    # chunks, which keep min_prefill_chunk tokens of the step (shortest remaining prefill first:
    # a short prompt does not wait out a long one's chunking, which the target stretches to many
    # steps). False: prompts in progress always take the budget before new ones.
    prefill_srpt: bool = True
    # Free blocks kept back when admitting new sequences, so running ones can grow without preemption.
    watermark: float = 0.01

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}, got {self.batching!r}")
        if self.kv_reserve not in KV_RESERVE_MODES:
            raise ValueError(f"kv_reserve must be one of {', '.join(KV_RESERVE_MODES)}, got {self.kv_reserve!r}")
        if not self.aging_tok_per_step >= 0:
            raise ValueError(f"aging_tok_per_step must be >= 0, got {self.aging_tok_per_step}")
        if not self.prompt_weight >= 0:
            raise ValueError(f"prompt_weight must be >= 0, got {self.prompt_weight}")
        if self.fcfs_wait_bound is not None and not self.fcfs_wait_bound >= 1.0:
            raise ValueError(f"fcfs_wait_bound must be >= 1 (or None for no bound), got {self.fcfs_wait_bound}")
        if self.max_wait_s is not None and not self.max_wait_s > 0:
            raise ValueError(f"max_wait_s must be > 0 (or None for no bound), got {self.max_wait_s}")
        if self.max_latency_s is not None and not self.max_latency_s > 0:
            raise ValueError(f"max_latency_s must be > 0 (or None for no objective), got {self.max_latency_s}")
        if self.target_itl_s is not None and not self.target_itl_s > 0:
            raise ValueError(f"target_itl_s must be > 0 (or None for a fixed budget), got {self.target_itl_s}")
        if self.min_prefill_chunk < 1:
            raise ValueError(f"min_prefill_chunk must be at least 1, got {self.min_prefill_chunk}")
        if self.admission_window < 1:
            raise ValueError(f"admission_window must be at least 1, got {self.admission_window}")
