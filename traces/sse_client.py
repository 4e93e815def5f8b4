"""A minimal asyncio HTTP/1.1 client for the replay's hot path: POST a JSON body, read SSE events.

Why not httpx for this: measured on the 2-core dev machine, an httpx streaming request
(httpx → httpcore → anyio → h11, once per body chunk) costs about 5-7 ms of CPU for a
16-token response, so a single event loop saturates near 150 req/s and the send lag of an
open-loop replay at 200 req/s grows without bound. This client writes the request bytes and
parses chunked SSE directly on asyncio streams, at a fraction of that cost. httpx still does
everything off the hot path (model list, /tokenize, /metrics, health checks).

Supported: http and https, keep-alive connection reuse, chunked or Content-Length or
read-to-close bodies, `data:` events (multi-line data joined with newlines, comments ignored).
"""
from __future__ import annotations

import asyncio
import json
import ssl
from typing import AsyncIterator
from urllib.parse import urlsplit


class HTTPStatusError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status
        self.body = body


class ProtocolError(Exception):
    """The server's response is not valid HTTP/1.1."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class SSEClient:
    """POSTs JSON to one server and yields the `data:` payloads of its event-stream response."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, connect_timeout_s: float = 30.0) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"URL must start with http:// or https://, got {base_url!r}")
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.path_prefix = url.path.rstrip("/")
        host_header = self.host if url.port is None else f"{self.host}:{url.port}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._header_tail = f"Host: {host_header}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n{extra}".encode("latin-1")
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=1 << 20), self.connect_timeout_s
        )
        return _Connection(reader, writer)

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def stream(self, path: str, body: dict) -> AsyncIterator[str]:
        """Yields each event's data (str). Raises HTTPStatusError for a non-200 answer, ProtocolError,
        or OSError/asyncio.IncompleteReadError for a broken connection."""
        payload = json.dumps(body).encode()
        conn = await self._connect()
        reusable = False
        try:
            conn.writer.write(
                b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s"
                % ((self.path_prefix + path).encode(), self._header_tail, len(payload), payload)
            )
            status, headers = await self._read_head(conn.reader)
            keep_alive = headers.get("connection", "").lower() != "close" and _has_length(headers)
            if status != 200:
                text = b"".join([c async for c in _body(conn.reader, headers)]).decode("utf-8", "replace")
                reusable = keep_alive
                raise HTTPStatusError(status, text)
            pending = b""
            async for data in _body(conn.reader, headers):
                pending = (pending + data).replace(b"\r\n", b"\n")
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    value = _event_data(event)
                    if value is not None:
                        yield value
            reusable = keep_alive
        finally:
            if reusable:
                self._idle.append(conn)
            else:
                conn.close()

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {status_line[:80]!r}")
        headers = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The response body as it arrives: one bytes object per socket read, chunk framing removed."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        async for data in _dechunk(reader):
            yield data
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining:
            data = await reader.read(min(remaining, 1 << 16))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            yield data
    else:
        while data := await reader.read(1 << 16):
            yield data


async def _dechunk(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    # Whatever one read returns is decoded at once (often several chunks): one await per read
    # rather than two per chunk, which is most of this client's cost per token.
    buf = b""
    while True:
        data = await reader.read(1 << 16)
        if not data:
            raise asyncio.IncompleteReadError(buf, None)
        buf += data
        out = []
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            try:
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {buf[pos:eol][:40]!r}") from None
            if size == 0:
                if buf.find(b"\r\n\r\n", eol) < 0:
                    break  # trailers not complete yet
                if out:
                    yield b"".join(out)
                return
            end = eol + 2 + size
            if len(buf) < end + 2:
                break
            out.append(buf[eol + 2 : end])
            pos = end + 2
        buf = buf[pos:]
        if out:
            yield b"".join(out)


def _has_length(headers: dict[str, str]) -> bool:
    return "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()


def _event_data(event: bytes) -> str | None:
    """The data of one SSE event (lines joined by newlines), or None when it has none."""
    data = None
    for line in event.decode("utf-8").split("\n"):
        if line.startswith("data:"):
            value = line[6:] if line.startswith("data: ") else line[5:]
            data = value if data is None else f"{data}\n{value}"
    return data
