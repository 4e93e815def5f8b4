"""`LLMEngine.finish_completion`: ending one completion of a request while its siblings go on."""
import pytest

from lenserve.engine.sampling_params import SamplingParams

PARAMS = SamplingParams(n=3, temperature=0.8, top_p=0.95, max_tokens=24, seed=7, ignore_eos=True)


def _run(eng, request_id, stop_index=None, stop_after=None):
    eng.add_request(request_id, "List three colours.", PARAMS)
    final, steps = None, 0
    while final is None:
        for out in eng.step():
            if out.finished:
                final = out
        steps += 1
        if stop_index is not None and steps == stop_after and final is None:
            assert eng.finish_completion(request_id, stop_index) is None  # the others still run
    return final


def test_one_completion_ends_and_the_others_are_untouched(llm):
    eng = llm.engine
    ref = _run(eng, "ref")
    out = _run(eng, "cut", stop_index=1, stop_after=6)
    assert out.outputs[1].finish_reason == "stop"
    assert out.outputs[1].token_ids == ref.outputs[1].token_ids[:len(out.outputs[1].token_ids)]
    assert 1 <= len(out.outputs[1].token_ids) < PARAMS.max_tokens
    for i in (0, 2):  # seeded per completion: the siblings sample the very same tokens
        assert out.outputs[i].token_ids == ref.outputs[i].token_ids
        assert out.outputs[i].finish_reason == "length"


def test_finishing_the_last_completion_returns_the_final_output(llm):
    eng = llm.engine
    eng.add_request("all", "Name a fruit.", PARAMS)
    for _ in range(3):
        eng.step()
    assert eng.finish_completion("all", 0) is None
    assert eng.finish_completion("all", 0) is None  # already finished: nothing happens
    assert eng.finish_completion("all", 2) is None
    final = eng.finish_completion("all", 1)
    assert final is not None and final.finished and final.request_id == "all"
    assert [o.finish_reason for o in final.outputs] == ["stop"] * 3
    assert not eng.has_unfinished_requests()  # and the fixture checks every block is free
    record = eng.take_pending_finished()[-1]  # the metrics hear of it like any finished request
    assert record.finish_reason == "stop" and record.num_generation_tokens == sum(len(o.token_ids) for o in final.outputs)


def test_unknown_request_or_index(llm):
    eng = llm.engine
    with pytest.raises(KeyError):
        eng.finish_completion("nope", 0)
    eng.add_request("one", "Hi", SamplingParams(max_tokens=4))
    with pytest.raises(KeyError, match="no completion 3"):
        eng.finish_completion("one", 3)
    eng.abort_request("one")
