"""What happens once a decided request is finished: one record (`Finished`) and the listeners that read it.

In the spirit of httpx's `event_hooks`, the listeners are a plain ordered list, and the
edge calls them one after another (`ProxyEdge._finish`). The list is assembled once, by the
composition root (`proxy.runtime.outcome_listeners`), so the order is declared in one place
and pinned by a test (`tests/edge/test_pipeline.py`, which also reads docs/architecture.md).
Each listener has a `name` (what the test and the docs call it) and is called with the
`Finished` record; an async listener returns an awaitable, which the edge awaits before the next.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from policies.context import context_features
from policies.records import Decision, Outcome, RequestContext
from proxy.common import ResponseSummary
from proxy.decision import arm_label
from proxy.observability import NEGATIVE_INC, Metrics, NullTracer, Tracer, decision_series
from proxy.observability import Timings as TraceTimings
from proxy.store import LogEntry, Recorder


class Finished(msgspec.Struct, frozen=True):
    """One decided request after its answer was relayed (or failed): everything a listener reads."""

    decision: Decision
    outcome: Outcome  # built by `proxy.decision.complete`, after the answer check
    summary: ResponseSummary
    status: int  # the upstream's status, 0 when it never answered
    latency: float  # seconds from the request's arrival to the end of the relay
    ttft: float | None
    overhead: float  # seconds Thermostat itself spent (x-thermostat-overhead-ms)
    context: RequestContext
    prompt: str | None  # the request body as text, when `[server] store_prompts`
    body: Any  # the parsed request (what the judge and the regeneration check read)
    key: str  # the client's assignment key, "" if it sent none
    traceparent: str | None


class Listener(Protocol):
    """One step after a request is finished; `name` is how the docs and the order test call it."""

    @property
    def name(self) -> str: ...

    def __call__(self, done: Finished) -> Awaitable[None] | None: ...


@dataclass(frozen=True, slots=True)
class OnOutcome:
    """A listener that reads only the decision and its outcome (`decider.observe`, `registry.complete`, ...)."""

    name: str
    call: Callable[[Decision, Outcome], Awaitable[None] | None]

    def __call__(self, done: Finished) -> Awaitable[None] | None:
        return self.call(done.decision, done.outcome)


@dataclass(frozen=True, slots=True)
class RecordMetrics:
    """The request's Prometheus series: decision and guard counters, requests, durations, tokens."""

    metrics: Metrics
    name: str = "metrics"

    def __call__(self, done: Finished) -> None:
        m, decision = self.metrics, done.decision
        arm = arm_label(decision)
        task = decision_series(m, decision, done.outcome, arm)  # `observe_decision`, and the task's label
        mode = decision.mode
        status_label = str(done.status) if done.status else "error"
        m.counter(m.requests, m.model_label(decision.context.model), task, mode, arm, status_label).inc(1)
        m.histogram(m.request_duration, task, mode).observe(done.latency)
        if done.ttft is not None:
            m.histogram(m.ttft, task, mode).observe(done.ttft)
        m.overhead_handle.observe(done.overhead)
        summary = done.summary
        prompt_tokens, completion_tokens = summary.prompt_tokens, summary.completion_tokens
        if prompt_tokens is not None:
            if prompt_tokens < 0:
                raise ValueError(NEGATIVE_INC)
            m.counter(m.tokens, task, "prompt").inc(prompt_tokens)
        if completion_tokens is not None:
            if completion_tokens < 0:
                raise ValueError(NEGATIVE_INC)
            m.counter(m.tokens, task, "completion").inc(completion_tokens)


@dataclass(frozen=True, slots=True)
class LogOutcome:
    """The decision log's row, queued for the recorder's writer (the journal already holds the decision)."""

    recorder: Recorder
    name: str = "recorder.submit"

    def __call__(self, done: Finished) -> None:
        self.recorder.submit(LogEntry(decision=done.decision, outcome=done.outcome, context_features=context_features(done.context),
                                      prompt=done.prompt))


class AnswerListener(Protocol):
    def on_answer(self, decision: Decision, outcome: Outcome, answer: str, body: Any, key: str) -> None:
        """Judge sample and regeneration check: never waits."""
        ...


@dataclass(frozen=True, slots=True)
class HandOverAnswer:
    """The answer's text to the judge sampler and the regeneration check (proxy.learning.AnswerListener)."""

    answers: AnswerListener
    name: str = "answers.on_answer"

    def __call__(self, done: Finished) -> None:
        self.answers.on_answer(done.decision, done.outcome, done.summary.content, done.body, done.key)


@dataclass(frozen=True, slots=True)
class RecordSpan:
    """The request's OpenTelemetry span, when `[telemetry]` is on."""

    tracer: Tracer | NullTracer
    capture_prompts: bool
    name: str = "span"

    def __call__(self, done: Finished) -> None:
        if self.tracer.enabled:
            end_ns = time.time_ns()
            self.tracer.record(done.decision, done.outcome, TraceTimings(end_ns - int(done.latency * 1e9), end_ns, done.overhead),
                               done.traceparent, prompt=done.prompt if self.capture_prompts else None)
