"""Anytime-valid confidence sequences: coverage at all times, width, hand values, false alarms."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest

from policies.sequences import (
    Comparison,
    MeanSequence,
    bounds,
    bounds_path,
    center_radius,
    difference_bounds,
    merge,
    merge_comparisons,
    new_comparison,
    new_sequence,
    observe,
    observe_holdout,
    observe_many,
    observe_optimised,
    verdict,
)

RUNS, LENGTH = 200, 500


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("bernoulli", 0.0, 1.0), ("beta", 0.0, 1.0), ("shifted", -1.0, 1.0)],
)
def test_contains_the_mean_at_all_times_in_at_least_95_percent_of_runs(name: str, low: float, high: float) -> None:
    misses = 0
    for seed in range(RUNS):
        rng = np.random.default_rng(seed)
        if name == "bernoulli":
            truth, xs = 0.3, (rng.random(LENGTH) < 0.3).astype(float)
        elif name == "beta":
            truth, xs = 2 / 7, rng.beta(2.0, 5.0, LENGTH)
        else:  # rewards in [-1, 1]: uniform on [-0.6, 1.0], mean 0.2
            truth, xs = 0.2, rng.uniform(-0.6, 1.0, LENGTH)
        lower, upper = bounds_path(xs, 0.05, low, high)
        misses += bool(np.any((lower > truth) | (upper < truth)))
    assert misses / RUNS <= 0.05


def test_incremental_state_equals_the_vectorised_path_and_merges_by_adding() -> None:
    rng = np.random.default_rng(1)
    xs = rng.random(300)
    lower, upper = bounds_path(xs)
    state = new_sequence()
    for i, x in enumerate(xs):
        state = observe(state, float(x))
        if i in (0, 9, 299):
            assert bounds(state) == pytest.approx((lower[i], upper[i]), abs=1e-12)
    assert state.n == 300
    # persisted and read back unchanged
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=MeanSequence) == state
    left, right = observe_many(new_sequence(), xs[:100]), observe_many(new_sequence(), xs[100:])
    merged = merge(left, right)
    assert merged.n == 300 and merged.sum_x == pytest.approx(float(xs.sum()))
    assert merged.sum_lambda == pytest.approx(left.sum_lambda + right.sum_lambda)
    with pytest.raises(ValueError):
        merge(new_sequence(0.05), new_sequence(0.1))
    with pytest.raises(ValueError):
        observe(new_sequence(), 1.5)
    with pytest.raises(ValueError):
        new_sequence(alpha=0.0)


def test_width_shrinks_with_n() -> None:
    xs = (np.random.default_rng(2).random(20_000) < 0.6).astype(float)
    lower, upper = bounds_path(xs)
    width = upper - lower
    w100, w1000, w10000 = width[99], width[999], width[9999]
    assert w100 > w1000 > w10000
    assert w10000 < w1000 / 2.5  # ~1/sqrt(n) up to a log factor
    assert w10000 < 0.05
    assert bounds(new_sequence()) == (0.0, 1.0)


def test_hand_values_for_two_observations() -> None:
    """x = 1 then 0, α = 0.05 (worked in the module's formulas).

    t=1: μ̂0 = 1/2, σ̂²0 = 1/4, λ1 = min(sqrt(2 ln 40 / (1/4 · 1 · ln 2)), 1/2) = 1/2, v1 = 4·(1/2)² = 1
    t=2: μ̂1 = 3/4, σ̂²1 = (1/4 + (1 − 3/4)²)/2 = 0.15625, λ2 = min(sqrt(2 ln 40/(0.15625·2·ln 3)), 1/2) = 1/2,
         v2 = 4·(3/4)² = 2.25;  ψ(1/2) = (ln 2 − 1/2)/4
    center = (1/2·1 + 1/2·0)/1 = 1/2, radius = (ln 40 + ψ(1/2)·(1 + 2.25))/1
    """
    psi = (math.log(2.0) - 0.5) / 4.0
    one = observe(new_sequence(0.05), 1.0)
    assert center_radius(one) == pytest.approx((1.0, (math.log(40.0) + psi) / 0.5))
    two = observe(one, 0.0)
    assert two.sum_sq_dev == pytest.approx(0.0625 + (0 - 1.5 / 3) ** 2)  # μ̂2 = (1/2 + 1)/3
    assert center_radius(two) == pytest.approx((0.5, math.log(40.0) + psi * 3.25))
    assert bounds(two) == (0.0, 1.0)  # clipped
    # rescaling: rewards in [-1, 1] give the same sums as x in [0, 1]
    assert observe(observe(new_sequence(0.05, -1.0, 1.0), 1.0), -1.0).sum_penalty == pytest.approx(two.sum_penalty)


def _monitor(rng: np.random.Generator, p_opt: float, p_hold: float, steps: int, margin: float) -> list[str]:
    """Verdict after every observation of an interleaved pair of Bernoulli streams (vectorised)."""
    c = new_comparison()
    opt = (rng.random(steps) < p_opt).astype(float)
    hold = (rng.random(steps) < p_hold).astype(float)
    a = c.optimised.alpha
    ol, ou = bounds_path(opt, a)
    hl, hu = bounds_path(hold, a)
    out = np.where(ol > hu, "better", np.where(ou < (1 - margin) * hl, "worse", "unknown"))
    return out.tolist()


def test_false_alarm_rate_under_continuous_monitoring_stays_below_alpha() -> None:
    alarms = 0
    for seed in range(RUNS):
        verdicts = _monitor(np.random.default_rng(seed), 0.5, 0.5, LENGTH, margin=0.0)
        alarms += any(v != "unknown" for v in verdicts)
    assert alarms / RUNS <= 0.05


def test_verdicts_on_clear_cases_and_the_incremental_helpers_agree() -> None:
    rng = np.random.default_rng(5)
    assert "better" in _monitor(rng, 0.8, 0.5, 2000, margin=0.05)
    assert "worse" in _monitor(rng, 0.3, 0.6, 2000, margin=0.05)
    # a 3 % drop is inside a 5 % margin: never "worse"
    assert "worse" not in _monitor(rng, 0.97 * 0.6, 0.6, 3000, margin=0.05)
    c: Comparison = new_comparison(0.05)
    assert verdict(c) == "unknown" and difference_bounds(c) == (-1.0, 1.0)
    for _ in range(600):
        c = observe_optimised(c, float(rng.random() < 0.9))
        c = observe_holdout(c, float(rng.random() < 0.4))
    low, high = difference_bounds(c)
    assert 0 < low < 0.5 < high
    assert verdict(c) == "better"
    both = merge_comparisons(c, c)
    assert both.optimised.n == 1200 and both.holdout.alpha == 0.025
    with pytest.raises(ValueError):
        verdict(c, margin=1.0)
