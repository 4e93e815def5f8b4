"""Discrete-event simulation of the scheduler on a trace, with a measured cost model and no model.

The simulator drives the real `Scheduler` (same admission, packing, reservation, preemption and
re-estimation code as the engine) with a virtual clock: each step costs what the cost model says,
and a sequence samples its end-of-sequence token when it reaches its length from the trace.
Runs of identical decode steps (no arrival that could be admitted, no finish, no re-estimation,
no preemption) are taken at once with `Scheduler.fast_forward`, so a trace costs a few scheduler
passes per request rather than one per token.

Predictions: `oracle` (the true length), `noisy:SIGMA` (a calibrated predictor that sees the
log-length through Gaussian noise of std SIGMA; its Kendall tau against the truth is
(2/pi) asin(s / sqrt(s^2 + SIGMA^2)) for lognormal lengths of log-std s, so SIGMA = s gives 0.5),
or `empirical:FILE` (errors resampled from a predictor evaluation; see `load_residuals`).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Iterable

import numpy as np

from lenserve.predictor.types import LengthPrediction, bucket_of
from lenserve.scheduler.block_manager import BlockManager
from lenserve.scheduler.config import SchedulerConfig
from lenserve.scheduler.cost_model import MAX_OVERRUN, OVERRUN_QUANTILE, CostModel, OnlineCostModel
from lenserve.scheduler.scheduler import Scheduler
from lenserve.scheduler.sequence import Sequence

EOS_TOKEN_ID = 0
FILLER_TOKEN_ID = 1
Z90 = 1.2815515655446004  # standard normal 0.9 quantile
_ONE_TOKEN = (FILLER_TOKEN_ID,)


class SimSequence(Sequence):
    """A Sequence that counts its tokens instead of storing them (trace requests have no token ids).

    `num_tokens` and `last_token_id` are plain attributes here (they shadow the base class's
    properties), which keeps the simulator's per-token bookkeeping cheap."""

    num_tokens = 0
    last_token_id = FILLER_TOKEN_ID

    def __init__(self, request_id: str, num_prompt_tokens: int, index: int, **kwargs) -> None:
        super().__init__(request_id, _ONE_TOKEN, **kwargs)
        self.token_ids = None
        self.num_prompt_tokens = num_prompt_tokens
        self.num_tokens = num_prompt_tokens
        self.index = index

    def append_token(self, token_id: int) -> None:
        self.num_tokens += 1
        self.last_token_id = token_id

    def append_tokens(self, token_id: int, count: int) -> None:
        self.num_tokens += count
        self.last_token_id = token_id


# ---- requests and predictions -------------------------------------------------------------------------
@dataclass
class SimRequests:
    """One row per request, sorted by arrival: the trace as the simulator consumes it."""

    arrival_s: np.ndarray  # float64 [n], seconds from the start, already divided by the time scale
    prompt_tokens: np.ndarray  # int64 [n]
    output_tokens: np.ndarray  # int64 [n], true response lengths (>= 1)
    max_tokens: np.ndarray  # int64 [n], the client's limit (>= output_tokens)
    num_clipped: int = 0  # requests shortened to fit max_model_len
    # Prefix structure, when the trace has it: per request, the ids of its prompt's blocks of
    # `block_tokens` tokens (cut to the clipped prompt); equal leading ids = a shared prefix.
    block_ids: list[tuple[int, ...] | None] | None = None
    block_tokens: int = 0
    session_ids: list[str | None] | None = None  # per request, when the trace has sessions

    def __len__(self) -> int:
        return len(self.arrival_s)

    @classmethod
    def from_arrays(
        cls,
        arrival_s: np.ndarray,
        prompt_tokens: np.ndarray,
        output_tokens: np.ndarray,
        *,
        time_scale: float = 1.0,
        max_model_len: int = 8192,
        max_tokens: int = 2048,
        block_ids: list[tuple[int, ...] | None] | None = None,
        block_tokens: int = 0,
        session_ids: list[str | None] | None = None,
    ) -> SimRequests:
        """Drops failed rows (no response), scales time (2 = twice as fast) and clips lengths so
        prompt + response fits max_model_len; max_tokens is max(the limit, the true length)."""
        if not time_scale > 0:
            raise ValueError(f"time scale must be > 0, got {time_scale}")
        if block_ids is not None and block_tokens < 1:
            raise ValueError(f"block ids need block_tokens >= 1, got {block_tokens}")
        arrival_s = np.asarray(arrival_s, np.float64)
        prompt = np.maximum(np.asarray(prompt_tokens, np.int64), 1)
        output = np.asarray(output_tokens, np.int64)
        keep = np.flatnonzero(output > 0)
        arrival_s, prompt, output = arrival_s[keep], prompt[keep], output[keep]
        order = np.argsort(arrival_s, kind="stable")
        arrival_s, prompt, output = arrival_s[order], prompt[order], output[order]
        if len(arrival_s):
            arrival_s = (arrival_s - arrival_s[0]) / time_scale
        # A request that fits is left whole (a long prompt with a short answer keeps its prompt);
        # one that does not keeps its prompt up to what leaves its answer room, at most half.
        room = np.minimum(output, max_model_len // 2)
        clipped_prompt = np.minimum(prompt, max_model_len - np.maximum(room, 1))
        clipped_output = np.minimum(output, max_model_len - clipped_prompt)
        num_clipped = int(np.sum((clipped_prompt != prompt) | (clipped_output != output)))
        limit = np.minimum(np.maximum(max_tokens, clipped_output), max_model_len - clipped_prompt)
        rows = keep[order].tolist()
        ids = None
        if block_ids is not None:
            ids = [None if block_ids[j] is None else tuple(block_ids[j][: -(-p // block_tokens)])
                   for j, p in zip(rows, clipped_prompt.tolist())]
        sessions = [session_ids[j] for j in rows] if session_ids is not None else None
        return cls(arrival_s, clipped_prompt, clipped_output, limit, num_clipped, ids, block_tokens if ids is not None else 0, sessions)

    @classmethod
    def from_trace(cls, trace, **kwargs) -> SimRequests:
        """The trace's requests; with its prefix blocks (hash_ids, meta["block_tokens"]) when it has them."""
        c = trace.columns
        output = np.where(c.failed, 0, c.output_tokens)
        if c.hash_ids is not None and "block_ids" not in kwargs:
            kwargs.update(block_ids=c.hash_ids.tolist(), block_tokens=int(trace.meta.get("block_tokens", 512)))
        if c.session_id is not None and "session_ids" not in kwargs:
            kwargs["session_ids"] = c.sessions()
        return cls.from_arrays(c.arrival_s, c.prompt_tokens, output, **kwargs)


@dataclass
class Predictions:
    """Predicted total output length per request (mean, p50, p90), as arrays."""

    mean: np.ndarray
    p50: np.ndarray
    p90: np.ndarray
    source: str = ""

    def at(self, i: int) -> LengthPrediction:
        mean = float(self.mean[i])
        return LengthPrediction(mean=mean, p50=float(self.p50[i]), p90=float(self.p90[i]), bucket=bucket_of(mean))

    def kendall_tau(self, truth: np.ndarray, max_pairs_rows: int = 20000, seed: int = 0) -> float:
        """Kendall's tau-b of p50 against the truth, on a sample of rows."""
        from scipy.stats import kendalltau

        idx = np.arange(len(truth))
        if len(idx) > max_pairs_rows:
            idx = np.random.default_rng(seed).choice(idx, max_pairs_rows, replace=False)
        return float(kendalltau(self.p50[idx], truth[idx]).statistic)


def oracle_predictions(output_tokens: np.ndarray) -> Predictions:
    x = output_tokens.astype(np.float64)
    return Predictions(x, x.copy(), x.copy(), "oracle")


def noisy_predictions(output_tokens: np.ndarray, sigma: float, seed: int = 0) -> Predictions:
    """A calibrated predictor that observes log-length plus N(0, sigma^2) noise.

    With a lognormal prior fitted to the lengths (mean mu, std s of log-length), the posterior of
    log-length given the observation z is normal with mean mu + w (z - mu), w = s^2 / (s^2 + sigma^2),
    and variance w sigma^2: p50, p90 and mean follow. So predictions regress to the mean and p90
    covers about 90% of lengths, as a trained predictor's do."""
    if not sigma >= 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    log_len = np.log(output_tokens.astype(np.float64))
    if sigma == 0:
        return oracle_predictions(output_tokens)
    rng = np.random.default_rng([seed, 1])  # its own stream, apart from any trace generator's
    mu, s = float(log_len.mean()), float(log_len.std()) or 1e-6
    z = log_len + rng.normal(0.0, sigma, len(log_len))
    w = s * s / (s * s + sigma * sigma)
    m = mu + w * (z - mu)
    sd = math.sqrt(w) * sigma
    return Predictions(np.exp(m + sd * sd / 2), np.exp(m), np.exp(m + Z90 * sd), f"noisy:{sigma:g}")


def sigma_for_tau(output_tokens: np.ndarray, tau: float) -> float:
    """The noise sigma that gives Kendall tau `tau` when log-lengths are normal."""
    s = float(np.log(output_tokens.astype(np.float64)).std())
    rho = math.sin(math.pi * tau / 2)
    return s * math.sqrt(1.0 / (rho * rho) - 1.0)


@dataclass
class Residuals:
    """A predictor's errors on held-out rows: actual lengths with its point and p90 predictions."""

    actual: np.ndarray
    predicted: np.ndarray
    p90: np.ndarray | None = None


def load_residuals(path: str) -> Residuals:
    """Reads a predictor evaluation's residuals. Accepted JSON:

    - {"actual": [...], "predicted": [...], "p90": [...] (optional)} - one entry per held-out row
      (lengths in tokens; "predicted" is the point prediction, the p50 or the mean), or the same
      as JSON lines of {"actual": a, "predicted": p, "p90": q};
    - a plain list of log(predicted / actual) ratios (errors then do not depend on the length).
    """
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = {k: [row.get(k) for row in data] for k in ("actual", "predicted", "p90")}
        if any(v is None for v in data["p90"]):
            data.pop("p90")
    if isinstance(data, dict):
        try:
            actual = np.asarray(data["actual"], np.float64)
            predicted = np.asarray(data["predicted"], np.float64)
        except KeyError as e:
            raise ValueError(f"residuals file {path} lacks {e.args[0]!r}") from None
        p90 = np.asarray(data["p90"], np.float64) if data.get("p90") is not None else None
        if len(actual) != len(predicted) or (p90 is not None and len(p90) != len(actual)):
            raise ValueError(f"residuals file {path}: actual, predicted and p90 differ in length")
        ok = (actual > 0) & (predicted > 0)
        return Residuals(actual[ok], predicted[ok], p90[ok] if p90 is not None else None)
    if isinstance(data, list):
        ratios = np.exp(np.asarray(data, np.float64))
        return Residuals(np.ones(len(ratios)), ratios)
    raise ValueError(f"residuals file {path}: expected a JSON object, JSON lines or a list of log ratios")


def empirical_predictions(output_tokens: np.ndarray, residuals: Residuals, seed: int = 0) -> Predictions:
    """Resamples the predictor's errors, conditioned on the actual length (same power-of-two bin):
    a request of length L gets L * predicted/actual of a held-out row of similar length, so the
    predictor's regression to the mean carries over. p90 comes from that row when the file has it,
    else from the 90th percentile of actual/predicted over all rows."""
    if not len(residuals.actual):
        raise ValueError("residuals are empty")
    rng = np.random.default_rng([seed, 2])
    ratio = residuals.predicted / residuals.actual
    if residuals.p90 is not None:
        p90_ratio = residuals.p90 / residuals.predicted
    else:
        p90_ratio = np.full(len(ratio), float(np.quantile(residuals.actual / residuals.predicted, 0.9)))
    row_bins = np.floor(np.log2(residuals.actual)).astype(np.int64)
    bins = np.unique(row_bins)
    truth = output_tokens.astype(np.float64)
    req_bins = np.floor(np.log2(truth)).astype(np.int64)
    # Nearest bin that has rows, per request.
    pos = np.clip(np.searchsorted(bins, req_bins), 0, len(bins) - 1)
    lower = np.clip(pos - 1, 0, len(bins) - 1)
    nearest = np.where(np.abs(bins[lower] - req_bins) < np.abs(bins[pos] - req_bins), bins[lower], bins[pos])
    picks = np.empty(len(truth), np.int64)
    for b in np.unique(nearest):
        rows = np.flatnonzero(row_bins == b)
        mask = nearest == b
        picks[mask] = rows[rng.integers(0, len(rows), int(mask.sum()))]
    p50 = np.maximum(truth * ratio[picks], 1.0)
    p90 = np.maximum(p50 * np.maximum(p90_ratio[picks], 1.0), p50)
    return Predictions(p50.copy(), p50, p90, "empirical")


def make_predictions(spec: str, output_tokens: np.ndarray, seed: int = 0) -> Predictions:
    """`oracle`, `noisy:SIGMA`, `noisy-tau:TAU` or `empirical:FILE`."""
    kind, _, arg = spec.partition(":")
    if kind == "oracle":
        return oracle_predictions(output_tokens)
    if kind == "noisy":
        return noisy_predictions(output_tokens, float(arg), seed)
    if kind == "noisy-tau":
        tau = float(arg)
        if not 0 < tau < 1:
            raise ValueError(f"noisy-tau needs a Kendall tau in (0, 1), got {arg!r}")
        preds = noisy_predictions(output_tokens, sigma_for_tau(output_tokens, tau), seed)
        preds.source = f"noisy-tau:{tau:g}"
        return preds
    if kind == "empirical" and arg:
        preds = empirical_predictions(output_tokens, load_residuals(arg), seed)
        preds.source = f"empirical:{arg}"
        return preds
    raise ValueError(f"predictions must be oracle, noisy:SIGMA, noisy-tau:TAU or empirical:FILE, got {spec!r}")


# ---- the simulation -------------------------------------------------------------------------------------
@dataclass
class SimResult:
    policy: str
    e2e_s: np.ndarray  # per request, in arrival order
    ttft_s: np.ndarray
    output_tokens: np.ndarray
    makespan_s: float  # first arrival to last finish
    num_preemptions: int
    num_reestimations: int
    max_concurrent: int
    mean_concurrent: float
    num_steps: int  # engine steps simulated (fast-forwarded ones included)
    num_passes: int  # scheduler passes the simulation took
    wall_s: float
    # Inter-token gaps: gap lengths and how many token gaps had each (a run of decode steps taken
    # at once counts its mean step once per sequence and step).
    itl_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    itl_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        n = len(self.e2e_s)

        def pct(x: np.ndarray, q: float) -> float:
            return float(np.percentile(x, q)) if n else float("nan")

        num_gaps = int(self.itl_count.sum())
        itl = {
            "mean_itl_s": float(np.dot(self.itl_s, self.itl_count) / num_gaps) if num_gaps else float("nan"),
            "p50_itl_s": weighted_percentile(self.itl_s, self.itl_count, 50),
            "p99_itl_s": weighted_percentile(self.itl_s, self.itl_count, 99),
        }

        return {
            "num_requests": n,
            "mean_e2e_s": float(self.e2e_s.mean()) if n else float("nan"),
            "p50_e2e_s": pct(self.e2e_s, 50),
            "p99_e2e_s": pct(self.e2e_s, 99),
            "mean_ttft_s": float(self.ttft_s.mean()) if n else float("nan"),
            "p50_ttft_s": pct(self.ttft_s, 50),
            "p99_ttft_s": pct(self.ttft_s, 99),
            **itl,
            "throughput_tok_s": float(self.output_tokens.sum() / self.makespan_s) if self.makespan_s > 0 else 0.0,
            "preemptions": self.num_preemptions,
            "preemption_rate": self.num_preemptions / n if n else 0.0,
            "max_concurrent": self.max_concurrent,
            "mean_concurrent": self.mean_concurrent,
            "reestimations": self.num_reestimations,
            "makespan_s": self.makespan_s,
            "num_steps": self.num_steps,
            "sim_passes": self.num_passes,
            "sim_wall_s": self.wall_s,
            "sim_requests_per_s": n / self.wall_s if self.wall_s > 0 else float("inf"),
            **self.extra,
        }


def weighted_percentile(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The q-th percentile of `values` each repeated `counts` times (the lower value at a tie,
    as numpy's 'inverted_cdf'); nan when empty."""
    total = int(np.sum(counts))
    if not total:
        return float("nan")
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(np.asarray(counts)[order])
    rank = max(int(np.ceil(q / 100 * total)), 1)
    return float(np.asarray(values)[order][np.searchsorted(cum, rank)])


def num_token_gaps(seqs) -> int:
    """Sequences among `seqs` (those sampling this step) whose token ends an inter-token gap: all
    but those sampling their first token."""
    return sum(1 for seq in seqs if seq.num_output_tokens > 0)


def scheduler_config_for(cost: CostModel, **overrides) -> SchedulerConfig:
    """A SchedulerConfig with the cost model's engine limits, then `overrides`."""
    base = dict(
        max_num_seqs=cost.max_num_seqs,
        max_num_batched_tokens=cost.max_num_batched_tokens,
        max_model_len=cost.max_model_len,
    )
    base.update(overrides)
    return SchedulerConfig(**base)



def overrun_model(cost: CostModel, noise: np.ndarray) -> OnlineCostModel:
    """`cost` as the engine's online model would hold it on steps that scatter as `noise` does: the
    same coefficients (never refitted here) and the overrun it would measure, so that the budget
    rule discounts the target as it does live."""
    online = OnlineCostModel(prior=cost)
    online.can_refit = False
    online.overrun = float(np.clip(np.quantile(noise, OVERRUN_QUANTILE), 1.0, MAX_OVERRUN))
    return online


def step_work(out) -> tuple[int, int, float, int, dict[str, int]]:
    """What one scheduled step costs and samples: (tokens, sequences sampled, prefill attention
    pairs, decode context tokens, {request_id: token}) with EOS once a sequence reaches its true
    length, else a filler token."""
    num_tokens = num_sampled = decode_context = 0
    prefill_pairs = 0.0
    sampled = {}
    for seq, num_new in zip(out.seqs, out.num_new_tokens):
        computed = seq.num_computed_tokens
        num_tokens += num_new
        if num_new == 1:
            decode_context += computed + 1
        else:
            prefill_pairs += num_new * (computed + (num_new + 1) / 2)
        if computed + num_new == seq.num_tokens:
            num_sampled += 1
            done = seq.num_tokens - seq.num_prompt_tokens + 1 >= seq.true_output_len
            sampled[seq.request_id] = EOS_TOKEN_ID if done else FILLER_TOKEN_ID
    return num_tokens, num_sampled, prefill_pairs, decode_context, sampled


def decode_run(running, horizon: int) -> tuple[int, int, int, list]:
    """A run of up to `horizon` decode steps of every running sequence, cut at the first step where
    one of them reaches its true length: (sequences, context tokens, steps, those that end then)."""
    context = 0
    k = horizon
    ending: list[Sequence] = []  # the sequences with the fewest tokens left
    for seq in running:
        context += seq.num_tokens
        left = seq.true_output_len - seq.num_tokens + seq.num_prompt_tokens
        if left <= k:
            if left < k:
                k = left
                ending = []
            ending.append(seq)
    return len(running), context, k, ending


def run_stops(ending, k: int) -> dict[str, int]:
    """EOS for the sequences of `ending` that reach their true length after k more steps."""
    return {seq.request_id: EOS_TOKEN_ID for seq in ending if seq.true_output_len - seq.num_tokens + seq.num_prompt_tokens == k}


def simulate(
    requests: SimRequests,
    config: SchedulerConfig,
    cost: CostModel,
    predictions: Predictions | None = None,
    *,
    num_kv_blocks: int | None = None,
    block_size: int | None = None,
    fast_forward: bool = True,
    step_noise: np.ndarray | None = None,
    seed: int = 0,
) -> SimResult:
    """Runs every request of the trace through a Scheduler to completion in simulated time.
    `fast_forward=False` takes every step one by one (the same result, slower: for tests).

    `step_noise`: measured over predicted step times (`CostModel.residuals()`); each step's time is
    the model's times one of them drawn at random (seeded), and the scheduler discounts a latency
    target by their OVERRUN_QUANTILE as the live engine does with its online model's overrun.
    Without it every step takes exactly what the model says, and ITL p99 sits at the target."""
    wall0 = time.perf_counter()
    rng = np.random.default_rng([seed, 3])
    noise = np.asarray(step_noise, np.float64) if step_noise is not None and len(step_noise) else None

    def noisy(num_steps: int) -> np.ndarray:
        return rng.choice(noise, num_steps) if noise is not None else np.ones(num_steps)

    n = len(requests)
    arrival = requests.arrival_s.tolist()
    prompt = requests.prompt_tokens.tolist()
    output = requests.output_tokens.tolist()
    limit = requests.max_tokens.tolist()
    now = [0.0]
    block_manager = BlockManager(num_kv_blocks or cost.num_kv_blocks, block_size or cost.block_size, enable_prefix_caching=False)
    sched = Scheduler(config, block_manager, clock=lambda: now[0], cost_model=cost if noise is None else overrun_model(cost, noise))
    running = sched.running  # the scheduler mutates this list in place
    wait_bound = config.fcfs_wait_bound

    e2e = np.full(n, np.nan)
    ttft = np.full(n, np.nan)
    generated = np.zeros(n, np.int64)
    num_steps = num_passes = max_concurrent = 0
    busy_seq_s = 0.0  # integral of the running count over time
    itl_s: list[float] = []
    itl_count: list[int] = []
    first_arrival = arrival[0] if n else 0.0

    def make(i: int) -> SimSequence:
        return SimSequence(
            str(i),
            prompt[i],
            i,
            max_tokens=limit[i],
            arrival_time=arrival[i],
            eos_token_id=EOS_TOKEN_ID,
            prediction=predictions.at(i) if predictions is not None else None,
            true_output_len=output[i],
        )

    def record(finished: Iterable[Sequence]) -> None:
        for seq in finished:
            i = seq.index
            e2e[i] = seq.finished_time - seq.arrival_time
            ttft[i] = seq.first_token_time - seq.arrival_time
            generated[i] = seq.num_output_tokens

    i = 0
    while True:
        t = now[0]
        while i < n and arrival[i] <= t:
            sched.add(make(i))
            i += 1
        if not running and not sched.waiting:
            if i >= n:
                break
            now[0] = arrival[i]
            continue
        num_passes += 1

        horizon = sched.decode_horizon() if running and fast_forward else 0
        if horizon:
            num_seqs, context, k, ending = decode_run(running, horizon)
            end = t + cost.decode_time(num_seqs, context, k)
            bound = min(end, sched.next_wakeup_time())
            # Arrivals during the run join the queue now; the run stops at the first one that
            # could be admitted (none can pass a head that is waiting for memory or a slot).
            while i < n and arrival[i] <= bound:
                # Joins at the step boundary that follows its arrival, as it would step by step.
                seq = make(i)
                steps_before = cost.decode_steps_to(num_seqs, context, arrival[i] - t)
                seq.arrival_step = sched.num_steps + steps_before
                if wait_bound:
                    seq.wait_deadline = sched.wait_deadline(sched.work_done + steps_before * num_seqs)
                sched.add(seq)
                i += 1
                if sched.can_admit():
                    bound = arrival[i - 1]
                    break
            shorter = k
            if bound < end:
                shorter = cost.decode_steps_to(num_seqs, context, bound - t)
            if wait_bound:  # an arrival of this run may become overdue within it
                shorter = min(shorter, sched.steps_to_next_deadline())
            if shorter < k:
                k = shorter
                ending = []
                end = t + cost.decode_time(num_seqs, context, k)
            stops = run_stops(ending, k)
            if noise is None:
                itl_s.append((end - t) / k)
                itl_count.append(num_token_gaps(running) + (k - 1) * num_seqs)
            else:  # each step of the run its own draw, each one's gaps counted apart
                gaps = (end - t) / k * noisy(k)
                end = t + float(gaps.sum())
                itl_s.extend(gaps.tolist())
                itl_count.extend([num_token_gaps(running)] + [num_seqs] * (k - 1))
            now[0] = end
            max_concurrent = max(max_concurrent, num_seqs)
            busy_seq_s += num_seqs * (end - t)
            num_steps += k
            sched.record_step_time(end - t, k)
            record(sched.fast_forward(k, stops, FILLER_TOKEN_ID))
            continue

        out = sched.schedule()
        if out.is_empty:
            if i >= n:
                raise RuntimeError("simulation stalled: requests wait but nothing can be scheduled")
            now[0] = arrival[i]
            continue
        num_tokens, num_sampled, prefill_pairs, decode_context, sampled = step_work(out)
        dt = cost.step_time(num_tokens, num_sampled, prefill_pairs, decode_context) * float(noisy(1)[0])
        num_running = len(running)
        max_concurrent = max(max_concurrent, num_running)
        busy_seq_s += num_running * dt
        gaps = num_token_gaps(out.seqs[i] for i in range(len(out.seqs)) if out.samples(i))
        if gaps:
            itl_s.append(dt)
            itl_count.append(gaps)
        num_steps += 1
        now[0] = t + dt
        sched.record_step_time(dt)
        record(sched.update(out, sampled))

    makespan = (now[0] - first_arrival) if n else 0.0
    return SimResult(
        policy=config.policy,
        e2e_s=e2e,
        ttft_s=ttft,
        output_tokens=generated,
        makespan_s=makespan,
        num_preemptions=sched.num_preemptions_total,
        num_reestimations=sched.num_reestimations_total,
        max_concurrent=max_concurrent,
        mean_concurrent=busy_seq_s / makespan if makespan > 0 else 0.0,
        num_steps=num_steps,
        num_passes=num_passes,
        wall_s=time.perf_counter() - wall0,
        itl_s=np.array(itl_s),
        itl_count=np.array(itl_count, np.int64),
    )


def simulate_policies(
    requests: SimRequests,
    policies: Iterable[str],
    config: SchedulerConfig,
    cost: CostModel,
    predictions: Predictions | None = None,
    **kwargs,
) -> dict[str, dict]:
    """One simulation per policy on the same requests and predictions: {policy: summary}."""
    results = {}
    tau = predictions.kendall_tau(requests.output_tokens.astype(np.float64)) if predictions is not None else None
    for policy in policies:
        result = simulate(requests, replace(config, policy=policy), cost, predictions, **kwargs)
        summary = result.summary()
        if predictions is not None:
            summary["predictions"] = predictions.source
            summary["prediction_kendall_tau"] = tau
        results[policy] = summary
    return results
