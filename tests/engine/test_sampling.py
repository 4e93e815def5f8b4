"""Sampling parameters, stop conditions, logprobs, n, seeds."""
import math

import pytest

from lenserve import SamplingParams


def test_seeded_sampling_independent_of_batch(llm):
    p = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234)
    alone = llm.generate("Write a short poem about the sea.", p)[0]
    others = [f"Tell me about topic number {i}." for i in range(6)]
    mixed = llm.generate(others[:3] + ["Write a short poem about the sea."] + others[3:],
                         [SamplingParams(max_tokens=20, temperature=1.0)] * 3 + [p] + [SamplingParams(max_tokens=20, temperature=1.0)] * 3)
    assert mixed[3].token_ids == alone.token_ids


def test_top_k_one_equals_greedy(llm):
    greedy = llm.generate("List three fruits:", SamplingParams(max_tokens=12, temperature=0))[0]
    topk1 = llm.generate("List three fruits:", SamplingParams(max_tokens=12, temperature=1.0, top_k=1, seed=3))[0]
    assert greedy.token_ids == topk1.token_ids


def test_temperature_sampling_varies_and_n(llm):
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=16, temperature=1.2, n=4, seed=7))[0]
    assert len(out.outputs) == 4
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    again = llm.generate("Once upon a time", SamplingParams(max_tokens=16, temperature=1.2, n=4, seed=7))[0]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in again.outputs]


def _num_repeats(prompt_ids, out_ids):
    seen, repeats = set(prompt_ids), 0
    for t in out_ids:
        repeats += t in seen
        seen.add(t)
    return repeats


def test_penalties_reduce_repeats(llm):
    prompt = "one one one one one one one one"
    plain = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0]
    for kwargs in (dict(repetition_penalty=1.8), dict(frequency_penalty=1.5), dict(presence_penalty=1.5)):
        penalized = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, **kwargs))[0]
        assert _num_repeats(penalized.prompt_token_ids, penalized.token_ids) < _num_repeats(plain.prompt_token_ids, plain.token_ids), kwargs


def test_stop_string_and_stop_token_ids(llm):
    base = llm.generate("Count: 1, 2, 3, 4, 5,", SamplingParams(max_tokens=20, temperature=0))[0]
    assert " 8" in base.text
    stopped = llm.generate("Count: 1, 2, 3, 4, 5,", SamplingParams(max_tokens=20, temperature=0, stop=[" 8"]))[0]
    assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason == " 8"
    assert stopped.text == base.text[: base.text.index(" 8")]
    tok_id = base.token_ids[2]
    by_id = llm.generate("Count: 1, 2, 3, 4, 5,", SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[tok_id]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids[-1] == tok_id and len(by_id.token_ids) <= 3


def test_eos_min_tokens_ignore_eos(llm):
    chat = [{"role": "user", "content": "Say hi."}]
    natural = llm.chat(chat, SamplingParams(max_tokens=200, temperature=0))[0]
    assert natural.finish_reason == "stop" and natural.token_ids[-1] == llm.tokenizer.eos_token_id
    n = len(natural.token_ids)
    longer = llm.chat(chat, SamplingParams(max_tokens=200, temperature=0, min_tokens=n + 5))[0]
    assert len(longer.token_ids) >= n + 5
    forced = llm.chat(chat, SamplingParams(max_tokens=n + 10, temperature=0, ignore_eos=True))[0]
    assert forced.finish_reason == "length" and len(forced.token_ids) == n + 10


def test_logprobs_are_log_probabilities(llm):
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=5, temperature=0, logprobs=5))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 5
    for tok, lp in zip(out.token_ids, lps):
        assert lp.token_id == tok and lp.top[0][0] == tok  # greedy picks the top token
        assert lp.logprob <= 0 and abs(lp.logprob - lp.top[0][1]) < 1e-6
        assert len(lp.top) == 5 and sum(math.exp(v) for _, v in lp.top) <= 1.0 + 1e-5
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_max_tokens_none_fills_context(llm):
    p = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    n = llm.engine.max_model_len
    ids = list(range(100, 100 + n - 3))
    out = llm.generate([ids], p)[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_cpu_argmax_equals_torchs():
    """The sampler's CPU argmax (numpy's) gives torch.argmax's ids: the first of equal maxima,
    NaN as the largest, strided rows, float64, inference tensors."""
    import torch

    from lenserve.engine.sampler import _argmax

    x = torch.randn(6, 49152)
    x[1, 3] = x[1, 7] = float("nan")
    x[2, :] = 1.0
    x[3, 10] = x[3, 20] = 100.0
    x[4, -1] = float("inf")
    for t in (x, x[:, ::3], x.double(), x[2:4]):
        got = _argmax(t)
        assert got.dtype == torch.int64 and torch.equal(got, t.argmax(dim=-1))
    with torch.inference_mode():
        y = torch.randn(3, 1000)
        assert torch.equal(_argmax(y), y.argmax(dim=-1))
