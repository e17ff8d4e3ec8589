"""A client that stops reading a stream holds back its upstream, not Thermostat's memory.

The real app relays a 64 MiB streamed answer to a raw socket that reads the headers and
then nothing more. Backpressure has to travel the whole way: uvicorn's `send` waits while
the client's transport is above its high-water mark, so the relay stops reading, aiohttp
stops reading the upstream's socket, and the upstream's own writes block. The assertions
are buffer sizes, not times: once the upstream can write no further, what it has written
is a small bounded multiple of the socket buffers, far below the answer's size, and
Thermostat's write buffer towards the client is within one chunk of the high-water mark.
Meanwhile another client's stream through the same process completes intact.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import struct
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from aiohttp import web

from tests.conftest import make_config
from tests.support.loop_thread import AppInThread, serve_app
from tests.support.servers import RunningThermostat, start_thermostat

CHUNK_PAD = 32 * 1024
CHUNKS = 2048  # 64 MiB of answer
ANSWER_BYTES = CHUNK_PAD * CHUNKS
UPSTREAM_SNDBUF = 64 * 1024  # fixed, so the kernel's autotuning cannot hide megabytes on the upstream's side
CLIENT_RCVBUF = 4096
CLIENT_READ = 4096  # bytes the stalled client reads (headers and the start of the stream) before it stops
# A transport's default high-water mark: uvicorn's `send` waits while the client's transport
# holds more (and resumes below a quarter of it).
HIGH_WATER = 64 * 1024
# What Thermostat itself may hold for the stalled stream (bytes written by the upstream minus
# everything in the four kernel socket queues between it and the client, minus what the client
# read): the client transport's buffer (high water + one event), aiohttp's read buffer (reading
# pauses above 2 x 64 KiB; one read may add up to 64 KiB more) and the relay's partial event.
THERMOSTAT_BOUND = 512 * 1024


class PaddedUpstream:
    """Streams CHUNKS chat chunks of CHUNK_PAD bytes each, counting what its writes got through."""

    def __init__(self) -> None:
        self.written = 0  # bytes of the padded stream accepted by `resp.write` so far
        self.transport: asyncio.Transport | None = None  # of the padded stream: its own write buffer is not Thermostat's
        self.finished = 0
        self.port = 0
        self._server: AppInThread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UPSTREAM_SNDBUF)
        await resp.prepare(request)
        padded = body["messages"][-1]["content"] == "pad"
        if padded:
            self.transport = request.transport  # type: ignore[assignment]
        n, pad = (CHUNKS, "x" * CHUNK_PAD) if padded else (5, "word")

        def event(delta: dict, finish: str | None) -> bytes:
            doc = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

        for _ in range(n):
            data = event({"content": pad}, None)
            await resp.write(data)
            if padded:
                self.written += len(data)
        await resp.write(event({}, "stop"))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        self.finished += 1
        return resp

    def start(self) -> PaddedUpstream:
        self._server = serve_app(lambda app: app.router.add_post("/v1/chat/completions", self._handle))
        self.port = self._server.port
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


@pytest.fixture()
def padded() -> Iterator[PaddedUpstream]:
    up = PaddedUpstream().start()
    yield up
    up.stop()


@pytest.fixture()
def proxy(padded: PaddedUpstream, tmp_path: Path) -> Iterator[RunningThermostat]:
    # timeout_s is the longest silence between upstream bytes; the stalled stream must not trip it
    # (aiohttp drops its read timer while reading is paused), so the default 2 s of make_config stays.
    running = start_thermostat(make_config(padded.url, tmp_path, optimization={"enabled": False}))
    yield running
    running.stop()


def _stalled_client(port: int) -> socket.socket:
    """Sends a streamed request, reads the first bytes of the answer, then reads nothing more."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    sock.connect(("127.0.0.1", port))
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "pad"}]}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                 b"authorization: Bearer sk-test\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    sock.settimeout(10)
    head = sock.recv(CLIENT_READ)
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


def _wait_until_still(read: object, polls: int = 10, every_s: float = 0.1, limit_s: float = 30.0) -> int:
    """The value once it has stopped changing for `polls` polls in a row (a wait, not an assertion on time)."""
    assert callable(read)
    last, same, deadline = read(), 0, time.monotonic() + limit_s
    while same < polls and time.monotonic() < deadline:
        time.sleep(every_s)
        now = read()
        same = same + 1 if now == last else 0
        last = now
    return int(last)


def _queued(sock: socket.socket, request: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0])


def _own_sockets() -> Iterator[socket.socket]:
    """Every socket this process holds, as a duplicate closed after use (test, Thermostat and
    upstream share the process, so every socket of the chain is among them)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            continue
        with sock:
            yield sock


def _kernel_bytes(pairs: set[tuple[int, int]]) -> int:
    """Bytes waiting in this process's loopback sockets whose (local, peer) ports are in `pairs`:
    unsent (SIOCOUTQ) plus unread (SIOCINQ)."""
    total = 0
    for sock in _own_sockets():
        try:
            if sock.type != socket.SOCK_STREAM or sock.family != socket.AF_INET:
                continue
            ports = (sock.getsockname()[1], sock.getpeername()[1])
        except OSError:
            continue
        if ports in pairs:
            total += _queued(sock, termios.TIOCOUTQ) + _queued(sock, termios.FIONREAD)
    return total


def _chain(proxy: RunningThermostat, upstream_port: int, client: socket.socket) -> set[tuple[int, int]]:
    """(local, peer) ports of the sockets from the upstream to the stalled client."""
    client_port = client.getsockname()[1]
    pairs = {(client_port, proxy.port), (proxy.port, client_port)}
    for sock in _own_sockets():
        try:
            local, peer = sock.getsockname()[1], sock.getpeername()[1]
        except (OSError, TypeError, IndexError):
            continue
        if upstream_port in (local, peer):
            pairs.add((local, peer))
    return pairs


def _client_write_buffers(proxy: RunningThermostat) -> list[int]:
    """Bytes queued in Thermostat's transport towards each open client connection."""
    async def sizes() -> list[int]:
        return [conn.transport.get_write_buffer_size() for conn in list(proxy.server.server_state.connections)
                if getattr(conn, "transport", None) is not None and not conn.transport.is_closing()]
    return list(proxy.call(sizes()))


def test_stalled_reader_is_backpressured_and_others_flow(proxy: RunningThermostat, padded: PaddedUpstream) -> None:
    sock = _stalled_client(proxy.port)
    try:
        held = _wait_until_still(lambda: padded.written)
        # The upstream is stuck short of the answer: Thermostat stopped reading it ...
        assert 0 < held < ANSWER_BYTES // 4, held
        assert padded.finished == 0
        # ... and what the kernel's socket queues do not account for is Thermostat's own buffering.
        in_kernel = _kernel_bytes(_chain(proxy, padded.port, sock))
        assert padded.transport is not None
        in_upstream = padded.transport.get_write_buffer_size()
        in_thermostat = held - in_upstream - in_kernel - CLIENT_READ
        assert in_thermostat <= THERMOSTAT_BOUND, (held, in_kernel, in_thermostat)
        # Its queue towards the stalled client is part of that: the high-water mark plus one relayed read.
        buffers = _client_write_buffers(proxy)
        assert buffers and HIGH_WATER // 4 < max(buffers) <= THERMOSTAT_BOUND, buffers

        # Another stream through the same process is not held up by the stalled one.
        client = openai.OpenAI(base_url=proxy.url, api_key="sk-test", max_retries=0, timeout=20)
        parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="m", stream=True, messages=[{"role": "user", "content": "hello"}]) if c.choices]
        assert "".join(parts) == "word" * 5
        assert padded.finished == 1
        # Still stalled, still bounded: the other stream's completion did not unblock or grow it.
        assert padded.written == held
    finally:
        sock.close()
