"""The decider's parts on their own: the plan's pure steps, the budget desk, the learner, the one-copy rules.

`tests/decision/test_decider_pipeline.py` drives them together through `decide` / `observe`;
here each is pinned by hand-worked cases.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from guards.budget import BudgetGuard, BudgetVerdict, Reservation
from guards.rollout import Effective, assign
from guards.settings import BaselineSettings, CawsSettings, ConstraintsSettings
from guards.state import InProcessStore
from guards.trust_region import ModelLimits
from policies.base import Choice
from policies.baseline import BaselinePolicy, UniformPolicy
from policies.quality import learns
from policies.records import Arm, Decision, Outcome, Params, RequestContext
from policies.reward import compute_reward, reward_bounds
from policies.settings import RewardSettings
from proxy.decision.arm_space import Options, reference
from proxy.decision.budget_desk import BudgetDesk
from proxy.decision.plan import HOLDOUT_SALT, Share, settle
from tests.support.decider import RecordingUpdates, build_decider

CTX = RequestContext("code", "m", "chat", 100, 1, False, False, False, 0.7, 600, "up")
GENERAL = Effective(optimizing_allowed=True, fraction=0.5, phase="general", rollback=None)
BASE = Arm(0.7, 600)
OTHER = Arm(0.8, 500)  # inside the region: the client's cap of 600 is a contract


def verdict(arm: Arm = OTHER, **kw: object) -> BudgetVerdict:
    return BudgetVerdict(action=kw.pop("action", "send"), arm=arm, reason=kw.pop("reason", "chosen"), **kw)  # type: ignore[arg-type]


# ---- the plan's share and what is sent -------------------------------------------


def test_share_without_a_key_holds_nothing_out_and_counts_only_a_full_share() -> None:
    assert Share.draw(GENERAL, None, 1.0, False) == Share(False, None, False, False)
    full = GENERAL._replace(fraction=1.0)
    assert Share.draw(full, None, 1.0, False) == Share(False, None, False, True)
    assert Share.draw(full, None, 0.0, True).optimised is False  # a task the conservative monitor rolled back


def test_share_with_a_key_draws_the_holdout_first_with_its_own_salt() -> None:
    for key in (f"user-{i}" for i in range(200)):
        share = Share.draw(GENERAL, key, 0.05, False)
        held = assign(key, 0.05, HOLDOUT_SALT)
        assert share.held_out == held
        assert share.assigned == (not held and assign(key, 0.5))
        assert share.optimised == share.assigned


def test_settle_names_every_mode() -> None:
    ref = reference(CTX, BaselineSettings(), ModelLimits(), ConstraintsSettings(), temperature_evidence=True)
    choice = Choice(index=0, propensity=0.25)
    on = Share(False, True, False, True)
    off = Share(True, False, False, False)
    c, lim = ConstraintsSettings(), ModelLimits()
    opts = Options(ref, [ref.arm], lim, {})  # no stand-ins: every arm is checked against the requested model's baseline
    sent = settle(opts, OTHER, choice, on, GENERAL, verdict(), c, require_caws=True)
    assert (sent.mode, sent.propensity, sent.sent.temperature, sent.sent.max_tokens) == ("optimized", 0.25, 0.8, 500)
    swapped = settle(opts, OTHER, choice, on, GENERAL, verdict(BASE, reason="cheaper_fit"), c, require_caws=True)
    assert (swapped.mode, swapped.propensity) == ("guard_fallback", 1.0)
    down = settle(opts, OTHER, choice, on, GENERAL, verdict(guard_ok=False, reason="guard_unavailable"), c, require_caws=True)
    assert (down.mode, down.sent, down.notes) == ("guard_fallback", ref.sent, ("budget:guard_unavailable", "require_caws:budget_guard_unavailable"))
    assert settle(opts, OTHER, choice, on, GENERAL, verdict(guard_ok=False), c, require_caws=False).mode == "optimized"
    assert settle(opts, OTHER, choice, off, GENERAL, verdict(), c, require_caws=True).mode == "holdout"
    rejected = settle(opts, OTHER, choice, on, GENERAL, verdict(BASE, action="reject", reason="exhausted_reject"), c, require_caws=True)
    assert (rejected.mode, rejected.sent, rejected.propensity) == ("rejected", ref.sent, 1.0)
    far = settle(opts, Arm(1.5, 4000), choice, on, GENERAL, verdict(Arm(1.5, 4000)), c, require_caws=True)
    assert (far.mode, far.sent) == ("guard_fallback", ref.sent)  # `enforce` has the last word: outside the region, the baseline


# ---- the budget desk ---------------------------------------------------------------


def _decision(request_id: str = "r1") -> Decision:
    return Decision(request_id=request_id, context=CTX, context_fingerprint="f", sent=Params(0.7, 600), baseline=Params(0.7, 600),
                    propensity=1.0, policy="p", policy_version="v", mode="holdout", created_at=0.0)


def test_the_desk_holds_a_reservation_until_the_outcome_settles_it() -> None:
    async def go() -> None:
        guard = BudgetGuard(CawsSettings(budget_limit=10_000), InProcessStore())
        desk = BudgetDesk(guard)
        v = await desk.verdict(CTX, [BASE], None, BASE, 1.0, now=1000.0)
        assert v.reservation is not None and desk.hold("r1", v) == v.reservation.tokens and "r1" in desk.reservations
        await desk.settle(_decision(), Outcome(request_id="r1", status=200, latency_s=0.1, prompt_tokens=100, completion_tokens=50), 1000.0)
        assert desk.reservations == {}
        status = await guard.status(1000.0)
        assert (status.used, status.reserved) == (150, 0)  # what was spent, not what was reserved
        assert desk.hold("r2", verdict()) == 0 and "r2" not in desk.reservations  # nothing reserved, nothing held

    asyncio.run(go())


def test_the_desk_admits_and_settles_a_passed_through_request() -> None:
    async def go() -> None:
        guard = BudgetGuard(CawsSettings(budget_limit=10_000), InProcessStore())
        desk = BudgetDesk(guard)
        reservation = await desk.admit("embed", 300, Arm(1.0, 0), 1000.0)
        assert isinstance(reservation, Reservation) and reservation.tokens == 300
        await desk.settle_admitted(reservation, None, 1000.0)  # unknown usage: the reservation counts
        assert (await guard.status(1000.0)).used == 300

    asyncio.run(go())


# ---- the learner -----------------------------------------------------------------


class Recording(RecordingUpdates, UniformPolicy):
    pass


def test_one_policy_for_the_sampler_and_the_learner() -> None:
    d = build_decider(UniformPolicy())
    swapped = BaselinePolicy()
    d.policy = swapped
    assert d.policy is swapped and d.sampler.policy is swapped and d.learner.policy is swapped


def test_the_learner_teaches_only_what_learns_lets_through() -> None:
    policy = Recording()
    d = build_decider(policy, constraints=ConstraintsSettings(max_extra_truncation=1.0))
    decision = _decision()
    for status, error in itertools.product((200, 400, 429, 500), (None, "length", "client_disconnected")):
        outcome = Outcome(request_id="r1", status=status, latency_s=0.1, completion_tokens=10, error_class=error, reward=0.5)
        before = len(policy.updates)
        d.learner.observe(decision, outcome, 1000.0)
        assert (len(policy.updates) > before) == learns(status, error) == (status == 200 and error is None)
        assert (d.learner.score(decision, status=status, error_class=error, latency_s=0.1, completion_tokens=10, quality=1.0) is None) != learns(status, error)


def test_correct_swaps_or_adds_and_says_which() -> None:
    d = build_decider(Recording())
    assert d.correct(CTX, BASE, OTHER, None, 0.4, "v") == (True, "no automatic reward had been applied: corrected reward added with update()")
    updated, note = d.correct(CTX, BASE, OTHER, 0.1, 0.4, "v")
    assert not updated and note.startswith("decision logged under policy version 'v'")  # a stateless policy skips the swap


def test_reward_for_is_the_learners_one_reward() -> None:
    d = build_decider()
    outcome = Outcome(request_id="r1", status=200, latency_s=0.3, completion_tokens=40, cost_usd=None)
    assert d.reward_for(_decision(), outcome, 0.8) == d.learner.reward("code", 0.8, 0.3, 40) == pytest.approx(
        compute_reward(quality=0.8, latency_s=0.3, tokens=40, baseline_latency_s=1.0, baseline_tokens=256.0, settings=RewardSettings()))


# ---- the reward range, one copy ---------------------------------------------------


@pytest.mark.parametrize("weights", [(1.0, 0.1, 0.01), (1.0, -0.1, 0.01), (-0.5, 0.2, -0.3), (0.0, 0.0, 0.0)])
def test_reward_bounds_hold_every_reward_and_are_reached(weights: tuple[float, float, float]) -> None:
    settings = RewardSettings(w_quality=weights[0], w_latency=weights[1], w_tokens=weights[2], max_ratio=10.0)
    low, high = reward_bounds(settings)
    rewards = [
        compute_reward(quality=q, latency_s=lat, tokens=tok, baseline_latency_s=1.0, baseline_tokens=100.0, settings=settings)
        for q, lat, tok in itertools.product((0.0, 0.5, 1.0), (0.0, 3.0, 50.0), (0, 300, 5000))
    ]
    assert low - 1e-12 <= min(rewards) and max(rewards) <= high + 1e-12
    assert min(rewards) == pytest.approx(low) and max(rewards) == pytest.approx(high)  # the corners reach them
    assert reward_bounds(RewardSettings()) == (-(0.1 + 0.01) * 10.0, 1.0)  # the usual weights: the formula as before
