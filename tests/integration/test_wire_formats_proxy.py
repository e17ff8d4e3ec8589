"""The Responses API and Anthropic Messages through the real app, driven by the official SDKs.

Real parts only: Thermostat on a loopback port in front of the fake upstream
(tests/support/fake_upstream.py), which speaks chat, Responses and Messages; the
decision log is read back from the app's own store.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from policies.effort import steps
from proxy.store import DecisionRow
from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, free_port, start_thermostat

OPT = {"mode": "general", "policy": "thompson_gaussian", "seed": 3, "holdout_fraction": 0.0, "tune_temperature": "always"}
EFFORTS = ["low", "medium", "high"]
USER = [{"role": "user", "content": "alpha beta gamma delta epsilon"}]


def _two_formats(upstream: FakeUpstream) -> list[dict[str, Any]]:
    """An OpenAI `*` upstream and an Anthropic one for claude-* (and error-* to reach the fake's error answers)."""
    return [
        {"name": "oa", "base_url": upstream.url, "models": ["*"], "timeout_s": 2.0, "connect_timeout_s": 1.0},
        {"name": "an", "base_url": upstream.url, "format": "anthropic", "models": ["claude-*", "error-*"], "timeout_s": 2.0,
         "connect_timeout_s": 1.0, "models_config": [{"pattern": "claude-*", "efforts": EFFORTS}]},
    ]


def _start(upstream: FakeUpstream, data_dir: Path, optimization: dict[str, Any]) -> RunningThermostat:
    # The wire path of tuned knobs is under test, not the length check on lower caps (tests/guards/test_truncation.py,
    # tests/integration/test_truncation_proxy.py): every cap of the region is offered from the first request.
    cfg = make_config(upstream.url, data_dir, optimization=optimization, upstreams=_two_formats(upstream),
                      constraints={"max_extra_truncation": 1.0})
    return start_thermostat(cfg)


@pytest.fixture(scope="module")
def off(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    running = _start(upstream, tmp_path_factory.mktemp("off"), {"enabled": False})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tuned(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    running = _start(upstream, tmp_path_factory.mktemp("tuned"), OPT)
    yield running
    running.stop()


def _row(t: RunningThermostat, request_id: str) -> DecisionRow:
    t.flush()
    row = t.call(t.runtime.sink.get_decision(request_id))
    assert row is not None, request_id
    return row


def _oa(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="sk-test", max_retries=0, timeout=10)


def _an(root: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=root, api_key="sk-ant-test", max_retries=0, timeout=10)


def t_endpoint(t: RunningThermostat, row: DecisionRow) -> str:
    """The wire format the decision was bucketed under (kept by the in-memory registry)."""
    found = t.runtime.registry.get(row.request_id, time.time())
    assert found is not None
    return found[0].context.endpoint


# ---- OpenAI Responses ---------------------------------------------------------------


def test_responses_off_is_identical_to_a_direct_call(off: RunningThermostat, upstream: FakeUpstream) -> None:
    kwargs: dict[str, Any] = {"model": "echo-1", "input": "one two three four", "max_output_tokens": 3, "temperature": 0.4}
    direct = _oa(upstream.url).responses.create(**kwargs)
    proxied = _oa(off.url).responses.create(**kwargs)
    assert proxied.model_dump() == direct.model_dump()
    direct_events = [e.model_dump() for e in _oa(upstream.url).responses.create(**kwargs, stream=True)]
    proxied_events = [e.model_dump() for e in _oa(off.url).responses.create(**kwargs, stream=True)]
    assert proxied_events == direct_events and proxied_events[-1]["type"] == "response.incomplete"


def test_responses_tuned_within_the_trust_region_and_logged(tuned: RunningThermostat, upstream: FakeUpstream) -> None:
    client = _oa(tuned.url)
    seen = set()
    for _ in range(25):
        raw = client.responses.with_raw_response.create(model="echo-1", input="one two three four", temperature=0.7, max_output_tokens=400)
        assert raw.headers["x-thermostat-mode"] == "optimized"
        sent = upstream.last().body
        assert abs(sent["temperature"] - 0.7) <= 0.2 + 1e-9 and 1 <= sent["max_output_tokens"] <= 400
        assert "max_tokens" not in sent and "reasoning" not in sent  # the client's own field names only
        seen.add((sent["temperature"], sent["max_output_tokens"]))
    assert len(seen) > 1
    # Truncation, usage and TTFT, non-streamed and streamed, land in the decision log.
    raw = client.responses.with_raw_response.create(model="echo-1", input="one two three four", max_output_tokens=2)
    resp = raw.parse()
    row = _row(tuned, raw.headers["x-request-id"])
    assert resp.status == "incomplete" and resp.usage is not None
    assert resp.usage.output_tokens == upstream.last().body["max_output_tokens"] <= 2  # tuned, under the client's cap
    assert (row.finish_reason, row.completion_tokens, row.prompt_tokens) == ("length", resp.usage.output_tokens, resp.usage.input_tokens)
    assert t_endpoint(tuned, row) == "responses"
    with client.responses.with_streaming_response.create(model="echo-1", input="one two", stream=True) as streamed:
        rid = streamed.headers["x-request-id"]
        events = [e for e in streamed.parse()]
    assert events[-1].type == "response.completed"
    row = _row(tuned, rid)
    assert (row.finish_reason, row.completion_tokens) == ("stop", 3)
    assert row.ttft_s is not None and 0 < row.ttft_s <= row.latency_s


# ---- Anthropic Messages ---------------------------------------------------------------


def test_messages_non_streamed_and_streamed_through_the_sdk(off: RunningThermostat, upstream: FakeUpstream) -> None:
    direct = _an(f"http://{upstream.host}:{upstream.port}")
    proxied = _an(off.base)
    kwargs: dict[str, Any] = {"model": "claude-x", "max_tokens": 2, "messages": USER}
    expected = direct.messages.create(**kwargs).model_dump()
    assert proxied.messages.create(**kwargs).model_dump() == expected
    got = upstream.last()
    assert got.path == "/v1/messages" and "anthropic-version" in {k.lower() for k in got.headers}  # passed through
    streamed = [e.model_dump() for e in proxied.messages.create(**{**kwargs, "max_tokens": 100}, stream=True)]
    assert streamed == [e.model_dump() for e in direct.messages.create(**{**kwargs, "max_tokens": 100}, stream=True)]
    with proxied.messages.stream(**{**kwargs, "max_tokens": 100}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.content[0].type == "text"
    assert final.content[0].text == "echo: alpha beta gamma delta epsilon"
    counted = proxied.messages.count_tokens(model="claude-x", messages=USER)
    assert counted.input_tokens == direct.messages.count_tokens(model="claude-x", messages=USER).input_tokens
    assert upstream.last().path == "/v1/messages/count_tokens"


def test_messages_tuned_effort_and_max_tokens_no_temperature(tuned: RunningThermostat, upstream: FakeUpstream) -> None:
    client = _an(tuned.base)
    efforts = set()
    for _ in range(25):
        raw = client.messages.with_raw_response.create(model="claude-x", max_tokens=300, messages=USER, output_config={"effort": "medium"})
        assert raw.headers["x-thermostat-mode"] == "optimized"
        sent = upstream.last().body
        assert "temperature" not in sent  # never added on the Messages API
        assert 1 <= sent["max_tokens"] <= 300
        effort = sent["output_config"]["effort"]
        assert effort in EFFORTS and abs(steps("medium", effort)) <= 1
        efforts.add(effort)
    assert len(efforts) > 1  # effort is a knob it explores
    # Streamed: usage and truncation from message_start / message_delta, TTFT at the first text delta.
    with client.messages.with_streaming_response.create(model="claude-x", max_tokens=2, messages=USER, stream=True) as streamed:
        rid = streamed.headers["x-request-id"]
        kinds = [e.type for e in streamed.parse()]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    row = _row(tuned, rid)
    assert (row.finish_reason, row.completion_tokens) == ("length", upstream.last().body["max_tokens"])
    assert row.prompt_tokens is not None and row.ttft_s is not None and row.ttft_s <= row.latency_s


def test_messages_client_temperature_stays_in_anthropics_range(tuned: RunningThermostat, upstream: FakeUpstream) -> None:
    client = _an(tuned.base)
    for _ in range(15):
        client.messages.create(model="claude-x", max_tokens=50, messages=USER, extra_body={"temperature": 0.9})
        temperature = upstream.last().body["temperature"]
        assert 0.7 - 1e-9 <= temperature <= 1.0


def test_messages_typed_errors(off: RunningThermostat, upstream: FakeUpstream) -> None:
    client = _an(off.base)
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="claude-x", max_tokens=0, messages=USER)
    assert "'max_tokens' must be at least 1" in str(bad.value)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="gpt-unrouted", max_tokens=5, messages=USER)
    assert "no upstream of format 'anthropic'" in str(missing.value)
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(model="error-401", max_tokens=5, messages=USER)
    # Thermostat's own refusal on the path speaks Anthropic, with the method it takes.
    r = httpx.get(f"{off.url}/messages", timeout=5)
    assert r.status_code == 405 and r.json()["type"] == "error" and r.headers["allow"] == "POST"


# ---- /v1/models --------------------------------------------------------------------------


def test_models_list_with_a_default_upstream(off: RunningThermostat, upstream: FakeUpstream) -> None:
    assert [m.id for m in _oa(off.url).models.list()] == list(upstream.models)
    assert _oa(off.url).models.retrieve("echo-1").id == "echo-1"


def test_models_list_without_a_default_and_with_one_upstream_down(upstream: FakeUpstream, tmp_path: Path) -> None:
    second = FakeUpstream(models=("beta-1", "echo-1")).start()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    ups = [
        {"name": "a", "base_url": upstream.url, "models": ["echo-*"], "timeout_s": 2.0, "connect_timeout_s": 1.0, "retries": 0},
        {"name": "b", "base_url": second.url, "models": ["beta-*"], "timeout_s": 2.0, "connect_timeout_s": 1.0, "retries": 0},
        {"name": "down", "base_url": dead, "models": ["gone-*"], "timeout_s": 2.0, "connect_timeout_s": 1.0, "retries": 0},
    ]
    running = start_thermostat(make_config(upstream.url, tmp_path, optimization={"enabled": False}, upstreams=ups))
    try:
        client = _oa(running.url)
        assert [m.id for m in client.models.list()] == ["echo-1", "beta-1"]  # merged, deduplicated, in config order
        assert client.models.retrieve("beta-1").id == "beta-1" and second.last().path == "/v1/models/beta-1"
    finally:
        running.stop()
        second.stop()
    only_dead = [ups[2]]
    running = start_thermostat(make_config(upstream.url, tmp_path / "dead", optimization={"enabled": False}, upstreams=only_dead))
    try:
        with pytest.raises(openai.APIStatusError) as info:
            _oa(running.url).models.list()
        assert info.value.status_code == 502
    finally:
        running.stop()


def test_messages_with_extended_thinking_keep_max_tokens_above_the_budget(tuned: RunningThermostat, upstream: FakeUpstream) -> None:
    client = _an(tuned.base)
    sent = set()
    for _ in range(20):
        raw = client.messages.with_raw_response.create(model="claude-x", max_tokens=1100, messages=USER,
                                                       thinking={"type": "enabled", "budget_tokens": 1024})
        value = upstream.last().body["max_tokens"]
        assert 1024 < value <= 1100
        assert f"max_tokens={value}" in raw.headers["x-thermostat-params"]  # the decision records what was sent
        sent.add(value)
    assert len(sent) > 1  # still tuned, in the band the API accepts
