"""AsyncEngine: the engine core in its own thread, async iterators of output deltas per request.

HTTP handlers never run model code: they validate and tokenize, enqueue a command, and await
their request's asyncio queue. The core thread drains commands between steps, runs a step
(torch releases the GIL), and hands each step's outputs to the event loop in one call. A
consumer that stops iterating (a client disconnect) aborts its request, which frees its KV
blocks before the next step.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence as Seq

from lenserve.engine.llm_engine import LLMEngine
from lenserve.engine.outputs import RequestOutput
from lenserve.engine.sampling_params import SamplingParams
from lenserve.engine.stats import IterationStats
from lenserve.predictor.types import LengthPrediction

logger = logging.getLogger("lenserve")

MAX_CONSECUTIVE_FAULTS = 3


class QueueFullError(RuntimeError):
    """The waiting queue is at --max-queue; retry later."""

    def __init__(self, max_queue: int, retry_after_s: float) -> None:
        super().__init__(f"the server is at capacity ({max_queue} requests waiting); retry later")
        self.retry_after_s = retry_after_s


class EngineDeadError(RuntimeError):
    """The engine core stopped and cannot serve."""


class EngineFaultError(RuntimeError):
    """An engine step failed; the requests in it were ended."""


@dataclass
class _Add:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    prediction: LengthPrediction | None
    priority: int
    arrival_time: float


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_queue = max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.stats_listeners: list[Callable[[IterationStats], None]] = []
        self.dead_reason: str | None = None
        self.num_consecutive_faults = 0
        self.num_waiting = 0  # published by the core thread after each step
        self.num_running = 0
        self._num_enqueued = 0  # adds not yet seen by the core thread
        self.fault_hook: Callable[[], None] | None = None  # tests inject step faults through this
        self.last_step_time = time.monotonic()
        self._idle_published = False  # publish the idle state once at start, so gauges exist

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lenserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def healthy(self) -> bool:
        return self.dead_reason is None and self._thread is not None and self._thread.is_alive()

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    # ---- requests (event-loop side) ------------------------------------------------------------------
    def validate(
        self, prompt: str | Seq[int], params: SamplingParams, prompt_token_ids: list[int] | None = None
    ) -> tuple[str | None, list[int]]:
        """Tokenizes and checks a request; raises ValueError with the field and limit."""
        if prompt_token_ids is None:
            text, ids = self.engine.encode_prompt(prompt)
        else:
            text, ids = (prompt if isinstance(prompt, str) else None), self.engine.check_token_ids(prompt_token_ids)
        if not ids:
            raise ValueError("prompt must not be empty (it encodes to no tokens)")
        params.check_against_model(self.engine.arch.vocab_size, len(ids), self.engine.max_model_len)
        return text, ids

    def add_request(
        self,
        request_id: str,
        prompt: str | Seq[int],
        params: SamplingParams,
        *,
        prompt_token_ids: list[int] | None = None,
        prediction: LengthPrediction | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> "RequestStream":
        """Queues a request and returns its stream of output deltas.

        Raises ValueError (bad input), QueueFullError or EngineDeadError at once, before any output.
        The caller must `close()` the stream (or exhaust it); closing early aborts the request.
        """
        if not self.healthy:
            raise EngineDeadError(self.dead_reason or "the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"duplicate request_id {request_id!r}")
        text, ids = self.validate(prompt, params, prompt_token_ids)
        if self.max_queue is not None and self.num_waiting + self._num_enqueued >= self.max_queue:
            raise QueueFullError(self.max_queue, retry_after_s=self._retry_after())
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        self._num_enqueued += 1
        self._commands.put(_Add(request_id, text, ids, params, prediction, priority, time.monotonic()))
        self._wake.set()
        return RequestStream(self, request_id, q, text, ids, timeout_s)

    async def generate(self, request_id: str, prompt: str | Seq[int], params: SamplingParams, **kwargs) -> AsyncIterator[RequestOutput]:
        """add_request + iterate, as one async generator (aborts when the consumer stops early)."""
        stream = self.add_request(request_id, prompt, params, **kwargs)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def expire_all(self) -> None:
        """Event-loop side: ends every open request as if its timeout had passed (finish_reason
        "abort"), for a shutdown whose grace period is over; their blocks are freed."""
        for q in list(self._streams.values()):
            q.put_nowait(_EXPIRED)

    def abort(self, request_id: str) -> None:
        """Thread-safe; the core thread frees the request's blocks before its next step."""
        self._commands.put(_Abort(request_id))
        self._wake.set()

    def _retry_after(self) -> float:
        return max(1.0, round(self.engine.last_stats.step_time_s * max(self.num_waiting, 1), 1))

    # ---- core thread ---------------------------------------------------------------------------------
    def _deliver(self, items: list[tuple[str, object]]) -> None:
        for rid, item in items:
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put_nowait(item)

    def _post(self, items: list[tuple[str, object]]) -> None:
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, items)

    def _drain_commands(self, block: bool) -> None:
        eng = self.engine
        if block:
            self._wake.wait(timeout=0.5)
        self._wake.clear()
        failed: list[tuple[str, object]] = []
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Add):
                self._num_enqueued -= 1
                # Added even when the client already left: its _Abort follows in the queue and
                # records the abort, so every admitted request is accounted for exactly once.
                try:
                    eng.add_request(
                        cmd.request_id, cmd.prompt if cmd.prompt is not None else cmd.prompt_token_ids, cmd.params,
                        arrival_time=cmd.arrival_time, prediction=cmd.prediction, priority=cmd.priority,
                        prompt_token_ids=cmd.prompt_token_ids,
                    )
                except ValueError as e:
                    failed.append((cmd.request_id, e))
            else:
                eng.abort_request(cmd.request_id)
        self._post(failed)

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                self._drain_commands(block=not eng.has_unfinished_requests())
                if not eng.has_unfinished_requests():
                    self._publish_counts()
                    pending = eng.take_pending_finished()
                    if not self._idle_published or pending:
                        # aborts freed blocks without a step: let gauges and counters see it
                        self._idle_published = True
                        self._notify(IterationStats(scheduler=eng.scheduler.stats(), finished=pending))
                    continue
                self._idle_published = False
                try:
                    if self.fault_hook is not None:
                        self.fault_hook()
                    outputs = eng.step()
                    self.num_consecutive_faults = 0
                except Exception as e:  # an engine step failed: end the requests it held, keep serving
                    self._handle_fault(e)
                    continue
                self.last_step_time = time.monotonic()
                self._post([(o.request_id, o) for o in outputs])
                self._publish_counts()
                self._notify(eng.last_stats)
        except BaseException as e:
            self.dead_reason = f"engine core crashed: {e!r}"
            logger.exception("engine core crashed")
        finally:
            rids = list(eng.requests)
            for rid in rids:
                eng.abort_request(rid)
            err = EngineDeadError(self.dead_reason or "the engine shut down")
            self._post([(rid, err) for rid in list(self._streams)])

    def _notify(self, stats: IterationStats) -> None:
        for listener in self.stats_listeners:
            try:
                listener(stats)
            except Exception:
                logger.exception("stats listener failed")

    def _publish_counts(self) -> None:
        self.num_waiting = self.engine.scheduler.num_waiting
        self.num_running = self.engine.scheduler.num_running

    def _handle_fault(self, exc: Exception) -> None:
        eng = self.engine
        self.num_consecutive_faults += 1
        logger.error("engine step failed (%d in a row): %r", self.num_consecutive_faults, exc, exc_info=exc)
        affected = sorted({eng._seq_to_request.get(s.request_id, (s.request_id, 0))[0] for s in eng.scheduler.running})
        message = f"the engine failed while running this request: {type(exc).__name__}: {exc}"
        eng.fail_requests(affected, message)
        err = EngineFaultError(message)
        self._post([(rid, err) for rid in affected])
        if self.num_consecutive_faults >= MAX_CONSECUTIVE_FAULTS:
            self.dead_reason = f"{self.num_consecutive_faults} consecutive engine faults, last: {exc!r}"
            self._stop.set()


_EXPIRED = object()  # queued by expire_all: the stream ends as a timeout


class RequestStream:
    """Async iterator over one request's RequestOutput deltas."""

    def __init__(self, engine: AsyncEngine, request_id: str, q: asyncio.Queue, text: str | None, ids: list[int], timeout_s: float | None) -> None:
        self.engine = engine
        self.request_id = request_id
        self.prompt = text
        self.prompt_token_ids = ids
        self._queue = q
        self._deadline = time.monotonic() + timeout_s if timeout_s else None
        self.finished = False
        self.timed_out = False
        self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        if self._deadline is None:
            item = await self._queue.get()
        else:
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout=max(self._deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                self.timed_out = True
                self.close()
                raise
        if item is _EXPIRED:
            self.timed_out = True
            self.close()
            raise asyncio.TimeoutError
        if isinstance(item, BaseException):
            self.finished = True
            self.close()
            raise item
        if item.finished:
            self.finished = True
            self.close()
        return item

    def close(self) -> None:
        """Detaches the stream; aborts the request if it has not finished (frees its KV blocks)."""
        if self._closed:
            return
        self._closed = True
        self.engine._streams.pop(self.request_id, None)
        if not self.finished:
            self.engine.abort(self.request_id)
