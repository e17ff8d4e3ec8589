"""Every request's cost in dollars, end to end: the real app on loopback in front of the fake upstream,
driven by the official SDKs. The logged `cost_usd` (shown by GET /api/optimization/logs) equals the
upstream's reported usage at the configured price, worked out by hand here, and at the table's price for
a public model (genai-prices' own `calc_price`); `thermostat_cost_usd_total` sums to the same; a model
without a price is null and counted, never guessed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from genai_prices import Usage, calc_price
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

# US dollars per million tokens
IN, OUT, CACHED = 2.0, 8.0, 0.5
A_IN, A_OUT, A_READ = 3.0, 15.0, 0.3  # Anthropic-format upstream; cache writes billed as input (no price given)
PRICES = {"input_price_per_mtok": IN, "output_price_per_mtok": OUT, "cached_input_price_per_mtok": CACHED}
USER = [{"role": "user", "content": "what does this cost"}]


@pytest.fixture(scope="module")
def priced(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    ups = [
        {"name": "oa", "base_url": upstream.url, "models": ["*"], "timeout_s": 2.0, "connect_timeout_s": 1.0,
         "models_config": [{"pattern": "echo-1", **PRICES}, {"pattern": "cached-*", **PRICES}]},
        # the fake answering as OpenAI would, priced from the table's OpenAI entry
        {"name": "public", "base_url": upstream.url, "models": ["gpt-4o-mini"], "price_provider": "openai", "timeout_s": 2.0,
         "connect_timeout_s": 1.0},
        {"name": "an", "base_url": upstream.url, "format": "anthropic", "models": ["claude-*", "cached-claude"], "timeout_s": 2.0,
         "connect_timeout_s": 1.0, "models_config": [{"pattern": "*", "input_price_per_mtok": A_IN, "output_price_per_mtok": A_OUT,
                                                      "cached_input_price_per_mtok": A_READ}]},
    ]
    cfg = make_config(upstream.url, tmp_path_factory.mktemp("cost"), upstreams=ups,
                      optimization={"mode": "general", "seed": 5, "holdout_fraction": 0.5})
    running = start_thermostat(cfg)
    yield running
    running.stop()


def _chat_cost(usage: Any) -> float:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return ((usage.prompt_tokens - cached) * IN + cached * CACHED + usage.completion_tokens * OUT) / 1e6


def _logged(t: RunningThermostat) -> dict[str, dict[str, Any]]:
    t.flush()
    page = httpx.get(f"{t.base}/api/optimization/logs", params={"limit": 500}, timeout=10).json()
    return {item["request_id"]: item for item in page["items"]}


def _metric(t: RunningThermostat, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = httpx.get(f"{t.base}/metrics", timeout=10).text
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_logged_cost_is_usage_at_the_configured_price(priced: RunningThermostat) -> None:
    client = openai.OpenAI(base_url=priced.url, api_key="k", max_retries=0)
    expected: dict[str, float] = {}
    for i in range(6):
        raw = client.chat.completions.with_raw_response.create(model="cached-a", messages=USER, max_tokens=50,
                                                               extra_headers={"x-task-type": "qa", "x-thermostat-key": f"user-{i}"})
        completion = raw.parse()
        assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
        assert completion.usage.prompt_tokens_details.cached_tokens > 0
        expected[raw.headers["x-request-id"]] = _chat_cost(completion.usage)
    # a stream: usage arrives in the extra chunk Thermostat asked for (and strips); the price is the same
    with client.chat.completions.with_streaming_response.create(model="echo-1", messages=USER, stream=True,
                                                                extra_headers={"x-task-type": "qa"}) as resp:
        rid = resp.headers["x-request-id"]
        chunks = list(resp.parse())
    assert all(c.usage is None for c in chunks)
    # the fake's own count for this body (tests/support/fake_upstream.py): the same words, non-streamed
    plain = client.chat.completions.create(model="echo-1", messages=USER, extra_headers={"x-task-type": "other"})
    assert plain.usage is not None
    expected[rid] = (plain.usage.prompt_tokens * IN + plain.usage.completion_tokens * OUT) / 1e6
    # Responses: input_tokens_details.cached_tokens
    raw_r = client.responses.with_raw_response.create(model="cached-r", input="price me", max_output_tokens=40,
                                                      extra_headers={"x-task-type": "qa"})
    response = raw_r.parse()
    assert response.usage is not None
    cached = response.usage.input_tokens_details.cached_tokens
    assert cached > 0 and response.usage.output_tokens_details.reasoning_tokens >= 0
    expected[raw_r.headers["x-request-id"]] = ((response.usage.input_tokens - cached) * IN + cached * CACHED + response.usage.output_tokens * OUT) / 1e6

    rows = _logged(priced)
    for rid, cost in expected.items():
        assert rows[rid]["cost_usd"] == pytest.approx(cost, rel=1e-12), rid


def test_anthropic_cache_reads_and_writes(priced: RunningThermostat) -> None:
    client = anthropic.Anthropic(base_url=priced.base, api_key="k", max_retries=0)
    raw = client.messages.with_raw_response.create(model="cached-claude", max_tokens=64, messages=USER,
                                                   extra_headers={"x-task-type": "qa"})
    message = raw.parse()
    u = message.usage
    assert u.cache_read_input_tokens and u.cache_creation_input_tokens == 7
    # Anthropic's input_tokens leaves the cache out: plain input + reads at their price + writes at the input price
    by_hand = (u.input_tokens * A_IN + u.cache_read_input_tokens * A_READ + u.cache_creation_input_tokens * A_IN + u.output_tokens * A_OUT) / 1e6
    with client.messages.with_streaming_response.create(model="cached-claude", max_tokens=64, messages=USER, stream=True,
                                                        extra_headers={"x-task-type": "qa"}) as resp:
        sid = resp.headers["x-request-id"]
        list(resp.iter_lines())
    rows = _logged(priced)
    assert rows[raw.headers["x-request-id"]]["cost_usd"] == pytest.approx(by_hand, rel=1e-12)
    assert rows[sid]["cost_usd"] == pytest.approx(by_hand, rel=1e-12)  # the stream's usage is the same message's


def test_public_model_at_the_tables_own_price(priced: RunningThermostat) -> None:
    client = openai.OpenAI(base_url=priced.url, api_key="k", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER, extra_headers={"x-task-type": "qa"})
    usage = raw.parse().usage
    assert usage is not None
    theirs = calc_price(Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens), "gpt-4o-mini", provider_id="openai")
    assert _logged(priced)[raw.headers["x-request-id"]]["cost_usd"] == pytest.approx(float(theirs.total_price), rel=1e-12)


def test_unknown_price_is_null_and_counted(priced: RunningThermostat) -> None:
    before = sum(_metric(priced, "thermostat_unknown_price_requests_total").values())
    client = openai.OpenAI(base_url=priced.url, api_key="k", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="nobody-prices-me", messages=USER, extra_headers={"x-task-type": "qa"})
    assert raw.parse().usage is not None
    row = _logged(priced)[raw.headers["x-request-id"]]
    assert row["cost_usd"] is None and row["prompt_tokens"] is not None
    counts = _metric(priced, "thermostat_unknown_price_requests_total")
    assert sum(counts.values()) == before + 1
    assert counts[(("model", "nobody-prices-me"), ("upstream", "oa"))] >= 1


def test_cost_counter_sums_to_the_logged_costs(priced: RunningThermostat) -> None:
    client = openai.OpenAI(base_url=priced.url, api_key="k", max_retries=0)
    for i in range(20):
        client.chat.completions.create(model="echo-1", messages=USER, max_tokens=30,
                                       extra_headers={"x-task-type": "sum", "x-thermostat-key": f"k{i}"})
    rows = [r for r in _logged(priced).values() if r["task_type"] == "sum"]
    assert len(rows) == 20 and all(r["cost_usd"] is not None for r in rows)
    counted = _metric(priced, "thermostat_cost_usd_total")
    by_traffic: dict[str, float] = {}
    for r in rows:
        traffic = "optimized" if r["mode"] in ("optimized", "guard_fallback") else "holdout" if r["mode"] == "holdout" else "baseline"
        by_traffic[traffic] = by_traffic.get(traffic, 0.0) + r["cost_usd"]
    assert set(by_traffic) <= {"optimized", "holdout"} and len(by_traffic) == 2  # both arms of the comparison are there
    for traffic, total in by_traffic.items():
        assert counted[(("task_type", "sum"), ("traffic", traffic))] == pytest.approx(total, rel=1e-9)


def test_the_judges_calls_are_priced_counted_and_charged_in_dollars(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The judge model on the fake upstream (its replies do not parse, and still cost): every call is priced at the
    judge model's configured price, summed in thermostat_cost_usd_total{_judge, judge} and in /performance, and
    charged to a dollar budget under task type `_judge` in micro-dollars."""
    import json
    import math

    ups = [{"name": "oa", "base_url": upstream.url, "models": ["*"], "timeout_s": 2.0, "connect_timeout_s": 1.0,
            "models_config": [{"pattern": "echo-1", **PRICES}, {"pattern": "judge-1", "input_price_per_mtok": 0.5, "output_price_per_mtok": 1.5}]}]
    cfg = make_config(upstream.url, tmp_path_factory.mktemp("judge-cost"), upstreams=ups, optimization={"enabled": False},
                      judge={"enabled": True, "model": "judge-1", "sample_rate": 1.0, "breaker_failures": 1000},
                      caws={"unit": "usd", "budget_limit": 100.0, "per_task_limits": {"_judge": 10.0}})
    t = start_thermostat(cfg)
    try:
        client = openai.OpenAI(base_url=t.url, api_key="k", max_retries=0)
        for i in range(5):
            client.chat.completions.create(model="echo-1", messages=[{"role": "user", "content": f"judge me {i}"}], extra_headers={"x-task-type": "qa"})
        t.flush()
        assert t.runtime.judge is not None
        t.call(t.runtime.judge.drain(), timeout=30)
        calls = [r.body for r in upstream.received if isinstance(r.body, dict) and r.body.get("model") == "judge-1"][-5:]
        assert len(calls) == 5
        costs = []
        for body in calls:  # the fake's own count (tests/support/fake_upstream.py): prompt chars / 4 + 1, answer words up to max_tokens
            prompt = len(json.dumps(body["messages"])) // 4 + 1
            completion = min(len(FakeUpstream._text(body).split()), body["max_tokens"])
            costs.append((prompt * 0.5 + completion * 1.5) / 1e6)
        counted = _metric(t, "thermostat_cost_usd_total")[(("task_type", "_judge"), ("traffic", "judge"))]
        assert counted == pytest.approx(sum(costs), rel=1e-9)
        judge = httpx.get(f"{t.base}/api/optimization/performance", timeout=10).json()["judge"]
        assert judge["calls"] == 5 and judge["unpriced_calls"] == 0 and judge["cost_usd"] == pytest.approx(sum(costs), rel=1e-9)
        line = t.call(t.runtime.budget.status(time.time())).tasks["_judge"]
        assert line.limit == 10_000_000 and line.used == sum(math.ceil(c * 1e6 - 1e-6) for c in costs)  # micro-dollars, each rounded up
    finally:
        t.stop()
