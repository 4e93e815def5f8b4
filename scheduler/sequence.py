"""A Sequence: one generation stream (a request with n > 1 has n of them). Pure Python, no torch."""
from __future__ import annotations

import enum
import itertools
import time
from typing import Any

from lenserve.predictor.types import LengthPrediction


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH, SequenceStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


_seq_counter = itertools.count()


class Sequence:
    """Token state, KV blocks, timing and the length prediction of one stream.

    `num_computed_tokens` counts the tokens whose keys and values are in the KV cache; a step
    computes `num_tokens - num_computed_tokens` of them (all of a prompt, a chunk of it, or the one
    token sampled last) and samples a new token once every token is computed.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        *,
        max_tokens: int,
        arrival_time: float | None = None,
        eos_token_id: int | None = None,
        stop_token_ids: frozenset[int] | set[int] | tuple[int, ...] = (),
        ignore_eos: bool = False,
        min_tokens: int = 0,
        priority: int = 0,
        prediction: LengthPrediction | None = None,
        true_output_len: int | None = None,
        params: Any = None,
        group_id: str | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.request_id = request_id
        self.seq_no = next(_seq_counter)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.max_tokens = max_tokens
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.eos_token_id = eos_token_id
        self.stop_token_ids = frozenset(stop_token_ids)
        self.ignore_eos = ignore_eos
        self.min_tokens = min_tokens
        self.priority = priority
        self.prediction = prediction
        self.true_output_len = true_output_len
        self.params = params
        # Sequences sampled from one prompt (a request with n > 1) share a group: its prompt is
        # computed once and the others find it in the prefix cache.
        self.group_id = group_id

        self.status = SequenceStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.block_ids: list[int] = []
        self.num_reserved_blocks = 0  # KV blocks promised to this sequence beyond block_ids (not yet allocated)
        self.num_preemptions = 0
        self.arrival_step: int | None = None  # the scheduler's step count when it was added (aging)
        self.wait_deadline: float | None = None  # work done by which it goes first (fcfs_wait_bound)
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None
        self.bucket: int | None = prediction.bucket if prediction is not None else None
        # The scheduler's current estimate of the total output length: the prediction until the
        # sequence outlives its p90, then a re-estimate conditioned on the tokens generated so far.
        self.estimate: LengthPrediction | None = prediction

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def predicted_remaining(self) -> float:
        """Expected output tokens still to come: the current estimate's mean, within max_tokens.

        The mean, not the median, because ordering by expected remaining work is what minimises
        mean completion time when lengths are uncertain (Smith's rule)."""
        if self.estimate is None:
            return float(self.max_tokens - self.num_output_tokens)
        return max(min(self.estimate.mean, self.max_tokens) - self.num_output_tokens, 1.0)

    @property
    def true_remaining(self) -> float:
        """Output tokens still to come by the true length (traces); the estimate when it is unknown."""
        if self.true_output_len is None:
            return self.predicted_remaining
        return float(max(min(self.true_output_len, self.max_tokens) - self.num_output_tokens, 1))

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def append_tokens(self, token_id: int, count: int) -> None:
        """Appends `token_id` `count` times (the simulator's bulk decode)."""
        self.token_ids.extend([token_id] * count)

    def check_stop(self, max_model_len: int) -> SequenceStatus | None:
        """The finish status after the last appended token, or None to continue."""
        n_out = self.num_output_tokens
        last = self.last_token_id
        if n_out >= self.min_tokens:
            if not self.ignore_eos and last == self.eos_token_id:
                self.stop_reason = None
                return SequenceStatus.FINISHED_STOPPED
            if last in self.stop_token_ids:
                self.stop_reason = last
                return SequenceStatus.FINISHED_STOPPED
        if n_out >= self.max_tokens or self.num_tokens >= max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )
