import numpy as np
import pytest

from lenserve.traces.trace import Trace, TraceColumns, TraceRequest


def make(arrivals, **kw):
    return Trace([TraceRequest(a, 10 + i, 5 + i, **kw) for i, a in enumerate(arrivals)], name="t")


def test_requests_are_sorted_and_columns_match():
    trace = make([3.0, 1.0, 2.0])
    assert [r.arrival_s for r in trace] == [1.0, 2.0, 3.0]
    assert trace.columns.arrival_s.tolist() == [1.0, 2.0, 3.0]
    assert trace.columns.prompt_tokens.tolist() == [11, 12, 10]
    assert len(trace) == 3 and trace.duration_s == 2.0


def test_columns_round_trip_to_requests():
    requests = [
        TraceRequest(0.0, 5, 1, "ChatGPT", "s1"),
        TraceRequest(1.5, 6, 0, "GPT-4", None, failed=True),
        TraceRequest(2.0, 7, 3, "ChatGPT", "s2", hash_ids=(1, 2)),
    ]
    columns = TraceColumns.from_requests(requests)
    assert columns.model_names == ("ChatGPT", "GPT-4")
    assert Trace.from_columns(columns).requests == requests


def test_from_columns_sorts_by_arrival():
    columns = TraceColumns(
        arrival_s=np.array([2.0, 0.0, 1.0]),
        prompt_tokens=np.array([1, 2, 3]),
        output_tokens=np.array([4, 5, 6]),
        failed=np.zeros(3, bool),
        model_index=np.zeros(3, np.int32),
        model_names=("m",),
    )
    trace = Trace.from_columns(columns)
    assert [r.prompt_tokens for r in trace] == [2, 3, 1]


def test_window_is_half_open_in_trace_seconds():
    trace = make([0.0, 10.0, 20.0, 30.0, 40.0])
    window = trace.window(10.0, 20.0)
    assert [r.arrival_s for r in window] == [10.0, 20.0]
    assert window.origin_s == 10.0
    assert [r.arrival_s for r in trace.window(25.0)] == [30.0, 40.0]
    with pytest.raises(ValueError, match="duration"):
        trace.window(0.0, 0.0)
    with pytest.raises(ValueError, match="start"):
        trace.window(-1.0)


def test_send_times_divide_by_the_time_scale_from_the_origin():
    trace = make([100.0, 101.0, 104.0])
    assert trace.send_times_s(1.0).tolist() == [0.0, 1.0, 4.0]
    assert trace.send_times_s(2.0).tolist() == [0.0, 0.5, 2.0]  # twice as fast
    assert trace.send_times_s(0.5).tolist() == [0.0, 2.0, 8.0]  # half speed
    windowed = trace.window(99.0, 10.0)
    assert windowed.send_times_s(2.0).tolist() == [0.5, 1.0, 2.5]  # the window start is time zero
    with pytest.raises(ValueError, match="time scale"):
        trace.send_times_s(0.0)


def test_head_and_summary():
    trace = make([0.0, 1.0, 3.0, 4.0])
    assert len(trace.head(2)) == 2 and len(trace.head(10)) == 4
    summary = trace.summary()
    assert summary["num_requests"] == 4 and summary["duration_s"] == 4.0
    assert summary["mean_rate_req_s"] == pytest.approx(0.75)
    assert summary["prompt_tokens"]["max"] == 13.0


def test_empty_trace():
    trace = Trace([])
    assert len(trace) == 0 and trace.duration_s == 0.0 and trace.requests == []
    assert trace.window(0.0, 1.0).requests == []
