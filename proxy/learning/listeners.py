"""Completion listeners that learn from the answer itself: its schema check, the judge sample, a regeneration.

Each is built once by the composition root with exactly the collaborators it uses, and
the edge calls them in order after `decider.observe` (docs/architecture.md, "One request").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from guards.budget import BudgetGuard
from policies.pricing import TokenUsage
from policies.quality import learns
from policies.records import Decision, Outcome, Params
from policies.settings import QualitySettings
from policies.validators import SchemaValidators, validated_quality
from proxy.common import ResponseSummary
from proxy.decision import BanditDecider, FeedbackServices, Pricer, RegenerationBook, SignalBook, deliver_signal, regeneration_signal
from proxy.learning.judge import JUDGE_TASK_TYPE, Judge, Spent
from proxy.learning.validation import validate_answer
from proxy.observability import Metrics

log = logging.getLogger("thermostat")


class AnswerValidator:
    """The automatic quality once a `json_schema` response format or the tools' `parameters` are checked."""

    def __init__(self, validators: SchemaValidators, settings: QualitySettings, signals: SignalBook, metrics: Metrics, scorer: BanditDecider) -> None:
        self.validators = validators  # compiled schemas cached by hash
        self.settings = settings
        self.signals = signals
        self.metrics = metrics
        self.scorer = scorer

    async def validated(self, decision: Decision, outcome: Outcome, summary: ResponseSummary, body: Any) -> Outcome:
        """A violation caps the automatic score (`[policy.quality] schema_invalid_score`) and the
        reward follows; the reason (schema paths and error kinds, never the answer's text) is
        logged, counted per task type and stored in the decision log. Nothing asked, nothing done.
        """
        if not isinstance(body, dict) or outcome.quality is None or outcome.feedback:
            return outcome
        response_format, tools = body.get("response_format"), body.get("tools")
        if response_format is None and not tools:
            return outcome
        violation = await validate_answer(self.validators, summary.content, response_format, summary.tool_calls if tools else (), tools)
        task = self.metrics.task_label(decision.context.task_type)
        self.signals.validated(task, violation is not None)
        if violation is None:
            return outcome
        self.metrics.child(self.metrics.validation_failures, task).inc()
        log.info("answer %s breaks its schema: %s", decision.request_id, violation.reason)
        quality = validated_quality(outcome.quality, violation, self.settings)
        reward = outcome.reward if quality == outcome.quality else self.scorer.reward_for(decision, outcome, quality)
        return msgspec.structs.replace(outcome, quality=quality, reward=reward, validator_reason=violation.reason)


class AnswerListener:
    """Last completion listener for chat requests: queue the judge sample, look for a regeneration.

    Never waits: the judge only samples and enqueues; the regeneration lookup (a Redis
    round trip with several replicas) runs as a background task, and its signal re-enters
    through the decision room (`deliver_signal`).
    """

    def __init__(
        self, judge: Judge | None, regeneration: RegenerationBook, *, salt: bytes, regenerated_quality: float,
        feedback: FeedbackServices, metrics: Metrics,
    ) -> None:
        self.judge = judge
        self.regeneration = regeneration
        self.salt = salt
        self.regenerated_quality = regenerated_quality
        self.feedback = feedback
        self.metrics = metrics
        self.background: set[asyncio.Task[None]] = set()

    def on_answer(self, decision: Decision, outcome: Outcome, answer: str, body: Any, key: str) -> None:
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            return
        if self.judge is not None:
            self.judge.on_complete(decision, outcome, answer, messages, body)
        # Without a client key, identical messages from different clients would look like retries.
        if key and learns(outcome.status, outcome.error_class):
            task = asyncio.get_running_loop().create_task(self._regenerated(messages, key, decision))
            self.background.add(task)
            task.add_done_callback(self.background.discard)

    async def _regenerated(self, messages: list[Any], key: str, decision: Decision) -> None:
        try:
            signal = await regeneration_signal(
                self.regeneration, messages, key, decision.request_id, decision.context.task_type,
                self.regenerated_quality, salt=self.salt,
            )
            if signal is not None:
                self.metrics.child(self.metrics.regenerations, self.metrics.task_label(decision.context.task_type)).inc()
                await deliver_signal(self.feedback, signal)
        except Exception:
            log.exception("regeneration check for %s failed", decision.request_id)

    def stop(self) -> None:
        for task in list(self.background):
            task.cancel()


class KnobPatch(Protocol):
    def __call__(self, doc: dict[str, Any], knobs: Params) -> bool:
        """Write the knobs into a chat body under the chat format's field names; True if anything changed."""
        ...


class BaselineRequest:
    """The chat body the baseline would have sent for a decision (the pairwise judge's second answer)."""

    def __init__(self, decider: BanditDecider, patch: KnobPatch) -> None:
        self.decider = decider
        self.patch = patch  # the chat format's own patching (the edge's `CHAT.patch`, handed in by the runtime)

    def __call__(self, decision: Decision, body: Any) -> dict[str, Any] | None:
        """Not streamed, one choice. `body` went out with the tuned knobs patched in; the baseline's
        are the client's own values and `[baseline.<task>]` stand-ins (`decider.reference_for`; what
        it sends does not depend on the evidence so far), and a temperature the client omitted is
        omitted again."""
        if not isinstance(body, dict) or decision.context.endpoint != "chat":
            return None
        ref, _, _ = self.decider.reference_for(decision.context)
        out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "n")}
        if decision.sent.model is not None:
            out["model"] = decision.context.model  # the baseline is the requested model, never a stand-in
        if ref.sent.temperature is None:
            out.pop("temperature", None)
        self.patch(out, ref.sent)
        return out


class JudgeCharge:
    """The judge's own calls: priced (the judge model's, or for a pairwise baseline call the request's
    model's), counted in `thermostat_cost_usd_total{task_type="_judge", traffic="judge"}`, and charged
    to the CAWS budget under task type `_judge` in the budget's unit (tokens, or micro-dollars)."""

    def __init__(self, budget: BudgetGuard, prices: Pricer | None = None, metrics: Metrics | None = None,
                 route: Callable[[str], str | None] | None = None) -> None:
        self.budget = budget
        self.prices = prices
        self.metrics = metrics
        self.route = route  # judge model -> the name of the upstream that serves it
        self.cost_usd = 0.0  # what this process's judge calls cost (priced ones)
        self.calls = 0
        self.unpriced = 0

    async def __call__(self, task_type: str, spent: Spent) -> None:
        upstream = spent.upstream or (self.route(spent.model) if self.route is not None else None)
        usage = TokenUsage(input_tokens=spent.prompt_tokens, output_tokens=spent.completion_tokens)
        cost = self.prices.cost(upstream, spent.model, usage) if self.prices is not None and upstream else None
        self.calls += 1
        if cost is not None:
            self.cost_usd += cost
        else:
            self.unpriced += 1
        m = self.metrics
        if m is not None:
            if cost is not None:
                m.child(m.cost_usd, JUDGE_TASK_TYPE, "judge").inc(cost)
            else:
                m.child(m.unknown_price, upstream or "", m.model_label(spent.model)).inc()
        units = self.budget.spent(spent.prompt_tokens, spent.completion_tokens, cost)
        if units is None:
            log.warning("the judge's call to %r has no price: the dollar budget cannot count it", spent.model[:120])
            return
        if not await self.budget.charge(task_type, units, time.time()):
            log.warning("judge usage (%d %s) could not be counted against the budget", units, self.budget.settings.unit)
