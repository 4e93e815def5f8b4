"""`lenserve predictor {build-dataset, train, eval, probe}`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from lenserve.predictor.types import DEFAULT_BUCKET_EDGES

logger = logging.getLogger(__name__)


def _edges(text: str) -> tuple[int, ...]:
    try:
        edges = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--edges must be comma-separated integers, got {text!r}") from None
    if not edges or any(e <= 0 for e in edges) or list(edges) != sorted(set(edges)):
        raise argparse.ArgumentTypeError(f"--edges must be positive and strictly increasing, got {text!r}")
    return edges


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def cmd_build_dataset(args: argparse.Namespace) -> int:
    from lenserve.predictor.builder import BuildConfig, LoopRule, build_dataset

    cfg = BuildConfig(
        samples=args.samples, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, num_prompts=args.num_prompts, seed=args.seed, model_name=args.model_name,
        model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, num_threads=args.num_threads,
        stop_loops=LoopRule() if args.stop_loops else None,
    )
    summary = build_dataset(args.prompts, args.out, cfg)
    print(json.dumps(summary))
    return 0


def _read(args: argparse.Namespace):
    from lenserve.predictor.dataset import read_rows

    rows = read_rows(args.data, args.llm)
    if args.split:
        rows = [r for r in rows if r.split == args.split]
        if not rows:
            raise ValueError(f"{args.data}: no rows in split {args.split!r}")
    return rows


def cmd_train(args: argparse.Namespace) -> int:
    from lenserve.predictor.train import TrainConfig, fit_baseline, fit_learned

    rows = _read(args)
    models = sorted({r.model for r in rows})
    default = args.default_llm or (args.llm if args.llm else None)
    if default is not None and default not in models:
        raise ValueError(f"--default-llm {default!r} is not in {args.data} (models: {', '.join(models)})")
    cfg = TrainConfig(num_threads=args.threads, num_rounds=args.rounds, seed=args.seed)
    if args.char_vocabulary is not None:
        cfg.max_char_vocabulary = max(args.char_vocabulary, 0)
    predictor = fit_learned(rows, cfg, default_model=default, edges=args.edges)
    predictor.save(args.out)
    fit_baseline(rows, default_model=default, edges=args.edges).save(os.path.join(args.out, "baseline"))
    print(json.dumps({"out": args.out, "rows": len(rows), "models": models, "default_model": predictor.default_model}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lenserve.predictor.evaluate import evaluate_file

    rows = _read(args)
    result = evaluate_file(rows, args.predictor, args.edges, per_model=args.per_model)
    print(json.dumps(result))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from lenserve.predictor.make_default import write_results
    from lenserve.predictor.probe import fit_and_evaluate_probe, parse_layers

    layers = parse_layers(args.layers) if args.layers else None
    result = fit_and_evaluate_probe(args.data, args.out, layers=layers, model=args.model, predictor=args.predictor,
                                    states_cache=args.states_cache, num_threads=args.num_threads, edges=args.edges)
    if args.results:
        write_results(args.results, result)
    print(json.dumps(result))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("predictor", help="response-length predictor: build a dataset, train, evaluate")
    sub = p.add_subparsers(dest="predictor_command", required=True)

    b = sub.add_parser("build-dataset", help="sample responses of the served model into a CASTILLO-schema dataset")
    b.add_argument("--prompts", required=True, help="JSON lines (gzip or not) with id and prompt (or prompt_id, prompt_text)")
    b.add_argument("--out", required=True, help="output JSON lines (.gz to compress); resumed when it exists")
    b.add_argument("--samples", type=_positive(int), default=10, help="responses sampled per prompt (CASTILLO: 10)")
    b.add_argument("--max-tokens", type=_positive(int), default=1024)
    b.add_argument("--num-prompts", type=_positive(int), default=None, help="a deterministic random subset of this many prompts")
    b.add_argument("--temperature", type=float, default=0.2, help="SmolLM2 model card's setting")
    b.add_argument("--top-p", type=float, default=0.9, help="SmolLM2 model card's setting")
    b.add_argument("--top-k", type=int, default=50, help="the transformers default CASTILLO records")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--model-name", default=None, help="the `model` field (default: the engine's model name)")
    b.add_argument("--model", default=None, help="a .gguf file or HF directory (default: embedded SmolLM2)")
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    b.add_argument("--max-num-seqs", type=_positive(int), default=128)
    b.add_argument("--max-num-batched-tokens", type=_positive(int), default=4096)
    b.add_argument("--num-threads", type=_positive(int), default=None)
    b.add_argument("--stop-loops", action="store_true",
                   help="end a response caught in a repetition loop at once and record it at --max-tokens; one in 16 "
                        "such responses runs on to measure the rule (OUT stem + .loops.jsonl)")
    b.set_defaults(func=cmd_build_dataset)

    t = sub.add_parser("train", help="train the length predictor (and its prompt-length baseline)")
    t.add_argument("--data", required=True, help="CASTILLO-schema JSON lines (gzip or not)")
    t.add_argument("--llm", default=None, help="only this model's rows (default: all models jointly, model as a feature)")
    t.add_argument("--split", default=None, help="only rows of this split (train, validate, test)")
    t.add_argument("--default-llm", default=None, help="model to answer for when asked about an unknown one")
    t.add_argument("--out", required=True, help="directory to write the predictor to")
    t.add_argument("--edges", type=_edges, default=DEFAULT_BUCKET_EDGES, help="bucket edges, e.g. 64,128,256,512,1024")
    t.add_argument("--threads", type=_positive(int), default=2)
    t.add_argument("--rounds", type=_positive(int), default=400)
    t.add_argument("--char-vocabulary", type=int, default=None, metavar="N",
                   help="character 2-5-gram terms kept for the second TF-IDF ridge (default 100000; 0: word n-grams "
                        "only, a smaller and faster predictor)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a predictor (and its baseline) on CASTILLO-schema rows; prints JSON")
    e.add_argument("--data", required=True, help="CASTILLO-schema JSON lines (gzip or not)")
    e.add_argument("--predictor", required=True, help="directory written by `lenserve predictor train`")
    e.add_argument("--llm", default=None, help="only rows whose `model` is this")
    e.add_argument("--split", default=None, help="only rows of this split (train, validate, test)")
    e.add_argument("--edges", type=_edges, default=DEFAULT_BUCKET_EDGES, help="bucket edges, e.g. 64,128,256,512,1024")
    e.add_argument("--per-model", action="store_true", help="add a per_model breakdown")
    e.set_defaults(func=cmd_eval)

    q = sub.add_parser("probe", help="fit the served model's length probe (its own hidden state after the prefill) "
                                     "on its dataset's train split; evaluate on validate and test beside the text predictor")
    q.add_argument("--data", required=True, help="the served model's dataset (build-dataset's output; its .partial while it is built)")
    q.add_argument("--out", required=True, help="directory to write the probe to (the shipped one: predictor/models/default/probe)")
    q.add_argument("--model", default=None, help="a .gguf file or HF directory (default: embedded SmolLM2)")
    q.add_argument("--layers", default=None, help="0-based layers whose outputs are read, e.g. 16,24 (default: 0.53 and 0.8 of the way up)")
    q.add_argument("--predictor", default=None, help="text predictor to compare with (default: the shipped one)")
    q.add_argument("--states-cache", default=None, help="npz file keeping the collected states, reused by later runs")
    q.add_argument("--results", default=None, help="JSON file for the evaluation")
    q.add_argument("--num-threads", type=_positive(int), default=None)
    q.add_argument("--edges", type=_edges, default=DEFAULT_BUCKET_EDGES, help="bucket edges, e.g. 64,128,256,512,1024")
    q.set_defaults(func=cmd_probe)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lenserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"lenserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
