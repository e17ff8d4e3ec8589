"""The edge end to end through one ASGI call, with the upstream behind an in-memory transport.

No socket anywhere: httpx's ASGITransport calls the app, `MemoryTransport` answers for
the upstream. What is pinned: the request forwarded (knobs patched under the client's
field names, the operator's key instead of the client's, usage asked for on streams),
the response relayed byte for byte, failures mapped to OpenAI-shaped 502s, connect
failures retried, and the one Outcome the request leaves behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx
import msgspec
import pytest
from aiohttp.client_reqrep import ConnectionKey

from proxy.app import create_app
from proxy.config import Config, build_config
from proxy.runtime import Runtime
from tests.support.memory_transport import CannedResponse, MemoryTransport, SentRequest, chat_json, chat_sse

MESSAGES = [{"role": "user", "content": "Say hello."}]


def config(tmp_path: Path, **upstream: object) -> Config:
    up = {"name": "mem", "base_url": "http://upstream.invalid/v1", "models": ["*"], "api_key_env": "MEM_UPSTREAM_KEY", **upstream}
    return build_config({"server": {"data_dir": str(tmp_path)}, "upstreams": [up], "admin": {"allow_unauthenticated": True},
                         "optimization": {"enabled": False}}, environ={})


async def run_edge(cfg: Config, transport: MemoryTransport) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    rt = Runtime(cfg, transport=transport)
    app = create_app(cfg, rt)
    await rt.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            yield client, rt
    finally:
        await rt.stop()


@pytest.fixture
def upstream_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MEM_UPSTREAM_KEY", "sk-operator")
    return "Bearer sk-operator"


def test_non_stream_is_forwarded_and_relayed_byte_for_byte(tmp_path: Path, upstream_key: str) -> None:
    body = chat_json("Hello there.")
    transport = MemoryTransport(lambda req: CannedResponse(200, [body[:10], body[10:]]))

    async def scenario() -> None:
        async for client, rt in run_edge(config(tmp_path), transport):
            r = await client.post("/v1/chat/completions?x=1", json={"model": "m", "messages": MESSAGES, "temperature": 0.4},
                                  headers={"authorization": "Bearer sk-client", "x-task-type": "qa"})
            assert r.status_code == 200
            assert r.content == body
            assert r.headers["x-thermostat-mode"] == "off"
            assert r.headers["x-request-id"]
            [sent] = transport.requests
            assert (sent.method, sent.url) == ("POST", "http://upstream.invalid/v1/chat/completions?x=1")
            assert sent.headers["authorization"] == upstream_key
            assert "x-task-type" not in sent.headers and sent.headers["accept-encoding"] == "identity"
            assert sent.json() == {"model": "m", "messages": MESSAGES, "temperature": 0.4}
            assert transport.responses[0].released and not transport.responses[0].closed
            item = rt.registry.get(r.headers["x-request-id"], now=time.time())
            assert item is not None and item[1] is not None
            outcome = item[1]
            assert (outcome.status, outcome.prompt_tokens, outcome.completion_tokens, outcome.finish_reason) == (200, 7, 3, "stop")
            assert outcome.quality is not None and outcome.error_class is None

    asyncio.run(scenario())


def test_stream_asks_for_usage_and_relays_the_chunks(tmp_path: Path, upstream_key: str) -> None:
    transport = MemoryTransport(lambda req: CannedResponse(200, chat_sse(["Hel", "lo."]), [(b"content-type", b"text/event-stream")]))

    async def scenario() -> None:
        async for client, rt in run_edge(config(tmp_path), transport):
            r = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True})
            assert r.status_code == 200
            sent = transport.requests[0].json()
            assert sent["stream_options"] == {"include_usage": True}
            events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            decoded = [msgspec.json.decode(e) for e in events[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in decoded if c["choices"])
            assert text == "Hello."
            # The client did not ask for usage: the usage-only chunk Thermostat asked for is not relayed.
            assert not any("usage" in c and not c["choices"] for c in decoded)
            item = rt.registry.get(r.headers["x-request-id"], now=time.time())
            assert item is not None and item[1] is not None
            assert (item[1].completion_tokens, item[1].finish_reason) == (3, "stop")

    asyncio.run(scenario())


def test_upstream_failure_is_an_openai_shaped_502(tmp_path: Path, upstream_key: str) -> None:
    transport = MemoryTransport(lambda req: aiohttp.ClientPayloadError("broken"))

    async def scenario() -> None:
        async for client, rt in run_edge(config(tmp_path), transport):
            r = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
            assert r.status_code == 502
            err = r.json()["error"]
            assert err["type"] == "upstream_error" and err["code"] == "upstream_unreachable"
            assert len(transport.requests) == 1  # a request that may have reached the model is never sent twice
            item = rt.registry.get(r.headers["x-request-id"], now=time.time())
            assert item is not None and item[1] is not None and item[1].error_class == "protocol"

    asyncio.run(scenario())


def test_connect_failures_are_retried_then_answered(tmp_path: Path, upstream_key: str) -> None:
    failures = 2

    def respond(req: SentRequest) -> CannedResponse | BaseException:
        if len(transport.requests) <= failures:
            key = ConnectionKey("upstream.invalid", 80, False, True, None, None, None)
            return aiohttp.ClientConnectorError(key, OSError(111, "refused"))
        return CannedResponse(200, [chat_json()])

    transport = MemoryTransport(respond)

    async def scenario() -> None:
        async for client, _ in run_edge(config(tmp_path, retries=3), transport):
            r = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
            assert r.status_code == 200 and len(transport.requests) == failures + 1

    asyncio.run(scenario())


def test_passthrough_path_and_closing_the_transport(tmp_path: Path, upstream_key: str) -> None:
    transport = MemoryTransport(lambda req: CannedResponse(200, [b'{"data": []}']))

    async def scenario() -> None:
        async for client, _ in run_edge(config(tmp_path), transport):
            r = await client.get("/v1/models")
            assert r.status_code == 200 and r.json() == {"data": []}
            assert transport.requests[0].url == "http://upstream.invalid/v1/models" and transport.requests[0].body is None
        assert transport.closed

    asyncio.run(scenario())
