"""The completion and chat endpoints: validate, tokenize, predict, submit, then stream SSE or return JSON."""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lenserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineFaultError, QueueFullError, RequestStream
from lenserve.engine.outputs import CompletionOutput, RequestOutput
from lenserve.engine.sampler import SampleLogprobs
from lenserve.engine.sampling_params import SamplingParams
from lenserve.predictor.types import LengthPrediction, PromptInput
from lenserve.server.errors import APIError, error_body
from lenserve.server.metrics import Metrics
from lenserve.server.protocol import ChatCompletionRequest, CompletionRequest, now, random_id

logger = logging.getLogger("lenserve")


@dataclass
class _Job:
    stream: RequestStream
    prompt_index: int
    prediction: LengthPrediction | None
    n: int = 1


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _prediction_info(pred: LengthPrediction | None) -> dict | None:
    if pred is None:
        return None
    return {"predicted_tokens": round(pred.mean, 1), "predicted_p90_tokens": round(pred.p90, 1), "bucket": pred.bucket}


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncEngine,
        served_model_names: list[str],
        metrics: Metrics,
        predictor: Any = None,
        request_timeout_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.model_names = served_model_names
        self.metrics = metrics
        self.predictor = predictor
        # the trained model whose lengths the served one is predicted by (a CASTILLO model when a
        # user serves one of their checkpoints, else the predictor's default)
        self.predictor_model = predictor.resolve_model(*served_model_names, engine.engine.model_name) if predictor is not None else None
        if predictor is not None:
            logger.info("length predictor answers as %s", self.predictor_model)
        self.request_timeout_s = request_timeout_s
        self.tokenizer = engine.tokenizer

    # ---- shared -----------------------------------------------------------------------------------
    def tokenize(self, req) -> dict:
        """POST /tokenize (a TokenizeRequest): the prompt or chat messages as the model's token ids."""
        self.check_model(req.model)
        tok = self.engine.tokenizer
        if req.messages is not None:
            msgs = ChatCompletionRequest(messages=req.messages).messages_as_dicts()
            ids = tok.encode_chat(msgs, add_generation_prompt=req.add_generation_prompt)
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.engine.max_model_len}

    def detokenize(self, req) -> dict:
        """POST /detokenize (a DetokenizeRequest): token ids, each checked against the vocabulary, as text."""
        self.check_model(req.model)
        vocab = self.engine.engine.arch.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens must be in [0, {vocab}), got {bad[0]}", "tokens")
        return {"prompt": self.engine.tokenizer.decode(req.tokens)}

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.model_names:
            return self.model_names[0]
        raise APIError(404, f"the model '{name}' does not exist; this server serves {self.model_names}", "model", "model_not_found")

    def _predict(self, text: str, num_tokens: int, max_tokens: int | None) -> LengthPrediction | None:
        if self.predictor is None:
            return None
        try:
            return self.predictor.predict([PromptInput(text=text, num_tokens=num_tokens, max_tokens=max_tokens)], model=self.predictor_model)[0]
        except Exception:
            logger.exception("length prediction failed; scheduling without it")
            return None

    def _submit(
        self, rid: str, prompts: list[tuple[str | None, list[int]]], params: SamplingParams, priority: int
    ) -> list[_Job]:
        """Validates every prompt first, then queues them all; on any error nothing stays queued."""
        checked = []
        for text, ids in prompts:
            try:
                _, ids = self.engine.validate(text if ids is None else ids, params, ids)
            except ValueError as e:
                self.metrics.record_rejected("invalid")
                raise APIError(400, str(e), _param_of(str(e))) from None
            if text is None:
                text = self.tokenizer.decode(ids)
            checked.append((text, ids))
        jobs: list[_Job] = []
        try:
            for i, (text, ids) in enumerate(checked):
                pred = self._predict(text, len(ids), params.max_tokens)
                stream = self.engine.add_request(
                    f"{rid}-{i}", text, params, prompt_token_ids=ids, prediction=pred, priority=priority,
                    timeout_s=self.request_timeout_s,
                )
                self.metrics.record_admitted(pred.bucket if pred else None)
                jobs.append(_Job(stream, i, pred, params.n))
        except QueueFullError as e:
            for j in jobs:
                j.stream.close()
            self.metrics.record_rejected("queue_full")
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(int(max(1, e.retry_after_s)))}) from None
        except EngineDeadError as e:
            for j in jobs:
                j.stream.close()
            raise APIError(503, f"the engine is not available: {e}", code="engine_dead") from None
        except ValueError as e:
            for j in jobs:
                j.stream.close()
            raise APIError(400, str(e), _param_of(str(e))) from None
        return jobs

    async def _pump(self, jobs: list[_Job]) -> AsyncIterator[tuple[_Job, RequestOutput]]:
        """Merges the jobs' streams; yields (job, delta). Timeouts become finish_reason 'abort'."""
        q: asyncio.Queue = asyncio.Queue()
        done = object()

        async def drain(job: _Job) -> None:
            last: RequestOutput | None = None
            try:
                async for out in job.stream:
                    last = out
                    await q.put((job, out))
            except asyncio.TimeoutError:
                await q.put((job, _timed_out(job, last)))
            except (EngineFaultError, EngineDeadError) as e:
                await q.put((job, e))
            finally:
                job.stream.close()
                await q.put(done)

        tasks = [asyncio.create_task(drain(j)) for j in jobs]
        remaining = len(tasks)
        try:
            while remaining:
                item = await q.get()
                if item is done:
                    remaining -= 1
                    continue
                job, out = item
                if isinstance(out, Exception):
                    raise APIError(500 if isinstance(out, EngineFaultError) else 503, str(out), code="engine_error")
                yield job, out
        finally:
            for t in tasks:
                t.cancel()
            for j in jobs:
                j.stream.close()

    async def _collect(self, jobs: list[_Job], request: Request) -> dict[int, RequestOutput]:
        """Runs jobs to the end; a client disconnect aborts them."""
        finals: dict[int, RequestOutput] = {}

        async def run() -> None:
            async for job, out in self._pump(jobs):
                if out.finished:
                    finals[job.prompt_index] = out

        worker = asyncio.create_task(run())
        watcher = asyncio.create_task(_wait_disconnect(request))
        try:
            await asyncio.wait({worker, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not worker.done():
                worker.cancel()
                for j in jobs:
                    j.stream.close()
                raise APIError(499, "client disconnected")
        worker.result()
        return finals

    def _usage(self, jobs: list[_Job], outputs: dict[int, RequestOutput]) -> dict:
        prompt = sum(len(j.stream.prompt_token_ids) for j in jobs)
        completion = sum(len(c.token_ids) for o in outputs.values() for c in o.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- /v1/completions ------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, request: Request):
        model = self.check_model(req.model)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported", "echo")
        params = _params(req, req.max_tokens, req.logprobs)
        prompts = [(p, None) if isinstance(p, str) else (None, list(p)) for p in req.prompts()]
        prompts = [(t, self.tokenizer.encode(t) if ids is None else ids) for t, ids in prompts]
        rid = random_id("cmpl")
        jobs = self._submit(rid, prompts, params, req.priority)
        n = params.n
        created = now()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream_completion(jobs, rid, created, model, n, req.echo, include_usage), media_type="text/event-stream")
        finals = await self._collect(jobs, request)
        choices = []
        for job in jobs:
            out = finals[job.prompt_index]
            for c in out.outputs:
                text = (job.stream.prompt or "") + c.text if req.echo else c.text
                choices.append({
                    "index": job.prompt_index * n + c.index,
                    "text": text,
                    "logprobs": self._completion_logprobs(c.logprobs, c.text) if c.logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                })
        body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                "usage": self._usage(jobs, finals)}
        info = _prediction_info(jobs[0].prediction)
        if info is not None:
            body["lenserve"] = info
        return JSONResponse(body)

    def _completion_logprobs(self, lps: list[SampleLogprobs], text: str, offset0: int = 0) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        pos = offset0
        for lp in lps:
            piece = self.tokenizer.id_to_piece(lp.token_id)
            tokens.append(piece)
            token_lps.append(lp.logprob)
            tops.append({self.tokenizer.id_to_piece(t): v for t, v in lp.top})
            offsets.append(pos)
            pos += len(piece)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    async def _stream_completion(self, jobs, rid, created, model, n, echo, include_usage) -> AsyncIterator[str]:
        sse = _ChunkStream({"id": rid, "object": "text_completion", "created": created, "model": model},
                           include_usage, _prediction_info(jobs[0].prediction))
        try:
            if echo:
                for job in jobs:
                    for i in range(n):
                        yield _sse({**sse.base, "choices": [{"index": job.prompt_index * n + i, "text": job.stream.prompt or "", "logprobs": None, "finish_reason": None}]})
            async for job, out in self._pump(jobs):
                choices = []
                for c in out.outputs:
                    if not c.delta_text and c.finish_reason is None and not c.delta_token_ids:
                        continue
                    choices.append({
                        "index": job.prompt_index * n + c.index,
                        "text": c.delta_text,
                        "logprobs": self._completion_logprobs(c.delta_logprobs, c.delta_text) if c.delta_logprobs else None,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason if c.finish_reason else None,
                    })
                sse.finished(job, out)
                if choices:
                    yield sse.chunk(choices)
            for line in sse.end(lambda: self._usage(jobs, sse.finals)):
                yield line
        except APIError as e:
            for line in _sse_error(e):
                yield line

    # ---- /v1/chat/completions ---------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, request: Request):
        model = self.check_model(req.model)
        top = req.top_logprobs if req.logprobs else None
        params = _params(req, req.effective_max_tokens(), (top or 0) if req.logprobs else None)
        try:
            ids = self.tokenizer.encode_chat(req.messages_as_dicts(), add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # a template that raises on this conversation
            raise APIError(400, f"messages could not be rendered with the model's chat template: {e}", "messages") from None
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        rid = random_id("chatcmpl")
        jobs = self._submit(rid, [(text, ids)], params, req.priority)
        created = now()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream_chat(jobs, rid, created, model, include_usage, req.logprobs), media_type="text/event-stream")
        finals = await self._collect(jobs, request)
        out = finals[0]
        choices = [{
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": {"content": self._chat_logprobs(c.logprobs)} if req.logprobs else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        } for c in out.outputs]
        body = {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": self._usage(jobs, finals)}
        info = _prediction_info(jobs[0].prediction)
        if info is not None:
            body["lenserve"] = info
        return JSONResponse(body)

    def _chat_logprobs(self, lps: list[SampleLogprobs] | None) -> list[dict]:
        result = []
        for lp in lps or []:
            piece = self.tokenizer.id_to_piece(lp.token_id)
            result.append({
                "token": piece, "logprob": lp.logprob, "bytes": list(piece.encode("utf-8")),
                "top_logprobs": [
                    {"token": (p := self.tokenizer.id_to_piece(t)), "logprob": v, "bytes": list(p.encode("utf-8"))} for t, v in lp.top
                ],
            })
        return result

    async def _stream_chat(self, jobs, rid, created, model, include_usage, logprobs) -> AsyncIterator[str]:
        sse = _ChunkStream({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model},
                           include_usage, _prediction_info(jobs[0].prediction))
        started: set[int] = set()
        try:
            async for job, out in self._pump(jobs):
                choices = []
                for c in out.outputs:
                    if c.index not in started:
                        started.add(c.index)
                        yield sse.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
                    if not c.delta_text and c.finish_reason is None:
                        continue
                    choices.append({
                        "index": c.index,
                        "delta": {"content": c.delta_text} if c.delta_text else {},
                        "logprobs": {"content": self._chat_logprobs(c.delta_logprobs)} if logprobs and c.delta_logprobs else None,
                        "finish_reason": c.finish_reason,
                    })
                sse.finished(job, out)
                if choices:
                    yield sse.chunk(choices)
            for line in sse.end(lambda: self._usage(jobs, sse.finals)):
                yield line
        except APIError as e:
            for line in _sse_error(e):
                yield line

class _ChunkStream:
    """The chunks of one streamed response: each carries the response's id/object/created/model,
    `usage: null` when the client asked for usage, and the length prediction on the first one."""

    def __init__(self, base: dict, include_usage: bool, info: dict | None) -> None:
        self.base = base
        self.include_usage = include_usage
        self.info = info
        self.finals: dict[int, RequestOutput] = {}

    def chunk(self, choices: list[dict]) -> str:
        chunk = {**self.base, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        if self.info is not None:
            chunk["lenserve"], self.info = self.info, None
        return _sse(chunk)

    def finished(self, job, out: RequestOutput) -> None:
        if out.finished:
            self.finals[job.prompt_index] = out

    def end(self, usage) -> list[str]:
        """The last lines: the usage chunk (`usage()` is called only when asked for), then [DONE]."""
        lines = [_sse({**self.base, "choices": [], "usage": usage()})] if self.include_usage else []
        return lines + ["data: [DONE]\n\n"]


def _sse_error(e: APIError) -> list[str]:
    """A stream that fails after its head was sent: an error event, then [DONE]."""
    return [_sse(error_body(e.status, e.message, e.param, e.code)), "data: [DONE]\n\n"]


def _params(req, max_tokens, logprobs) -> SamplingParams:
    try:
        return req.sampling_params(max_tokens, logprobs)
    except ValueError as e:
        raise APIError(400, str(e), _param_of(str(e))) from None


def _param_of(message: str) -> str | None:
    for name in ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "stop_token_ids", "stop",
                 "logprobs", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "n", "prompt"):
        if message.startswith(name) or f" {name} " in message or f"+ {name}" in message or f"({name}" in message:
            return name
    return None


def _timed_out(job: _Job, last: RequestOutput | None) -> RequestOutput:
    """The final output of a request ended by --request-timeout-s: what it had, finish_reason 'abort'."""
    import dataclasses
    import time

    from lenserve.engine.outputs import RequestMetrics

    if last is None:
        outputs = [CompletionOutput(index=i, finish_reason="abort") for i in range(job.n)]
        metrics = RequestMetrics(arrival_time=time.monotonic())
    else:
        outputs = [
            dataclasses.replace(c, finish_reason=c.finish_reason or "abort", delta_text="", delta_token_ids=[], delta_logprobs=None)
            for c in last.outputs
        ]
        metrics = last.metrics
    return RequestOutput(
        request_id=job.stream.request_id, prompt=job.stream.prompt, prompt_token_ids=job.stream.prompt_token_ids,
        outputs=outputs, finished=True, metrics=metrics, error="request timed out",
    )
