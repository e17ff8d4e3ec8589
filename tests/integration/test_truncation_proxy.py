"""A lower max_tokens only where the task's own answers show it does not cut more (guards/truncation.py), through the proxy."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

MESSAGES = [{"role": "user", "content": "is this spam? yes or no"}]


@pytest.fixture(scope="module")
def tolerant(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    # δ = 0.2 so a few dozen clean answers are evidence enough (at the default 0.005 it takes ~940).
    cfg = make_config(
        upstream.url,
        tmp_path_factory.mktemp("truncation"),
        optimization={"mode": "general", "seed": 5, "holdout_fraction": 0.0},
        constraints={"max_extra_truncation": 0.2},
    )
    running = start_thermostat(cfg)
    yield running
    running.stop()


def sdk(t: RunningThermostat, task_type: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=t.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": task_type})


def test_short_answers_unlock_lower_caps_after_evidence(tolerant: RunningThermostat, upstream: FakeUpstream) -> None:
    client = sdk(tolerant, "classify")
    sent = []
    for _ in range(90):
        r = client.chat.completions.create(model="echo-1", messages=MESSAGES, max_tokens=50, temperature=0.3)  # type: ignore[arg-type]
        assert r.choices[0].finish_reason == "stop"  # 7-word answers: no cap in 25..50 cuts them
        sent.append(upstream.last().body["max_tokens"])
    assert set(sent[:15]) == {50}  # no evidence yet: the client's cap
    assert min(sent[40:]) < 50 and all(25 <= m <= 50 for m in sent)  # then the lower caps the answers show safe
    evidence = tolerant.runtime.bandit.truncation.evidence(("fake", "echo-1", "classify", 0.3, 50))
    assert evidence and all(w >= 20 for w in evidence.values())  # every lower cap admitted at 1/α


def test_long_answers_keep_every_cap_that_would_cut_them_closed(tolerant: RunningThermostat, upstream: FakeUpstream) -> None:
    client = sdk(tolerant, "essay")
    sent = []
    for _ in range(120):
        # big-400: 51-word answers; the client's cap of 60 fits them, caps of 30..45 would cut every one
        r = client.chat.completions.create(model="big-400", messages=MESSAGES, max_tokens=60, temperature=0.3)  # type: ignore[arg-type]
        assert r.choices[0].finish_reason == "stop"
        sent.append(upstream.last().body["max_tokens"])
    assert min(sent) >= 51  # never a cap that cuts
    assert min(sent[60:]) < 60  # yet the safe lower cap is played
    evidence = tolerant.runtime.bandit.truncation.evidence(("fake", "big-400", "essay", 0.3, 60))
    assert all(w < 20 for cap, w in evidence.items() if cap < 51)
