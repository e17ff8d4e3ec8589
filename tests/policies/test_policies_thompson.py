"""Thompson sampling: closed-form posteriors, exact propensities, replica merge."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policies.arms import candidate_arms
from policies.base import apply_floor
from policies.records import Arm, RequestContext
from policies.registry import make_policy
from policies.settings import ArmGridSettings, ThompsonSettings
from policies.thompson import ThompsonGaussianPolicy

CTX = RequestContext("code", "m", "chat", 100, 2, False, False, False, 0.7, 512)
OTHER = RequestContext("creative", "m", "chat", 100, 2, False, False, False, 0.7, 512)
BASE = Arm(0.7, 512)
ARMS = candidate_arms(BASE, max_delta_temperature=0.2, max_delta_max_tokens=500, grid=ArmGridSettings())


def test_posterior_closed_form_by_hand() -> None:
    s = ThompsonSettings(prior_mean=0.0, prior_precision=1.0, prior_alpha=1.0, prior_beta=0.05, exploration_factor=0.0)
    policy = ThompsonGaussianPolicy(s)
    policy.update(CTX, BASE, ARMS[1], 1.0)
    policy.update(CTX, BASE, ARMS[1], 0.5)
    # No other arm has data: m0 = prior_mean = 0.  n=2, Σr=1.5, Σr²=1.25
    # κn=3, μn=0.5, αn=2, βn = 0.05 + ½(1.25 − 3·0.25) = 0.3, sd = sqrt(0.3/(2·3))
    post = policy.posterior(CTX, ARMS[1])
    assert post.n == 2
    assert post.mean == pytest.approx(0.5)
    assert post.sd == pytest.approx(math.sqrt(0.05))
    assert post.noise_sd == pytest.approx(math.sqrt(0.15))
    # Arm 2 has no data; its prior mean is the other arms' mean shrunk to 0:
    # m0 = (1·0 + 1.5)/(1 + 2) = 0.5, κ=1, α=1, β = 0.05 + ½(0 + 0.25 − 0.25) = 0.05
    empty = policy.posterior(CTX, ARMS[2])
    assert empty.mean == pytest.approx(0.5)
    assert empty.sd == pytest.approx(math.sqrt(0.05))
    # exploration_factor scales the spread by (1 + f)
    wide = ThompsonGaussianPolicy(ThompsonSettings(exploration_factor=0.5, prior_beta=0.05))
    wide.load_totals(policy.snapshot())
    assert wide.posterior(CTX, ARMS[1]).sd == pytest.approx(1.5 * math.sqrt(0.05))


def test_buckets_and_absolute_arm_keys() -> None:
    policy = ThompsonGaussianPolicy()
    policy.update(CTX, BASE, Arm(0.6, 762), 0.9)
    # another client baseline, same absolute arm, same bucket: shared statistics
    assert policy.posterior(CTX, Arm(0.6000001, 762)).n == 1
    assert policy.posterior(OTHER, Arm(0.6, 762)).n == 0
    assert policy.version == "thompson_gaussian-1"


def _trained(seed: int = 0, n: int = 300) -> ThompsonGaussianPolicy:
    policy = ThompsonGaussianPolicy(ThompsonSettings(refresh_every=1))
    rng = np.random.default_rng(seed)
    means = np.linspace(0.4, 0.7, len(ARMS))
    for _ in range(n):
        i = int(rng.integers(len(ARMS)))
        policy.update(CTX, BASE, ARMS[i], float(means[i] + 0.2 * rng.standard_normal()))
    return policy


def test_propensities_sum_to_one_and_match_selection_frequencies() -> None:
    policy = _trained()
    probs = policy.propensities(CTX, BASE, ARMS)
    assert probs.sum() == pytest.approx(1.0)
    rng = np.random.default_rng(7)
    draws = 20_000
    counts = np.zeros(len(ARMS))
    for _ in range(draws):
        choice = policy.choose(CTX, BASE, ARMS, rng)
        assert choice.propensity == probs[choice.index]
        counts[choice.index] += 1
    se = np.sqrt(probs * (1 - probs) / draws)
    assert np.all(np.abs(counts / draws - probs) <= 4 * se + 1e-9)


def test_propensity_is_the_posterior_win_probability() -> None:
    """Against an independent Monte Carlo with fresh draws: within 3 standard errors of 0.01.

    The played propensity is the win probability with the floor mixed in (apply_floor).
    """
    policy = _trained()
    probs = policy.propensities(CTX, BASE, ARMS)
    posts = [policy.posterior(CTX, a) for a in ARMS]
    mean = np.array([p.mean for p in posts])
    sd = np.array([p.sd for p in posts])
    rng = np.random.default_rng(123)
    wins = np.bincount(np.argmax(mean + sd * rng.standard_normal((200_000, len(ARMS))), axis=1), minlength=len(ARMS))
    expected = apply_floor(wins / 200_000, policy.settings.min_propensity)
    assert np.max(np.abs(expected - probs)) < 0.03


def test_choices_are_reproducible_and_only_among_given_arms() -> None:
    a, b = _trained(), _trained()
    subset = ARMS[3:7]
    picks_a = [a.choose(CTX, BASE, subset, np.random.default_rng(5)).index for _ in range(3)]
    picks_b = [b.choose(CTX, BASE, subset, np.random.default_rng(5)).index for _ in range(3)]
    assert picks_a == picks_b
    assert all(0 <= i < len(subset) for i in picks_a)
    single = a.choose(CTX, BASE, [ARMS[4]], np.random.default_rng(0))
    assert single.index == 0 and single.propensity == 1.0


def test_merge_of_two_replicas_equals_one_replica() -> None:
    rng = np.random.default_rng(3)
    events = [(CTX if rng.random() < 0.5 else OTHER, ARMS[int(rng.integers(25))], float(rng.random())) for _ in range(400)]
    single = ThompsonGaussianPolicy()
    left, right = ThompsonGaussianPolicy(), ThompsonGaussianPolicy()
    for i, (ctx, arm, reward) in enumerate(events):
        single.update(ctx, BASE, arm, reward)
        (left if i % 2 else right).update(ctx, BASE, arm, reward)
    totals: dict[str, list[float]] = {}
    for replica in (left, right):
        for key, values in replica.export_delta().items():
            into = totals.setdefault(key, [0.0] * len(values))
            for j, v in enumerate(values):
                into[j] += v
    assert left.export_delta() == {}  # reset after export
    # one more local, unexported update survives load_totals
    left.update(CTX, BASE, ARMS[0], 0.25)
    single.update(CTX, BASE, ARMS[0], 0.25)
    left.load_totals(totals)
    ref = single.snapshot()
    got = left.snapshot()
    assert ref.keys() == got.keys()
    for key in ref:
        assert np.allclose(ref[key], got[key])
    np.testing.assert_allclose(left.propensities(CTX, BASE, ARMS), single.propensities(CTX, BASE, ARMS))
    assert left.export_delta() == {"code|m|chat|p0|j0|t0|T0.7|M512": [1.0, 0.25, 0.0625]}


def test_bad_inputs() -> None:
    policy = make_policy("thompson_gaussian")
    with pytest.raises(ValueError):
        policy.update(CTX, BASE, ARMS[0], float("nan"))
    with pytest.raises(ValueError):
        policy.choose(CTX, BASE, [], np.random.default_rng(0))
    with pytest.raises(ValueError):
        policy.load_totals({"x|T0.5|M10": [1.0, 2.0]})


def test_deferred_refresh_plays_the_previous_table_until_refreshed() -> None:
    policy = make_policy("thompson_gaussian")
    policy.deferred_refresh = True  # type: ignore[attr-defined]
    ctx = RequestContext("code", "m", "chat", 100, 1, False, False, False, 0.7, 500)
    base = Arm(0.7, 500)
    arms = [base, Arm(0.5, 500), Arm(0.9, 500)]
    before = policy.propensities(ctx, base, arms)
    for _ in range(50):
        policy.update(ctx, base, arms[2], 1.0)
        policy.update(ctx, base, arms[0], 0.0)
    assert np.array_equal(policy.propensities(ctx, base, arms), before)  # stale table still played
    assert policy.refresh_stale() == 1  # type: ignore[attr-defined]
    after = policy.propensities(ctx, base, arms)
    assert after[2] > 0.9 and abs(after.sum() - 1.0) < 1e-9


def test_settle_rebuilds_outgrown_tables_nobody_has_read_yet() -> None:
    policy = make_policy("thompson_gaussian")
    fresh = make_policy("thompson_gaussian")
    policy.deferred_refresh = True  # type: ignore[attr-defined]
    ctx = RequestContext("code", "m", "chat", 100, 1, False, False, False, 0.7, 500)
    base = Arm(0.7, 500)
    arms = [base, Arm(0.5, 500), Arm(0.9, 500)]
    before = policy.propensities(ctx, base, arms)
    for p in (policy, fresh):
        for _ in range(50):
            p.update(ctx, base, arms[2], 1.0)
            p.update(ctx, base, arms[0], 0.0)
    assert policy.settle() == 1  # type: ignore[attr-defined]  (no read marked it stale first)
    assert not np.array_equal(policy.propensities(ctx, base, arms), before)
    assert np.array_equal(policy.propensities(ctx, base, arms), fresh.propensities(ctx, base, arms))
    assert policy.settle() == 0  # type: ignore[attr-defined]


def test_load_changed_matches_a_full_load_and_marks_only_changed_buckets_stale() -> None:
    rng = np.random.default_rng(5)
    remote = ThompsonGaussianPolicy()  # stands for the merged totals in Redis
    for _ in range(200):
        remote.update(CTX if rng.random() < 0.5 else OTHER, BASE, ARMS[int(rng.integers(25))], float(rng.random()))
    local = ThompsonGaussianPolicy()
    local.load_totals(remote.snapshot())
    local.propensities(CTX, BASE, ARMS)
    other_table = local._table(OTHER, ARMS)
    # another replica adds rewards to CTX's bucket only; this replica has one unexported update there too
    remote.update(CTX, BASE, ARMS[3], 0.9)
    remote.update(CTX, BASE, ARMS[4], 0.1)
    local.update(CTX, BASE, ARMS[0], 0.5)
    changed = {k: v for k, v in remote.snapshot().items() if k.startswith("code|")}
    local.load_changed(changed)
    full = ThompsonGaussianPolicy()
    full.update(CTX, BASE, ARMS[0], 0.5)
    full.load_totals(remote.snapshot())
    assert local.snapshot().keys() == full.snapshot().keys()
    for key, values in full.snapshot().items():
        np.testing.assert_allclose(local.snapshot()[key], values)
    np.testing.assert_allclose(local.propensities(CTX, BASE, ARMS), full.propensities(CTX, BASE, ARMS))
    assert local._table(OTHER, ARMS) is other_table  # untouched bucket: its table is still current


def test_buckets_past_max_buckets_pool_into_other() -> None:
    policy = ThompsonGaussianPolicy(ThompsonSettings(max_buckets=2))
    contexts = [RequestContext(f"task-{i}", "m", "chat", 100, 2, False, False, False, 0.7, 512) for i in range(5)]
    for ctx in contexts:
        policy.update(ctx, BASE, ARMS[0], 1.0)
    buckets = {key.rsplit("|", 2)[0] for key in policy.snapshot()}
    assert buckets == {"task-0|m|chat|p0|j0|t0", "task-1|m|chat|p0|j0|t0", "other"}
    assert policy.posterior(contexts[4], ARMS[0]).n == 3  # tasks 2, 3 and 4 share "other"
    assert policy.posterior(contexts[0], ARMS[0]).n == 1
    assert policy.folded_buckets == 4
def test_converged_bucket_keeps_the_propensity_floor() -> None:
    """Before the floor a converged bucket logged [1, 0, 0]: no support for OPE of any other arm."""
    policy = ThompsonGaussianPolicy(ThompsonSettings(refresh_every=1, min_propensity=0.01))
    arms = [BASE, Arm(0.5, 512), Arm(0.9, 512)]
    for _ in range(300):
        policy.update(CTX, BASE, arms[2], 1.0)
        policy.update(CTX, BASE, arms[0], 0.0)
        policy.update(CTX, BASE, arms[1], 0.0)
    probs = policy.propensities(CTX, BASE, arms)
    np.testing.assert_allclose(probs, [0.01, 0.01, 0.98])  # floor + (1 − 3·0.01)·[0, 0, 1]
    rng = np.random.default_rng(11)
    counts = np.bincount([policy.choose(CTX, BASE, arms, rng).index for _ in range(20_000)], minlength=3)
    assert counts.min() > 0
    se = np.sqrt(probs * (1 - probs) / 20_000)
    assert np.all(np.abs(counts / 20_000 - probs) <= 4 * se)
    off = ThompsonGaussianPolicy(ThompsonSettings(refresh_every=1, min_propensity=0.0))
    off.load_totals(policy.snapshot())
    np.testing.assert_allclose(off.propensities(CTX, BASE, arms), [0.0, 0.0, 1.0])
    # a floor of 1/K or more is uniform
    wide = ThompsonGaussianPolicy(ThompsonSettings(min_propensity=0.5))
    wide.load_totals(policy.snapshot())
    np.testing.assert_allclose(wide.propensities(CTX, BASE, arms), [1 / 3] * 3)
    assert {wide.choose(CTX, BASE, arms, rng).index for _ in range(200)} == {0, 1, 2}


def test_min_propensity_is_validated_at_start_up() -> None:
    from proxy.config import ConfigError, build_config

    assert build_config({}).policy.thompson.min_propensity == 0.002
    with pytest.raises(ConfigError, match="policy.thompson.min_propensity"):
        build_config({"policy": {"thompson": {"min_propensity": 1.5}}})
    with pytest.raises(ValueError):
        ThompsonGaussianPolicy(ThompsonSettings(min_propensity=-0.1))
