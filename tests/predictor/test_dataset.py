"""CASTILLO-schema rows: round trip, summaries, splits, and clear errors for bad files."""
import gzip
import json
from collections import Counter

import pytest

from lenserve.predictor.dataset import SPLITS, LengthRow, read_rows, split_of, summarize, write_rows


def make_row(prompt_id="p1", model="m", sizes=(10, 20, 30)):
    return LengthRow(prompt_id=prompt_id, model=model, prompt_text=f"prompt {prompt_id}", input_size=7,
                     output_sizes=list(sizes), dataset="Mbpp", top_k=50, top_p=0.9, temp=0.2, gen_time=1.5)


def test_summary_matches_castillo_rounding():
    # Lengths and summary of one CASTILLO row (Mixtral-8x7B on an Alpaca prompt; CC-BY-4.0).
    sizes = [425, 429, 308, 442, 347, 292, 433, 476, 485, 407]
    mean, std, pct = summarize(sizes)
    assert (mean, std) == (404.4, 63.33)
    assert pct == {"p25": 362.0, "p50": 427.0, "p75": 439.75, "p99": 484.19}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_round_trip(tmp_path, suffix):
    rows = [make_row("a"), make_row("b", model="other", sizes=(5, 6, 7, 8))]
    path = str(tmp_path / f"rows{suffix}")
    assert write_rows(path, rows) == 2
    back = read_rows(path)
    assert back == rows
    keys = set(json.loads((gzip.open if suffix.endswith(".gz") else open)(path, "rt").readline()))
    assert {"sample_id", "prompt_id", "model", "dataset", "split", "prompt_text", "input_size", "output_sizes",
            "output_mean", "output_std", "output_percentiles", "top_k", "top_p", "temp", "gen_time"} <= keys
    assert read_rows(path, model="other") == rows[1:]


def test_split_is_deterministic_and_proportional():
    ids = [f"prompt-{i}" for i in range(20000)]
    first = [split_of(i) for i in ids]
    assert first == [split_of(i) for i in ids]
    counts = Counter(first)
    assert set(counts) == set(SPLITS)
    assert abs(counts["train"] / len(ids) - 0.8) < 0.02
    assert abs(counts["validate"] / len(ids) - 0.1) < 0.01


def test_split_has_no_prompt_leakage():
    rows = [make_row(f"p{i}", model=m) for i in range(300) for m in ("a", "b", "c")]
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r.prompt_id, set()).add(r.split)
    assert all(len(s) == 1 for s in by_prompt.values())


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_rows(str(tmp_path / "nothere.jsonl"))


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ValueError, match="cannot be read"):
        read_rows(str(path))


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(make_row().to_dict()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_rows(str(path))


def test_missing_field_is_named(tmp_path):
    obj = make_row().to_dict()
    del obj["output_sizes"]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(obj) + "\n")
    with pytest.raises(ValueError, match="output_sizes"):
        read_rows(str(path))


def test_no_rows_for_model(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    write_rows(path, [make_row()])
    with pytest.raises(ValueError, match="no rows for model 'x'"):
        read_rows(path, model="x")
