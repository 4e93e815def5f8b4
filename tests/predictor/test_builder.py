"""The dataset builder, driven by a fake engine: schema, splits, resuming after an interruption."""
import gzip
import json
from dataclasses import dataclass, field

import pytest

from lenserve.predictor.builder import BuildConfig, LoopRule, _is_shadow, build_dataset, loop_summary, loops_path, read_prompts
from lenserve.predictor.dataset import read_rows, split_of


@dataclass
class _Completion:
    token_ids: list
    finish_reason: str | None = None


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


# ---- responses caught in repetition loops ----------------------------------------------------------

def test_loop_rule_finds_repeating_tails_only():
    rule = LoopRule(min_span=24, max_period=20, min_repeats=3, min_match=0.9)
    prose = list(range(100, 400))
    assert rule.period(prose) is None
    assert rule.period(prose[:50] + [7, 8, 9] * 12) == 3
    assert rule.period(prose[:50] + [7] * 30) == 1
    assert rule.period(prose[:50] + [7, 8, 9] * 7) is None  # 21 tokens: shorter than the span
    # a period carrying a counter: "1. tip\n", "2. tip\n", ... (one token in ten differs)
    listing = [t for i in range(12) for t in (1000 + i, 5, 6, 7, 8, 9, 10, 11, 12, 13)]
    assert rule.period(prose[:50] + listing) == 10
    assert LoopRule(min_span=24, max_period=20, min_repeats=3, min_match=1.0).period(prose[:50] + listing) is None
    # a long period needs min_repeats copies of itself, however short the span
    assert rule.period(prose[:50] + list(range(18)) * 3) is None
    assert rule.period(prose[:50] + list(range(18)) * 4) == 18


class LoopingEngine(FakeEngine):
    """Streams every response a token a step: response 0 loops on [1, 2, 3] to the cap, the others
    count up without repeating and stop after 40 tokens. Supports finish_completion."""

    max_model_len = 4096

    def add_request(self, request_id, prompt, params, prompt_token_ids):
        super().add_request(request_id, prompt, params, prompt_token_ids)
        self.pending[-1].append([_Completion([]) for _ in range(params.n)])

    def step(self):
        self.most_running = max(self.most_running, self.scheduler.num_running)
        out = []
        for req in list(self.pending):
            rid, _, params, _, comps = req
            for i, c in enumerate(comps):
                if c.finish_reason is None:
                    c.token_ids.append([1, 2, 3][len(c.token_ids) % 3] if i == 0 else len(c.token_ids) + 100)
                    if len(c.token_ids) >= (params.max_tokens if i == 0 else 40):
                        c.finish_reason = "length"
            out.append(self._output(req))
        return out

    def _output(self, req):
        finished = all(c.finish_reason for c in req[4])
        if finished:
            self.pending.remove(req)
        return _Output(req[0], [_Completion(list(c.token_ids), c.finish_reason) for c in req[4]], finished=finished)

    def finish_completion(self, request_id, index):
        req = next(r for r in self.pending if r[0] == request_id)
        req[4][index].finish_reason = "stop"
        out = self._output(req)
        return out if out.finished else None


def test_loops_are_stopped_and_recorded_at_the_cap(prompts_file, tmp_path):
    out = str(tmp_path / "smol.jsonl.gz")
    rule = LoopRule(min_span=24, max_period=8, min_repeats=3, min_match=1.0)
    cfg = BuildConfig(samples=3, max_tokens=200, max_num_seqs=6, stop_loops=rule, loop_check_every=4, loop_shadow_every=3)
    summary = build_dataset(prompts_file, out, cfg, engine=LoopingEngine(), progress=False)
    rows = read_rows(out)
    assert len(rows) == 12
    records = [json.loads(line) for line in open(loops_path(out))]
    assert loops_path(out) == str(tmp_path / "smol.loops.jsonl")
    # only response 0 loops; 27 tokens is the first check (every 4) past span + period
    assert sorted(r["prompt_id"] for r in records) == sorted(r.prompt_id for r in rows)
    for rec in records:
        assert (rec["index"], rec["period"], rec["at"], rec["cap"]) == (0, 3, 28, 200)
        assert rec["stopped"] == (not _is_shadow(rec["prompt_id"], 0, 3))
        assert rec["length"] == 200  # stopped: recorded at the cap; shadow: it really ran there
    shadow = sum(not r["stopped"] for r in records)
    assert 0 < shadow < 12
    for r in rows:
        assert r.output_sizes == [200, 40, 40]
    assert summary["loops"] == {"caught": 12, "stopped": 12 - shadow, "shadow": shadow, "shadow_reached_cap": shadow,
                                "shadow_share_reached_cap": 1.0}
    assert summary["generated_tokens"] == 12 * 80 + shadow * 200 + (12 - shadow) * 28


def test_loop_summary_counts_shadow_responses_that_ended_early(tmp_path):
    path = tmp_path / "x.loops.jsonl"
    recs = [
        {"prompt_id": "a", "index": 0, "at": 100, "period": 5, "stopped": False, "cap": 512, "length": 512},
        {"prompt_id": "a", "index": 1, "at": 100, "period": 5, "stopped": False, "cap": 512, "length": 300},
        {"prompt_id": "b", "index": 0, "at": 100, "period": 5, "stopped": True, "cap": 512, "length": 512},
        {"prompt_id": "gone", "index": 0, "at": 100, "period": 5, "stopped": True, "cap": 512, "length": 512},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"prompt_id": "c", "ind')
    assert loop_summary(str(path), {"a", "b"}) == {
        "caught": 3, "stopped": 1, "shadow": 2, "shadow_reached_cap": 1, "shadow_share_reached_cap": 0.5}
    assert loop_summary(str(tmp_path / "none.jsonl"))["caught"] == 0


def test_no_loop_file_without_the_rule(prompts_file, tmp_path):
    out = str(tmp_path / "plain.jsonl")
    summary = build_dataset(prompts_file, out, CFG, engine=FakeEngine(), progress=False)
    assert "loops" not in summary and not (tmp_path / "plain.loops.jsonl").exists()
