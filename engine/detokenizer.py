"""Incremental detokenization with stop strings.

Text is produced token by token with `tokenizers`' DecodeStream, which holds back incomplete
UTF-8 sequences. While stop strings are set, the last (longest stop - 1) characters are held
back too, so a stop string that straddles tokens never reaches the client.
"""
from __future__ import annotations

from tokenizers.decoders import DecodeStream

from lenserve.engine.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.include_stop = include_stop_str_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.text = ""
        self._sent = 0  # characters of self.text already returned
        self.stop_hit: str | None = None

    def add_token(self, token_id: int) -> str:
        """Feeds one token; returns the text that became final (may be empty)."""
        if self.stop_hit is not None:
            return ""
        chunk = self._stream.step(self.tokenizer.hf, token_id)
        if chunk:
            start = len(self.text)
            self.text += chunk
            if self.stop:
                self._find_stop(start)
        return self._release(final=self.stop_hit is not None)

    def _find_stop(self, start: int) -> None:
        search_from = max(start - self.hold, 0)
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.text.find(s, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is not None:
            idx, s = best
            self.stop_hit = s
            self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]

    def _release(self, final: bool) -> str:
        end = len(self.text) if (final or not self.stop) else max(len(self.text) - self.hold, self._sent)
        delta = self.text[self._sent : end]
        self._sent = end
        return delta

    @property
    def emitted_text(self) -> str:
        return self.text[: self._sent]

    def flush(self) -> str:
        """Returns whatever was held back; call once the sequence has finished."""
        return self._release(final=True)
