"""Online re-estimation: the remaining response length of a sequence that has already generated k tokens.

A prediction's quantiles define a length distribution: log-length is piecewise linear in the
quantile level between the predicted quantiles, and above the highest one the tail is Pareto
(its index matched to the slope of the last segment), because response lengths are heavy-tailed:
a response that has outlived its p90 is expected to go on for a while longer, not to end at once.
Conditioning on "longer than k" cuts the distribution at k and renormalises it.

Pure Python (math only), so the scheduler can call it without importing any model code.
"""
from __future__ import annotations

import math

from lenserve.predictor.types import DEFAULT_BUCKET_EDGES, LengthPrediction, bucket_of

MIN_TAIL_INDEX = 1.5  # a Pareto tail with index <= 1 has no mean
MAX_TAIL_INDEX = 20.0


def _knots(prediction: LengthPrediction) -> tuple[list[float], list[float]]:
    """Quantile levels and log-lengths, strictly increasing in both."""
    pairs = sorted((float(u), float(q)) for u, q in prediction.quantiles.items() if 0.0 < float(u) < 1.0)
    if not pairs:
        pairs = [(0.5, float(prediction.p50)), (0.9, float(prediction.p90))]
    levels: list[float] = []
    logs: list[float] = []
    for u, q in pairs:
        log_q = math.log(max(q, 1.0))
        if logs and log_q <= logs[-1]:
            log_q = logs[-1] + 1e-6
        levels.append(u)
        logs.append(log_q)
    if len(levels) == 1:  # one quantile: give the tail a moderate spread
        levels.insert(0, levels[0] / 2)
        logs.insert(0, logs[0] - 0.5)
    return levels, logs


class _Distribution:
    """Quantile function Q(u) with log Q piecewise linear between knots and a Pareto tail beyond."""

    def __init__(self, prediction: LengthPrediction) -> None:
        self.levels, self.logs = _knots(prediction)
        slope = (self.logs[-1] - self.logs[-2]) / (self.levels[-1] - self.levels[-2])
        tail_mass = 1.0 - self.levels[-1]
        # Pareto Q(u) = q_n ((1 - u_n) / (1 - u))^(1/alpha) has log-slope 1 / (alpha (1 - u_n)) at u_n.
        alpha = 1.0 / (slope * tail_mass) if slope > 0 else MAX_TAIL_INDEX
        self.alpha = min(max(alpha, MIN_TAIL_INDEX), MAX_TAIL_INDEX)
        first_slope = (self.logs[1] - self.logs[0]) / (self.levels[1] - self.levels[0])
        # Below the lowest quantile: the first segment's slope, down to level 0 (never under 1 token).
        floor = max(self.logs[0] - first_slope * self.levels[0], 0.0)
        self.levels.insert(0, 0.0)
        self.logs.insert(0, min(floor, self.logs[0] - 1e-6))

    def quantile(self, u: float) -> float:
        if u >= self.levels[-1]:
            tail = (1.0 - self.levels[-1]) / max(1.0 - u, 1e-12)
            return math.exp(self.logs[-1]) * tail ** (1.0 / self.alpha)
        for i in range(1, len(self.levels)):
            if u <= self.levels[i]:
                t = (u - self.levels[i - 1]) / (self.levels[i] - self.levels[i - 1])
                return math.exp(self.logs[i - 1] + t * (self.logs[i] - self.logs[i - 1]))
        raise AssertionError("unreachable")

    def cdf(self, length: float) -> float:
        if length <= 0:
            return 0.0
        log_x = math.log(length)
        if log_x <= self.logs[0]:
            return 0.0
        if log_x >= self.logs[-1]:
            return 1.0 - (1.0 - self.levels[-1]) * math.exp(-(log_x - self.logs[-1]) * self.alpha)
        for i in range(1, len(self.logs)):
            if log_x <= self.logs[i]:
                t = (log_x - self.logs[i - 1]) / (self.logs[i] - self.logs[i - 1])
                return self.levels[i - 1] + t * (self.levels[i] - self.levels[i - 1])
        raise AssertionError("unreachable")

    def upper_mean(self, u0: float) -> float:
        """E[L | L > Q(u0)]: exact integral of Q over [u0, 1] divided by 1 - u0."""
        n = len(self.levels) - 1
        total = 0.0
        start = u0
        if start < self.levels[n]:
            for i in range(1, n + 1):
                lo, hi = self.levels[i - 1], self.levels[i]
                if hi <= start:
                    continue
                a = max(lo, start)
                slope = (self.logs[i] - self.logs[i - 1]) / (hi - lo)
                log_a = self.logs[i - 1] + slope * (a - lo)
                width = hi - a
                if abs(slope * width) < 1e-9:
                    total += math.exp(log_a) * width
                else:
                    total += math.exp(log_a) * math.expm1(slope * width) / slope
            start = self.levels[n]
        # Pareto tail above Q(start): mass (1 - start), mean Q(start) * alpha / (alpha - 1).
        total += (1.0 - start) * self.quantile(start) * self.alpha / (self.alpha - 1.0)
        return total / max(1.0 - u0, 1e-12)


def remaining_length(
    prediction: LengthPrediction,
    num_generated: int,
    max_tokens: int | None = None,
    edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES,
) -> LengthPrediction:
    """The predicted number of tokens still to come after `num_generated`, given the response is
    at least that long. With num_generated = 0 it is the original distribution. `max_tokens` caps
    the total (prompt excluded). Every field of the result counts remaining tokens (at least 1)."""
    if num_generated < 0:
        raise ValueError(f"num_generated must be at least 0, got {num_generated}")
    dist = _Distribution(prediction)
    k = float(num_generated)
    u_k = dist.cdf(k)
    cap = float("inf") if max_tokens is None else max(float(max_tokens) - k, 1.0)

    def remaining_at(level: float) -> float:
        return min(max(dist.quantile(u_k + level * (1.0 - u_k)) - k, 1.0), cap)

    levels = sorted(float(u) for u in prediction.quantiles) or [0.5, 0.9]
    quantiles = {u: remaining_at(u) for u in levels}
    mean = min(max(dist.upper_mean(u_k) - k, 1.0), cap)
    return LengthPrediction(
        mean=mean,
        p50=remaining_at(0.5),
        p90=remaining_at(0.9),
        bucket=bucket_of(mean, edges),
        quantiles=quantiles,
    )
