"""The learning side of the decider: what a finished request, or a later signal, teaches.

One reward computation (`Learner.reward`: the baseline costs normalise it, unoptimised
traffic teaches them first), the first update from a request's own Outcome (`observe`), and
the swap of a reward a later signal replaces (`correct`), so a request counts once. Which
requests teach at all is `policies.quality.learns`, the one copy of that rule.

With a batch (`learn_in_batches`, proxy/decision/batch.py) the length evidence and the
policy's updates run per batch of answered requests (`learn`), the SLO's samples still per
request; a correction drains the batch first, so the reward it replaces is in the statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

from guards.rollout import OPTIMISED_MODES
from guards.slo import SloMonitor
from guards.truncation import TruncationKey
from policies.base import Policy
from policies.quality import learns
from policies.records import Arm, Decision, Outcome, RequestContext
from policies.reward import BaselineCosts
from policies.settings import RewardSettings
from proxy.decision.arm_space import ArmSpace
from proxy.decision.batch import OutcomeBatch

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
        self.learning: OutcomeBatch | None = None  # None: each request is learnt from at once

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
        failed = outcome.status >= 500 or outcome.error_class in UPSTREAM_FAILURES  # `is_upstream_failure`, inlined: every request
        if outcome.error_class != "client_disconnected" and (failed or 200 <= outcome.status < 300):
            optimised = decision.mode in OPTIMISED_MODES
            self.slo.observe(now, optimized=optimised, latency_s=outcome.latency_s, error=failed, quality=outcome.quality)
        if not learns(outcome.status, outcome.error_class):
            return
        if self.learning is not None:
            self.learning.add(decision, outcome)
        else:
            self.learn(((decision, outcome),))

    def learn_in_batches(self, batch: OutcomeBatch) -> None:
        """From now on `observe` queues what an answered request teaches for `learn` on `batch`."""
        self.learning = batch
        batch.steps.append(self.learn)

    def drain(self) -> None:
        """Learn what is queued now (before a correction swaps a reward the policy must already hold)."""
        if self.learning is not None:
            self.learning.drain()

    def learn(self, finished: Sequence[tuple[Decision, Outcome]]) -> None:
        """Answered requests' length evidence (one numpy pass per key), then the policy's updates, in order."""
        arms = self.arms
        lengths: dict[TruncationKey, tuple[list[int], list[int], list[bool]]] = {}
        for decision, outcome in finished:
            sent, base = decision.sent, decision.baseline
            if sent.max_tokens is not None and outcome.completion_tokens is not None:
                key = arms.truncation_key(decision.context, sent.arm(base).temperature, base.arm())
                caps, tokens, cuts = lengths.setdefault(key, ([], [], []))
                caps.append(int(sent.max_tokens))
                tokens.append(int(outcome.completion_tokens))
                cuts.append(outcome.finish_reason == "length")
        for key, (caps, tokens, cuts) in lengths.items():
            if len(caps) == 1:  # a quiet moment: the scalar path is cheaper than numpy's set-up
                arms.truncation.observe(key, caps[0], tokens[0], cuts[0])
            else:
                arms.truncation.observe_many(key, caps, tokens, cuts)
        update = self.policy.update
        for decision, outcome in finished:
            if outcome.reward is not None:
                base = decision.baseline
                update(decision.context, base.arm(), decision.sent.arm(base), outcome.reward)

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
