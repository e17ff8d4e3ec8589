"""One decision's plan: the steps `decide` takes and `explain` shows, computed once.

`Planner.plan` runs them in order: the arm space's candidates, the holdout and rollout
share (`Share`), the sampler's draw, the budget's verdict (which reserves), what is sent
(`settle`, ending in `enforce`). `BanditDecider.decide` keeps the reservation and raises on
a refusal; `explain` releases it and reports. `Plan.decision` is the logged record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from guards.budget import BudgetVerdict
from guards.rollout import Effective, assign
from guards.settings import ConstraintsSettings
from guards.trust_region import ModelLimits, enforce
from policies.base import Choice
from policies.context import context_fingerprint
from policies.records import Arm, Decision, Params, RequestContext
from proxy.decision.arm_space import ArmSpace, Options, Reference, tuned_params
from proxy.decision.budget_desk import BudgetDesk
from proxy.decision.sampler import Sampler

HOLDOUT_SALT = "holdout"
"""Salt of the holdout hash, so the holdout is independent of the rollout share (which uses no salt)."""


def unoptimised_mode(eff: Effective, held_out: bool = False, task_rolled_back: bool = False) -> str:
    """Why a request is not optimised: disabled, rolled back, the holdout, shadow phase, or outside the rollout share.

    The holdout stays "holdout" in a task the conservative monitor rolled back, so the
    baseline's on-policy stream keeps its meaning.
    """
    if eff.rollback is not None:
        return "off" if eff.rollback.trigger == "disabled" else "rollback"
    if held_out:
        return "holdout"
    if task_rolled_back:
        return "rollback"
    if eff.phase == "shadow" or eff.fraction == 0.0:
        return "shadow"
    return "holdout"


class Share(NamedTuple):
    """Whether a request is optimised: the holdout, the rollout share, a task rolled back."""

    held_out: bool
    assigned: bool | None  # drawn into the rollout share (None: no assignment key given)
    task_rolled_back: bool
    optimised: bool

    @classmethod
    def draw(cls, eff: Effective, assignment_key: str | None, holdout_fraction: float, task_rolled_back: bool) -> Share:
        """The holdout is drawn first and with its own salt: its keys get the baseline in every phase, and the
        rollout share is drawn independently among the rest. Without a key (`explain` only) nothing is held out
        and the share counts as drawn only when it covers all traffic."""
        if assignment_key is None:
            held_out, assigned = False, None
        else:
            held_out = assign(assignment_key, holdout_fraction, HOLDOUT_SALT)
            assigned = not held_out and assign(assignment_key, eff.fraction)
        drawn = assigned if assigned is not None else eff.fraction >= 1.0
        return cls(held_out, assigned, task_rolled_back, eff.optimizing_allowed and not task_rolled_back and drawn)


class Sending(NamedTuple):
    sent: Params
    propensity: float
    mode: str
    notes: tuple[str, ...]


def settle(
    options: Options, policy_arm: Arm, choice: Choice, share: Share, eff: Effective, verdict: BudgetVerdict,
    constraints: ConstraintsSettings, *, require_caws: bool,
) -> Sending:
    """What is sent after the budget's verdict, with the propensity it is logged with and the mode.

    A guard that swapped the policy's arm makes the row "guard_fallback" with propensity 1 (left
    out of IPS/DR); so does a budget guard that could not answer under `require_caws`, which keeps
    the holdout a random sample. Unoptimised traffic gets the baseline, always the requested model
    (the policy's choice is still logged). `enforce` has the last word, against the baseline and
    limits of the arm's own model (a stand-in's). A refusal is mode "rejected" (`decide` raises).
    """
    ref = options.reference
    notes = list(verdict.notes)
    caws_down = share.optimised and not verdict.guard_ok and require_caws
    if caws_down:
        notes.append("require_caws:budget_guard_unavailable")
    if verdict.action == "reject":
        return Sending(ref.sent, 1.0, "rejected", tuple(notes))
    if share.optimised and not caws_down:
        model_ref, model_limits = options.for_model(verdict.arm.model if verdict.arm is not None else None)
        sent_arm = enforce(verdict.arm, model_ref.arm, constraints, model_limits, model_ref.freedom)
        exact = sent_arm == policy_arm
        mode, propensity = ("optimized", choice.propensity) if exact else ("guard_fallback", 1.0)
        return Sending(tuned_params(sent_arm, model_ref), propensity, mode, tuple(notes))
    if caws_down:
        return Sending(ref.sent, 1.0, "guard_fallback", tuple(notes))
    return Sending(ref.sent, 1.0, unoptimised_mode(eff, share.held_out, share.task_rolled_back), tuple(notes))


class Plan(NamedTuple):
    """Everything one decision was made from, and what it sends."""

    ctx: RequestContext
    now: float
    options: Options  # the arm space's candidates (stand-ins' arms included), in the policy's order
    effective: Effective  # the rollout state it was decided under
    share: Share
    choice: Choice
    verdict: BudgetVerdict
    sending: Sending

    @property
    def reference(self) -> Reference:
        return self.options.reference

    @property
    def allowed(self) -> list[Arm]:
        return self.options.allowed

    @property
    def limits(self) -> ModelLimits:
        return self.options.limits

    @property
    def policy_arm(self) -> Arm:
        return self.allowed[self.choice.index]

    def decision(self, request_id: str, policy_name: str, policy_version: str, budget_reserved: int) -> Decision:
        """The record `decide` returns and `explain` shows: one construction, so the two cannot drift apart."""
        options, choice, out = self.options, self.choice, self.sending
        base, arm = options.reference.arm, options.allowed[choice.index]  # `reference.arm`, `policy_arm`
        return Decision(
            request_id=request_id,
            context=self.ctx,
            context_fingerprint=context_fingerprint(self.ctx),
            sent=out.sent,
            baseline=Params(temperature=base.temperature, max_tokens=base.max_tokens, effort=base.effort),
            propensity=out.propensity,
            policy=policy_name,
            policy_version=policy_version,
            mode=out.mode,
            created_at=self.now,
            policy_choice=Params(temperature=arm.temperature, max_tokens=arm.max_tokens, effort=arm.effort, model=arm.model),
            policy_propensity=choice.propensity,
            arm_index=choice.index,
            guard_notes=out.notes,
            budget_reserved=budget_reserved,
            served_upstream=options.stand_ins[out.sent.model].upstream if out.sent.model is not None else "",
        )


class Planner:
    """Runs the steps of one decision (module docstring); holds no state of its own."""

    def __init__(
        self, arms: ArmSpace, sampler: Sampler, desk: BudgetDesk, *, holdout_fraction: float, require_caws: bool,
        rolled_back: Callable[[str], bool],
    ) -> None:
        self.arms = arms
        self.sampler = sampler
        self.desk = desk
        self.holdout_fraction = holdout_fraction
        self.require_caws = require_caws
        self.rolled_back = rolled_back  # the conservative monitor's verdict per task type

    async def plan(self, ctx: RequestContext, eff: Effective, now: float, *, assignment_key: str | None, rng: np.random.Generator) -> Plan:
        """The plan for `ctx` under the rollout state `eff`; the budget's verdict holds a reservation, if any."""
        options = self.arms.options(ctx)
        ref, allowed = options.reference, options.allowed
        share = Share.draw(eff, assignment_key, self.holdout_fraction, self.rolled_back(ctx.task_type))
        choice = self.sampler.choose(ctx, ref.arm, allowed, rng)
        verdict = await self.desk.verdict(
            ctx, allowed, choice.index if share.optimised else None, ref.arm, choice.propensity, now, options.stand_ins,
        )
        sending = settle(options, allowed[choice.index], choice, share, eff, verdict, self.arms.constraints, require_caws=self.require_caws)
        return Plan(ctx, now, options, eff, share, choice, verdict, sending)
