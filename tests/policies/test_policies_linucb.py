"""LinUCB: ridge solution, exact propensities with a floor, replica merge."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from policies.arms import candidate_arms
from policies.context import numeric_features
from policies.linucb import DIMENSION, LinUCBPolicy, arm_features
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


def _same_task_ctx(rng: np.random.Generator, task: str = "code") -> RequestContext:
    return msgspec.structs.replace(_ctx(rng), task_type=task)


def test_matches_direct_ridge_solve_over_joint_features() -> None:
    """θ and the width are the ridge solution over φ = a(arm) ⊗ c(ctx), one model for all arms of a task."""
    settings = LinUCBSettings(regularization=0.5)
    policy = LinUCBPolicy(settings)
    rng = np.random.default_rng(0)
    rows, rewards = [], []
    for _ in range(300):
        ctx = _same_task_ctx(rng)
        arm = ARMS[int(rng.integers(len(ARMS)))]
        reward = float(rng.normal())
        policy.update(ctx, BASE, arm, reward)
        rows.append(np.kron(arm_features(arm), numeric_features(ctx)))
        rewards.append(reward)
    assert len(rows[0]) == DIMENSION == 56
    design = np.array(rows)
    a = 0.5 * np.eye(DIMENSION) + design.T @ design
    theta = np.linalg.solve(a, design.T @ np.array(rewards))
    probe = _same_task_ctx(rng)
    mean, width = policy.scores(probe, ARMS)
    for i, arm in enumerate(ARMS):
        phi = np.kron(arm_features(arm), numeric_features(probe))
        assert mean[i] == pytest.approx(float(theta @ phi), rel=1e-7, abs=1e-9)
        assert width[i] == pytest.approx(float(np.sqrt(phi @ np.linalg.solve(a, phi))), rel=1e-7)
    # another task type has its own model, still at the prior: θ = 0, A = λI
    other = _same_task_ctx(rng, "creative")
    mean_new, width_new = policy.scores(other, [ARMS[10]])
    phi = np.kron(arm_features(ARMS[10]), numeric_features(other))
    assert mean_new[0] == 0.0
    assert width_new[0] == pytest.approx(float(np.sqrt(phi @ phi / 0.5)))


def test_learns_a_known_linear_reward() -> None:
    """Rewards exactly w·φ (plus small noise): θ converges to w and the greedy arm is the true best."""
    rng = np.random.default_rng(11)
    w = rng.normal(size=DIMENSION)
    policy = LinUCBPolicy(LinUCBSettings(regularization=0.01))
    for _ in range(3000):
        ctx = _same_task_ctx(rng)
        arm = ARMS[int(rng.integers(len(ARMS)))]
        phi = np.kron(arm_features(arm), numeric_features(ctx))
        policy.update(ctx, BASE, arm, float(w @ phi + 0.01 * rng.normal()))
    for _ in range(5):
        probe = _same_task_ctx(rng)
        truth = np.array([w @ np.kron(arm_features(a), numeric_features(probe)) for a in ARMS])
        mean, _ = policy.scores(probe, ARMS)
        np.testing.assert_allclose(mean, truth, atol=0.02)
        assert int(np.argmax(mean)) == int(np.argmax(truth))


def test_an_unplayed_arm_between_two_good_ones_ranks_well() -> None:
    """Sharing between neighbouring arms: the reward peaks at t = 0.7; only 0.5 and 0.9 (and far arms) are
    played, yet the never-played 0.7 gets the highest estimate (the old per-arm models kept it at 0)."""
    rng = np.random.default_rng(12)
    policy = LinUCBPolicy()
    played = [Arm(t, 512) for t in (0.1, 0.3, 0.5, 0.9, 1.1, 1.3)]
    for _ in range(600):
        ctx = _same_task_ctx(rng)
        arm = played[int(rng.integers(len(played)))]
        policy.update(ctx, BASE, arm, 0.9 - (arm.temperature - 0.7) ** 2 + 0.02 * rng.normal())
    probe = _same_task_ctx(rng)
    candidates = [*played, Arm(0.7, 512)]
    mean, _ = policy.scores(probe, candidates)
    assert int(np.argmax(mean)) == len(candidates) - 1
    assert mean[-1] == pytest.approx(0.9, abs=0.03)
    ucb = policy.propensities(probe, BASE, candidates)
    assert int(np.argmax(ucb)) == len(candidates) - 1


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
    np.testing.assert_allclose(greedy.propensities(ctx, BASE, [ARMS[3]] * 4), [0.25] * 4)  # equal scores: tie
    assert greedy.propensities(ctx, BASE, ARMS[:4]).max() == 1.0
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
    assert set(left.export_delta()) == {f"j56|{ctx.task_type}|m|chat|G", f"j56|{ctx.task_type}|m|chat|b"}


def test_rejects_bad_input() -> None:
    policy = LinUCBPolicy()
    with pytest.raises(ValueError):
        policy.update(_ctx(np.random.default_rng(0)), BASE, ARMS[0], float("inf"))
    with pytest.raises(ValueError):
        LinUCBPolicy(LinUCBSettings(max_models=0))
    with pytest.raises(ValueError):
        policy.load_totals({"j56|code|m|chat|G": [1.0]})
    policy.load_totals({"d10|m|T0.7|M12|G": [1.0]})  # the old per-arm layout is not ours: ignored


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


def test_effort_levels_are_an_arm_feature_through_export_and_load() -> None:
    """Arms that differ only in reasoning effort get different estimates, and a replica loading the export agrees."""
    rng = np.random.default_rng(9)
    low, high = Arm(0.7, 512, "low"), Arm(0.7, 512, "high")
    policy = LinUCBPolicy()
    ctx = _ctx(rng)
    for _ in range(20):
        policy.update(ctx, low, low, 1.0)
        policy.update(ctx, low, high, 0.0)
    mean, _ = policy.scores(ctx, [low, high])
    assert mean[0] > 0.9 and mean[1] < 0.1
    exported = policy.export_delta()
    replica = LinUCBPolicy()
    replica.load_totals(exported)
    np.testing.assert_allclose(replica.scores(ctx, [low, high])[0], policy.scores(ctx, [low, high])[0], atol=1e-9)


def test_memory_is_bounded_by_max_models() -> None:
    policy = LinUCBPolicy(LinUCBSettings(max_models=3))
    rng = np.random.default_rng(5)
    for i in range(10):
        policy.update(_same_task_ctx(rng, f"task{i}"), BASE, ARMS[0], 0.5)
    assert len(policy.snapshot()) == 2 * 4  # three tasks and "other", G and b each
    assert policy.folded_buckets == 7
