"""Holdout requests are judged at least as often as tuned ones; the extra ones feed the guards only (issue 22)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from policies.records import Decision, Outcome, Params, RequestContext
from policies.signals import Signal
from proxy.config import ConfigError, JudgeSettings, build_config
from proxy.learning import Judge


def _decision(rid: str, mode: str) -> Decision:
    ctx = RequestContext(task_type="qa", model="m", endpoint="chat", prompt_tokens_est=10, message_count=1, has_tools=False,
                         json_mode=False, stream=False, client_temperature=None, client_max_tokens=None)
    return Decision(request_id=rid, context=ctx, context_fingerprint=0, sent=Params(), baseline=Params(), propensity=1.0,
                    policy="thompson_gaussian", policy_version="v", mode=mode, created_at=0.0)


def test_default_holdout_rate_balances_the_judged_counts() -> None:
    judge = JudgeSettings(sample_rate=0.1)
    assert judge.holdout_rate(0.05) == 1.0  # min(1, 0.1 x 0.95 / 0.05)
    assert judge.holdout_rate(0.5) == pytest.approx(0.1)  # never below sample_rate
    assert JudgeSettings(sample_rate=0.01).holdout_rate(0.05) == pytest.approx(0.19)
    assert JudgeSettings(sample_rate=0.1, holdout_sample_rate=0.3).holdout_rate(0.05) == 0.3
    assert build_config({"judge": {"holdout_sample_rate": 0.5}}).judge.holdout_sample_rate == 0.5
    for bad in (1.5, 0.05):  # above 1, below sample_rate (0.1)
        with pytest.raises(ConfigError, match="judge.holdout_sample_rate"):
            build_config({"judge": {"holdout_sample_rate": bad}})
    with pytest.raises(ConfigError, match="slo.max_cost_regression"):
        build_config({"slo": {"max_cost_regression": -0.1}})


def test_holdout_is_sampled_at_its_rate_and_the_extra_ones_are_for_the_guards_only() -> None:
    delivered: list[Signal] = []

    async def deliver(signal: Signal) -> str:
        delivered.append(signal)
        return "applied"

    async def transport(body: dict) -> dict:
        return {"choices": [{"message": {"content": '{"score": 7}'}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}

    settings = JudgeSettings(enabled=True, sample_rate=0.1, queue_size=100_000)
    judge = Judge(settings, transport=transport, deliver=deliver, rng=np.random.default_rng(0), holdout_sample_rate=0.6)
    msgs = [{"role": "user", "content": "q"}]
    ok = Outcome("x", 200, 0.1)
    tuned = sum(judge.on_complete(_decision(f"t{i}", "optimized"), ok, "answer", msgs) for i in range(4000))
    held = sum(judge.on_complete(_decision(f"h{i}", "holdout"), ok, "answer", msgs) for i in range(4000))
    assert 0.08 < tuned / 4000 < 0.12 and 0.56 < held / 4000 < 0.64

    async def drain() -> None:
        while not judge.queue.empty():
            await judge.judge(judge.queue.get_nowait())

    asyncio.run(drain())
    flags = {s.request_id: s.guards_only for s in delivered}
    assert not any(v for k, v in flags.items() if k.startswith("t"))  # tuned: always for the policy too
    extra = sum(v for k, v in flags.items() if k.startswith("h"))
    assert 0.8 < extra / held < 0.87  # (0.6 - 0.1) / 0.6 of the judged holdout requests
