"""The learning side of the decider: what a finished request, or a later signal, teaches.

One reward computation (`Learner.reward`: the baseline costs normalise it, unoptimised
traffic teaches them first), the first update from a request's own Outcome (`observe`), and
the swap of a reward a later signal replaces (`correct`), so a request counts once. Which
requests teach at all is `policies.quality.learns`, the one copy of that rule.
"""

from __future__ import annotations

from guards.rollout import OPTIMISED_MODES
from guards.slo import SloMonitor
from policies.base import Policy
from policies.quality import learns
from policies.records import Arm, Decision, Outcome, RequestContext
from policies.reward import BaselineCosts
from policies.settings import RewardSettings
from proxy.decision.arm_space import ArmSpace

# Errors that count against the SLO: the upstream failed, not the client.
UPSTREAM_FAILURES = frozenset({"timeout", "connect", "protocol", "upstream_stream_error"})


def is_upstream_failure(outcome: Outcome) -> bool:
    return outcome.status >= 500 or outcome.error_class in UPSTREAM_FAILURES


class Learner:
    """Rewards, the SLO monitor's samples, length evidence and the policy's statistics, from outcomes and signals."""

    def __init__(self, policy: Policy, arms: ArmSpace, slo: SloMonitor, reward_settings: RewardSettings) -> None:
        self.policy = policy
        self.arms = arms  # the length evidence of finished answers widens its lower caps
        self.slo = slo
        self.reward_settings = reward_settings
        self.costs = BaselineCosts()

    def reward(self, task_type: str, quality: float, latency_s: float, completion_tokens: int | None, cost_usd: float | None = None) -> float:
        """The one reward computation (`policies.reward`), normalised by the task's baseline costs."""
        return self.costs.reward(
            task_type=task_type, quality=quality, latency_s=latency_s, tokens=completion_tokens or 0,
            settings=self.reward_settings, cost_usd=cost_usd,
        )

    def reward_for(self, decision: Decision, outcome: Outcome, quality: float) -> float:
        """The reward of a finished request with another quality (a later signal's)."""
        return self.reward(decision.context.task_type, quality, outcome.latency_s, outcome.completion_tokens, outcome.cost_usd)

    def score(
        self, decision: Decision, *, status: int, error_class: str | None, latency_s: float, completion_tokens: int | None, quality: float | None,
        cost_usd: float | None = None,
    ) -> float | None:
        """The reward of a finished request, computed once (proxy.decision.outcome.complete).

        Unoptimised traffic first teaches the baseline costs the reward is normalised by.
        None when the request does not teach the policy (failed, cut off, or no quality).
        """
        if quality is None or not learns(status, error_class):
            return None
        if decision.mode not in OPTIMISED_MODES:
            self.costs.observe(decision.context.task_type, latency_s, completion_tokens or 0, cost_usd)
        return self.reward(decision.context.task_type, quality, latency_s, completion_tokens, cost_usd)

    def observe(self, decision: Decision, outcome: Outcome, now: float) -> None:
        """Feed the SLO monitor, the length evidence, and the policy with the Outcome's reward."""
        failed = is_upstream_failure(outcome)
        if outcome.error_class != "client_disconnected" and (failed or 200 <= outcome.status < 300):
            optimised = decision.mode in OPTIMISED_MODES
            self.slo.observe(now, optimized=optimised, latency_s=outcome.latency_s, error=failed, quality=outcome.quality)
        if not learns(outcome.status, outcome.error_class):
            return
        self.arms.record_length(decision.context, decision.baseline, decision.sent, outcome.completion_tokens, outcome.finish_reason)
        if outcome.reward is not None:
            base = decision.baseline
            self.policy.update(decision.context, base.arm(), decision.sent.arm(base), outcome.reward)

    def correct(self, ctx: RequestContext, base: Arm, arm: Arm, old: float | None, new: float, logged_version: str) -> tuple[bool, str]:
        """Fold a later signal's reward into the policy without double counting: whether it changed, and why."""
        policy = self.policy
        if old is None:
            policy.update(ctx, base, arm, new)
            return True, "no automatic reward had been applied: corrected reward added with update()"
        correct = getattr(policy, "correct", None)
        if callable(correct):
            done = correct(ctx, base, arm, old, new, logged_version=logged_version)
            if done == "updated":
                return True, "the policy statistics never held the automatic reward: corrected reward added with update()"
            if done == "skipped":
                return False, f"decision logged under policy version {logged_version!r}; the current statistics never held its reward"
            return True, f"automatic reward {old:.6g} replaced by {new:.6g} with correct()"
        return False, (
            f"policy '{policy.name}' has no correct(ctx, baseline, arm, old_reward, new_reward); "
            "its statistics keep the automatic reward (adding the new one would count the request twice)"
        )
