"""Temperature is compared only on signals that can see it (BanditDecider.pmf / choose / learn_signal).

The decider is built from its real parts (tests/decision/test_safe_knobs.py `decider`) with the
real Thompson policy.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from guards.settings import ConstraintsSettings
from policies.records import Decision, Outcome, Params
from policies.settings import ThompsonSettings
from policies.thompson import ThompsonGaussianPolicy
from proxy.decision import BanditDecider
from proxy.decision.decider import temperature_arm, temperature_context
from tests.decision.test_safe_knobs import ctx, decider

OFF = ConstraintsSettings(max_extra_truncation=1.0)  # every cap admitted: the temperature stage alone is under test


def thompson_decider(**kw: object) -> BanditDecider:
    return decider(tune="always", constraints=OFF, policy=ThompsonGaussianPolicy(ThompsonSettings(refresh_every=1)), **kw)  # type: ignore[arg-type]


def marginal(d: BanditDecider, c: object) -> dict[float, float]:
    ref, allowed, _ = d.candidates(c)  # type: ignore[arg-type]
    p = d.pmf(c, ref.arm, allowed)  # type: ignore[arg-type]
    out: dict[float, float] = {}
    for arm, prob in zip(allowed, p):
        out[arm.temperature] = out.get(arm.temperature, 0.0) + float(prob)
    return out


def decide(d: BanditDecider, c: object, i: int) -> Decision:
    return asyncio.run(d.decide(c, request_id=f"r{i}", assignment_key=f"k{i}"))  # type: ignore[arg-type]


def test_choose_plays_pmf_and_logs_its_exact_propensity() -> None:
    d = thompson_decider()
    c = ctx(temperature=0.7, max_tokens=400)
    rng = np.random.default_rng(1)
    for i in range(300):  # some statistics in both stages so the pmf is not flat
        x = decide(d, c, i)
        arm = x.sent.arm(x.baseline)
        r = 1.0 - abs(arm.temperature - 0.8) - abs(arm.max_tokens - 300) / 1000 + 0.05 * rng.standard_normal()
        asyncio.run(d.observe(x, Outcome(request_id=x.request_id, status=200, latency_s=0.1, completion_tokens=10, reward=r)))
        d.learn_signal(c, x.baseline, x.sent, r, None, logged_version=x.policy_version)
    ref, allowed, _ = d.candidates(c)
    p = d.pmf(c, ref.arm, allowed)
    assert p.sum() == pytest.approx(1.0) and p.min() >= d.propensity_floor() - 1e-12 > 0  # the floor over all arms
    draws = 40_000
    counts = np.zeros(len(allowed))
    for _ in range(draws):
        choice = d.choose(c, ref.arm, allowed, rng)
        assert choice.propensity == pytest.approx(p[choice.index], rel=1e-12)
        counts[choice.index] += 1
    se = np.sqrt(p * (1 - p) / draws)
    assert np.all(np.abs(counts / draws - p) <= 4.5 * se + 1e-9)


def test_automatic_rewards_do_not_move_temperature_signals_do() -> None:
    d = thompson_decider()
    c = ctx(temperature=0.7, max_tokens=400)
    before = marginal(d, c)
    assert len(before) == 5
    for i in range(400):
        # Automatic-only rewards, colder = cheaper (what a score blind to quality sees)
        x = decide(d, c, i)
        arm = x.sent.arm(x.baseline)
        asyncio.run(d.observe(x, Outcome(request_id=x.request_id, status=200, latency_s=0.1, completion_tokens=10, reward=1.0 - arm.temperature)))
    assert marginal(d, c) == pytest.approx(before)  # the temperature stage never saw them
    for i in range(400, 700):
        x = decide(d, c, i)
        arm = x.sent.arm(x.baseline)
        d.learn_signal(c, x.baseline, x.sent, 0.5 + arm.temperature / 2, None, logged_version=x.policy_version)  # a signal: hotter is better
    after = marginal(d, c)
    assert after[0.9] > 0.8 and after[0.5] < 0.05


def test_learn_signal_swaps_an_earlier_signal_without_counting_twice() -> None:
    d = thompson_decider()
    c = ctx(temperature=0.7, max_tokens=400)
    base = Params(temperature=0.7, max_tokens=400)
    sent = Params(temperature=0.9, max_tokens=300)
    policy = d.policy
    assert isinstance(policy, ThompsonGaussianPolicy)
    tctx, arm = temperature_context(c), temperature_arm(0.9, base.arm())
    assert d.learn_signal(c, base, sent, 0.4, None, logged_version=policy.version) == "updated"
    assert d.learn_signal(c, base, sent, 0.8, 0.4, logged_version=policy.version) == "corrected"
    post = policy.posterior(tctx, arm)
    assert post.n == 1.0
    assert policy.posterior(c, sent.arm(base)).n == 0.0  # the usual statistics are not touched
    assert tctx.task_type == "code~temperature" and arm.max_tokens == 400  # one arm per temperature, the baseline's cap
