"""How long an engine step takes, as a function of what the scheduler put in it.

    step_s = step_base_s + token_s * num_tokens + sample_s * num_sampled
             + prefill_attention_s * prefill_pairs + decode_context_s * decode_context

`num_tokens` counts every scheduled token (the linear layers see each once), `num_sampled` the
sequences that sample this step (LM head and sampler), `prefill_pairs` the query-key pairs of
prompt chunks (n new tokens after c cached ones attend n * (c + (n + 1) / 2); compute-bound) and
`decode_context` the tokens that one-token decodes attend to (their whole context; paged and
memory-bound, so a pair costs far more than in a prefill).
The coefficients are fitted (non-negative least squares) to step times measured from the real
engine by `lenserve bench cost-model`; the JSON file also records the engine settings measured
(KV blocks, block size, batch limits), which the simulator uses as its defaults.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Sequence

FEATURES = ("step_base_s", "token_s", "sample_s", "prefill_attention_s", "decode_context_s")


@dataclass
class CostModel:
    step_base_s: float
    token_s: float
    sample_s: float
    prefill_attention_s: float
    decode_context_s: float
    # Engine settings at measurement time: defaults for a simulation of that engine.
    num_kv_blocks: int = 11650
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    meta: dict = field(default_factory=dict)

    def step_time(self, num_tokens: int, num_sampled: int, prefill_pairs: float, decode_context: int) -> float:
        return (
            self.step_base_s
            + self.token_s * num_tokens
            + self.sample_s * num_sampled
            + self.prefill_attention_s * prefill_pairs
            + self.decode_context_s * decode_context
        )

    def decode_time(self, num_seqs: int, context_tokens: int, num_steps: int) -> float:
        """Time of `num_steps` decode steps of `num_seqs` sequences holding `context_tokens` tokens
        in all (each step attends to every token, and adds one per sequence)."""
        per_step = self.step_base_s + (self.token_s + self.sample_s) * num_seqs + self.decode_context_s * context_tokens
        return num_steps * per_step + self.decode_context_s * num_seqs * num_steps * (num_steps - 1) / 2

    def decode_steps_to(self, num_seqs: int, context_tokens: int, duration_s: float) -> int:
        """The fewest decode steps (at least 1) that take at least `duration_s`."""
        per_step = self.step_base_s + (self.token_s + self.sample_s) * num_seqs + self.decode_context_s * context_tokens
        growth = self.decode_context_s * num_seqs / 2
        if growth > 0:
            b = per_step - growth
            k = (-b + math.sqrt(b * b + 4 * growth * max(duration_s, 0.0))) / (2 * growth)
        else:
            k = duration_s / per_step if per_step > 0 else 1.0
        k = max(math.ceil(k), 1)
        while k > 1 and self.decode_time(num_seqs, context_tokens, k - 1) >= duration_s:
            k -= 1
        while self.decode_time(num_seqs, context_tokens, k) < duration_s:
            k += 1
        return k

    def residuals(self):
        """Measured over predicted time of the steps this model was fitted to (those its meta
        records), as a numpy array; empty when it records none."""
        import numpy as np

        samples = (self.meta or {}).get("samples") or []
        pred = np.array([self.step_time(s["num_tokens"], s["num_sampled"], s["prefill_pairs"], s["decode_context"]) for s in samples])
        measured = np.array([s["step_s"] for s in samples])
        keep = pred > 0
        return measured[keep] / pred[keep]

    # ---- files -----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostModel:
        with open(path) as f:
            data = json.load(f)
        missing = [k for k in FEATURES if k not in data]
        if missing:
            raise ValueError(f"cost model {path} lacks {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


DEFAULT_COST_MODEL = os.path.join(os.path.dirname(__file__), "data", "cost_model_cpu.json")


def load_default() -> CostModel:
    if not os.path.exists(DEFAULT_COST_MODEL):
        raise FileNotFoundError(
            f"no default cost model at {DEFAULT_COST_MODEL}; measure one with `lenserve bench cost-model --out FILE`"
        )
    return CostModel.load(DEFAULT_COST_MODEL)


def step_features(seqs_and_new_tokens) -> dict:
    """The cost model's inputs for one step: (sequence, new tokens) pairs, before the step runs."""
    num_tokens = num_sampled = decode_context = 0
    prefill_pairs = 0.0
    for seq, num_new in seqs_and_new_tokens:
        computed = seq.num_computed_tokens
        num_tokens += num_new
        if computed + num_new == seq.num_tokens:
            num_sampled += 1
        if num_new == 1:
            decode_context += computed + 1
        else:
            prefill_pairs += num_new * (computed + (num_new + 1) / 2)
    return {"num_tokens": num_tokens, "num_sampled": num_sampled, "prefill_pairs": prefill_pairs, "decode_context": decode_context}


def fit(samples: Sequence[dict], **settings) -> CostModel:
    """Non-negative least squares over measured steps (dicts of step_features and step_s), then a
    robust refit (soft-L1 loss) so that a few steps the OS slowed down do not drag the coefficients.
    Relative error is what matters (a 50 ms decode step and a 2 s prefill both count), so each
    row is weighted by 1 / its time."""
    import numpy as np
    from scipy.optimize import least_squares, nnls

    keys = ("num_tokens", "num_sampled", "prefill_pairs", "decode_context")
    x = np.array([[1.0] + [float(s[k]) for k in keys] for s in samples])
    y = np.array([s["step_s"] for s in samples])
    w = 1.0 / np.maximum(y, 1e-6)
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)  # conditions the solve; undone below
    a = x / scale * w[:, None]
    coef, _ = nnls(a, y * w)
    if len(samples) > x.shape[1]:
        # residuals are relative errors: past ~5% a step counts less and less (an outlier, not the model)
        robust = least_squares(lambda c: a @ c - y * w, np.maximum(coef, 1e-12), bounds=(0.0, np.inf), loss="soft_l1", f_scale=0.05)
        coef = robust.x
    coef = coef / scale
    rel = np.abs(x @ coef - y) / y
    meta = dict(settings.pop("meta", {}))
    meta.update({
        "num_samples": len(samples),
        "fit_mean_abs_rel_error": float(rel.mean()),
        "fit_median_abs_rel_error": float(np.median(rel)),
        "fit_max_abs_rel_error": float(rel.max()),
    })
    return CostModel(*map(float, coef), meta=meta, **settings)


OVERRUN_QUANTILE = 0.9
# The lifetime model's scatter: a uniform sample of this many steps, read at these quantiles (the
# midpoints of 50 equal slices, so that the values stand for the distribution, tails included).
LIFETIME_RESERVOIR = 2048
FOLD_EVERY = 256  # steps whose rows _accumulate keeps before folding them into the lifetime sums
LIFETIME_QUANTILES = tuple(round((i + 0.5) / 50, 3) for i in range(50))
MAX_OVERRUN = 2.0
STALL_RATIO = 3.0  # a step this far off the model (either way) is a stall of the OS, not the model's to fit


class OnlineCostModel:
    """The cost model the engine schedules with: refitted from the steps it measures while it runs.

    A shipped or measured model is a prior, not the truth: this machine may be 2-3x slower or
    faster than the one it was measured on, and other work shares the CPU. The engine reports
    every step's features (`step_features`) with its measured duration; every `refit_every`
    steps, once `refit_min_s` of measured step time has passed, the coefficients are refitted
    (non-negative least squares, relative error, a step's weight halving every `half_life` steps)
    over a window of recent steps, kept in two halves, steps that carried prompt tokens and pure
    decode steps, so that a long spell of one kind does not forget the other (a decode-only window
    cannot tell the per-token cost of a prefill from the per-sequence cost of sampling). The
    prior, rescaled to the speed the steps show, enters the fit as `prior_weight` pseudo-steps,
    so it decides only what the steps leave open; steps more than 3x off the fit (the OS stalled
    the process) are dropped from the refit. `overrun`, the 90th percentile of measured over
    predicted time on recent steps, says how much to discount a target by so that noise (other
    work on the machine, the HTTP thread holding the GIL) does not carry most steps past it. `model` is None until there is a prior or enough steps."""

    MIN_SAMPLES = 8

    def __init__(self, prior: CostModel | None = None, window: int = 256, refit_every: int = 16, prior_weight: float = 8.0,
                 half_life: int = 32, refit_min_s: float = 0.0) -> None:
        from collections import deque

        # The refit solves its small non-negative least squares with numpy alone (`_nnls`):
        # scipy.optimize would cost every serving process ~38 MiB resident and ~1 s to import.
        # Without numpy (a bare GPU machine) nothing is refitted: the prior, if any, stays the model.
        try:
            import numpy  # noqa: F401

            self.can_refit = True
        except ImportError:
            self.can_refit = False

        self.prior = prior
        self.model: CostModel | None = prior
        self._prefill: deque = deque(maxlen=window // 2)
        self._decode: deque = deque(maxlen=window // 2)
        self._refit_every = refit_every
        # and at least this much measured step time between refits: a refit (~1 ms of numpy) every
        # 16 steps of ~4 ms was ~1.5% of a batch-1 decode step; the machine's speed drifts over
        # seconds, not milliseconds
        self._refit_min_s = refit_min_s
        self._since_refit_s = 0.0
        self._prior_weight = prior_weight
        self._half_life = half_life  # steps after which a step's weight in the (squared) loss halves
        self._since_refit = 0
        self._support: tuple[int, ...] | None = None  # the last refit's nonzero coefficients
        self._lifetime_support: tuple[int, ...] | None = None  # the same for the lifetime fit
        self.num_observed = 0
        self.num_refits = 0
        # How much longer than predicted a step runs, at OVERRUN_QUANTILE of recent steps (>= 1):
        # a budget aimed at target / overrun keeps that share of steps within the target.
        self.overrun = 1.0
        # The lifetime fit: every step since start weighs the same (relative error), kept as the
        # normal equations of the weighted least squares (5 x 5), so memory stays constant. The
        # online model follows the machine for control; this one describes the server's steps
        # over its whole run, for simulating it on other traffic (capacity, other traces).
        self._gram = self._moment = self._col_max = None
        self._unfolded: list[tuple] = []  # rows not yet in the sums above (_fold)
        self.num_lifetime = 0
        # A uniform sample (reservoir) of those steps, so that the lifetime model's own scatter
        # (measured over its predicted time) can be read at any moment: a simulation that runs the
        # lifetime model draws from it (the online model's scatter also holds its drift).
        self._reservoir: list[tuple] = []
        self._reservoir_rng = random.Random(0)  # seeded: a run is reproducible

    def terms(self) -> dict[str, float]:
        """The current model's coefficients by name (empty while there is none)."""
        return _terms(self.model)

    def observe(self, features: dict, step_s: float) -> float | None:
        """Takes one measured step; returns its measured over predicted time under the model in
        force when it was scheduled (None without a model or for a step with no tokens): the
        scatter that `lenserve:step_time_over_predicted` reports and a simulation can replay."""
        if not step_s > 0 or not features["num_tokens"]:
            return None
        ratio = None
        if self.model is not None:
            predicted = self.model.step_time(**features)
            ratio = step_s / predicted if predicted > 0 else None
        row = (1.0, float(features["num_tokens"]), float(features["num_sampled"]),
               float(features["prefill_pairs"]), float(features["decode_context"]), float(step_s), float(self.num_observed))
        (self._prefill if features["prefill_pairs"] else self._decode).append(row)
        if self.can_refit and not (ratio is not None and ratio > STALL_RATIO):  # a stall, not the model
            self._accumulate(row[:5], float(step_s))
        self.num_observed += 1
        self._since_refit += 1
        self._since_refit_s += step_s
        if (self.can_refit and self._since_refit >= self._refit_every and self._since_refit_s >= self._refit_min_s
                and len(self._prefill) + len(self._decode) >= self.MIN_SAMPLES):
            self.refit()
        return ratio

    def _accumulate(self, x: tuple, step_s: float) -> None:
        # Folded into the lifetime sums in batches (_fold): a step only appends its row, where
        # numpy's calls on one 5-vector cost ~1% of a batch-1 decode step.
        row = (*x, step_s)
        self._unfolded.append(row)
        if len(self._unfolded) >= FOLD_EVERY:
            self._fold()
        self.num_lifetime += 1
        if len(self._reservoir) < LIFETIME_RESERVOIR:
            self._reservoir.append(row)
        else:  # Algorithm R: every step so far stays in the sample with the same probability
            j = self._reservoir_rng.randrange(self.num_lifetime)
            if j < LIFETIME_RESERVOIR:
                self._reservoir[j] = row

    def _fold(self) -> None:
        """The rows _accumulate kept into the lifetime sums: each row x weighted by 1 / its time y
        (relative error), gram += v vᵀ and moment += v with v = x / y, and each column's largest |x|."""
        if not self._unfolded:
            return
        import numpy as np

        rows = np.asarray(self._unfolded, dtype=float)
        self._unfolded.clear()
        x, y = rows[:, :5], rows[:, 5]
        v = x / y[:, None]
        if self._gram is None:
            self._gram, self._moment, self._col_max = np.zeros((5, 5)), np.zeros(5), np.zeros(5)
        self._gram += v.T @ v
        self._moment += v.sum(axis=0)  # (x / y) * (y / y)
        self._col_max = np.maximum(self._col_max, np.abs(x).max(axis=0))

    def lifetime_model(self) -> CostModel | None:
        """Non-negative least squares over every step observed (relative error, stalls left out),
        with the prior's engine settings; None before MIN_SAMPLES steps."""
        self._fold()
        if self._gram is None or self.num_lifetime < self.MIN_SAMPLES:
            return None
        import numpy as np

        scale = np.maximum(self._col_max, 1e-12)
        coef = _nnls_gram(self._gram / np.outer(scale, scale), self._moment / scale, self._lifetime_support)
        self._lifetime_support = _support_of(coef)
        coef = coef / scale
        return self._with_settings(coef, {"num_samples": self.num_lifetime, "lifetime": True})

    def lifetime_residual_quantiles(self, model: CostModel | None = None) -> dict[float, float]:
        """The lifetime model's (`model`, when the caller has just solved it) measured over
        predicted step time at LIFETIME_QUANTILES, over a uniform sample of the steps it was fitted
        on (empty before there is a model)."""
        model = model or self.lifetime_model()
        if model is None or not self._reservoir:
            return {}
        import numpy as np

        rows = np.asarray(self._reservoir)
        predicted = rows[:, :5] @ np.array([getattr(model, k) for k in FEATURES])
        ratio = rows[:, 5] / np.maximum(predicted, 1e-12)
        return dict(zip(LIFETIME_QUANTILES, map(float, np.quantile(ratio, LIFETIME_QUANTILES))))

    def lifetime_terms(self) -> dict[str, float]:
        """The lifetime model's coefficients by name (empty before there is one)."""
        return _terms(self.lifetime_model())

    def lifetime_report(self) -> tuple[dict[str, float], dict[float, float]]:
        """lifetime_terms and lifetime_residual_quantiles from one solve of the lifetime fit."""
        model = self.lifetime_model()
        return _terms(model), self.lifetime_residual_quantiles(model) if model is not None else {}

    def _with_settings(self, coef, meta: dict) -> CostModel:
        """A model of these coefficients with the prior's engine settings (defaults without one)."""
        base = self.prior or CostModel(*[0.0] * len(FEATURES))
        return CostModel(*map(float, coef), **{k: getattr(base, k) for k in _SETTINGS}, meta=meta)

    def refit(self) -> CostModel:
        import numpy as np

        self._since_refit = 0
        self._since_refit_s = 0.0
        data = np.array(list(self._prefill) + list(self._decode))
        x, y, seen = data[:, :5], data[:, 5], data[:, 6]
        # relative error, and newer steps weigh more (the machine's speed drifts: other work starts)
        w = 0.5 ** ((self.num_observed - seen) / (2 * self._half_life)) / y
        if self.prior is not None:
            # The prior's shape at the speed the steps show: it fills in what the steps cannot tell
            # apart (in a decode-only step every token samples, so token_s and sample_s are one
            # number) without pulling the rest. The speed is read per kind of step, prompt steps
            # for the prior's prompt rows and decode steps for its decode rows: live, a stream costs
            # more than offline (its token is detokenized and sent while the next step runs) but a
            # prompt token does not, and one speed read off the many decode steps priced prompt
            # chunks 1.2-1.4x too high, which shrank every budget under the target.
            c0 = _coefficients(self.prior)
            px = _prior_rows(self.prior)
            py = px @ c0 * _speeds(x, y, c0, (self.num_observed - seen) <= self._half_life, px[:, 3] > 0)
            x = np.vstack([x, px])
            y = np.concatenate([y, py])
            # squared relative errors: each prior row weighs prior_weight / rows in the loss
            w = np.concatenate([w, np.full(len(py), math.sqrt(self._prior_weight / len(py))) / py])
        scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
        coef = None
        keep = np.ones(len(y), bool)
        for _ in range(2):  # fit, drop the steps far off it (stalls), fit again
            a = x[keep] / scale * w[keep, None]
            coef = _nnls(a, y[keep] * w[keep], self._support)
            ratio = (x / scale @ coef) / y
            keep = (ratio > 1 / STALL_RATIO) & (ratio < STALL_RATIO)
            if keep.all() or keep.sum() < self.MIN_SAMPLES:
                break
        self._support = _support_of(coef)
        coef = coef / scale
        n = len(data)
        recent = (self.num_observed - seen) <= 2 * self._half_life
        over = y[:n][recent] / np.maximum(x[:n][recent] @ coef, 1e-12)
        self.overrun = float(np.clip(np.quantile(over, OVERRUN_QUANTILE), 1.0, MAX_OVERRUN))
        self.model = self._with_settings(coef, {"num_samples": int(keep.sum()), "online": True, "overrun": self.overrun})
        self.num_refits += 1
        return self.model


def _nnls(a, b, support=None):
    """min |a x - b| subject to x >= 0, exactly, for a cost model's few columns (5), with numpy
    alone (checked against scipy.optimize.nnls in the tests): the columns scaled to unit norm,
    then `_nnls_gram` on the normal equations (`support`: its guess, e.g. the last fit's)."""
    import numpy as np

    norm = np.linalg.norm(a, axis=0)
    norm[norm == 0] = 1.0
    an = a / norm
    return _nnls_gram(an.T @ an, an.T @ b, support) / norm


def _support_of(coef) -> tuple[int, ...]:
    """The indices of a fit's nonzero coefficients: the next fit's first guess (`_nnls_gram`)."""
    import numpy as np

    return tuple(int(i) for i in np.flatnonzero(coef > 0))


def _support_optimum(gram, moment, support):
    """The unconstrained optimum on `support` (column indices) when it is the constrained one:
    positive there, and no other coefficient's gradient pointing below zero (the problem is convex,
    so these conditions suffice); None otherwise, or when the support's columns are collinear."""
    import numpy as np

    idx = np.asarray(support, dtype=int)
    try:
        xs = np.linalg.solve(gram[np.ix_(idx, idx)], moment[idx])
    except np.linalg.LinAlgError:
        return None
    if not np.isfinite(xs).all() or (xs <= 0).any():
        return None
    x = np.zeros(len(moment))
    x[idx] = xs
    grad = gram @ x - moment  # half the objective's gradient: >= 0 off the support at the optimum
    off = np.ones(len(moment), bool)
    off[idx] = False
    if (grad[off] < -1e-9 * max(float(np.abs(moment).max()), 1e-300)).any():
        return None
    return x


def _nnls_gram(gram, moment, support=None):
    """min x'Gx - 2 h'x subject to x >= 0 (the least squares |a x - b|^2 with G = a'a and h = a'b,
    less its constant), exactly: the optimum solves the unconstrained problem on its own support,
    so it is the best of the supports whose solution is non-negative (2^n - 1 small solves for n
    columns). The supports of each size are solved in one stacked call (the minimum-norm
    solution, as a least-squares solve gives where a support's columns are collinear): 0.28 ms for
    5 columns where one lstsq call per support took 0.82 ms, and an engine's refit 0.6 ms against
    1.2 (1.4% of a batch-1 decode step, at one refit every 16 steps, before). A guessed `support`
    (the last refit's: the optimum's support rarely changes between refits) is tried first and
    kept when it meets the optimality conditions (`_support_optimum`): one 5 x 5 solve. In place
    a refit had cost a batch-1 step 1.0-1.5 ms (SmolLM2 native, 2-core EPYC: its code and data
    cold after the step's weights streamed through)."""
    import itertools

    import numpy as np

    if support is not None and len(support):
        x = _support_optimum(gram, moment, support)
        if x is not None:
            return x
    n = len(moment)
    best_x, best_f = np.zeros(n), 0.0
    for k in range(1, n + 1):
        idx = np.array(list(itertools.combinations(range(n), k)))  # [supports, k]
        g = gram[idx[:, :, None], idx[:, None, :]]
        h = moment[idx]
        x = (np.linalg.pinv(g) @ h[:, :, None])[:, :, 0]
        f = (x[:, None, :] @ g @ x[:, :, None])[:, 0, 0] - 2 * (h * x).sum(axis=1)
        f[(x < 0).any(axis=1)] = np.inf
        s = int(np.argmin(f))
        if f[s] < best_f:
            best_f = float(f[s])
            best_x = np.zeros(n)
            best_x[idx[s]] = x[s]
    return best_x


def samples_from_histogram(bounds: Sequence[float], cumulative: Sequence[float]):
    """Values standing for a Prometheus histogram's observations (`bounds`: the buckets' upper
    bounds, the last +Inf; `cumulative`: their cumulative counts): each bucket's count spread evenly
    in log space between its bounds, the first bucket's at its bound and the +Inf bucket's at the
    last finite bound. Deterministic (no draws), so a simulation fed them is reproducible."""
    import numpy as np

    bounds = np.asarray(bounds, np.float64)
    counts = np.diff(np.concatenate([[0.0], np.asarray(cumulative, np.float64)])).round().astype(np.int64)
    if len(bounds) != len(counts) or (counts < 0).any():
        raise ValueError("histogram buckets and cumulative counts do not match")
    finite = bounds[np.isfinite(bounds)]
    out = []
    for i, n in enumerate(counts):
        if n <= 0:
            continue
        hi = bounds[i] if np.isfinite(bounds[i]) else finite[-1]
        lo = bounds[i - 1] if i > 0 and np.isfinite(bounds[i]) else hi
        if lo <= 0:
            lo = hi
        out.append(np.exp(np.log(lo) + (np.arange(n) + 0.5) / n * (np.log(hi) - np.log(lo))))
    return np.concatenate(out) if out else np.zeros(0)


def _terms(model: CostModel | None) -> dict[str, float]:
    return {k: getattr(model, k) for k in FEATURES} if model is not None else {}


_SETTINGS = ("num_kv_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len")


def _coefficients(cost: CostModel):
    import numpy as np

    return np.array([getattr(cost, k) for k in FEATURES])


def _speeds(x, y, c0, recent, prior_is_prompt):
    """Per prior row, measured over predicted time (the median) on the recent steps of its kind:
    steps with prompt tokens for prompt rows, decode steps for decode rows; a kind that has no
    recent step takes the other's, and without a usable prior prediction 1."""
    import numpy as np

    pred = x @ c0
    if pred.min() <= 0:
        return np.ones(len(prior_is_prompt))
    ratio = y / pred
    prompt = x[:, 3] > 0
    overall = float(np.median(ratio[recent])) if recent.any() else float(np.median(ratio))
    by_kind = {}
    for kind in (True, False):
        sel = recent & (prompt == kind)
        if not sel.any():
            sel = prompt == kind
        by_kind[kind] = float(np.median(ratio[sel])) if sel.any() else overall
    return np.where(prior_is_prompt, by_kind[True], by_kind[False])


def _prior_rows(cost: CostModel):
    """Feature rows (with the constant) at which the prior speaks for itself: the steps it was
    measured on when it records them, else a small grid of prefills and decode batches."""
    import numpy as np

    keys = ("num_tokens", "num_sampled", "prefill_pairs", "decode_context")
    samples = cost.meta.get("samples") if cost.meta else None
    if not samples:
        samples = [{"num_tokens": n, "num_sampled": 1, "prefill_pairs": n * (n + 1) / 2, "decode_context": 0} for n in (64, 512)]
        samples += [{"num_tokens": b, "num_sampled": b, "prefill_pairs": 0, "decode_context": b * 512} for b in (1, 16)]
    return np.array([[1.0] + [float(s[k]) for k in keys] for s in samples])
