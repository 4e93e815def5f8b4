"""Prefix structure of traces: block ids of multi-turn sessions (synthetic and from BurstGPT v3
session ids), and the hit rate of one shared cache over them."""
import numpy as np
import pytest

from lenserve.traces.sessions import MultiTurnConfig, num_blocks, session_block_ids, shared_cache_hit_rate, synthesize_multiturn
from lenserve.traces.trace import Trace, TraceRequest


def _by_session(trace):
    out = {}
    for r in trace:
        out.setdefault(r.session_id, []).append(r)
    return out


def test_each_turn_extends_the_previous_prompt_and_answer():
    cfg = MultiTurnConfig(num_sessions=60, mean_turns=4, block_tokens=16, system_tokens=64, max_prompt_tokens=100_000, seed=3)
    trace = synthesize_multiturn(cfg)
    assert trace.meta["block_tokens"] == 16 and len(trace) > 60
    multi = 0
    for turns in _by_session(trace).values():
        for prev, cur in zip(turns, turns[1:]):
            multi += 1
            assert cur.arrival_s >= prev.arrival_s + cfg.min_gap_s
            assert cur.prompt_tokens > prev.prompt_tokens + prev.output_tokens  # + a new message
            # every whole block of the previous prompt and answer is shared, in place
            shared = (prev.prompt_tokens + prev.output_tokens) // 16
            assert cur.hash_ids[:shared] == prev.hash_ids[:shared] or prev.hash_ids == cur.hash_ids[: len(prev.hash_ids)]
            assert cur.hash_ids[: (prev.prompt_tokens // 16)] == prev.hash_ids[: (prev.prompt_tokens // 16)]
        for r in turns:
            assert len(r.hash_ids) == num_blocks(r.prompt_tokens, 16)
    assert multi > 50
    # sessions share their system prompt's 4 blocks, and nothing else
    firsts = [turns[0].hash_ids for turns in _by_session(trace).values()]
    assert len({ids[:4] for ids in firsts}) <= cfg.num_system_prompts
    assert len({ids[4] for ids in firsts if len(ids) > 4}) == sum(1 for ids in firsts if len(ids) > 4)


def test_a_conversation_past_the_context_starts_a_new_chain():
    cfg = MultiTurnConfig(num_sessions=40, mean_turns=12, block_tokens=16, system_tokens=32, max_prompt_tokens=600, seed=1)
    trace = synthesize_multiturn(cfg)
    assert max(r.prompt_tokens for r in trace) <= 600
    restarts = sum(1 for turns in _by_session(trace).values() for a, b in zip(turns, turns[1:]) if b.prompt_tokens < a.prompt_tokens)
    assert restarts > 0


def test_burstgpt_sessions_give_block_ids():
    reqs = [
        TraceRequest(0.0, 40, 20, "ChatGPT", "a"),
        TraceRequest(1.0, 100, 5, "ChatGPT", "b"),
        TraceRequest(2.0, 90, 10, "ChatGPT", "a"),  # 90 >= 40 + 20: continues a
        TraceRequest(3.0, 30, 10, "ChatGPT", "a"),  # shorter than a's history: a new chat
        TraceRequest(4.0, 50, 10, "ChatGPT", None),
    ]
    trace = session_block_ids(Trace(reqs), block_tokens=16)
    ids = [r.hash_ids for r in trace]
    assert trace.meta["block_tokens"] == 16
    assert [len(x) for x in ids] == [3, 7, 6, 2, 4]
    assert ids[2][:3] == ids[0]
    assert not set(ids[3]) & set(ids[2]) and not set(ids[1]) & set(ids[0])
    with pytest.raises(ValueError, match="session"):
        session_block_ids(Trace([TraceRequest(0.0, 5, 5)]))


def test_shared_cache_hit_rate_counts_whole_cached_blocks():
    reqs = [TraceRequest(0.0, 64, 1, hash_ids=(1, 2, 3, 4)), TraceRequest(1.0, 64, 1, hash_ids=(1, 2, 5, 6))]
    trace = Trace(reqs, meta={"block_tokens": 16})
    assert shared_cache_hit_rate(trace) == pytest.approx(32 / 128)
    # room for one block: the first request's head, kept over its tail, still serves the second
    assert shared_cache_hit_rate(trace, capacity_tokens=16) == pytest.approx(16 / 128)


def test_mooncake_loader_records_its_block_size(tmp_path):
    from lenserve.traces.loaders import load_mooncake

    p = tmp_path / "t.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]}\n')
    trace = load_mooncake(p)
    assert trace.meta["block_tokens"] == 512 and trace[0].hash_ids == (0, 1)
