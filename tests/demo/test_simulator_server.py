"""The simulator server through the official openai SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from proxy.demo import start_simulator


@pytest.mark.asyncio
async def test_chat_non_streaming_and_streaming() -> None:
    sim = await start_simulator(seed=1, time_scale=0)
    try:
        assert sim.url.endswith("/v1")
        client = openai.AsyncOpenAI(base_url=sim.url, api_key="test", max_retries=0)
        messages = [{"role": "system", "content": "You write Python code."}, {"role": "user", "content": "sort a list"}]
        raw = await client.chat.completions.with_raw_response.create(model="sim-1", messages=messages, temperature=0.3, max_tokens=5000)
        assert raw.headers["x-sim-task-type"] == "code"
        natural = int(raw.headers["x-sim-natural-tokens"])
        reply = raw.parse()
        assert reply.id.startswith("chatcmpl-")
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None and reply.usage.completion_tokens == natural
        assert len(reply.choices[0].message.content.split()) == natural
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + natural
        # the same prompt always wants the same length; a small max_tokens truncates it
        short = await client.chat.completions.create(model="sim-1", messages=messages, max_tokens=natural - 1)
        assert short.choices[0].finish_reason == "length"
        assert short.usage is not None and short.usage.completion_tokens == natural - 1

        stream = await client.chat.completions.create(
            model="sim-1", messages=messages, max_tokens=5000, stream=True, stream_options={"include_usage": True}
        )
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        assert finish == "stop" and usage is not None and usage.completion_tokens == natural
        assert len(text.split()) == natural

        no_usage = await client.chat.completions.create(model="sim-1", messages=messages, stream=True)
        assert all([chunk.usage is None async for chunk in no_usage])
    finally:
        await sim.close()


@pytest.mark.asyncio
async def test_completions_json_mode_models_truth_and_faults() -> None:
    sim = await start_simulator(seed=2, time_scale=0)
    try:
        client = openai.AsyncOpenAI(base_url=sim.url, api_key="test", max_retries=0)
        done = await client.completions.create(model="sim-1", prompt="Summarise: the cat sat.", max_tokens=4000)
        assert done.id.startswith("cmpl-") and done.choices[0].finish_reason == "stop"
        chunks = [c async for c in await client.completions.create(model="sim-1", prompt="hi", stream=True)]
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")

        js = await client.chat.completions.create(
            model="sim-1",
            messages=[{"role": "user", "content": "give json"}],
            response_format={"type": "json_object"},
            max_tokens=4000,
        )
        assert "answer" in json.loads(js.choices[0].message.content or "")

        models = await client.models.list()
        assert {m.id for m in models.data} >= {"sim-1"}

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sim.port}") as http:
            truth = (await http.get("/sim/truth", params={"temperature": 0.7, "max_tokens": 512})).json()
            assert truth["tasks"]["code"]["optimum_arm"]["temperature"] == 0.5
            set_faults = await http.post("/sim/faults", json={"error_rate": 1.0, "error_status": 503})
            assert set_faults.json()["error_rate"] == 1.0
            assert (await http.post("/sim/faults", json={"error_rate": 2})).status_code == 400
        with pytest.raises(openai.APIStatusError) as failure:
            await client.chat.completions.create(model="sim-1", messages=[{"role": "user", "content": "x"}])
        assert failure.value.status_code == 503
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="sim-1", messages="nope")  # type: ignore[arg-type]
    finally:
        await sim.close()
