"""A fast fake OpenAI-compatible upstream for the overhead benchmark.

Raw asyncio protocol + httptools on uvloop (no framework), so that it is not the
bottleneck: measure its ceiling with `loadgen` directly before trusting any number.

    python -m bench.overhead.fake_upstream --port 9100 [--delay-ms 0] [--chunks 8] [--chunk-delay-ms 1]

POST /v1/chat/completions (and /v1/completions):
  * non-streaming: one JSON completion with `usage`, after `--delay-ms`;
  * `"stream": true`: SSE, `--chunks` content chunks `--chunk-delay-ms` apart (the first
    one after `--delay-ms`), then a `usage` chunk when `stream_options.include_usage`
    is true, then `data: [DONE]`. Each event is its own HTTP chunk.
GET /v1/models and /health answer small JSON. Anything else is 404.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httptools
import msgspec

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

USAGE = {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}


def completion_body(model: str) -> bytes:
    return _encode(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the fake upstream, quickly."},
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        }
    )


def sse_events(model: str, chunks: int, include_usage: bool) -> list[bytes]:
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    events = []
    for i in range(chunks):
        delta = {"role": "assistant", "content": "tok "} if i == 0 else {"content": "tok "}
        events.append(b"data: " + _encode({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}) + b"\n\n")
    events.append(b"data: " + _encode({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + b"\n\n")
    if include_usage:
        events.append(b"data: " + _encode({**base, "choices": [], "usage": USAGE}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Handler(asyncio.Protocol):
    __slots__ = ("transport", "parser", "url", "body", "keep_alive", "opts", "_cache", "_queue", "_busy")

    def __init__(self, opts: argparse.Namespace, cache: dict[str, bytes]) -> None:
        self.opts = opts
        self._cache = cache
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.keep_alive = True
        # Pipelined requests are answered in order; one at a time.
        self._queue: list[tuple[bytes, bytes, bool, str]] = []
        self._busy = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        keep = self.parser.should_keep_alive()
        self._queue.append((method, self.url, keep, b"".join(self.body).decode() if self.body else ""))
        if not self._busy:
            self._drain()

    # responses
    def _drain(self) -> None:
        while self._queue and self.transport is not None:
            method, url, keep, body = self._queue.pop(0)
            path = url.split(b"?", 1)[0]
            if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
                try:
                    doc = _decode(body) if body else {}
                except msgspec.DecodeError:
                    doc = None
                if not isinstance(doc, dict):
                    self._write(400, b'{"error":{"message":"invalid json"}}', keep)
                    continue
                model = str(doc.get("model") or "fake")
                stream = doc.get("stream") is True
                if stream or self.opts.delay_ms > 0:
                    self._busy = True
                    opts = doc.get("stream_options")
                    usage = isinstance(opts, dict) and opts.get("include_usage") is True
                    asyncio.ensure_future(self._slow(model, stream, usage, keep))
                    return
                cached = self._cache.get(model)
                if cached is None:
                    cached = completion_body(model)
                    if len(self._cache) < 64:
                        self._cache[model] = cached
                self._write(200, cached, keep)
            elif method == b"GET" and path in (b"/v1/models", b"/health"):
                self._write(200, b'{"object":"list","data":[{"id":"fake","object":"model"}]}', keep)
            else:
                self._write(404, b'{"error":{"message":"not found"}}', keep)

    def _write(self, status: int, body: bytes, keep: bool) -> None:
        if self.transport is None:
            return
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nx-request-id: up-1\r\n%s\r\n%s"
            % (status, reason, len(body), b"" if keep else b"connection: close\r\n", body)
        )
        if not keep:
            self.transport.close()

    async def _slow(self, model: str, stream: bool, usage: bool, keep: bool) -> None:
        try:
            if self.opts.delay_ms > 0:
                await asyncio.sleep(self.opts.delay_ms / 1000)
            if not stream:
                self._write(200, completion_body(model), keep)
                return
            t = self.transport
            if t is None:
                return
            t.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                b"transfer-encoding: chunked\r\nx-request-id: up-1\r\n%s\r\n" % (b"" if keep else b"connection: close\r\n")
            )
            gap = self.opts.chunk_delay_ms / 1000
            for i, event in enumerate(sse_events(model, self.opts.chunks, usage)):
                if i and gap > 0 and i <= self.opts.chunks:
                    await asyncio.sleep(gap)
                    t = self.transport
                    if t is None:
                        return
                t.write(_chunk(event))
            t.write(b"0\r\n\r\n")
            if not keep:
                t.close()
        finally:
            self._busy = False
            if self._queue:
                self._drain()


async def serve(opts: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    cache: dict[str, bytes] = {}
    server = await loop.create_server(lambda: Handler(opts, cache), opts.host, opts.port, backlog=4096, reuse_address=True)
    print(f"fake upstream on http://{opts.host}:{opts.port}/v1", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--delay-ms", type=float, default=0.0, help="fixed delay before the response (or the first SSE chunk)")
    p.add_argument("--chunks", type=int, default=8, help="content chunks per streamed response")
    p.add_argument("--chunk-delay-ms", type=float, default=1.0, help="gap between streamed content chunks")
    opts = p.parse_args()
    try:
        run_uvloop(serve(opts))
    except KeyboardInterrupt:
        pass


def run_uvloop(coro):  # type: ignore[no-untyped-def]
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    main()
