"""Evaluating a saved predictor, and its prompt-length baseline, on CASTILLO-schema rows."""
from __future__ import annotations

import logging
import os
from collections import defaultdict

from lenserve.predictor.dataset import LengthRow
from lenserve.predictor.metrics import evaluate
from lenserve.predictor.model import LengthPredictor, load_predictor
from lenserve.predictor.types import DEFAULT_BUCKET_EDGES, LengthPrediction, PromptInput

logger = logging.getLogger(__name__)


def predict_rows(predictor: LengthPredictor, rows: list[LengthRow]) -> list[LengthPrediction]:
    """Predictions for each row, answered for the row's own model (batched per model)."""
    by_model: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_model[r.model].append(i)
    out: list[LengthPrediction | None] = [None] * len(rows)
    for name, idx in by_model.items():
        if name not in predictor.models:
            logger.warning("model %r was not trained on; predicting as %r", name, predictor.default_model)
        inputs = [PromptInput(rows[i].prompt_text, rows[i].input_size) for i in idx]
        for i, pred in zip(idx, predictor.predict(inputs, model=name)):
            out[i] = pred
    return out


def evaluate_file(rows: list[LengthRow], predictor_dir: str, edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES,
                  per_model: bool = False) -> dict:
    """`{"n", "mae", "rmse", "kendall_tau", "spearman", "bucket_accuracy", "p90_coverage", "baseline": {...}}`."""
    predictor = load_predictor(predictor_dir)
    baseline_dir = os.path.join(predictor_dir, "baseline")
    baseline = load_predictor(baseline_dir) if os.path.isdir(baseline_dir) else None
    preds = predict_rows(predictor, rows)
    base_preds = predict_rows(baseline, rows) if baseline is not None else None
    result = evaluate(rows, preds, edges)
    result["baseline"] = evaluate(rows, base_preds, edges) if base_preds is not None else None
    if per_model:
        result["per_model"] = {}
        for name in sorted({r.model for r in rows}):
            idx = [i for i, r in enumerate(rows) if r.model == name]
            sub = [rows[i] for i in idx]
            entry = evaluate(sub, [preds[i] for i in idx], edges)
            entry["baseline"] = evaluate(sub, [base_preds[i] for i in idx], edges) if base_preds is not None else None
            result["per_model"][name] = entry
    return result
