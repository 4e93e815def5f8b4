"""Prefix structure of multi-turn traffic: block ids for each request's prompt.

A request's `hash_ids` name the blocks of its prompt, `block_tokens` tokens each (the trace's
`meta["block_tokens"]`; Mooncake's are 512): two requests share KV cache exactly as far as their
leading ids agree, and an id always names the same block content at the same position.

- `synthesize_multiturn`: sessions that arrive as a Gamma process; each turn's prompt is the
  previous prompt + the previous answer + a new message, after a shared system prompt (one of a
  few, as apps behind one endpoint have), so turns of a session share their history and every
  session shares its system prompt's blocks.
- `session_block_ids`: block ids for a trace with session ids and no ids of its own (BurstGPT v3):
  within a session, a request continues the conversation when its prompt holds at least the
  previous prompt and answer; a shorter one (a new chat, or a client that cut its history) starts
  a new chain.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from lenserve.traces.synth import LengthDist
from lenserve.traces.trace import Trace, TraceColumns


def num_blocks(num_tokens: int, block_tokens: int) -> int:
    return -(-int(num_tokens) // block_tokens)


class _BlockIds:
    """Fresh ids for chains of blocks: block i of chain c is one id, whichever request asks."""

    def __init__(self) -> None:
        self.ids: dict[tuple, int] = {}

    def chain(self, key, num: int) -> tuple[int, ...]:
        out = []
        for i in range(num):
            out.append(self.ids.setdefault((key, i), len(self.ids)))
        return tuple(out)


@dataclass(frozen=True)
class MultiTurnConfig:
    num_sessions: int = 500
    session_rate_s: float = 0.5  # sessions starting per second (Gamma process)
    session_cv: float = 2.0  # coefficient of variation of the gaps between session starts
    mean_turns: float = 4.0  # turns per session: 1 + geometric
    think_time_s: float = 30.0  # mean gap between a turn's arrival and the next (exponential, plus min_gap_s)
    min_gap_s: float = 5.0
    num_system_prompts: int = 4  # distinct system prompts, Zipf-weighted (the first is the most used)
    system_tokens: int = 256
    message: LengthDist = field(default_factory=lambda: LengthDist(mu=4.6, sigma=0.9, max_tokens=1024))  # median ~100
    answer: LengthDist = field(default_factory=lambda: LengthDist(mu=5.0, sigma=0.8, max_tokens=1024))  # median ~150
    max_prompt_tokens: int = 3500  # a conversation that would outgrow this starts afresh (a new chat)
    block_tokens: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_sessions < 0 or not self.session_rate_s > 0 or not self.session_cv > 0:
            raise ValueError("need num_sessions >= 0, session_rate_s > 0 and session_cv > 0")
        if self.mean_turns < 1:
            raise ValueError(f"mean turns must be >= 1, got {self.mean_turns}")
        if self.block_tokens < 1 or self.num_system_prompts < 1 or self.system_tokens < 0:
            raise ValueError("need block_tokens >= 1, num_system_prompts >= 1, system_tokens >= 0")
        if self.max_prompt_tokens <= self.system_tokens:
            raise ValueError("max_prompt_tokens must exceed system_tokens")


def synthesize_multiturn(config: MultiTurnConfig) -> Trace:
    """A multi-turn trace with sessions and block ids (see the module docstring)."""
    rng = np.random.default_rng(config.seed)
    shape = 1.0 / config.session_cv ** 2
    gaps = rng.gamma(shape, 1.0 / (config.session_rate_s * shape), config.num_sessions)
    starts = np.cumsum(gaps) - (gaps[0] if len(gaps) else 0.0)
    weights = 1.0 / np.arange(1, config.num_system_prompts + 1)
    weights /= weights.sum()
    B = config.block_tokens
    ids = _BlockIds()
    rows = []  # (arrival, prompt, output, session, hash_ids)
    for s, t in enumerate(starts.tolist()):
        system = int(rng.choice(config.num_system_prompts, p=weights))
        turns = int(rng.geometric(1.0 / config.mean_turns))  # mean: mean_turns
        chat = 0  # a new chain when the conversation outgrows the context
        history = config.system_tokens
        for _ in range(turns):
            message = min(int(config.message.sample(1, rng)[0]), config.max_prompt_tokens - config.system_tokens)
            answer = int(config.answer.sample(1, rng)[0])
            if history + message > config.max_prompt_tokens:
                chat += 1
                history = config.system_tokens
            prompt = history + message
            # The system prompt's whole blocks are shared across sessions; the rest is the chat's.
            num_sys = config.system_tokens // B
            sys_ids = ids.chain(("sys", system), num_sys)
            own = ids.chain(("chat", s, chat, system), num_blocks(prompt, B) - num_sys)
            rows.append((t, prompt, answer, f"s{s}", sys_ids + own))
            history = prompt + answer
            t += config.min_gap_s + float(rng.exponential(config.think_time_s))
    rows.sort(key=lambda r: r[0])
    n = len(rows)
    hash_ids = np.empty(n, object)
    hash_ids[:] = [r[4] for r in rows]
    session = np.empty(n, object)
    session[:] = [r[3] for r in rows]
    columns = TraceColumns(
        arrival_s=np.array([r[0] for r in rows], np.float64),
        prompt_tokens=np.array([r[1] for r in rows], np.int64),
        output_tokens=np.array([r[2] for r in rows], np.int64),
        failed=np.zeros(n, bool),
        model_index=np.zeros(n, np.int32),
        model_names=("ChatGPT",),
        session_id=session,
        hash_ids=hash_ids,
    )
    meta = {"format": "synthetic-multiturn", "block_tokens": B, "config": asdict(config)}
    return Trace.from_columns(columns, name="multiturn", source=f"synthetic multi-turn: {config.num_sessions} sessions, "
                              f"{config.mean_turns:g} turns, {config.num_system_prompts} system prompts, seed {config.seed}", meta=meta)


def session_block_ids(trace: Trace, block_tokens: int = 16) -> Trace:
    """The trace with block ids from its sessions (see the module docstring); requests without a
    session get ids of their own. Raises if the trace has no session ids."""
    c = trace.columns
    if c.session_id is None:
        raise ValueError(f"{trace.source or trace.name}: no session ids to derive prefix blocks from")
    if block_tokens < 1:
        raise ValueError(f"block tokens must be >= 1, got {block_tokens}")
    ids = _BlockIds()
    state: dict[str, tuple[int, int]] = {}  # session -> (chat number, tokens of prompt + answer so far)
    out = []
    for i, (session, prompt, output) in enumerate(zip(c.sessions(), c.prompt_tokens.tolist(), c.output_tokens.tolist())):
        if session is None:
            out.append(ids.chain(("request", i), num_blocks(prompt, block_tokens)))
            continue
        chat, history = state.get(session, (0, math.inf))
        if prompt < history:
            chat = chat + 1 if session in state else 0
        out.append(ids.chain((session, chat), num_blocks(prompt, block_tokens)))
        state[session] = (chat, prompt + output)
    hash_ids = np.empty(len(out), object)
    hash_ids[:] = out
    columns = TraceColumns(c.arrival_s, c.prompt_tokens, c.output_tokens, c.failed, c.model_index, c.model_names, c.session_id, hash_ids)
    return Trace.from_columns(columns, trace.name, trace.source, {**trace.meta, "block_tokens": block_tokens})


def shared_cache_hit_rate(trace: Trace, capacity_tokens: float = math.inf) -> float:
    """Token-level prefix hit rate of one cache that every request goes through (LRU over blocks,
    each request's blocks cached on arrival): the bound a router's replicas aim at together."""
    from lenserve.scheduler.routing import PrefixIndex

    c = trace.columns
    if c.hash_ids is None:
        return 0.0
    B = int(trace.meta.get("block_tokens", 512))
    cache = PrefixIndex(capacity_tokens / B)
    hit = total = 0
    for ids, prompt in zip(c.hash_ids.tolist(), c.prompt_tokens.tolist()):
        if ids is None:
            total += prompt
            continue
        hit += min(cache.match(ids) * B, max(prompt - 1, 0))
        total += prompt
        cache.insert(ids)
    return hit / total if total else 0.0
