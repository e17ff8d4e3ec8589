"""The metrics' fast handles (`Metrics.counter`, `Metrics.histogram`) count exactly what prometheus_client's public API counts.

They add to the children's value holders directly (proxy/observability/metrics.py); if a
prometheus_client release changes that layout, this test says so before the numbers drift.
"""

from __future__ import annotations

import math

import pytest
from prometheus_client import generate_latest

from policies.records import Decision, Outcome, Params, RequestContext
from proxy.common import ResponseSummary
from proxy.decision import arm_label
from proxy.edge import Finished, RecordMetrics
from proxy.observability import Metrics
from proxy.observability.metrics import LATENCY_BUCKETS, _FastHistogram, cost_traffic, guard_interventions

AMOUNTS = (0.0, -0.0, 0.004, 0.005, 0.0051, 0.01, 1.0, 2.5, 119.9, 120.0, 121.0, math.inf, math.nan, -3.0, 7)


def _exposition(m: Metrics) -> list[str]:
    """The exposition without the `_created` timestamps (which differ between two registries)."""
    return [line for line in generate_latest(m.registry).decode().splitlines() if "_created" not in line]


def test_fast_handles_expose_what_the_public_api_does() -> None:
    fast, public = Metrics(), Metrics()
    assert isinstance(fast.histogram(fast.request_duration, "chat", "optimized"), _FastHistogram)
    for amount in AMOUNTS:
        fast.histogram(fast.request_duration, "chat", "optimized").observe(amount)
        public.request_duration.labels("chat", "optimized").observe(amount)
        fast.overhead_handle.observe(amount)
        public.overhead.observe(amount)
        if amount >= 0 or math.isnan(amount):
            fast.counter(fast.tokens, "chat", "prompt").inc(amount)
            public.tokens.labels("chat", "prompt").inc(amount)
    fast.counter(fast.decisions, "chat", "optimized", "client").inc(1)
    public.decisions.labels("chat", "optimized", "client").inc(1)
    assert _exposition(fast) == _exposition(public)
    assert LATENCY_BUCKETS[-1] == 120.0  # the boundaries above sit on these buckets


def _reference_record(m: Metrics, done: Finished) -> None:
    """RecordMetrics and observe_decision as they were before the fast handles (884bf5f), through the public API."""
    decision, outcome = done.decision, done.outcome
    arm = arm_label(decision)
    task = m.task_label(decision.context.task_type)
    traffic = cost_traffic(decision.mode)
    upstream, model = decision.served_by
    m.child(m.served_model, task, m.model_label(model), traffic).inc()
    if outcome.cost_usd is not None:
        m.child(m.cost_usd, task, traffic).inc(outcome.cost_usd)
    elif outcome.prompt_tokens is not None or outcome.completion_tokens is not None:
        m.child(m.unknown_price, upstream, m.model_label(model)).inc()
    m.child(m.decisions, task, decision.mode, arm).inc()
    for guard, reason in guard_interventions(decision.mode, decision.guard_notes):
        m.child(m.guard_interventions, guard, m.guard_reason_label(reason)).inc()
    if outcome.reward is not None and math.isfinite(outcome.reward):
        m.child(m.reward, task, decision.mode).observe(outcome.reward)
    if outcome.quality is not None and math.isfinite(outcome.quality):
        m.child(m.quality, task, decision.mode).observe(outcome.quality)
    task = m.task_label(decision.context.task_type)
    status_label = str(done.status) if done.status else "error"
    m.child(m.requests, m.model_label(decision.context.model), task, decision.mode, arm, status_label).inc()
    m.child(m.request_duration, task, decision.mode).observe(done.latency)
    if done.ttft is not None:
        m.child(m.ttft, task, decision.mode).observe(done.ttft)
    m.overhead.observe(done.overhead)
    summary = done.summary
    if summary.prompt_tokens is not None:
        m.child(m.tokens, task, "prompt").inc(summary.prompt_tokens)
    if summary.completion_tokens is not None:
        m.child(m.tokens, task, "completion").inc(summary.completion_tokens)


def _finished(i: int) -> Finished:
    modes = ("optimized", "holdout", "rollback", "off", "guard_fallback", "shadow")
    notes = ((), ("budget:chosen",), ("budget:cheaper_fit", "waiver:WV-0001"), ("weird:thing",), ("budget_refused:waiver_required",))
    ctx = RequestContext(task_type=f"task{i % 7}", model=f"model{i % 3}", endpoint="chat", prompt_tokens_est=10 * i, message_count=1,
                         has_tools=False, json_mode=False, stream=bool(i % 2), client_temperature=None, client_max_tokens=None, upstream="up")
    sent = Params(temperature=0.1 * (i % 4), max_tokens=100 + i % 3) if i % 5 else Params()
    decision = Decision(request_id=f"r{i}", context=ctx, context_fingerprint=0, sent=sent, baseline=Params(temperature=0.7, max_tokens=100),
                        propensity=1.0, policy="thompson_gaussian", policy_version="v", mode=modes[i % len(modes)], created_at=0.0,
                        guard_notes=notes[i % len(notes)])
    summary = ResponseSummary()
    if i % 4:
        summary.prompt_tokens, summary.completion_tokens = 10 + i, (i * 7) % 50
    status = (200, 200, 0, 429, 200, 500)[i % 6]
    outcome = Outcome(request_id=f"r{i}", status=status, latency_s=0.01 * i, ttft_s=0.005 * i if i % 2 else None,
                      prompt_tokens=summary.prompt_tokens, completion_tokens=summary.completion_tokens,
                      quality=(None, 1.0, 0.6, math.nan)[i % 4], reward=(0.5, None, -0.25, math.inf, 1.0)[i % 5],
                      cost_usd=(None, 0.001 * i)[i % 2] if summary.prompt_tokens is not None else None)
    return Finished(decision, outcome, summary, status, 0.01 * i, outcome.ttft_s, 0.0001 * i, ctx, None, None, "", None)


def test_record_metrics_counts_what_the_public_api_counted() -> None:
    fast, reference = Metrics(), Metrics()
    record = RecordMetrics(fast)
    for i in range(300):
        done = _finished(i)
        record(done)
        _reference_record(reference, done)
    assert _exposition(fast) == _exposition(reference)


def test_a_negative_token_count_raises_as_before() -> None:
    done = _finished(1)
    done.summary.prompt_tokens = -1
    with pytest.raises(ValueError, match="non-negative"):
        RecordMetrics(Metrics())(done)
