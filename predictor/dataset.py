"""CASTILLO-schema rows: one ⟨prompt, model⟩ with the lengths of its sampled responses.

Schema (Perez-Ramirez et al., 2025): `sample_id, prompt_id, model, dataset, split, prompt_text,
input_size, output_sizes, output_mean, output_std, output_percentiles {p25, p50, p75, p99},
top_k, top_p, temp, gen_time` (+ `category`). Files are JSON lines, gzip-compressed when the
name ends in `.gz`. Splits are a pure function of the prompt id, so a prompt never lands in two.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

SPLITS: tuple[str, ...] = ("train", "validate", "test")
SPLIT_FRACTIONS: tuple[float, ...] = (0.8, 0.1, 0.1)
PERCENTILES: tuple[int, ...] = (25, 50, 75, 99)

_REQUIRED = ("prompt_id", "model", "prompt_text", "input_size", "output_sizes")


@dataclass
class LengthRow:
    """One prompt answered `len(output_sizes)` times by one model."""

    prompt_id: str
    model: str
    prompt_text: str
    input_size: int
    output_sizes: list[int]
    dataset: str = "undefined"
    split: str = ""
    sample_id: str = ""
    output_mean: float = 0.0
    output_std: float = 0.0
    output_percentiles: dict[str, float] = field(default_factory=dict)
    top_k: int = -1
    top_p: float = 1.0
    temp: float = 1.0
    gen_time: float = 0.0
    category: str = "undefined"

    def __post_init__(self) -> None:
        if not self.output_sizes:
            raise ValueError("output_sizes must hold at least one response length")
        if not self.split:
            self.split = split_of(self.prompt_id)
        if not self.sample_id:
            self.sample_id = hashlib.sha1(f"{self.model}\n{self.prompt_id}".encode()).hexdigest()[:16]
        if not self.output_percentiles:
            self.output_mean, self.output_std, self.output_percentiles = summarize(self.output_sizes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict, where: str = "row") -> "LengthRow":
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in _REQUIRED if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        sizes = obj["output_sizes"]
        if not isinstance(sizes, list) or not sizes or not all(isinstance(s, (int, float)) and s >= 0 for s in sizes):
            raise ValueError(f"{where}: output_sizes must be a non-empty list of non-negative numbers")
        known = {k: obj[k] for k in cls.__dataclass_fields__ if k in obj}
        known["output_sizes"] = [int(s) for s in sizes]
        if "output_mean" not in obj:
            known.pop("output_percentiles", None)
        try:
            return cls(**known)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


def summarize(output_sizes: list[int]) -> tuple[float, float, dict[str, float]]:
    """Mean, population std and percentiles (linear interpolation), rounded as CASTILLO rounds them."""
    n = len(output_sizes)
    mean = sum(output_sizes) / n
    std = math.sqrt(sum((s - mean) ** 2 for s in output_sizes) / n)
    ordered = sorted(output_sizes)

    def percentile(q: float) -> float:
        pos = (n - 1) * q / 100
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return round(mean, 2), round(std, 2), {f"p{q}": round(percentile(q), 2) for q in PERCENTILES}


def stable_hash64(key: str) -> int:
    """The first 8 bytes of sha256(key) as an unsigned integer: the same on every machine and run,
    unlike hash(); the splits and held-out partitions are drawn from it."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def split_of(prompt_id: str, fractions: tuple[float, ...] = SPLIT_FRACTIONS) -> str:
    """train / validate / test from a hash of the prompt id: deterministic, and one prompt one split."""
    u = stable_hash64(f"lenserve-split:{prompt_id}") / 2**64
    edge = 0.0
    for name, frac in zip(SPLITS, fractions):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def castillo_held_out(prompt_text: str, share: float = 0.2) -> bool:
    """Whether a CASTILLO prompt text is in the share held out of the shipped predictor's training
    (sha256 of "holdout:" + text): by text, so a prompt is held out for every model that answered it."""
    return stable_hash64("holdout:" + prompt_text) / 2**64 < share


def _open_text(path: str, mode: str):
    if str(path).endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def iter_rows(path: str, model: str | None = None) -> Iterator[LengthRow]:
    """Rows of a CASTILLO-schema file (gzip or not); `model` keeps only that model's rows."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file not found: {path}")
    try:
        with _open_text(path, "r") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                row = LengthRow.from_dict(obj, where=f"{path}:{lineno}")
                if model is None or row.model == model:
                    yield row
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as {'gzip ' if path.endswith('.gz') else ''}JSON lines ({e})") from None


def read_rows(path: str, model: str | None = None) -> list[LengthRow]:
    rows = list(iter_rows(path, model))
    if not rows:
        what = f" for model {model!r}" if model else ""
        raise ValueError(f"{path}: no rows{what}")
    return rows


def write_rows(path: str, rows: Iterable[LengthRow]) -> int:
    """Writes rows (replacing the file); returns how many."""
    n = 0
    tmp = f"{path}.tmp"
    opener = gzip.open if path.endswith(".gz") else open
    with opener(tmp, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
