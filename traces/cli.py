"""Subcommands: `lenserve trace synth|info`, `lenserve replay`, `lenserve bench compare`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, replace

from lenserve.traces.loaders import FORMATS


def add_trace_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trace")
    g.add_argument("--trace", required=True, help="BurstGPT CSV, Azure CSV or Mooncake JSONL (gzip is read transparently)")
    g.add_argument("--format", choices=FORMATS, default=None, help="default: detected from the first line")
    g.add_argument("--trace-model", action="append", default=None, metavar="NAME", help="BurstGPT: keep only rows of this Model (ChatGPT, GPT-4); repeatable")
    g.add_argument("--log-type", action="append", default=None, metavar="TYPE", help="BurstGPT: keep only this Log Type ('Conversation log', 'API log'); repeatable")
    g.add_argument("--include-failed", action="store_true", help="BurstGPT: keep failed rows (0 response tokens); replay sends them with max_tokens 1")
    g.add_argument("--start", type=float, default=None, metavar="S", help="window start, seconds after the trace's first request")
    g.add_argument("--duration", type=float, default=None, metavar="D", help="window length in trace seconds")
    g.add_argument("--max-requests", type=int, default=None, metavar="N", help="replay at most the first N requests of the window")
    g.add_argument("--session-blocks", type=int, default=None, metavar="TOKENS",
                   help="traces with session ids and no block ids (BurstGPT v3): derive prefix blocks of TOKENS tokens from the "
                        "sessions (a turn continues its session's conversation when its prompt holds the previous prompt and answer)")


def load_from_args(args: argparse.Namespace):
    from lenserve.traces.loaders import load_trace

    trace = load_trace(
        args.trace,
        args.format,
        models=args.trace_model,
        log_types=args.log_type,
        include_failed=args.include_failed,
        start_s=args.start,
        duration_s=args.duration,
        max_requests=args.max_requests,
    )
    if getattr(args, "session_blocks", None):
        from lenserve.traces.sessions import session_block_ids

        trace = session_block_ids(trace, args.session_blocks)
    return trace


def add_replay_args(p: argparse.ArgumentParser, with_url: bool = True) -> None:
    g = p.add_argument_group("replay")
    if with_url:
        g.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    g.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--model", default=None, help="model name to request (default: the first of GET /v1/models)")
    g.add_argument("--mode", choices=("exact", "natural"), default="exact",
                   help="exact: prompts of the trace's token count, max_tokens = its response tokens, ignore_eos; "
                   "natural: real prompts, the model stops by itself")
    g.add_argument("--endpoint", choices=("completions", "chat"), default=None, help="default: completions for exact, chat for natural")
    g.add_argument("--time-scale", type=float, default=1.0, metavar="X", help="speed-up: send time = trace time / X (2 = twice the trace's rate)")
    g.add_argument("--max-tokens-cap", type=int, default=1024, help="natural mode: max_tokens of every request")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--tokenizer", default=None, metavar="tokenizer.json",
                   help="exact mode: count tokens locally with this tokenizer instead of the server's POST /tokenize")
    g.add_argument("--slo-ttft-s", type=float, default=1.0)
    g.add_argument("--slo-tpot-s", type=float, default=0.1)
    g.add_argument("--request-timeout-s", type=float, default=600.0)
    g.add_argument("--metrics-interval-s", type=float, default=1.0, help="how often to scrape /metrics (0: never)")
    g.add_argument("--seed", type=int, default=0, help="prompt choice")
    g.add_argument("--prefix-block-tokens", type=int, default=None, metavar="N",
                   help="exact mode, traces with prefix blocks (Mooncake hash_ids, multi-turn sessions): each trace block becomes "
                        "N deterministic tokens (equal ids, equal tokens), so shared prefixes hit the server's prefix cache")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--out", required=True, metavar="DIR", help="output directory")


def replay_config_from_args(args: argparse.Namespace, url: str = ""):
    from lenserve.traces.replay import ReplayConfig

    return ReplayConfig(
        url=getattr(args, "url", None) or url,
        api_key=args.api_key,
        model=args.model,
        mode=args.mode,
        endpoint=args.endpoint,
        time_scale=args.time_scale,
        max_tokens_cap=args.max_tokens_cap,
        temperature=args.temperature,
        slo_ttft_s=args.slo_ttft_s,
        slo_tpot_s=args.slo_tpot_s,
        request_timeout_s=args.request_timeout_s,
        metrics_interval_s=args.metrics_interval_s,
        tokenizer=args.tokenizer,
        seed=args.seed,
        prefix_block_tokens=args.prefix_block_tokens,
        show_progress=not args.no_progress,
    )


def _quiet_http_logs() -> None:
    # httpx logs every request at INFO: one line per /metrics scrape and health poll.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def cmd_replay(args: argparse.Namespace) -> int:
    from lenserve.traces.replay import replay

    _quiet_http_logs()
    config = replay_config_from_args(args)
    trace = load_from_args(args)
    try:
        report = replay(trace, config, args.out)
    except RuntimeError as e:
        print(f"lenserve replay: error: {e}", file=sys.stderr)
        return 1
    keys = ("num_requests", "num_completed", "num_failed", "failures_by_status", "ttft_s", "tpot_s", "throughput_req_s", "throughput_tok_s", "goodput_req_s", "send_lag_s")
    print(json.dumps({k: report[k] for k in keys}, indent=2))
    print(f"wrote {args.out}/report.md", file=sys.stderr)
    return 130 if report.get("interrupted") else 0


def cmd_synth(args: argparse.Namespace) -> int:
    from lenserve.traces.synth import LengthDist, SynthConfig, fit_config, gamma_from_rate_cv, synthesize, write_burstgpt_csv

    common = dict(num_requests=args.num_requests, duration_s=args.duration_s, seed=args.seed, model=args.model, log_type=args.log_type)
    if args.num_requests is None and args.duration_s is None:
        common["num_requests"] = 1000
    if args.fit:
        from lenserve.traces.loaders import load_trace

        fitted_to = load_trace(args.fit, args.fit_format, include_failed=True)
        config, info = fit_config(fitted_to, args.length_dist, **common)
        if args.max_prompt_tokens or args.max_output_tokens:  # caps on the fitted lengths
            config = replace(
                config,
                prompt=replace(config.prompt, max_tokens=min(config.prompt.max_tokens, args.max_prompt_tokens or config.prompt.max_tokens)),
                output=replace(config.output, max_tokens=min(config.output.max_tokens, args.max_output_tokens or config.output.max_tokens)),
            )
            info["config"] = asdict(config)
        print(json.dumps(info, indent=2), file=sys.stderr)
    else:
        if args.gamma_shape is not None or args.gamma_scale is not None:
            if args.gamma_shape is None or args.gamma_scale is None:
                raise ValueError("give both --gamma-shape and --gamma-scale (or --rate and --cv)")
            shape, scale = args.gamma_shape, args.gamma_scale
        else:
            shape, scale = gamma_from_rate_cv(args.rate, args.cv)
        config = SynthConfig(
            gamma_shape=shape,
            gamma_scale=scale,
            prompt=LengthDist(args.length_dist, zipf_a=args.prompt_zipf_a, mu=args.prompt_mu, sigma=args.prompt_sigma, max_tokens=args.max_prompt_tokens or 4096),
            output=LengthDist(args.length_dist, zipf_a=args.output_zipf_a, mu=args.output_mu, sigma=args.output_sigma, max_tokens=args.max_output_tokens or 2048),
            failure_rate=args.failure_rate,
            **common,
        )
    trace = synthesize(config)
    write_burstgpt_csv(trace, args.out, log_type=config.log_type)
    print(f"wrote {len(trace)} requests over {trace.duration_s:.1f} s to {args.out} ({trace.source})", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    trace = load_from_args(args)
    print(json.dumps({**trace.summary(), "meta": trace.meta}, indent=2, default=str))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lenserve.traces.compare import compare, parse_configs, render_table

    _quiet_http_logs()
    configs = parse_configs(args.configs)
    trace = load_from_args(args)
    summary = compare(
        trace,
        configs,
        replay_config_from_args(args, url="http://unused"),
        args.out,
        server_cmd=args.server_cmd,
        serve_args=args.serve_args,
        host=args.host,
        startup_timeout_s=args.startup_timeout_s,
    )
    print(render_table(summary["results"]))
    print(f"wrote {args.out}/compare.md", file=sys.stderr)
    return 0 if all(r.get("report") for r in summary["results"]) else 1


def register(subparsers) -> None:
    from lenserve.cli import subcommand_group
    from lenserve.traces.compare import DEFAULT_SERVER_CMD

    tsub = subcommand_group(subparsers, "trace", help="trace tools: synthesize, inspect")

    s = tsub.add_parser("synth", help="write a BurstGPT-style synthetic trace (Gamma arrivals, Zipf/lognormal lengths) as BurstGPT CSV")
    s.add_argument("--out", required=True, help="CSV file to write")
    s.add_argument("--num-requests", type=int, default=None, help="number of requests (default 1000 unless --duration-s)")
    s.add_argument("--duration-s", type=float, default=None, help="trace length in seconds")
    s.add_argument("--rate", type=float, default=1.0, help="mean arrival rate, req/s")
    s.add_argument("--cv", type=float, default=2.0, help="coefficient of variation of inter-arrival times (1 = Poisson, > 1 bursty)")
    s.add_argument("--gamma-shape", type=float, default=None, help="Gamma shape k (instead of --rate/--cv)")
    s.add_argument("--gamma-scale", type=float, default=None, help="Gamma scale theta, seconds (instead of --rate/--cv)")
    s.add_argument("--length-dist", choices=("zipf", "lognormal"), default="lognormal")
    s.add_argument("--prompt-zipf-a", type=float, default=1.2, help="zipf: exponent a of p(k) ∝ k^-a for request tokens")
    s.add_argument("--output-zipf-a", type=float, default=1.2, help="zipf: exponent for response tokens")
    s.add_argument("--prompt-mu", type=float, default=6.0, help="lognormal: mean of log(request tokens)")
    s.add_argument("--prompt-sigma", type=float, default=1.0, help="lognormal: std of log(request tokens)")
    s.add_argument("--output-mu", type=float, default=5.3, help="lognormal: mean of log(response tokens)")
    s.add_argument("--output-sigma", type=float, default=0.8, help="lognormal: std of log(response tokens)")
    s.add_argument("--max-prompt-tokens", type=int, default=None, help="largest request length (default 4096; with --fit: a cap on the fitted maximum)")
    s.add_argument("--max-output-tokens", type=int, default=None, help="largest response length (default 2048; with --fit: a cap on the fitted maximum)")
    s.add_argument("--failure-rate", type=float, default=0.0, help="fraction of rows written as failed (0 response tokens)")
    s.add_argument("--model", default="ChatGPT", help="Model column")
    s.add_argument("--log-type", default="Conversation log", help="Log Type column")
    s.add_argument("--fit", default=None, metavar="FILE", help="fit arrivals, lengths and failure rate to this trace (scipy)")
    s.add_argument("--fit-format", choices=FORMATS, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    i = tsub.add_parser("info", help="load a trace and print its summary (counts, rate, lengths) as JSON")
    add_trace_args(i)
    i.set_defaults(func=cmd_info)

    r = subparsers.add_parser("replay", help="replay a trace open-loop against an OpenAI-compatible server and write a report")
    add_trace_args(r)
    add_replay_args(r)
    r.set_defaults(func=cmd_replay)

    bsub = subcommand_group(subparsers, "bench", help="benchmarks")
    c = bsub.add_parser("compare", help="start a server per configuration, replay the same trace against each, compare")
    add_trace_args(c)
    add_replay_args(c, with_url=False)
    g = c.add_argument_group("servers")
    g.add_argument("--configs", required=True, help="'policy=fcfs;policy=sjf;attention=padded': ';' between configurations, ',' between key=value")
    g.add_argument("--server-cmd", default=DEFAULT_SERVER_CMD, help="command that starts a server; --host, --port and each --key value are appended")
    g.add_argument("--serve-args", default="", help="extra arguments for every server, e.g. '--max-num-seqs 32'")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--startup-timeout-s", type=float, default=600.0)
    c.set_defaults(func=cmd_compare)
