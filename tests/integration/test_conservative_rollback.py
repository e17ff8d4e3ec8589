"""A deliberately harmful policy is caught per task type and rolled back, through the real proxy.

The fake upstream echoes the last message; a cap below its word count truncates the
answer (finish_reason "length"), which the automatic quality scores 0. The harmful
policy always picks the smallest max_tokens the trust region allows, so optimised
"extraction" traffic is always truncated while its holdout (the client's own cap, which
fits the answer) never is. The conservative monitor must roll back that task type only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import httpx
import numpy as np
import openai
import pytest

from policies.base import Choice
from policies.records import Arm, RequestContext
from policies.thompson import ThompsonGaussianPolicy
from proxy.runtime import Runtime
from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

WORDS = " ".join(f"w{i}" for i in range(39))  # the echo is "echo: " + these: 40 words
CAP = 40  # the client's cap: exactly enough, so any lower arm truncates


class ShortestCap(ThompsonGaussianPolicy):
    """Harmful on purpose: always the smallest max_tokens (the policy's own statistics still update)."""

    def choose(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm], rng: np.random.Generator) -> Choice:
        index = min(range(len(arms)), key=lambda i: arms[i].max_tokens)
        return Choice(index=index, propensity=1.0)


@pytest.fixture(scope="module")
def webhook() -> Iterator[FakeUpstream]:
    """Receives the alert webhooks (it records every request it gets)."""
    receiver = FakeUpstream().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def harmful(upstream: FakeUpstream, webhook: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    cfg = make_config(
        upstream.url,
        tmp_path_factory.mktemp("conservative"),
        optimization={"mode": "general", "seed": 3, "holdout_fraction": 0.5},
        # The global SLO (all task types at once) must not act first: only the per-task monitor is under test.
        slo={"quality_min": 0.0, "min_samples": 10_000},
        alerts={"webhook_urls": [f"http://127.0.0.1:{webhook.port}/alerts"]},
        # The length check (guards/truncation.py) would never offer caps that cut these answers, so the harm
        # would not reach the monitor; it is switched off because the monitor is what is under test here.
        constraints={"max_extra_truncation": 1.0},
    )
    rt = Runtime(cfg)
    rt.bandit.policy = ShortestCap.from_settings(thompson=cfg.policy.thompson, linucb=cfg.policy.linucb)
    running = start_thermostat(cfg, rt)
    yield running
    running.stop()


def test_harmful_policy_is_rolled_back_for_its_task_type_only(harmful: RunningThermostat, upstream: FakeUpstream, webhook: FakeUpstream) -> None:
    extraction = openai.OpenAI(base_url=harmful.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "extraction"})
    chat = openai.OpenAI(base_url=harmful.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "chat"})
    messages = [{"role": "user", "content": WORDS}]
    seen: list[str] = []
    for i in range(300):  # bounded: the monitor decides within a few dozen samples per stream
        raw = extraction.chat.completions.with_raw_response.create(
            model="echo-1", messages=messages, max_tokens=CAP, user=f"u{i}",  # type: ignore[arg-type]
        )
        mode = raw.http_response.headers["x-thermostat-mode"]
        seen.append(mode)
        if mode == "optimized":
            assert upstream.last().body["max_tokens"] < CAP  # the harm is real: the answer was truncated
        if mode == "rollback":
            break
    assert seen[-1] == "rollback", f"never rolled back after {len(seen)} requests: {set(seen)}"
    assert {"optimized", "holdout"} <= set(seen[:-1])
    rt = harmful.runtime
    assert rt.rollout.effective(time.time()).rollback is None  # no global rollback
    assert rt.conservative.is_rolled_back("extraction") and not rt.conservative.is_rolled_back("chat")

    # From now on extraction gets the client's own settings (or its holdout); never the harmful arm.
    for i in range(20):
        raw = extraction.chat.completions.with_raw_response.create(
            model="echo-1", messages=messages, max_tokens=CAP, user=f"v{i}",  # type: ignore[arg-type]
        )
        assert raw.http_response.headers["x-thermostat-mode"] in ("rollback", "holdout")
        assert upstream.last().body["max_tokens"] == CAP
    # Another task type keeps being optimised.
    chat_modes = set()
    for i in range(20):
        raw = chat.chat.completions.with_raw_response.create(model="echo-1", messages=[{"role": "user", "content": "hi"}], user=f"c{i}")  # type: ignore[arg-type]
        chat_modes.add(raw.http_response.headers["x-thermostat-mode"])
    assert "optimized" in chat_modes and "rollback" not in chat_modes

    # Recorded (event log), counted (metric), shown per task in slo-status.
    harmful.flush(0.2)
    text = httpx.get(f"{harmful.base}/metrics", timeout=10).text
    assert 'thermostat_task_rollbacks_total{task="extraction"} 1.0' in text
    status = httpx.get(f"{harmful.base}/api/optimization/slo-status", timeout=10).json()
    tasks = {t["task_type"]: t for t in status["tasks"]}
    assert tasks["extraction"]["verdict"] == "worse" and tasks["extraction"]["rolled_back"] is True
    lo, hi = tasks["extraction"]["quality_difference"]
    assert hi < 0  # optimised minus holdout, surely negative
    assert tasks["chat"]["rolled_back"] is False
    events = harmful.call(rt.sink.fetch_events(limit=50))
    rollbacks = [e for e in events if e.kind == "rollback" and e.actor == "conservative"]
    assert len(rollbacks) == 1 and rollbacks[0].evidence["task_type"] == "extraction" and rollbacks[0].to_phase == "rollback"
    alerts = [r.body for r in webhook.received if isinstance(r.body, dict) and r.body.get("name") == "ThermostatTaskRollback"]
    for _ in range(50):  # bounded wait for the sender task (it posts right after the event)
        if alerts:
            break
        time.sleep(0.1)
        alerts = [r.body for r in webhook.received if isinstance(r.body, dict) and r.body.get("name") == "ThermostatTaskRollback"]
    assert len(alerts) == 1 and alerts[0]["labels"]["task_type"] == "extraction"
