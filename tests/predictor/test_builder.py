"""The dataset builder, driven by a fake engine: schema, splits, resuming after an interruption."""
import gzip
import json
from dataclasses import dataclass, field

import pytest

from lenserve.predictor.builder import BuildConfig, build_dataset, read_prompts
from lenserve.predictor.dataset import read_rows, split_of


@dataclass
class _Completion:
    token_ids: list


@dataclass
class _Output:
    request_id: str
    outputs: list
    finished: bool = True
    error: str | None = None


class _SchedulerView:
    """What the builder reads of the engine's scheduler: every sample of a pending prompt runs."""

    num_waiting = 0

    def __init__(self, engine):
        self.engine = engine

    @property
    def num_running(self):
        return sum(req[2].n for req in self.engine.pending)


class FakeEngine:
    """Answers each request after two steps; response i of a prompt has len(prompt) % 17 + i tokens."""

    model_name = "fake-llm"
    max_model_len = 4096

    class tokenizer:
        @staticmethod
        def encode_chat(messages):
            return list(range(len(messages[0]["content"].split()) + 3))

    def __init__(self, fail_after: int | None = None):
        self.pending = []
        self.added = []
        self.finished = 0
        self.fail_after = fail_after
        self.scheduler = _SchedulerView(self)
        self.most_running = 0

    def add_request(self, request_id, prompt, params, prompt_token_ids):
        assert params.n >= 1 and params.max_tokens >= 1 and params.seed is not None
        self.added.append(request_id)
        self.pending.append([request_id, prompt, params, 2])

    def step(self):
        self.most_running = max(self.most_running, self.scheduler.num_running)
        out = []
        for req in list(self.pending):
            req[3] -= 1
            if req[3] == 0:
                if self.fail_after is not None and self.finished >= self.fail_after:
                    raise KeyboardInterrupt
                self.pending.remove(req)
                rid, prompt, params, _ = req
                sizes = [min(len(prompt) % 17 + i + 1, params.max_tokens) for i in range(params.n)]
                out.append(_Output(rid, [_Completion(list(range(s))) for s in sizes]))
                self.finished += 1
        return out


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(12):
            f.write(json.dumps({"id": f"id{i}", "source": "dolly", "license": "CC-BY-SA-3.0", "prompt": f"question {i} " * (i + 1)}) + "\n")
    return str(path)


CFG = BuildConfig(samples=3, max_tokens=8, max_num_seqs=6)


def test_builds_castillo_rows(prompts_file, tmp_path):
    out = str(tmp_path / "data" / "smol.jsonl.gz")  # a folder that does not exist yet
    summary = build_dataset(prompts_file, out, CFG, engine=FakeEngine(), progress=False)
    rows = read_rows(out)
    assert summary["rows"] == len(rows) == 12
    assert [r.prompt_id for r in rows] == sorted(r.prompt_id for r in rows)
    for r in rows:
        assert r.model == "fake-llm" and r.dataset == "DollyDataset"
        assert len(r.output_sizes) == 3 and max(r.output_sizes) <= 8
        assert r.split == split_of(r.prompt_id)
        assert (r.temp, r.top_p, r.top_k) == (0.2, 0.9, 50)
        assert r.output_mean == pytest.approx(sum(r.output_sizes) / 3, abs=0.01)


def test_resumes_after_interruption(prompts_file, tmp_path):
    out = str(tmp_path / "smol.jsonl")
    with pytest.raises(KeyboardInterrupt):
        build_dataset(prompts_file, out, CFG, engine=FakeEngine(fail_after=5), progress=False)
    partial = [json.loads(line) for line in open(out + ".partial")]
    assert 0 < len(partial) < 12
    # A row cut off mid-write is dropped on resume.
    with open(out + ".partial", "a") as f:
        f.write('{"prompt_id": "id11", "mod')
    engine = FakeEngine()
    build_dataset(prompts_file, out, CFG, engine=engine, progress=False)
    done_before = {r["prompt_id"] for r in partial}
    assert not done_before & set(engine.added)
    rows = read_rows(out)
    assert sorted(r.prompt_id for r in rows) == sorted(f"id{i}" for i in range(12))
    # Nothing left to do: no engine is needed, and the file stays the same.
    before = open(out).read()
    assert build_dataset(prompts_file, out, CFG, engine=None, progress=False)["new_rows"] == 0
    assert open(out).read() == before


def test_subset_is_deterministic(prompts_file, tmp_path):
    cfg = BuildConfig(samples=2, max_tokens=4, num_prompts=5)
    a = build_dataset(prompts_file, str(tmp_path / "a.jsonl"), cfg, engine=FakeEngine(), progress=False)
    b = build_dataset(prompts_file, str(tmp_path / "b.jsonl"), cfg, engine=FakeEngine(), progress=False)
    assert a["rows"] == 5
    assert [r.prompt_id for r in read_rows(str(tmp_path / "a.jsonl"))] == [r.prompt_id for r in read_rows(str(tmp_path / "b.jsonl"))]


def test_bad_prompts_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_prompts(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: needs a non-empty `prompt`"):
        read_prompts(str(bad))


def test_in_flight_prompts_fill_the_batch_by_sequences(prompts_file, tmp_path):
    engine = FakeEngine()
    build_dataset(prompts_file, str(tmp_path / "b.jsonl"), CFG, engine=engine, progress=False)
    assert len(read_rows(str(tmp_path / "b.jsonl"))) == 12
    # max_num_seqs 6 and 3 samples a prompt: two prompts' samples at a time, never more
    assert engine.most_running == CFG.max_num_seqs
