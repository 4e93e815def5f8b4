"""The packed, continuously batched engine produces the tokens of one-sequence-at-a-time runs."""
import pytest

from lenserve import LLM, SamplingParams

from .helpers import check_logprobs_close

GREEDY = dict(temperature=0.0, logprobs=5, ignore_eos=True)


def _prompts(tok, texts, lengths):
    pool = tok.encode("\n\n".join(texts))
    out = []
    for i, n in enumerate(lengths):
        start = (i * 97) % (len(pool) - n)
        out.append(pool[start : start + n])
    return out


def _alone(engine, prompt, params):
    engine.add_request("alone", prompt, params)
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                return o.outputs[0]


def _staggered(engine, prompts, params_for, every=2):
    """Adds prompt i at step every*i while the others run; returns outputs by index."""
    results, step, nxt = {}, 0, 0
    while nxt < len(prompts) or engine.has_unfinished_requests():
        while nxt < len(prompts) and step >= every * nxt:
            engine.add_request(f"r{nxt}", prompts[nxt], params_for(nxt))
            nxt += 1
        for o in engine.step():
            if o.finished:
                results[int(o.request_id[1:])] = o.outputs[0]
        step += 1
    return results


@pytest.fixture(scope="module")
def engine_no_prefix():
    return LLM(max_num_seqs=32, max_num_batched_tokens=1024, enable_prefix_caching=False).engine


def test_continuous_batching_equals_alone(engine_no_prefix, test_prompts):
    eng = engine_no_prefix
    lengths = [1, 2, 7, 13, 31, 64, 97, 128, 200, 257, 333, 511, 640, 777, 1024, 1500, 5, 45]
    prompts = _prompts(eng.tokenizer, test_prompts[:200], lengths)
    params_for = lambda i: SamplingParams(max_tokens=12 + (i % 5) * 4, **GREEDY)
    batched = _staggered(eng, prompts, params_for)
    # max_num_batched_tokens=1024 forces the 1,500- and 1,024-token prompts through chunked prefill.
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    diverged = 0
    for i, p in enumerate(prompts):
        alone = _alone(eng, p, params_for(i))
        b = batched[i]
        assert len(b.token_ids) == params_for(i).max_tokens
        at = check_logprobs_close(alone.token_ids, alone.logprobs, b.token_ids, b.logprobs, "alone", "batched")
        diverged += at is not None
    assert diverged <= 2, f"{diverged} of {len(prompts)} sequences diverged (near ties allowed, but not many)"


def test_padded_mode_gives_same_tokens(engine_no_prefix, test_prompts):
    padded = LLM(max_num_seqs=16, attention="padded", enable_prefix_caching=False).engine
    lengths = [1, 9, 40, 150, 3, 77]
    prompts = _prompts(padded.tokenizer, test_prompts[200:260], lengths)
    params_for = lambda i: SamplingParams(max_tokens=10, **GREEDY)
    out_padded = _staggered(padded, prompts, params_for, every=1)
    out_packed = _staggered(engine_no_prefix, prompts, params_for, every=1)
    assert padded.last_stats.padding_ratio >= 0.0
    for i in range(len(prompts)):
        a, b = out_packed[i], out_padded[i]
        check_logprobs_close(a.token_ids, a.logprobs, b.token_ids, b.logprobs, "packed", "padded")


def test_preemption_by_recompute_keeps_tokens(test_prompts):
    """A KV cache too small for everyone forces preemptions; outputs still equal the unconstrained run."""
    small = LLM(max_num_seqs=8, kv_cache_memory_gb=0.011, enable_prefix_caching=False).engine  # ~60 blocks
    big = LLM(max_num_seqs=8, enable_prefix_caching=False).engine
    prompts = _prompts(small.tokenizer, test_prompts[300:340], [60, 90, 120, 70, 100, 80])
    params_for = lambda i: SamplingParams(max_tokens=48, **GREEDY)
    out_small = _staggered(small, prompts, params_for, every=0)
    assert small.scheduler.num_preemptions_total > 0
    out_big = _staggered(big, prompts, params_for, every=0)
    for i in range(len(prompts)):
        a, b = out_big[i], out_small[i]
        check_logprobs_close(a.token_ids, a.logprobs, b.token_ids, b.logprobs, "roomy", "preempted")
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks


def test_prefix_cache_reuse_gives_same_tokens(llm, test_prompts):
    eng = llm.engine
    prompt = eng.tokenizer.encode(test_prompts[400] + "\n" + test_prompts[401])[:300]
    params = SamplingParams(max_tokens=16, **GREEDY)
    first = _alone(eng, prompt, params)
    hits_before = eng.block_manager.num_prefix_hit_tokens
    second = _alone(eng, prompt, params)
    assert eng.block_manager.num_prefix_hit_tokens - hits_before >= 256
    check_logprobs_close(first.token_ids, first.logprobs, second.token_ids, second.logprobs, "cold", "cached")


def test_abort_frees_blocks_mid_run(llm):
    eng = llm.engine
    idle = eng.block_manager.num_free_blocks
    for i in range(6):
        eng.add_request(f"ab{i}", list(range(10 + i, 300 + i)), SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.block_manager.num_free_blocks < idle
    for i in range(6):
        assert eng.abort_request(f"ab{i}")
    assert not eng.abort_request("ab0")
    assert not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == idle
