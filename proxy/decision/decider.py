"""The decider: one request context in, the parameters to send and a Decision out.

The proxy edge only knows this interface; the bandit, the trust region, the budget,
the SLO fallback and the rollout plug in behind it. `BanditDecider` composes four parts,
each in its own module:

- the arm space (`proxy.decision.arm_space`): model limits, the baseline, the trust
  region's arms, the lower caps shown safe; the one place that enumerates the knobs;
- the sampler (`proxy.decision.sampler`): the two-stage draw over those arms;
- the budget desk (`proxy.decision.budget_desk`): a request's reservation and settlement;
- the learner (`proxy.decision.learner`): rewards, the first update, later corrections.

`proxy.decision.plan.Planner` runs the steps of one decision once, for `decide` and
`explain` alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import msgspec
import numpy as np

from guards.budget import BudgetGuard, BudgetVerdict, Reservation
from guards.conservative import ConservativeMonitor
from guards.rollout import Effective, OpeEvidence, RolloutController, RolloutEvent
from guards.slo import SloMonitor
from guards.truncation import TruncationGuard
from guards.trust_region import ModelLimits
from policies.base import Choice, Correction, Policy
from policies.records import Arm, Decision, Outcome, Params, RequestContext
from policies.reward import BaselineCosts
from policies.settings import RewardSettings
from proxy.config import Config
from proxy.decision.arm_space import (
    NOMINAL_TEMPERATURE,
    ArmSettings,
    ArmSpace,
    QualitySignals,
    Reference,
    TuneMode,
    reference,
    reference_effort,
    tuned_params,
)
from proxy.decision.batch import OutcomeBatch
from proxy.decision.budget_desk import BudgetDesk, BudgetExceeded, BudgetUnavailable, RatesSource, refuse_if_rejected
from proxy.decision.learner import Learner
from proxy.decision.model_stage import ModelEvidence, ModelStageSettings
from proxy.decision.plan import HOLDOUT_SALT, Plan, Planner
from proxy.decision.sampler import TEMPERATURE_STATISTICS, TwoStageSampler, temperature_arm, temperature_context

__all__ = [
    "HOLDOUT_SALT",
    "TEMPERATURE_STATISTICS",
    "ArmSettings",
    "ArmSpace",
    "BanditDecider",
    "BudgetExceeded",
    "BudgetUnavailable",
    "Decider",
    "DeciderSettings",
    "DecisionGuards",
    "Explanation",
    "QualitySignals",
    "TuneMode",
    "reference",
    "reference_effort",
    "temperature_arm",
    "temperature_context",
    "tuned_params",
]


class Decider(Protocol):
    async def decide(self, ctx: RequestContext, *, request_id: str, assignment_key: str) -> Decision:
        """Choose what to send. May raise `BudgetExceeded` or `BudgetUnavailable` (the edge answers 429 / 503)."""
        ...

    async def admit(self, task_type: str, prompt_tokens: int) -> Reservation | None:
        """Budget a passed-through request that spends tokens (nothing is tuned); may raise like `decide`."""
        ...

    async def settle_admitted(self, reservation: Reservation | None, tokens: int | None) -> None:
        """Count what an admitted request spent (None: unknown, its reservation counts)."""
        ...

    async def observe(self, decision: Decision, outcome: Outcome) -> None:
        """Learn from a finished request (called after the response is complete)."""
        ...


class Explanation(NamedTuple):
    """`BanditDecider.explain`: the decision `decide` would make, and what it was made from."""

    decision: Decision  # as `decide` would build it (mode "rejected" where `decide` raises 429/503)
    reference: Reference
    allowed: tuple[Arm, ...]  # the trust region's arms, in the policy's order
    pmf: tuple[float, ...]  # the policy's probability of each allowed arm
    limits: ModelLimits
    effective: Effective  # the rollout state it was decided under
    held_out: bool
    assigned: bool | None  # drawn into the rollout share (None: no assignment key given)
    budget: BudgetVerdict


@dataclass(frozen=True, slots=True)
class DecisionGuards:
    """The guards a decision passes and a finished request reports to (built once by the composition root)."""

    budget: BudgetGuard
    slo: SloMonitor
    conservative: ConservativeMonitor | None = None  # per task: optimised vs holdout; a task it rolls back gets the baseline
    prices: RatesSource | None = None  # a dollar budget reserves at the model's price (caws.unit = "usd")


class DeciderSettings(msgspec.Struct, frozen=True):
    """The decider's own numbers: the reward, the holdout, the budget's fail-safe, the rollout tick."""

    reward: RewardSettings = RewardSettings()
    holdout_fraction: float = 0.05
    require_caws: bool = True
    tick_interval_s: float = 0.25
    models: ModelStageSettings = ModelStageSettings()  # the model as a knob (`proxy.decision.model_stage`)

    @classmethod
    def from_config(cls, config: Config) -> DeciderSettings:
        models = ModelStageSettings(config.optimization.model_exploration_share, config.slo.max_quality_regression)
        return cls(
            config.policy.reward, config.optimization.holdout_fraction, config.constraints.require_caws, config.slo.check_interval_s, models,
        )


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
        arms: ArmSpace,
        guards: DecisionGuards,
        rollout: RolloutController,
        settings: DeciderSettings,
        rng: np.random.Generator,
        clock: Callable[[], float] = time.time,
        on_events: Callable[[list[RolloutEvent]], None] | None = None,
    ) -> None:
        self.arms = arms
        self.models = ModelEvidence(settings.models)
        self.models.cheaper = self.stand_in_cheaper
        arms.model_admitted = self.models.admits
        self.sampler = TwoStageSampler(policy, self.models)
        self.sampler.has_stand_ins = arms.stand_ins_for
        self.desk = BudgetDesk(guards.budget, guards.prices)
        self.learner = Learner(policy, arms, guards.slo, settings.reward)
        self.planner = Planner(
            arms, self.sampler, self.desk, holdout_fraction=settings.holdout_fraction, require_caws=settings.require_caws,
            rolled_back=self.task_rolled_back,
        )
        self.guards = guards
        self.rollout = rollout  # the holder: start-up may swap the controller (`RolloutSource`)
        self.settings = settings
        self.rng = rng
        self.clock = clock
        self.on_events = on_events
        self._last_tick = 0.0
        self.ope_evidence: OpeEvidence | None = None  # refreshed off the hot path by the runtime

    # ---- the policy, shared by the sampler and the learner ---------------------------

    @property
    def policy(self) -> Policy:
        return self.sampler.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.sampler.policy = self.learner.policy = policy

    # ---- one decision -----------------------------------------------------------------

    async def plan(self, ctx: RequestContext, *, assignment_key: str | None, rng: np.random.Generator) -> Plan:
        """The steps of one decision, for `decide` and `explain` alike (`proxy.decision.plan.Planner`)."""
        now = self.clock()
        return await self.planner.plan(ctx, self.rollout.effective(now), now, assignment_key=assignment_key, rng=rng)

    async def decide(self, ctx: RequestContext, *, request_id: str, assignment_key: str) -> Decision:
        plan = await self.plan(ctx, assignment_key=assignment_key, rng=self.rng)
        reserved = self.desk.hold(request_id, plan.verdict)
        refuse_if_rejected(plan.verdict)
        policy = self.sampler.policy  # `self.policy`, read once
        return plan.decision(request_id, policy.name, policy.version, reserved)

    async def explain(
        self, ctx: RequestContext, *, request_id: str, assignment_key: str | None, rng: np.random.Generator
    ) -> Explanation:
        """What `decide` would do for `ctx` now, without touching the request path's state.

        The same `plan`, so the control API never keeps a copy of the decision logic.
        Differences, on purpose: the draw comes from `rng` (the request path's sequence
        stays as it was), the budget reservation is released at once, a budget refusal is
        reported as mode "rejected" instead of raised, and without an `assignment_key` the
        rollout share counts as drawn only when it covers all traffic.
        """
        plan = await self.plan(ctx, assignment_key=assignment_key or None, rng=rng)
        await self.desk.release(plan.verdict, plan.now)
        pmf = self.sampler.pmf(ctx, plan.reference.arm, plan.allowed)
        return Explanation(
            decision=plan.decision(request_id, self.policy.name, self.policy.version, 0), reference=plan.reference,
            allowed=tuple(plan.allowed), pmf=tuple(float(p) for p in pmf), limits=plan.limits, effective=plan.effective,
            held_out=plan.share.held_out, assigned=plan.share.assigned, budget=plan.verdict,
        )

    def stand_in_cheaper(self, ctx: RequestContext, model: str) -> bool:
        """Is the stand-in's price (input + output per million tokens) below the requested model's? False without prices."""
        prices = self.guards.prices
        upstream = next((u for m, u in self.arms.stand_ins_for(ctx.upstream, ctx.model) if m == model), None)
        if prices is None or upstream is None:
            return False
        mine, theirs = prices.rates(ctx.upstream, ctx.model), prices.rates(upstream, model)
        if mine is None or theirs is None:
            return False
        return theirs.input.base + theirs.output.base < mine.input.base + mine.output.base

    def task_rolled_back(self, task_type: str) -> bool:
        conservative = self.guards.conservative
        return conservative is not None and conservative.is_rolled_back(task_type)

    # ---- a finished request, and later signals ---------------------------------------

    async def observe(self, decision: Decision, outcome: Outcome) -> None:
        """Settle the budget, feed the SLO monitor, and update the policy with the Outcome's reward."""
        now = self.clock()
        await self.desk.settle(decision, outcome, now)
        self.learner.observe(decision, outcome, now)
        self.maybe_tick(now)

    def score(
        self, decision: Decision, *, status: int, error_class: str | None, latency_s: float, completion_tokens: int | None, quality: float | None,
        cost_usd: float | None = None,
    ) -> float | None:
        """The reward of a finished request (`Learner.score`); the edge's `Scorer`."""
        return self.learner.score(
            decision, status=status, error_class=error_class, latency_s=latency_s, completion_tokens=completion_tokens, quality=quality,
            cost_usd=cost_usd,
        )

    def reward_for(self, decision: Decision, outcome: Outcome, quality: float) -> float:
        return self.learner.reward_for(decision, outcome, quality)

    def learn_in_batches(self, batch: OutcomeBatch) -> None:
        """Policy updates and length evidence per batch of finished requests (`Learner.learn_in_batches`)."""
        self.learner.learn_in_batches(batch)

    @property
    def learning(self) -> OutcomeBatch | None:
        return self.learner.learning

    def drain_learning(self) -> None:
        """Learn what the batch holds now (`Learner.drain`)."""
        self.learner.drain()

    def correct(self, ctx: RequestContext, base: Arm, arm: Arm, old: float | None, new: float, logged_version: str) -> tuple[bool, str]:
        """A later signal's reward in place of the earlier one (`Learner.correct`)."""
        return self.learner.correct(ctx, base, arm, old, new, logged_version)

    def learn_signal(
        self, ctx: RequestContext, baseline: Params, sent: Params, new_reward: float, previous: float | None, *, logged_version: str
    ) -> Correction:
        """A temperature-visible signal for the sampler's temperature stage (`TwoStageSampler.learn_signal`)."""
        return self.sampler.learn_signal(ctx, baseline, sent, new_reward, previous, logged_version=logged_version)

    # ---- passed-through requests -----------------------------------------------------

    async def admit(self, task_type: str, prompt_tokens: int) -> Reservation | None:
        """The budget's admission for a passed-through request (`BudgetDesk.admit`)."""
        return await self.desk.admit(task_type, prompt_tokens, Arm(temperature=NOMINAL_TEMPERATURE, max_tokens=0), self.clock())

    async def settle_admitted(self, reservation: Reservation | None, tokens: int | None) -> None:
        await self.desk.settle_admitted(reservation, tokens, self.clock())

    # ---- the rollout --------------------------------------------------------------------

    def maybe_tick(self, now: float, force: bool = False) -> list[RolloutEvent]:
        if not force and now - self._last_tick < self.settings.tick_interval_s:
            return []
        self._last_tick = now
        events = self.rollout.tick(now, self.ope_evidence)
        if events and self.on_events is not None:
            self.on_events(events)
        return events

    # ---- what other rooms read (the parts' own names) --------------------------------

    def candidates(self, ctx: RequestContext) -> tuple[Reference, list[Arm], ModelLimits]:
        return self.arms.candidates(ctx)

    def reference_for(self, ctx: RequestContext) -> tuple[Reference, list[Arm], ModelLimits]:
        return self.arms.reference_for(ctx)

    def allowed_for(self, ctx: RequestContext) -> tuple[Arm, list[Arm], ModelLimits]:
        return self.arms.allowed_for(ctx)

    def temperature_evidence(self, task_type: str) -> bool:
        return self.arms.temperature_evidence(task_type)

    def limits_for(self, upstream: str, model: str) -> ModelLimits:
        return self.arms.limits_for(upstream, model)

    def pmf(self, ctx: RequestContext, base: Arm, allowed: list[Arm]) -> np.ndarray:
        return self.sampler.pmf(ctx, base, allowed)

    def choose(self, ctx: RequestContext, base: Arm, allowed: list[Arm], rng: np.random.Generator) -> Choice:
        return self.sampler.choose(ctx, base, allowed, rng)

    def propensity_floor(self) -> float:
        return self.sampler.propensity_floor()

    @property
    def signals(self) -> QualitySignals:
        return self.arms.signals

    @property
    def truncation(self) -> TruncationGuard:
        return self.arms.truncation

    @property
    def judge_muted(self) -> Callable[[str], bool]:
        return self.arms.judge_muted

    @judge_muted.setter
    def judge_muted(self, muted: Callable[[str], bool]) -> None:
        self.arms.judge_muted = muted

    @property
    def costs(self) -> BaselineCosts:
        return self.learner.costs

    @property
    def reward_settings(self) -> RewardSettings:
        return self.settings.reward

    @property
    def reservations(self) -> dict[str, Reservation]:
        return self.desk.reservations

    @property
    def conservative(self) -> ConservativeMonitor | None:
        return self.guards.conservative
