"""The engine reads the served model's own state at the end of each prefill (the length probe):
packed with other sequences it reads what a prompt alone gives, reading changes no token, and a
probe's prediction replaces the sequence's estimate."""
import numpy as np
import pytest

from lenserve.engine.sampling_params import SamplingParams
from lenserve.predictor.dataset import LengthRow
from lenserve.predictor.probe import collect_states, fit_probe

PROMPTS = ["Name a fruit.", "Write a long story about a dragon who learns to sing in a village choir.",
           "What is 2 + 2?", "List ten countries in Europe and their capitals, one per line."]


def test_packed_states_match_one_prompt_at_a_time(llm):
    eng = llm.engine
    alone = np.stack([collect_states(eng, [p], (10, 20), show_progress=False)[0] for p in PROMPTS])
    packed = collect_states(eng, PROMPTS, (10, 20), show_progress=False, max_in_flight=len(PROMPTS))
    assert packed.shape == (len(PROMPTS), 2 * eng.arch.hidden_size)
    one = collect_states(eng, PROMPTS[:1], (20,), show_progress=False)[0]  # layers side by side, in order
    # (to rounding: the prompt's blocks are now in the prefix cache, so its prefill runs fewer rows,
    # which quantized weights take through another kernel path)
    norm = np.linalg.norm(alone, axis=1)
    assert np.linalg.norm(one - alone[0, eng.arch.hidden_size:]) / norm[0] < 1e-3
    assert (np.linalg.norm(packed - alone, axis=1) / norm).max() < 1e-3
    # each prompt its own state (all end on the same chat header, so they are alike)
    gaps = [np.linalg.norm(packed[i] - packed[j]) / norm[i] for i in range(len(PROMPTS)) for j in range(i)]
    assert min(gaps) > 0.01 and min(gaps) > 20 * (np.linalg.norm(packed - alone, axis=1) / norm).max()
    assert eng.length_probe is None  # collect_states puts back what was there


def _greedy(eng, rid):
    eng.add_request(rid, PROMPTS[3], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    final = None
    while final is None:
        for out in eng.step():
            if out.finished:
                final = out
    return final.outputs[0].token_ids


def _probe_for(eng, layers=(10, 20)):
    states = collect_states(eng, PROMPTS, layers, show_progress=False)
    rows = [LengthRow(prompt_id=f"p{i}", model=eng.model_name, prompt_text=p, input_size=5,
                      output_sizes=[5 + 40 * i + j for j in range(10)]) for i, p in enumerate(PROMPTS * 3)]
    return fit_probe(np.concatenate([states] * 3), rows, eng.model_name, eng.arch.num_layers, layers, num_folds=3)


def test_a_probe_refines_the_estimate_and_changes_no_token(llm):
    eng = llm.engine
    probe = _probe_for(eng)
    without = _greedy(eng, "plain")
    eng.set_length_probe(probe)
    try:
        before = eng.scheduler.num_refinements_total
        eng.add_request("probed", PROMPTS[3], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        seq = eng.requests["probed"].seqs[0]
        assert seq.estimate is None
        eng.step()  # the prefill, and the first token
        assert eng.scheduler.num_refinements_total == before + 1
        expected = probe.predict_states(collect_states(eng, [PROMPTS[3]], (10, 20), show_progress=False), [12])[0]
        assert seq.estimate is not None and seq.estimate.mean == pytest.approx(expected.mean, rel=1e-3)
        eng.abort_request("probed")
        eng.take_pending_finished()
        assert _greedy(eng, "with-probe") == without
        [record] = eng.last_stats.finished
        assert record.refined_tokens == pytest.approx(min(expected.mean, 12), rel=1e-3)  # for the metrics
    finally:
        eng.set_length_probe(None)


def test_a_probe_of_another_model_is_refused(llm):
    eng = llm.engine
    probe = _probe_for(eng)
    probe.model = "another-model"
    with pytest.raises(ValueError, match="cannot read"):
        eng.set_length_probe(probe)
    assert eng.length_probe is None
