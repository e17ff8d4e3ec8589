"""Spend of tuned vs holdout traffic and the saving per 1,000 requests (proxy.control.reports.cost_comparison):
hand-worked values, and the 95 % interval's coverage over many seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from proxy.control import reports
from tests.control.test_report_numbers import row


def test_saving_by_hand() -> None:
    rows = [
        row(1, "optimized", cost_usd=0.001), row(2, "optimized", cost_usd=0.003), row(3, "guard_fallback", cost_usd=0.002),
        row(4, "optimized"),  # no cost: counted apart, not in the mean
        row(5, "holdout", cost_usd=0.004), row(6, "holdout", cost_usd=0.006),
        row(7, "shadow", cost_usd=1.0),  # not the randomised control: left out
    ]
    cost = reports.cost_comparison("code", rows)
    assert cost is not None
    assert cost.optimized_cost_usd == pytest.approx(0.002) and cost.holdout_cost_usd == pytest.approx(0.005)
    assert cost.optimized_spend_usd == pytest.approx(0.006) and cost.holdout_spend_usd == pytest.approx(0.010)
    assert (cost.optimized_priced, cost.optimized_unpriced, cost.holdout_priced, cost.holdout_unpriced) == (3, 1, 2, 0)
    # (0.005 − 0.002) · 1,000 = $3 saved per 1,000 requests
    assert cost.saving_per_1k_usd == pytest.approx(3.0)
    # Welch: s²_hold = ((−0.001)² + 0.001²)/1 = 2e-6, s²_tuned = ((−0.001)² + 0.001² + 0)/2 = 1e-6
    # se = √(2e-6/2 + 1e-6/3) = √(1.3333e-6) = 1.1547e-3; half width 1.96 · se · 1,000 = 2.2632
    half = 1.959963984540054 * math.sqrt(2e-6 / 2 + 1e-6 / 3) * 1000
    assert cost.ci_low == pytest.approx(3.0 - half) and cost.ci_high == pytest.approx(3.0 + half)
    assert cost.summary == f"code: saves $3.00 per 1,000 requests, 95 % interval [+${3.0 - half:,.4f}, +$5.26], 5 priced requests"


def test_extra_spend_is_negative_and_said_so() -> None:
    rows = [row(1, "optimized", cost_usd=0.01), row(2, "optimized", cost_usd=0.01), row(3, "holdout", cost_usd=0.005),
            row(4, "holdout", cost_usd=0.005)]
    cost = reports.cost_comparison("qa", rows)
    assert cost is not None and cost.saving_per_1k_usd == pytest.approx(-5.0)
    assert cost.summary.startswith("qa: costs $5.00 more per 1,000 requests")


def test_no_comparison_without_both_streams_priced() -> None:
    cost = reports.cost_comparison("qa", [row(1, "optimized", cost_usd=0.01), row(2, "holdout")])
    assert cost is not None and cost.saving_per_1k_usd is None and cost.ci_low is None
    assert "not comparable yet" in cost.summary
    assert reports.cost_comparison("qa", [row(1, "shadow", cost_usd=0.01)]) is None


def test_interval_covers_the_true_saving_95_percent_of_the_time() -> None:
    """Skewed per-request costs (log-normal, as prompt lengths are), tuned 20 % cheaper on average.
    Over 1,000 seeds the interval should hold the true saving 95 % of the time: accept 93-97 %
    (the binomial standard error of 1,000 draws at 0.95 is 0.7 %)."""
    sigma, n = 0.8, 200
    mu_hold, mu_tuned = math.log(0.002), math.log(0.0016)
    true_saving = (math.exp(mu_hold + sigma**2 / 2) - math.exp(mu_tuned + sigma**2 / 2)) * 1000
    covered = 0
    seeds = 1000
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        tuned = rng.lognormal(mu_tuned, sigma, n)
        hold = rng.lognormal(mu_hold, sigma, n)
        rows = [row(i, "optimized", cost_usd=float(c)) for i, c in enumerate(tuned)]
        rows += [row(n + i, "holdout", cost_usd=float(c)) for i, c in enumerate(hold)]
        cost = reports.cost_comparison("code", rows)
        assert cost is not None and cost.ci_low is not None and cost.ci_high is not None
        covered += cost.ci_low <= true_saving <= cost.ci_high
    assert 0.93 <= covered / seeds <= 0.97, covered / seeds
