import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lenserve import cli
from lenserve.traces.compare import config_label, parse_configs, server_command
from lenserve.traces import prompts
from lenserve.traces.loaders import load_trace


def main(argv):
    # lenserve.cli.main registers the subcommands of every package on each call; start afresh so
    # that calling it more than once in one process does not register them twice.
    cli._EXTRA_COMMANDS.clear()
    return cli.main(argv)


def synth(tmp_path, *args):
    out = tmp_path / "synthetic.csv"
    rc = main(["trace", "synth", "--out", str(out), "--seed", "2", *args])
    assert rc == 0
    return out


def test_trace_synth_writes_a_loadable_burstgpt_csv(tmp_path):
    out = synth(tmp_path, "--num-requests", "200", "--rate", "5", "--cv", "1.5", "--length-dist", "zipf", "--max-prompt-tokens", "100")
    assert out.read_text().startswith("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n")
    trace = load_trace(out)
    assert len(trace) == 200 and trace.columns.prompt_tokens.max() <= 100
    assert 3 < trace.summary()["mean_rate_req_s"] < 8


def test_trace_synth_fit(tmp_path, fixtures, capsys):
    out = synth(tmp_path, "--fit", str(fixtures / "azure_conv_head.csv"), "--num-requests", "50")
    info = json.loads(capsys.readouterr().err.split("\nwrote")[0])
    assert info["fitted_to"].endswith("azure_conv_head.csv") and info["gamma_method"] == "mle"
    assert len(load_trace(out)) == 50


def test_trace_info(fixtures, capsys):
    assert main(["trace", "info", "--trace", str(fixtures / "burstgpt_v1.csv"), "--include-failed"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_requests"] == 10 and summary["num_failed"] == 2 and summary["models"] == {"ChatGPT": 7, "GPT-4": 3}


def test_bad_trace_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1,ChatGPT,x,1,1,API log\n")
    assert main(["trace", "info", "--trace", str(bad)]) == 2
    assert f"{bad}, line 2: field 'Request tokens'" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_replay_command(fake_server, tmp_path, capsys):
    trace = synth(tmp_path, "--num-requests", "20", "--rate", "40", "--prompt-mu", "4", "--output-mu", "2", "--max-output-tokens", "16")
    out = tmp_path / "out"
    rc = main(["replay", "--trace", str(trace), "--url", fake_server.url, "--time-scale", "4", "--start", "0", "--duration", "1000",
               "--max-requests", "12", "--no-progress", "--metrics-interval-s", "0.2", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_requests"] == 12 and printed["num_completed"] == 12
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "requests.jsonl", "latency_cdf.png", "throughput.png", "server_metrics.png"}


def test_parse_configs():
    assert parse_configs("policy=fcfs;policy=sjf;attention=padded") == [{"policy": "fcfs"}, {"policy": "sjf"}, {"attention": "padded"}]
    assert parse_configs(" policy=sjf, max-num-seqs=32 ;") == [{"policy": "sjf", "max-num-seqs": "32"}]
    assert config_label({"policy": "sjf", "max-num-seqs": "32"}) == "policy=sjf,max-num-seqs=32"
    for bad in ("policy", "policy=", "=x", ";", "pol icy=x"):
        with pytest.raises(ValueError, match="--configs"):
            parse_configs(bad)


def test_server_command_follows_the_serve_contract():
    argv = server_command("lenserve serve", "127.0.0.1", 8123, {"policy": "sjf", "attention": "padded"}, "--max-num-seqs 32")
    assert argv == shlex.split("lenserve serve --host 127.0.0.1 --port 8123 --policy sjf --attention padded --max-num-seqs 32")


@pytest.mark.timeout(180)
def test_bench_compare_with_stand_in_servers(tmp_path, capsys):
    """Against fake servers: the real `lenserve serve` is exercised the same way, by --server-cmd default."""
    trace = synth(tmp_path, "--num-requests", "10", "--rate", "50", "--prompt-mu", "3", "--output-mu", "1.5", "--max-output-tokens", "8")
    out = tmp_path / "compare"
    fake = f"{shlex.quote(sys.executable)} -m lenserve.traces.fake_server --ttft-s 0.002 --itl-s 0.001"
    rc = main(["bench", "compare", "--trace", str(trace), "--configs", "policy=fcfs;policy=sjf,attention=padded", "--server-cmd", fake,
               "--startup-timeout-s", "60", "--no-progress", "--metrics-interval-s", "0", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in summary["results"]] == ["policy=fcfs", "policy=sjf,attention=padded"]
    assert all(r["report"]["num_completed"] == 10 for r in summary["results"])
    assert summary["results"][1]["server_argv"][-4:] == ["--policy", "sjf", "--attention", "padded"]
    table = (out / "compare.md").read_text()
    assert "| policy=fcfs |" in table and "TTFT p50 (ms)" in table and (out / "compare.png").exists()
    assert (out / "00-policy_fcfs" / "report.json").exists() and (out / "01-policy_sjf_attention_padded" / "server.log").exists()


@pytest.mark.timeout(60)
def test_bench_compare_reports_a_server_that_does_not_start(tmp_path, fixtures):
    out = tmp_path / "compare"
    failing = f"{shlex.quote(sys.executable)} -c 'import sys; print(\"no such option\"); sys.exit(3)'"
    rc = main(["bench", "compare", "--trace", str(fixtures / "burstgpt_v1.csv"), "--configs", "policy=x", "--server-cmd", failing,
               "--startup-timeout-s", "20", "--no-progress", "--out", str(out)])
    assert rc == 1
    result = json.loads((out / "compare.json").read_text())["results"][0]
    assert "exited with code 3" in result["error"] and "no such option" in result["error"]


@pytest.mark.timeout(120)
def test_locust_headless_follows_the_trace_without_failures(fake_server, tmp_path):
    if importlib.util.find_spec("locust") is None:  # never import it here: it monkey-patches the process
        pytest.skip("locust is not installed (pip install -e '.[test]')")
    trace = synth(tmp_path, "--num-requests", "25", "--rate", "10", "--prompt-mu", "3", "--output-mu", "1.5", "--max-output-tokens", "8")
    env = {**os.environ, "LENSERVE_TRACE": str(trace), "LENSERVE_TIME_SCALE": "2", "LENSERVE_DRAIN_S": "20"}
    locustfile = Path(prompts.__file__).parent / "locustfile.py"
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", fake_server.url, "--csv", str(tmp_path / "loc"), "--only-summary", "--loglevel", "WARNING"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split(",")[1]: line.split(",") for line in (tmp_path / "loc_stats.csv").read_text().splitlines()[1:]}
    completions = rows["/v1/completions"]
    assert completions[2] == "25" and completions[3] == "0"  # request count, failure count
