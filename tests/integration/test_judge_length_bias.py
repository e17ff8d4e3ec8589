"""A length-biased judge is muted for its task type without any explicit feedback, and loses what it taught.

Through the real proxy with the simulator's `sim-judge-length` (the simulator's judge plus 0.25
quality per doubling of the answer's length), driven by the official openai SDK: the judge is
muted (event, metric, status, quality report), its logged scores leave the usual statistics
(swapped back for the automatic reward), the temperature stage is reopened, temperature stays
at the client's while muted, further scores are "untrusted", and the mute survives a restart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.decision.decider import TEMPERATURE_STATISTICS
from proxy.demo.simulator import SimulatorTruth, TaskProfile
from proxy.demo.simulator_server import SimulatorHandle
from tests.conftest import make_config
from tests.support.servers import RunningThermostat, simulator_in_thread, start_thermostat


def messages(i: int) -> list[dict[str, str]]:
    """A different prompt each time: the simulator's answer length follows the prompt."""
    return [{"role": "system", "content": "You are a creative writer."}, {"role": "user", "content": f"A short poem about the sea, number {i}."}]


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorHandle]:
    # Short answers whose length varies a lot within an arm (log-normal sigma 0.6), the client's temperature already best.
    truth = SimulatorTruth(tasks={"creative": TaskProfile(best_temperature=0.6, length_median=40, prompt_median=50, length_sigma=0.6)})
    with simulator_in_thread(seed=11, truth=truth) as sim:
        yield sim


def config(url: str, tmp_path: Any, model: str) -> Any:
    return make_config(
        url, tmp_path,
        optimization={"mode": "general", "seed": 7, "min_quality_signals": 10, "holdout_fraction": 0.1},
        policy={"grid": {"temperature_steps": 3, "max_tokens_steps": 1}},
        judge={"enabled": True, "model": model, "sample_rate": 1.0, "max_concurrency": 2},
    )


def ask(client: openai.OpenAI, i: int) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model="sim-writer", messages=messages(i), temperature=0.6, max_tokens=4000, user=f"u{i}",  # type: ignore[arg-type]
    )
    return raw.http_response.headers["x-request-id"]


def run_until_muted(t: RunningThermostat, client: openai.OpenAI, limit: int) -> int:
    rt = t.runtime
    assert rt.judge is not None
    deadline = time.monotonic() + 90
    for i in range(limit):
        ask(client, i)
        if i % 20 == 19:
            t.call(asyncio.wait_for(rt.judge.drain(), 30))
            if rt.judge_trust.muted("creative") or time.monotonic() > deadline:
                return i + 1
    return limit


def test_length_biased_judge_is_muted_and_its_teaching_taken_back(simulator: SimulatorHandle, tmp_path: Any) -> None:
    cfg = config(simulator.url, tmp_path, "sim-judge-length")
    t = start_thermostat(cfg)
    try:
        rt = t.runtime
        swaps: list[tuple[str, float, float]] = []
        original = rt.policy.correct

        def spy(ctx: Any, base: Any, arm: Any, old: float, new: float, **kw: Any) -> Any:
            swaps.append((ctx.task_type, old, new))
            return original(ctx, base, arm, old, new, **kw)

        rt.policy.correct = spy  # type: ignore[method-assign]
        reopened: list[str] = []
        original_reopen = rt.policy.reopen  # type: ignore[attr-defined]

        def reopen_spy(task_type: str) -> None:
            reopened.append(task_type)
            original_reopen(task_type)

        rt.policy.reopen = reopen_spy  # type: ignore[attr-defined]
        client = openai.OpenAI(base_url=t.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "creative"})
        sent = run_until_muted(t, client, 600)
        assert rt.judge_trust.muted("creative"), f"not muted after {sent} judged requests"
        assert rt.bandit.temperature_evidence("creative") is False  # temperature back to the client's while muted
        t.call(rt.judge_trust.flush())
        t.flush()

        # What it taught, taken back: every logged judge score of the task swapped for the automatic reward.
        rows = t.call(rt.sink.fetch_decisions(task_type="creative", limit=10_000))
        judged = {(r.feedback_reward, r.reward) for r in rows if r.feedback_source == "judge" and r.status == 200}
        taken_back = {(old, new) for task, old, new in swaps if task == "creative"}
        assert judged and judged <= taken_back
        assert reopened == ["creative" + TEMPERATURE_STATISTICS]

        # Visible: event, status, quality report, metric.
        base = t.base + "/api/optimization"
        events = httpx.get(f"{base}/events", timeout=10).json()
        muted = [e for e in events["items"] if e["kind"] == "judge_muted"]
        assert len(muted) == 1 and muted[0]["task_type"] == "creative" and muted[0]["evidence"]["reason"] == "length_bias"
        assert muted[0]["evidence"]["concordance_low"] > 0.6
        assert httpx.get(f"{base}/status", timeout=10).json()["judge_muted"] == {"creative": "length_bias"}
        task = next(x for x in httpx.get(f"{base}/quality", timeout=10).json()["tasks"] if x["task_type"] == "creative")
        assert task["judge"]["muted"] == "length_bias" and task["judge"]["trusted"] is False
        assert task["judge"]["length_check"]["concordance_low"] > task["judge"]["length_check"]["mute_above"] == 0.6
        metrics = httpx.get(f"{t.base}/metrics", timeout=10).text
        assert 'thermostat_judge_muted{reason="length_bias",task="creative"} 1.0' in metrics

        # While muted: the client's temperature, and the judge's scores no longer teach.
        assert rt.judge is not None
        untrusted_before = rt.judge.counts["untrusted"]
        ids = [ask(client, 1000 + i) for i in range(20)]
        t.call(asyncio.wait_for(rt.judge.drain(), 30))
        t.flush()
        temps = [t.call(rt.sink.get_decision(rid)).chosen_params.temperature for rid in ids]
        assert temps == [0.6] * 20
        assert rt.judge.counts["untrusted"] == untrusted_before + 20
    finally:
        t.stop()

    again = start_thermostat(cfg)  # the mute survives a restart
    try:
        assert again.runtime.judge_trust.muted("creative")
        assert httpx.get(f"{again.base}/api/optimization/status", timeout=10).json()["judge_muted"] == {"creative": "length_bias"}
        assert again.runtime.bandit.temperature_evidence("creative") is False
        unmute = f"{again.base}/api/optimization/judge/unmute"
        r = httpx.post(unmute, json={"task_type": "creative", "reason": "judge prompt fixed"}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["was"] == "length_bias" and not again.runtime.judge_trust.muted("creative")
        assert httpx.get(f"{again.base}/api/optimization/status", timeout=10).json()["judge_muted"] == {}
        gone = httpx.post(unmute, json={"task_type": "creative"}, timeout=10)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_muted"
    finally:
        again.stop()


def test_truthful_judge_is_not_muted(simulator: SimulatorHandle, tmp_path: Any) -> None:
    t = start_thermostat(config(simulator.url, tmp_path, "sim-judge"))
    try:
        client = openai.OpenAI(base_url=t.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "creative"})
        run_until_muted(t, client, 300)
        state = t.runtime.judge_trust.length_of("creative")
        assert state is not None and state.concordance.n > 50  # the check ran on the truthful judge's scores...
        assert not t.runtime.judge_trust.muted("creative")  # ...and found nothing
    finally:
        t.stop()
