"""A model changes under the same name; the holdout sees it, exploration reopens, the policy finds the new optimum.

Through the real proxy, driven by the OpenAI SDK. The client caps `max_tokens` at 40 and
Thermostat may raise it (`raise_client_max_tokens`), so the arms are 20, 30, 40, 50 and 60
(temperature stays the client's: no quality signals that can see it). The fake upstream
echoes the prompt: 30 words before the change, so every cap from 30 up is as good; then the
"model" starts answering 55 words under the same name, so only 60 is not truncated (the
automatic score charges a cut answer 0.4). The holdout (the client's own 40) drops from 1.0
to 0.6: the conservative monitor's Page–Hinkley detector fires `change_detected`, the
runtime reopens the task's statistics, and traffic moves to 60.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

WORDS = " ".join(f"w{i}" for i in range(29))  # the echo is "echo: " + these: 30 words
CAP = 40


class ChangingModel(FakeUpstream):
    """The same model name, answering 25 words longer once `changed` is set."""

    changed: bool = False

    def _text(self, body: dict[str, Any]) -> str:  # type: ignore[override]
        text = FakeUpstream._text(body)
        return text + " more" * 25 if self.changed else text


@pytest.fixture(scope="module")
def model() -> Iterator[ChangingModel]:
    server = ChangingModel().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def webhook() -> Iterator[FakeUpstream]:
    receiver = FakeUpstream().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def proxy(model: ChangingModel, webhook: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    cfg = make_config(
        model.url,
        tmp_path_factory.mktemp("change"),
        optimization={"mode": "general", "seed": 5, "holdout_fraction": 0.4},
        constraints={"raise_client_max_tokens": True},
        # Only the per-task change detector is under test: no global SLO action, no per-task rollback.
        slo={"quality_min": 0.0, "min_samples": 10_000, "max_quality_regression": 0.9},
        alerts={"webhook_urls": [f"http://127.0.0.1:{webhook.port}/alerts"]},
    )
    running = start_thermostat(cfg)
    yield running
    running.stop()


def _send(client: openai.OpenAI, model: ChangingModel, user: str) -> tuple[str, int]:
    raw = client.chat.completions.with_raw_response.create(
        model="echo-1", messages=[{"role": "user", "content": WORDS}], max_tokens=CAP, user=user,  # type: ignore[arg-type]
    )
    return raw.http_response.headers["x-thermostat-mode"], int(model.last().body["max_tokens"])


def test_model_change_reopens_exploration_and_the_policy_moves_to_the_new_optimum(
    proxy: RunningThermostat, model: ChangingModel, webhook: FakeUpstream
) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "extraction"})
    rt = proxy.runtime
    for i in range(250):
        _send(client, model, f"a{i}")
    assert "~r" not in rt.bandit.policy.version  # stationary: nothing reopened

    model.changed = True
    detected_at = None
    for i in range(300):  # bounded: the detector needs a few dozen holdout samples
        _send(client, model, f"b{i}")
        if "~r" in rt.bandit.policy.version:  # one reopen for the task, one for its temperature stage
            detected_at = i
            break
    assert detected_at is not None, "the change was never detected"
    # after the reopen the task learns from the prior: its statistics hold only what came since
    sent = [_send(client, model, f"c{i}") for i in range(300)]
    late = Counter(cap for mode, cap in sent[150:] if mode == "optimized")
    assert late.most_common(1)[0][0] == 60, late
    assert late[60] >= 0.7 * sum(late.values()), late

    # recorded (event log, with the reopen), counted (metric), alerted
    proxy.flush(0.2)
    events = proxy.call(rt.sink.fetch_events(limit=50))
    changes = [e for e in events if e.kind == "change_detected" and e.actor == "conservative"]
    assert changes and changes[0].evidence["task_type"] == "extraction" and changes[0].evidence["exploration_reopened"] is True
    # which holdout stream moved (the answers grew and got cut), and the re-learning interval it opened, then closed
    assert changes[0].evidence["stream"] in ("automatic", "length", "truncation")
    assert changes[0].evidence["relearning_since"] == pytest.approx(changes[0].at)
    ended = [e for e in events if e.kind == "relearning_ended" and e.actor == "conservative"]
    assert len(ended) == 1 and ended[0].evidence["relearning_since"] == pytest.approx(changes[0].at) and ended[0].at >= changes[0].at
    status = httpx.get(f"{proxy.base}/api/optimization/slo-status", timeout=10).json()
    assert next(t for t in status["tasks"] if t["task_type"] == "extraction")["relearning_since"] is None  # closed
    text = httpx.get(f"{proxy.base}/metrics", timeout=10).text
    assert 'thermostat_task_baseline_changes_total{task="extraction"} 1.0' in text
    for _ in range(50):
        alerts = [r.body for r in webhook.received if isinstance(r.body, dict) and r.body.get("name") == "ThermostatBaselineChanged"]
        if alerts:
            break
        time.sleep(0.1)
    assert alerts and alerts[0]["labels"]["task_type"] == "extraction"
