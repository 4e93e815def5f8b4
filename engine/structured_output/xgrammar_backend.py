"""The xgrammar backend: grammars compiled against the served model's own vocabulary, cached
(LRU, bounded), one GrammarMatcher per constrained sequence, and the step's token bitmask filled
row by row and applied to the packed logits of the whole batch in one call (CPU path)."""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch

from lenserve.engine.structured_output import StructuredOutputSpec
from lenserve.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    import xgrammar as xgr

DEFAULT_CACHE_SIZE = 256


def _xgr():
    """xgrammar, imported on the first constrained request: it pulls in transformers and friends
    (~46 MiB resident, a second of start-up) that a server which never constrains does not need."""
    import xgrammar

    return xgrammar


class GrammarError(ValueError):
    """A constraint xgrammar cannot compile (the message names the problem)."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int) -> xgr.TokenizerInfo:
    """The vocabulary as xgrammar sees it, read from the served model's tokenizer (a GGUF's
    assembled one or an HF tokenizer.json). `vocab_size` is the model's logits width, which may
    exceed the tokenizer's (Qwen2 pads its embedding)."""
    # xgrammar's own reading of a tokenizer.json (what from_huggingface does for a fast tokenizer)
    metadata = _xgr().TokenizerInfo._detect_metadata_from_hf(tokenizer.hf.to_str())
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    encoded = [""] * max(vocab_size, len(vocab))
    for token, i in vocab.items():
        encoded[i] = token
    stop = sorted({tokenizer.eos_token_id, *tokenizer.extra_eos_token_ids} - {None})
    return _xgr().TokenizerInfo(
        encoded[:vocab_size] if len(encoded) > vocab_size else encoded,
        vocab_type=metadata["vocab_type"],
        vocab_size=vocab_size,
        stop_token_ids=stop,
        add_prefix_space=metadata["add_prefix_space"],
    )


class XgrammarBackend:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.cache_stats = CacheStats()
        self._tokenizer = tokenizer
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache: OrderedDict[StructuredOutputSpec, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._bitmask: torch.Tensor | None = None  # int32 [rows, ceil(vocab / 32)], reused across steps

    def _get_compiler(self) -> xgr.GrammarCompiler:
        # Built on first use: reading the 49k-token vocabulary costs a second that servers which
        # never see a constrained request should not pay at start-up.
        if self._compiler is None:
            info = tokenizer_info(self._tokenizer, self.vocab_size)
            # Our LRU is the one cache: it counts hits and bounds entries.
            self._compiler = _xgr().GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def compile(self, spec: StructuredOutputSpec) -> tuple[xgr.CompiledGrammar, float | None]:
        """The compiled grammar and its compile time in seconds (None when it came from the cache).
        Raises GrammarError for a constraint xgrammar rejects. Thread-safe."""
        with self._lock:
            compiler = self._get_compiler()
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                self.cache_stats.hits += 1
                return hit, None
        t0 = time.perf_counter()
        try:
            compiled = self._compile(compiler, spec)
        except Exception as e:  # the input is the client's: whatever xgrammar rejects it with is a 400, not a crash
            raise GrammarError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
        seconds = time.perf_counter() - t0
        with self._lock:
            self.cache_stats.misses += 1
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled, seconds

    @staticmethod
    def _compile(compiler: xgr.GrammarCompiler, spec: StructuredOutputSpec) -> xgr.CompiledGrammar:
        if spec.kind == "json":
            return compiler.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
        if spec.kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        if spec.kind == "regex":
            return compiler.compile_regex(spec.value)
        if spec.kind == "choice":
            choices = json.loads(spec.value)
            # EBNF string literals take JSON's escapes, so json.dumps quotes any choice safely.
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in choices))
        return compiler.compile_grammar(spec.value)

    def new_matcher(self, spec: StructuredOutputSpec) -> xgr.GrammarMatcher:
        compiled, _ = self.compile(spec)
        return _xgr().GrammarMatcher(compiled)

    def apply_bitmask(self, logits: torch.Tensor, matchers: list[xgr.GrammarMatcher | None]) -> None:
        """Masks, in place, the rows of `logits` [num_rows, vocab] whose matcher is not None to the
        tokens their grammar allows next; other rows are left untouched."""
        rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
        if not rows:
            return
        n = logits.shape[0]
        if self._bitmask is None or self._bitmask.shape[0] < n:
            self._bitmask = _xgr().allocate_token_bitmask(max(n, 64), self.vocab_size)
        bitmask = self._bitmask[:n]
        for i in rows:
            matchers[i].fill_next_token_bitmask(bitmask, i)
        _xgr().apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size, indices=rows)
