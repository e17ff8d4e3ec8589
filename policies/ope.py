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

Adaptive logging.  The log is written by a policy that learns as it logs, so rows are not
independent and the bootstrap's premise fails: with the shipped floor 0.002 (w up to 500) and a
best-arm target, the studentised bootstrap covered 89.5 % (IPS) and 90 % (DR) of 200 seeds
(bench/results/ope_coverage_best_arm_floor0.002.md). With a known reward range, IPS therefore
reports the betting interval (`betting_interval`, valid under adaptive logging and any weights),
and SNIPS and DR the union of their bootstrap interval with it (`Estimate.interval` names which).

Every estimate carries two intervals: a studentised (bootstrap-t) interval (seeded
Generator, vectorised resampling; `studentised_interval`: each resample's statistic is
divided by its own delta-method standard error, which makes the pivot second-order
accurate where the plain percentile interval, kept as `percentile_low/high` for
comparison, inherits the statistic's skew) and an empirical-Bernstein bound (Maurer & Pontil 2009, Thm 4)
on the per-sample terms, |mean − E| ≤ sqrt(2·V·ln(4/δ)/n) + 7·R·ln(4/δ)/(3(n−1)),
where V is the sample variance and R the range the terms *can* take.  R must be known
in advance for the bound to hold: the sample range (max − min) misses exactly the rare
large weights that make IPS risky, and then the interval is far too short.  With the
behaviour policy's propensity floor (`min_propensity`) and the reward range, every
weight is ≤ W = 1/floor and R follows (`term_range`); without them the EB interval is
(−inf, inf) (no claim).  SNIPS uses its delta-method linearisation
V̂ + w·(r − V̂)/mean(w) as per-sample terms (its R plugs in the sample mean(w)).
With a known reward range every interval is also clipped to it (a policy's value lies inside).
The effective sample size (Σw)²/Σw² says how many on-policy samples the reweighted log is worth.

DM's intervals only resample the reward model's predictions: they say nothing about
the model's bias, so they are not confidence intervals and `claims_coverage` is False.
Cross-fit the model for DR (`cross_fit_tabular`): a model fit on the rows it scores
soaks up their noise, so w·(r − q̂) shrinks and the intervals come out short where keys
are sparse (with 20 well-filled keys the bench sees no difference: bench/results/ope_coverage.md).

Support.  An estimate of a target that puts probability on arms the logging policy
never played (μ = 0), or played below the floor, is not identified by the log.
`support` measures that target mass from the full per-row distributions, and
`evaluate` refuses (raises `UnsupportedTarget`) when it exceeds `max_unsupported_mass`
instead of printing a number.

`improvement_lower_bound` compares a target with the baseline policy on the same log
(paired resampling, so shared noise cancels; studentised by the linearised difference).
The rollout guard reports it beside its promotion evidence but no longer promotes on it:
a fixed-sample bound re-checked every tick is not anytime-valid (guards/rollout.py).

Coverage over 500 seeds, uniform and Thompson logging: bench/results/ope_coverage.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Literal

import msgspec
import numpy as np

BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000
"""Resampled indices materialised at once; bounds memory for large logs."""

CONFIDENCE = 0.95
"""Two-sided level of every interval the proxy reports (OPE bounds and the control API's mean intervals)."""

Z_CONFIDENCE = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
"""Normal quantile for `CONFIDENCE` (1.95996...): mean ± Z·s/√n is the matching normal interval."""

BOOTSTRAP_REPLICATES = 1000
"""Default bootstrap replicates of `evaluate` and `improvement_lower_bound`."""

REPORT_BOOTSTRAP_REPLICATES = 500
"""Replicates behind the control API's on-demand OPE report (`GET /ope`)."""

EVIDENCE_BOOTSTRAP_REPLICATES = 200
"""Replicates behind the rollout guard's promotion evidence: recomputed every rollout tick and
shown by `GET /rollout-status`, which must agree with what the guard saw, so both read this."""

EstimatorName = Literal["ips", "snips", "dm", "dr"]


class Estimate(msgspec.Struct, frozen=True):
    """One estimator's value with its intervals."""

    estimator: str
    value: float
    ci_low: float  # the reported interval: `interval` names it
    ci_high: float
    eb_low: float  # empirical Bernstein
    eb_high: float
    std_error: float
    n: int
    ess: float
    eb_range: float = math.nan  # the range R used by the empirical-Bernstein bound (nan: no claim)
    claims_coverage: bool = True  # False for DM: its intervals ignore the model's bias
    percentile_low: float = math.nan  # the plain percentile bootstrap of the same replicates, for comparison only
    percentile_high: float = math.nan
    # "studentised bootstrap" (`studentised_interval`), or for IPS with a known reward range
    # "betting" (`betting_interval`: valid under adaptive logging and any weights); SNIPS and DR report the
    # union of their studentised bootstrap interval with it, "studentised bootstrap ∪ betting"
    # (the bootstrap assumes independent rows: under a learning logger with floor 0.002 it covered
    # 89.5 % (IPS) and 90 % (DR); the union covers whenever the betting interval does)
    interval: str = "studentised bootstrap"
    boot_low: float = math.nan  # the studentised bootstrap interval, also when it is not the reported one
    boot_high: float = math.nan


class Support(msgspec.Struct, frozen=True):
    """Target probability mass without logging support, averaged over the logged rows."""

    unsupported_mass: float  # on arms the behaviour policy gave probability 0
    below_floor_mass: float  # on arms with 0 < μ < floor
    rows: int  # rows with any such mass
    floor: float


class UnsupportedTarget(ValueError):
    """The log does not support the target: no estimate is given."""

    def __init__(self, support: Support, limit: float) -> None:
        self.support = support
        super().__init__(
            f"target puts {support.unsupported_mass:.4g} of its probability on arms never logged and "
            f"{support.below_floor_mass:.4g} on arms logged below the floor {support.floor:g} "
            f"({support.rows} rows); at most {limit:g} is allowed"
        )


class OpeReport(msgspec.Struct, frozen=True):
    """All estimators for one target policy on one log."""

    n: int
    ess: float
    max_weight: float
    ips: Estimate
    snips: Estimate
    dm: Estimate | None = None
    dr: Estimate | None = None
    support: Support | None = None


class Improvement(msgspec.Struct, frozen=True):
    """Target minus baseline value on the same log, with a lower bound for promotion."""

    estimator: str
    target: float
    baseline: float
    difference: float
    lower: float  # min(bootstrap_lower, bernstein_lower) (bootstrap alone without a known range)
    upper: float
    bootstrap_lower: float  # studentised bootstrap (`studentised_interval`)
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
    values: np.ndarray = np.einsum("ik,ik->i", np.asarray(probs, dtype=np.float64), np.asarray(reward_hat, dtype=np.float64))
    return values


def empirical_bernstein(terms: np.ndarray, term_range: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided empirical-Bernstein interval for the mean of `terms`, which lie in an interval of length `term_range`.

    (−inf, inf) when the range is unknown (nan or inf) or n < 2: no sample-based
    substitute is valid (module docstring).
    """
    z = np.asarray(terms, dtype=np.float64)
    n = z.shape[0]
    mean = float(np.mean(z))
    if n < 2 or not math.isfinite(term_range):
        return -math.inf, math.inf
    log_term = math.log(4.0 / (1.0 - confidence))
    variance = float(np.var(z, ddof=1))
    radius = math.sqrt(2.0 * variance * log_term / n) + 7.0 * term_range * log_term / (3.0 * (n - 1))
    return mean - radius, mean + radius


def _capital_lower_bound(z: np.ndarray, alpha: float, iterations: int = 60) -> np.ndarray:
    """Per row of `z` (b, n) of nonnegative terms: the smallest mean in [0, 1] the betting test does not reject.

    Capital K(m) = Π_i (1 + λ_i·(z_i − m)) with predictable λ_i in [0, 1/2]: a nonnegative
    supermartingale when the conditional mean of every z_i given the past is m, whatever the
    logging policy did adaptively and however large the weights (z ≥ 0 keeps each factor ≥ 1/2).
    Ville's inequality rejects m once K(m) ≥ 1/α with probability ≤ α under m. λ does not depend
    on m, so log K is decreasing in m and the rejected means are [0, L): bisection finds L.
    λ_i = min(sqrt(2·ln(1/α) / (n·σ̂²_{i−1})), 1/2), σ̂² a running variance (prior 1/4), tuned for
    the final n (still valid at every n: λ is predictable).
    """
    b, n = z.shape
    t = np.arange(1, n + 1, dtype=np.float64)
    mean = (0.5 + np.cumsum(z, axis=1)) / (t + 1)  # μ̂_i after i terms
    prev_mean = np.concatenate([np.full((b, 1), 0.5), mean[:, :-1]], axis=1)
    dev = np.cumsum((z - prev_mean) ** 2, axis=1)
    var_prev = np.concatenate([np.full((b, 1), 0.25), (0.25 + dev[:, :-1]) / t[None, :-1]], axis=1)
    lam = np.minimum(np.sqrt(2.0 * math.log(1.0 / alpha) / (n * np.maximum(var_prev, 1e-12))), 0.5)
    threshold = math.log(1.0 / alpha)
    low, high = np.zeros(b), np.ones(b)
    rejected_at_high = np.sum(np.log1p(lam * (z - 1.0)), axis=1) >= threshold
    for _ in range(iterations):
        mid = (low + high) / 2.0
        rejected = np.sum(np.log1p(lam * (z - mid[:, None])), axis=1) >= threshold
        low = np.where(rejected, mid, low)
        high = np.where(rejected, high, mid)
    lower: np.ndarray = np.where(rejected_at_high, 1.0, low)
    return lower


def betting_interval(
    weights: np.ndarray, rewards: np.ndarray, reward_range: tuple[float, float], confidence: float = CONFIDENCE
) -> tuple[np.ndarray, np.ndarray]:
    """Confidence interval for a target policy's value that holds under adaptive logging, rows in logged order.

    Waudby-Smith, Wu, Ramdas, Karampatziakis & Mineiro (2022), "Anytime-valid off-policy inference
    for contextual bandits": with rewards rescaled to r in [0, 1], E[w·r | past] = V and, for a
    target the log supports, E[w·(1 − r) | past] = 1 − V at every step, even though the logging
    policy learns as it logs. A betting lower bound on each (`_capital_lower_bound`, α/2 each)
    gives V. No bound on the weights is needed, so a propensity floor of 0.002 (w up to 500) costs
    width, not validity, unlike the empirical-Bernstein bound (whose range term 7·R·ln(4/δ)/(3(n−1))
    with R = 500 spans every reward at n in the thousands) and the bootstrap (which assumes
    independent rows and under-covers there: bench/results/ope_coverage.md).
    `weights`, `rewards`: (n,) or (b, n) for b logs at once. Returns (low, high) in reward units.
    """
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    lo, hi = reward_range
    if not hi > lo:
        raise ValueError(f"need reward_range lo < hi, got {reward_range!r}")
    r = (np.atleast_2d(np.asarray(rewards, dtype=np.float64)) - lo) / (hi - lo)
    alpha = (1.0 - confidence) / 2.0
    lower = _capital_lower_bound(w * r, alpha)
    upper = 1.0 - _capital_lower_bound(w * (1.0 - r), alpha)
    low_out: np.ndarray = lo + (hi - lo) * lower
    high_out: np.ndarray = lo + (hi - lo) * np.maximum(upper, lower)
    return low_out, high_out


def term_range(estimator: str, max_weight: float, reward_range: tuple[float, float], mean_weight: float = 1.0) -> float:
    """Length of the interval the per-sample terms of `estimator` can take (module docstring).

    With w in [0, W] and rewards (and reward-model predictions) in [lo, hi]:
      ips    w·r                      W·(max(hi, 0) − min(lo, 0))
      dm     v̂                        hi − lo
      dr     v̂ + w·(r − q̂)            (hi − lo)·(1 + 2W)
      snips  V + (w/m̄)·(r − V)        (hi − lo)·(1 + 2W/m̄), m̄ = sample mean weight (plug-in)
    """
    lo, hi = reward_range
    if not hi >= lo or not max_weight > 0:
        raise ValueError(f"need reward_range lo <= hi and max_weight > 0, got {reward_range!r}, {max_weight!r}")
    span = hi - lo
    if estimator == "ips":
        return max_weight * (max(hi, 0.0) - min(lo, 0.0))
    if estimator == "dm":
        return span
    if estimator == "dr":
        return span * (1.0 + 2.0 * max_weight)
    if estimator == "snips":
        return span * (1.0 + 2.0 * max_weight / mean_weight) if mean_weight > 0 else math.inf
    raise ValueError(f"unknown estimator {estimator!r}")


def support(behaviour_probs: np.ndarray, target_probs: np.ndarray, floor: float = 0.0) -> Support:
    """Target mass on arms with behaviour probability 0, and on arms below `floor`, per row averaged.

    Both arrays are (n, K) over the same arms per row (pad with 0 in both).
    """
    mu = np.asarray(behaviour_probs, dtype=np.float64)
    pi = np.asarray(target_probs, dtype=np.float64)
    if mu.shape != pi.shape or mu.ndim != 2 or mu.shape[0] == 0:
        raise ValueError("behaviour_probs and target_probs must be (n, K) arrays of the same shape, n >= 1")
    never = pi * (mu <= 0.0)
    low = pi * ((mu > 0.0) & (mu < floor * (1.0 - 1e-9)))
    rows = int(np.count_nonzero(((never + low) > 0).any(axis=1)))
    return Support(
        unsupported_mass=float(never.sum(axis=1).mean()), below_floor_mass=float(low.sum(axis=1).mean()), rows=rows, floor=floor
    )


def _statistic(kind: str, parts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(θ, se) per row of (b, n) resampled arrays; the same formulas score the original sample (b = 1).

    mean        parts (z,)           θ = mean z                  se = sd(z)/√n
    ratio       parts (w, r)         θ = Σwr/Σw                  se = sd(w(r − θ)/w̄)/√n   (delta method)
    ratio_diff  parts (wt, wb, r)    θ = θt − θb                 se = sd(wt(r − θt)/w̄t − wb(r − θb)/w̄b)/√n
    sd with ddof = 1, so se is exactly the `std_error` of the linearised terms `_estimate` reports.
    """
    n = parts[0].shape[1]
    scale = 1.0 / math.sqrt(n * max(n - 1, 1))
    if kind == "mean":
        (z,) = parts
        theta = z.mean(axis=1)
        return theta, np.sqrt(np.sum((z - theta[:, None]) ** 2, axis=1)) * scale
    if kind == "ratio":
        w, r = parts
        total = w.sum(axis=1)
        theta = _safe_ratio((w * r).sum(axis=1), total)
        lin = w * (r - theta[:, None])  # mean 0 by construction of θ
        return theta, _safe_ratio(np.sqrt(np.sum(lin * lin, axis=1)) * n * scale, total)
    wt, wb, r = parts
    mt, mb = wt.mean(axis=1), wb.mean(axis=1)
    tt = _safe_ratio((wt * r).mean(axis=1), mt)
    tb = _safe_ratio((wb * r).mean(axis=1), mb)
    d = _safe_ratio_rows(wt * (r - tt[:, None]), mt) - _safe_ratio_rows(wb * (r - tb[:, None]), mb)
    d = d - d.mean(axis=1, keepdims=True)
    return tt - tb, np.sqrt(np.sum(d * d, axis=1)) * scale


def _safe_ratio_rows(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator (b, n) divided row-wise by denominator (b,), 0 where the denominator is 0."""
    out: np.ndarray = np.divide(numerator, denominator[:, None], out=np.zeros_like(numerator), where=denominator[:, None] != 0)
    return out


def _bootstrap(
    parts: Sequence[np.ndarray],
    kind: str,
    rng: np.random.Generator,
    n_bootstrap: int,
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(θ̂, ŝe, θ*_b, se*_b): the statistic `kind` (`_statistic`) on the sample and on `n_bootstrap` resamples of its rows."""
    n = parts[0].shape[0]
    theta_hat, se_hat = _statistic(kind, [p[None, :] for p in parts])
    thetas = np.empty(n_bootstrap)
    ses = np.empty(n_bootstrap)
    rows = max(1, BOOTSTRAP_CHUNK_ELEMENTS // max(n * len(parts), 1))
    done = 0
    while done < n_bootstrap:
        b = min(rows, n_bootstrap - done)
        idx = rng.integers(0, n, size=(b, n))
        thetas[done : done + b], ses[done : done + b] = _statistic(kind, [part[idx] for part in parts])
        done += b
    return float(theta_hat[0]), float(se_hat[0]), thetas, ses


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    ratio: np.ndarray = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)
    return ratio


def _percentiles(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return float(low), float(high)


def studentised_interval(
    theta_hat: float, se_hat: float, thetas: np.ndarray, ses: np.ndarray, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Bootstrap-t interval [θ̂ − t*_{1−α/2}·ŝe, θ̂ − t*_{α/2}·ŝe], t*_b = (θ*_b − θ̂)/se*_b.

    Why not the percentile interval: for SNIPS and DR with weights it came out short
    (92.3 % / 92.7 % at a nominal 95 % under uniform logging, bench/results/ope_coverage.md):
    the percentile interval inherits the skew of the resampled statistic the wrong way round
    and ignores that its spread varies with its value.  Studentising each replicate by its own
    standard error makes the pivot nearly free of both (second-order accurate; Hall 1992,
    Efron & Tibshirani 1993 ch. 12).  A replicate with se* = 0 counts as t* = ±inf (0 when
    θ*_b = θ̂): it says the resample pinned the value, and an infinite quantile leaves that
    side open rather than pretending.
    """
    diff = thetas - theta_hat
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(ses > 0, diff / np.where(ses > 0, ses, 1.0), np.sign(diff) * np.inf)
    tail = (1.0 - confidence) / 2.0
    # Order statistics without interpolation ("lower"/"higher": a hair conservative), so ±inf never meets inf − inf.
    t_low = float(np.quantile(t, tail, method="lower"))
    t_high = float(np.quantile(t, 1.0 - tail, method="higher"))
    if se_hat == 0.0:
        return theta_hat, theta_hat
    return theta_hat - t_high * se_hat, theta_hat - t_low * se_hat


def _estimate(
    name: str,
    terms: np.ndarray,
    boot: tuple[float, float, np.ndarray, np.ndarray],
    confidence: float,
    ess: float,
    eb_range: float,
    value_range: tuple[float, float] | None,
    betting: tuple[float, float] | None = None,
) -> Estimate:
    value, std_error, thetas, ses = boot
    low, high = studentised_interval(value, std_error, thetas, ses, confidence)
    p_low, p_high = _percentiles(thetas, confidence)
    eb_low, eb_high = empirical_bernstein(terms, eb_range, confidence)
    if value_range is not None:  # a policy's value lies in the reward range: clipping loses no coverage
        low, high = max(low, value_range[0]), min(high, value_range[1])
        p_low, p_high = max(p_low, value_range[0]), min(p_high, value_range[1])
        eb_low, eb_high = max(eb_low, value_range[0]), min(eb_high, value_range[1])
    n = terms.shape[0]
    ci_low, ci_high, interval = low, high, "studentised bootstrap"
    if betting is not None and name == "ips":
        # Widened to hold the point estimate (clipped to the reward range) if need be: a reader expects it inside.
        inside = value if value_range is None else min(max(value, value_range[0]), value_range[1])
        ci_low, ci_high, interval = min(betting[0], inside), max(betting[1], inside), "betting"
    elif betting is not None and name in ("snips", "dr"):
        ci_low, ci_high, interval = min(low, betting[0]), max(high, betting[1]), "studentised bootstrap ∪ betting"
    return Estimate(
        estimator=name,
        value=value,
        ci_low=ci_low,
        ci_high=ci_high,
        interval=interval,
        boot_low=low,
        boot_high=high,
        eb_low=eb_low,
        eb_high=eb_high,
        std_error=std_error if n > 1 else math.inf,
        n=n,
        ess=ess,
        eb_range=eb_range,
        claims_coverage=name != "dm",
        percentile_low=p_low,
        percentile_high=p_high,
    )


def _known_max_weight(
    behaviour: np.ndarray, weights: np.ndarray, min_propensity: float | None, reward_range: tuple[float, float] | None
) -> float:
    """W = 1/floor when floor and reward range are known (nan otherwise); refuses logged rows below the floor."""
    if min_propensity is None or reward_range is None:
        return math.nan
    if not 0.0 < min_propensity <= 1.0:
        raise ValueError(f"min_propensity must be in (0, 1], got {min_propensity!r}")
    below = (behaviour < min_propensity * (1.0 - 1e-9)) & (weights > 0)
    if np.any(below):
        mass = float(np.mean(np.where(below, weights, 0.0)))  # IPS estimate of the target mass there
        raise UnsupportedTarget(Support(0.0, mass, int(np.count_nonzero(below)), min_propensity), 0.0)
    return 1.0 / min_propensity


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
    n_bootstrap: int = BOOTSTRAP_REPLICATES,
    confidence: float = CONFIDENCE,
    min_propensity: float | None = None,
    reward_range: tuple[float, float] | None = None,
    behaviour_probs: np.ndarray | None = None,
    target_probs: np.ndarray | None = None,
    max_unsupported_mass: float = 0.0,
    logged_at: np.ndarray | None = None,
) -> OpeReport:
    """IPS, SNIPS and (when the reward model's arrays are given) DM and DR for one target.

    With a known `reward_range`, IPS reports the betting interval (`betting_interval`), which
    reads the rows in the order they were logged: `logged_at` (decision times) sorts them,
    otherwise they are taken oldest first as given.

    `min_propensity` (the logging policy's floor) and `reward_range` make the
    empirical-Bernstein intervals valid (module docstring); a logged row below the
    floor with target weight > 0 raises `UnsupportedTarget`.  With `behaviour_probs`
    and `target_probs` ((n, K), every allowed arm per row) the support is measured and
    reported, and a target with more than `max_unsupported_mass` outside it raises
    `UnsupportedTarget` instead of returning an estimate.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.shape[0] == 0:
        raise ValueError("cannot evaluate an empty log")
    covered = None
    if behaviour_probs is not None and target_probs is not None:
        covered = support(behaviour_probs, target_probs, min_propensity or 0.0)
        if covered.unsupported_mass + covered.below_floor_mass > max_unsupported_mass:
            raise UnsupportedTarget(covered, max_unsupported_mass)
    mu = np.asarray(behaviour_propensity, dtype=np.float64)
    w = importance_weights(target_propensity, mu)
    big_w = _known_max_weight(mu, w, min_propensity, reward_range)
    bounds = reward_range or (0.0, 0.0)

    def known(estimator: str, mean_weight: float = 1.0) -> float:
        return math.nan if math.isnan(big_w) else term_range(estimator, big_w, bounds, mean_weight)

    ess = effective_sample_size(w)
    wr = w * r
    betting = None
    if reward_range is not None and reward_range[1] > reward_range[0]:
        order = np.argsort(np.asarray(logged_at), kind="stable") if logged_at is not None else slice(None)
        b_low, b_high = betting_interval(w[order], r[order], reward_range, confidence)
        betting = (float(b_low[0]), float(b_high[0]))
    ips = _estimate("ips", wr, _bootstrap([wr], "mean", rng, n_bootstrap), confidence, ess, known("ips"), reward_range, betting)
    _, snips_terms = _snips_terms(w, r)
    snips = _estimate(
        "snips", snips_terms, _bootstrap([w, r], "ratio", rng, n_bootstrap), confidence, ess,
        known("snips", float(np.mean(w))), reward_range, betting,
    )
    dm = dr = None
    if reward_hat_logged is not None and target_value_hat is not None:
        q_hat = np.asarray(reward_hat_logged, dtype=np.float64)
        v_hat = np.asarray(target_value_hat, dtype=np.float64)
        dm = _estimate(
            "dm", v_hat, _bootstrap([v_hat], "mean", rng, n_bootstrap), confidence, ess,
            math.nan if reward_range is None else term_range("dm", 1.0, bounds), reward_range,
        )
        dr_terms = v_hat + w * (r - q_hat)
        dr = _estimate(
            "dr",
            dr_terms,
            _bootstrap([dr_terms], "mean", rng, n_bootstrap),
            confidence,
            ess,
            known("dr"),
            reward_range,
            betting,
        )
    return OpeReport(
        n=int(r.shape[0]), ess=ess, max_weight=float(np.max(w)), ips=ips, snips=snips, dm=dm, dr=dr, support=covered
    )


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
    n_bootstrap: int = BOOTSTRAP_REPLICATES,
    confidence: float = CONFIDENCE,
    min_propensity: float | None = None,
    reward_range: tuple[float, float] | None = None,
) -> Improvement:
    """Value(target) − value(baseline) on the same log, with a conservative lower bound.

    `baseline_propensity` is the baseline policy's probability of each logged arm
    (1 where the logged arm is the baseline arm, else 0).  Intervals are two-sided at
    `confidence`; `lower` is the smaller of the paired-bootstrap and empirical-Bernstein
    lower ends, so promoting when `lower >= 0` errs on the side of not promoting.
    The Bernstein end needs `min_propensity` and `reward_range`; without them it is
    −inf and `lower` is the bootstrap's alone (a range guessed from the sample is no bound).
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.shape[0] == 0:
        raise ValueError("cannot evaluate an empty log")
    mu = np.asarray(behaviour_propensity, dtype=np.float64)
    wt = importance_weights(target_propensity, mu)
    wb = importance_weights(baseline_propensity, mu)
    big_w = max(_known_max_weight(mu, wt, min_propensity, reward_range), _known_max_weight(mu, wb, min_propensity, reward_range))
    if estimator == "snips":
        target, t_terms = _snips_terms(wt, r)
        base, b_terms = _snips_terms(wb, r)
        terms = t_terms - b_terms
        boot = _bootstrap([wt, wb, r], "ratio_diff", rng, n_bootstrap)
    elif estimator == "ips":
        t_terms, b_terms = wt * r, wb * r
        target, base = float(np.mean(t_terms)), float(np.mean(b_terms))
        terms = t_terms - b_terms
        boot = _bootstrap([terms], "mean", rng, n_bootstrap)
    elif estimator == "dr":
        if reward_hat_logged is None or target_value_hat is None or baseline_value_hat is None:
            raise ValueError("dr needs reward_hat_logged, target_value_hat and baseline_value_hat")
        q_hat = np.asarray(reward_hat_logged, dtype=np.float64)
        t_terms = np.asarray(target_value_hat, dtype=np.float64) + wt * (r - q_hat)
        b_terms = np.asarray(baseline_value_hat, dtype=np.float64) + wb * (r - q_hat)
        target, base = float(np.mean(t_terms)), float(np.mean(b_terms))
        terms = t_terms - b_terms
        boot = _bootstrap([terms], "mean", rng, n_bootstrap)
    else:
        raise ValueError(f"unknown estimator {estimator!r}")
    boot_low, boot_high = studentised_interval(*boot, confidence)
    if math.isnan(big_w) or reward_range is None:
        span = math.nan
    else:
        mean_w = min(float(np.mean(wt)), float(np.mean(wb)))
        span = 2.0 * term_range(estimator, big_w, reward_range, mean_w)  # a difference of two such terms
    eb_low, eb_high = empirical_bernstein(terms, span, confidence)
    return Improvement(
        estimator=estimator,
        target=target,
        baseline=base,
        difference=target - base,
        lower=min(boot_low, eb_low) if math.isfinite(eb_low) else boot_low,
        upper=max(boot_high, eb_high) if math.isfinite(eb_high) else boot_high,
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


def cross_fit_tabular(
    logged_keys: Sequence[str],
    rewards: np.ndarray,
    candidate_keys: Sequence[Sequence[str]],
    folds: int = 2,
    prior_weight: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold `TabularRewardModel` predictions for DM/DR: (q̂ of each logged arm (n,), q̂ of each candidate (n, K)).

    Row i is scored by a model fit on the rows of the other folds (fold = i mod
    `folds`; logs are in time order, so interleaving keeps every fold spread over the
    window).  `candidate_keys[i]` lists row i's allowed arms; the (n, K) result is
    padded with 0 past each row's arms, matching `expected_under`.
    """
    r = np.asarray(rewards, dtype=np.float64)
    n = r.shape[0]
    if folds < 2 or len(logged_keys) != n or len(candidate_keys) != n:
        raise ValueError("need folds >= 2 and one logged key and one candidate list per reward")
    width = max((len(c) for c in candidate_keys), default=0)
    q_logged = np.zeros(n)
    q_candidates = np.zeros((n, width))
    index = np.arange(n)
    for fold in range(folds):
        held = index % folds == fold
        train = ~held
        model = TabularRewardModel([k for k, t in zip(logged_keys, train) if t], r[train], prior_weight)
        for i in np.flatnonzero(held).tolist():
            q_logged[i] = model.predict(logged_keys[i])
            for j, key in enumerate(candidate_keys[i]):
                q_candidates[i, j] = model.predict(key)
    return q_logged, q_candidates
