"""Types the rest of lenserve shares with the predictor (the scheduler imports only these)."""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_BUCKET_EDGES: tuple[int, ...] = (64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class PromptInput:
    """What the predictor sees of a request: its text (chat-rendered when it is a chat) and size."""

    text: str
    num_tokens: int
    max_tokens: int | None = None


@dataclass(frozen=True)
class LengthPrediction:
    """Predicted response length in tokens: a distribution summary and its bucket."""

    mean: float
    p50: float
    p90: float
    bucket: int
    quantiles: dict[float, float] = field(default_factory=dict, compare=False)


def bucket_of(num_tokens: float, edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES) -> int:
    """Index of the bucket `num_tokens` falls in: bucket i holds lengths in (edges[i-1], edges[i]]."""
    for i, edge in enumerate(edges):
        if num_tokens <= edge:
            return i
    return len(edges)
