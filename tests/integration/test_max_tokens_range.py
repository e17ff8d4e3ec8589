"""No valid max_tokens gets a 5xx, on any of the four endpoints, in any mode (issue 21, item 2).

A client cap between `[constraints] max_tokens` + 1 and that + `max_delta_max_tokens`
(4,097..4,596 with the defaults) used to leave the decider no arm: the trust region
offered only lower caps (the client's own is above what Thermostat may choose), the
truncation check withheld those until answers show them safe, and the policy raised,
a text/plain 500. Driven through the real app by the official SDKs, over the whole
valid range by hypothesis, plus every value of the band around the ceiling that failed, in each
rollout mode (shadow, canary, guarded, general) and with optimization off.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

USER = [{"role": "user", "content": "alpha beta gamma"}]
INT64 = 2**63 - 1
ENDPOINTS = ("chat", "completions", "responses", "messages")
# The defaults under test: ceiling 4,096, band 500, truncation check on.
MODES = {
    "general": {"mode": "general", "holdout_fraction": 0.3, "seed": 5},
    "canary": {"mode": "canary", "seed": 5},
    "guarded": {"mode": "guarded", "seed": 5},
    "shadow": {"mode": "shadow"},
    "off": {"enabled": False},
}


@pytest.fixture(scope="module", params=sorted(MODES))
def proxy(request: pytest.FixtureRequest, upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    ups = [
        {"name": "oa", "base_url": upstream.url, "models": ["*"], "timeout_s": 2.0, "connect_timeout_s": 1.0},
        {"name": "an", "base_url": upstream.url, "format": "anthropic", "models": ["claude-*"], "timeout_s": 2.0, "connect_timeout_s": 1.0},
    ]
    cfg = make_config(upstream.url, tmp_path_factory.mktemp(f"range-{request.param}"), upstreams=ups, optimization=MODES[request.param])
    running = start_thermostat(cfg)
    yield running
    running.stop()


@functools.cache
def _clients_at(port: int) -> tuple[openai.OpenAI, anthropic.Anthropic]:
    base = f"http://127.0.0.1:{port}"
    return (openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0, timeout=10),
            anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0, timeout=10))


def _send(t: RunningThermostat, endpoint: str, value: int) -> tuple[int, str | None]:
    """One request through the official SDK; (status, the max_tokens field the upstream received)."""
    oa, an = _clients_at(t.port)
    try:
        if endpoint == "chat":
            oa.chat.completions.create(model="echo-1", messages=USER, max_completion_tokens=value)  # type: ignore[arg-type]
            field = "max_completion_tokens"
        elif endpoint == "completions":
            oa.completions.create(model="echo-1", prompt="alpha beta", max_tokens=value)
            field = "max_tokens"
        elif endpoint == "responses":
            oa.responses.create(model="echo-1", input="alpha beta", max_output_tokens=value)
            field = "max_output_tokens"
        else:
            an.messages.create(model="claude-x", messages=USER, max_tokens=value)  # type: ignore[arg-type]
            field = "max_tokens"
    except (openai.APIStatusError, anthropic.APIStatusError) as e:
        return e.status_code, None
    return 200, field


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(value=st.one_of(st.integers(min_value=1, max_value=INT64), st.integers(min_value=3_500, max_value=5_200)))
@example(value=4_097)
@example(value=4_500)
@example(value=4_596)
@example(value=INT64)
def test_no_valid_max_tokens_gets_a_5xx(proxy: RunningThermostat, upstream: FakeUpstream, value: int) -> None:
    for endpoint in ENDPOINTS:
        status, field = _send(proxy, endpoint, value)
        assert status == 200, (endpoint, value, status)
        sent = upstream.last().body[field]
        assert 1 <= sent <= value  # the client's cap, or a lower one the trust region allows


def test_the_failing_band_goes_as_the_client_sent_it(proxy: RunningThermostat, upstream: FakeUpstream) -> None:
    """Above Thermostat's own ceiling and with no lower cap shown safe, nothing may be tuned."""
    for value in [*range(4_090, 4_600, 7), 4_596]:
        status, field = _send(proxy, ENDPOINTS[value % 4], value)
        assert status == 200, (value, status)
        if value > 4_096:
            assert upstream.last().body[field] == value


@pytest.mark.parametrize("path", ["recommend", "test-shadow"])
def test_control_api_answers_the_same_band(proxy: RunningThermostat, path: str) -> None:
    for value in (4_096, 4_097, 4_321, 4_596, 4_597):
        r = httpx.post(f"{proxy.base}/api/optimization/{path}", json={"context": {"model": "echo-1", "messages": USER, "max_tokens": value}}, timeout=10)
        assert r.status_code == 200, (value, r.text)
        sent = r.json()["would_send" if path == "recommend" else "sent"]["max_tokens"]
        assert sent == value
