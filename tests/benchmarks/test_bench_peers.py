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


def test_huge_page_reading_reports_its_backing_and_frees_the_buffer():
    if not hasattr(__import__("mmap"), "MADV_HUGEPAGE"):
        pytest.skip("no MADV_HUGEPAGE here")
    vm = lambda: [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize")][0]  # noqa: E731
    bench_peers._read_bandwidth_huge_pages(64 << 20)  # the first call also starts torch's threads
    before = vm()
    r = bench_peers._read_bandwidth_huge_pages(64 << 20)
    assert r is not None and r["gb_s"] > 0 and 0.0 <= r["huge_page_fraction"] <= 1.0
    assert vm() - before < 32 << 10, "the 64 MiB mapping is unmapped on return"  # kB


def test_hot_cache_attention_scales_with_layers_context_and_threads():
    torch = pytest.importorskip("torch")
    from lenserve.engine._ext import has_op

    if not has_op("paged_decode_attention", "cpu"):
        pytest.skip("lenserve._C not built")
    from lenserve.config import EngineConfig
    from lenserve.engine.llm_engine import LLMEngine

    eng = LLMEngine(EngineConfig(model="random:tiny", device="cpu", max_model_len=256, kv_cache_memory_gb=0.01))
    threads = torch.get_num_threads()
    one = bench_peers._hot_cache_attention(eng, 200, threads=1, reps=20)
    two = bench_peers._hot_cache_attention(eng, 200, threads=2, reps=20)
    assert torch.get_num_threads() == threads, "the thread count is restored"
    assert one["context"] == 200 and one["ms_per_token"] > 0
    # per token: every layer's one-thread time (less an empty op call), split over the threads
    assert one["ms_per_token"] <= one["layer_ms_one_thread"] * len(eng.model.layers) + 1e-3
    assert two["ms_per_token"] < one["ms_per_token"]


def test_plot_draws_a_run_and_an_older_one(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"streams": s, "round": r, "tok_s": 100.0 * s ** 0.5 + r, "ttft_p50_s": 0.1 * s} for s in (1, 8) for r in range(2)]
    native = {"decode_batch1_tok_s": 280.0, "weight_bytes": 96_000_000,
              "hot_cache_linears": {"ms_per_token": 1.8}, "hot_cache_attention": {"ms_per_token": 0.3}}
    result = {"servers": {"lenserve_native": rows, "llama_server": rows}, "offline": {"native": native}, "gguf": "m.gguf",
              "machine": {"cpu": "cpu", "cores": 2}, "read_bandwidth_gb_s": 60.0, "decode_bound_tok_s": 625.0,
              "read_bandwidth_readings_gb_s": [{"4k_pages_gb_s": 50.0, "huge_pages_gb_s": 60.0, "huge_page_fraction": 1.0}]}
    bench_peers.plot(result, str(tmp_path / "new.png"))
    # runs 1-9: readings as plain numbers, no attention reference
    del native["hot_cache_attention"]
    bench_peers.plot(dict(result, read_bandwidth_readings_gb_s=[33.0, 50.0]), str(tmp_path / "old.png"))
    for name in ("new.png", "old.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
