"""The CASTILLO table: train on one split, evaluate per model on another, ours vs the baseline.

    python -m lenserve.predictor.report --train TRAIN.jsonl.gz --eval VALIDATE.jsonl.gz \
        [--per-model] [--crossfit K] --out benchmarks/results/predictor_castillo.json

Joint: one predictor over all models' training rows (the model is a feature). Per model (with
--per-model): one predictor per model on its own rows. With --crossfit K the evaluation file's
prompts are also split into K folds by a hash of their text, and each fold is predicted by a
predictor (and baseline) fitted on the training file and the other folds, with no row of that
fold's texts: every evaluation row is predicted by a model that never saw its prompt, for any LLM,
while the training data covers the evaluation file's kinds of prompts. Prints a markdown table;
writes JSON.
"""
from __future__ import annotations

import argparse
import logging
import time
from datetime import datetime, timezone

import numpy as np

from lenserve.predictor.dataset import read_rows, stable_hash64
from lenserve.predictor.evaluate import predict_rows
from lenserve.predictor.make_default import write_results
from lenserve.predictor.metrics import evaluate
from lenserve.predictor.train import TrainConfig, fit_baseline, fit_learned

COLUMNS = ("mae", "kendall_tau", "bucket_accuracy", "p90_coverage")


def _per_model(rows, preds) -> dict:
    out = {}
    for name in sorted({r.model for r in rows}):
        idx = [i for i, r in enumerate(rows) if r.model == name]
        out[name] = evaluate([rows[i] for i in idx], [preds[i] for i in idx])
    return out


def _mean(results: dict) -> dict:
    return {k: round(float(np.mean([r[k] for r in results.values()])), 4) for k in COLUMNS}


def crossfit_fold(prompt_text: str, k: int) -> int:
    """The fold (0..k-1) of a prompt text: by text, so a prompt is in one fold for every LLM."""
    return stable_hash64("crossfit:" + prompt_text.strip()) % k


def crossfit(train: list, test: list, k: int, fit) -> list:
    """Predictions for every `test` row, fold by fold, from `fit(rows)` on `train` and the other
    folds' rows, leaving out every row (of either file) whose text is in the fold."""
    folds = [crossfit_fold(r.prompt_text, k) for r in test]
    preds: list = [None] * len(test)
    for fold in range(k):
        idx = [i for i, f in enumerate(folds) if f == fold]
        held = {test[i].prompt_text.strip() for i in idx}
        rows = [r for r in train + test if r.prompt_text.strip() not in held]
        logging.info("crossfit fold %d/%d: %d rows to predict, %d to fit", fold + 1, k, len(idx), len(rows))
        for i, p in zip(idx, predict_rows(fit(rows), [test[i] for i in idx])):
            preds[i] = p
    return preds


def markdown(result: dict) -> str:
    variants = [v for v in ("joint", "per_model", "crossfit_baseline", "crossfit") if v in result]
    head = ["model", "n"]
    for k in COLUMNS:
        head += [f"{k} base"] + [f"{k} {v}" for v in variants]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = list(result["baseline"]) + ["mean"]
    for name in names:
        base = result["baseline"][name] if name != "mean" else result["baseline_mean"]
        cells = [name.split("/")[-1], str(base.get("n", ""))]
        for k in COLUMNS:
            cells.append(f"{base[k]:.3f}" if k != "mae" else f"{base[k]:.1f}")
            for v in variants:
                r = result[v][name] if name != "mean" else result[f"{v}_mean"]
                cells.append(f"{r[k]:.3f}" if k != "mae" else f"{r[k]:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--per-model", action="store_true", help="also train one predictor per model")
    ap.add_argument("--crossfit", type=int, default=0, metavar="K",
                    help="also predict the evaluation file K-fold by prompt text, fitting on the training file and the other folds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    train, test = read_rows(args.train), read_rows(args.eval)
    cfg = TrainConfig(num_threads=args.threads)
    result: dict = {"train": args.train, "eval": args.eval, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    result["baseline"] = _per_model(test, predict_rows(fit_baseline(train), test))
    t0 = time.monotonic()
    result["joint"] = _per_model(test, predict_rows(fit_learned(train, cfg), test))
    result["joint_train_s"] = round(time.monotonic() - t0, 1)
    if args.per_model:
        result["per_model"] = {}
        for name in sorted({r.model for r in test}):
            mine = [r for r in train if r.model == name]
            rows = [r for r in test if r.model == name]
            result["per_model"][name] = evaluate(rows, predict_rows(fit_learned(mine, cfg), rows))
            logging.info("%s: %s", name, result["per_model"][name])
    if args.crossfit:
        if args.crossfit < 2:
            ap.error("--crossfit needs at least 2 folds")
        result["crossfit"] = _per_model(test, crossfit(train, test, args.crossfit, lambda rows: fit_learned(rows, cfg)))
        result["crossfit_baseline"] = _per_model(test, crossfit(train, test, args.crossfit, fit_baseline))
        result["crossfit_folds"] = args.crossfit
    result["note"] = ("baseline/joint/per_model: trained on the train file only, per-model metrics on the eval file"
                      + ("; crossfit/crossfit_baseline: every eval row predicted by a fit on the train file and the other"
                         f" {args.crossfit - 1} of {args.crossfit} folds of the eval file (folds by prompt text)" if args.crossfit else ""))
    for v in ("baseline", "joint", "per_model", "crossfit", "crossfit_baseline"):
        if v in result:
            result[f"{v}_mean"] = _mean(result[v])
    print(markdown(result))
    if args.out:
        write_results(args.out, result)


if __name__ == "__main__":
    main()
