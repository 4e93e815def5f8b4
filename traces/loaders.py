"""Trace loaders: BurstGPT CSV, Azure LLM inference trace CSV, Mooncake JSONL (each may be gzipped).

CSV files are read in chunks of a few MB and parsed by numpy's C reader (`np.loadtxt`) into
columns; only when numpy rejects a chunk, or a value fails a check, is that chunk parsed again
line by line to say which line and field are wrong. A 1.4M-row BurstGPT file thus loads in
2-3 s on a busy 2-core machine, with the error messages a line-by-line parser would give.
Text columns (Model, Log Type, Session ID) have a fixed width; a longer value is an error,
never a silent truncation.

Every loader returns arrival times in seconds from the file's first request (so `start_s` is
"seconds into the trace"); the file's own time of that request is kept in
`trace.meta["time_offset_s"]`.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from lenserve.traces.trace import Trace, TraceColumns

FORMATS = ("burstgpt", "azure", "mooncake")
BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")
BURSTGPT_V3_COLUMNS = ("Timestamp", "Session ID", "Elapsed time", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")

_CHUNK_BYTES = 8 << 20


class TraceFormatError(ValueError):
    """A trace file that cannot be read: names the file, the 1-based line and the field."""

    def __init__(self, path: str | os.PathLike, line: int | None, field: str | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path if line is None else f"{self.path}, line {line}"
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{message}")


def open_binary(path: str | os.PathLike):
    """Opens a file for reading bytes, decompressing it when it is gzip (by content, not name)."""
    f = open(path, "rb")
    magic = f.read(2)
    f.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")
    return f


def detect_format(path: str | os.PathLike) -> str:
    """burstgpt, azure or mooncake, from the first line of the file."""
    with open_binary(path) as f:
        first = f.readline(1 << 16).decode("utf-8-sig", errors="replace").strip()
    if first.startswith("{"):
        return "mooncake"
    names = {c.strip() for c in first.split(",")}
    if {"Request tokens", "Response tokens"} <= names:
        return "burstgpt"
    if {"ContextTokens", "GeneratedTokens"} <= names:
        return "azure"
    raise TraceFormatError(path, 1, None, f"unknown trace format (first line {first[:120]!r}); pass --format {'|'.join(FORMATS)}")


def load_trace(
    path: str | os.PathLike,
    format: str | None = None,
    *,
    models: Sequence[str] | None = None,
    log_types: Sequence[str] | None = None,
    include_failed: bool = False,
    start_s: float | None = None,
    duration_s: float | None = None,
    max_requests: int | None = None,
) -> Trace:
    """Loads any supported trace; `models`/`log_types`/`include_failed` apply to BurstGPT only."""
    format = format or detect_format(path)
    if format == "burstgpt":
        trace = load_burstgpt(path, models=models, log_types=log_types, include_failed=include_failed, start_s=start_s, duration_s=duration_s)
    elif format == "azure":
        trace = load_azure(path, start_s=start_s, duration_s=duration_s)
    elif format == "mooncake":
        trace = load_mooncake(path, start_s=start_s, duration_s=duration_s)
    else:
        raise ValueError(f"unknown trace format {format!r}; expected one of {', '.join(FORMATS)}")
    if max_requests is not None:
        trace = trace.head(max_requests)
    return trace


# ---------------------------------------------------------------------------------------------
# Chunked CSV reading


@dataclass(frozen=True)
class _Column:
    name: str
    dtype: str  # numpy dtype of the parsed column
    check: Callable[[str], object]  # parses one field, raising ValueError with the reason


def _parse_time(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _parse_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def _parse_datetime(text: str) -> np.datetime64:
    if len(text) > 39:
        raise ValueError("longer than 39 characters")
    try:
        return _to_datetime(np.array([text]))[0]
    except ValueError:
        raise ValueError(f"{text!r} is not a timestamp like 2023-11-16 18:15:46.6805900") from None


def _parse_text(max_bytes: int) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if len(text.encode("utf-8")) > max_bytes:
            raise ValueError(f"longer than {max_bytes} bytes")
        return text

    return parse


def _read_header(f, path) -> list[str]:
    raw = f.readline()
    try:
        header = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise TraceFormatError(path, 1, None, f"header is not UTF-8 ({e.reason})") from None
    if not header:
        raise TraceFormatError(path, 1, None, "empty file: expected a CSV header")
    return [c.strip() for c in header.split(",")]


def _column_positions(path, header: list[str], wanted: Sequence[_Column], expected: str) -> list[int]:
    positions = []
    for col in wanted:
        if col.name not in header:
            raise TraceFormatError(path, 1, col.name, f"missing column; header is {','.join(header)!r}, expected {expected}")
        positions.append(header.index(col.name))
    return positions


def _chunks(f) -> Iterator[bytes]:
    """Successive blocks of whole lines (each ending with a newline)."""
    rest = b""
    while True:
        block = f.read(_CHUNK_BYTES)
        if not block:
            if rest:
                yield rest + b"\n"
            return
        data = rest + block
        cut = data.rfind(b"\n") + 1
        data, rest = data[:cut], data[cut:]
        if data:
            yield data


@dataclass(frozen=True)
class _Block:
    rows: np.ndarray  # structured, one field per wanted column
    data: bytes  # the block's raw lines
    first_line: int  # 1-based line number of its first line


class _CsvReader:
    """Reads the wanted columns of a CSV file block by block; `error` locates a bad line."""

    def __init__(self, path, wanted: Sequence[_Column], expected: str) -> None:
        self.path = path
        self.wanted = wanted
        self.expected = expected

    def __iter__(self) -> Iterator[_Block]:
        with open_binary(self.path) as f:
            self.header = _read_header(f, self.path)
            self.positions = _column_positions(self.path, self.header, self.wanted, self.expected)
            order = sorted(range(len(self.wanted)), key=lambda i: self.positions[i])
            # loadtxt returns the used columns in file order, so the dtype lists them in that order.
            dtype = np.dtype([(self.wanted[i].name, self.wanted[i].dtype) for i in order])
            usecols = [self.positions[i] for i in order]
            text_columns = [c for c in self.wanted if np.dtype(c.dtype).kind == "S"]
            line_no = 2
            for data in _chunks(f):
                try:
                    rows = np.loadtxt(io.BytesIO(data), delimiter=",", usecols=usecols, dtype=dtype, comments=None, ndmin=1)
                except ValueError as e:
                    raise self.error(data, line_no, str(e)) from None
                # numpy ignores fields beyond the used columns, and fits text into a fixed width:
                # a wrong comma count or a full-width value sends the block to the line-by-line check.
                suspicious = data.count(b",") != len(rows) * (len(self.header) - 1) or any(
                    np.ascontiguousarray(rows[c.name]).view(np.uint8).reshape(len(rows), -1)[:, -1].any() for c in text_columns if len(rows)
                )
                if suspicious:
                    error = self.error(data, line_no, "", strict=True)
                    if error is not None:
                        raise error
                if len(rows):
                    yield _Block(rows, data, line_no)
                line_no += data.count(b"\n")

    def error(self, data: bytes, first_line: int, cause: str, strict: bool = False) -> TraceFormatError | None:
        """The first bad line of a block (whose parsing or checks failed) as an error."""
        for offset, line in enumerate(data.decode("utf-8", errors="replace").split("\n")):
            line = line.rstrip("\r")
            if not line:
                continue
            fields = line.split(",")
            line_no = first_line + offset
            if len(fields) != len(self.header):
                return TraceFormatError(
                    self.path, line_no, None, f"expected {len(self.header)} comma-separated fields ({','.join(self.header)}), found {len(fields)}"
                )
            for col, pos in zip(self.wanted, self.positions):
                try:
                    col.check(fields[pos].strip())
                except ValueError as e:
                    return TraceFormatError(self.path, line_no, col.name, str(e))
        if strict:
            return None
        return TraceFormatError(self.path, first_line, None, f"could not parse the block starting here: {cause}")


class _Categories:
    """Maps a column of a few distinct strings (models, log types) to small integer codes."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}

    def encode(self, values: np.ndarray) -> np.ndarray:
        codes = np.empty(len(values), np.int32)
        todo = np.ones(len(values), bool)
        # One vectorised comparison per distinct value (two or three in real traces), then a
        # sort for whatever is left if a file has many.
        for _ in range(8):
            if not todo.any():
                return codes
            value = values[int(np.argmax(todo))]
            match = todo & (values == value)
            codes[match] = self._code(value)
            todo &= ~match
        if todo.any():
            distinct, inverse = np.unique(values[todo], return_inverse=True)
            codes[todo] = np.array([self._code(v) for v in distinct], np.int32)[inverse]
        return codes

    def _code(self, value) -> int:
        name = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
        return self.names.setdefault(name, len(self.names))


def _window_mask(arrival_s: np.ndarray, start_s: float | None, duration_s: float | None) -> np.ndarray | None:
    if start_s is None and duration_s is None:
        return None
    start = 0.0 if start_s is None else start_s
    mask = arrival_s >= start
    if duration_s is not None:
        mask &= arrival_s < start + duration_s
    return mask


def _check_window(start_s: float | None, duration_s: float | None) -> None:
    if start_s is not None and start_s < 0:
        raise ValueError(f"window start must be >= 0 s, got {start_s}")
    if duration_s is not None and duration_s <= 0:
        raise ValueError(f"window duration must be > 0 s, got {duration_s}")


def _finish(parts: list[TraceColumns], categories: _Categories, path, name: str, meta: dict, start_s: float | None) -> Trace:
    columns = TraceColumns.concatenate(parts, tuple(categories.names))
    if start_s is not None:
        meta["window_start_s"] = float(start_s)
    return Trace.from_columns(columns, name=name, source=str(path), meta=meta)


# ---------------------------------------------------------------------------------------------
# BurstGPT


def load_burstgpt(
    path: str | os.PathLike,
    *,
    models: Sequence[str] | None = None,
    log_types: Sequence[str] | None = None,
    include_failed: bool = False,
    start_s: float | None = None,
    duration_s: float | None = None,
) -> Trace:
    """BurstGPT CSV (6-column v1/v2 or 8-column v3 header; columns are found by name).

    Rows with `Response tokens` 0 are failed requests: dropped, or kept with failed=True when
    include_failed. models / log_types keep only rows whose Model / Log Type is listed.
    """
    _check_window(start_s, duration_s)
    wanted = [
        _Column("Timestamp", "f8", _parse_time),
        _Column("Model", "S32", _parse_text(31)),
        _Column("Request tokens", "i8", _parse_count),
        _Column("Response tokens", "i8", _parse_count),
        _Column("Log Type", "S32", _parse_text(31)),
    ]
    with open_binary(path) as f:
        header = _read_header(f, path)
    has_sessions = "Session ID" in header
    if has_sessions:
        wanted.append(_Column("Session ID", "S64", _parse_text(63)))

    model_codes, log_codes = _Categories(), _Categories()
    keep_models = set(models) if models else None
    keep_logs = set(log_types) if log_types else None
    parts: list[TraceColumns] = []
    t0: float | None = None
    last_ts = -math.inf
    is_sorted = True
    end_s = None if duration_s is None else (start_s or 0.0) + duration_s
    num_rows = num_failed_rows = 0

    reader = _CsvReader(path, wanted, f"{','.join(BURSTGPT_COLUMNS)!r} or (v3) {','.join(BURSTGPT_V3_COLUMNS)!r}")
    for block in reader:
        rows = block.rows
        ts = rows["Timestamp"]
        prompt = rows["Request tokens"]
        output = rows["Response tokens"]
        if not np.isfinite(ts).all() or (prompt < 0).any() or (output < 0).any():
            raise reader.error(block.data, block.first_line, "invalid value")
        if t0 is None:
            t0 = float(ts[0])
        is_sorted = is_sorted and ts[0] >= last_ts and bool(np.all(ts[1:] >= ts[:-1]))
        last_ts = float(ts[-1])
        num_rows += len(rows)
        failed = output == 0
        num_failed_rows += int(failed.sum())

        arrival = ts - t0
        model_index = model_codes.encode(rows["Model"])
        log_index = log_codes.encode(rows["Log Type"])
        mask = np.ones(len(rows), bool) if include_failed else ~failed
        if keep_models is not None:
            mask &= np.isin(model_index, [i for n, i in model_codes.names.items() if n in keep_models])
        if keep_logs is not None:
            mask &= np.isin(log_index, [i for n, i in log_codes.names.items() if n in keep_logs])
        window = _window_mask(arrival, start_s, duration_s)
        if window is not None:
            mask &= window
        if mask.any():
            parts.append(
                TraceColumns(
                    arrival_s=arrival[mask],
                    prompt_tokens=prompt[mask],
                    output_tokens=output[mask],
                    failed=failed[mask],
                    model_index=model_index[mask],
                    model_names=(),
                    session_id=rows["Session ID"][mask] if has_sessions else None,
                )
            )
        if end_s is not None and is_sorted and last_ts - t0 >= end_s:
            break  # sorted file: nothing later can fall inside the window

    meta = {
        "format": "burstgpt",
        "time_offset_s": t0 or 0.0,
        "models_in_file": sorted(model_codes.names),
        "log_types_in_file": sorted(log_codes.names),
        "num_rows_read": num_rows,
        "num_failed_rows_read": num_failed_rows,
        "filters": {"models": list(models) if models else None, "log_types": list(log_types) if log_types else None, "include_failed": include_failed},
    }
    return _finish(parts, model_codes, path, os.path.basename(str(path)), meta, start_s)


# ---------------------------------------------------------------------------------------------
# Azure LLM inference trace


def _to_datetime(stamps: np.ndarray) -> np.ndarray:
    """ISO timestamps → datetime64[ns] in UTC; an offset ('Z', '+00:00', '-05:00') is applied."""
    with warnings.catch_warnings():
        # numpy converts offsets to UTC correctly but warns that datetime64 itself is naive.
        warnings.filterwarnings("ignore", message="no explicit representation of timezones")
        return np.asarray(np.char.strip(np.asarray(stamps, dtype=str)), dtype="datetime64[ns]")


def load_azure(path: str | os.PathLike, *, start_s: float | None = None, duration_s: float | None = None) -> Trace:
    """Azure LLM inference trace (2023 or 2024): TIMESTAMP, ContextTokens, GeneratedTokens."""
    _check_window(start_s, duration_s)
    wanted = [
        _Column("TIMESTAMP", "S40", _parse_datetime),
        _Column("ContextTokens", "i8", _parse_count),
        _Column("GeneratedTokens", "i8", _parse_count),
    ]
    categories = _Categories()
    categories.names[""] = 0
    parts: list[TraceColumns] = []
    t0: np.datetime64 | None = None
    reader = _CsvReader(path, wanted, repr(",".join(AZURE_COLUMNS)))
    for block in reader:
        rows = block.rows
        prompt = rows["ContextTokens"]
        output = rows["GeneratedTokens"]
        try:
            stamps = _to_datetime(rows["TIMESTAMP"])
        except ValueError as e:
            raise reader.error(block.data, block.first_line, str(e)) from None
        if (prompt < 0).any() or (output < 0).any() or np.isnat(stamps).any():
            raise reader.error(block.data, block.first_line, "invalid value")
        if t0 is None:
            t0 = stamps[0]
        arrival = (stamps - t0).astype(np.int64) / 1e9
        mask = _window_mask(arrival, start_s, duration_s)
        sel = slice(None) if mask is None else mask
        parts.append(
            TraceColumns(
                arrival_s=arrival[sel],
                prompt_tokens=prompt[sel],
                output_tokens=output[sel],
                failed=np.zeros(len(arrival[sel]), bool),
                model_index=np.zeros(len(arrival[sel]), np.int32),
                model_names=(),
            )
        )
    meta = {"format": "azure", "time_offset_s": float(t0.astype("datetime64[ns]").astype(np.int64)) / 1e9 if t0 is not None else 0.0}
    if t0 is not None:
        meta["start_time"] = str(t0)
    return _finish(parts, categories, path, os.path.basename(str(path)), meta, start_s)


# ---------------------------------------------------------------------------------------------
# Mooncake


MOONCAKE_BLOCK_TOKENS = 512  # tokens per hash_ids block


def load_mooncake(path: str | os.PathLike, *, start_s: float | None = None, duration_s: float | None = None) -> Trace:
    """Mooncake JSONL: one object per line with timestamp (ms), input_length, output_length, optional hash_ids."""
    _check_window(start_s, duration_s)
    timestamps: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    hashes: list = []
    with open_binary(path) as f:
        for line_no, raw in enumerate(io.TextIOWrapper(f, encoding="utf-8"), start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise TraceFormatError(path, line_no, None, f"not a JSON object ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise TraceFormatError(path, line_no, None, f"expected a JSON object, got {type(row).__name__}")
            for name in ("timestamp", "input_length", "output_length"):
                if name not in row:
                    raise TraceFormatError(path, line_no, name, "missing field")
            ts = row["timestamp"]
            if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
                raise TraceFormatError(path, line_no, "timestamp", f"{ts!r} is not a number of milliseconds")
            for name in ("input_length", "output_length"):
                value = row[name]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise TraceFormatError(path, line_no, name, f"{value!r} is not a non-negative integer")
            ids = row.get("hash_ids")
            if ids is not None:
                if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in ids):
                    raise TraceFormatError(path, line_no, "hash_ids", "expected a list of integers")
                ids = tuple(ids)
            timestamps.append(float(ts))
            prompt.append(row["input_length"])
            output.append(row["output_length"])
            hashes.append(ids)

    ts_ms = np.asarray(timestamps, np.float64)
    t0_ms = float(ts_ms[0]) if len(ts_ms) else 0.0
    arrival = (ts_ms - t0_ms) / 1000.0
    hash_ids = None
    if any(h is not None for h in hashes):
        hash_ids = np.empty(len(hashes), object)
        hash_ids[:] = hashes
    columns = TraceColumns(
        arrival_s=arrival,
        prompt_tokens=np.asarray(prompt, np.int64),
        output_tokens=np.asarray(output, np.int64),
        failed=np.zeros(len(arrival), bool),
        model_index=np.zeros(len(arrival), np.int32),
        model_names=("",),
        hash_ids=hash_ids,
    )
    mask = _window_mask(arrival, start_s, duration_s)
    if mask is not None:
        columns = columns.select(mask)
    meta = {"format": "mooncake", "time_offset_s": t0_ms / 1000.0, "block_tokens": MOONCAKE_BLOCK_TOKENS}
    if start_s is not None:
        meta["window_start_s"] = float(start_s)
    return Trace.from_columns(columns, name=os.path.basename(str(path)), source=str(path), meta=meta)
