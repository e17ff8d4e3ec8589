"""Safe knobs through the real proxy, driven by the openai SDK against the fake upstream."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

MESSAGES = [{"role": "user", "content": "is this spam? yes or no"}]


@pytest.fixture(scope="module")
def general(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    cfg = make_config(
        upstream.url,
        tmp_path_factory.mktemp("safeknobs"),
        optimization={"mode": "general", "seed": 11, "min_quality_signals": 3},  # tune_temperature = auto, 5 % holdout
        admin={"token_env": "THERMOSTAT_TEST_SAFEKNOBS_NO_TOKEN", "allow_unauthenticated": True},  # no token: loopback clients only
    )
    running = start_thermostat(cfg)
    yield running
    running.stop()


def sdk(t: RunningThermostat, task_type: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=t.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": task_type})


def test_explicit_max_tokens_50_never_exceeds_50_upstream(general: RunningThermostat, upstream: FakeUpstream) -> None:
    client = sdk(general, "classification")
    seen: set[int] = set()
    modes: set[str] = set()
    for _ in range(40):
        raw = client.chat.completions.with_raw_response.create(model="echo-1", messages=MESSAGES, max_tokens=50, temperature=0.3)  # type: ignore[arg-type]
        modes.add(raw.http_response.headers["x-thermostat-mode"])
        body = upstream.last().body
        assert 25 <= body["max_tokens"] <= 50  # lowered by at most half, never raised
        assert body["temperature"] == 0.3  # no feedback yet: temperature is not tuned
        seen.add(body["max_tokens"])
    # Optimised, yet the cap stays: 40 answers cannot show at 95 % that a lower cap cuts < 0.5 % more
    # (guards/truncation.py; tests/integration/test_truncation_proxy.py shows it lowering once they can).
    assert "optimized" in modes and seen == {50}
    for _ in range(10):
        client.chat.completions.create(model="echo-1", messages=MESSAGES, max_completion_tokens=50)  # type: ignore[arg-type]
        body = upstream.last().body
        assert "max_tokens" not in body and 25 <= body["max_completion_tokens"] <= 50


def test_no_temperature_sent_none_inserted(general: RunningThermostat, upstream: FakeUpstream) -> None:
    client = sdk(general, "creative")
    for _ in range(20):
        raw = client.chat.completions.with_raw_response.create(model="echo-1", messages=MESSAGES)  # type: ignore[arg-type]
        assert raw.http_response.headers["x-thermostat-mode"] in ("optimized", "holdout")
        body = upstream.last().body
        assert set(body) == {"model", "messages"}  # forwarded as the SDK sent it: no temperature, no cap


def test_explicit_feedback_unlocks_temperature_for_its_task_type(general: RunningThermostat, upstream: FakeUpstream) -> None:
    client = sdk(general, "summary")
    rt = general.runtime
    ids = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="echo-1", messages=MESSAGES, temperature=0.7, max_tokens=400)  # type: ignore[arg-type]
        ids.append(raw.http_response.headers["x-request-id"])
    assert {upstream.last().body["temperature"]} == {0.7}
    api = f"{general.base}/api/optimization/record-outcome"
    for i, rid in enumerate(ids):
        assert rt.bandit.signals.count("summary") == i
        r = httpx.post(api, json={"request_id": rid, "outcome": {"quality": 0.8}}, timeout=10)
        assert r.status_code == 200, r.text
    r = httpx.post(api, json={"request_id": ids[0], "outcome": {"quality": 0.2}, "overwrite": True}, timeout=10)
    assert r.status_code == 200 and rt.bandit.signals.count("summary") == 3  # an overwrite is not a new signal
    assert rt.bandit.signals.count("classification") == 0
    temperatures = set()
    for _ in range(40):
        client.chat.completions.create(model="echo-1", messages=MESSAGES, temperature=0.7, max_tokens=400)  # type: ignore[arg-type]
        temperatures.add(upstream.last().body["temperature"])
    assert len(temperatures) > 1 and all(abs(t - 0.7) <= 0.2 + 1e-9 for t in temperatures)
