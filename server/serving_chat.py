"""POST /v1/chat/completions: messages in (rendered with the model's chat template), an assistant
message out, with tool calls.

tool_choice `required` and a named function constrain the output to the tools' parameter schemas
(a JSON array of {name, parameters} for `required`, the function's arguments object for a named
one), so those calls parse by construction; `auto` lets the model write and parses its Hermes-style
`<tool_call>` blocks."""
from __future__ import annotations

import json
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from lenserve.engine.outputs import CompletionOutput
from lenserve.engine.sampler import SampleLogprobs
from lenserve.engine.structured_output import StructuredOutputSpec
from lenserve.server.errors import APIError
from lenserve.server.protocol import ChatCompletionRequest, now, random_id
from lenserve.server.serving_engine import OpenAIServingBase, _ChunkStream, _prediction_info, _sse_error, constrained_params
from lenserve.server.tool_parsers import HermesToolParser


def _tool_call(name: str, arguments: str) -> dict:
    return {"id": random_id("call"), "type": "function", "function": {"name": name, "arguments": arguments}}


def _tool_spec(req: ChatCompletionRequest, mode: str) -> tuple[StructuredOutputSpec, str, str] | None:
    """The constraint a tool_choice imposes: (spec, param, metric kind), or None for none/auto."""
    tools = {t.function.name: t.function.parameters or {"type": "object"} for t in req.tools or []}
    if mode == "named":
        name = req.tool_choice.function.name
        return StructuredOutputSpec.json_schema(tools[name]), "tool_choice", "tool"
    if mode == "required":
        schema = {
            "type": "array",
            "minItems": 1,
            "items": {"anyOf": [
                {"type": "object", "properties": {"name": {"const": name}, "parameters": params}, "required": ["name", "parameters"]}
                for name, params in tools.items()
            ]},
        }
        return StructuredOutputSpec.json_schema(schema), "tools", "tool"
    return None


def _required_calls(text: str) -> list[dict] | None:
    """The calls of a `required` answer (a JSON array by its grammar); None when it was cut short."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [_tool_call(it["name"], json.dumps(it["parameters"], ensure_ascii=False)) for it in items]


class OpenAIServingChat(OpenAIServingBase):
    async def _check_tool_schemas(self, req: ChatCompletionRequest) -> None:
        """Every tool's parameters must compile (cached), whatever tool_choice says: a malformed
        schema is the client's error now rather than a failure at the first call."""
        for i, tool in enumerate(req.tools or []):
            if tool.function.parameters is not None:
                spec = StructuredOutputSpec.json_schema(tool.function.parameters)
                await self.compile_constraint(spec, f"tools[{i}].function.parameters")

    def _render(self, req: ChatCompletionRequest, mode: str) -> list[int]:
        messages = req.messages_as_dicts()
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if mode != "none" else None
        template = self.tokenizer.chat_template or ""
        kwargs: dict[str, Any] = {}
        if "tool" in template:
            if tools:
                kwargs["tools"] = tools
        elif tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            messages = HermesToolParser.render_history(messages, tools)
        try:
            return self.tokenizer.encode_chat(messages, add_generation_prompt=req.add_generation_prompt, **kwargs)
        except Exception as e:  # a template that raises on this conversation
            raise APIError(400, f"messages could not be rendered with the model's chat template: {e}", "messages") from None

    async def chat(self, req: ChatCompletionRequest, request: Request):
        model = self.check_model(req.model)
        mode = req.tool_choice_mode()
        await self._check_tool_schemas(req)
        top = req.top_logprobs if req.logprobs else None
        params = await constrained_params(self, req, req.effective_max_tokens(), (top or 0) if req.logprobs else None,
                                          _tool_spec(req, mode))
        ids = self._render(req, mode)
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        rid = random_id("chatcmpl")
        jobs = self._submit(rid, [(text, ids)], params, req.priority)
        created = now()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream_chat(jobs, rid, created, model, include_usage, req, mode),
                                     media_type="text/event-stream")
        finals = await self._collect(jobs, request)
        out = finals[0]
        choices = []
        for c in out.outputs:
            message, finish_reason = self._message(c, req, mode)
            choices.append({
                "index": c.index,
                "message": message,
                "logprobs": {"content": self._chat_logprobs(c.logprobs)} if req.logprobs else None,
                "finish_reason": finish_reason,
                "stop_reason": c.stop_reason,
            })
        return self._response(rid, "chat.completion", created, model, choices, jobs, finals)

    @staticmethod
    def _message(c: CompletionOutput, req: ChatCompletionRequest, mode: str) -> tuple[dict, str | None]:
        """The assistant message of a finished completion and its finish reason ("tool_calls"
        when it calls tools, unless max_tokens cut it: then "length")."""
        calls: list[dict] | None = None
        content: str | None = c.text
        if mode == "named" and c.finish_reason != "length":
            calls, content = [_tool_call(req.tool_choice.function.name, c.text)], None
        elif mode == "required" and c.finish_reason != "length":
            calls = _required_calls(c.text)
            content = None if calls else c.text
        elif mode == "auto":
            content, parsed = HermesToolParser.extract(c.text)
            calls = [_tool_call(p.name, p.arguments) for p in parsed] or None
            if calls is None:
                content = c.text
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        finish = "tool_calls" if calls and c.finish_reason != "length" else c.finish_reason
        return message, finish

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

    async def _stream_chat(self, jobs, rid, created, model, include_usage, req: ChatCompletionRequest, mode: str) -> AsyncIterator[str]:
        sse = _ChunkStream({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model},
                           include_usage, _prediction_info(jobs[0].prediction))
        streams: dict[int, _ToolDeltas] = {}
        try:
            async for job, out in self._pump(jobs):
                choices = []
                for c in out.outputs:
                    if c.index not in streams:
                        streams[c.index] = _ToolDeltas(req, mode)
                        yield sse.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
                    if not c.delta_text and c.finish_reason is None:
                        continue
                    delta, finish = streams[c.index].step(c)
                    if not delta and finish is None and not (req.logprobs and c.delta_logprobs):
                        continue
                    choices.append({
                        "index": c.index,
                        "delta": delta,
                        "logprobs": {"content": self._chat_logprobs(c.delta_logprobs)} if req.logprobs and c.delta_logprobs else None,
                        "finish_reason": finish,
                    })
                sse.finished(job, out)
                if choices:
                    yield sse.chunk(choices)
            for line in sse.end(lambda: self._usage(jobs, sse.finals)):
                yield line
        except APIError as e:
            for line in _sse_error(e):
                yield line


class _ToolDeltas:
    """One streamed choice's deltas. Without tools: the text as content. A named function: the
    arguments as they come (`delta.tool_calls[0].function.arguments`). `required`: the calls once
    the array is complete. `auto`: content until a `<tool_call>` could begin, then the calls at
    the end."""

    def __init__(self, req: ChatCompletionRequest, mode: str) -> None:
        self.req = req
        self.mode = mode
        self.text = ""
        self.sent = 0  # characters of text sent as content (auto)
        self.call_id: str | None = None

    def step(self, c: CompletionOutput) -> tuple[dict, str | None]:
        self.text += c.delta_text
        done = c.finish_reason is not None
        if self.mode == "none":
            return ({"content": c.delta_text} if c.delta_text else {}), c.finish_reason
        if self.mode == "named":
            if c.finish_reason == "length" and self.call_id is None:
                return ({"content": self.text} if self.text else {}), "length"
            delta: dict = {}
            if c.delta_text:
                call: dict[str, Any] = {"index": 0, "function": {"arguments": c.delta_text}}
                if self.call_id is None:
                    self.call_id = random_id("call")
                    call.update(id=self.call_id, type="function")
                    call["function"]["name"] = self.req.tool_choice.function.name
                delta = {"tool_calls": [call]}
            return delta, (("tool_calls" if c.finish_reason != "length" else "length") if done else None)
        if self.mode == "required":
            if not done:
                return {}, None
            calls = _required_calls(self.text) if c.finish_reason != "length" else None
            if not calls:
                return ({"content": self.text} if self.text else {}), c.finish_reason
            return {"tool_calls": [dict(call, index=i) for i, call in enumerate(calls)]}, "tool_calls"
        if not done:
            end = HermesToolParser.content_end(self.text)
            piece, self.sent = self.text[self.sent:end], max(self.sent, end)
            return ({"content": piece} if piece else {}), None
        _, parsed = HermesToolParser.extract(self.text)
        if not parsed:
            rest = self.text[self.sent:]
            return ({"content": rest} if rest else {}), c.finish_reason
        delta = {"tool_calls": [dict(_tool_call(p.name, p.arguments), index=i) for i, p in enumerate(parsed)]}
        rest = self.text[self.sent:HermesToolParser.content_end(self.text)].rstrip()
        if rest:
            delta["content"] = rest
        return delta, ("tool_calls" if c.finish_reason != "length" else "length")
