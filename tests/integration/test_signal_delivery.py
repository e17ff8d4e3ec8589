"""`deliver_signal` in a real Thermostat: judge and implicit signals replace the automatic score once, by priority."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from policies.signals import Signal
from proxy.decision import SignalBook, deliver_signal
from proxy.decision.decider import TEMPERATURE_STATISTICS
from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

MESSAGES = [{"role": "user", "content": "summarise: the cat sat on the mat"}]


@pytest.fixture(scope="module")
def learning(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    cfg = make_config(upstream.url, tmp_path_factory.mktemp("signals"), optimization={"mode": "general", "seed": 5})
    running = start_thermostat(cfg)
    yield running
    running.stop()


def ask(t: RunningThermostat) -> str:
    client = openai.OpenAI(base_url=t.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "summary"})
    raw = client.chat.completions.with_raw_response.create(model="echo-1", messages=MESSAGES, max_tokens=300)  # type: ignore[arg-type]
    return raw.http_response.headers["x-request-id"]


@pytest.fixture
def corrections(learning: RunningThermostat, monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """(old, new) rewards passed to the real policy's correct() for the usual statistics.

    The temperature-only statistics (`BanditDecider.learn_signal`, task type suffixed
    `TEMPERATURE_STATISTICS`) hold signals only, so they see their own swaps: not counted here.
    """
    policy = learning.runtime.policy
    seen: list[tuple[float, float]] = []
    original = policy.correct

    def spy(ctx: Any, base: Any, arm: Any, old: float, new: float, **kw: Any) -> Any:
        if not ctx.task_type.endswith(TEMPERATURE_STATISTICS):
            seen.append((old, new))
        return original(ctx, base, arm, old, new, **kw)

    monkeypatch.setattr(policy, "correct", spy)
    return seen


def deliver(t: RunningThermostat, book: SignalBook, signal: Signal) -> str:
    # The test's own SignalBook, with the runtime's registry, feedback book and policy.
    return t.call(deliver_signal(dataclasses.replace(t.runtime.feedback_services, signals=book), signal))


def test_judge_replaces_automatic_then_explicit_replaces_judge(learning: RunningThermostat, corrections: list[tuple[float, float]]) -> None:
    rt = learning.runtime
    rid = ask(learning)
    learning.flush()
    book = SignalBook()
    _, automatic = rt.registry.get(rid, rt.bandit.clock()) or (None, None)
    assert automatic is not None and automatic.reward is not None
    assert deliver(learning, book, Signal(rid, 0.25, "judge")) == "applied"
    _, judged = rt.registry.get(rid, rt.bandit.clock()) or (None, None)
    assert judged is not None and judged.quality == 0.25 and not judged.feedback and judged.reward is not None
    assert corrections == [(automatic.reward, judged.reward)]
    assert deliver(learning, book, Signal(rid, 0.0, "implicit")) == "weaker"  # a regeneration mark does not beat the judge
    assert deliver(learning, book, Signal(rid, 0.5, "judge")) == "applied"  # a newer judgment of the same rank does
    _, rejudged = rt.registry.get(rid, rt.bandit.clock()) or (None, None)
    assert rejudged is not None and corrections[-1] == (judged.reward, rejudged.reward)

    r = httpx.post(f"{learning.base}/api/optimization/record-outcome", json={"request_id": rid, "outcome": {"quality": 0.9}}, timeout=10)
    assert r.status_code == 200, r.text  # judge scores are not explicit feedback: no conflict
    assert r.json()["previous_reward"] == rejudged.reward and corrections[-1][0] == rejudged.reward  # swapped, not added
    assert len(corrections) == 3
    assert deliver(learning, book, Signal(rid, 0.1, "judge")) == "weaker"
    assert len(corrections) == 3
    learning.flush()
    row = learning.call(rt.sink.get_decision(rid))
    assert row.feedback_source == "explicit" and row.feedback_quality == 0.9
    assert book.results == {("judge", "applied"): 2, ("implicit", "weaker"): 1, ("judge", "weaker"): 1}


def test_implicit_mark_is_stored_with_its_source(learning: RunningThermostat, corrections: list[tuple[float, float]]) -> None:
    rt = learning.runtime
    rid = ask(learning)
    learning.flush()
    book = SignalBook()
    assert deliver(learning, book, Signal(rid, 0.0, "implicit", reason="regenerated")) == "applied"
    assert deliver(learning, book, Signal(rid, 0.8, "judge")) == "applied"  # the judge outranks the implicit mark
    assert len(corrections) == 2
    learning.flush()
    row = learning.call(rt.sink.get_decision(rid))
    assert row.feedback_source == "judge" and row.feedback_quality == 0.8
    assert deliver(learning, book, Signal("00000000-0000-4000-8000-000000000000", 0.5, "judge")) == "not_found"
    assert deliver(learning, book, Signal(rid, 0.5, "explicit")) == "explicit_not_here"
