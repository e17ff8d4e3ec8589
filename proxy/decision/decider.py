"""The decider: one request context in, the parameters to send and a Decision out.

The proxy edge only knows this interface; the bandit, the trust region, the budget,
the SLO fallback and the rollout plug in behind it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from guards.budget import BudgetGuard, Reservation
from guards.rollout import Effective, OpeEvidence, RolloutController, RolloutEvent, assign
from guards.settings import BaselineSettings, ConstraintsSettings
from guards.slo import SloMonitor
from guards.trust_region import ModelLimits, allowed_arms, enforce
from policies.arms import candidate_arms
from policies.base import Policy
from policies.context import context_fingerprint
from policies.records import Arm, Decision, Outcome, Params, RequestContext
from policies.reward import BaselineCosts
from policies.settings import ArmGridSettings, RewardSettings
from proxy.edge.errors import ProxyError


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


# ---------------------------------------------------------------------------------
# The bandit decider: trust region -> rollout -> policy -> budget -> send.
# ---------------------------------------------------------------------------------

dlog = logging.getLogger("thermostat.decider")

# Errors that count against the SLO: the upstream failed, not the client.
UPSTREAM_FAILURES = frozenset({"timeout", "connect", "protocol", "upstream_stream_error"})


def baseline_arm(ctx: RequestContext, stand_in: BaselineSettings, limits: ModelLimits) -> Arm:
    """The client's own values, with the configured per-task baseline for missing ones."""
    temperature = ctx.client_temperature if ctx.client_temperature is not None else stand_in.temperature
    if limits.fixed_temperature is not None:
        temperature = limits.fixed_temperature
    max_tokens = ctx.client_max_tokens if ctx.client_max_tokens is not None else stand_in.max_tokens
    if limits.max_tokens is not None and ctx.client_max_tokens is None:
        max_tokens = min(max_tokens, limits.max_tokens)
    return Arm(temperature=round(float(temperature), 3), max_tokens=int(max_tokens))


def unoptimised_mode(eff: Effective) -> str:
    """Why a request is not optimised: disabled, rolled back, shadow phase, or outside the rollout share."""
    if eff.rollback is not None:
        return "off" if eff.rollback.trigger == "disabled" else "rollback"
    if eff.phase == "shadow" or eff.fraction == 0.0:
        return "shadow"
    return "holdout"


def is_upstream_failure(outcome: Outcome) -> bool:
    return outcome.status >= 500 or outcome.error_class in UPSTREAM_FAILURES


class BanditDecider:
    """Composes the guards and a policy into one decision per request.

    Order matters: the trust region bounds what the policy may pick; the rollout
    decides whether this request is optimised at all (the policy still decides and is
    logged when it is not, so shadow traffic shows what it would have done); the
    budget reserves tokens for what is actually sent and may swap the arm for a
    cheaper one. Whatever happens, `enforce` is the last word before the body is
    patched, so nothing outside the trust region ever leaves.
    """

    def __init__(
        self,
        *,
        policy: Policy,
        budget: BudgetGuard,
        rollout: RolloutController,
        slo: SloMonitor,
        constraints: ConstraintsSettings,
        grid: ArmGridSettings,
        reward_settings: RewardSettings,
        baseline_for: Callable[[str], BaselineSettings],
        limits_for: Callable[[str, str], ModelLimits],
        rng: np.random.Generator,
        clock: Callable[[], float] = time.time,
        require_caws: bool = True,
        tick_interval_s: float = 0.25,
        on_events: Callable[[list[RolloutEvent]], None] | None = None,
    ) -> None:
        self.policy = policy
        self.budget = budget
        self.rollout = rollout
        self.slo = slo
        self.constraints = constraints
        self.grid = grid
        self.reward_settings = reward_settings
        self.baseline_for = baseline_for
        self.limits_for = limits_for
        self.rng = rng
        self.clock = clock
        self.require_caws = require_caws
        self.tick_interval_s = tick_interval_s
        self.on_events = on_events
        self.costs = BaselineCosts()
        self.reservations: dict[str, Reservation] = {}
        self._last_tick = 0.0
        self._arm_cache: dict[tuple[float, int, str, str], list[Arm]] = {}
        self.budget_warning = False
        self.ope_evidence: OpeEvidence | None = None  # refreshed off the hot path by the runtime

    @property
    def policy_name(self) -> str:
        return self.policy.name

    def allowed_for(self, ctx: RequestContext) -> tuple[Arm, list[Arm], ModelLimits]:
        limits = self.limits_for(ctx.upstream, ctx.model)
        base = baseline_arm(ctx, self.baseline_for(ctx.task_type), limits)
        key = (base.temperature, base.max_tokens, ctx.upstream, ctx.model)
        allowed = self._arm_cache.get(key)
        if allowed is None:
            cands = candidate_arms(
                base,
                max_delta_temperature=self.constraints.max_delta_temperature,
                max_delta_max_tokens=self.constraints.max_delta_max_tokens,
                grid=self.grid,
            )
            allowed = allowed_arms(cands, base, self.constraints, limits)
            if len(self._arm_cache) > 10_000:
                self._arm_cache.clear()
            self._arm_cache[key] = allowed
        return base, allowed, limits

    async def decide(self, ctx: RequestContext, *, request_id: str, assignment_key: str) -> Decision:
        now = self.clock()
        base, allowed, limits = self.allowed_for(ctx)
        eff = self.rollout.effective(now)
        optimised = eff.optimizing_allowed and assign(assignment_key, eff.fraction)
        choice = self.policy.choose(ctx, base, allowed, self.rng)
        policy_arm = allowed[choice.index]
        client = Params(temperature=ctx.client_temperature, max_tokens=ctx.client_max_tokens)
        notes: list[str] = []

        verdict = await self.budget.decide(
            allowed=allowed,
            chosen=choice.index if optimised else None,
            baseline=base,
            task_type=ctx.task_type,
            prompt_tokens=ctx.prompt_tokens_est,
            confidence=choice.propensity,
            now=now,
        )
        notes.extend(verdict.notes)
        self.budget_warning = verdict.warning
        if verdict.reservation is not None:
            self.reservations[request_id] = verdict.reservation
        if verdict.action == "reject" and verdict.reason == "guard_unavailable":
            raise ProxyError(
                503,
                "the token budget could not be checked in time (caws.on_exhausted = reject); retry shortly",
                "budget_unavailable",
                "server_error",
            )
        if verdict.action == "reject":
            raise ProxyError(
                429,
                "the token budget for this window is exhausted (caws.on_exhausted = reject)",
                "budget_exceeded",
                "rate_limit_error",
            )
        if optimised and not verdict.guard_ok and self.require_caws:
            optimised = False
            notes.append("require_caws:budget_guard_unavailable")

        if optimised:
            sent_arm = enforce(verdict.arm, base, self.constraints, limits)
            if sent_arm == policy_arm:
                mode, propensity = "optimized", choice.propensity
            else:
                # A guard swapped the arm: the behaviour propensity is no longer the
                # policy's, so these rows are marked and left out of IPS/DR.
                mode, propensity = "guard_fallback", 1.0
            temperature: float | None = sent_arm.temperature
            if limits.fixed_temperature is not None and ctx.client_temperature is None:
                temperature = None  # never add a temperature a fixed-temperature model did not get
            sent = Params(temperature=temperature, max_tokens=sent_arm.max_tokens)
        else:
            sent = client
            propensity = 1.0
            mode = unoptimised_mode(eff)

        return Decision(
            request_id=request_id,
            context=ctx,
            context_fingerprint=context_fingerprint(ctx),
            sent=sent,
            baseline=Params(temperature=base.temperature, max_tokens=base.max_tokens),
            propensity=propensity,
            policy=self.policy.name,
            policy_version=self.policy.version,
            mode=mode,
            created_at=now,
            policy_choice=Params(temperature=policy_arm.temperature, max_tokens=policy_arm.max_tokens),
            policy_propensity=choice.propensity,
            arm_index=choice.index,
            guard_notes=tuple(notes),
            budget_reserved=verdict.reservation.tokens if verdict.reservation is not None else 0,
        )

    def reward_for(self, decision: Decision, outcome: Outcome, quality: float) -> float:
        tokens = (outcome.completion_tokens or 0)
        return self.costs.reward(
            task_type=decision.context.task_type,
            quality=quality,
            latency_s=outcome.latency_s,
            tokens=tokens,
            settings=self.reward_settings,
        )

    async def observe(self, decision: Decision, outcome: Outcome) -> None:
        now = self.clock()
        reservation = self.reservations.pop(decision.request_id, None)
        if reservation is not None:
            try:
                if outcome.prompt_tokens is not None or outcome.completion_tokens is not None:
                    used = (outcome.prompt_tokens or 0) + (outcome.completion_tokens or 0)
                    await self.budget.settle(reservation, used, now)
                elif outcome.error_class == "client_disconnected":
                    await self.budget.settle(reservation, reservation.tokens, now)  # it may still have been generated
                else:
                    await self.budget.release(reservation, now)
            except Exception:
                dlog.exception("budget settlement failed for %s", decision.request_id)
        failed = is_upstream_failure(outcome)
        optimised = decision.mode in ("optimized", "guard_fallback")
        if outcome.error_class != "client_disconnected" and (failed or 200 <= outcome.status < 300):
            self.slo.observe(now, optimized=optimised, latency_s=outcome.latency_s, error=failed, quality=outcome.quality)
        if 200 <= outcome.status < 300 and outcome.error_class is None and outcome.quality is not None:
            if not optimised:
                self.costs.observe(decision.context.task_type, outcome.latency_s, outcome.completion_tokens or 0)
            outcome.reward = self.reward_for(decision, outcome, outcome.quality)
            base = decision.baseline
            self.policy.update(
                decision.context,
                base.arm(),
                decision.sent.arm(base),
                outcome.reward,
            )
        self.maybe_tick(now)

    def maybe_tick(self, now: float, force: bool = False) -> list[RolloutEvent]:
        if not force and now - self._last_tick < self.tick_interval_s:
            return []
        self._last_tick = now
        events = self.rollout.tick(now, self.ope_evidence)
        if events and self.on_events is not None:
            self.on_events(events)
        return events
