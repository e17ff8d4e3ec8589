"""A real HTTP server standing in for an OpenAI-compatible upstream, for tests.

Deterministic (ids and timestamps derive from the request), records every request
it receives, and misbehaves on demand through the model name:
`error-<status>` answers that status with an OpenAI error body, `slow-<ms>` waits,
`cut-stream` drops the connection mid-stream, `stall-stream` falls silent mid-stream
(connection open), `hang` never answers, `big-<bytes>`
answers with about that many bytes of content, `cached-*` reports usage details as the
providers do (half the prompt read from the cache, a third of the answer reasoning; on
Messages also 7 tokens written to the cache).

Besides chat and legacy completions it speaks OpenAI Responses (`/v1/responses`) and
Anthropic Messages (`/v1/messages`), streamed and not, with the shapes of
proxy/demo/wire.py; `models` is the `/v1/models` list it serves and
`models_status` makes that endpoint fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.demo.wire import anthropic_body, anthropic_error, anthropic_events, prompt_text, responses_body, responses_events
from tests.support.loop_thread import AppInThread, serve_app


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes


@dataclass
class FakeUpstream:
    host: str = "127.0.0.1"
    port: int = 0
    received: list[Received] = field(default_factory=list)
    delay_s: float = 0.0
    models: tuple[str, ...] = ("echo-1",)
    models_status: int = 200
    billed_tokens: int = 0  # total_tokens of every chat/completions answer it produced (its own usage count)
    billed_prompt_tokens: int = 0  # the same count split, for pricing what it produced (a dollar budget)
    billed_completion_tokens: int = 0
    _server: AppInThread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeUpstream:
        self._server = serve_app(lambda app: app.router.add_route("*", "/{tail:.*}", self._handle), self.host, self.port)
        self.port = self._server.port
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def last(self) -> Received:
        return self.received[-1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.received.append(Received(request.method, request.path, dict(request.headers), body, raw))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        path = request.path
        if path == "/v1/models" and self.models_status != 200:
            return web.json_response({"error": {"message": "models unavailable", "type": "server_error", "code": None}}, status=self.models_status)
        if path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in self.models]},
                                     headers={"x-request-id": "req_upstream_models"})
        if path.startswith("/v1/models/"):
            wanted = path.rsplit("/", 1)[1]
            if wanted not in self.models:
                return web.json_response({"error": {"message": f"model {wanted} not found", "type": "invalid_request_error", "code": "model_not_found"}}, status=404)
            return web.json_response({"id": wanted, "object": "model", "created": 0, "owned_by": "test"})
        if path == "/v1/messages/count_tokens" and isinstance(body, dict):
            return web.json_response({"input_tokens": len(json.dumps(body.get("messages"))) // 4 + 1})
        if path in ("/v1/responses", "/v1/messages") and isinstance(body, dict):
            return await self._other_format(request, body, path)
        if path == "/v1/embeddings":
            return web.json_response({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                                      "model": body.get("model") if isinstance(body, dict) else None,
                                      "usage": {"prompt_tokens": 2, "total_tokens": 2}})
        if path not in ("/v1/chat/completions", "/v1/completions") or not isinstance(body, dict):
            return web.json_response({"error": {"message": "not found", "type": "invalid_request_error", "code": None}}, status=404)
        model = str(body.get("model", ""))
        if model.startswith("error-"):
            status = int(model.split("-", 1)[1])
            return web.json_response(
                {"error": {"message": f"upstream says {status}", "type": "server_error" if status >= 500 else "invalid_request_error",
                           "code": f"code_{status}", "param": None}},
                status=status, headers={"x-request-id": "req_upstream_error", "x-upstream-extra": "kept"},
            )
        if model.startswith("slow-"):
            await asyncio.sleep(int(model.split("-", 1)[1]) / 1000)
        if model == "hang":
            await asyncio.sleep(3600)
        return await (self._stream(request, body) if body.get("stream") else self._complete(body, path))

    async def _other_format(self, request: web.Request, body: dict[str, Any], path: str) -> web.StreamResponse:
        """Responses or Messages: echo the last user text, cut at the token cap (one word = one token)."""
        anthropic = path == "/v1/messages"
        model = str(body.get("model", ""))
        if model.startswith("error-"):
            status = int(model.split("-", 1)[1])
            if anthropic:
                return web.json_response(anthropic_error(status, f"upstream says {status}"), status=status)
            return web.json_response({"error": {"message": f"upstream says {status}", "type": "invalid_request_error", "code": f"code_{status}", "param": None}},
                                     status=status)
        words = f"echo: {prompt_text(body)}".split()
        limit = body.get("max_tokens" if anthropic else "max_output_tokens")
        truncated = isinstance(limit, int) and limit < len(words)
        if truncated:
            words = words[:limit]
        prompt = len(json.dumps(body.get("messages", body.get("input")))) // 4 + 1
        digest = hashlib.sha256(json.dumps(body.get("messages", body.get("input")), sort_keys=True).encode()).hexdigest()[:24]
        text = " ".join(words)
        if anthropic:
            final = anthropic_body(ident="msg_" + digest, model=model, text=text, input_tokens=prompt, output_tokens=len(words), truncated=truncated)
            if model.startswith("cached-"):
                final["usage"].update(cache_read_input_tokens=2 * prompt, cache_creation_input_tokens=7)
            events = anthropic_events(final, [(" " if i else "") + w for i, w in enumerate(words)])
        else:
            final = responses_body(ident="resp_" + digest, model=model, text=text, input_tokens=prompt, output_tokens=len(words),
                                   truncated=truncated, created=1700000000, request=body)
            if model.startswith("cached-"):
                final["usage"]["input_tokens_details"] = {"cached_tokens": prompt // 2}
                final["usage"]["output_tokens_details"] = {"reasoning_tokens": len(words) // 3}
            events = responses_events(final, [(" " if i else "") + w for i, w in enumerate(words)])
        if not body.get("stream"):
            return web.json_response(final, headers={"x-request-id": "req_upstream_123"})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "x-request-id": "req_upstream_stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(event)
        await resp.write_eof()
        return resp

    @staticmethod
    def _text(body: dict[str, Any]) -> str:
        model = str(body.get("model", ""))
        if model.startswith("big-"):  # about that many bytes of content
            return "echo: " + "padding " * (int(model.split("-", 1)[1]) // 8)
        if "messages" in body:
            last = body["messages"][-1]["content"] if body["messages"] else ""
            return str(last) if model == "raw-echo" else f"echo: {last}"  # raw-echo: the message itself (JSON answers)
        return f"echo: {body.get('prompt', '')}"

    @staticmethod
    def _id(body: dict[str, Any]) -> str:
        return "chatcmpl-" + hashlib.sha256(json.dumps(body.get("messages", body.get("prompt")), sort_keys=True).encode()).hexdigest()[:24]

    def _usage(self, body: dict[str, Any], text: str) -> dict[str, Any]:
        prompt = len(json.dumps(body.get("messages", body.get("prompt", "")))) // 4 + 1
        completion = len(text.split())
        self.billed_tokens += prompt + completion
        self.billed_prompt_tokens += prompt
        self.billed_completion_tokens += completion
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if str(body.get("model", "")).startswith("cached-"):
            usage["prompt_tokens_details"] = {"cached_tokens": prompt // 2}
            usage["completion_tokens_details"] = {"reasoning_tokens": completion // 3}
        return usage

    async def _complete(self, body: dict[str, Any], path: str) -> web.Response:
        text = self._text(body)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        words = text.split()
        finish = "stop"
        if isinstance(limit, int) and limit < len(words):
            words, finish = words[:limit], "length"
        text = " ".join(words)
        if path == "/v1/completions":
            payload: dict[str, Any] = {"id": "cmpl-" + self._id(body)[9:], "object": "text_completion", "created": 1700000000, "model": body["model"],
                       "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], "usage": self._usage(body, text)}
        else:
            payload = {"id": self._id(body), "object": "chat.completion", "created": 1700000000, "model": body["model"],
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "finish_reason": finish, "logprobs": None}],
                       "usage": self._usage(body, text), "system_fingerprint": "fp_test"}
        return web.json_response(payload, headers={"x-request-id": "req_upstream_123", "openai-processing-ms": "1"})

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "x-request-id": "req_upstream_stream"})
        await resp.prepare(request)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        text = self._text(body)
        words = text.split()
        cid = self._id(body)

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            payload: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": 1700000000, "model": body["model"],
                                       "system_fingerprint": "fp_test", "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                payload["usage"] = None
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        await resp.write(chunk({"role": "assistant", "content": ""}, None))
        for i, word in enumerate(words):
            if body["model"] == "stall-stream" and i == 1:
                await asyncio.sleep(0.3)  # a read after the response started, then silence
            await resp.write(chunk({"content": (" " if i else "") + word}, None))
            if body["model"] == "cut-stream" and i == 1:
                request.transport.close()  # type: ignore[union-attr]
                return resp
            if body["model"] == "stall-stream" and i == 1:
                await asyncio.sleep(30)  # the connection stays open and silent
            if body["model"].startswith("drip"):
                await asyncio.sleep(0.05)
        await resp.write(chunk({}, "stop"))
        if include_usage:
            usage = {"id": cid, "object": "chat.completion.chunk", "created": 1700000000, "model": body["model"],
                     "system_fingerprint": "fp_test", "choices": [], "usage": self._usage(body, text)}
            await resp.write(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
