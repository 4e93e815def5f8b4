"""Prompt sources for replay: exact-length prompts built from real text, and natural prompts.

Exact mode needs a prompt of exactly N tokens of the served model. The replay client is an
HTTP client and does not load the model itself, so token ids come from either a local
tokenizer file (`--tokenizer tokenizer.json`, via the `tokenizers` library) or the server's
`POST /tokenize {"prompt": ...} -> {"tokens": [...], "count": N}`. Searching for a cut point
per request would cost several tokenizer calls per request; instead:

* A pool of words is taken from real shipped prompts (a fixed sample of databricks-dolly-15k
  prompts in traces/data/prompts.jsonl.gz), and a prompt is " w1 w2 ... wk": words each with
  one leading space.
* Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) and SentencePiece tokenizers split text into
  pre-tokens at such spaces and never merge across them, so the count of " w1 ... wk" is
  c0 + c(w1) + ... + c(wk), with c0 what the tokenizer adds to any text (a BOS token, say).
* The pool's ~3,000 distinct words are counted once, a few hundred per /tokenize call
  (" | w1 | w2 | ... |", split at the separator's ids; see count_word_tokens): about ten calls.
* A prompt of N tokens is then assembled locally: four random single-token words (so no two
  prompts share a prefix that the server's prefix cache could reuse), pool words from a random
  offset while they fit, and single-token words to fill the last gap exactly.

A sample of built prompts is checked against the tokenizer before the replay starts, and
every response's `usage.prompt_tokens` is recorded, so a tokenizer for which the additivity
fails shows up as a count mismatch in the report instead of passing silently. Checked: exact
for SmolLM2's tokenizer (tests/traces/test_prompts.py) from 1 to 30,000 tokens.
"""
from __future__ import annotations

import asyncio
import bisect
import gzip
import itertools
import json
import logging
import os
import random
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_PROMPTS = DATA_DIR / "prompts.jsonl.gz"
_POOL_SOURCE = "dolly"  # English prose: words separated by spaces
_POOL_NUM_PROMPTS = 100
_POOL_MAX_WORD_CHARS = 30
_NUM_PREFIX_WORDS = 4
_SEPARATOR = "|"


def load_prompts(path: str | os.PathLike = DEFAULT_PROMPTS, source: str | None = None) -> list[str]:
    """The `prompt` field of each JSONL row (gzip or plain), optionally only rows of one source."""
    with open(path, "rb") as f:
        opener = gzip.open if f.read(2) == b"\x1f\x8b" else open
    prompts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = row["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}, line {line_no}: expected a JSON object with a 'prompt' string") from None
            if source is None or row.get("source") == source:
                prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts" + (f" with source {source!r}" if source else ""))
    return prompts


class TokenCounter(Protocol):
    async def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids the server's model sees for each text sent as a completion prompt."""


class LocalTokenCounter:
    """A tokenizer.json through the `tokenizers` library (special tokens included)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))

    async def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]


class ServerTokenCounter:
    """The server's POST /tokenize {"prompt": text} -> {"tokens": [...], "count": N}."""

    def __init__(self, client, max_concurrency: int = 8) -> None:
        self.client = client  # httpx.AsyncClient with the server's base URL
        self.max_concurrency = max_concurrency

    async def _tokenize_one(self, text: str, limit: asyncio.Semaphore) -> list[int]:
        async with limit:
            resp = await self.client.post("/tokenize", json={"prompt": text})
        if resp.status_code != 200:
            raise RuntimeError(
                f"POST /tokenize answered {resp.status_code}: {resp.text[:200]}; exact mode needs it, or pass --tokenizer tokenizer.json"
            )
        return list(resp.json()["tokens"])

    async def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        limit = asyncio.Semaphore(self.max_concurrency)
        return list(await asyncio.gather(*(self._tokenize_one(t, limit) for t in texts)))


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split(ids: Sequence[int], sep: Sequence[int]) -> list[list[int]]:
    parts, current, i, n = [], [], 0, len(sep)
    sep = list(sep)
    while i < len(ids):
        if ids[i] == sep[0] and list(ids[i : i + n]) == sep:
            parts.append(current)
            current = []
            i += n
        else:
            current.append(ids[i])
            i += 1
    parts.append(current)
    return parts


async def count_word_tokens(counter: TokenCounter, words: Sequence[str], batch_size: int = 400) -> tuple[dict[str, int], int]:
    """(tokens of " w" for each word, tokens the tokenizer adds to any text).

    Words are tokenized in batches, " | w1 | w2 | ... |", and the ids split at the separator's
    ids: one call per batch instead of one per word. The separator " |" never merges with a
    word (a space separates them, and words with '|' are not in the pool). A batch that does not
    split into exactly its words is counted word by word instead.
    """
    the, the_the, a = await counter.tokenize([" the", " the the", f" {_SEPARATOR}"])
    base = 2 * len(the) - len(the_the)
    # What the tokenizer adds around any text (BOS, say) is the common prefix and suffix of two texts.
    prefix = _common_prefix_len(a, the)
    suffix = min(_common_prefix_len(a[::-1], the[::-1]), len(a) - prefix)
    sep = a[prefix : len(a) - suffix] if prefix + suffix == base else []
    batches = [list(words[i : i + batch_size]) for i in range(0, len(words), batch_size)]
    texts = [f" {_SEPARATOR}" + "".join(f" {w} {_SEPARATOR}" for w in batch) for batch in batches]
    counts: dict[str, int] = {}
    for batch, ids in zip(batches, await counter.tokenize(texts)):
        parts = _split(ids[prefix : len(ids) - suffix], sep) if sep else []
        if (
            ids[:prefix] == a[:prefix]
            and ids[len(ids) - suffix :] == a[len(a) - suffix :]
            and len(parts) == len(batch) + 2
            and not parts[0]
            and not parts[-1]
            and all(parts[1:-1])
        ):
            counts.update(zip(batch, map(len, parts[1:-1])))
        else:
            log.info("separator split failed for a batch of %d words; counting them one by one", len(batch))
            singles = await counter.tokenize([f" {w}" for w in batch])
            counts.update((w, len(ids) - base) for w, ids in zip(batch, singles))
    return counts, base


def _pool_words(prompts: Sequence[str]) -> list[str]:
    rng = np.random.default_rng(0)  # a fixed pool, so calibration is the same for every run
    chosen = rng.permutation(len(prompts))[:_POOL_NUM_PROMPTS]
    return [
        w for i in sorted(chosen) for w in prompts[i].split() if len(w) <= _POOL_MAX_WORD_CHARS and w.isprintable() and _SEPARATOR not in w
    ]


class ExactPromptBuilder:
    """Builds prompts of an exact token count; see the module docstring for how."""

    def __init__(self, pool: list[str], word_tokens: dict[str, int], base_tokens: int, seed: int = 0) -> None:
        self.pool = [w for w in pool if word_tokens.get(w, 0) > 0]
        self.single_token_words = sorted(w for w, c in word_tokens.items() if c == 1)
        if not self.pool or not self.single_token_words:
            raise ValueError("no usable words: the tokenizer gave no single-token words from the prompt pool")
        self.base_tokens = base_tokens  # c0: tokens the tokenizer adds to any prompt
        self.seed = seed
        # The pool laid out twice, with prefix sums of its token counts, so a run of words from
        # any start is one slice and its cut point one bisection (plain lists: this runs per request).
        self._pool2 = self.pool + self.pool
        self._cum2 = list(itertools.accumulate((word_tokens[w] for w in self._pool2), initial=0))
        self._total = self._cum2[len(self.pool)]

    @classmethod
    async def create(cls, counter: TokenCounter, prompts: Sequence[str] | None = None, seed: int = 0) -> ExactPromptBuilder:
        pool = _pool_words(prompts if prompts is not None else load_prompts(DEFAULT_PROMPTS, source=_POOL_SOURCE))
        if not pool:
            raise ValueError("the prompt pool has no words")
        word_tokens, base = await count_word_tokens(counter, sorted(set(pool)))
        builder = cls(pool, word_tokens, base, seed)
        await builder.verify(counter)
        return builder

    def min_tokens(self) -> int:
        return self.base_tokens + 1

    def build(self, index: int, num_tokens: int) -> tuple[str, int]:
        """(prompt text, its token count) for request `index`; the count is num_tokens unless
        num_tokens is below the smallest possible prompt (base tokens + one word)."""
        rng = random.Random(f"{self.seed}:{index}")
        content = max(num_tokens - self.base_tokens, 1)
        singles = self.single_token_words
        num_prefix = min(_NUM_PREFIX_WORDS, content)
        words = rng.choices(singles, k=num_prefix)
        remaining = content - num_prefix
        if remaining:
            n = len(self.pool)
            start = rng.randrange(n)
            full_loops, rest = divmod(remaining, self._total)
            words += self._pool2[start : start + n] * full_loops
            # The longest run of pool words from `start` whose tokens fit in `rest`.
            k = bisect.bisect_right(self._cum2, self._cum2[start] + rest, lo=start) - 1 - start
            words += self._pool2[start : start + k]
            gap = rest - (self._cum2[start + k] - self._cum2[start])
            words += rng.choices(singles, k=gap)
        return " " + " ".join(words), self.base_tokens + content

    def build_blocks(self, block_ids: Sequence[int], num_tokens: int, block_tokens: int) -> tuple[str, int]:
        """(prompt text, its token count) made of one block of `block_tokens` single-token words per
        id, cut to `num_tokens` tokens: equal ids give equal blocks, so prompts whose leading ids
        agree share a token prefix that long and the server's prefix cache really hits. Prompts
        longer than their blocks are padded with words drawn for the last id."""
        if block_tokens < 1:
            raise ValueError(f"block tokens must be >= 1, got {block_tokens}")
        singles = self.single_token_words
        content = max(num_tokens - self.base_tokens, 1)
        words: list[str] = []
        for b in block_ids:
            if len(words) >= content:
                break
            words += random.Random(f"{self.seed}:block:{b}").choices(singles, k=block_tokens)
        if len(words) < content:
            tail = block_ids[-1] if len(block_ids) else None
            words += random.Random(f"{self.seed}:tail:{tail}").choices(singles, k=content - len(words))
        del words[content:]
        return " " + " ".join(words), self.base_tokens + content

    async def verify(self, counter: TokenCounter, sizes: Sequence[int] = (1, 7, 64, 513, 3000)) -> None:
        targets = [max(s, self.min_tokens()) for s in sizes]
        built = [self.build((1 << 40) + i, n) for i, n in enumerate(targets)]  # indices no request uses
        counted = [len(ids) for ids in await counter.tokenize([text for text, _ in built])]
        bad = [(n, c) for (_, n), c in zip(built, counted) if c != n]
        if bad:
            log.warning(
                "exact prompts are off for this tokenizer (target, counted): %s; replay goes on, and the "
                "report lists every request whose usage.prompt_tokens differs from its target", bad
            )


class NaturalPrompts:
    """Real prompts in a seeded random order; request i gets the i-th (cycling)."""

    def __init__(self, path: str | os.PathLike = DEFAULT_PROMPTS, seed: int = 0) -> None:
        self.prompts = load_prompts(path)
        self.order = np.random.default_rng(seed).permutation(len(self.prompts))

    def prompt(self, index: int) -> str:
        return self.prompts[int(self.order[index % len(self.prompts)])]
