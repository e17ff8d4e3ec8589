"""An in-memory upstream `Transport`: canned responses, recorded requests, no socket.

Lets unit tests drive the whole edge (parse, decide, patch, forward, relay, complete)
through one ASGI call; the integration tests keep the real fake upstream on loopback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from multidict import CIMultiDict


@dataclass
class SentRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None

    def json(self) -> Any:
        return msgspec.json.decode(self.body or b"null")


class _Body:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


@dataclass
class CannedResponse:
    status: int
    chunks: list[bytes]
    headers: list[tuple[bytes, bytes]] = field(default_factory=lambda: [(b"content-type", b"application/json")])
    released: bool = False
    closed: bool = False

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return tuple(self.headers)

    @property
    def content_length(self) -> int | None:
        return None

    @property
    def content(self) -> _Body:
        return _Body(self.chunks)

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


def chat_json(content: str = "Hello.", prompt_tokens: int = 7, completion_tokens: int = 3) -> bytes:
    return msgspec.json.encode({
        "id": "cmpl-1", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    })


def chat_sse(parts: list[str], prompt_tokens: int = 7, completion_tokens: int = 3) -> list[bytes]:
    """One SSE event per chunk, a finish chunk, the usage chunk, then [DONE]."""
    events = [{"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in parts]
    events.append({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({"id": "c", "object": "chat.completion.chunk", "choices": [],
                   "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}})
    out = [b"data: " + msgspec.json.encode(e) + b"\n\n" for e in events]
    out.append(b"data: [DONE]\n\n")
    return out


class MemoryTransport:
    """Answers each request with `respond(request)`; an exception it returns is raised instead."""

    def __init__(self, respond: Callable[[SentRequest], CannedResponse | BaseException]) -> None:
        self.respond = respond
        self.requests: list[SentRequest] = []
        self.responses: list[CannedResponse] = []
        self.closed = False

    async def send(self, method: str, url: str, headers: CIMultiDict[str], body: bytes | None) -> CannedResponse:
        request = SentRequest(method, url, dict(headers), body)
        self.requests.append(request)
        answer = self.respond(request)
        if isinstance(answer, BaseException):
            raise answer
        self.responses.append(answer)
        return answer

    async def aclose(self) -> None:
        self.closed = True
