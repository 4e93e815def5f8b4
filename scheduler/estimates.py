"""Re-estimation: a running sequence that outlives its predicted p90 gets a new, longer estimate.

The predictor's `remaining_length` conditions the predicted length distribution on "longer than
k tokens"; without it (a predictor package that lacks the module) a lognormal fitted to the
prediction's p50 and p90 is conditioned the same way. Estimates count total output tokens.
"""
from __future__ import annotations

import math
from statistics import NormalDist

from lenserve.predictor.types import LengthPrediction, bucket_of

try:
    from lenserve.predictor.reestimate import remaining_length
except ImportError:  # pragma: no cover - the predictor package without its re-estimation module
    remaining_length = None

_STD_NORMAL = NormalDist()
_Z90 = _STD_NORMAL.inv_cdf(0.9)


def _lognormal_remaining(prediction: LengthPrediction, k: int, max_tokens: int | None) -> LengthPrediction:
    """Remaining tokens after k under a lognormal through the prediction's p50 and p90, given L > k."""
    mu = math.log(max(prediction.p50, 1.0))
    sigma = math.log(max(prediction.p90, 1.0) / max(prediction.p50, 1.0)) / _Z90
    if sigma <= 0.0:  # a point prediction: give it a moderate spread
        sigma = 0.5
    cap = math.inf if max_tokens is None else max(max_tokens - k, 1)
    z_k = (math.log(k) - mu) / sigma if k > 0 else -math.inf
    u_k = _STD_NORMAL.cdf(z_k) if k > 0 else 0.0
    if 1.0 - u_k < 1e-9:  # far in the tail: lengths this unlikely are expected to go on about half again
        p50 = mean = p90 = max(0.5 * k, 1.0)
    else:
        def remaining_at(u: float) -> float:
            return math.exp(mu + sigma * _STD_NORMAL.inv_cdf(min(u_k + u * (1.0 - u_k), 1 - 1e-12))) - k

        p50, p90 = remaining_at(0.5), remaining_at(0.9)
        tail = _STD_NORMAL.cdf(sigma - z_k) if k > 0 else 1.0
        mean = math.exp(mu + sigma * sigma / 2) * tail / (1.0 - u_k) - k
    p50, mean, p90 = (min(max(x, 1.0), cap) for x in (p50, mean, p90))
    return LengthPrediction(mean=mean, p50=p50, p90=p90, bucket=bucket_of(mean))


def reestimate(prediction: LengthPrediction, num_generated: int, max_tokens: int | None = None) -> LengthPrediction:
    """The total-length estimate of a sequence that has generated `num_generated` tokens so far."""
    if remaining_length is not None:
        rem = remaining_length(prediction, num_generated, max_tokens)
    else:
        rem = _lognormal_remaining(prediction, num_generated, max_tokens)
    k = num_generated
    return LengthPrediction(
        mean=k + rem.mean,
        p50=k + rem.p50,
        p90=k + rem.p90,
        bucket=bucket_of(k + rem.mean),
        quantiles={u: k + q for u, q in rem.quantiles.items()},
    )
