"""The bandit path end to end: trust region, shadow, SLO fallback, budget, through the real app."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

MESSAGES = [{"role": "user", "content": "sort this list please"}]


def _post(t: RunningThermostat, **body: object) -> httpx.Response:
    payload = {"model": "echo-1", "messages": MESSAGES, **body}
    return httpx.post(f"{t.url}/chat/completions", json=payload, headers={"x-task-type": "code"}, timeout=10)


@pytest.fixture()
def general(upstream: FakeUpstream, tmp_path) -> RunningThermostat:
    # No holdout, temperature free: these tests look at what optimised traffic may send.
    opt = {"mode": "general", "policy": "thompson_gaussian", "seed": 1, "holdout_fraction": 0.0, "tune_temperature": "always"}
    cfg = make_config(upstream.url, tmp_path, optimization=opt)
    running = start_thermostat(cfg)
    yield running
    running.stop()


def test_general_mode_rewrites_within_trust_region(general: RunningThermostat, upstream: FakeUpstream) -> None:
    seen = set()
    for _ in range(40):
        r = _post(general, temperature=0.7, max_tokens=600)
        assert r.status_code == 200
        assert r.headers["x-thermostat-mode"] == "optimized"
        sent = upstream.last().body
        assert abs(sent["temperature"] - 0.7) <= 0.2 + 1e-9
        assert abs(sent["max_tokens"] - 600) <= 500
        assert isinstance(sent["max_tokens"], int)
        assert sent["temperature"] == round(sent["temperature"], 3)
        header = r.headers["x-thermostat-params"]
        assert header == f"temperature={sent['temperature']:g}; max_tokens={sent['max_tokens']}"
        seen.add((sent["temperature"], sent["max_tokens"]))
    assert len(seen) > 1  # it explores


def test_missing_values_stay_missing_without_stand_ins(general: RunningThermostat, upstream: FakeUpstream) -> None:
    r = _post(general)
    sent = upstream.last().body
    # No [baseline] stand-in and no declared provider default: nothing is added, even with temperature free.
    assert "temperature" not in sent and "max_tokens" not in sent
    assert r.headers["x-thermostat-mode"] == "optimized" and r.headers["x-thermostat-params"] == ""


def test_max_completion_tokens_field_kept(general: RunningThermostat, upstream: FakeUpstream) -> None:
    _post(general, max_completion_tokens=300)
    sent = upstream.last().body
    assert "max_tokens" not in sent and 150 <= sent["max_completion_tokens"] <= 300  # the client's cap, -50 % at most


def test_decision_logged_with_propensity(general: RunningThermostat) -> None:
    r = _post(general, temperature=0.5, max_tokens=400)
    rid = r.headers["x-request-id"]
    general.flush()
    rows = general.call(general.runtime.sink.query("SELECT * FROM logged_decisions WHERE request_id = ?", [rid]))
    assert len(rows) == 1
    row = rows[0]
    assert row["mode"] == "optimized" and row["policy"] == "thompson_gaussian"
    assert row["log_propensity"] <= 0.0 and row["quality"] is not None and row["reward"] is not None
    assert row["task_type"] == "code"


def test_shadow_sends_client_params_but_logs_policy_choice(upstream: FakeUpstream, tmp_path) -> None:
    cfg = make_config(upstream.url, tmp_path, optimization={"mode": "shadow", "seed": 3, "holdout_fraction": 0.0})
    running = start_thermostat(cfg)
    try:
        ids = []
        for _ in range(20):
            r = _post(running, temperature=0.9, max_tokens=200)
            assert r.headers["x-thermostat-mode"] == "shadow"
            assert upstream.last().body["temperature"] == 0.9 and upstream.last().body["max_tokens"] == 200
            ids.append(r.headers["x-request-id"])
        r = _post(running)  # client sent nothing: nothing is added in shadow
        assert "temperature" not in upstream.last().body and "max_tokens" not in upstream.last().body
        running.flush()
        rows = running.call(running.runtime.sink.query("SELECT chosen_params, policy_params, log_propensity, policy_log_propensity FROM logged_decisions WHERE mode='shadow'"))
        assert len(rows) >= 20
        assert all(row["log_propensity"] == 0.0 for row in rows)  # baseline sent deterministically
        assert any(row["policy_params"] != row["chosen_params"] for row in rows)  # the policy's own choice is kept
    finally:
        running.stop()


def test_slow_upstream_breaches_slo_and_next_requests_get_baseline(upstream: FakeUpstream, tmp_path) -> None:
    cfg = make_config(
        upstream.url, tmp_path,
        optimization={"mode": "general", "seed": 5},
        slo={"latency_p99_ms": 50, "min_samples": 5, "check_interval_s": 0, "cooldown_s": 600},
    )
    running = start_thermostat(cfg)
    try:
        client = openai.OpenAI(base_url=running.url, api_key="k", max_retries=0)
        for _ in range(6):
            raw = client.chat.completions.with_raw_response.create(model="slow-120", messages=MESSAGES, temperature=0.7, max_tokens=100)
            assert raw.http_response.status_code == 200
        time.sleep(0.1)
        r = _post(running, temperature=0.7, max_tokens=100)
        assert r.headers["x-thermostat-mode"] == "rollback"
        assert upstream.last().body["temperature"] == 0.7 and upstream.last().body["max_tokens"] == 100
        rb = running.runtime.rollout.state.rollback
        assert rb.active and rb.trigger == "slo" and "latency_p99_ms" in rb.reason
        assert any(e.kind == "rollback" for e in running.runtime.events)
    finally:
        running.stop()


@pytest.mark.parametrize(("unit", "limit"), [("tokens", 200), ("usd", 0.0014)])
def test_budget_exhaustion_rejects_with_429(upstream: FakeUpstream, tmp_path, unit: str, limit: float) -> None:
    """The same cap in dollars (docs/cost.md): at $2 / $8 per million input / output tokens a request reserves about 1,240
    micro-dollars (its prompt estimate and 150 tokens of cap) and uses about 80, so $0.0014 admits a few, as 200 tokens do."""
    ups = [{"name": "fake", "base_url": upstream.url, "models": ["*"], "timeout_s": 2.0, "connect_timeout_s": 1.0,
            "models_config": [{"pattern": "echo-1", "input_price_per_mtok": 2.0, "output_price_per_mtok": 8.0}]}]
    cfg = make_config(upstream.url, tmp_path, upstreams=ups, optimization={"mode": "general"},
                      caws={"unit": unit, "budget_limit": limit, "on_exhausted": "reject"})
    running = start_thermostat(cfg)
    try:
        client = openai.OpenAI(base_url=running.url, api_key="k", max_retries=0)
        statuses, spent = [], 0.0
        for _ in range(10):
            try:
                c = client.chat.completions.create(model="echo-1", messages=MESSAGES, max_tokens=150, temperature=0.5)
                assert c.usage is not None
                spent += c.usage.total_tokens if unit == "tokens" else (c.usage.prompt_tokens * 2.0 + c.usage.completion_tokens * 8.0) / 1e6
                statuses.append(200)
            except openai.RateLimitError as exc:
                assert exc.code == "budget_exceeded"
                statuses.append(429)
        assert statuses[0] == 200 and statuses[-1] == 429
        assert spent <= limit  # what was served, at the upstream's own count and the configured price
        status = running.call(running.runtime.budget.status(time.time()))
        units = limit if unit == "tokens" else round(limit * 1e6)
        assert status.used + status.reserved <= units  # never settled above the limit
    finally:
        running.stop()


def test_budget_exhaustion_falls_back_to_client_params(upstream: FakeUpstream, tmp_path) -> None:
    cfg = make_config(upstream.url, tmp_path, optimization={"mode": "general", "seed": 2}, caws={"budget_limit": 300})
    running = start_thermostat(cfg)
    try:
        for _ in range(6):
            r = _post(running, temperature=0.5, max_tokens=200)
            assert r.status_code == 200
        # the budget is gone: the client's own parameters flow, never more
        sent = upstream.last().body
        assert sent["max_tokens"] <= 200
        assert any(n.startswith("budget:") for n in running.runtime.registry.get(r.headers["x-request-id"], time.time())[0].guard_notes)
    finally:
        running.stop()


def test_disabled_sends_client_params(upstream: FakeUpstream, tmp_path) -> None:
    cfg = make_config(upstream.url, tmp_path, optimization={"mode": "general", "enabled": False})
    running = start_thermostat(cfg)
    try:
        r = _post(running, temperature=0.3)
        assert r.headers["x-thermostat-mode"] == "off"
        assert upstream.last().body["temperature"] == 0.3 and "max_tokens" not in upstream.last().body
    finally:
        running.stop()


def test_fixed_temperature_model_never_gets_another_temperature(upstream: FakeUpstream, tmp_path) -> None:
    cfg = make_config(upstream.url, tmp_path, optimization={"mode": "general", "seed": 9})
    doc_up = {"name": "fake", "base_url": upstream.url, "models": ["*"], "models_config": [{"pattern": "o1*", "fixed_temperature": 1.0, "max_tokens_limit": 900}]}
    from proxy.config import build_config

    cfg = build_config({"server": {"data_dir": str(tmp_path)}, "upstreams": [doc_up], "optimization": {"mode": "general", "seed": 9},
                        "admin": {"allow_unauthenticated": True}}, environ={})
    running = start_thermostat(cfg)
    try:
        for _ in range(15):
            httpx.post(f"{running.url}/chat/completions", json={"model": "o1-mini", "messages": MESSAGES, "max_tokens": 800})
            sent = upstream.last().body
            assert "temperature" not in sent
            assert sent["max_tokens"] <= 900
    finally:
        running.stop()
