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


def test_simulate_table_and_bucketed(capsys):
    assert main(["simulate", "--trace", "tests/data/traces/burstgpt_v3.csv", "--policies", "sjf",
                 "--batching", "bucketed", "--predictions", "oracle", "--max-num-seqs", "4"]) == 0
    assert "sjf" in capsys.readouterr().out


def test_simulate_rejects_bad_predictions(capsys):
    assert main(["simulate", "--trace", "tests/data/traces/burstgpt_v1.csv", "--predictions", "psychic"]) == 2
    assert "predictions must be" in capsys.readouterr().err
