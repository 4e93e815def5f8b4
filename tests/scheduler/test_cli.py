"""`lenserve simulate` on the small trace fixtures (model-free)."""
import json

import pytest

from lenserve.cli import main

KEYS = {"num_requests", "mean_e2e_s", "p50_e2e_s", "p99_e2e_s", "mean_ttft_s", "p99_ttft_s",
        "throughput_tok_s", "preemptions", "max_concurrent"}


@pytest.mark.parametrize("trace,fmt", [("burstgpt_v1.csv", "burstgpt"), ("azure_conv_head.csv", "azure"), ("mooncake.jsonl", "mooncake")])
def test_simulate_prints_one_json_object_keyed_by_policy(trace, fmt, capsys):
    rc = main(["simulate", "--trace", f"tests/data/traces/{trace}", "--format", fmt, "--policies", "fcfs,sjf,oracle",
               "--predictions", "noisy:0.5", "--time-scale", "4", "--kv-reserve", "predicted", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"fcfs", "sjf", "oracle"}
    for summary in out.values():
        assert KEYS <= set(summary) and summary["num_requests"] > 0


def test_simulate_predicts_itl_under_a_target(capsys):
    """`lenserve simulate --target-itl-ms`: the same budget rule as `serve`, ITL in the summary."""
    args = ["simulate", "--trace", "tests/data/traces/azure_conv_head.csv", "--format", "azure", "--policies", "fcfs",
            "--predictions", "oracle", "--time-scale", "4", "--json"]
    assert main(args) == 0
    fixed = json.loads(capsys.readouterr().out)["fcfs"]
    assert main(args + ["--target-itl-ms", "300"]) == 0
    target = json.loads(capsys.readouterr().out)["fcfs"]
    assert {"p50_itl_s", "p99_itl_s", "mean_itl_s"} <= set(fixed)
    assert fixed["p99_itl_s"] > 1.0  # 2,048-token steps stall the streams
    assert target["p99_itl_s"] <= 0.3 * 1.25 + 1e-9
    assert target["num_requests"] == fixed["num_requests"]


def test_simulate_table_and_bucketed(capsys):
    assert main(["simulate", "--trace", "tests/data/traces/burstgpt_v3.csv", "--policies", "sjf",
                 "--batching", "bucketed", "--predictions", "oracle", "--max-num-seqs", "4"]) == 0
    assert "sjf" in capsys.readouterr().out


def test_simulate_rejects_bad_predictions(capsys):
    assert main(["simulate", "--trace", "tests/data/traces/burstgpt_v1.csv", "--predictions", "psychic"]) == 2
    assert "predictions must be" in capsys.readouterr().err


def test_bench_cost_model_measures_the_embedded_engine(tmp_path, capsys):
    """`lenserve bench cost-model --quick` on the embedded model: a fit that predicts the steps it
    measured, sampling as asked."""
    from lenserve.scheduler.cost_model import CostModel

    out = tmp_path / "cost.json"
    assert main(["bench", "cost-model", "--quick", "--temperature", "0", "--num-threads", "1", "--max-num-seqs", "16",
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    cost = CostModel.load(out)
    assert cost.step_base_s > 0 and cost.token_s > 0 and cost.max_num_seqs == 16
    assert cost.meta["sampling"] == {"temperature": 0.0, "top_p": 1.0, "top_k": -1}
    assert cost.meta["num_samples"] >= 10
    # a decode step of 8 sequences takes longer than one of 1, and a 1,024-token prefill longer still
    assert cost.step_time(8, 8, 0, 8 * 300) > cost.step_time(1, 1, 0, 300)
    assert cost.step_time(1024, 1, 1024 * 512, 0) > cost.step_time(8, 8, 0, 8 * 300)
    assert printed["fit_mean_abs_rel_error"] == cost.meta["fit_mean_abs_rel_error"]


def test_cost_model_grid_covers_the_batch_sizes_the_engine_runs():
    from lenserve.sim_cli import decode_points

    batches = sorted({b for b, _ in decode_points(16)})
    assert batches == [1, 2, 4, 8, 16]  # never 32 or 64 for a 16-sequence engine
    assert sorted({b for b, _ in decode_points(12)}) == [1, 2, 4, 8, 12]
    assert sorted({b for b, _ in decode_points(16, quick=True)}) == [1, 4, 16]
    assert max(b for b, _ in decode_points(64, quick=True)) == 64
    assert len({c for _, c in decode_points(64)}) == 2  # a short and a long context at each size


@pytest.mark.parametrize("trace,extra", [("mooncake.jsonl", []), ("burstgpt_v3.csv", ["--session-blocks", "16"])])
def test_simulate_routes_by_prefix(trace, extra, capsys):
    """Mooncake's hash_ids, or blocks derived from BurstGPT v3 sessions, reach the cache-aware router."""
    rc = main(["simulate", "--trace", f"tests/data/traces/{trace}", "--policies", "fcfs", "--replicas", "2",
               "--router", "cache-aware,pow2,cache-oracle", "--json", *extra])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"cache-aware", "pow2", "cache-oracle"}
    for summary in out.values():
        assert 0.0 <= summary["prefix_hit_rate"] <= 1.0 and summary["num_requests"] > 0


def _metrics_text(terms: dict, ratios, lifetime: dict | None = None, replica: str | None = None) -> str:
    """What a server's /metrics says after steps that ran `ratios` x their predicted time."""
    from lenserve.engine.stats import IterationStats
    from lenserve.server.metrics import Metrics

    m = Metrics("m", extra_labels={"replica": replica} if replica else None)
    m.record_iteration(IterationStats(cost_model=terms, cost_model_lifetime=lifetime))
    for r in ratios:
        m.record_iteration(IterationStats(step_time_over_predicted=r))
    return m.render().decode()


def test_served_cost_model_reads_the_fit_and_the_step_scatter():
    import numpy as np

    from lenserve.server.metrics import served_cost_model

    terms = {"step_base_s": 0.02, "token_s": 0.0015, "sample_s": 0.001, "prefill_attention_s": 7e-7, "decode_context_s": 0.0}
    ratios = np.random.default_rng(0).lognormal(0.0, 0.15, 400)
    lifetime = {**terms, "step_base_s": 0.03}
    served = served_cost_model(_metrics_text(terms, ratios, lifetime))
    assert {k: getattr(served.model, k) for k in terms} == pytest.approx(terms)
    assert {k: getattr(served.lifetime, k) for k in terms} == pytest.approx(lifetime)
    noise = served.step_noise
    assert len(noise) == len(ratios)
    for q in (10, 50, 90, 99):  # within one bucket (9% wide) of the true quantiles
        assert np.percentile(noise, q) == pytest.approx(np.percentile(ratios, q), rel=0.1)
    empty = served_cost_model("")
    assert empty.model is None and empty.lifetime is None and len(empty.step_noise) == 0


def test_served_cost_models_of_replicas_are_read_apart_and_pooled():
    """An ingress's /metrics carries every replica's fit (a `replica` label): read one by one, or
    pooled for a simulation of identical replicas (coefficients averaged, scatter concatenated)."""
    import numpy as np

    from lenserve.server.metrics import served_cost_model, served_cost_models

    a = {"step_base_s": 0.02, "token_s": 0.002, "sample_s": 0.0, "prefill_attention_s": 1e-6, "decode_context_s": 0.0}
    b = {**a, "step_base_s": 0.04, "token_s": 0.004}
    rng = np.random.default_rng(1)
    text = _metrics_text(a, rng.lognormal(0, 0.1, 100), a, "r0") + _metrics_text(b, rng.lognormal(0.5, 0.1, 50), b, "r1")
    per = served_cost_models(text)
    assert set(per) == {"r0", "r1"}
    assert per["r0"].lifetime.token_s == pytest.approx(0.002) and per["r1"].lifetime.token_s == pytest.approx(0.004)
    assert len(per["r0"].step_noise) == 100 and np.median(per["r1"].step_noise) == pytest.approx(np.exp(0.5), rel=0.1)
    pooled = served_cost_model(text)
    assert pooled.lifetime.step_base_s == pytest.approx(0.03) and pooled.model.token_s == pytest.approx(0.003)
    assert len(pooled.step_noise) == 150


def test_simulate_from_server_replays_its_cost_model_and_scatter(capsys):
    """`lenserve simulate --from-server URL`: the server's lifetime fit and step scatter; a slower
    fit and a wider scatter than the shipped model show in the simulated ITL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import numpy as np

    from lenserve.scheduler.cost_model import load_default

    shipped = load_default()
    slow = {"step_base_s": 2 * shipped.step_base_s, "token_s": 2 * shipped.token_s, "sample_s": 2 * shipped.sample_s,
            "prefill_attention_s": shipped.prefill_attention_s, "decode_context_s": shipped.decode_context_s}
    # the lifetime fit (the whole run) is what describes other traffic; the online one follows the last steps
    online = {k: getattr(shipped, k) for k in slow}
    body = _metrics_text(online, np.random.default_rng(1).lognormal(0.0, 0.3, 500), lifetime=slow).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        args = ["simulate", "--trace", "tests/data/traces/azure_conv_head.csv", "--format", "azure", "--policies", "fcfs",
                "--predictions", "oracle", "--time-scale", "4", "--json"]
        runs = {}
        for name, extra in {"shipped": [], "served": ["--from-server", url], "shipped_target": ["--target-itl-ms", "300"],
                            "served_target": ["--target-itl-ms", "300", "--from-server", url]}.items():
            assert main(args + extra) == 0
            runs[name] = json.loads(capsys.readouterr().out)["fcfs"]
    finally:
        server.shutdown()
    # a machine twice as slow: decode steps (the median gap) about twice as long
    assert 1.6 < runs["served"]["p50_itl_s"] / runs["shipped"]["p50_itl_s"] < 2.6
    assert runs["shipped_target"]["p99_itl_s"] <= 0.3 + 1e-9  # every step exactly as predicted: at the target
    assert runs["served_target"]["p99_itl_s"] > 0.3 * 1.1  # scattered steps run past it
    assert main(args + ["--from-server", "http://127.0.0.1:9"]) == 2
    assert "could not read" in capsys.readouterr().err
