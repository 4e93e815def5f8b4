import pytest

from lenserve.traces.replay import parse_server_metrics
from lenserve.traces.report import build_report, latency_stats, meets_slo, rate_series, render_markdown, token_times_s, tpot_s


def test_latency_stats_on_known_values():
    stats = latency_stats([float(x) for x in range(1, 101)])  # 1..100
    assert stats["mean"] == 50.5
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert latency_stats([]) is None
    assert latency_stats([None, 2.0]) == {"mean": 2.0, "p50": 2.0, "p90": 2.0, "p99": 2.0}


def test_tpot():
    assert tpot_s(1.0, 0.2, 5) == pytest.approx(0.2)
    assert tpot_s(1.0, 0.2, 1) is None
    assert tpot_s(None, 0.2, 5) is None


def record(sent, ttft, itl, ok=True, status=200, prompt_tokens=10, server_prompt=10, lag=0.001):
    e2e = ttft + sum(itl) if ok else None
    n = len(itl) + 1 if ok else 0
    return {
        "sent_s": sent,
        "send_lag_s": lag,
        "end_s": sent + (e2e if ok else 0.5),
        "ok": ok,
        "status": status,
        "ttft_s": ttft if ok else None,
        "itl_s": itl if ok else [],
        "e2e_s": e2e,
        "tpot_s": tpot_s(e2e, ttft, n) if ok else None,
        "output_tokens": n,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_server": server_prompt,
    }


def test_build_report_on_known_records():
    records = [
        record(0.0, 0.5, [0.05, 0.05, 0.05, 0.05], lag=0.001),  # 5 tokens, TPOT 0.05, meets both SLOs
        record(1.0, 2.0, [0.05], lag=0.002),  # TTFT over the SLO
        record(2.0, 0.1, [0.3, 0.3], lag=0.003, server_prompt=11),  # TPOT 0.3 over the SLO
        record(3.0, 0.2, [], lag=0.004),  # one token: no TPOT, meets
        record(3.5, 0, [], ok=False, status=500, lag=0.005),
        record(3.6, 0, [], ok=False, status="timeout", lag=0.006),
        record(3.7, 0, [], ok=False, status=500, lag=0.007),
    ]
    report = build_report(records, slo_ttft_s=1.0, slo_tpot_s=0.1)
    assert report["num_requests"] == 7 and report["num_completed"] == 4 and report["num_failed"] == 3
    assert report["failures_by_status"] == {"500": 2, "timeout": 1}
    # span: first send 0.0 .. last end max(0.7, 3.05, 2.7, 3.2, 4.0, 4.1, 4.2) = 4.2
    assert report["duration_s"] == pytest.approx(4.2)
    assert report["throughput_req_s"] == pytest.approx(4 / 4.2)
    assert report["throughput_tok_s"] == pytest.approx((5 + 2 + 3 + 1) / 4.2)
    assert report["goodput_req_s"] == pytest.approx(2 / 4.2)
    assert report["ttft_s"]["mean"] == pytest.approx((0.5 + 2.0 + 0.1 + 0.2) / 4)
    assert report["tpot_s"]["p50"] == pytest.approx(0.05)  # 0.05, 0.05, 0.3: the three with >= 2 tokens
    assert report["tpot_s"]["mean"] == pytest.approx(0.4 / 3)
    assert report["itl_s"]["p50"] == pytest.approx(0.05)
    assert report["send_lag_s"]["p50"] == pytest.approx(0.004)
    assert report["send_lag_s"]["p99"] == pytest.approx(0.00694)
    assert report["num_prompt_tokens_mismatched"] == 1
    md = render_markdown(report, ["latency_cdf.png"])
    assert "4 completed, 3 failed (500: 2, timeout: 1)" in md and "![latency_cdf](latency_cdf.png)" in md


def test_report_with_no_completed_request():
    report = build_report([record(0.0, 0, [], ok=False, status="ConnectError")], 1.0, 0.1)
    assert report["num_completed"] == 0 and report["ttft_s"] is None and report["throughput_req_s"] == 0.0
    assert "–" in render_markdown(report)


def test_meets_slo_boundaries():
    assert meets_slo({"ok": True, "ttft_s": 1.0, "tpot_s": 0.1}, 1.0, 0.1)
    assert not meets_slo({"ok": True, "ttft_s": 1.0001, "tpot_s": 0.1}, 1.0, 0.1)
    assert not meets_slo({"ok": False, "ttft_s": 0.1, "tpot_s": 0.01}, 1.0, 0.1)


def test_rate_series_bins_events_per_second():
    t, rate = rate_series([0.1, 0.2, 1.5, 3.9], bin_s=1.0, end_s=4.0)
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert rate.tolist() == [2.0, 1.0, 0.0, 1.0]
    t, rate = rate_series([0.1, 0.2, 0.3], bin_s=0.5)
    assert rate.tolist() == [6.0]


def test_token_times():
    assert token_times_s({"sent_s": 1.0, "ttft_s": 0.5, "itl_s": [0.25, 0.25]}) == [1.5, 1.75, 2.0]
    assert token_times_s({"sent_s": 1.0, "ttft_s": None}) == []


def test_parse_server_metrics_sums_labels_and_tolerates_missing():
    text = (
        "# HELP lenserve:num_requests_running Requests running.\n"
        "# TYPE lenserve:num_requests_running gauge\n"
        'lenserve:num_requests_running{model_name="a"} 3.0\n'
        'lenserve:num_requests_running{model_name="b"} 2.0\n'
        "# TYPE lenserve:time_to_first_token_seconds histogram\n"
        'lenserve:time_to_first_token_seconds_bucket{le="0.1"} 4.0\n'
        "lenserve:kv_cache_usage_perc 0.5\n"
    )
    assert parse_server_metrics(text) == {"num_requests_running": 5.0, "num_requests_waiting": None, "kv_cache_usage_perc": 0.5}
    assert parse_server_metrics("not prometheus {") == {"num_requests_running": None, "num_requests_waiting": None, "kv_cache_usage_perc": None}
