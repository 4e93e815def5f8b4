"""The trace format every loader returns and every replayer and simulator consumes."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds since the trace's start
    prompt_tokens: int
    output_tokens: int
    model: str = ""
    session_id: str | None = None
    failed: bool = False  # BurstGPT rows with 0 response tokens, when kept


@dataclass
class Trace:
    requests: list[TraceRequest]
    name: str = "trace"
    source: str = ""  # where it came from (path, or "synthetic: ...")
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):
        return iter(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0
