"""The CASTILLO table: train on one split, evaluate per model on another, ours vs the baseline.

    python -m lenserve.predictor.report --train TRAIN.jsonl.gz --eval VALIDATE.jsonl.gz \
        [--per-model] --out benchmarks/results/predictor_castillo.json

Joint: one predictor over all models' training rows (the model is a feature). Per model (with
--per-model): one predictor per model on its own rows. Prints a markdown table; writes JSON.
"""
from __future__ import annotations

import argparse
import logging
import time
from datetime import datetime, timezone

import numpy as np

from lenserve.predictor.dataset import read_rows
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


def markdown(result: dict) -> str:
    variants = [v for v in ("joint", "per_model") if v in result]
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
    for v in ("baseline", "joint", "per_model"):
        if v in result:
            result[f"{v}_mean"] = _mean(result[v])
    print(markdown(result))
    if args.out:
        write_results(args.out, result)


if __name__ == "__main__":
    main()
