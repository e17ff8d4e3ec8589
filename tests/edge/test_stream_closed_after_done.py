"""A client that read a stream to its [DONE] and closed at once got the whole answer: not a disconnect.

Seen in CI: the openai SDK closes its connection as soon as it reads [DONE]; when that close
reached the edge before the upstream's body ended, the request was logged as
`client_disconnected` with quality 0, although every byte of the answer had been delivered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.app import create_app
from proxy.runtime import Runtime
from tests.edge.test_upstream_transport import config
from tests.support.memory_transport import CannedResponse, MemoryTransport, chat_sse


class _SlowEnd:
    """The upstream's chunks, then a pause before its body ends (the client is gone by then)."""

    def __init__(self, chunks: list[bytes], pause_s: float) -> None:
        self.chunks, self.pause_s = chunks, pause_s

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        await asyncio.sleep(self.pause_s)


@dataclass
class SlowEndResponse(CannedResponse):
    pause_s: float = 0.5

    @property
    def content(self) -> Any:
        return _SlowEnd(self.chunks, self.pause_s)


@pytest.mark.parametrize("close_after_done", [True, False])
def test_a_client_that_closes_after_done_got_the_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, close_after_done: bool) -> None:
    monkeypatch.setenv("MEM_UPSTREAM_KEY", "sk-upstream")
    chunks = chat_sse(["Hel", "lo."])
    if not close_after_done:
        chunks = chunks[:-1]  # the upstream never reaches [DONE] before the client leaves: a real disconnect
    transport = MemoryTransport(lambda req: SlowEndResponse(200, chunks, [(b"content-type", b"text/event-stream")]))

    async def scenario() -> None:
        cfg = config(tmp_path)
        rt = Runtime(cfg, transport=transport)
        app = create_app(cfg, rt)
        await rt.start()
        try:
            body = b'{"model": "m", "messages": [{"role": "user", "content": "Say hello."}], "stream": true}'
            sent: list[dict[str, Any]] = []
            first_body = asyncio.Event()
            got_done = asyncio.Event()
            requested = False

            async def receive() -> dict[str, Any]:
                nonlocal requested
                if not requested:
                    requested = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await (got_done if close_after_done else first_body).wait()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)
                if message["type"] == "http.response.body" and message.get("body"):
                    first_body.set()
                    if b"[DONE]" in message["body"]:
                        got_done.set()

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                     "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
                     "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")], "client": ("127.0.0.1", 5000),
                     "server": ("127.0.0.1", 8080)}
            await asyncio.wait_for(app(scope, receive, send), 10)
            start = next(m for m in sent if m["type"] == "http.response.start")
            rid = dict(start["headers"])[b"x-request-id"].decode()
            item = rt.registry.get(rid, now=time.time())
            assert item is not None and item[1] is not None
            outcome = item[1]
            if close_after_done:
                assert outcome.error_class is None and outcome.quality == 1.0 and outcome.completion_tokens == 3
            else:
                assert outcome.error_class == "client_disconnected"
        finally:
            await rt.stop()

    asyncio.run(scenario())
