"""Reasoning effort in the simulator: the truth's math by hand, then each wire format's field
through the server with the official SDKs."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from policies.records import Arm
from proxy.demo import start_simulator
from proxy.demo.simulator import SimulatorTruth

CODE = {"x-task-type": "code"}


def test_effort_quality_and_length_by_hand() -> None:
    truth = SimulatorTruth()
    # code: effort_gain 0.16, base "medium" (rank 3): gain(r) = 0.16 * (2^-3 - 2^-r)
    assert truth.effort_quality("code", None) == 0.0 == truth.effort_quality("code", "medium")
    assert truth.effort_quality("code", "low") == pytest.approx(0.16 * (0.125 - 0.25))
    assert truth.effort_quality("code", "high") == pytest.approx(0.01)
    assert truth.effort_quality("code", "xhigh") == pytest.approx(0.015)  # half the previous step: diminishing
    assert truth.effort_quality("creative", "max") == 0.0  # an easy task gains nothing
    assert truth.effort_quality("default", "high") == pytest.approx(0.05 * 0.0625)
    assert truth.effort_length(100, None) == 100 == truth.effort_length(100, "medium")
    assert (truth.effort_length(100, "high"), truth.effort_length(100, "xhigh"), truth.effort_length(100, "low")) == (130, 169, 77)
    with pytest.raises(ValueError):
        truth.effort_steps("turbo")


def test_respond_and_expectation_follow_effort() -> None:
    truth = SimulatorTruth()

    def respond(effort: str | None, max_tokens: int = 5000) -> Any:
        arm = Arm(temperature=0.2, max_tokens=max_tokens, effort=effort)
        return truth.respond("code", arm, natural_tokens=200, prompt_tokens=100, quality_z=0.0, latency_z=0.0)

    low, base, high = respond("low"), respond(None), respond("high")
    assert (low.completion_tokens, base.completion_tokens, high.completion_tokens) == (154, 200, 260)
    assert low.latency_s < base.latency_s < high.latency_s and low.ttft_s == high.ttft_s
    assert high.true_quality - base.true_quality == pytest.approx(0.01)
    assert base.true_quality - low.true_quality == pytest.approx(0.02)
    cut = respond("high", max_tokens=200)  # the effort's extra tokens do not fit: cut, and worse than base
    assert cut.finish_reason == "length" and cut.true_quality < base.true_quality
    q_base, lat_base, tok_base = truth.expected_outcome("code", Arm(temperature=0.2, max_tokens=5000))
    q_high, lat_high, tok_high = truth.expected_outcome("code", Arm(temperature=0.2, max_tokens=5000, effort="high"))
    assert q_high > q_base and lat_high > lat_base and tok_high == pytest.approx(1.3 * tok_base, rel=0.01)


@pytest.mark.asyncio
async def test_each_wire_format_reads_its_effort_field() -> None:
    sim = await start_simulator(seed=4, time_scale=0)
    try:
        oa = openai.AsyncOpenAI(base_url=sim.url, api_key="test", max_retries=0)
        an = anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{sim.port}", api_key="test", max_retries=0)
        messages: Any = [{"role": "user", "content": "fix this bug"}]

        async def chat(effort: str | None) -> tuple[int, float, int]:
            extra = {} if effort is None else {"reasoning_effort": effort}
            raw = await oa.chat.completions.with_raw_response.create(model="sim-1", messages=messages, max_tokens=5000, extra_headers=CODE, **extra)
            usage = raw.parse().usage
            assert usage is not None
            return usage.completion_tokens, float(raw.headers["x-sim-true-quality"]), int(raw.headers["x-sim-natural-tokens"])

        async def responses(effort: str | None) -> tuple[int, float, int]:
            extra = {} if effort is None else {"reasoning": {"effort": effort}}
            raw = await oa.responses.with_raw_response.create(model="sim-1", input=messages, max_output_tokens=5000, extra_headers=CODE, **extra)
            usage = raw.parse().usage
            assert usage is not None
            return usage.output_tokens, float(raw.headers["x-sim-true-quality"]), int(raw.headers["x-sim-natural-tokens"])

        async def messages_api(effort: str | None) -> tuple[int, float, int]:
            extra = {} if effort is None else {"output_config": {"effort": effort}}
            raw = await an.messages.with_raw_response.create(model="sim-1", messages=messages, max_tokens=5000, extra_headers=CODE, **extra)
            return (await raw.parse()).usage.output_tokens, float(raw.headers["x-sim-true-quality"]), int(raw.headers["x-sim-natural-tokens"])

        truth = sim.truth
        for call in (chat, responses, messages_api):
            base_tokens, base_q, base_natural = await call(None)
            assert base_tokens == base_natural  # absent effort: the base length
            for effort in ("low", "high", "max"):
                tokens, q, natural = await call(effort)
                assert tokens == natural == truth.effort_length(base_natural, effort), (call.__name__, effort)
                assert q == pytest.approx(base_q + truth.effort_quality("code", effort), abs=2e-6), (call.__name__, effort)
            assert (await call("high"))[0] > base_tokens > (await call("low"))[0]

        with pytest.raises(openai.BadRequestError, match="reasoning_effort must be one of"):
            await oa.chat.completions.create(model="sim-1", messages=messages, reasoning_effort="turbo")  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError, match="reasoning.effort must be one of"):
            await oa.responses.create(model="sim-1", input="hi", reasoning={"effort": "turbo"})  # type: ignore[typeddict-item]
        with pytest.raises(anthropic.BadRequestError, match="output_config.effort must be one of"):
            await an.messages.create(model="sim-1", messages=messages, max_tokens=50, output_config={"effort": "minimal"})  # type: ignore[typeddict-item]
    finally:
        await sim.close()
