"""Explicit feedback wins over a judge score wherever the decision lives, and always pairs with it.

Regression (issue 22): once a judged request's decision had left the registry (20,000 newer
requests, or a restart) explicit feedback for it got 409 "the judge's score was already
recorded", because the log path took any feedback row for explicit feedback.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from policies.signals import Signal
from proxy.decision.decider import TEMPERATURE_STATISTICS
from tests.conftest import make_config
from tests.shared.conftest import REDIS_URL, _delete_prefix, _require_redis
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

MESSAGES = [{"role": "user", "content": "summarise: the cat sat on the mat"}]


def ask(t: RunningThermostat) -> str:
    client = openai.OpenAI(base_url=t.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "summary"})
    raw = client.chat.completions.with_raw_response.create(model="echo-1", messages=MESSAGES, max_tokens=300)  # type: ignore[arg-type]
    return raw.http_response.headers["x-request-id"]


def feedback(t: RunningThermostat, rid: str, quality: float) -> httpx.Response:
    return httpx.post(f"{t.base}/api/optimization/record-outcome", json={"request_id": rid, "outcome": {"quality": quality}}, timeout=10)


def spy_corrections(t: RunningThermostat, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float, float]]:
    policy = t.runtime.policy
    seen: list[tuple[str, float, float]] = []
    original = policy.correct

    def spy(ctx: Any, base: Any, arm: Any, old: float, new: float, **kw: Any) -> Any:
        seen.append((ctx.task_type, old, new))
        return original(ctx, base, arm, old, new, **kw)

    monkeypatch.setattr(policy, "correct", spy)
    return seen


def test_explicit_feedback_after_the_registry_forgot_a_judged_request(upstream: FakeUpstream, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    t = start_thermostat(make_config(upstream.url, tmp_path, optimization={"mode": "general", "seed": 5}))
    try:
        rt = t.runtime
        rt.registry.max_entries = 2  # stands for the 20,000 newer requests that push a decision out
        rid = ask(t)
        t.flush()
        assert t.call(rt.deliver(Signal(rid, 0.3, "judge"))) == "applied"
        for _ in range(3):
            ask(t)
        t.flush()
        assert rt.registry.get(rid, rt.bandit.clock()) is None  # only in the decision log now
        judge_reward = t.call(rt.sink.get_decision(rid)).feedback_reward
        seen = spy_corrections(t, monkeypatch)
        signals_before = rt.bandit.signals.count("summary")

        r = feedback(t, rid, 0.9)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["found_in"] == "log" and not body["overwritten"]
        assert body["previous_reward"] == judge_reward  # the judge's reward is the one swapped out of the statistics
        assert [old for task, old, _ in seen if not task.endswith(TEMPERATURE_STATISTICS)] == [judge_reward]
        assert [old for task, old, _ in seen if task.endswith(TEMPERATURE_STATISTICS)] == [judge_reward]  # swapped, not added
        assert rt.bandit.signals.count("summary") == signals_before  # the judge already counted this request
        assert (0.3, 0.9) in rt.signal_book.pairs_of("summary")
        assert feedback(t, rid, 0.5).status_code == 409  # explicit feedback twice is still a conflict
    finally:
        t.stop()


def test_explicit_feedback_after_a_restart_replaces_the_judge_and_forms_a_pair(upstream: FakeUpstream, tmp_path: Path) -> None:
    cfg = make_config(upstream.url, tmp_path, optimization={"mode": "general", "seed": 5})
    first = start_thermostat(cfg)
    try:
        rid = ask(first)
        first.flush()
        assert first.call(first.runtime.deliver(Signal(rid, 0.2, "judge"))) == "applied"
        first.flush()
    finally:
        first.stop()

    again = start_thermostat(cfg)
    try:
        rt = again.runtime
        assert rt.signal_book.pairs_of("summary") == []
        r = feedback(again, rid, 0.8)
        assert r.status_code == 200, r.text
        assert r.json()["found_in"] == "log"
        assert rt.signal_book.pairs_of("summary") == [(0.2, 0.8)]  # the judge's score came from the log
        again.flush()
        row = again.call(rt.sink.get_decision(rid))
        assert row.feedback_source == "explicit" and row.feedback_quality == 0.8
    finally:
        again.stop()


@pytest.fixture
def prefix() -> Iterator[str]:
    _require_redis()
    name = f"test:{time.time_ns()}:"
    yield name
    _delete_prefix(name)


def test_explicit_feedback_for_a_judged_decision_found_in_redis_after_a_restart(
    upstream: FakeUpstream, tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decision comes back from Redis with the judge's quality in its outcome; the log says it was the judge's.

    Before: no pair formed (the book that knew the judge's score was gone), and the temperature
    stage was given the explicit reward on top of the judge's instead of in its place."""
    cfg = make_config(upstream.url, tmp_path, optimization={"mode": "general", "seed": 5},
                      storage={"flush_interval_s": 0.05, "redis_url": REDIS_URL, "redis_key_prefix": prefix, "sync_interval_s": 0.1})
    first = start_thermostat(cfg)
    try:
        rid = ask(first)
        first.flush()
        assert first.call(first.runtime.deliver(Signal(rid, 0.2, "judge"))) == "applied"
        first.flush()
        judge_reward = first.call(first.runtime.sink.get_decision(rid)).feedback_reward
    finally:
        first.stop()

    again = start_thermostat(cfg)
    try:
        rt = again.runtime
        assert rt.registry.get(rid, rt.bandit.clock()) is None  # not in this process's memory: only in Redis and the log
        seen = spy_corrections(again, monkeypatch)
        r = feedback(again, rid, 0.8)
        assert r.status_code == 200, r.text
        assert r.json()["found_in"] == "registry" and r.json()["previous_reward"] == judge_reward  # from Redis
        assert [old for task, old, _ in seen if task.endswith(TEMPERATURE_STATISTICS)] == [judge_reward]  # swapped, not added
        assert (0.2, 0.8) in rt.signal_book.pairs_of("summary")
    finally:
        again.stop()
