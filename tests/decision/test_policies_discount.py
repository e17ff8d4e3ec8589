"""Discounting (`[policy] half_life_s`), reopening a task, and statistics kept per upstream model."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import numpy as np
import pytest

from policies.base import Adaptive, Discount, version_epoch
from policies.linucb import LinUCBPolicy
from policies.records import Arm, RequestContext
from policies.registry import make_policy
from policies.thompson import ThompsonGaussianPolicy
from proxy.config import Config, ConfigError
from proxy.runtime import Runtime
from tests.conftest import make_config

CTX = RequestContext("code", "m", "chat", 120, 2, False, False, False, 0.7, 600, "up1")
BASE = Arm(0.7, 600)
ARM = Arm(0.8, 850)
HOUR = 3600.0


def _add(*deltas: dict[str, list[float]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for delta in deltas:
        for key, values in delta.items():
            into = out.setdefault(key, [0.0] * len(values))
            for i, v in enumerate(values):
                into[i] += v
    return out


def test_discount_epochs_by_hand() -> None:
    d = Discount(16 * HOUR)  # epoch = 1 h, γ = 2^(-1/16)
    assert d.epoch_s == HOUR and d.gamma == pytest.approx(0.957603280698574)
    assert d.epoch_at(0.0) == 0 and d.epoch_at(HOUR - 1e-6) == 0 and d.epoch_at(5.5 * HOUR) == 5
    assert d.factor(16) == pytest.approx(0.5) and d.factor(0) == 1.0 and d.factor(-3) == 1.0
    off = Discount()
    assert not off.enabled and off.gamma == 1.0 and off.epoch_at(1e12) == 0 and off.factor(100) == 1.0
    with pytest.raises(ValueError):
        Discount(0.0)
    assert version_epoch("thompson_gaussian.f~r2-17e5") == 5 and version_epoch("linucb-3") == 0


def test_thompson_discount_by_hand() -> None:
    """Rewards 0.2 and 0.6 at epoch 0, 1.0 at epoch 16 (one half-life later):
    n = 0.5·2 + 1 = 2, Σr = 0.5·0.8 + 1 = 1.4, Σr² = 0.5·0.4 + 1 = 1.2."""
    policy = ThompsonGaussianPolicy(discount=Discount(16 * HOUR))
    assert isinstance(policy, Adaptive)
    for r in (0.2, 0.6):
        policy.update(CTX, BASE, ARM, r)
    policy.advance(16)
    policy.advance(3)  # going back does nothing
    policy.update(CTX, BASE, ARM, 1.0)
    (n, total, total_sq), = [v for k, v in policy.snapshot().items() if not k.startswith("~")]
    assert (n, total, total_sq) == pytest.approx((2.0, 1.4, 1.2))
    post = policy.posterior(CTX, ARM)
    assert post.n == pytest.approx(2.0) and post.mean == pytest.approx(1.4 / 3.0)  # κ0 = 1, m0 = prior_mean 0
    assert policy.snapshot()["~epoch"] == [16.0, 0.0, 0.0]
    assert policy.version.endswith("e16")


def test_linucb_discount_by_hand() -> None:
    """G and b halve after a half-life: A = λI + G/2, θ = A⁻¹ b/2 (checked against a direct solve)."""
    policy = LinUCBPolicy(discount=Discount(16 * HOUR))
    rng = np.random.default_rng(0)
    arms = [Arm(0.2 + 0.2 * i, 300 + 100 * i) for i in range(6)]
    for _ in range(40):
        policy.update(CTX, BASE, arms[int(rng.integers(6))], float(rng.random()))
    before = policy.snapshot()
    policy.advance(16)
    after = policy.snapshot()
    for key, values in before.items():
        if not key.startswith("~"):
            np.testing.assert_allclose(after[key], 0.5 * np.asarray(values), rtol=1e-12)
    g_key = next(k for k in after if k.endswith("|G"))
    gram = np.asarray(after[g_key]).reshape(56, 56)
    b = np.asarray(after[g_key[:-1] + "b"])
    theta = np.linalg.solve(0.01 * np.eye(56) + gram, b)
    from policies.context import numeric_features
    from policies.linucb import arm_features

    phi = np.kron(arm_features(ARM), numeric_features(CTX))
    assert policy.scores(CTX, [ARM])[0][0] == pytest.approx(float(theta @ phi), rel=1e-8)


@pytest.mark.parametrize("name", ["thompson_gaussian", "linucb"])
def test_decayed_replicas_merge_additively(name: str) -> None:
    """Two replicas decay their unexported increments at the same epoch boundary; the store decays its
    totals there too (sync.py): merged = one replica that saw everything, decayed."""
    single, left, right = (make_policy(name, half_life_s=16 * HOUR) for _ in range(3))
    rng = np.random.default_rng(3)
    store: dict[str, list[float]] = {}
    for epoch in range(3):
        for p in (single, left, right):
            p.advance(epoch)  # type: ignore[attr-defined]
        gamma = Discount(16 * HOUR).factor(1) if epoch else 1.0
        store = {k: [v * gamma if not k.startswith("~") else v for v in vs] for k, vs in store.items()}
        for i in range(20):
            arm = Arm(0.5 + 0.1 * int(rng.integers(4)), 600)
            r = float(rng.random())
            single.update(CTX, BASE, arm, r)
            (left if i % 2 else right).update(CTX, BASE, arm, r)
        store = _add(store, left.export_delta(), right.export_delta())
    left.load_totals(store)
    ref, got = single.snapshot(), left.snapshot()
    assert ref.keys() == got.keys()
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["thompson_gaussian", "linucb"])
def test_correction_is_scaled_like_the_reward_it_replaces(name: str) -> None:
    """A reward folded in at epoch 0 weighs γ^16 = 0.5 at epoch 16: its correction moves the stats by half."""
    policy = make_policy(name, half_life_s=16 * HOUR)
    twin = make_policy(name, half_life_s=16 * HOUR)
    for p in (policy, twin):
        for _ in range(5):
            p.update(CTX, BASE, ARM, 0.5)
    policy.update(CTX, BASE, ARM, 0.1)
    twin.update(CTX, BASE, ARM, 0.9)
    logged = policy.version
    for p in (policy, twin):
        p.advance(16)  # type: ignore[attr-defined]
    assert policy.correct(CTX, BASE, ARM, 0.1, 0.9, logged_version=logged) == "corrected"
    ref = twin.snapshot()
    for key, values in policy.snapshot().items():
        np.testing.assert_allclose(values, ref[key], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["thompson_gaussian", "linucb"])
def test_reopen_starts_the_task_afresh_on_every_replica(name: str) -> None:
    left, right = make_policy(name), make_policy(name)
    other = RequestContext("creative", "m", "chat", 120, 2, False, False, False, 0.7, 600, "up1")
    for p in (left, right):
        for _ in range(30):
            p.update(CTX, BASE, ARM, 0.9)
            p.update(other, BASE, ARM, 0.7)
    store = _add(left.export_delta(), right.export_delta())
    left.load_totals(store)
    right.load_totals(store)
    trained = left.propensities(CTX, BASE, [BASE, ARM])
    left.reopen("code")  # type: ignore[attr-defined]
    fresh = make_policy(name)
    assert statistics_version_changed(left.version, right.version)
    np.testing.assert_allclose(left.propensities(CTX, BASE, [BASE, ARM]), fresh.propensities(CTX, BASE, [BASE, ARM]))
    assert not np.allclose(trained, fresh.propensities(CTX, BASE, [BASE, ARM]))
    # the other task keeps what it learnt
    np.testing.assert_allclose(left.propensities(other, BASE, [BASE, ARM]), right.propensities(other, BASE, [BASE, ARM]))
    # right still writes old-generation statistics until it merges the count; those are ignored after
    right.update(CTX, BASE, ARM, 0.1)
    store = _add(store, left.export_delta(), right.export_delta())
    left.update(CTX, BASE, BASE, 0.4)  # unexported, new generation: kept
    for p in (left, right):
        p.load_totals(store)
    assert left.snapshot() != {}
    solo = make_policy(name)
    solo.load_totals({k: v for k, v in store.items() if not k.startswith("~")})
    for p in (left, right):
        # both now at generation 1 of "code": only left's new reward (not yet exported by left... it is on top) counts
        assert p.version.split("-")[0].endswith("~r1")
    np.testing.assert_allclose(right.propensities(CTX, BASE, [BASE, ARM]), fresh.propensities(CTX, BASE, [BASE, ARM]))
    fresh.update(CTX, BASE, BASE, 0.4)
    np.testing.assert_allclose(left.propensities(CTX, BASE, [BASE, ARM]), fresh.propensities(CTX, BASE, [BASE, ARM]))
    # a correction logged before the reopen is skipped (it would land in the fresh statistics)
    assert left.correct(CTX, BASE, ARM, 0.9, 0.1, logged_version=f"{name}-5") == "skipped"


def statistics_version_changed(a: str, b: str) -> bool:
    return a.rpartition("-")[0] != b.rpartition("-")[0]


@pytest.mark.parametrize("name", ["thompson_gaussian", "linucb"])
def test_statistics_are_kept_per_upstream_model(name: str) -> None:
    """The same model name on another upstream (or another model on the same upstream) starts from the prior."""
    policy = make_policy(name)
    for _ in range(30):
        policy.update(CTX, BASE, ARM, 0.9)
    fresh = make_policy(name)
    for ctx in (
        RequestContext("code", "m", "chat", 120, 2, False, False, False, 0.7, 600, "up2"),
        RequestContext("code", "m2", "chat", 120, 2, False, False, False, 0.7, 600, "up1"),
    ):
        np.testing.assert_allclose(policy.propensities(ctx, BASE, [BASE, ARM]), fresh.propensities(ctx, BASE, [BASE, ARM]))
    assert not np.allclose(policy.propensities(CTX, BASE, [BASE, ARM]), fresh.propensities(CTX, BASE, [BASE, ARM]))
    assert any("m@up1" in key for key in policy.snapshot())
    assert math.isinf(Discount().half_life_s)


@pytest.mark.parametrize("name", ["thompson_gaussian", "linucb"])
def test_a_snapshot_restored_later_is_decayed_by_the_epochs_since(name: str) -> None:
    """The embedded store persists `snapshot()` (with its `~epoch`); a restart one half-life later restores half."""
    before = make_policy(name, half_life_s=16 * HOUR)
    before.advance(100)  # type: ignore[attr-defined]
    for r in (0.2, 0.6, 0.9):
        before.update(CTX, BASE, ARM, r)
    saved = before.snapshot()
    restarted = make_policy(name, half_life_s=16 * HOUR)
    restarted.advance(116)  # type: ignore[attr-defined]
    restarted.load_totals(saved)
    got = restarted.snapshot()
    assert got["~epoch"][0] == 116.0
    for key, values in saved.items():
        if not key.startswith("~"):
            np.testing.assert_allclose(got[key], 0.5 * np.asarray(values), rtol=1e-12)
    # and a snapshot from the future moves the policy forward instead
    early = make_policy(name, half_life_s=16 * HOUR)
    early.load_totals(saved)
    assert early.decay_epoch == 100  # type: ignore[attr-defined]


def test_half_life_config_survives_the_json_trip_to_worker_processes(tmp_path: Path) -> None:
    """`serve --workers` hands the config to each worker as JSON, which has no inf: 0 means off; on by default (one day)."""
    for section, want in (({}, 86400.0), ({"half_life_s": 3600.0}, 3600.0), ({"half_life_s": 0}, 0.0)):
        cfg = make_config("http://127.0.0.1:9/v1", tmp_path, policy=section)
        assert msgspec.json.decode(msgspec.json.encode(cfg), type=Config).policy.half_life_s == want
    assert Runtime(make_config("http://127.0.0.1:9/v1", tmp_path, policy={"half_life_s": 0})).policy.discount.enabled is False  # type: ignore[attr-defined]
    assert Runtime(make_config("http://127.0.0.1:9/v1", tmp_path)).policy.discount.half_life_s == 86400.0  # type: ignore[attr-defined]
    with pytest.raises(ConfigError):
        make_config("http://127.0.0.1:9/v1", tmp_path, policy={"half_life_s": -1})
