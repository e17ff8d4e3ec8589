"""Nothing forwarded spends tokens past the budget (issue 21, item 4).

Once a `reject` budget is spent, `/v1/messages` got 429 while `/v1/messages/` (one
trailing slash) and Anthropic Message Batches still reached the upstream with the
operator's key. A trailing slash now names the same decided path; whatever else may
spend tokens is counted (embeddings, from the usage its answer reports) or, while the
budget is on, not forwarded at all (batches, images, audio: answered 403
`path_not_budgeted` where an operator lists them). Real app on loopback, the official
SDKs where they can send the request, raw sockets where they cannot (a trailing slash).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import make_config
from tests.integration.test_path_confinement import raw_request
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

USER = [{"role": "user", "content": "alpha beta gamma delta"}]
WIDE = ["/chat/completions", "/embeddings", "/models", "/models/*", "/messages", "/messages/*", "/images/*"]


def _start(upstream: FakeUpstream, data_dir: Path, limit: int, forward_paths: list[str] | None = None) -> RunningThermostat:
    extra: dict[str, Any] = {} if forward_paths is None else {"forward_paths": forward_paths}
    ups = [
        {"name": "oa", "base_url": upstream.url, "models": ["*"], "timeout_s": 2.0, "connect_timeout_s": 1.0, **extra},
        {"name": "an", "base_url": upstream.url, "format": "anthropic", "models": ["*"], "timeout_s": 2.0, "connect_timeout_s": 1.0, **extra},
    ]
    cfg = make_config(upstream.url, data_dir, upstreams=ups, optimization={"mode": "general", "seed": 4},
                      caws={"budget_limit": limit, "on_exhausted": "reject"})
    return start_thermostat(cfg)


@pytest.fixture
def spent(upstream: FakeUpstream, tmp_path: Path) -> Iterator[RunningThermostat]:
    """A Thermostat whose 300-token budget the Messages API has just used up."""
    running = _start(upstream, tmp_path, 300, WIDE)
    client = anthropic.Anthropic(base_url=running.base, api_key="sk-ant-client", max_retries=0, timeout=10)
    for _ in range(20):
        try:
            client.messages.create(model="claude-x", messages=USER, max_tokens=100)  # type: ignore[arg-type]
        except anthropic.RateLimitError:
            break
    else:
        pytest.fail("the budget never ran out")
    yield running
    running.stop()


def _anthropic_error(status: int, payload: bytes) -> dict[str, Any]:
    doc = json.loads(payload)
    assert doc["type"] == "error", doc
    return doc["error"]


def test_trailing_slash_is_the_same_budgeted_path(spent: RunningThermostat, upstream: FakeUpstream) -> None:
    before = len(upstream.received)
    body = json.dumps({"model": "claude-x", "max_tokens": 100, "messages": USER}).encode()  # what was just refused
    status, _, payload = raw_request(spent.port, "POST", "/v1/messages/", {"content-type": "application/json"}, body)
    assert status == 429 and _anthropic_error(status, payload)["type"] == "rate_limit_error"
    status, _, payload = raw_request(spent.port, "POST", "/v1/chat/completions/", {"content-type": "application/json"},
                                     json.dumps({"model": "echo-1", "messages": USER, "max_tokens": 100}).encode())
    assert status == 429 and json.loads(payload)["error"]["code"] == "budget_exceeded"
    assert len(upstream.received) == before


def test_batches_are_not_forwarded_while_the_budget_is_on(spent: RunningThermostat, upstream: FakeUpstream) -> None:
    client = anthropic.Anthropic(base_url=spent.base, api_key="sk-ant-client", max_retries=0, timeout=10)
    before = len(upstream.received)
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        client.messages.batches.create(requests=[{"custom_id": "a", "params": {"model": "claude-x", "max_tokens": 50, "messages": USER}}])  # type: ignore[list-item]
    assert "not forwarded while [caws] is enabled" in str(info.value)
    status, _, payload = raw_request(spent.port, "POST", "/v1/images/generations", {"content-type": "application/json"}, b'{"model":"echo-1","prompt":"x"}')
    assert status == 403 and json.loads(payload)["error"]["code"] == "path_not_budgeted"
    assert len(upstream.received) == before
    # Reading and deleting spend nothing: an operator who lists them gets them forwarded.
    status, _, _ = raw_request(spent.port, "GET", "/v1/messages/batches/msgbatch_1/results")
    assert upstream.last().path == "/v1/messages/batches/msgbatch_1/results" and upstream.last().method == "GET"
    status, _, _ = raw_request(spent.port, "DELETE", "/v1/messages/batches/msgbatch_1")
    assert upstream.last().method == "DELETE"


def test_embeddings_are_refused_once_spent(spent: RunningThermostat, upstream: FakeUpstream) -> None:
    client = openai.OpenAI(base_url=spent.url, api_key="sk-client", max_retries=0, timeout=10)
    before = len(upstream.received)
    with pytest.raises(openai.RateLimitError) as info:
        client.embeddings.create(model="echo-1", input="alpha beta " * 200)  # about 500 tokens: more than is left
    assert info.value.code == "budget_exceeded"
    assert len(upstream.received) == before
    assert client.models.list().data  # listing spends nothing: still forwarded


def test_embeddings_count_what_the_answer_reports(upstream: FakeUpstream, tmp_path: Path) -> None:
    running = _start(upstream, tmp_path, 10_000)
    try:
        client = openai.OpenAI(base_url=running.url, api_key="sk-client", max_retries=0, timeout=10)
        for _ in range(3):
            assert client.embeddings.create(model="echo-1", input="alpha beta").usage.total_tokens == 2
        time.sleep(0.1)
        status = running.call(running.runtime.budget.status(time.time()))
        assert (status.used, status.reserved) == (6, 0)  # the fake upstream reports 2 tokens per call
    finally:
        running.stop()


def test_default_paths_refuse_batches_before_the_budget(upstream: FakeUpstream, tmp_path: Path) -> None:
    running = _start(upstream, tmp_path, 10_000)
    try:
        before = len(upstream.received)
        for method, path in [("POST", "/v1/messages/batches"), ("GET", "/v1/messages/batches"), ("DELETE", "/v1/messages/batches/b1")]:
            status, _, payload = raw_request(running.port, method, path, {"content-type": "application/json"}, b"{}" if method == "POST" else b"")
            assert status == 404 and _anthropic_error(status, payload)["type"] == "not_found_error", (method, path)
        assert len(upstream.received) == before
        r = httpx.post(f"{running.base}/v1/messages/count_tokens", json={"model": "claude-x", "messages": USER}, timeout=10)
        assert r.status_code == 200 and upstream.last().path == "/v1/messages/count_tokens"  # free: forwarded
    finally:
        running.stop()
