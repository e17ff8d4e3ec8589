"""LangChain's `ChatOpenAI(use_responses_api=True)` and `ChatAnthropic` through the real app.

What LangChain sends is not what the official SDKs' examples send (Responses input as
typed content parts, its own headers and defaults), so these pin that the two most used
framework clients get their answers, streamed and not, and that the decision log records
each request with its format's usage. Real parts only: Thermostat on a loopback port in
front of the fake upstream (tests/support/fake_upstream.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_anthropic import ChatAnthropic
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_openai import ChatOpenAI

from proxy.store import DecisionRow
from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

PROMPT = "alpha beta gamma delta epsilon"
ANSWER = f"echo: {PROMPT}"
TUNED = {"mode": "general", "policy": "thompson_gaussian", "seed": 5, "holdout_fraction": 0.0, "tune_temperature": "always"}
EFFORTS = ["low", "medium", "high"]


def _start(upstream: FakeUpstream, data_dir: Path, optimization: dict[str, Any]) -> RunningThermostat:
    ups = [
        {"name": "oa", "base_url": upstream.url, "models": ["*"], "timeout_s": 2.0, "connect_timeout_s": 1.0},
        {"name": "an", "base_url": upstream.url, "format": "anthropic", "models": ["claude-*"], "timeout_s": 2.0,
         "connect_timeout_s": 1.0, "models_config": [{"pattern": "claude-*", "efforts": EFFORTS}]},
    ]  # fmt: skip
    # How LangChain traffic is tuned and logged is under test, not the length check on lower caps
    # (tests/integration/test_truncation_proxy.py): every cap of the region is offered from the first request.
    return start_thermostat(make_config(upstream.url, data_dir, optimization=optimization, upstreams=ups,
                                        constraints={"max_extra_truncation": 1.0}))


@pytest.fixture(scope="module")
def off(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    running = _start(upstream, tmp_path_factory.mktemp("lc_off"), {"enabled": False})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tuned(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    running = _start(upstream, tmp_path_factory.mktemp("lc_tuned"), TUNED)
    yield running
    running.stop()


def _only_decision_since(t: RunningThermostat, since: float) -> DecisionRow:
    """The one decision logged since `since` (LangChain hides the response headers, so
    the request id is found in the log itself; each test's app serves one call at a time)."""
    t.flush()
    rows = t.call(t.runtime.sink.fetch_decisions(since=since, limit=10))
    assert len(rows) == 1, rows
    return rows[0]


def _endpoint(t: RunningThermostat, row: DecisionRow) -> str:
    found = t.runtime.registry.get(row.request_id, time.time())
    assert found is not None
    return found[0].context.endpoint


def _responses(t: RunningThermostat, **kwargs: Any) -> ChatOpenAI:
    return ChatOpenAI(model="echo-1", base_url=t.url, api_key="sk-test", use_responses_api=True, max_retries=0, timeout=10, **kwargs)  # type: ignore[arg-type]


def _anthropic(t: RunningThermostat, **kwargs: Any) -> ChatAnthropic:
    return ChatAnthropic(model="claude-x", anthropic_api_url=t.base, api_key="sk-ant-test", max_retries=0, timeout=10, **kwargs)  # type: ignore[arg-type]


def _streamed(chunks: Iterator[AIMessageChunk]) -> AIMessageChunk:
    merged: AIMessageChunk | None = None
    for chunk in chunks:
        merged = chunk if merged is None else merged + chunk
    assert merged is not None
    return merged


def _check_row(t: RunningThermostat, row: DecisionRow, message: AIMessage, endpoint: str, *, streamed: bool) -> None:
    usage = message.usage_metadata
    assert usage is not None
    assert row.status == 200 and row.finish_reason == "stop" and _endpoint(t, row) == endpoint
    assert (row.prompt_tokens, row.completion_tokens) == (usage["input_tokens"], usage["output_tokens"]) == (row.prompt_tokens, 6)
    if streamed:
        assert row.ttft_s is not None and 0 < row.ttft_s <= row.latency_s


def test_chat_openai_responses_api_invoke_and_stream(off: RunningThermostat, upstream: FakeUpstream) -> None:
    llm = _responses(off, max_tokens=100, reasoning={"effort": "medium"})
    since = time.time()
    message = llm.invoke(PROMPT)
    assert message.text == ANSWER
    sent = upstream.last()
    assert sent.path == "/v1/responses" and sent.body["max_output_tokens"] == 100 and sent.body["reasoning"]["effort"] == "medium"
    row = _only_decision_since(off, since)
    _check_row(off, row, message, "responses", streamed=False)
    assert row.chosen_params.effort == "medium" and row.mode == "off"

    since = time.time()
    merged = _streamed(llm.stream(PROMPT))
    assert merged.text == ANSWER and upstream.last().body["stream"] is True
    _check_row(off, _only_decision_since(off, since), merged, "responses", streamed=True)


def test_chat_anthropic_invoke_and_stream(off: RunningThermostat, upstream: FakeUpstream) -> None:
    llm = _anthropic(off, max_tokens=100, output_config={"effort": "medium"})
    since = time.time()
    message = llm.invoke(PROMPT)
    assert message.text == ANSWER and message.response_metadata["stop_reason"] == "end_turn"
    sent = upstream.last()
    assert sent.path == "/v1/messages" and sent.body["output_config"]["effort"] == "medium" and "anthropic-version" in {k.lower() for k in sent.headers}
    row = _only_decision_since(off, since)
    _check_row(off, row, message, "anthropic", streamed=False)
    assert row.chosen_params.effort == "medium"

    since = time.time()
    merged = _streamed(llm.stream(PROMPT))
    assert merged.text == ANSWER and upstream.last().body["stream"] is True
    _check_row(off, _only_decision_since(off, since), merged, "anthropic", streamed=True)


def test_langchain_requests_are_tuned_and_logged_with_what_was_sent(tuned: RunningThermostat, upstream: FakeUpstream) -> None:
    """Tuned traffic from both clients: knobs patched under each format's own field names,
    the decision log holding the arm that was sent and the usage that came back."""
    clients: list[tuple[Any, str, str]] = [
        (_responses(tuned, max_tokens=300, temperature=0.7, reasoning={"effort": "medium"}), "max_output_tokens", "responses"),
        (_anthropic(tuned, max_tokens=300, output_config={"effort": "medium"}), "max_tokens", "anthropic"),
    ]
    for llm, cap_field, endpoint in clients:
        sent_arms = set()
        for i in range(12):
            since = time.time()
            message = _streamed(llm.stream(PROMPT)) if i % 2 else llm.invoke(PROMPT)
            body = upstream.last().body
            row = _only_decision_since(tuned, since)
            assert row.mode == "optimized" and _endpoint(tuned, row) == endpoint
            assert 1 <= body[cap_field] <= 300 and row.chosen_params.max_tokens == body[cap_field]
            effort = body["reasoning" if endpoint == "responses" else "output_config"]["effort"]
            assert effort in EFFORTS and row.chosen_params.effort == effort
            usage = message.usage_metadata
            assert usage is not None and (row.prompt_tokens, row.completion_tokens) == (usage["input_tokens"], usage["output_tokens"])
            assert ANSWER.startswith(message.text) and row.completion_tokens == len(message.text.split())
            sent_arms.add((body[cap_field], effort))
        assert len(sent_arms) > 1, endpoint  # LangChain traffic is explored like any other
