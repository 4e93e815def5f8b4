"""The shipped default predictor: one joint model over CASTILLO's 13 LLMs and the served SmolLM2,
answering for SmolLM2 when asked about an unknown model, and its held-out evaluation.

    python -m lenserve.predictor.make_default --castillo ../shared/data/castillo \\
        --smollm2 predictor/data/smollm2_135m_instruct.jsonl.gz --out predictor/models/default \\
        --results benchmarks/results/predictor_default.json

Held out of training, by prompt text: CASTILLO's texts with `castillo_held_out` (20%, train and
validate files together) and the texts of the SmolLM2 set's validate and test splits (by prompt id).
A text held out on one side is held out on the other too: the two share Dolly prompts, and another
model's lengths for the very prompt would leak into the evaluation. Everything else trains the one
joint predictor (the model is a feature; CASTILLO's larger models teach which prompts run long,
SmolLM2's own rows its verbosity). Evaluated on SmolLM2's test and validate splits and per model on
CASTILLO's held-out rows, each against the prompt-length baseline. While the SmolLM2 set is still
being built its `.partial` file is read.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from datetime import datetime, timezone

import numpy as np

from lenserve.predictor.dataset import LengthRow, castillo_held_out, iter_rows
from lenserve.predictor.evaluate import evaluate_file
from lenserve.predictor.train import TrainConfig, fit_baseline, fit_learned

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("mae", "kendall_tau", "bucket_accuracy", "p90_coverage")


def read_served_set(path: str) -> tuple[list[LengthRow], bool]:
    """The served model's rows (one model's, else ValueError), and whether they come from a build
    still in progress (`.partial`)."""
    from lenserve.predictor.builder import read_partial

    if os.path.exists(path):
        rows, in_progress = list(iter_rows(path)), False
    elif os.path.exists(path + ".partial"):
        by_id = {r.prompt_id: r for r in read_partial(path + ".partial")}  # a prompt sampled twice: the last
        rows, in_progress = list(by_id.values()), True
    else:
        raise FileNotFoundError(f"no dataset at {path} (nor a build in progress at {path}.partial)")
    names = sorted({r.model for r in rows})
    if len(names) != 1:
        raise ValueError(f"{path}: expected one model's rows, found {names}")
    return rows, in_progress


def write_results(path: str, result: dict) -> None:
    """An evaluation's JSON, indented, its folder made if missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def partition(castillo: list[LengthRow], served: list[LengthRow]) -> dict[str, list[LengthRow]]:
    """`train`, `castillo_holdout`, `served_validate`, `served_test`: no prompt text of the last three in `train`."""
    castillo_out = [r for r in castillo if castillo_held_out(r.prompt_text)]
    served_out = [r for r in served if r.split != "train"]
    held = {r.prompt_text.strip() for r in castillo_out} | {r.prompt_text.strip() for r in served_out}
    train = [r for r in castillo + served if r.prompt_text.strip() not in held]
    return {
        "train": train,
        "castillo_holdout": castillo_out,
        "served_validate": [r for r in served_out if r.split == "validate"],
        "served_test": [r for r in served_out if r.split == "test"],
    }


def _summary(result: dict) -> dict:
    out = {k: result[k] for k in ("n", *SUMMARY_KEYS)}
    out["baseline"] = {k: result["baseline"][k] for k in SUMMARY_KEYS}
    return out


def _castillo_summary(rows: list[LengthRow], out_dir: str) -> dict:
    full = evaluate_file(rows, out_dir, per_model=True)
    per_model = {name: _summary(r) for name, r in full["per_model"].items()}
    return {
        "all_rows": _summary(full),
        "mean_over_models": {k: round(float(np.mean([r[k] for r in per_model.values()])), 4) for k in SUMMARY_KEYS},
        "baseline_mean_over_models": {
            k: round(float(np.mean([r["baseline"][k] for r in per_model.values()])), 4) for k in SUMMARY_KEYS},
        "per_model": per_model,
    }


def evaluate_default(parts: dict[str, list[LengthRow]], out_dir: str) -> dict:
    """The held-out evaluation of the predictor in `out_dir`: SmolLM2's test and validate splits,
    CASTILLO's held-out partition per model, and that partition's rows from the validate file alone
    (prompts of CASTILLO's validate split that the predictor never saw)."""
    result = {}
    for split in ("served_test", "served_validate"):
        if parts[split]:
            result[split] = _summary(evaluate_file(parts[split], out_dir))
    if parts["castillo_holdout"]:
        result["castillo_holdout"] = _castillo_summary(parts["castillo_holdout"], out_dir)
        validate_rows = [r for r in parts["castillo_holdout"] if r.split == "validate"]
        if validate_rows:
            result["castillo_holdout_validate_file"] = _castillo_summary(validate_rows, out_dir)
    return result


def make_default(castillo_paths: list[str], served_path: str, out_dir: str, cfg: TrainConfig | None = None,
                 fit: bool = True) -> dict:
    """Fits the default into `out_dir` (unless not `fit`: the one there is evaluated) and evaluates it."""
    castillo = [r for p in castillo_paths for r in iter_rows(p)]
    served, in_progress = read_served_set(served_path)
    served_model = served[0].model
    parts = partition(castillo, served)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "served_model": served_model,
        "served_set": {"path": served_path, "prompts": len(served), "complete": not in_progress},
        "train_rows": len(parts["train"]),
    }
    if fit:
        logger.info("training on %d rows (%d held out of CASTILLO, %d SmolLM2 validate, %d test)", len(parts["train"]),
                    len(parts["castillo_holdout"]), len(parts["served_validate"]), len(parts["served_test"]))
        t0 = time.monotonic()
        predictor = fit_learned(parts["train"], cfg, default_model=served_model)
        predictor.save(out_dir)
        fit_baseline(parts["train"], default_model=served_model).save(os.path.join(out_dir, "baseline"))
        result["train_s"] = round(time.monotonic() - t0, 1)
    result.update(evaluate_default(parts, out_dir))
    return result


def markdown(result: dict) -> str:
    lines = ["| held-out set | n | MAE base | MAE ours | τ base | τ ours | bucket acc base | bucket acc ours | p90 cov base | p90 cov ours |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def row(name: str, r: dict, base: dict, n) -> None:
        cells = [name, str(n)]
        for k in SUMMARY_KEYS:
            fmt = ".1f" if k == "mae" else ".3f"
            cells += [format(base[k], fmt), format(r[k], fmt)]
        lines.append("| " + " | ".join(cells) + " |")

    for split in ("served_test", "served_validate"):
        if split in result:
            row(f"{result['served_model']} {split.split('_')[1]}", result[split], result[split]["baseline"], result[split]["n"])
    if "castillo_holdout" in result:
        c = result["castillo_holdout"]
        for name, r in c["per_model"].items():
            row(f"CASTILLO {name.split('/')[-1]}", r, r["baseline"], r["n"])
        row("**CASTILLO mean over models**", c["mean_over_models"], c["baseline_mean_over_models"], c["all_rows"]["n"])
    if "castillo_holdout_validate_file" in result:
        c = result["castillo_holdout_validate_file"]
        row("CASTILLO validate-file prompts, mean over models", c["mean_over_models"], c["baseline_mean_over_models"], c["all_rows"]["n"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--castillo", required=True, help="folder with castillo_train.jsonl.gz and castillo_validate.jsonl.gz")
    ap.add_argument("--smollm2", required=True, help="the served model's dataset (its .partial is read while it is built)")
    ap.add_argument("--out", required=True, help="predictor directory to write")
    ap.add_argument("--results", default=None, help="JSON file for the evaluation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-only", action="store_true", help="evaluate the predictor already in --out instead of fitting one"
                    " (what --results held about its fitting is kept)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = [os.path.join(args.castillo, f"castillo_{s}.jsonl.gz") for s in ("train", "validate")]
    result = make_default(paths, args.smollm2, args.out, TrainConfig(num_threads=args.threads), fit=not args.eval_only)
    if args.eval_only and args.results and os.path.exists(args.results):
        with open(args.results) as f:
            fitted = json.load(f)
        result = {**fitted, **result, "date": fitted.get("date"), "evaluated": result["date"]}
    if args.results:
        write_results(args.results, result)
    print(markdown(result))
    print(json.dumps({k: result[k] for k in result if not k.startswith("castillo_holdout")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
