"""Evaluation of length predictions against CASTILLO-schema rows.

The per-row target is `output_mean`; the sampled `output_sizes` measure p90 coverage (the share
of sampled responses no longer than the predicted p90, averaged over rows).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from lenserve.predictor.dataset import LengthRow
from lenserve.predictor.types import DEFAULT_BUCKET_EDGES, LengthPrediction, bucket_of

METRIC_KEYS = ("n", "mae", "rmse", "kendall_tau", "spearman", "bucket_accuracy", "p90_coverage")


def evaluate(rows: list[LengthRow], predictions: list[LengthPrediction],
             edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES) -> dict:
    if len(rows) != len(predictions):
        raise ValueError(f"{len(rows)} rows but {len(predictions)} predictions")
    if not rows:
        raise ValueError("nothing to evaluate: no rows")
    target = np.array([r.output_mean for r in rows], dtype=float)
    mean = np.array([p.mean for p in predictions], dtype=float)
    err = mean - target
    coverage = [np.mean(np.asarray(r.output_sizes) <= p.p90) for r, p in zip(rows, predictions)]
    same_bucket = [bucket_of(p.mean, edges) == bucket_of(t, edges) for p, t in zip(predictions, target)]
    tau = stats.kendalltau(mean, target).statistic if len(rows) > 1 else math.nan
    rho = stats.spearmanr(mean, target).statistic if len(rows) > 1 else math.nan
    return {
        "n": len(rows),
        "mae": round(float(np.mean(np.abs(err))), 3),
        "rmse": round(float(np.sqrt(np.mean(err**2))), 3),
        "kendall_tau": _round(tau),
        "spearman": _round(rho),
        "bucket_accuracy": round(float(np.mean(same_bucket)), 4),
        "p90_coverage": round(float(np.mean(coverage)), 4),
    }


def _round(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)
