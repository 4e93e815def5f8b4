"""A stand-in OpenAI-compatible endpoint for testing and benchmarking the replay client.

It runs no model: completions stream fixed-rate fake tokens. It speaks just enough HTTP/1.1
(keep-alive, Content-Length requests, chunked SSE responses) on plain asyncio and, like an
engine, emits one token for every running stream per step (one timer for all streams), so it
costs little CPU and the replay client, not the server, is what a benchmark measures.

Endpoints: GET /health, GET /v1/models, GET /metrics (lenserve:num_requests_running,
lenserve:num_requests_waiting, lenserve:kv_cache_usage_perc), POST /tokenize, POST
/v1/completions and /v1/chat/completions (stream or not, stream_options.include_usage,
ignore_eos). Its tokenizer counts one BOS token plus ceil(len(word) / 4) tokens per
whitespace-separated word. Without ignore_eos a completion stops after a length derived from
the prompt (5 to 44 tokens), capped by max_tokens.

    python -m lenserve.traces.fake_server --port 8001 [--ttft-s 0.01] [--itl-s 0.002]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import threading
import time
import zlib
from dataclasses import dataclass

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}


def fake_tokenize(text: str) -> list[int]:
    ids = [1]
    for word in text.split():
        n = math.ceil(len(word) / 4)
        h = zlib.crc32(word.encode())
        ids.extend(3 + (h + i) % 49000 for i in range(n))
    return ids


def natural_length(prompt: str) -> int:
    return 5 + zlib.crc32(prompt.encode()) % 40


@dataclass
class FakeServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    model: str = "fake-model"
    ttft_s: float = 0.01  # delay before the first token
    itl_s: float = 0.002  # delay between tokens
    fail_every: int = 0  # every n-th generation request answers 500 (0: never)
    max_running: int = 256  # beyond this many streams, requests count as waiting (for /metrics)


class FakeOpenAIServer:
    def __init__(self, config: FakeServerConfig | None = None) -> None:
        self.config = config or FakeServerConfig()
        self.num_running = 0
        self.num_generation_requests = 0
        self._streams: list[_Stream] = []
        self._stepper: asyncio.Task | None = None
        self._handlers: dict[asyncio.Task, asyncio.StreamWriter] = {}  # one per open connection
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.config.host, self.config.port, backlog=1024)

    async def stop(self) -> None:
        self._server.close()
        if self._stepper is not None:
            self._stepper.cancel()
        for stream in self._streams:
            if not stream.done.done():
                stream.done.set_result(None)
        for writer in self._handlers.values():
            writer.transport.abort()  # handlers then end on their own, as on a dropped connection
        if self._handlers:
            _, pending = await asyncio.wait(list(self._handlers), timeout=2.0)
            for task in pending:
                task.cancel()
        await self._server.wait_closed()

    # -- running in a background thread (tests) ------------------------------------------------

    def start_in_thread(self) -> FakeOpenAIServer:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self.stop())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fake-openai-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    def stop_thread(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # -- HTTP -------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers[task] = writer
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0) or 0))
                await self._route(method, path.split("?", 1)[0], body, writer)
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._handlers.pop(task, None)
            writer.close()

    @staticmethod
    def _head(status: int, content_type: str, extra: str = "") -> bytes:
        return f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n{extra}".encode()

    async def _send_json(self, writer, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        writer.write(self._head(status, "application/json", f"Content-Length: {len(body)}\r\n\r\n") + body)
        await writer.drain()

    async def _route(self, method: str, path: str, body: bytes, writer) -> None:
        if method == "GET" and path == "/health":
            return await self._send_json(writer, 200, {"status": "ok"})
        if method == "GET" and path == "/v1/models":
            return await self._send_json(writer, 200, {"object": "list", "data": [{"id": self.config.model, "object": "model"}]})
        if method == "GET" and path == "/metrics":
            text = self._metrics_text().encode()
            writer.write(self._head(200, "text/plain; version=0.0.4", f"Content-Length: {len(text)}\r\n\r\n") + text)
            return await writer.drain()
        if method == "POST" and path in ("/tokenize", "/v1/completions", "/v1/chat/completions"):
            try:
                request = json.loads(body or b"{}")
            except json.JSONDecodeError:
                return await self._send_json(writer, 400, _error("body is not JSON", 400))
            if path == "/tokenize":
                tokens = fake_tokenize(str(request.get("prompt", "")))
                return await self._send_json(writer, 200, {"tokens": tokens, "count": len(tokens)})
            return await self._generate(path, request, writer)
        return await self._send_json(writer, 404, _error(f"no route {method} {path}", 404))

    def _metrics_text(self) -> str:
        running = min(self.num_running, self.config.max_running)
        waiting = self.num_running - running
        lines = []
        for name, value, help_ in (
            ("lenserve:num_requests_running", running, "Requests in the running batch."),
            ("lenserve:num_requests_waiting", waiting, "Requests waiting to be scheduled."),
            ("lenserve:kv_cache_usage_perc", running / self.config.max_running, "KV-cache usage, 1 = full."),
        ):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f'{name}{{model_name="{self.config.model}"}} {value}']
        return "\n".join(lines) + "\n"

    async def _generate(self, path: str, request: dict, writer) -> None:
        self.num_generation_requests += 1
        if self.config.fail_every and self.num_generation_requests % self.config.fail_every == 0:
            return await self._send_json(writer, 500, _error("injected failure", 500))
        chat = path.endswith("chat/completions")
        if chat:
            messages = request.get("messages")
            if not isinstance(messages, list) or not messages:
                return await self._send_json(writer, 400, _error("messages must be a non-empty list", 400))
            prompt = " ".join(str(m.get("content", "")) for m in messages)
        else:
            prompt = request.get("prompt")
            if not isinstance(prompt, str):
                return await self._send_json(writer, 400, _error("prompt must be a string", 400))
        max_tokens = request.get("max_tokens") or 16
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return await self._send_json(writer, 400, _error("max_tokens must be a positive integer", 400))
        num_tokens = max_tokens if request.get("ignore_eos") else min(max_tokens, natural_length(prompt))
        finish_reason = "length" if num_tokens == max_tokens else "stop"
        usage = {"prompt_tokens": len(fake_tokenize(prompt)), "completion_tokens": num_tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        created = int(time.time())
        rid = f"cmpl-{self.num_generation_requests}"
        obj = "chat.completion" if chat else "text_completion"

        self.num_running += 1
        try:
            if not request.get("stream"):
                await asyncio.sleep(self.config.ttft_s + self.config.itl_s * (num_tokens - 1))
                text = " tok" * num_tokens
                choice = {"index": 0, "finish_reason": finish_reason}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                return await self._send_json(writer, 200, {"id": rid, "object": obj, "created": created, "model": self.config.model, "choices": [choice], "usage": usage})

            writer.write(self._head(200, "text/event-stream", "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"))
            stream = _Stream(writer, chat, rid, created, self.config.model, num_tokens, finish_reason, usage, bool((request.get("stream_options") or {}).get("include_usage")))
            await asyncio.sleep(self.config.ttft_s)
            self._streams.append(stream)
            if self._stepper is None or self._stepper.done():
                self._stepper = asyncio.create_task(self._step_loop())
            await stream.done
            await writer.drain()
        finally:
            self.num_running -= 1

    async def _step_loop(self) -> None:
        # Like an engine step: one token for every running stream per itl_s, one timer for all.
        while self._streams:
            for stream in self._streams:
                stream.emit_token()
            self._streams = [s for s in self._streams if not s.done.done()]
            if self._streams:
                await asyncio.sleep(self.config.itl_s)


class _Stream:
    """One streaming completion: its remaining tokens and how to write them."""

    def __init__(self, writer, chat, rid, created, model, num_tokens, finish_reason, usage, include_usage) -> None:
        self.writer = writer
        self.base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created, "model": model}
        self.chat = chat
        self.remaining = num_tokens
        self.finish_reason = finish_reason
        self.usage = usage if include_usage else None
        self.done = asyncio.get_running_loop().create_future()

    def emit_token(self) -> None:
        if self.done.done():  # its handler was cancelled (the client went away): nothing to write
            return
        if self.writer.is_closing():
            self.done.set_result(None)
            return
        self.remaining -= 1
        choice = {"index": 0, "finish_reason": self.finish_reason if self.remaining == 0 else None}
        choice.update({"delta": {"content": " tok"}} if self.chat else {"text": " tok"})
        _write_event(self.writer, {**self.base, "choices": [choice]})
        if self.remaining == 0:
            if self.usage is not None:
                _write_event(self.writer, {**self.base, "choices": [], "usage": self.usage})
            _write_chunk(self.writer, b"data: [DONE]\n\n")
            self.writer.write(b"0\r\n\r\n")
            self.done.set_result(None)


def _error(message: str, code: int) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error" if code < 500 else "server_error", "code": code}}


def _write_chunk(writer, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))


def _write_event(writer, obj: dict) -> None:
    _write_chunk(writer, b"data: " + json.dumps(obj).encode() + b"\n\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--model-name", default="fake-model")
    p.add_argument("--ttft-s", type=float, default=0.01)
    p.add_argument("--itl-s", type=float, default=0.002)
    p.add_argument("--fail-every", type=int, default=0)
    # `lenserve bench compare` passes server options (--policy, --attention, ...): accepted, unused.
    args, _ = p.parse_known_args(argv)
    server = FakeOpenAIServer(FakeServerConfig(args.host, args.port, args.model_name, args.ttft_s, args.itl_s, args.fail_every))

    async def serve() -> None:
        await server.start()
        print(f"fake OpenAI server on {server.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
