"""POST /v1/completions: prompts in, text (streamed as SSE or one JSON body) out."""
from __future__ import annotations

from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from lenserve.engine.sampler import SampleLogprobs
from lenserve.server.errors import APIError
from lenserve.server.protocol import CompletionRequest, now, random_id
from lenserve.server.serving_engine import OpenAIServingBase, _ChunkStream, _prediction_info, _sse, _sse_error, constrained_params


class OpenAIServingCompletion(OpenAIServingBase):
    async def completions(self, req: CompletionRequest, request: Request):
        model = self.check_model(req.model)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported", "echo")
        params = await constrained_params(self, req, req.max_tokens, req.logprobs)
        prompts = [(p, None) if isinstance(p, str) else (None, list(p)) for p in req.prompts()]
        prompts = [(t, self.encode_prompt(t) if ids is None else ids) for t, ids in prompts]
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
        return self._response(rid, "text_completion", created, model, choices, jobs, finals)

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
