"""The trace format every loader returns and every replayer and simulator consumes.

A `Trace` is stored as columns (numpy arrays) so a 1M+ row trace loads, filters and slices
without building a Python object per row; `trace.requests` builds the `TraceRequest` objects
on first use. A Trace is a value: build a new one (window, head, select) instead of mutating.
"""
from __future__ import annotations

import gc
import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds since the trace's start
    prompt_tokens: int
    output_tokens: int
    model: str = ""
    session_id: str | None = None
    failed: bool = False  # BurstGPT rows with 0 response tokens, when kept
    hash_ids: tuple[int, ...] | None = None  # Mooncake: ids of the prompt's 512-token blocks


@contextmanager
def _gc_paused():
    # Building ~1M small objects triggers the cyclic collector hundreds of times for nothing
    # (none of them form cycles); pausing it makes materialising a large trace 2-3x faster.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class TraceColumns:
    """One entry per request, sorted by arrival."""

    arrival_s: np.ndarray  # float64 [n]
    prompt_tokens: np.ndarray  # int64 [n]
    output_tokens: np.ndarray  # int64 [n]
    failed: np.ndarray  # bool [n]
    model_index: np.ndarray  # int32 [n], index into model_names
    model_names: tuple[str, ...]
    # [n] str | None objects, or bytes (BurstGPT: decoded when materialised, b"" = none); None: no sessions
    session_id: np.ndarray | None = None
    hash_ids: np.ndarray | None = None  # object [n] of tuple[int, ...] | None

    def __len__(self) -> int:
        return len(self.arrival_s)

    def select(self, index: np.ndarray | slice) -> TraceColumns:
        """Rows picked by a boolean mask, an index array or a slice."""
        return TraceColumns(
            arrival_s=self.arrival_s[index],
            prompt_tokens=self.prompt_tokens[index],
            output_tokens=self.output_tokens[index],
            failed=self.failed[index],
            model_index=self.model_index[index],
            model_names=self.model_names,
            session_id=None if self.session_id is None else self.session_id[index],
            hash_ids=None if self.hash_ids is None else self.hash_ids[index],
        )

    @staticmethod
    def concatenate(parts: Sequence[TraceColumns], model_names: tuple[str, ...]) -> TraceColumns:
        """Joins parts that already share `model_names`."""
        def cat(name: str, dtype) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts]) if parts else np.empty(0, dtype)

        def cat_optional(name: str) -> np.ndarray | None:
            if not parts or all(getattr(p, name) is None for p in parts):
                return None
            return np.concatenate(
                [getattr(p, name) if getattr(p, name) is not None else np.full(len(p), None, object) for p in parts]
            )

        return TraceColumns(
            arrival_s=cat("arrival_s", np.float64),
            prompt_tokens=cat("prompt_tokens", np.int64),
            output_tokens=cat("output_tokens", np.int64),
            failed=cat("failed", bool),
            model_index=cat("model_index", np.int32),
            model_names=model_names,
            session_id=cat_optional("session_id"),
            hash_ids=cat_optional("hash_ids"),
        )

    @staticmethod
    def from_requests(requests: Sequence[TraceRequest]) -> TraceColumns:
        names: dict[str, int] = {}
        model_index = np.fromiter((names.setdefault(r.model, len(names)) for r in requests), np.int32, len(requests))
        has_sessions = any(r.session_id is not None for r in requests)
        has_hashes = any(r.hash_ids is not None for r in requests)

        def objects(values: list) -> np.ndarray:
            out = np.empty(len(values), object)
            out[:] = values
            return out

        return TraceColumns(
            arrival_s=np.fromiter((r.arrival_s for r in requests), np.float64, len(requests)),
            prompt_tokens=np.fromiter((r.prompt_tokens for r in requests), np.int64, len(requests)),
            output_tokens=np.fromiter((r.output_tokens for r in requests), np.int64, len(requests)),
            failed=np.fromiter((r.failed for r in requests), bool, len(requests)),
            model_index=model_index,
            model_names=tuple(names),
            session_id=objects([r.session_id for r in requests]) if has_sessions else None,
            hash_ids=objects([r.hash_ids for r in requests]) if has_hashes else None,
        )

    def sessions(self) -> list[str | None]:
        if self.session_id is None:
            return [None] * len(self)
        if self.session_id.dtype.kind == "S":
            return [s.decode("utf-8", "replace") or None for s in self.session_id.tolist()]
        return self.session_id.tolist()

    def to_requests(self) -> list[TraceRequest]:
        n = len(self)
        models = list(self.model_names)
        with _gc_paused():
            return list(
                map(
                    TraceRequest,
                    self.arrival_s.tolist(),
                    self.prompt_tokens.tolist(),
                    self.output_tokens.tolist(),
                    map(models.__getitem__, self.model_index.tolist()),
                    self.sessions(),
                    self.failed.tolist(),
                    self.hash_ids.tolist() if self.hash_ids is not None else [None] * n,
                )
            )


class Trace:
    """Requests sorted by arrival, with where they came from.

    `Trace(requests, name, source, meta)` takes TraceRequest objects; loaders build one from
    columns with `Trace.from_columns`. `meta["window_start_s"]`, set by `window`, is the trace
    time that replay maps to its own time zero.
    """

    def __init__(
        self,
        requests: Sequence[TraceRequest] | None = None,
        name: str = "trace",
        source: str = "",
        meta: dict | None = None,
    ) -> None:
        requests = list(requests or [])
        if any(b.arrival_s < a.arrival_s for a, b in itertools.pairwise(requests)):
            requests.sort(key=lambda r: r.arrival_s)
        self._requests: list[TraceRequest] | None = requests
        self._columns: TraceColumns | None = None
        self.name = name
        self.source = source
        self.meta = dict(meta or {})

    @classmethod
    def from_columns(cls, columns: TraceColumns, name: str = "trace", source: str = "", meta: dict | None = None) -> Trace:
        trace = cls(None, name, source, meta)
        order = np.argsort(columns.arrival_s, kind="stable")
        if len(order) and np.any(order != np.arange(len(order))):
            columns = columns.select(order)
        trace._requests = None
        trace._columns = columns
        return trace

    @property
    def requests(self) -> list[TraceRequest]:
        if self._requests is None:
            self._requests = self._columns.to_requests()
        return self._requests

    @property
    def columns(self) -> TraceColumns:
        if self._columns is None:
            self._columns = TraceColumns.from_requests(self._requests)
        return self._columns

    def __len__(self) -> int:
        return len(self._requests) if self._requests is not None else len(self._columns)

    def __iter__(self) -> Iterator[TraceRequest]:
        return iter(self.requests)

    def __getitem__(self, i: int) -> TraceRequest:
        return self.requests[i]

    def __repr__(self) -> str:
        return f"Trace(name={self.name!r}, source={self.source!r}, num_requests={len(self)}, duration_s={self.duration_s:.1f})"

    @property
    def duration_s(self) -> float:
        arrival = self.columns.arrival_s
        return float(arrival[-1] - arrival[0]) if len(arrival) else 0.0

    @property
    def origin_s(self) -> float:
        """The trace time replay maps to its time zero: the window start, else the first arrival."""
        if "window_start_s" in self.meta:
            return float(self.meta["window_start_s"])
        return float(self.columns.arrival_s[0]) if len(self) else 0.0

    def _derived(self, columns: TraceColumns, **meta) -> Trace:
        return Trace.from_columns(columns, self.name, self.source, {**self.meta, **meta})

    def select(self, index: np.ndarray | slice) -> Trace:
        return self._derived(self.columns.select(index))

    def window(self, start_s: float | None = None, duration_s: float | None = None) -> Trace:
        """Requests with start_s <= arrival_s < start_s + duration_s (trace seconds, before any time scale)."""
        start_s = 0.0 if start_s is None else float(start_s)
        if start_s < 0:
            raise ValueError(f"window start must be >= 0 s, got {start_s}")
        if duration_s is not None and duration_s <= 0:
            raise ValueError(f"window duration must be > 0 s, got {duration_s}")
        arrival = self.columns.arrival_s
        mask = arrival >= start_s
        if duration_s is not None:
            mask &= arrival < start_s + duration_s
        return self._derived(self.columns.select(mask), window_start_s=start_s)

    def head(self, num_requests: int) -> Trace:
        if num_requests < 0:
            raise ValueError(f"max requests must be >= 0, got {num_requests}")
        return self.select(slice(0, num_requests))

    def send_times_s(self, time_scale: float = 1.0) -> np.ndarray:
        """When replay sends each request, in seconds after its start: (arrival - origin) / time_scale.

        time_scale is a speed-up, as in BurstGPT's replayer: 2 sends the trace twice as fast.
        """
        if not time_scale > 0:
            raise ValueError(f"time scale must be > 0, got {time_scale}")
        return np.maximum(self.columns.arrival_s - self.origin_s, 0.0) / time_scale

    def summary(self) -> dict:
        """Counts and length statistics, for `lenserve trace info` and reports."""
        c = self.columns
        ok = ~c.failed
        gaps = np.diff(c.arrival_s)

        def stats(x: np.ndarray) -> dict | None:
            if not len(x):
                return None
            return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)), "max": float(x.max())}

        return {
            "name": self.name,
            "source": self.source,
            "num_requests": len(self),
            "num_failed": int(c.failed.sum()),
            "duration_s": self.duration_s,
            "mean_rate_req_s": (len(self) - 1) / self.duration_s if self.duration_s > 0 else None,
            "interarrival_cv": float(gaps.std() / gaps.mean()) if len(gaps) and gaps.mean() > 0 else None,
            "models": {name: int((c.model_index == i).sum()) for i, name in enumerate(c.model_names)},
            "prompt_tokens": stats(c.prompt_tokens),
            "output_tokens": stats(c.output_tokens[ok]),
        }
