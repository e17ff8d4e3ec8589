"""The fake upstream and the simulator speak Responses and Anthropic Messages the way the
official SDKs read them, and the adapters summarise what those servers send on the wire.

Real parts only: the test fake upstream (tests/support/fake_upstream.py) and the bundled
simulator on loopback ports, driven by the `openai` and `anthropic` SDKs and by httpx for
the raw bytes.
"""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from aiohttp import web

from proxy.demo import start_simulator
from proxy.edge import StreamRelay
from proxy.edge.formats import ANTHROPIC, RESPONSES
from tests.support.fake_upstream import FakeUpstream


def _root(upstream: FakeUpstream) -> str:
    return f"http://{upstream.host}:{upstream.port}"


def test_fake_responses_non_streamed_reads_with_the_sdk_and_the_adapter(upstream: FakeUpstream) -> None:
    client = openai.OpenAI(base_url=upstream.url, api_key="k", max_retries=0)
    resp = client.responses.create(model="echo-1", input="alpha beta gamma", max_output_tokens=2)
    assert resp.status == "incomplete" and resp.incomplete_details is not None and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output_text == "echo: alpha" and resp.usage is not None and resp.usage.output_tokens == 2
    raw = httpx.post(upstream.url + "/responses", json={"model": "echo-1", "input": "alpha beta gamma", "max_output_tokens": 2}).content
    summary = RESPONSES.summarize_body(raw)
    assert (summary.content, summary.finish_reason, summary.completion_tokens, summary.prompt_tokens) == (
        "echo: alpha", "length", 2, resp.usage.input_tokens)


def test_fake_responses_stream_reads_with_the_sdk_and_the_adapter(upstream: FakeUpstream) -> None:
    client = openai.OpenAI(base_url=upstream.url, api_key="k", max_retries=0)
    kinds = []
    text = []
    with client.responses.create(model="echo-1", input="one two", stream=True) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text.append(event.delta)
            if event.type == "response.completed":
                assert event.response.usage is not None and event.response.usage.output_tokens == 3
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed" and "".join(text) == "echo: one two"
    with httpx.stream("POST", upstream.url + "/responses", json={"model": "echo-1", "input": "one two", "stream": True}) as r:
        relay = StreamRelay(strip_usage=False, summarizer=RESPONSES.stream_summarizer())
        raw = b"".join(relay.feed(chunk) for chunk in r.iter_raw()) + relay.flush()
    assert raw.count(b"event: response.output_text.delta") == 3
    assert (relay.summary.content, relay.summary.finish_reason, relay.summary.completion_tokens, relay.first_token) == ("echo: one two", "stop", 3, True)


def test_fake_anthropic_messages_read_with_the_sdk_and_the_adapter(upstream: FakeUpstream) -> None:
    client = anthropic.Anthropic(base_url=_root(upstream), api_key="k", max_retries=0)
    msg = client.messages.create(model="claude-x", max_tokens=2, messages=[{"role": "user", "content": "red green blue"}])
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 2
    assert msg.content[0].type == "text" and msg.content[0].text == "echo: red"
    with client.messages.stream(model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "red green"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 3 and final.content[0].type == "text"
    assert final.content[0].text == "echo: red green"
    body = {"model": "claude-x", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "red green"}]}
    with httpx.stream("POST", _root(upstream) + "/v1/messages", json=body) as r:
        relay = StreamRelay(strip_usage=False, summarizer=ANTHROPIC.stream_summarizer())
        for chunk in r.iter_raw():
            relay.feed(chunk)
    summary = relay.summary
    assert (summary.content, summary.finish_reason, summary.completion_tokens, summary.prompt_tokens) == (
        "echo: red green", "stop", 3, final.usage.input_tokens)


@pytest.mark.parametrize(("status", "exc"), [(400, anthropic.BadRequestError), (404, anthropic.NotFoundError),
                                             (413, anthropic.APIStatusError), (502, anthropic.InternalServerError)])
async def test_thermostats_anthropic_errors_raise_the_sdks_typed_exceptions(status: int, exc: type[Exception]) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=status, body=ANTHROPIC.error_body(status, "'max_tokens' is required", "missing_required_parameter"),
                            content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/messages", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        client = anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{port}", api_key="k", max_retries=0)
        with pytest.raises(exc) as info:
            await client.messages.create(model="c", max_tokens=1, messages=[{"role": "user", "content": "x"}])
        assert isinstance(info.value, anthropic.APIStatusError) and info.value.status_code == status
        assert "'max_tokens' is required" in str(info.value)
    finally:
        await runner.cleanup()


async def test_simulator_speaks_responses_and_messages_streamed_and_not() -> None:
    sim = await start_simulator(seed=3, time_scale=0.0)
    try:
        oa = openai.AsyncOpenAI(base_url=sim.url, api_key="k", max_retries=0)
        resp = await oa.responses.create(model="sim-1", input="write a short story", max_output_tokens=5)
        assert resp.usage is not None and resp.usage.output_tokens <= 5 and resp.status in ("completed", "incomplete")
        if resp.status == "incomplete":
            assert resp.incomplete_details is not None and resp.incomplete_details.reason == "max_output_tokens"
        stream = await oa.responses.create(model="sim-1", input="write a short story", max_output_tokens=400, stream=True)
        done = [event async for event in stream if event.type in ("response.completed", "response.incomplete")]
        assert len(done) == 1 and done[0].response.usage is not None and done[0].response.output_text

        an = anthropic.AsyncAnthropic(base_url=sim.url[: -len("/v1")], api_key="k", max_retries=0)
        msg = await an.messages.create(model="sim-1", max_tokens=3, messages=[{"role": "user", "content": "summarise this text"}])
        assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3
        async with an.messages.stream(model="sim-1", max_tokens=600, messages=[{"role": "user", "content": "summarise"}]) as s:
            final = await s.get_final_message()
        assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens >= 1
        with pytest.raises(anthropic.BadRequestError):
            await an.messages.create(model="sim-1", max_tokens=3, messages=[{"role": "user", "content": "x"}], extra_body={"temperature": 1.5})
        # Chat is unchanged by the new formats.
        chat = await oa.chat.completions.create(model="sim-1", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert chat.usage is not None and chat.usage.completion_tokens <= 4
    finally:
        await sim.close()
