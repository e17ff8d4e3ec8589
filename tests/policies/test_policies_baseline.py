"""baseline/uniform policies, the policy registry, and the reward."""

from __future__ import annotations

import ast

import numpy as np
import pytest

import policies.base
from policies.arms import candidate_arms
from policies.base import Policy
from policies.records import Arm, RequestContext
from policies.registry import POLICIES, make_policy
from policies.reward import BaselineCosts, compute_reward
from policies.settings import ArmGridSettings, LinUCBSettings, RewardSettings, ThompsonSettings

CTX = RequestContext("qa", "m", "chat", 10, 1, False, False, False, None, None)
BASE = Arm(0.7, 512)
ARMS = candidate_arms(BASE, max_delta_temperature=0.2, max_delta_max_tokens=500, grid=ArmGridSettings())


def test_make_policy_builds_every_name() -> None:
    assert list(POLICIES) == ["thompson_gaussian", "linucb", "baseline", "uniform"]
    for name in POLICIES:
        policy = make_policy(name)
        assert isinstance(policy, Policy)
        assert policy.name == name
        probs = policy.propensities(CTX, BASE, ARMS)
        assert probs.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        make_policy("greedy")


def test_registry_builds_with_each_policy_s_own_settings() -> None:
    """Each class reads its own settings section (the if-chain factory it replaces did the same)."""
    thompson = make_policy("thompson_gaussian", thompson=ThompsonSettings(min_propensity=0.03))
    linucb = make_policy("linucb", linucb=LinUCBSettings(min_propensity=0.02))
    assert thompson.settings == ThompsonSettings(min_propensity=0.03)
    assert linucb.settings == LinUCBSettings(min_propensity=0.02)


def test_base_imports_no_implementation() -> None:
    """The interface module knows no implementation, so base <-> implementation cannot cycle."""
    tree = ast.parse(open(policies.base.__file__, encoding="utf-8").read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert imported & {"policies.thompson", "policies.linucb", "policies.baseline", "policies.registry"} == set()
    assert "policies.records" in imported  # the walk does see the module's imports


def test_baseline_policy() -> None:
    policy = make_policy("baseline")
    shuffled = ARMS[5:] + ARMS[:5]
    choice = policy.choose(CTX, BASE, shuffled, np.random.default_rng(0))
    assert shuffled[choice.index] == BASE and choice.propensity == 1.0
    # baseline filtered out by the guards: closest allowed arm
    choice = policy.choose(CTX, BASE, [Arm(0.5, 512), Arm(0.7, 612), Arm(0.9, 12)], np.random.default_rng(0))
    assert choice.index == 1
    policy.update(CTX, BASE, BASE, 1.0)
    assert policy.snapshot() == {} and policy.export_delta() == {}
    assert policy.version == "baseline-0"


def test_uniform_policy_frequencies() -> None:
    policy = make_policy("uniform")
    rng = np.random.default_rng(1)
    counts = np.bincount([policy.choose(CTX, BASE, ARMS, rng).index for _ in range(25_000)], minlength=25)
    assert np.all(np.abs(counts / 25_000 - 0.04) < 4 * np.sqrt(0.04 * 0.96 / 25_000))
    assert policy.choose(CTX, BASE, ARMS, rng).propensity == pytest.approx(0.04)


def test_reward_by_hand() -> None:
    settings = RewardSettings()
    # 1.0·0.8 − 0.1·(3/2) − 0.01·(300/200) = 0.8 − 0.15 − 0.015
    assert compute_reward(
        quality=0.8, latency_s=3.0, tokens=300, baseline_latency_s=2.0, baseline_tokens=200, settings=settings
    ) == pytest.approx(0.635)
    # ratios are capped at max_ratio (10) and normalisers floored
    assert compute_reward(
        quality=1.0, latency_s=1000.0, tokens=0, baseline_latency_s=0.0, baseline_tokens=0, settings=settings
    ) == pytest.approx(1.0 - 0.1 * 10)


def test_cost_term_in_dollars_by_hand() -> None:
    settings = RewardSettings()
    # cost known on both sides: 1.0·0.8 − 0.1·(3/2) − 0.01·(0.003/0.002) = 0.8 − 0.15 − 0.015; the token counts no longer matter
    assert compute_reward(
        quality=0.8, latency_s=3.0, tokens=999, baseline_latency_s=2.0, baseline_tokens=200, settings=settings,
        cost_usd=0.003, baseline_cost_usd=0.002,
    ) == pytest.approx(0.635)
    # a setting that halves the spend is valued by what it saves: −0.01·0.5 instead of −0.01·1
    half = compute_reward(quality=1.0, latency_s=1.0, tokens=1, baseline_latency_s=1.0, baseline_tokens=1, settings=settings,
                          cost_usd=0.001, baseline_cost_usd=0.002)
    assert half == pytest.approx(1.0 - 0.1 - 0.005)
    # no baseline cost yet (or no price for this request): the token term stands
    assert compute_reward(quality=0.8, latency_s=3.0, tokens=300, baseline_latency_s=2.0, baseline_tokens=200, settings=settings,
                          cost_usd=0.003, baseline_cost_usd=None) == pytest.approx(0.635)


def test_baseline_cost_mean_needs_min_samples_priced() -> None:
    costs = BaselineCosts(min_samples=2)
    costs.observe("code", 1.0, 100, 0.002)
    costs.observe("code", 1.0, 100, None)  # unpriced: counts for latency and tokens, not for the cost mean
    assert costs.cost_usd("code") is None
    costs.observe("code", 1.0, 100, 0.004)
    assert costs.cost_usd("code") == pytest.approx(0.003)
    assert costs.totals["code"] == [3.0, 3.0, 300.0, 2.0, pytest.approx(0.006)]
    # the reward divides by that mean: 0.0015 / 0.003 = 0.5
    r = costs.reward(task_type="code", quality=1.0, latency_s=1.0, tokens=10_000, settings=RewardSettings(), cost_usd=0.0015)
    assert r == pytest.approx(1.0 - 0.1 - 0.01 * 0.5)


def test_baseline_costs_running_means_and_merge() -> None:
    costs = BaselineCosts(min_samples=2)
    assert costs.latency_s("code") == 1.0 and costs.tokens("code") == 256.0  # defaults
    costs.observe("code", 2.0, 100)
    assert costs.latency_s("code") == 1.0  # below min_samples
    costs.observe("code", 4.0, 300)
    assert costs.latency_s("code") == 3.0 and costs.tokens("code") == 200.0
    assert costs.latency_s("qa") == 3.0  # falls back to the pool of all tasks
    other = BaselineCosts(min_samples=2)
    other.observe("code", 6.0, 500)
    merged: dict[str, list[float]] = {}
    for part in (costs.export_delta(), other.export_delta()):
        for key, values in part.items():
            into = merged.setdefault(key, [0.0, 0.0, 0.0])
            for i in range(3):
                into[i] += values[i]
    costs.load_totals(merged)
    assert costs.latency_s("code") == pytest.approx(4.0)
    r = costs.reward(task_type="code", quality=1.0, latency_s=4.0, tokens=300, settings=RewardSettings())
    assert r == pytest.approx(1.0 - 0.1 - 0.01)


def test_costs_load_changed_keeps_other_tasks_and_local_increments() -> None:
    costs = BaselineCosts()
    costs.load_totals({"code": [2.0, 3.0, 40.0], "chat": [1.0, 1.0, 10.0]})
    costs.observe("code", 0.5, 7)
    costs.load_changed({"code": [3.0, 4.0, 50.0]})  # another replica added one observation
    assert costs.totals["chat"] == [1.0, 1.0, 10.0]
    assert costs.totals["code"] == [4.0, 4.5, 57.0, 0.0, 0.0]  # shared before dollars (3 components) + a local increment (5)
