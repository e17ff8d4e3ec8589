"""LinUCB: ridge solution, exact propensities with a floor, replica merge."""

from __future__ import annotations

import numpy as np
import pytest

from policies.arms import candidate_arms
from policies.context import feature_vector
from policies.linucb import LinUCBPolicy
from policies.records import Arm, RequestContext
from policies.settings import ArmGridSettings, LinUCBSettings

BASE = Arm(0.7, 512)
ARMS = candidate_arms(BASE, max_delta_temperature=0.2, max_delta_max_tokens=500, grid=ArmGridSettings())
TASKS = ("code", "creative", "summarise", "default", "qa")


def _ctx(rng: np.random.Generator) -> RequestContext:
    return RequestContext(
        task_type=TASKS[int(rng.integers(len(TASKS)))],
        model="m",
        endpoint="chat",
        prompt_tokens_est=int(rng.integers(1, 5000)),
        message_count=int(rng.integers(1, 10)),
        has_tools=bool(rng.random() < 0.3),
        json_mode=bool(rng.random() < 0.3),
        stream=bool(rng.random() < 0.5),
        client_temperature=float(rng.random()),
        client_max_tokens=512,
    )


def test_matches_direct_ridge_solve() -> None:
    settings = LinUCBSettings(regularization=0.5, feature_dimension=12)
    policy = LinUCBPolicy(settings)
    rng = np.random.default_rng(0)
    xs: dict[int, list[np.ndarray]] = {}
    rs: dict[int, list[float]] = {}
    contexts = []
    for _ in range(300):
        ctx = _ctx(rng)
        contexts.append(ctx)
        i = int(rng.integers(3))
        reward = float(rng.normal())
        policy.update(ctx, BASE, ARMS[i], reward)
        xs.setdefault(i, []).append(feature_vector(ctx, 12))
        rs.setdefault(i, []).append(reward)
    probe = contexts[-1]
    x = feature_vector(probe, 12)
    mean, width = policy.scores(probe, ARMS[:3])
    for i in range(3):
        design = np.array(xs[i])
        a = 0.5 * np.eye(12) + design.T @ design
        theta = np.linalg.solve(a, design.T @ np.array(rs[i]))
        assert mean[i] == pytest.approx(float(theta @ x), rel=1e-8, abs=1e-10)
        assert width[i] == pytest.approx(float(np.sqrt(x @ np.linalg.solve(a, x))), rel=1e-8)
    # an arm never updated uses the prior: θ = 0, A = λI
    mean_new, width_new = policy.scores(probe, [ARMS[10]])
    assert mean_new[0] == 0.0
    assert width_new[0] == pytest.approx(float(np.sqrt(x @ x / 0.5)))


def test_arm_features_change_the_estimate() -> None:
    policy = LinUCBPolicy()
    ctx = _ctx(np.random.default_rng(1))
    for _ in range(20):
        policy.update(ctx, BASE, ARMS[1], 1.0)
        policy.update(ctx, BASE, ARMS[2], 0.0)
    mean, _ = policy.scores(ctx, ARMS[1:3])
    assert mean[0] > 0.9 and mean[1] < 0.1


def test_propensities_exact_floor_and_frequencies() -> None:
    policy = LinUCBPolicy(LinUCBSettings(min_propensity=0.01, exploration_factor=0.05))
    rng = np.random.default_rng(2)
    for _ in range(200):
        policy.update(_ctx(rng), BASE, ARMS[int(rng.integers(25))], float(rng.random()))
    ctx = _ctx(rng)
    probs = policy.propensities(ctx, BASE, ARMS)
    assert probs.sum() == pytest.approx(1.0)
    assert probs.min() >= 0.01 - 1e-12
    # by hand: floor + (1 − K·floor)·softmax(ucb/τ)
    mean, width = policy.scores(ctx, ARMS)
    ucb = mean + policy.settings.alpha * width
    soft = np.exp((ucb - ucb.max()) / 0.05)
    np.testing.assert_allclose(probs, 0.01 + 0.75 * soft / soft.sum())
    draws = 20_000
    counts = np.zeros(25)
    pick_rng = np.random.default_rng(9)
    for _ in range(draws):
        choice = policy.choose(ctx, BASE, ARMS, pick_rng)
        assert choice.propensity == pytest.approx(probs[choice.index])
        counts[choice.index] += 1
    se = np.sqrt(probs * (1 - probs) / draws)
    assert np.all(np.abs(counts / draws - probs) <= 4 * se + 1e-9)


def test_argmax_mode_splits_ties_and_uniform_when_floor_too_high() -> None:
    ctx = _ctx(np.random.default_rng(3))
    greedy = LinUCBPolicy(LinUCBSettings(exploration_factor=0.0, min_propensity=0.0))
    np.testing.assert_allclose(greedy.propensities(ctx, BASE, ARMS[:4]), [0.25] * 4)  # all at the prior: tie
    floor = LinUCBPolicy(LinUCBSettings(min_propensity=0.5))
    np.testing.assert_allclose(floor.propensities(ctx, BASE, ARMS[:4]), [0.25] * 4)


def test_merge_of_two_replicas_equals_one_replica() -> None:
    rng = np.random.default_rng(4)
    single, left, right = LinUCBPolicy(), LinUCBPolicy(), LinUCBPolicy()
    for i in range(300):
        ctx, arm, reward = _ctx(rng), ARMS[int(rng.integers(6))], float(rng.random())
        single.update(ctx, BASE, arm, reward)
        (left if i % 2 else right).update(ctx, BASE, arm, reward)
    totals: dict[str, list[float]] = {}
    for replica in (left, right):
        for key, values in replica.export_delta().items():
            into = totals.setdefault(key, [0.0] * len(values))
            for j, v in enumerate(values):
                into[j] += v
    ctx = _ctx(rng)
    left.update(ctx, BASE, ARMS[7], 0.5)  # unexported: must survive the load
    single.update(ctx, BASE, ARMS[7], 0.5)
    left.load_totals(totals)
    ref, got = single.snapshot(), left.snapshot()
    assert ref.keys() == got.keys()
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], atol=1e-9)
    probe = _ctx(rng)
    np.testing.assert_allclose(left.propensities(probe, BASE, ARMS), single.propensities(probe, BASE, ARMS), atol=1e-9)
    assert set(left.export_delta()) == {"d10|m|T0.6|M262|G", "d10|m|T0.6|M262|b"}


def test_rejects_bad_input() -> None:
    policy = LinUCBPolicy()
    with pytest.raises(ValueError):
        policy.update(_ctx(np.random.default_rng(0)), BASE, ARMS[0], float("inf"))
    with pytest.raises(ValueError):
        LinUCBPolicy(LinUCBSettings(feature_dimension=4))
    with pytest.raises(ValueError):
        policy.load_totals({"d10|m|T0.7|M12|G": [1.0]})


def test_load_changed_matches_a_full_load() -> None:
    rng = np.random.default_rng(6)
    remote, local, full = LinUCBPolicy(), LinUCBPolicy(), LinUCBPolicy()
    for _ in range(100):
        remote.update(_ctx(rng), BASE, ARMS[int(rng.integers(6))], float(rng.random()))
    local.load_totals(remote.snapshot())
    before = remote.snapshot()
    remote.update(_ctx(rng), BASE, ARMS[2], 0.8)
    ctx = _ctx(rng)
    local.update(ctx, BASE, ARMS[2], 0.3)  # unexported: kept on top of the new totals
    full.update(ctx, BASE, ARMS[2], 0.3)
    after = remote.snapshot()
    local.load_changed({k: v for k, v in after.items() if before.get(k) != v})
    full.load_totals(after)
    for key, values in full.snapshot().items():
        np.testing.assert_allclose(local.snapshot()[key], values, atol=1e-9)
    probe = _ctx(rng)
    np.testing.assert_allclose(local.propensities(probe, BASE, ARMS), full.propensities(probe, BASE, ARMS), atol=1e-9)


def test_effort_levels_keep_separate_statistics_through_export_and_load() -> None:
    """Arms that differ only in reasoning effort must not share a row (nor an exported key)."""
    rng = np.random.default_rng(9)
    low, high = Arm(0.7, 512, "low"), Arm(0.7, 512, "high")
    policy = LinUCBPolicy()
    ctx = _ctx(rng)
    for _ in range(20):
        policy.update(ctx, low, low, 1.0)
        policy.update(ctx, low, high, 0.0)
    mean, _ = policy.scores(ctx, [low, high, BASE])
    assert mean[0] > mean[1] and mean[2] == 0.0
    exported = policy.export_delta()
    assert {"d10|m@low|T0.7|M512|G", "d10|m@high|T0.7|M512|b"} <= set(exported)
    replica = LinUCBPolicy()
    replica.load_totals(exported)
    np.testing.assert_allclose(replica.scores(ctx, [low, high])[0], policy.scores(ctx, [low, high])[0], atol=1e-9)
