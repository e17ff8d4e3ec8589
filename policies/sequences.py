"""Anytime-valid confidence sequences for a bounded mean, and optimised-vs-holdout comparisons.

Why sequences, not intervals.  The conservative monitor looks at optimised and holdout
traffic every few seconds.  A 95 % confidence interval re-checked at every look is
wrong far more than 5 % of the time somewhere along the way; a confidence sequence
(C_t) holds at all times at once: P(∃t: μ ∉ C_t) ≤ α, so a decision may be taken at
whatever moment it first becomes clear (Howard, Ramdas, McAuliffe & Sekhon 2021).

Construction: the predictable plug-in empirical-Bernstein CS (PrPl-EB) of
Waudby-Smith & Ramdas 2023 ("Estimating means of bounded random variables by
betting", Theorem 2).  For x_i in [0, 1] (rewards rescaled from [low, high]):

    μ̂_t  = (1/2 + Σ_{i≤t} x_i) / (t + 1)             μ̂_0 = 1/2
    σ̂²_t = (1/4 + Σ_{i≤t} (x_i − μ̂_i)²) / (t + 1)    σ̂²_0 = 1/4
    λ_t  = min( sqrt(2·ln(2/α) / (σ̂²_{t−1} · t · ln(1 + t))), c ),   c = 1/2
    v_t  = 4·(x_t − μ̂_{t−1})²,   ψ(λ) = (−ln(1 − λ) − λ) / 4
    C_t  = Σλ_i x_i / Σλ_i  ±  (ln(2/α) + Σ v_i ψ(λ_i)) / Σλ_i       (clipped to [0, 1])

It is chosen over the hedged-capital betting CS because it is a handful of running
sums (O(1) per observation, no grid over candidate means), its width is within a few
percent of the betting CS at the sample sizes we see, and the sums are additive:
`MeanSequence` is a frozen struct of them, and two replicas merge by adding (`merge`).
Merging stays valid because each λ_i and μ̂_{i−1} is computed from observations the
replica had already seen, so it is predictable for the joint (interleaved) sequence,
and the product of the per-observation supermartingale factors is still a
supermartingale.  The guarantee assumes a constant mean: under drift the CS covers
the running average of the means only approximately.

Two streams (optimised vs holdout).  The streams are not paired: they are different
requests, arriving at rates set by the rollout share, so there is no per-step
difference to bound.  `Comparison` keeps one CS per stream at α/2 each; by the union
bound both hold at all times with probability ≥ 1 − α, hence so does
Δ ∈ [L_opt − U_hold, U_opt − L_hold].  The price is ln(4/α) instead of ln(2/α) in
each radius (≈ sqrt(ln 80 / ln 40) ≈ 1.09 times as wide at α = 0.05 once the variance
term dominates); in exchange
each half is an ordinary `MeanSequence`, updated, stored and merged on its own,
at any interleaving of the two streams.

All functions are pure: states go in, new states come out.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec
import numpy as np

LAMBDA_CAP = 0.5
"""c in λ_t = min(…, c): Waudby-Smith & Ramdas suggest 1/2 or 3/4; 1/2 keeps ψ(λ) small."""

Verdict = Literal["better", "worse", "unknown"]


class MeanSequence(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Running sums of the PrPl-EB confidence sequence for the mean of rewards in [low, high]."""

    alpha: float = 0.05
    low: float = 0.0
    high: float = 1.0
    n: int = 0
    sum_x: float = 0.0  # Σ x_i (rescaled to [0, 1])
    sum_sq_dev: float = 0.0  # Σ (x_i − μ̂_i)²
    sum_lambda: float = 0.0  # Σ λ_i
    sum_lambda_x: float = 0.0  # Σ λ_i·x_i
    sum_penalty: float = 0.0  # Σ v_i·ψ(λ_i)


def new_sequence(alpha: float = 0.05, low: float = 0.0, high: float = 1.0) -> MeanSequence:
    """An empty sequence; raises ValueError on alpha outside (0, 1) or low >= high."""
    if not 0.0 < alpha < 1.0 or not high > low or not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"need 0 < alpha < 1 and finite low < high, got {alpha!r}, {low!r}, {high!r}")
    return MeanSequence(alpha=alpha, low=low, high=high)


def _psi(lam: np.ndarray | float) -> np.ndarray | float:
    psi: np.ndarray | float = (-np.log1p(-np.asarray(lam)) - lam) / 4.0
    return psi


def _scale(state: MeanSequence, reward: float) -> float:
    if not math.isfinite(reward) or not state.low <= reward <= state.high:
        raise ValueError(f"reward {reward!r} outside [{state.low:g}, {state.high:g}]")
    return (reward - state.low) / (state.high - state.low)


def observe(state: MeanSequence, reward: float) -> MeanSequence:
    """Fold one reward (in [low, high]) into the sequence."""
    x = _scale(state, reward)
    t = state.n + 1
    mu_prev = (0.5 + state.sum_x) / t
    var_prev = (0.25 + state.sum_sq_dev) / t
    lam = min(math.sqrt(2.0 * math.log(2.0 / state.alpha) / (var_prev * t * math.log1p(t))), LAMBDA_CAP)
    v = 4.0 * (x - mu_prev) ** 2
    sum_x = state.sum_x + x
    mu_now = (0.5 + sum_x) / (t + 1)
    return msgspec.structs.replace(
        state,
        n=t,
        sum_x=sum_x,
        sum_sq_dev=state.sum_sq_dev + (x - mu_now) ** 2,
        sum_lambda=state.sum_lambda + lam,
        sum_lambda_x=state.sum_lambda_x + lam * x,
        sum_penalty=state.sum_penalty + v * float(_psi(lam)),
    )


def observe_many(state: MeanSequence, rewards: np.ndarray | list[float]) -> MeanSequence:
    """`observe` each reward in order."""
    for reward in np.asarray(rewards, dtype=np.float64).tolist():
        state = observe(state, reward)
    return state


def merge(a: MeanSequence, b: MeanSequence) -> MeanSequence:
    """The sequence of both replicas' observations (module docstring: why adding is valid)."""
    if (a.alpha, a.low, a.high) != (b.alpha, b.low, b.high):
        raise ValueError("can only merge sequences with the same alpha, low and high")
    return msgspec.structs.replace(
        a,
        n=a.n + b.n,
        sum_x=a.sum_x + b.sum_x,
        sum_sq_dev=a.sum_sq_dev + b.sum_sq_dev,
        sum_lambda=a.sum_lambda + b.sum_lambda,
        sum_lambda_x=a.sum_lambda_x + b.sum_lambda_x,
        sum_penalty=a.sum_penalty + b.sum_penalty,
    )


def center_radius(state: MeanSequence) -> tuple[float, float]:
    """(Σλx/Σλ, (ln(2/α) + Σvψ)/Σλ) on the [0, 1] scale, unclipped; (0.5, inf) before any data."""
    if state.n == 0 or state.sum_lambda <= 0:
        return 0.5, math.inf
    return state.sum_lambda_x / state.sum_lambda, (math.log(2.0 / state.alpha) + state.sum_penalty) / state.sum_lambda


def bounds(state: MeanSequence) -> tuple[float, float]:
    """(lower, upper) for the mean, in reward units, valid at every n simultaneously with probability ≥ 1 − α."""
    center, radius = center_radius(state)
    lower, upper = max(0.0, center - radius), min(1.0, center + radius)
    span = state.high - state.low
    return state.low + span * lower, state.low + span * upper


def bounds_path(rewards: np.ndarray, alpha: float = 0.05, low: float = 0.0, high: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised (lower_t, upper_t) for t = 1..T of one stream: what `observe` + `bounds` give after each reward.

    For simulations and benchmarks (thousands of runs); the proxy uses the incremental form.
    """
    new_sequence(alpha, low, high)  # validates
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or r.shape[0] == 0 or np.any(r < low) or np.any(r > high):
        raise ValueError(f"rewards must be a non-empty 1-d array in [{low:g}, {high:g}]")
    x = (r - low) / (high - low)
    t = np.arange(1, x.shape[0] + 1, dtype=np.float64)
    mu = (0.5 + np.cumsum(x)) / (t + 1)
    mu_prev = np.concatenate(([0.5], mu[:-1]))
    var = (0.25 + np.cumsum((x - mu) ** 2)) / (t + 1)
    var_prev = np.concatenate(([0.25], var[:-1]))
    lam = np.minimum(np.sqrt(2.0 * math.log(2.0 / alpha) / (var_prev * t * np.log1p(t))), LAMBDA_CAP)
    penalty = np.cumsum(4.0 * (x - mu_prev) ** 2 * _psi(lam))
    sum_lam = np.cumsum(lam)
    center = np.cumsum(lam * x) / sum_lam
    radius = (math.log(2.0 / alpha) + penalty) / sum_lam
    span = high - low
    return low + span * np.maximum(0.0, center - radius), low + span * np.minimum(1.0, center + radius)


class Comparison(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Optimised vs holdout for one task type: one `MeanSequence` per stream, each at α/2."""

    optimised: MeanSequence
    holdout: MeanSequence


def new_comparison(alpha: float = 0.05, low: float = 0.0, high: float = 1.0) -> Comparison:
    """Both streams empty; the difference bounds hold at all times with probability ≥ 1 − alpha."""
    half = new_sequence(alpha / 2.0, low, high)
    return Comparison(optimised=half, holdout=half)


def observe_optimised(c: Comparison, reward: float) -> Comparison:
    """One reward of optimised traffic."""
    return Comparison(optimised=observe(c.optimised, reward), holdout=c.holdout)


def observe_holdout(c: Comparison, reward: float) -> Comparison:
    """One reward of holdout traffic."""
    return Comparison(optimised=c.optimised, holdout=observe(c.holdout, reward))


def merge_comparisons(a: Comparison, b: Comparison) -> Comparison:
    """Two replicas' comparisons of the same task (sums add; see `merge`)."""
    return Comparison(optimised=merge(a.optimised, b.optimised), holdout=merge(a.holdout, b.holdout))


def difference_bounds(c: Comparison) -> tuple[float, float]:
    """(lower, upper) for mean(optimised) − mean(holdout), anytime-valid at level 1 − α."""
    opt_low, opt_high = bounds(c.optimised)
    hold_low, hold_high = bounds(c.holdout)
    return opt_low - hold_high, opt_high - hold_low


def verdict(c: Comparison, margin: float = 0.05) -> Verdict:
    """"better" once optimised is surely above holdout; "worse" once it is surely below (1 − margin)·holdout mean.

    better: L_opt > U_hold, so μ_opt > μ_hold.
    worse:  U_opt < (1 − margin)·L_hold, so μ_opt < (1 − margin)·μ_hold (rewards whose
            holdout mean is ≥ 0, which quality-weighted rewards are in practice).
    Otherwise "unknown".  Both claims hold at every look with probability ≥ 1 − α in
    total, so polling this every few seconds does not inflate false alarms.
    """
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    opt_low, opt_high = bounds(c.optimised)
    hold_low, hold_high = bounds(c.holdout)
    if c.optimised.n and c.holdout.n:
        if opt_low > hold_high:
            return "better"
        if opt_high < (1.0 - margin) * hold_low:
            return "worse"
    return "unknown"


def non_inferior(c: Comparison, margin: float = 0.05) -> bool:
    """True once `optimised` is surely no worse than (1 − margin)·holdout mean: L_opt > (1 − margin)·U_hold.

    The mirror image of `verdict`'s "worse" (same sequences, same α), so a stand-in model is let
    past its exploration share (`proxy.decision.model_stage`) only on the evidence that would
    otherwise have kept it off.
    """
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    if not (c.optimised.n and c.holdout.n):
        return False
    return bounds(c.optimised)[0] > (1.0 - margin) * bounds(c.holdout)[1]
