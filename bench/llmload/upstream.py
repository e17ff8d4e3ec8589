"""An LLM-shaped fake upstream: answers that take seconds, with send timestamps in every chunk.

    python -m bench.llmload.upstream --port 9100

The client chooses each answer's shape in the last message's content, so the same schedule
gives the same answers through every target (the proxies forward message text untouched):

    bench ttft_ms=412 tps=55.2 tokens=380 chunk=3 pad=0

* `"stream": true`: after `ttft_ms`, SSE chunks of `chunk` tokens at `tps` tokens/s until
  `tokens` are sent, then a finish chunk, a `usage` chunk when `stream_options.include_usage`,
  and `[DONE]`. Each content chunk starts with `~T<ns>`: CLOCK_MONOTONIC (system-wide on
  Linux, so the client on the same machine reads the same clock) when the chunk was written;
  the first one also carries `~R<ns>`, when the request arrived. `pad` adds that many bytes
  to each chunk (slow-reader runs use it to make buffering visible).
* non-streaming: the whole answer after `ttft_ms + tokens / tps`, content `~T<ns> ~R<ns> ...`.
* `GET /bench/stats[?reset=1]`: how late this process wrote its chunks (its own loop lag, so
  a run can tell when the upstream is the bottleneck), open connections and the bytes waiting
  in their write buffers (a proxy that applies backpressure leaves them here).

Chunks are timer callbacks (`loop.call_at`), not a coroutine per stream, to keep the upstream
cheap at thousands of concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import time
from array import array

import httptools
import msgspec

from bench.overhead.fake_upstream import _chunk, run_uvloop

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
SHAPE = re.compile(r"bench ttft_ms=([\d.]+) tps=([\d.]+) tokens=(\d+) chunk=(\d+)(?: pad=(\d+))?")
DEFAULT_SHAPE = (5.0, 1000.0, 8, 4, 0)  # readiness probes and stray requests: quick
CHUNK = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":%d,"model":"%s",'
    b'"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}\n\n'
)
HEAD_SSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n%s\r\n"


def parse_shape(doc: dict) -> tuple[float, float, int, int, int]:
    """(ttft_ms, tokens/s, tokens, tokens per chunk, pad bytes) from the last message, or a default."""
    msgs = doc.get("messages")
    text = ""
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict):
        content = msgs[-1].get("content")
        text = content if isinstance(content, str) else ""
    elif isinstance(doc.get("prompt"), str):
        text = doc["prompt"]
    m = SHAPE.search(text)
    if m is None:
        return DEFAULT_SHAPE
    ttft, tps, tokens, chunk = float(m[1]), max(0.1, float(m[2])), max(1, int(m[3])), max(1, int(m[4]))
    return ttft, tps, min(tokens, 100_000), min(chunk, 1000), min(int(m[5] or 0), 65_536)


class Stats:
    """Per-process counters the harness reads and resets between steps."""

    def __init__(self) -> None:
        self.late_us = array("q")  # how late each chunk was written vs its schedule
        self.conns: set[Handler] = set()
        self.chunks = 0
        self.requests = 0

    def snapshot(self, reset: bool) -> bytes:
        late = sorted(self.late_us)
        n = len(late)

        def q(p: float) -> float | None:
            return late[min(n - 1, int(p * (n - 1) + 0.5))] / 1000 if n else None

        pending = sum(h.transport.get_write_buffer_size() for h in self.conns if h.transport is not None)
        body = _encode({
            "chunks": self.chunks, "requests": self.requests, "connections": len(self.conns), "pending_write_bytes": pending,
            "late_p50_ms": q(0.5), "late_p99_ms": q(0.99), "late_max_ms": late[-1] / 1000 if n else None,
        })
        if reset:
            self.late_us = array("q")
            self.chunks = self.requests = 0
        return body


class Handler(asyncio.Protocol):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.queue: list[tuple[bytes, bytes, bool, bytes, int]] = []
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.stats.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.stats.conns.discard(self)
        if self.timer is not None:
            self.timer.cancel()  # the client went away: stop generating

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.queue.append((self.parser.get_method(), self.url, self.parser.should_keep_alive(), b"".join(self.body), time.monotonic_ns()))
        if not self.busy:
            self.next()

    def next(self) -> None:
        while self.queue and self.transport is not None and not self.busy:
            method, url, keep, body, recv_ns = self.queue.pop(0)
            path, _, query = url.partition(b"?")
            if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
                try:
                    doc = _decode(body) if body else None
                except msgspec.DecodeError:
                    doc = None
                if not isinstance(doc, dict):
                    self.reply(400, b'{"error":{"message":"invalid json"}}', keep)
                    continue
                self.stats.requests += 1
                self.busy = True
                self.answer(doc, keep, recv_ns)
            elif method == b"GET" and path == b"/bench/stats":
                self.reply(200, self.stats.snapshot(b"reset=1" in query), keep)
            elif method == b"GET" and path in (b"/v1/models", b"/health"):
                self.reply(200, b'{"object":"list","data":[{"id":"fake-model","object":"model"}]}', keep)
            else:
                self.reply(404, b'{"error":{"message":"not found"}}', keep)

    def reply(self, status: int, body: bytes, keep: bool) -> None:
        if self.transport is None:
            return
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
            % (status, reason, len(body), b"" if keep else b"connection: close\r\n", body)
        )
        if not keep:
            self.transport.close()

    def done(self, keep: bool) -> None:
        self.busy = False
        self.timer = None
        if not keep and self.transport is not None:
            self.transport.close()
        elif self.queue:
            self.next()

    def answer(self, doc: dict, keep: bool, recv_ns: int) -> None:
        loop = asyncio.get_running_loop()
        ttft_ms, tps, tokens, per_chunk, pad = parse_shape(doc)
        model = str(doc.get("model") or "fake-model").encode()[:64].replace(b'"', b"")
        t0 = loop.time()
        if doc.get("stream") is not True:
            due = t0 + (ttft_ms / 1000 + tokens / tps)

            def whole() -> None:
                self.stats.late_us.append(int((loop.time() - due) * 1e6))
                content = f"~T{time.monotonic_ns()} ~R{recv_ns} " + "tok " * tokens
                body = _encode({
                    "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()), "model": model.decode(),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 20, "completion_tokens": tokens, "total_tokens": 20 + tokens},
                })
                self.reply(200, body, keep)
                self.done(keep)

            self.timer = loop.call_at(due, whole)
            return
        opts = doc.get("stream_options")
        usage = isinstance(opts, dict) and opts.get("include_usage") is True
        created = int(time.time())
        padding = b"w" * pad
        state = {"sent": 0}
        gap = per_chunk / tps

        def tick(due: float) -> None:
            t = self.transport
            if t is None:
                return
            now = loop.time()
            self.stats.late_us.append(int((now - due) * 1e6))
            n = min(per_chunk, tokens - state["sent"])
            first = state["sent"] == 0
            mark = b"~T%d" % time.monotonic_ns()
            if first:
                mark += b" ~R%d" % recv_ns
            event = CHUNK % (created, model, mark + b" " + b"tok " * n + padding)
            if first:
                t.write(HEAD_SSE % (b"" if keep else b"connection: close\r\n"))
            t.write(_chunk(event))
            self.stats.chunks += 1
            state["sent"] += n
            if state["sent"] < tokens:
                # Schedule from the plan, not from now, so a late tick does not slow the stream down.
                nxt = due + gap
                self.timer = loop.call_at(nxt, tick, nxt)
                return
            tail = [
                b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":%d,"model":"%s","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
                % (created, model)
            ]
            if usage:
                tail.append(
                    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":%d,"model":"%s","choices":[],'
                    b'"usage":{"prompt_tokens":20,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (created, model, tokens, tokens + 20)
                )
            tail.append(b"data: [DONE]\n\n")
            t.write(b"".join(_chunk(e) for e in tail) + b"0\r\n\r\n")
            self.done(keep)

        first_due = t0 + ttft_ms / 1000
        self.timer = loop.call_at(first_due, tick, first_due)


async def serve(host: str, port: int, mss: int) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if mss:
        # Loopback's 64 KB MSS makes the kernel size every send buffer at ~4 MB; a network-sized
        # MSS keeps kernel buffering per connection near what a real upstream connection has, so
        # bytes a proxy does not read show up here (pending_write_bytes) instead of vanishing.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    sock.bind((host, port))
    server = await loop.create_server(lambda: Handler(stats), sock=sock, backlog=8192)
    print(f"llm-shaped fake upstream on http://{host}:{port}/v1", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--mss", type=int, default=1460, help="TCP_MAXSEG of accepted connections (0: loopback default)")
    a = p.parse_args()
    try:
        run_uvloop(serve(a.host, a.port, a.mss))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
