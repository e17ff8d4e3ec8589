"""guards/truncation.py: the anytime-valid test that admits a lower max_tokens, checked by hand and over many seeds."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from guards.truncation import ALPHA, COMPONENTS, LOG_ADMIT, LOG_CEILING, TruncationGuard, components, extra_cut, wealth_step

KEY = ("up", "m", "classify", 0.0, 50)


def test_extra_cut_is_exact_when_uncut_and_pessimistic_when_cut_below_the_baseline_cap() -> None:
    assert extra_cut(30, 50, 50, 40, cut=False)  # 30 would have cut a 40-token answer; 50 did not
    assert not extra_cut(30, 50, 50, 30, cut=False)  # exactly 30 tokens fit under 30
    assert not extra_cut(30, 50, 50, 12, cut=False)
    assert not extra_cut(30, 50, 80, 60, cut=False)  # longer than the baseline cap: both would cut it
    assert not extra_cut(30, 50, 50, 50, cut=True)  # cut at the baseline cap: 30 cuts it too, nothing extra
    assert extra_cut(40, 50, 30, 30, cut=True)  # cut at 30 < 50: unknown whether 50 would have, counted as extra
    assert extra_cut(20, 50, 30, 30, cut=True)


def test_one_step_by_hand() -> None:
    delta = 0.01
    q = components(delta)
    assert q.tolist() == pytest.approx([0.01 * (j + 1) / 9 for j in range(8)])
    wealth, weights = np.zeros(1), np.full((1, COMPONENTS), -math.log(COMPONENTS))
    wealth_step(wealth, weights, q, delta, np.array([False]))
    # mean of (1 - q_j) / (1 - δ) with mean q_j = 0.005: 0.995 / 0.99
    assert math.exp(wealth[0]) == pytest.approx(0.995 / 0.99)
    post = np.exp(weights[0])
    assert post.sum() == pytest.approx(1.0)
    assert post.tolist() == pytest.approx(((1 - q) / (1 - q).sum()).tolist())
    wealth_step(wealth, weights, q, delta, np.array([True]))
    # bad: Σ w_j q_j / δ with w the posterior above
    assert math.exp(wealth[0]) == pytest.approx(0.995 / 0.99 * float((post * q).sum() / delta))


def test_wealth_after_clean_answers_matches_the_closed_form_and_admits_when_it_says() -> None:
    delta = 0.005
    q = components(delta)
    wealth, weights = np.zeros(1), np.full((1, COMPONENTS), -math.log(COMPONENTS))
    admitted_at = None
    for n in range(1, 3000):
        wealth_step(wealth, weights, q, delta, np.array([False]))
        closed = min(math.log(np.mean(((1 - q) / (1 - delta)) ** n)), LOG_CEILING)
        assert wealth[0] == pytest.approx(closed, rel=1e-9, abs=1e-9)
        if admitted_at is None and wealth[0] >= LOG_ADMIT:
            admitted_at = n
    # about 940 clean answers at δ = 0.005 (module docstring), below the bound ln(K/α) / (δ K/(K+1)) ≈ 1,142
    assert admitted_at is not None and 900 < admitted_at < 1000
    assert wealth[0] == pytest.approx(LOG_CEILING)


@pytest.mark.parametrize("rate_over_delta", [1.0, 1.5])
def test_a_cap_that_cuts_delta_or_more_is_ever_admitted_in_at_most_alpha_of_runs(rate_over_delta: float) -> None:
    """Type I error, time-uniform: 2,000 independent runs of 2,500 answers each (a clean run is admitted after ~190), checked after every answer."""
    delta, runs, steps = 0.05, 2000, 2500
    rng = np.random.default_rng(7)
    q = components(delta)
    wealth, weights = np.zeros(runs), np.full((runs, COMPONENTS), -math.log(COMPONENTS))
    ever = np.zeros(runs, dtype=bool)
    for _ in range(steps):
        wealth_step(wealth, weights, q, delta, rng.random(runs) < rate_over_delta * delta)
        ever |= wealth >= LOG_ADMIT
    # α = 0.05; three binomial standard errors of slack for the Monte Carlo
    assert ever.mean() <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / runs)


def test_a_rarely_cutting_cap_is_admitted_and_leaves_after_answers_grow() -> None:
    delta, runs = 0.02, 200
    rng = np.random.default_rng(3)
    q = components(delta)
    wealth, weights = np.zeros(runs), np.full((runs, COMPONENTS), -math.log(COMPONENTS))
    for _ in range(2000):
        wealth_step(wealth, weights, q, delta, rng.random(runs) < delta / 10)
    assert (wealth >= LOG_ADMIT).mean() > 0.8  # power at a tenth of δ (an extra cut costs a factor, so not all at once)
    # the model changed: the cap now cuts 10 δ more; the ceiling lets it leave quickly
    for _ in range(100):
        wealth_step(wealth, weights, q, delta, rng.random(runs) < 10 * delta)
    assert (wealth >= LOG_ADMIT).mean() < 0.05


def test_guard_tracks_on_first_ask_admits_after_clean_answers_and_stays_bounded() -> None:
    guard = TruncationGuard(0.2, max_keys=2, max_caps=3)
    assert guard.admits(KEY, 50) and guard.admits(KEY, 60)  # at or above the baseline cap: never cuts more
    assert not guard.admits(KEY, 30)  # first ask: tracked, no evidence yet
    n_needed = math.ceil(math.log(COMPONENTS / ALPHA) / (0.2 * (1 - 1 / (COMPONENTS + 1))))
    for _ in range(n_needed + 10):
        guard.observe(KEY, 50, 12, cut=False)
    assert guard.admits(KEY, 30)
    assert guard.evidence(KEY)[30] >= 1 / ALPHA
    for _ in range(5):
        guard.observe(KEY, 50, 40, cut=False)  # answers now run past 30
    assert not guard.admits(KEY, 30)
    other = ("up", "m", "chat", 0.0, 50)
    assert not guard.admits(other, 30) and not guard.admits(("up", "m", "third", 0.0, 50), 30)
    assert len(guard.keys) == 2  # past max_keys a key is not tracked: its lower caps stay closed
    for cap in (20, 21, 22, 23):
        guard.admits(other, cap)
    assert len(guard.keys[other].caps) == 3


def test_guard_switches() -> None:
    assert TruncationGuard(1.0).admits(KEY, 1)  # off: every cap
    never = TruncationGuard(0.0)
    for _ in range(5000):
        never.observe(KEY, 50, 5, cut=False)
    assert not never.admits(KEY, 49)
    with pytest.raises(ValueError):
        TruncationGuard(-0.1)


def test_admits_reads_the_wealth_as_it_is_now() -> None:
    """`admits` reads a list kept in step with the wealth (`_KeyState.refresh`): it answers what the wealth says, after every kind of update."""
    rng = random.Random(5)
    guard = TruncationGuard(0.05)
    key = ("up", "m", "task", 0.7, 400)
    for cap in (50, 100, 200, 300):
        assert guard.admits(key, cap) is False  # tracked from now on
    for step in range(3000):
        if step % 3:
            tokens = rng.randint(1, 60)
            guard.observe(key, 400, tokens, False)
        else:
            n = rng.randint(1, 20)
            guard.observe_many(key, [400] * n, [rng.randint(1, 60) for _ in range(n)], [False] * n)
        state = guard.keys[key]
        for row, cap in enumerate(state.caps):
            assert guard.admits(key, cap) is bool(state.log_wealth[row] >= LOG_ADMIT)
    assert guard.admits(key, 100) and not guard.admits(key, 50)  # both outcomes were exercised
