import gzip
import shutil

import numpy as np
import pytest

from lenserve.traces.loaders import TraceFormatError, detect_format, load_azure, load_burstgpt, load_mooncake, load_trace

V1_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- BurstGPT ----------------------------------------------------------------------------------


def test_burstgpt_v1_drops_failed_rows_and_rebases_time(fixtures):
    trace = load_burstgpt(fixtures / "burstgpt_v1.csv")
    assert len(trace) == 8  # 10 rows, 2 with 0 response tokens
    first = trace.requests[0]
    assert (first.arrival_s, first.prompt_tokens, first.output_tokens, first.model) == (0.0, 472, 18, "ChatGPT")
    assert trace.requests[2].arrival_s == 113.0 and trace.requests[2].model == "GPT-4"
    assert trace.meta["time_offset_s"] == 5.0
    assert trace.meta["num_rows_read"] == 10 and trace.meta["num_failed_rows_read"] == 2
    assert not any(r.failed for r in trace)
    assert all(r.session_id is None for r in trace)


def test_burstgpt_keeps_failed_rows_when_asked(fixtures):
    trace = load_burstgpt(fixtures / "burstgpt_v1.csv", include_failed=True)
    assert len(trace) == 10
    failed = [r for r in trace if r.failed]
    assert [(r.arrival_s, r.output_tokens) for r in failed] == [(115.0, 0), (235.0, 0)]


def test_burstgpt_filters_model_and_log_type(fixtures):
    gpt4 = load_burstgpt(fixtures / "burstgpt_v1.csv", models=["GPT-4"])
    assert [r.prompt_tokens for r in gpt4] == [417, 2048]
    conv = load_burstgpt(fixtures / "burstgpt_v1.csv", models=["ChatGPT"], log_types=["Conversation log"])
    assert [r.prompt_tokens for r in conv] == [472, 1087, 12, 1500]
    assert load_burstgpt(fixtures / "burstgpt_v1.csv", models=["gpt-5"]).meta["models_in_file"] == ["ChatGPT", "GPT-4"]


def test_burstgpt_window_is_in_seconds_after_the_first_request(fixtures):
    trace = load_burstgpt(fixtures / "burstgpt_v1.csv", start_s=100, duration_s=200)
    assert [r.arrival_s for r in trace] == [113.0, 116.0, 116.0, 180.0]  # 300 is outside [100, 300)
    assert trace.origin_s == 100.0


def test_burstgpt_v3_header_reads_sessions(fixtures):
    trace = load_burstgpt(fixtures / "burstgpt_v3.csv", include_failed=True)
    assert [r.arrival_s for r in trace] == [0.0, 51.5, 82.25, 100.0, 190.75]
    assert trace.requests[0].session_id == "3f1c2a9e-0000-4000-8000-000000000001"
    assert trace.requests[3].session_id is None  # empty Session ID
    assert trace.requests[2].failed
    assert len(load_burstgpt(fixtures / "burstgpt_v3.csv")) == 4


def test_gzip_is_read_transparently_whatever_the_name(fixtures, tmp_path):
    path = tmp_path / "trace.csv"  # gzip content, no .gz suffix
    with open(fixtures / "burstgpt_v1.csv", "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain = load_burstgpt(fixtures / "burstgpt_v1.csv")
    assert load_trace(path).requests == plain.requests


def test_columns_are_found_by_name_in_any_order(tmp_path):
    path = write(tmp_path, "t.csv", "Log Type,Response tokens,Request tokens,Total tokens,Model,Timestamp\nAPI log,5,10,15,ChatGPT,3\n")
    (r,) = load_burstgpt(path).requests
    assert (r.prompt_tokens, r.output_tokens, r.model) == (10, 5, "ChatGPT")


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes((V1_HEADER + "1,ChatGPT,10,5,15,API log\n2,GPT-4,3,4,7,API log\n").replace("\n", "\r\n").encode())
    trace = load_burstgpt(path, log_types=["API log"])
    assert [r.model for r in trace] == ["ChatGPT", "GPT-4"]


@pytest.mark.parametrize(
    "rows, line, field, words",
    [
        ("1,ChatGPT,10,5,15,API log\n2,ChatGPT,ten,5,15,API log\n", 3, "Request tokens", "not an integer"),
        ("1,ChatGPT,10,5,15,API log\n2,ChatGPT,10,-5,5,API log\n", 3, "Response tokens", "negative"),
        ("1,ChatGPT,10,5,15,API log\nsoon,ChatGPT,10,5,15,API log\n", 3, "Timestamp", "could not convert"),
        ("1,ChatGPT,10,5,15,API log\n2,ChatGPT,10,5\n", 3, None, "expected 6"),
        ("1,ChatGPT,10,5,15,API log\n2,ChatGPT,10,5,15,API log,extra\n", 3, None, "found 7"),
        ("1,ChatGPT,10,5,15,API log\nnan,ChatGPT,10,5,15,API log\n", 3, "Timestamp", "finite"),
    ],
)
def test_burstgpt_bad_row_names_file_line_and_field(tmp_path, rows, line, field, words):
    path = write(tmp_path, "bad.csv", V1_HEADER + rows)
    with pytest.raises(TraceFormatError) as e:
        load_burstgpt(path)
    assert e.value.line == line and e.value.field == field
    assert str(path) in str(e.value) and f"line {line}" in str(e.value) and words in str(e.value)


def test_blank_lines_are_skipped_and_long_text_is_an_error(tmp_path):
    path = write(tmp_path, "t.csv", V1_HEADER + "1,ChatGPT,10,5,15,API log\n\n2,GPT-4,3,4,7,API log\n")
    assert [r.model for r in load_burstgpt(path)] == ["ChatGPT", "GPT-4"]
    long_name = "m" * 40  # longer than the model column holds: an error, never a silent truncation
    path = write(tmp_path, "long.csv", V1_HEADER + f"1,ChatGPT,10,5,15,API log\n2,{long_name},3,4,7,API log\n")
    with pytest.raises(TraceFormatError, match="line 3: field 'Model': longer than 31 bytes"):
        load_burstgpt(path)


def test_burstgpt_missing_column_is_named(tmp_path):
    path = write(tmp_path, "bad.csv", "Timestamp,Model,Request tokens,Total tokens,Log Type\n1,ChatGPT,10,15,API log\n")
    with pytest.raises(TraceFormatError, match="line 1: field 'Response tokens': missing column") as e:
        load_burstgpt(path)
    assert e.value.line == 1


def test_bad_row_in_a_later_chunk_has_its_true_line_number(tmp_path, monkeypatch):
    import lenserve.traces.loaders as loaders

    monkeypatch.setattr(loaders, "_CHUNK_BYTES", 64)  # many chunks
    rows = "".join(f"{i},ChatGPT,{i + 1},3,{i + 4},API log\n" for i in range(50))
    path = write(tmp_path, "t.csv", V1_HEADER + rows + "50,ChatGPT,1,x,1,API log\n")
    with pytest.raises(TraceFormatError) as e:
        load_burstgpt(path)
    assert (e.value.line, e.value.field) == (52, "Response tokens")
    ok = write(tmp_path, "ok.csv", V1_HEADER + rows)
    trace = load_burstgpt(ok)
    assert len(trace) == 50 and trace.requests[-1].prompt_tokens == 50


def test_window_stops_reading_a_sorted_file_early(tmp_path, monkeypatch):
    import lenserve.traces.loaders as loaders

    monkeypatch.setattr(loaders, "_CHUNK_BYTES", 64)
    rows = "".join(f"{i},ChatGPT,5,3,8,API log\n" for i in range(100)) + "100,ChatGPT,oops,3,8,API log\n"
    trace = load_burstgpt(write(tmp_path, "t.csv", V1_HEADER + rows), start_s=10, duration_s=5)
    assert [r.arrival_s for r in trace] == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert trace.meta["num_rows_read"] < 100  # the corrupt last row was never reached


# -- Azure -------------------------------------------------------------------------------------


def test_azure_timestamps_become_seconds_from_the_first(fixtures):
    trace = load_azure(fixtures / "azure_conv_head.csv")
    assert len(trace) == 20
    r0, r1 = trace.requests[:2]
    assert (r0.arrival_s, r0.prompt_tokens, r0.output_tokens) == (0.0, 374, 44)
    # 18:15:50.9951690 - 18:15:46.6805900
    assert r1.arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert trace.meta["start_time"].startswith("2023-11-16T18:15:46.68059")


def test_azure_utc_offsets(tmp_path):
    path = write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2024-05-10 00:00:00.0000000+00:00,10,2\n2024-05-10 00:00:01.5000000Z,20,3\n2024-05-10 02:00:03+02:00,30,4\n")
    assert [r.arrival_s for r in load_trace(path)] == [0.0, 1.5, 3.0]


@pytest.mark.parametrize(
    "row, field",
    [("yesterday,10,2", "TIMESTAMP"), ("2023-11-16 18:15:50.9951690,10,-2", "GeneratedTokens"), ("2023-11-16 18:15:50.9951690,1.5,2", "ContextTokens")],
)
def test_azure_bad_row(tmp_path, row, field):
    path = write(tmp_path, "a.csv", f"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n{row}\n")
    with pytest.raises(TraceFormatError) as e:
        load_azure(path)
    assert (e.value.line, e.value.field) == (3, field)


def test_azure_shipped_trace_loads(fixtures):
    from lenserve.traces.prompts import DATA_DIR

    trace = load_trace(DATA_DIR / "azure_llm_2023_conv.csv.gz")
    assert len(trace) == 19366 and trace.meta["format"] == "azure"
    assert 3400 < trace.duration_s < 3600


# -- Mooncake ----------------------------------------------------------------------------------


def test_mooncake_milliseconds_and_hash_ids(fixtures):
    trace = load_mooncake(fixtures / "mooncake.jsonl")
    assert [r.arrival_s for r in trace] == [0.0, 0.0, 27.482, 30.535, 30.535, 61.0]
    assert trace.requests[0].hash_ids == tuple(range(14))
    assert trace.requests[3].hash_ids is None
    assert (trace.requests[5].prompt_tokens, trace.requests[5].output_tokens) == (512, 300)
    assert [r.arrival_s for r in load_mooncake(fixtures / "mooncake.jsonl", start_s=30, duration_s=31)] == [30.535, 30.535]


@pytest.mark.parametrize(
    "line, field, words",
    [
        ('{"timestamp": 5, "input_length": 3}', "output_length", "missing"),
        ('{"timestamp": "5", "input_length": 3, "output_length": 1}', "timestamp", "milliseconds"),
        ('{"timestamp": 5, "input_length": 3.5, "output_length": 1}', "input_length", "non-negative integer"),
        ('{"timestamp": 5, "input_length": 3, "output_length": 1, "hash_ids": [1, "a"]}', "hash_ids", "list of integers"),
        ('{"timestamp": 5, "input_length": 3', None, "not a JSON object"),
    ],
)
def test_mooncake_bad_line(tmp_path, line, field, words):
    path = write(tmp_path, "m.jsonl", '{"timestamp": 0, "input_length": 3, "output_length": 1}\n\n' + line + "\n")
    with pytest.raises(TraceFormatError) as e:
        load_mooncake(path)
    assert (e.value.line, e.value.field) == (3, field) and words in str(e.value)


# -- detection -----------------------------------------------------------------------------------


def test_detect_format(fixtures, tmp_path):
    assert detect_format(fixtures / "burstgpt_v1.csv") == "burstgpt"
    assert detect_format(fixtures / "burstgpt_v3.csv") == "burstgpt"
    assert detect_format(fixtures / "azure_conv_head.csv") == "azure"
    assert detect_format(fixtures / "mooncake.jsonl") == "mooncake"
    with pytest.raises(TraceFormatError, match="unknown trace format"):
        detect_format(write(tmp_path, "x.csv", "a,b,c\n1,2,3\n"))


def test_load_trace_max_requests(fixtures):
    trace = load_trace(fixtures / "azure_conv_head.csv", max_requests=5)
    assert len(trace) == 5
    assert np.array_equal(trace.columns.prompt_tokens, [374, 396, 879, 91, 91])
