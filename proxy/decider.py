"""The decider: one request context in, the parameters to send and a Decision out.

The proxy edge only knows this interface; the bandit, the trust region, the budget,
the SLO fallback and the rollout plug in behind it.
"""

from __future__ import annotations

import time
from typing import Protocol

from policies.records import Decision, Outcome, Params, RequestContext


class Decider(Protocol):
    async def decide(self, ctx: RequestContext, *, request_id: str, assignment_key: str) -> Decision:
        """Choose what to send. May raise `ProxyError` (e.g. 429 budget_exceeded)."""
        ...

    async def observe(self, decision: Decision, outcome: Outcome) -> None:
        """Learn from a finished request (called after the response is complete)."""
        ...


class PassthroughDecider:
    """Sends exactly what the client asked; the decision is still logged (propensity 1)."""

    policy_name = "baseline"

    async def decide(self, ctx: RequestContext, *, request_id: str, assignment_key: str) -> Decision:
        sent = Params(temperature=ctx.client_temperature, max_tokens=ctx.client_max_tokens)
        return Decision(
            request_id=request_id,
            context=ctx,
            context_fingerprint=0,
            sent=sent,
            baseline=sent,
            propensity=1.0,
            policy="baseline",
            policy_version="baseline-0",
            mode="off",
            created_at=time.time(),
        )

    async def observe(self, decision: Decision, outcome: Outcome) -> None:
        return None
