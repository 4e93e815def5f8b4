"""What the completion and chat endpoints share: validate, compile the constraint, tokenize, predict,
submit, then merge the outputs into SSE chunks or one JSON body (serving_completion.py and
serving_chat.py build on it)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from lenserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineFaultError, QueueFullError, RequestStream
from lenserve.engine.outputs import CompletionOutput, RequestOutput
from lenserve.engine.sampling_params import SamplingParams
from lenserve.engine.structured_output import StructuredOutputSpec
from lenserve.engine.structured_output.xgrammar_backend import GrammarError
from lenserve.predictor.types import LengthPrediction, PromptInput, bucket_of
from lenserve.server.errors import APIError, error_body
from lenserve.server.metrics import Metrics
from lenserve.server.protocol import ChatCompletionRequest

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


class OpenAIServingBase:
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
        # gets each completion prompt's text, token ids and their characters (a Ray replica's prefix digest)
        self.prompt_listener: Callable[[str, list[int], list[tuple[int, int]]], None] | None = None

    # ---- shared -----------------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt's token ids; with a prompt listener, from the same one encoding that
        gives it their characters."""
        if self.prompt_listener is None:
            return self.tokenizer.encode(text)
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        self.prompt_listener(text, ids, offsets)
        return ids

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

    async def compile_constraint(self, spec: StructuredOutputSpec, param: str) -> None:
        """Compiles (or finds in the cache) a grammar on a worker thread, so the engine finds it
        compiled; a constraint xgrammar rejects is the client's error, named by `param`."""
        try:
            _, compile_s = await asyncio.to_thread(self.engine.engine.structured_output.compile, spec)
        except GrammarError as e:
            self.metrics.record_rejected("invalid")
            raise APIError(400, f"{param}: cannot be compiled into a grammar: {e}", param) from None
        self.metrics.record_grammar(compile_s)

    def _answer_cap(self, spec: StructuredOutputSpec | None) -> int | None:
        """Tokens of the longest answer a constraint allows, plus the end token; None when unbounded."""
        answers = spec.bounded_answers() if spec is not None else None
        if not answers:
            return None
        return max(len(ids) for ids in self.tokenizer.encode_batch(answers, add_special_tokens=False)) + 1

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
        cap = self._answer_cap(params.structured_output)
        try:
            for i, (text, ids) in enumerate(checked):
                pred = _capped(self._predict(text, len(ids), params.max_tokens), cap)
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
        # OpenAI's prompt caching field: the prompt tokens the prefix cache held at admission
        cached = sum(o.metrics.num_cached_tokens for o in outputs.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _response(self, rid: str, obj: str, created: int, model: str, choices: list[dict], jobs: list[_Job],
                  finals: dict[int, RequestOutput]) -> JSONResponse:
        """The non-streamed body of a finished request: its choices, usage, and the length prediction."""
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, "usage": self._usage(jobs, finals)}
        info = _prediction_info(jobs[0].prediction)
        if info is not None:
            body["lenserve"] = info
        return JSONResponse(body)

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


def _capped(pred: LengthPrediction | None, cap: int | None) -> LengthPrediction | None:
    """The prediction, no longer than the longest answer the constraint allows."""
    if pred is None or cap is None or pred.p90 <= cap:
        return pred
    mean, p50, p90 = min(pred.mean, cap), min(pred.p50, cap), float(cap)
    return dataclasses.replace(pred, mean=mean, p50=p50, p90=p90, bucket=bucket_of(mean),
                               quantiles={q: min(v, cap) for q, v in pred.quantiles.items()})


def _params(req, max_tokens, logprobs, structured_output: StructuredOutputSpec | None = None) -> SamplingParams:
    try:
        params = req.sampling_params(max_tokens, logprobs)
    except ValueError as e:
        raise APIError(400, str(e), _param_of(str(e))) from None
    params.structured_output = structured_output
    return params


async def constrained_params(serving: OpenAIServingBase, req, max_tokens, logprobs,
                             extra: tuple[StructuredOutputSpec, str, str] | None = None) -> SamplingParams:
    """The request's SamplingParams with its constraint compiled: the one its structured-output
    fields ask for, or `extra` (spec, param, metric kind) that the endpoint adds (a tool call)."""
    try:
        spec, param = req.structured_output()
    except ValueError as e:
        raise APIError(400, str(e), _param_of(str(e)) or "response_format") from None
    kind = spec.kind if spec is not None else None
    if extra is not None:
        if spec is not None:
            raise APIError(400, f"{param} cannot be combined with tool_choice {extra[1]!r}", param)
        spec, param, kind = extra
    params = _params(req, max_tokens, logprobs, spec)
    if spec is not None:
        await serving.compile_constraint(spec, param)
        serving.metrics.record_structured_output(kind)
    return params


def _param_of(message: str) -> str | None:
    for name in ("logit_bias", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
                 "response_format", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "stop_token_ids", "stop",
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
