"""Off-policy evaluation: what would a target policy have earned on the logged traffic?

Inputs are per logged decision i (numpy arrays of length n):
  r_i   reward observed                    μ_i  behaviour propensity of the logged arm
  π_i   target policy's probability of the logged arm (e.g. `Policy.propensities`)
  q̂_i   a reward model's prediction for the logged arm            (DM / DR only)
  v̂_i   Σ_a π(a|x_i)·q̂(x_i, a), the model's value of the target   (DM / DR only)

Estimators, with w_i = π_i / μ_i:
  IPS    mean(w·r)                    unbiased whenever μ > 0 where π > 0
  SNIPS  Σ w·r / Σ w                  slightly biased, much lower variance
  DM     mean(v̂)                      as good as the reward model
  DR     mean(v̂ + w·(r − q̂))          unbiased if either μ or q̂ is right

Every estimate carries two 95 % intervals: a percentile bootstrap (seeded Generator,
vectorised resampling) and an empirical-Bernstein bound (Maurer & Pontil 2009, Thm 4)
on the per-sample terms, |mean − E| ≤ sqrt(2·V·ln(4/δ)/n) + 7·R·ln(4/δ)/(3(n−1)),
where V is the sample variance and R the range of the terms.  R is taken from the
sample (max − min) because the true range of w·r is rarely known; with a propensity
floor it is bounded by max(π/μ)·(reward range).  SNIPS uses its delta-method
linearisation V̂ + w·(r − V̂)/mean(w) as per-sample terms.  The effective sample size
(Σw)²/Σw² says how many on-policy samples the reweighted log is worth.

`improvement_lower_bound` compares a target with the baseline policy on the same log
(paired resampling, so shared noise cancels); the rollout guard promotes only when its
`lower` (the more conservative of the two bounds) is ≥ 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import msgspec
import numpy as np

BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000
"""Resampled indices materialised at once; bounds memory for large logs."""

EstimatorName = Literal["ips", "snips", "dm", "dr"]


class Estimate(msgspec.Struct, frozen=True):
    """One estimator's value with its intervals."""

    estimator: str
    value: float
    ci_low: float  # percentile bootstrap
    ci_high: float
    eb_low: float  # empirical Bernstein
    eb_high: float
    std_error: float
    n: int
    ess: float


class OpeReport(msgspec.Struct, frozen=True):
    """All estimators for one target policy on one log."""

    n: int
    ess: float
    max_weight: float
    ips: Estimate
    snips: Estimate
    dm: Estimate | None = None
    dr: Estimate | None = None


class Improvement(msgspec.Struct, frozen=True):
    """Target minus baseline value on the same log, with a lower bound for promotion."""

    estimator: str
    target: float
    baseline: float
    difference: float
    lower: float  # min(bootstrap_lower, bernstein_lower): promote only if >= 0
    upper: float
    bootstrap_lower: float
    bernstein_lower: float
    n: int
    ess_target: float
    ess_baseline: float


def importance_weights(target_propensity: np.ndarray, behaviour_propensity: np.ndarray) -> np.ndarray:
    """w = π/μ; raises if a logged action had behaviour propensity <= 0 (it cannot have been played)."""
    mu = np.asarray(behaviour_propensity, dtype=np.float64)
    if np.any(mu <= 0) or not np.all(np.isfinite(mu)):
        raise ValueError("behaviour propensities must be finite and > 0")
    return np.asarray(target_propensity, dtype=np.float64) / mu


def effective_sample_size(weights: np.ndarray) -> float:
    """(Σw)² / Σw²: 0 when the target never plays a logged action."""
    w = np.asarray(weights, dtype=np.float64)
    denominator = float(np.sum(w * w))
    return float(np.sum(w)) ** 2 / denominator if denominator > 0 else 0.0


def expected_under(probs: np.ndarray, reward_hat: np.ndarray) -> np.ndarray:
    """v̂_i = Σ_a π(a|x_i)·q̂(x_i, a) for padded (n, K) arrays (pad with probability 0)."""
    return np.einsum("ik,ik->i", np.asarray(probs, dtype=np.float64), np.asarray(reward_hat, dtype=np.float64))


def empirical_bernstein(terms: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided empirical-Bernstein interval for the mean of `terms` (module docstring)."""
    z = np.asarray(terms, dtype=np.float64)
    n = z.shape[0]
    mean = float(np.mean(z))
    if n < 2:
        return -math.inf, math.inf
    log_term = math.log(4.0 / (1.0 - confidence))
    variance = float(np.var(z, ddof=1))
    spread = float(np.max(z) - np.min(z))
    radius = math.sqrt(2.0 * variance * log_term / n) + 7.0 * spread * log_term / (3.0 * (n - 1))
    return mean - radius, mean + radius


def _bootstrap(
    statistic_parts: Sequence[np.ndarray],
    combine: str,
    rng: np.random.Generator,
    n_bootstrap: int,
) -> np.ndarray:
    """Bootstrap replicates of mean(a) ("mean") or Σa/Σb ("ratio") or Σa/Σb − Σc/Σd ("ratio_diff")."""
    n = statistic_parts[0].shape[0]
    out = np.empty(n_bootstrap)
    rows = max(1, BOOTSTRAP_CHUNK_ELEMENTS // max(n, 1))
    done = 0
    while done < n_bootstrap:
        b = min(rows, n_bootstrap - done)
        idx = rng.integers(0, n, size=(b, n))
        sums = [part[idx].sum(axis=1) for part in statistic_parts]
        if combine == "mean":
            out[done : done + b] = sums[0] / n
        elif combine == "ratio":
            out[done : done + b] = _safe_ratio(sums[0], sums[1])
        else:
            out[done : done + b] = _safe_ratio(sums[0], sums[1]) - _safe_ratio(sums[2], sums[3])
        done += b
    return out


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)


def _percentiles(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return float(low), float(high)


def _estimate(
    name: str,
    value: float,
    terms: np.ndarray,
    replicates: np.ndarray,
    confidence: float,
    ess: float,
) -> Estimate:
    low, high = _percentiles(replicates, confidence)
    eb_low, eb_high = empirical_bernstein(terms, confidence)
    n = terms.shape[0]
    std_error = float(np.std(terms, ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return Estimate(
        estimator=name,
        value=value,
        ci_low=low,
        ci_high=high,
        eb_low=eb_low,
        eb_high=eb_high,
        std_error=std_error,
        n=n,
        ess=ess,
    )


def _snips_terms(w: np.ndarray, r: np.ndarray) -> tuple[float, np.ndarray]:
    total = float(np.sum(w))
    value = float(np.sum(w * r) / total) if total > 0 else 0.0
    mean_w = total / w.shape[0] if w.shape[0] else 0.0
    terms = value + (w * (r - value) / mean_w if mean_w > 0 else np.zeros_like(r))
    return value, terms


def evaluate(
    *,
    rewards: np.ndarray,
    behaviour_propensity: np.ndarray,
    target_propensity: np.ndarray,
    rng: np.random.Generator,
    reward_hat_logged: np.ndarray | None = None,
    target_value_hat: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
) -> OpeReport:
    """IPS, SNIPS and (when the reward model's arrays are given) DM and DR for one target."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.shape[0] == 0:
        raise ValueError("cannot evaluate an empty log")
    w = importance_weights(target_propensity, behaviour_propensity)
    ess = effective_sample_size(w)
    wr = w * r
    ips = _estimate("ips", float(np.mean(wr)), wr, _bootstrap([wr], "mean", rng, n_bootstrap), confidence, ess)
    snips_value, snips_terms = _snips_terms(w, r)
    snips = _estimate("snips", snips_value, snips_terms, _bootstrap([wr, w], "ratio", rng, n_bootstrap), confidence, ess)
    dm = dr = None
    if reward_hat_logged is not None and target_value_hat is not None:
        q_hat = np.asarray(reward_hat_logged, dtype=np.float64)
        v_hat = np.asarray(target_value_hat, dtype=np.float64)
        dm = _estimate("dm", float(np.mean(v_hat)), v_hat, _bootstrap([v_hat], "mean", rng, n_bootstrap), confidence, ess)
        dr_terms = v_hat + w * (r - q_hat)
        dr = _estimate(
            "dr",
            float(np.mean(dr_terms)),
            dr_terms,
            _bootstrap([dr_terms], "mean", rng, n_bootstrap),
            confidence,
            ess,
        )
    return OpeReport(n=int(r.shape[0]), ess=ess, max_weight=float(np.max(w)), ips=ips, snips=snips, dm=dm, dr=dr)


def improvement_lower_bound(
    *,
    rewards: np.ndarray,
    behaviour_propensity: np.ndarray,
    target_propensity: np.ndarray,
    baseline_propensity: np.ndarray,
    rng: np.random.Generator,
    estimator: Literal["ips", "snips", "dr"] = "snips",
    reward_hat_logged: np.ndarray | None = None,
    target_value_hat: np.ndarray | None = None,
    baseline_value_hat: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
) -> Improvement:
    """Value(target) − value(baseline) on the same log, with a conservative lower bound.

    `baseline_propensity` is the baseline policy's probability of each logged arm
    (1 where the logged arm is the baseline arm, else 0).  Intervals are two-sided at
    `confidence`; `lower` is the smaller of the paired-bootstrap and empirical-Bernstein
    lower ends, so promoting when `lower >= 0` errs on the side of not promoting.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.shape[0] == 0:
        raise ValueError("cannot evaluate an empty log")
    wt = importance_weights(target_propensity, behaviour_propensity)
    wb = importance_weights(baseline_propensity, behaviour_propensity)
    if estimator == "snips":
        target, t_terms = _snips_terms(wt, r)
        base, b_terms = _snips_terms(wb, r)
        terms = t_terms - b_terms
        replicates = _bootstrap([wt * r, wt, wb * r, wb], "ratio_diff", rng, n_bootstrap)
    elif estimator == "ips":
        t_terms, b_terms = wt * r, wb * r
        target, base = float(np.mean(t_terms)), float(np.mean(b_terms))
        terms = t_terms - b_terms
        replicates = _bootstrap([terms], "mean", rng, n_bootstrap)
    elif estimator == "dr":
        if reward_hat_logged is None or target_value_hat is None or baseline_value_hat is None:
            raise ValueError("dr needs reward_hat_logged, target_value_hat and baseline_value_hat")
        q_hat = np.asarray(reward_hat_logged, dtype=np.float64)
        t_terms = np.asarray(target_value_hat, dtype=np.float64) + wt * (r - q_hat)
        b_terms = np.asarray(baseline_value_hat, dtype=np.float64) + wb * (r - q_hat)
        target, base = float(np.mean(t_terms)), float(np.mean(b_terms))
        terms = t_terms - b_terms
        replicates = _bootstrap([terms], "mean", rng, n_bootstrap)
    else:
        raise ValueError(f"unknown estimator {estimator!r}")
    boot_low, boot_high = _percentiles(replicates, confidence)
    eb_low, eb_high = empirical_bernstein(terms, confidence)
    return Improvement(
        estimator=estimator,
        target=target,
        baseline=base,
        difference=target - base,
        lower=min(boot_low, eb_low),
        upper=max(boot_high, eb_high),
        bootstrap_lower=boot_low,
        bernstein_lower=eb_low,
        n=int(r.shape[0]),
        ess_target=effective_sample_size(wt),
        ess_baseline=effective_sample_size(wb),
    )


class TabularRewardModel:
    """q̂(key) = shrunk mean reward per key (e.g. f"{bucket}|{arm}"), for DM and DR.

    q̂(key) = (prior_weight·global_mean + Σr_key) / (prior_weight + n_key): unseen keys
    predict the global mean, rarely seen keys are pulled toward it.
    """

    def __init__(self, keys: Sequence[str], rewards: np.ndarray, prior_weight: float = 1.0) -> None:
        r = np.asarray(rewards, dtype=np.float64)
        self.global_mean = float(np.mean(r)) if r.shape[0] else 0.0
        self.prior_weight = prior_weight
        sums: dict[str, list[float]] = {}
        for key, value in zip(keys, r.tolist()):
            stats = sums.setdefault(key, [0.0, 0.0])
            stats[0] += 1.0
            stats[1] += value
        self._means = {key: (prior_weight * self.global_mean + total) / (prior_weight + count) for key, (count, total) in sums.items()}

    def predict(self, key: str) -> float:
        """Shrunk mean reward of `key` (the global mean if never seen)."""
        return self._means.get(key, self.global_mean)
