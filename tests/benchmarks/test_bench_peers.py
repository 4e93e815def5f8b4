"""bench_peers' interleaved rounds: each ratio pairs the two servers' rows of the same round and
level (measured back to back), and the median over rounds is what the criteria read."""
from __future__ import annotations

import pytest

from benchmarks import bench_peers


def _row(streams: int, rnd: int, tok_s: float, ttft: float) -> dict:
    return {"streams": streams, "round": rnd, "tok_s": tok_s, "ttft_p50_s": ttft}


def test_ratios_pair_rows_by_round_and_level_then_take_the_median():
    # the machine slows down in round 1 for both servers alike: per-round ratios stay 2.0 / 2.0 / 3.0
    ours = [_row(8, 0, 200.0, 1.0), _row(8, 1, 100.0, 2.0), _row(8, 2, 300.0, 0.5), _row(1, 0, 90.0, 0.1)]
    peer = [_row(8, 2, 100.0, 2.0), _row(8, 1, 50.0, 4.0), _row(8, 0, 100.0, 2.0), _row(1, 0, 60.0, 0.4)]
    r = bench_peers._ratios(ours, peer, [1, 8])
    assert r["8"]["tok_s_by_round"] == [2.0, 2.0, 3.0]
    assert r["8"]["tok_s"] == 2.0 and r["8"]["ttft_p50"] == 0.5
    assert r["1"] == {"tok_s": 1.5, "ttft_p50": 0.25, "tok_s_by_round": [1.5]}
    assert bench_peers._median_by_level(peer, "tok_s") == {8: 100.0, 1: 60.0}


def test_every_level_and_round_gets_fresh_prompts():
    # 1 stream sends 3 requests, the others one per stream; plus one prompt for the warm-ups
    assert bench_peers._requests_per_round([1, 8, 32]) == 43
    with pytest.raises(ValueError, match="take 87 prompts, got 64"):
        bench_peers._serve_all({}, [1, 8, 32], [[1]] * 64, 8, rounds=2)
