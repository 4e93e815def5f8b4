"""Building the served model's own CASTILLO-style dataset: sample each prompt's responses, record lengths.

Each prompt goes to the engine as one request with n = samples, rendered with the chat template;
many requests are in flight at once so the engine decodes in large batches. Every finished
prompt is appended to `<out>.partial` at once, so an interrupted build resumes where it stopped
(prompts already there are skipped). When every prompt is done, the rows are written to `out`
sorted by prompt id and the partial file is removed.

A response's length counts the tokens the engine generated for it, the end-of-sequence token
included (one decode step each), as `RequestOutput.outputs[i].token_ids` holds them. With
`stop_loops`, a response caught in a repetition loop is ended at once and counted at the cap it
would have run to (`LoopRule`; one caught response in `loop_shadow_every` runs on as the check).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

from lenserve.predictor.dataset import LengthRow, iter_rows, write_rows

logger = logging.getLogger(__name__)

# Prompt sources as CASTILLO names its datasets.
DATASET_NAMES = {
    "alpaca": "Alpaca", "apps": "Apps", "bigcodebench": "BigCodeBench", "dolly": "DollyDataset",
    "ds1000": "DS1000", "mbpp": "Mbpp", "sharegpt": "ShareGPT",
}


@dataclass
class BuildConfig:
    samples: int = 10
    max_tokens: int = 1024
    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 50
    num_prompts: int | None = None
    seed: int = 0
    model_name: str | None = None
    model: str | None = None  # None: the embedded SmolLM2
    device: str = "auto"
    dtype: str = "auto"
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 4096
    num_threads: int | None = None
    # End a response caught in a repetition loop at once and record it at the cap (None: never).
    stop_loops: LoopRule | None = None
    loop_check_every: int = 8  # tokens between two checks of a response
    loop_shadow_every: int = 16  # one response in this many is checked but left to run: the measure of the rule


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str
    dataset: str


def read_prompts(path: str) -> list[Prompt]:
    """Prompts from JSON lines: `id`/`prompt`/`source` (lenserve's prompt sets) or CASTILLO's `prompt_id`/`prompt_text`/`dataset`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    prompts, seen = [], set()
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                text = obj.get("prompt", obj.get("prompt_text")) if isinstance(obj, dict) else None
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"{path}:{lineno}: needs a non-empty `prompt` (or `prompt_text`) string")
                pid = str(obj.get("id") or obj.get("prompt_id") or hashlib.sha1(text.encode()).hexdigest()[:16])
                if pid in seen:
                    continue
                seen.add(pid)
                source = str(obj.get("source") or obj.get("dataset") or "undefined")
                prompts.append(Prompt(pid, text, DATASET_NAMES.get(source.lower(), source)))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as JSON lines ({e})") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def select_prompts(prompts: list[Prompt], num_prompts: int | None, seed: int) -> list[Prompt]:
    """A deterministic random subset (by hash of seed and id), in a stable order."""
    ordered = sorted(prompts, key=lambda p: hashlib.sha256(f"{seed}:{p.prompt_id}".encode()).digest())
    return ordered if num_prompts is None else ordered[:num_prompts]


@dataclass(frozen=True)
class LoopRule:
    """When a response counts as caught in a repetition loop: for some period p <= `max_period`,
    its last `max(min_span, min_repeats * p)` tokens each equal the token p before in at least
    `min_match` of the positions (so at least `min_repeats` + 1 copies of the period follow each
    other). A tolerance below 1 lets a loop through whose period carries a counter ("15. Tip" /
    "16. Tip") or a varying word."""

    min_span: int = 96
    max_period: int = 160
    min_repeats: int = 3
    min_match: float = 0.9

    def period(self, token_ids) -> int | None:
        """The shortest period the tail of `token_ids` repeats with, or None."""
        import numpy as np

        tail = np.asarray(token_ids[-(max(self.min_span, self.min_repeats * self.max_period) + self.max_period):])
        for p in range(1, self.max_period + 1):
            span = max(self.min_span, self.min_repeats * p)
            if span + p > len(tail):
                break
            if np.count_nonzero(tail[-span:] == tail[-span - p:-p]) >= self.min_match * span:
                return p
        return None


def _request_seed(seed: int, prompt_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:sample:{prompt_id}".encode()).digest()[:7], "big")


def loops_path(out_path: str) -> str:
    """Where a build records the responses it caught in loops: `<out stem>.loops.jsonl`."""
    stem = out_path[:-3] if out_path.endswith(".gz") else out_path
    return (stem[:-6] if stem.endswith(".jsonl") else stem) + ".loops.jsonl"


def _is_shadow(prompt_id: str, index: int, every: int) -> bool:
    return int.from_bytes(hashlib.sha256(f"shadow:{prompt_id}:{index}".encode()).digest()[:4], "big") % every == 0


def loop_summary(path: str, prompt_ids: set[str] | None = None) -> dict:
    """What a build's loop records say: how many responses were caught and stopped, and of the
    caught ones left to run (the shadow sample) how many ran to the cap as the rule assumes."""
    records: dict[tuple[str, int], dict] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    key = (rec["prompt_id"], int(rec["index"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a line cut off mid-write
                if prompt_ids is None or key[0] in prompt_ids:
                    records[key] = rec
    shadow = [r for r in records.values() if not r["stopped"]]
    reached = sum(r["length"] >= r["cap"] for r in shadow)
    return {
        "caught": len(records), "stopped": len(records) - len(shadow), "shadow": len(shadow),
        "shadow_reached_cap": reached, "shadow_share_reached_cap": round(reached / len(shadow), 4) if shadow else None,
    }


def read_partial(path: str) -> list[LengthRow]:
    """Rows of an interrupted build; a last line cut off mid-write is dropped (and the file repaired)."""
    if not os.path.exists(path):
        return []
    rows, good_bytes = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                rows.append(LengthRow.from_dict(json.loads(raw), where=path))
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                logger.warning("%s: dropping an incomplete last row", path)
                break
            good_bytes += len(raw)
    with open(path, "r+b") as f:
        f.truncate(good_bytes)
    return rows


def make_engine(cfg: BuildConfig):
    from lenserve.config import EngineConfig
    from lenserve.engine.llm_engine import LLMEngine
    from lenserve.scheduler.config import SchedulerConfig

    return LLMEngine(EngineConfig(
        model=cfg.model, device=cfg.device, dtype=cfg.dtype, num_threads=cfg.num_threads,
        scheduler=SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens),
    ))


def build_dataset(prompts_path: str, out_path: str, cfg: BuildConfig, engine=None, progress: bool = True) -> dict:
    """Samples `cfg.samples` responses for each selected prompt; returns a summary."""
    from tqdm import tqdm

    from lenserve.engine.sampling_params import SamplingParams

    prompts = select_prompts(read_prompts(prompts_path), cfg.num_prompts, cfg.seed)
    partial_path = out_path + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    done_rows = (list(iter_rows(out_path)) if os.path.exists(out_path) else []) + read_partial(partial_path)
    done = {r.prompt_id for r in done_rows}
    todo = deque(p for p in prompts if p.prompt_id not in done)
    logger.info("%d prompts selected, %d already done, %d to sample", len(prompts), len(prompts) - len(todo), len(todo))

    if todo and engine is None:
        engine = make_engine(cfg)
    model_name = cfg.model_name or (engine.model_name if engine is not None else done_rows[0].model)

    def has_room() -> bool:
        """Whether another prompt's samples fit the batch. Counted in running sequences, not in
        prompts: a prompt whose last sample straggles on would otherwise hold back a whole prompt's
        share of the batch (13 prompts with one long sample each make a batch of 13)."""
        sched = engine.scheduler
        return not in_flight or (sched.num_waiting == 0 and sched.num_running + cfg.samples <= cfg.max_num_seqs)

    in_flight: dict[str, tuple[Prompt, int, float, int]] = {}
    caught: dict[str, dict[int, dict]] = {}  # prompt id -> response index -> loop record
    rule = cfg.stop_loops

    def check_loops(out) -> object | None:
        """Stops the responses of `out` that a loop caught (but not the shadow sample); returns the
        request's final output when that ended it."""
        final = None
        cap = in_flight[out.request_id][3]
        for i, o in enumerate(out.outputs):
            n = len(o.token_ids)
            if o.finish_reason is not None or n % cfg.loop_check_every or i in caught.get(out.request_id, {}):
                continue
            period = rule.period(o.token_ids)
            if period is None:
                continue
            stop = not _is_shadow(out.request_id, i, cfg.loop_shadow_every)
            caught.setdefault(out.request_id, {})[i] = {
                "prompt_id": out.request_id, "index": i, "at": n, "period": period, "stopped": stop, "cap": cap,
            }
            if stop:
                final = engine.finish_completion(out.request_id, i) or final
        return final

    skipped: set[str] = set()
    num_written = num_tokens = 0
    t0 = time.monotonic()
    bar = tqdm(total=len(todo), unit="prompt", disable=not progress, dynamic_ncols=True)
    with contextlib.ExitStack() as files:
        partial = files.enter_context(open(partial_path, "a", encoding="utf-8"))
        loop_log = files.enter_context(open(loops_path(out_path), "a", encoding="utf-8")) if rule is not None else None
        while todo or in_flight:
            while todo and has_room():
                prompt = todo.popleft()
                ids = engine.tokenizer.encode_chat([{"role": "user", "content": prompt.text}])
                room = engine.max_model_len - len(ids)
                if room < 1:
                    logger.warning("prompt %s (%d tokens) does not fit the context; skipped", prompt.prompt_id, len(ids))
                    skipped.add(prompt.prompt_id)
                    bar.update(1)
                    continue
                params = SamplingParams(
                    n=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                    max_tokens=min(cfg.max_tokens, room), seed=_request_seed(cfg.seed, prompt.prompt_id),
                )
                engine.add_request(prompt.prompt_id, prompt.text, params, prompt_token_ids=ids)
                in_flight[prompt.prompt_id] = (prompt, len(ids), time.monotonic(), params.max_tokens)
            for out in engine.step():
                if not out.finished and rule is not None:
                    out = check_loops(out) or out
                if not out.finished:
                    continue
                prompt, num_prompt_tokens, started, cap = in_flight.pop(out.request_id)
                loops = caught.pop(out.request_id, {})
                if out.error:
                    logger.warning("prompt %s failed (%s); it will be retried on the next run", prompt.prompt_id, out.error)
                    bar.update(1)
                    continue
                sizes = [cap if loops.get(i, {}).get("stopped") else len(o.token_ids) for i, o in enumerate(out.outputs)]
                if loops:
                    for i, rec in sorted(loops.items()):
                        rec["length"] = sizes[i]
                        loop_log.write(json.dumps(rec) + "\n")
                    loop_log.flush()
                row = LengthRow(
                    prompt_id=prompt.prompt_id, model=model_name, prompt_text=prompt.text,
                    input_size=num_prompt_tokens, output_sizes=sizes, dataset=prompt.dataset,
                    top_k=cfg.top_k, top_p=cfg.top_p, temp=cfg.temperature,
                    gen_time=round(time.monotonic() - started, 4),
                )
                partial.write(json.dumps(row.to_dict(), ensure_ascii=False) + "\n")
                partial.flush()
                num_written += 1
                num_tokens += sum(len(o.token_ids) for o in out.outputs)
                bar.update(1)
                bar.set_postfix(tok_s=f"{num_tokens / max(time.monotonic() - t0, 1e-9):.0f}")
    bar.close()

    rows = done_rows + read_partial(partial_path)
    by_id = {r.prompt_id: r for r in rows}
    if all(p.prompt_id in by_id or p.prompt_id in skipped for p in prompts):
        write_rows(out_path, sorted(by_id.values(), key=lambda r: r.prompt_id))
        os.remove(partial_path)
    splits = {}
    for r in by_id.values():
        splits[r.split] = splits.get(r.split, 0) + 1
    summary = {"out": out_path, "model": model_name, "rows": len(by_id), "new_rows": num_written, "skipped": len(skipped),
               "splits": splits, "generated_tokens": num_tokens, "seconds": round(time.monotonic() - t0, 1)}
    if os.path.exists(loops_path(out_path)):
        summary["loops"] = loop_summary(loops_path(out_path), set(by_id))
    return summary
