"""Bad input raises ValueError naming the field and the limit."""
import pytest

from lenserve import SamplingParams


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_tokens=0), "max_tokens must be at least 1"),
        (dict(max_tokens=-5), "max_tokens must be at least 1"),
        (dict(temperature=-0.1), "temperature must be at least 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-3), "top_k"),
        (dict(n=0), "n must be an integer"),
        (dict(min_p=2.0), "min_p"),
        (dict(logprobs=99), "logprobs must be in"),
        (dict(min_tokens=10, max_tokens=5), "min_tokens must be at most max_tokens"),
        (dict(stop=[""]), "stop string"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_requests_against_model(llm):
    eng = llm.engine
    ctx = eng.max_model_len
    with pytest.raises(ValueError, match="prompt must not be empty"):
        eng.add_request("e1", "", SamplingParams())
    with pytest.raises(ValueError, match="prompt must not be empty"):
        eng.add_request("e2", [], SamplingParams())
    with pytest.raises(ValueError, match=f"context is {ctx}"):
        eng.add_request("e3", [5] * ctx, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=rf"max_tokens \(100\) exceeds the model's context of {ctx}"):
        eng.add_request("e4", [5] * (ctx - 50), SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="stop_token_ids must be below the vocabulary size 49152"):
        eng.add_request("e5", "hi", SamplingParams(stop_token_ids=[10**6]))
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 49152\)"):
        eng.add_request("e6", [1, 2, 999999], SamplingParams())
    eng.add_request("dup", "hi", SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="duplicate request_id"):
        eng.add_request("dup", "hi", SamplingParams(max_tokens=1))
    eng.abort_request("dup")
    assert not eng.has_unfinished_requests()
