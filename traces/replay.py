"""Open-loop trace replay against an OpenAI-compatible server (asyncio, SSE streaming).

Each request is sent at its scaled trace time whether or not earlier ones have finished, so
the offered load is the trace's and a slow server builds a queue rather than slowing the
client down. The dispatcher prepares a request's body before sleeping until its send time,
and measures the send lag (actual minus scheduled send time) of every request.

Outputs in the output directory: requests.jsonl (one record per request), metrics.jsonl
(/metrics samples), report.json, report.md and the PNG plots.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import platform
import time
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

from lenserve.traces import report as report_mod
from lenserve.traces.sse_client import HTTPStatusError, ProtocolError, SSEClient
from lenserve.traces.prompts import DEFAULT_PROMPTS, ExactPromptBuilder, LocalTokenCounter, NaturalPrompts, ServerTokenCounter
from lenserve.traces.trace import Trace

log = logging.getLogger(__name__)

MODES = ("exact", "natural")
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
SERVER_GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
METRIC_PREFIX = "lenserve:"


@dataclass
class ReplayConfig:
    url: str
    api_key: str | None = None
    model: str | None = None  # None: the first model of GET /v1/models
    mode: str = "exact"  # exact: trace lengths, ignore_eos; natural: real prompts, the model stops
    endpoint: str | None = None  # completions | chat; None: completions for exact, chat for natural
    time_scale: float = 1.0  # speed-up: send time = (arrival - origin) / time_scale
    max_tokens_cap: int = 1024  # natural mode's max_tokens
    temperature: float | None = None  # None: the server's default
    slo_ttft_s: float = 1.0
    slo_tpot_s: float = 0.1
    request_timeout_s: float = 600.0
    metrics_interval_s: float = 1.0  # 0: do not scrape /metrics
    tokenizer: str | None = None  # tokenizer.json for exact prompts; None: the server's /tokenize
    prompts_path: str = str(DEFAULT_PROMPTS)
    seed: int = 0
    show_progress: bool = True
    # exact mode with a trace that has prefix blocks (hash_ids): tokens per block in the prompts
    # sent, each trace block becoming one deterministic block (lengths scaled by this over the
    # trace's block size); None: prompts share no prefix
    prefix_block_tokens: int | None = None
    send_session: bool = True  # a request's session id goes as the body's `user` (session affinity)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.endpoint is None:
            self.endpoint = "completions" if self.mode == "exact" else "chat"
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.time_scale > 0:
            raise ValueError(f"time scale must be > 0, got {self.time_scale}")
        if self.prefix_block_tokens is not None and self.prefix_block_tokens < 1:
            raise ValueError(f"prefix block tokens must be >= 1, got {self.prefix_block_tokens}")
        if self.max_tokens_cap < 1:
            raise ValueError(f"max tokens cap must be >= 1, got {self.max_tokens_cap}")
        if not (self.slo_ttft_s > 0 and self.slo_tpot_s > 0):
            raise ValueError("SLOs must be > 0 s")
        self.url = self.url.rstrip("/")


@dataclass
class RequestRecord:
    index: int  # position in the replayed trace
    trace_arrival_s: float  # arrival in the trace's own time
    scheduled_s: float  # when it was due, seconds after the replay's start
    prompt_tokens: int  # exact mode: the prompt's token count; natural: the trace's (not used)
    max_tokens: int
    sent_s: float | None = None
    send_lag_s: float | None = None
    end_s: float | None = None
    ok: bool = False
    status: int | str | None = None  # HTTP status, or the error kind (timeout, ConnectError, ...)
    error: str | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    tpot_s: float | None = None
    output_tokens: int = 0
    prompt_tokens_server: int | None = None  # usage.prompt_tokens
    cached_tokens_server: int | None = None  # usage.prompt_tokens_details.cached_tokens (prefix cache hits)
    finish_reason: str | None = None


def parse_server_metrics(text: str) -> dict[str, float | None]:
    """The lenserve: gauges of a Prometheus text page, summed over label sets; None when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    # A server's page has hundreds of histogram lines; parsing only the wanted gauges keeps a
    # scrape from stalling the event loop that times the sends.
    wanted = tuple(METRIC_PREFIX + name for name in SERVER_GAUGES)
    lines = [line for line in text.splitlines() if line.startswith(wanted) or (line.startswith("# ") and _is_about(line, wanted))]
    values: dict[str, float | None] = {name: None for name in SERVER_GAUGES}
    try:
        for family in text_string_to_metric_families("\n".join(lines) + "\n"):
            for sample in family.samples:
                name = sample.name[len(METRIC_PREFIX) :]
                if name in values and not math.isnan(sample.value):
                    values[name] = (values[name] or 0.0) + sample.value
    except ValueError as e:
        log.debug("unparsable /metrics page: %s", e)
    return values


def _is_about(comment: str, names: tuple[str, ...]) -> bool:
    """Whether a '# HELP name ...' / '# TYPE name ...' line is about one of names."""
    parts = comment.split(" ", 3)
    return len(parts) >= 3 and parts[2] in names


class Replayer:
    def __init__(self, trace: Trace, config: ReplayConfig) -> None:
        if not len(trace):
            raise ValueError(f"{trace.source or trace.name}: no requests to replay (check the window and filters)")
        self.trace = trace
        self.config = config
        self.records: list[RequestRecord] = []
        self.metrics_samples: list[dict] = []
        self.interrupted = False
        self.model = config.model
        self.started_at: str | None = None
        self.wall_duration_s: float | None = None
        self._t0 = 0.0

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    # -- requests ----------------------------------------------------------------------------

    def _payload(self, index: int, prompt_tokens: int, output_tokens: int, prompts, block_ids=None,
                 session: str | None = None) -> tuple[dict, int, int]:
        """(request body, prompt token count, max_tokens) for trace request `index`."""
        cfg = self.config
        body: dict = {"model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        if session is not None and cfg.send_session:
            body["user"] = session
        if cfg.mode == "exact" and block_ids and cfg.prefix_block_tokens:
            scale = cfg.prefix_block_tokens / float(self.trace.meta.get("block_tokens", 512))
            text, num_prompt = prompts.build_blocks(block_ids, max(round(prompt_tokens * scale), 1), cfg.prefix_block_tokens)
            max_tokens = max(int(output_tokens), 1)
            body["ignore_eos"] = True
        elif cfg.mode == "exact":
            text, num_prompt = prompts.build(index, prompt_tokens)
            # A failed BurstGPT row (0 response tokens) still arrived: send it for one token.
            max_tokens = max(int(output_tokens), 1)
            body["ignore_eos"] = True
        else:
            text, num_prompt = prompts.prompt(index), prompt_tokens
            max_tokens = cfg.max_tokens_cap
        body["max_tokens"] = max_tokens
        if cfg.temperature is not None:
            body["temperature"] = cfg.temperature
        if cfg.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        return body, num_prompt, max_tokens

    async def _send(self, client: SSEClient, record: RequestRecord, body: dict, progress) -> None:
        record.sent_s = self._now()
        record.send_lag_s = record.sent_s - record.scheduled_s
        last = None
        usage = None
        num_chunks = 0
        done = False
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                async with aclosing(client.stream(ENDPOINTS[self.config.endpoint], body)) as events:
                    async for data in events:
                        if done:
                            continue  # read to the end so the connection can be reused
                        if data.strip() == "[DONE]":
                            done = True
                            continue
                        chunk = json.loads(data)
                        if chunk.get("error"):
                            record.status = "stream_error"
                            record.error = json.dumps(chunk["error"])[:500]
                            return
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        for choice in chunk.get("choices") or ():
                            text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                            if text:
                                now = self._now()
                                if last is None:
                                    record.ttft_s = now - record.sent_s
                                else:
                                    record.itl_s.append(now - last)
                                last = now
                                num_chunks += 1
                            if choice.get("finish_reason"):
                                record.finish_reason = choice["finish_reason"]
            record.status = 200
            if done:
                record.ok = True
            else:
                record.status, record.error = "incomplete_stream", "the stream ended without data: [DONE]"
        except HTTPStatusError as e:
            record.status, record.error = e.status, e.body[:500]
        except TimeoutError:
            record.status, record.error = "timeout", f"no complete response within {self.config.request_timeout_s:g} s"
        except (OSError, asyncio.IncompleteReadError, ProtocolError) as e:
            record.status, record.error = type(e).__name__, str(e)[:500] or type(e).__name__
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            record.status, record.error = "bad_response", f"an SSE event is not JSON: {e}"
        finally:
            record.end_s = self._now()
            if record.ok:
                record.e2e_s = record.end_s - record.sent_s
                record.output_tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") is not None else num_chunks
                record.tpot_s = report_mod.tpot_s(record.e2e_s, record.ttft_s, record.output_tokens)
            if usage and usage.get("prompt_tokens") is not None:
                record.prompt_tokens_server = int(usage["prompt_tokens"])
            details = usage.get("prompt_tokens_details") if usage else None
            if isinstance(details, dict) and details.get("cached_tokens") is not None:
                record.cached_tokens_server = int(details["cached_tokens"])
            if progress is not None:
                progress.update(1)

    # -- /metrics ----------------------------------------------------------------------------

    async def _scrape_once(self, client: httpx.AsyncClient) -> None:
        try:
            resp = await client.get("/metrics", timeout=5.0)
        except httpx.HTTPError:
            return
        if resp.status_code == 200:
            self.metrics_samples.append({"t_s": self._now(), **parse_server_metrics(resp.text)})

    async def _scrape(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._scrape_once(client)
            try:
                await asyncio.wait_for(stop.wait(), self.config.metrics_interval_s)
            except asyncio.TimeoutError:
                pass

    # -- the run -----------------------------------------------------------------------------

    async def _resolve_model(self, client: httpx.AsyncClient) -> str:
        if self.config.model:
            return self.config.model
        try:
            resp = await client.get("/v1/models")
            resp.raise_for_status()
            return resp.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise RuntimeError(f"could not read the model name from {self.config.url}/v1/models ({e}); pass --model") from None

    async def _prompt_source(self, client: httpx.AsyncClient):
        cfg = self.config
        if cfg.mode == "natural":
            return NaturalPrompts(cfg.prompts_path, cfg.seed)
        counter = LocalTokenCounter(cfg.tokenizer) if cfg.tokenizer else ServerTokenCounter(client)
        return await ExactPromptBuilder.create(counter, seed=cfg.seed)

    async def run(self) -> None:
        cfg = self.config
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        # httpx for the control plane (/v1/models, /tokenize, /metrics); generation requests go
        # through SSEClient (see sse_client.py for why), with no cap on connections: open loop.
        async with httpx.AsyncClient(base_url=cfg.url, headers=headers, timeout=httpx.Timeout(30.0)) as client:
            self.model = await self._resolve_model(client)
            prompts = await self._prompt_source(client)
            send_times = self.trace.send_times_s(cfg.time_scale).tolist()
            columns = self.trace.columns
            arrivals = columns.arrival_s.tolist()
            prompt_tokens = columns.prompt_tokens.tolist()
            output_tokens = columns.output_tokens.tolist()
            block_ids = columns.hash_ids.tolist() if columns.hash_ids is not None else [None] * len(send_times)
            sessions = columns.sessions()
            progress = _progress_bar(len(send_times), cfg.show_progress)
            streams = SSEClient(cfg.url, headers, connect_timeout_s=30.0)
            stop_scraping = asyncio.Event()
            scraper = None
            tasks: set[asyncio.Task] = set()
            self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            # Everything allocated so far lives for the whole run: keep the collector from
            # re-scanning it, so collections during the run stay short and do not delay sends.
            gc.collect()
            gc.freeze()
            self._t0 = time.perf_counter()
            if cfg.metrics_interval_s > 0:
                scraper = asyncio.create_task(self._scrape(client, stop_scraping))
            try:
                for i, due in enumerate(send_times):
                    body, num_prompt, max_tokens = self._payload(i, prompt_tokens[i], output_tokens[i], prompts, block_ids[i], sessions[i])
                    record = RequestRecord(i, arrivals[i], due, num_prompt, max_tokens)
                    self.records.append(record)
                    delay = due - self._now()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    task = asyncio.create_task(self._send(streams, record, body, progress))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(set(tasks))
            except asyncio.CancelledError:
                self.interrupted = True
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.records = [r for r in self.records if r.sent_s is not None]
                for record in self.records:
                    if record.status is None:  # still streaming when stopped
                        record.status, record.error = "cancelled", "replay interrupted"
                        record.end_s = record.end_s or self._now()
            finally:
                self.wall_duration_s = self._now()
                if scraper is not None:
                    stop_scraping.set()
                    await asyncio.gather(scraper, return_exceptions=True)
                    await self._scrape_once(client)
                if progress is not None:
                    progress.close()
                await streams.aclose()
                gc.unfreeze()

    def info(self) -> dict:
        cfg = self.config
        return {
            "url": cfg.url,
            "model": self.model,
            "mode": cfg.mode,
            "endpoint": cfg.endpoint,
            "time_scale": cfg.time_scale,
            "max_tokens_cap": cfg.max_tokens_cap if cfg.mode == "natural" else None,
            "tokenizer": cfg.tokenizer or ("server /tokenize" if cfg.mode == "exact" else None),
            "seed": cfg.seed,
            "prefix_block_tokens": cfg.prefix_block_tokens,
            "started_at": self.started_at,
            "wall_duration_s": self.wall_duration_s,
            "client_host": platform.node(),
            "trace": {"name": self.trace.name, "source": self.trace.source, "num_requests": len(self.trace), "origin_s": self.trace.origin_s, "meta": _jsonable(self.trace.meta)},
        }


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="replay", unit="req", dynamic_ncols=True)


def write_outputs(replayer: Replayer, out_dir: str | Path) -> dict:
    """requests.jsonl, metrics.jsonl, report.json, report.md and the plots; returns the report."""
    from lenserve.traces.plots import write_plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [asdict(r) for r in replayer.records]
    report_mod.write_jsonl(out / "requests.jsonl", records)
    report_mod.write_jsonl(out / "metrics.jsonl", replayer.metrics_samples)
    report = report_mod.build_report(records, replayer.config.slo_ttft_s, replayer.config.slo_tpot_s)
    if replayer.interrupted:
        report["interrupted"] = True
    report["replay"] = replayer.info()
    plots = write_plots(out, records, replayer.metrics_samples, report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_mod.render_markdown(report, [p.name for p in plots]))
    return report


def replay(trace: Trace, config: ReplayConfig, out_dir: str | Path) -> dict:
    """Replays `trace` and writes the outputs to out_dir; returns the report (also on Ctrl-C)."""
    replayer = Replayer(trace, config)
    try:
        asyncio.run(replayer.run())
    except KeyboardInterrupt:
        replayer.interrupted = True
    if not replayer.records:
        raise RuntimeError("no request was sent")
    return write_outputs(replayer, out_dir)
