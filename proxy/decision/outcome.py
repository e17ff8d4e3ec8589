"""One finished request becomes one Outcome, built in one place.

Before, the edge built an Outcome, the runtime filled in its quality and the decider
its reward, each by mutating the same object. Here `complete` computes quality and
reward once and returns the finished record; the listeners that follow (decider
learning, registry, pending feedback, metrics, decision log) only read it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Protocol

from policies.effort import EFFORT_LEVELS, steps
from policies.pricing import TokenUsage
from policies.quality import auto_quality, client_error
from policies.records import Decision, Outcome, Params
from policies.settings import QualitySettings


class Summary(Protocol):
    """What `complete` reads from a response (proxy.common.ResponseSummary has it)."""

    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None

    @property
    def content(self) -> str: ...

    @property
    def tool_arguments(self) -> list[str]: ...

    def usage(self) -> TokenUsage | None: ...


class Pricer(Protocol):
    """The request's cost in dollars at its model's price, None when unknown (proxy.decision.prices.PriceBook)."""

    def cost(self, upstream: str, model: str, usage: TokenUsage | None) -> float | None: ...


class Timings(NamedTuple):
    latency_s: float
    ttft_s: float | None


class Scorer(Protocol):
    """The decider's reward: baseline costs learn from unoptimised traffic before the reward is computed."""

    def score(
        self, decision: Decision, *, status: int, error_class: str | None, latency_s: float, completion_tokens: int | None, quality: float | None,
        cost_usd: float | None = None,
    ) -> float | None: ...


def judged(decision: Decision, status: int) -> bool:
    """Is this request's outcome a verdict on the parameters sent? Not when the client's body earned a 4xx.

    Such a request keeps its row in the decision log and its count in the error metrics,
    but has no quality and no reward, so the arm drawn, the task's quality (conservative
    monitor, SLO, reports) and the quality-signal counts never see it (`policies.quality.client_error`; which outcomes teach at all: `policies.quality.learns`).
    """
    return not client_error(status, decision.sent, decision.baseline)


def complete(
    decision: Decision,
    summary: Summary,
    status: int,
    error_class: str | None,
    timings: Timings,
    *,
    quality_settings: QualitySettings,
    scorer: Scorer,
    prices: Pricer | None = None,
) -> Outcome:
    """The one Outcome of a request: its cost, automatic quality, then the reward from them (no quality or reward for a client's own 4xx)."""
    cost = prices.cost(*decision.served_by, summary.usage()) if prices is not None else None  # a stand-in at its own price
    quality = auto_quality(
        status=status if error_class is None else 599,
        content=summary.content,
        finish_reason=summary.finish_reason,
        json_mode=decision.context.json_mode,
        tool_arguments=summary.tool_arguments,
        settings=quality_settings,
    ) if judged(decision, status) else None
    reward = scorer.score(
        decision, status=status, error_class=error_class, latency_s=timings.latency_s,
        completion_tokens=summary.completion_tokens, quality=quality, cost_usd=cost,
    )
    return Outcome(
        request_id=decision.request_id,
        status=status,
        latency_s=timings.latency_s,
        ttft_s=timings.ttft_s,
        prompt_tokens=summary.prompt_tokens,
        completion_tokens=summary.completion_tokens,
        finish_reason=summary.finish_reason,
        error_class=error_class,
        quality=quality,
        reward=reward,
        cost_usd=cost,
    )


def arm_label(decision: Decision) -> str:
    """Bounded metric label: the sent parameters as deltas from the baseline."""
    return _arm_label(decision.sent, decision.baseline)


@functools.lru_cache(maxsize=4096)
def _arm_label(sent: Params, base: Params) -> str:
    """Cached: the same few (sent, baseline) pairs recur on every request, and formatting them was ~1 % of a request's CPU."""
    if sent.temperature is None and sent.max_tokens is None and sent.effort is None:
        return "client"
    dt = (sent.temperature or 0.0) - (base.temperature or 0.0) if sent.temperature is not None else 0.0
    dm = (sent.max_tokens or 0) - (base.max_tokens or 0) if sent.max_tokens is not None else 0
    label = f"t{dt:+.2f}/m{dm:+d}"
    if sent.effort is not None:
        # Effort moves in ordinal levels (a handful at most), so the label stays bounded.
        de = steps(base.effort, sent.effort) if base.effort is not None and base.effort in EFFORT_LEVELS and sent.effort in EFFORT_LEVELS else 0
        label += f"/e{de:+d}"
    return label
