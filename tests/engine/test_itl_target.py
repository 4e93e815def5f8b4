"""The engine under an inter-token latency target: small prompt chunks beside running decodes, the
same tokens as one sequence at a time, and the step statistics the metrics report."""
import pytest

from lenserve import LLM, SamplingParams
from lenserve.scheduler.cost_model import CostModel, OnlineCostModel
from lenserve.scheduler.step_budget import growth_factor, stall_weight

from .helpers import check_logprobs_close
from .test_batching import GREEDY, _alone, _prompts

MIN_CHUNK = 24
# A step cost model that does not depend on this machine's speed: 10 ms a step and 1 ms a token,
# so under a 50 ms target a step holds 40 tokens, whatever decodes it carries.
FIXED_COST = CostModel(step_base_s=0.01, token_s=0.001, sample_s=0.0, prefill_attention_s=0.0, decode_context_s=0.0)
BUDGET = 40


@pytest.fixture(scope="module")
def tight():
    return LLM(max_num_seqs=16, max_num_batched_tokens=1024, enable_prefix_caching=False, target_itl_ms=50.0,
               min_prefill_chunk=MIN_CHUNK).engine


def test_engine_refits_its_cost_model_from_its_steps(tight):
    eng = tight
    assert eng.scheduler.config.target_itl_s == pytest.approx(0.05)
    assert isinstance(eng.scheduler.cost_model, OnlineCostModel)
    eng.add_request("warm", [1, 2, 3, 4, 5] * 20, SamplingParams(max_tokens=40, **GREEDY))
    steps = 0
    while eng.has_unfinished_requests():
        model = eng.cost_model.model  # the model that prices the step about to run
        eng.step()
        steps += 1
        st = eng.last_stats
        # each step's measured over predicted time, under the model it was sized with (/metrics'
        # lenserve:step_time_over_predicted; `lenserve simulate --from-server` replays the scatter)
        f = {"num_tokens": st.num_batched_tokens, "num_sampled": 1, "prefill_pairs": 0.0, "decode_context": 0}
        if st.num_batched_tokens == 1:
            f["decode_context"] = eng.scheduler.running[0].num_computed_tokens if eng.scheduler.running else 0
        if st.num_batched_tokens == 1 and eng.scheduler.running:
            assert st.step_time_over_predicted == pytest.approx(st.step_time_s / model.step_time(**f))
        assert st.step_time_over_predicted is not None and st.step_time_over_predicted > 0
    assert eng.cost_model.num_observed == steps and eng.cost_model.num_refits >= 2
    assert eng.cost_model.model.step_time(1, 1, 0, 100) > 0


def test_decodes_run_beside_chunks_and_tokens_equal_alone(tight, llm, test_prompts, monkeypatch):
    eng = tight
    monkeypatch.setattr(eng.scheduler, "cost_model", FIXED_COST)
    prompts = _prompts(eng.tokenizer, test_prompts[500:600], [40, 700, 9, 300])
    params = SamplingParams(max_tokens=10, **GREEDY)
    results, steps = {}, []
    nxt = 0
    while nxt < len(prompts) or eng.has_unfinished_requests():
        if nxt < len(prompts) and len(steps) >= 3 * nxt:
            eng.add_request(f"r{nxt}", prompts[nxt], params)
            nxt += 1
        decoding = [s for s in eng.scheduler.running if s.num_tokens - s.num_computed_tokens == 1]
        # 50 ms (stretched for streams about to end) less 10 ms and 1 ms a decode, at 1 ms a token
        expected = len(decoding) + int(round((0.05 * growth_factor(stall_weight(decoding)) - 0.01 - 0.001 * len(decoding)) / 0.001, 6))
        for o in eng.step():
            if o.finished:
                results[int(o.request_id[1:])] = o.outputs[0]
        st = eng.last_stats
        steps.append((len(decoding), st.num_batched_tokens, st.token_budget, expected))
    with_decodes = [(d, n, b, e) for d, n, b, e in steps if d and n > d]
    assert with_decodes, "no step had a prompt chunk beside decodes"
    for d, n, budget, expected in with_decodes:
        assert budget == expected and n <= budget
        assert BUDGET <= budget <= 50 * 1.25 - 10  # the stretch is at most 1.25x the 50 ms
    assert any(n > 1.25 * BUDGET for d, n, _, _ in steps if d == 0)  # no decode running: the cap
    for i, p in enumerate(prompts):
        ref = _alone(llm.engine, p, params)
        check_logprobs_close(ref.token_ids, ref.logprobs, results[i].token_ids, results[i].logprobs, "alone", "itl-target")
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_itl_misses_are_counted_against_the_target(tight, monkeypatch):
    eng = tight
    monkeypatch.setattr(eng.scheduler.config, "target_itl_s", 1e-6)  # below any step here
    eng.add_request("m", [1, 2, 3, 4, 5], SamplingParams(max_tokens=6, **GREEDY))
    misses = gaps = 0
    while eng.has_unfinished_requests():
        eng.step()
        misses += eng.last_stats.num_itl_target_misses
        gaps += len(eng.last_stats.inter_token_latencies_s)
    assert gaps == 5 and misses == 5  # every gap is longer than 1 ms


def test_target_off_and_auto():
    from lenserve.config import TARGET_ITL_MS, EngineConfig, resolve_target_itl_s

    assert resolve_target_itl_s(None, "cpu") is None and resolve_target_itl_s(0, "cpu") is None
    assert resolve_target_itl_s("auto", "cpu") == TARGET_ITL_MS["cpu"] / 1000
    assert resolve_target_itl_s("auto", "cuda") == TARGET_ITL_MS["cuda"] / 1000
    assert resolve_target_itl_s(120, "cuda") == pytest.approx(0.12)
    for bad in ("fast", -5):
        with pytest.raises(ValueError, match="target_itl_ms"):
            EngineConfig(target_itl_ms=bad)


def test_serving_engine_refits_without_importing_scipy():
    """The online refit is numpy-only: scipy.optimize costs a serving process ~20-40 MiB resident
    and ~1 s to import (a gap in every stream if it came at the first refit)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from lenserve import LLM, SamplingParams\n"
        "llm = LLM(model='random:tiny', max_num_seqs=4, target_itl_ms=100.0)\n"
        "llm.generate([[1, 2, 3]] * 3, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))\n"
        "assert llm.engine.cost_model.num_refits >= 2, llm.engine.cost_model.num_refits\n"
        "print(sorted(m for m in sys.modules if m.startswith('scipy')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
