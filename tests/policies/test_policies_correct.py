"""Delayed feedback replaces a reward: the state equals one that saw the new reward only."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policies.base import decay_factor, decay_statistics, statistics_version
from policies.linucb import LinUCBPolicy
from policies.records import Arm, RequestContext
from policies.registry import make_policy

CTX = RequestContext("code", "m", "chat", 120, 2, False, False, False, 0.7, 600)
BASE = Arm(0.7, 600)
ARM = Arm(0.8, 850)


@pytest.mark.parametrize("name", ["thompson_gaussian", "linucb"])
def test_correct_equals_seeing_the_new_reward(name: str) -> None:
    corrected = make_policy(name)
    direct = make_policy(name)
    for r in (0.2, 0.9, 0.4):
        corrected.update(CTX, BASE, ARM, r)
        direct.update(CTX, BASE, ARM, r)
    corrected.update(CTX, BASE, ARM, 0.1)
    direct.update(CTX, BASE, ARM, 0.75)
    assert corrected.correct(CTX, BASE, ARM, 0.1, 0.75, logged_version=corrected.version) == "corrected"
    a, b = corrected.snapshot(), direct.snapshot()
    assert a.keys() == b.keys()
    for key in a:
        assert np.allclose(a[key], b[key])
    # the correction travels to other replicas like any other increment
    replica = make_policy(name)
    merged: dict[str, list[float]] = {}
    for key, values in corrected.export_delta().items():
        merged[key] = list(values)
    replica.load_totals(merged)
    for key, values in replica.snapshot().items():
        assert np.allclose(values, b[key])


def _same(a: dict[str, list[float]], b: dict[str, list[float]]) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["thompson_gaussian", "linucb"])
def test_correct_on_a_key_never_updated_adds_the_new_reward_once(name: str) -> None:
    """After a restart without Redis the key is empty: swapping would leave n = 0 with Σr != 0."""
    policy, direct = make_policy(name), make_policy(name)
    assert policy.correct(CTX, BASE, ARM, 0.9, 0.1, logged_version=policy.version) == "updated"
    direct.update(CTX, BASE, ARM, 0.1)
    assert _same(policy.snapshot(), direct.snapshot())


def test_a_correction_into_an_empty_key_no_longer_captures_thompson_traffic() -> None:
    """The defect's numbers: other arms trained, then a correction on the empty key."""
    policy = make_policy("thompson_gaussian")
    arms = [BASE, ARM, Arm(0.6, 600)]
    rng = np.random.default_rng(0)
    for _ in range(200):
        for arm in (BASE, arms[2]):
            policy.update(CTX, BASE, arm, float(0.6 + 0.05 * rng.standard_normal()))
    policy.correct(CTX, BASE, ARM, 0.1, 0.9, logged_version=policy.version)
    probs = policy.propensities(CTX, BASE, arms)
    # old code: Σr = 0.8 with n = 0 -> posterior mean ≈ 1.27, sd ≈ 0.0002, propensity 1.0
    assert probs[1] < 0.9
    assert policy.snapshot()[next(k for k in policy.snapshot() if k.endswith("T0.8|M850"))] == pytest.approx([1.0, 0.9, 0.81])


def test_linucb_correction_into_an_empty_key_does_not_move_theta_by_one_over_lambda() -> None:
    policy = LinUCBPolicy()
    rng = np.random.default_rng(1)
    arms = [BASE, ARM, Arm(0.6, 600)]
    for _ in range(100):
        for arm in (BASE, arms[2]):
            policy.update(CTX, BASE, arm, float(0.6 + 0.05 * rng.standard_normal()))
    policy.correct(CTX, BASE, ARM, 0.1, 0.9, logged_version=policy.version)
    # old code: b = 0.8·x with A = λI -> θ·x = 0.8·|x|²/0.01 ≈ 250 and 98.8 % of the traffic.
    # The joint model's estimate at ARM comes from its neighbours' data, so the swap moves it by
    # 0.8·φᵀA⁻¹φ only: it stays between what the neighbours earn and the new reward.
    mean, _ = policy.scores(CTX, arms)
    assert 0.6 < mean[1] <= 0.9


def test_linucb_correction_where_the_reward_cannot_be_is_an_update() -> None:
    """A model with data elsewhere only: φᵀA⁻¹φ at a far arm exceeds what G ⪰ φφᵀ allows, so the
    correction is added once as a reward (n ≥ 1 for the joint model), never swapped in."""
    policy = LinUCBPolicy()
    far = Arm(1.9, 4000, "high")
    for _ in range(3):
        policy.update(CTX, BASE, BASE, 0.6)
    assert policy.correct(CTX, BASE, far, 0.1, 0.9, logged_version=policy.version) == "updated"
    assert policy.correct(CTX, BASE, far, 0.9, 0.5, logged_version=policy.version) == "corrected"


@pytest.mark.parametrize("name", ["thompson_gaussian", "linucb"])
def test_correction_logged_under_other_statistics_is_skipped(name: str) -> None:
    policy = make_policy(name)
    policy.lineage = "family2"  # type: ignore[attr-defined]
    policy.update(CTX, BASE, ARM, 0.4)
    before = policy.snapshot()
    version = policy.version
    assert version.startswith(f"{name}.family2-")
    # a policy_family bump, a restart under a new lineage, a policy switch
    for logged in (f"{name}.family1-7", f"{name}-7", "linucb-3" if name != "linucb" else "thompson_gaussian-3"):
        assert policy.correct(CTX, BASE, ARM, 0.4, 0.9, logged_version=logged) == "skipped"
    assert _same(policy.snapshot(), before) and policy.version == version
    assert policy.correct(CTX, BASE, ARM, 0.4, 0.9, logged_version=f"{name}.family2-0") == "corrected"


def test_thompson_skips_a_swap_that_would_make_the_spread_negative() -> None:
    """n >= 1 but the old reward is not in the statistics (same lineage, fresh state)."""
    policy = make_policy("thompson_gaussian")
    policy.update(CTX, BASE, ARM, 0.5)
    before = policy.snapshot()
    # old code: Σr² = 0.25 + 0.01 − 0.81 < 0 with n = 1
    assert policy.correct(CTX, BASE, ARM, 0.9, 0.1, logged_version=policy.version) == "skipped"
    assert _same(policy.snapshot(), before)


def test_statistics_version_and_decay() -> None:
    assert statistics_version("thompson_gaussian.f-2.boot-1234") == "thompson_gaussian.f-2.boot"
    assert statistics_version("linucb-0") == "linucb"
    assert decay_factor(600.0, 600.0) == pytest.approx(0.5)
    assert decay_factor(600.0, 0.0) == 1.0 and decay_factor(math.inf, 5.0) == 1.0
    with pytest.raises(ValueError):
        decay_factor(0.0, 1.0)
    # decaying replicas then merging equals merging then decaying (merges stay additive)
    left, right = make_policy("thompson_gaussian"), make_policy("thompson_gaussian")
    for r in (0.2, 0.6):
        left.update(CTX, BASE, ARM, r)
    right.update(CTX, BASE, ARM, 1.0)
    right.update(CTX, BASE, BASE, 0.3)
    a, b = left.snapshot(), right.snapshot()
    merged = {k: [x + y for x, y in zip(a.get(k, [0.0] * 3), b.get(k, [0.0] * 3))] for k in a.keys() | b.keys()}
    gamma = decay_factor(60.0, 30.0)
    da, db = decay_statistics(a, gamma, 3), decay_statistics(b, gamma, 3)
    for key, values in decay_statistics(merged, gamma, 3).items():
        assert np.allclose(values, np.add(da.get(key, [0.0] * 3), db.get(key, [0.0] * 3)))
    # n, Σr, Σr² of ARM: (3, 1.8, 1.4) -> · 0.5^1.5; the mean Σr/n stays 0.6
    key = next(k for k in merged if k.endswith("T0.8|M850"))
    assert decay_statistics(merged, gamma, 3)[key] == pytest.approx(np.array([3.0, 1.8, 1.4]) * 0.5**1.5)
    assert merged[key] == pytest.approx([3.0, 1.8, 1.4])  # input untouched
