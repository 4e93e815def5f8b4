"""The `lenserve` command line: generate, serve, and the predictor/trace/bench tools."""
from __future__ import annotations

import argparse
import logging
import sys

from lenserve.config import EngineConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="a .gguf file or an HF checkpoint directory (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--weights-dtype", default="auto", choices=["auto", "fp32", "fp16", "native"],
                   help="CPU weights: native keeps a GGUF's quantized rows as they are, fp16 halves any checkpoint (auto: native for a GGUF on CPU, else fp32)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--kv-cache-memory-gb", type=float, default=None, help="KV cache size (CPU default 4 GiB)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--policy", default="fcfs", choices=["fcfs", "sjf", "oracle"], help="sjf: shortest predicted response first (aged); oracle: true lengths (analysis only)")
    g.add_argument("--batching", default="continuous", choices=["continuous", "bucketed"], help="bucketed: static batches per predicted-length bucket (a baseline)")
    g.add_argument("--kv-reserve", default="none", choices=["none", "predicted", "max"], help="KV blocks reserved at admission beyond the prompt: none, predicted p90, or max_tokens")
    g.add_argument("--max-wait-s", type=float, default=None, help="requests waiting longer go first, whatever the policy")
    g.add_argument("--fcfs-wait-bound", type=float, default=None, help="requests that have waited this multiple of their fcfs wait go first")
    g.add_argument("--max-latency-s", type=float, default=None,
                   help="end-to-end latency objective (s): a request goes first once a later start would leave too little time for its expected response (predicted mean tokens x measured step time)")
    g.add_argument("--target-itl-ms", type=_target_itl, default="auto", metavar="MS",
                   help="inter-token latency target that sizes each step's prompt chunks from measured step times "
                   "('auto': 250 on CPU, 50 on CUDA; 0: a fixed --max-num-batched-tokens budget)")
    g.add_argument("--min-prefill-chunk", type=int, default=16, help="the fewest prompt tokens a step takes under --target-itl-ms")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "kernels", "torch", "flash-attn"])
    g.add_argument("--attention", default="packed", choices=["packed", "padded"], help="padded: the baseline only")
    g.add_argument("--enforce-eager", action="store_true", help="CUDA: run decode steps eagerly instead of replaying CUDA graphs")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--num-threads", type=int, default=None)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    from lenserve.scheduler.config import SchedulerConfig

    return EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        weights_dtype=args.weights_dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        attention_backend=args.attention_backend,
        attention=args.attention,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=not args.no_prefix_caching,
        num_threads=args.num_threads,
        target_itl_ms=args.target_itl_ms,
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            policy=args.policy,
            batching=args.batching,
            kv_reserve=args.kv_reserve,
            max_wait_s=args.max_wait_s,
            fcfs_wait_bound=args.fcfs_wait_bound,
            max_latency_s=args.max_latency_s,
            min_prefill_chunk=args.min_prefill_chunk,
        ),
    )


def _target_itl(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        ms = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or milliseconds, got {value!r}") from None
    if not ms >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: a fixed token budget), got {value}")
    return ms


def cmd_generate(args: argparse.Namespace) -> int:
    from lenserve.engine.llm_engine import LLMEngine
    from lenserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(engine_config_from_args(args))
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    if args.chat:
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
        engine.add_request("cli", args.prompt, params, prompt_token_ids=ids)
    else:
        engine.add_request("cli", args.prompt, params)
    if not args.chat:
        sys.stdout.write(args.prompt)
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.outputs[0].delta_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lenserve", description="Length-aware LLM inference server")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a completion and stream it to stdout")
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Subcommands contributed by other packages: each registers itself on the subparsers object.
_EXTRA_COMMANDS: list = []


def subcommand_group(sub, name: str, help: str):
    """The subparsers of group `name` (e.g. `lenserve bench ...`), created on first use, so several
    packages can add commands to one group."""
    parser = sub.choices.get(name)
    if parser is None:
        parser = sub.add_parser(name, help=help)
        parser.set_defaults(func=lambda args: parser.print_help() or 2)
        return parser.add_subparsers(dest=f"{name}_command", required=True)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=f"{name}_command", required=True)


def _load_extra_commands() -> None:
    import importlib

    _EXTRA_COMMANDS.clear()
    for module in ("lenserve.server.cli", "lenserve.predictor.cli", "lenserve.traces.cli", "lenserve.sim_cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        _EXTRA_COMMANDS.append(mod.register)


def main(argv: list[str] | None = None) -> int:
    _load_extra_commands()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"lenserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
