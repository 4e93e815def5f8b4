"""The CPU parts of the GPU device check (benchmarks/gpu): the shell script's argument handling and
plan, the smoke stage, the kernel-benchmark harness and the end-to-end comparisons on tiny shapes,
and the summary's verdicts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.gpu import e2e, kernels, smoke, summary, ties
from lenserve.engine.sampler import SampleLogprobs
from tests.engine.helpers import check_logprobs_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu", "device_check.sh")


def _sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_script_parses_and_dry_runs():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    res = _sh("--dry-run", "--budget-s", "300")
    assert res.returncode == 0, res.stderr
    for stage in ("build", "smoke", "tests", "check", "kernels", "e2e", "memcheck", "racecheck"):
        assert f"stage {stage} (cap" in res.stdout
    assert "--no-deps --no-build-isolation" in res.stdout and "TORCH_CUDA_ARCH_LIST=$ARCH" in res.stdout
    assert "compute-sanitizer" in res.stdout or "--tool memcheck" in res.stdout
    only = _sh("--dry-run", "--only", "smoke,kernels")
    assert "stage build: not selected" in only.stdout and "stage kernels (cap" in only.stdout


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument"),
    (["--only", "smoke,nope"], "unknown stage 'nope'"),
    (["--budget-s", "8m"], "whole seconds"),
])
def test_script_rejects_bad_arguments(args, message):
    res = _sh(*args)
    assert res.returncode == 2 and message in res.stderr


def test_script_runs_a_stage_and_summarises(tmp_path):
    """--only smoke on CPU: the stage runs under its timeout, is recorded, and the summary reads it."""
    out = tmp_path / "out"
    res = _sh("--only", "smoke", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / "smoke.json").exists() and (out / "summary.json").exists()
    stages = (out / "stages.tsv").read_text().splitlines()
    assert len(stages) == 1 and stages[0].startswith("smoke\tok\t")
    assert "smoke ops ok: True" in res.stdout
    low = _sh("--only", "smoke", "--out", str(tmp_path / "low"), "--budget-s", "5")
    assert "smoke skipped" in low.stdout and "budget spent" in low.stdout


def test_smoke_calls_every_op_on_cpu(tmp_path):
    assert smoke.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "smoke.json").read_text())
    ops = {r["op"] for r in result["ops"]}
    assert {"rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "reshape_and_cache",
            "varlen_attention", "paged_decode_attention"} <= ops
    assert result["ok"] and result["env"]["torch"] == torch.__version__ and "date" in result["env"]


def test_kernel_harness_on_tiny_shapes(tmp_path):
    assert kernels.main(["--device", "cpu", "--tiny", "--iters", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernels.json").read_text())
    impls = {r["impl"] for r in result["rows"]}
    assert impls == {"lenserve", "sdpa_padded", "naive_padded"}
    for r in result["rows"]:
        assert r["ms"] > 0 and r["max_abs_diff_vs_lenserve"] < 1e-3, r  # every baseline computes the same attention
    assert {s["mix"] for s in result["speedups"]} == {"azure", "uniform"}


def test_azure_mix_comes_from_the_trace():
    lens = kernels.length_mix("azure")
    assert len(lens) == 63 and sum(lens) == 65988  # the mix the FA2 figures were measured on
    uniform = kernels.length_mix("uniform")
    assert len(uniform) == 63 and 1 <= min(uniform) and max(uniform) <= 2048


def test_pad_and_unpad_round_trip():
    x = torch.randn(10, 3, 8)
    lens = [2, 7, 1]
    padded = kernels.pad(x, lens)
    assert padded.shape == (3, 3, 7, 8)
    assert torch.equal(kernels.unpad(padded, lens), x)


def test_compare_logits_and_tokens():
    ref = torch.randn(20, 100) * 5
    same = e2e.compare_logits(ref.clone(), ref)
    assert same["ok"] and same["min_cosine"] == pytest.approx(1.0) and same["argmax_agreement"] == 1.0
    noisy = e2e.compare_logits(ref + torch.randn(20, 100) * 0.05, ref)
    assert noisy["ok"]
    wrong = e2e.compare_logits(torch.randn(20, 100) * 5, ref)
    assert not wrong["ok"] and wrong["min_cosine"] < 0.9
    assert ties.compare_greedy([[1, 2], [3]], [[1, 2], [3]])["identical"]
    diff = ties.compare_greedy([[1, 2], [3, 4]], [[1, 2], [3, 5]])
    assert not diff["identical"] and diff["first_difference"] == {"sequence": 1, "position": 1}
    assert not diff["ok"] and diff["mismatches"][0]["sequence"] == 1  # no logprobs: no way to call it a tie
    assert not ties.compare_greedy([[1, 2]], [[1]])["ok"]
    rows = e2e.throughput_rows({1: 100.0, 32: 3000.0}, {1: 10.0})
    assert rows == [{"batch": 1, "lenserve_tok_s": 100.0, "hf_tok_s": 10.0, "speedup_vs_hf": 10.0},
                    {"batch": 32, "lenserve_tok_s": 3000.0}]


def _lps(*tops: dict) -> list[SampleLogprobs]:
    """One SampleLogprobs a position from {token: logprob} (its greedy token the most likely)."""
    return [SampleLogprobs(token_id=max(t, key=t.get), logprob=max(t.values()),
                           top=sorted(t.items(), key=lambda kv: -kv[1])) for t in tops]


def test_greedy_comparison_identical():
    lp = _lps({1: -0.5, 2: -1.5}, {3: -0.2, 4: -2.0})
    res = ties.compare_greedy([[1, 3], [1]], [[1, 3], [1]], [lp, lp[:1]], [lp, lp[:1]])
    assert res["identical"] and res["ok"] and res["identical_sequences"] == 2
    assert res["near_ties"] == [] and res["mismatches"] == [] and res["first_difference"] is None
    assert ties.first_divergence([1, 3], lp, [1, 3], lp) is None


def test_greedy_comparison_accepts_a_near_tie():
    """The candidate takes 8 where the reference took 7, 0.03 nats apart on both sides: a near
    tie; what follows the divergence is not compared (the continuations differ)."""
    ref_tokens, ref_lp = [5, 7, 9], _lps({5: -0.1, 6: -3.0}, {7: -0.70, 8: -0.73, 1: -3.0}, {9: -0.1})
    cand_tokens, cand_lp = [5, 8, 2], _lps({5: -0.1, 6: -3.0}, {8: -0.69, 7: -0.72, 1: -3.0}, {2: -0.1})
    res = ties.compare_greedy([cand_tokens, [4]], [ref_tokens, [4]], [cand_lp, _lps({4: 0.0})], [ref_lp, _lps({4: 0.0})])
    assert res["ok"] and not res["identical"] and res["identical_sequences"] == 1
    assert res["near_ties"] == [{"sequence": 0, "position": 1, "gap": 0.03, "candidate_gap": 0.03}]
    assert res["mismatches"] == [] and res["first_difference"] == {"sequence": 0, "position": 1}
    # the tests' helper (tests/engine/helpers.py) applies the same rule
    assert check_logprobs_close(cand_tokens, cand_lp, ref_tokens, ref_lp, max_gap=ties.BF16_MAX_GAP) == 1


@pytest.mark.parametrize("cand_top, ref_top, why", [
    ({8: -0.5, 1: -0.6}, {7: -0.70, 8: -0.73}, "not in candidate's top"),  # reference's 7 not in the candidate's top-k
    ({8: -0.69, 7: -0.72}, {7: -0.70, 1: -0.71}, "not in reference's top"),  # candidate's 8 not in the reference's top-k
    ({8: -0.69, 7: -0.72}, {7: -0.2, 8: -2.2}, "no near tie"),  # the reference prefers 7 by 2 nats
    ({8: -0.2, 7: -2.2}, {7: -0.70, 8: -0.73}, "no near tie"),  # the candidate prefers 8 by 2 nats
])
def test_greedy_comparison_rejects_a_real_mismatch(cand_top, ref_top, why):
    ref_tokens, cand_tokens = [5, 7], [5, 8]
    ref_lp, cand_lp = _lps({5: -0.1}, ref_top), _lps({5: -0.1}, cand_top)
    res = ties.compare_greedy([cand_tokens, [3]], [ref_tokens, [3]], [cand_lp, _lps({3: 0.0})], [ref_lp, _lps({3: 0.0})])
    assert not res["ok"] and res["near_ties"] == [] and res["identical_sequences"] == 1
    assert len(res["mismatches"]) == 1 and res["mismatches"][0]["position"] == 1 and why in res["mismatches"][0]["reason"]
    with pytest.raises(AssertionError, match=why):
        check_logprobs_close(cand_tokens, cand_lp, ref_tokens, ref_lp, "candidate", "reference", max_gap=ties.BF16_MAX_GAP)
    # a gap just over the tolerance is no tie either
    gap = ties.BF16_MAX_GAP + 0.01
    assert not ties.first_divergence([8], _lps({8: -0.5, 7: -0.5 - gap}), [7], _lps({7: -0.5, 8: -0.5 - gap}))["near_tie"]


def test_e2e_stages_on_a_tiny_model(tmp_path):
    assert e2e.main(["check", "--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0
    check = json.loads((tmp_path / "e2e_check.json").read_text())
    shape = check["shapes"][0]
    assert shape["graphs_vs_eager"]["identical"] and shape["graphs_vs_eager"]["static_runs"] > 0
    assert shape["chunked_prefill_vs_one_pass"]["identical"] and shape["device_vs_cpu_fp32"]["ok"]
    for name in ("graphs_vs_eager", "chunked_prefill_vs_one_pass"):  # fp32 on CPU: no tie flips
        assert shape[name]["ok"] and shape[name]["mismatches"] == [] and shape[name]["near_ties"] == []
        assert shape[name]["identical_sequences"] == shape[name]["sequences"]
    assert e2e.main(["throughput", "--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0
    thr = json.loads((tmp_path / "e2e_throughput.json").read_text())
    assert [r["batch"] for r in thr["rows"]] == [1, 4] and all(r["lenserve_tok_s"] > 0 for r in thr["rows"])


def test_summary_verdicts(tmp_path):
    env = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "torch_cuda": "13.0", "date": "2026-12-04"}
    (tmp_path / "kernels.json").write_text(json.dumps({"env": env, "speedups": [
        {"mix": "azure", "shape": "llama3-8b", "speedup_vs_fa2_varlen": 0.85, "speedup_vs_sdpa_padded_flash": 3.4}]}))
    (tmp_path / "e2e_throughput.json").write_text(json.dumps({"env": env, "hf": "ran", "rows": [
        {"batch": 1, "lenserve_tok_s": 200.0, "hf_tok_s": 14.5, "speedup_vs_hf": 13.8},
        {"batch": 256, "lenserve_tok_s": 9000.0, "hf_tok_s": 3333.0, "speedup_vs_hf": 2.7}]}))
    (tmp_path / "stages.tsv").write_text("build\tok\t95\tarch 9.0\nmemcheck\tok\t40\tERROR SUMMARY: 0 errors\n")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "memcheck.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    (tmp_path / "logs" / "racecheck.log").write_text("========= ERROR SUMMARY: 2 errors\n")
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.csrc.x" name="test_a"/><testcase classname="tests.csrc.x" name="test_b"><failure/></testcase>'
        '<testcase classname="tests.csrc.x" name="test_c"/></testsuite></testsuites>')
    v = summary.verdicts(str(tmp_path))
    assert v["kernel_targets"] == {"vs_fa2_varlen": 0.85, "vs_fa2_ok": True, "vs_padded_sdpa": 3.4, "vs_padded_sdpa_ok": True}
    assert v["e2e_targets"] == {"1": True, "256": False}
    assert v["memcheck"]["clean"] and not v["racecheck"]["clean"]
    assert v["gpu_tests"]["failures"] == 1 and v["gpu_tests"]["failed_names"] == ["tests.csrc.x::test_b"]
    text = summary.render(v)
    assert "NVIDIA H200" in text and "racecheck: 2 errors" in text and "FAILED tests.csrc.x::test_b" in text
    assert len(text.splitlines()) <= 30  # one screen
    assert summary.main([str(tmp_path)]) == 0 and (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("line, clean, errors", [
    ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)", True, 0),  # as on the H200
    ("========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warnings)", False, 2),
    ("========= ERROR SUMMARY: 0 errors", True, 0),
    ("smoke: rms_norm ok", False, None),  # no summary line: the tool did not finish
])
def test_sanitizer_summaries(tmp_path, line, clean, errors):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "racecheck.log").write_text(f"========= COMPUTE-SANITIZER\n{line}\n")
    assert summary.sanitizer(str(tmp_path), "racecheck") == {"errors": errors, "clean": clean}
