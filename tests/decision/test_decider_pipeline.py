"""decide -> complete -> listeners, with the decider's real parts and no HTTP.

The decider raises domain errors (the edge maps them to status codes); `complete`
computes quality and reward once into a frozen Outcome, and the decider's `observe`
folds exactly that reward into the policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import msgspec
import numpy as np
import pytest

from guards.settings import CawsSettings, ConstraintsSettings
from policies.base import Choice
from policies.baseline import UniformPolicy
from policies.records import Arm, Decision, Outcome, Params, RequestContext
from policies.settings import QualitySettings, RewardSettings
from proxy.common import summarize_body
from proxy.decision import BanditDecider, BudgetExceeded, Explanation, Timings, arm_label, complete
from tests.support.decider import RecordingUpdates, build_decider
from tests.support.memory_transport import chat_json

CTX = RequestContext("code", "m", "chat", 100, 1, False, False, False, 0.7, 600, "up")


class RecordingPolicy(RecordingUpdates, UniformPolicy):
    pass


def make_decider(policy: UniformPolicy, caws: CawsSettings | None = None, phase: str = "general", holdout: float = 0.0) -> BanditDecider:
    # The pipeline's order is under test, not the length check on lower caps (tests/guards/test_truncation.py):
    # every cap of the region is offered, as if the answers had already shown them safe.
    return build_decider(policy, caws=caws, phase=phase, holdout=holdout, constraints=ConstraintsSettings(max_extra_truncation=1.0))


def run(decider: BanditDecider, status: int = 200, error_class: str | None = None) -> tuple[Decision, Outcome]:
    async def go() -> tuple[Decision, Outcome]:
        decision = await decider.decide(CTX, request_id="r1", assignment_key="k1")
        summary = summarize_body(chat_json("A fine answer.", prompt_tokens=10, completion_tokens=20))
        outcome = complete(decision, summary, status, error_class, Timings(0.25, None), quality_settings=QualitySettings(), scorer=decider)
        await decider.observe(decision, outcome)
        return decision, outcome

    return asyncio.run(go())


def test_reward_is_computed_once_and_is_what_the_policy_learns() -> None:
    policy = RecordingPolicy()
    d = make_decider(policy)
    decision, outcome = run(d)
    assert outcome.quality is not None and outcome.reward is not None
    expected = d.costs.reward(task_type="code", quality=outcome.quality, latency_s=0.25, tokens=20, settings=RewardSettings())
    assert outcome.reward == expected
    [(base, arm, reward)] = policy.updates
    assert reward == outcome.reward
    assert base == decision.baseline.arm() and arm == decision.sent.arm(decision.baseline)
    assert (outcome.prompt_tokens, outcome.completion_tokens, outcome.latency_s) == (10, 20, 0.25)
    with pytest.raises(AttributeError):
        outcome.reward = 0.0  # type: ignore[misc]  # frozen: one owner


def test_a_failed_request_has_no_reward_and_teaches_nothing() -> None:
    policy = RecordingPolicy()
    d = make_decider(policy)
    _, outcome = run(d, status=200, error_class="client_disconnected")
    assert outcome.reward is None and policy.updates == []
    _, outcome = run(d, status=500, error_class="http_500")
    assert outcome.quality == 0.0 and outcome.reward is None and policy.updates == []


def test_budget_exhausted_is_a_domain_error_not_an_http_one() -> None:
    d = make_decider(RecordingPolicy(), CawsSettings(budget_limit=1, on_exhausted="reject"))
    with pytest.raises(BudgetExceeded):
        run(d)


def test_arm_label_is_the_delta_from_the_baseline() -> None:
    base = Params(temperature=0.7, max_tokens=600)
    mk = lambda sent: msgspec.structs.replace(run(make_decider(RecordingPolicy()))[0], sent=sent, baseline=base)  # noqa: E731
    assert arm_label(mk(Params(temperature=0.5, max_tokens=700))) == "t-0.20/m+100"
    assert arm_label(mk(base)) == "t+0.00/m+0"
    assert arm_label(mk(Params())) == "client"
    effort_base = Params(temperature=0.7, max_tokens=600, effort="medium")
    mk_e = lambda sent: msgspec.structs.replace(run(make_decider(RecordingPolicy()))[0], sent=sent, baseline=effort_base)  # noqa: E731
    assert arm_label(mk_e(Params(max_tokens=600, effort="high"))) == "t+0.00/m+0/e+1"
    assert arm_label(mk_e(Params(effort="low"))) == "t+0.00/m+0/e-1"


class LastArm(UniformPolicy):
    """Deterministic: always the last allowed arm, so explain and decide must agree."""

    def choose(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm], rng: np.random.Generator) -> Choice:
        n = len(arms)
        return Choice(index=n - 1, propensity=1.0 / n)


def explain_and_decide(d: BanditDecider, key: str) -> tuple[Explanation, Decision]:
    async def go() -> tuple[Explanation, Decision]:
        state = d.rng.bit_generator.state
        seen = await d.explain(CTX, request_id="x", assignment_key=key, rng=np.random.default_rng(5))
        assert d.rng.bit_generator.state == state and d.reservations == {}  # a read: no draw, no reservation
        return seen, await d.decide(CTX, request_id="r", assignment_key=key)

    return asyncio.run(go())


def test_explain_says_what_decide_does() -> None:
    seen, decision = explain_and_decide(make_decider(LastArm()), "user-1")
    assert seen.decision.mode == decision.mode == "optimized"
    assert seen.decision.sent == decision.sent and seen.decision.arm_index == len(seen.allowed) - 1
    assert seen.reference.sent == decision.baseline and len(seen.pmf) == len(seen.allowed)
    assert abs(sum(seen.pmf) - 1.0) < 1e-9 and seen.budget.action != "reject" and seen.assigned is True


def test_explain_on_held_out_and_budget_exhausted_keys() -> None:
    seen, decision = explain_and_decide(make_decider(LastArm(), holdout=1.0), "user-2")
    assert seen.held_out and seen.decision.mode == decision.mode == "holdout" and seen.decision.sent == decision.sent
    tight = make_decider(LastArm(), CawsSettings(budget_limit=1))
    seen = asyncio.run(tight.explain(CTX, request_id="x", assignment_key="user-3", rng=np.random.default_rng(0)))
    assert seen.decision.mode in ("guard_fallback", "rejected") and seen.decision.sent == seen.reference.sent
