"""The dashboard's new numbers (tuned vs holdout, signal sources, burn rate, client values) against hand-worked values."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np
import pytest

from policies import sequences
from policies.settings import RewardSettings
from proxy.control import reports
from proxy.store import DecisionRow


def row(t: float, mode: str, *, task: str = "code", quality: float | None = None, reward: float | None = None, latency_s: float = 0.1,
        tokens: int | None = None, status: int = 200, **extra: Any) -> DecisionRow:
    doc = {
        "request_id": f"r{t}", "timestamp": t, "task_type": task, "model_name": "m", "upstream": "u", "context_fingerprint": 0,
        "context_features": {}, "chosen_params": {"temperature": 0.5, "max_tokens": 200}, "baseline_params": {"temperature": 0.7, "max_tokens": 300},
        "policy_params": None, "log_propensity": 0.0, "policy_log_propensity": None, "arm_index": None, "policy": "p", "policy_version": "v",
        "mode": mode, "guard_notes": [], "status": status, "error_class": None, "latency_s": latency_s, "ttft_s": None, "prompt_tokens": None,
        "completion_tokens": tokens, "finish_reason": None, "quality": quality, "reward": reward, "outcome": {}, **extra,
    }
    return msgspec.convert(doc, DecisionRow)


def test_median_interval_of_five_values_is_min_to_max_at_90_percent() -> None:
    """Bin(5, 1/2): P(B ≤ 0) = 1/32 ≤ 0.05 < P(B ≤ 1) = 6/32, so l = 1; P(B ≥ 5) = 1/32 ≤ 0.05 < P(B ≥ 4) = 6/32, so u = 5."""
    assert reports.quantile_interval([3.0, 1.0, 4.0, 1.0, 5.0], 0.5, 0.10) == (1.0, 5.0)


def test_p99_interval_of_100_values_has_no_upper_end() -> None:
    """Y = 100 − B ~ Bin(100, 0.01): P(Y ≥ 4) = 1 − (.3660 + .3697 + .1849 + .0610) = .0184 > .0125 ≥ P(Y ≥ 5) = .0034,
    so l = 96; P(B ≥ 100) = 0.99¹⁰⁰ = .366 > .0125, so no rank bounds it above."""
    assert reports.quantile_interval([float(i) for i in range(1, 101)], 0.99, 0.025) == (96.0, None)


def test_quality_difference_uses_the_confidence_sequences() -> None:
    rows = [row(1, "optimized", quality=1.0), row(2, "holdout", quality=0.5), row(3, "optimized", quality=0.5), row(4, "guard_fallback", quality=1.0),
            row(5, "holdout", quality=0.5), row(6, "optimized", quality=0.5), row(7, "shadow", quality=0.0)]  # shadow: not a randomised control
    [code] = reports.tuned_vs_holdout(reversed(rows), -1.1, 1.0)  # the store hands rows newest first
    q = next(m for m in code.metrics if m.metric == "quality_automatic")
    assert (q.optimized_n, q.holdout_n, code.requests) == (4, 2, 7)
    assert q.optimized == pytest.approx(0.75) and q.holdout == pytest.approx(0.5) and q.difference == pytest.approx(0.25)
    # Reference: the vectorised path of the same sequences, each stream at α/2, in time order.
    lo_o, hi_o = sequences.bounds_path(np.array([1.0, 0.5, 1.0, 0.5]), alpha=0.025)
    lo_h, hi_h = sequences.bounds_path(np.array([0.5, 0.5]), alpha=0.025)
    assert q.ci_low == pytest.approx(lo_o[-1] - hi_h[-1]) and q.ci_high == pytest.approx(hi_o[-1] - lo_h[-1])
    assert q.anytime_valid and q.verdict == "not yet known" and code.verdict == "not yet known"
    assert q.summary == f"code: +0.25 automatic quality, 95 % interval [{q.ci_low:+.2f}, {q.ci_high:+.2f}], 6 requests"  # the compared ones


def test_a_clear_gain_is_called_better_and_a_rolled_back_task_says_so() -> None:
    rows = [row(i, "optimized" if i % 2 else "holdout", quality=1.0 if i % 2 else 0.0, reward=1.0 if i % 2 else 0.0) for i in range(400)]
    [code] = reports.tuned_vs_holdout(rows, -1.1, 1.0)
    q = code.metrics[0]
    assert q.difference == 1.0 and q.ci_low is not None and q.ci_low > 0 and q.verdict == "better" and code.verdict == "better"
    [rolled] = reports.tuned_vs_holdout([*rows, row(500, "rollback", quality=0.0)], -1.1, 1.0)
    assert rolled.verdict == "rolled back" and "rolled back" in rolled.summary


def test_tokens_are_bounded_by_the_largest_count_and_fewer_is_better() -> None:
    rows = [row(i, "optimized", tokens=100) for i in range(300)] + [row(1000 + i, "holdout", tokens=400) for i in range(300)]
    tok = next(m for m in reports.tuned_vs_holdout(rows, -1.1, 1.0)[0].metrics if m.metric == "completion_tokens")
    lo_o, hi_o = sequences.bounds_path(np.full(300, 100.0), alpha=0.025, low=0.0, high=400.0)
    lo_h, hi_h = sequences.bounds_path(np.full(300, 400.0), alpha=0.025, low=0.0, high=400.0)
    assert tok.difference == -300.0 and tok.ci_high == pytest.approx(hi_o[-1] - lo_h[-1]) and tok.ci_high < 0
    assert tok.verdict == "better" and "[0, 400]" in tok.interval


def test_p99_comparison_is_fixed_sample_and_open_ended_when_short() -> None:
    rows = [row(i, "optimized", latency_s=i / 1000) for i in range(1, 11)] + [row(100 + i, "holdout", latency_s=0.001) for i in range(10)]
    lat = next(m for m in reports.tuned_vs_holdout(rows, -1.1, 1.0)[0].metrics if m.metric == "latency_p99")
    assert lat.unit == "ms" and not lat.anytime_valid
    assert lat.optimized == pytest.approx(float(np.quantile(np.arange(1, 11), 0.99))) and lat.holdout == pytest.approx(1.0)
    assert lat.ci_low is None and lat.ci_high is None and lat.verdict == "not yet known"  # 10 values bound no side of a p99
    assert "not enough data for a 95 % interval" in lat.summary and "−∞" not in lat.summary


def test_reward_range_of_the_default_settings() -> None:
    """quality ∈ [0, 1] weighted 1, minus (0.1 + 0.01) × the ratio cap 10."""
    low, high = reports.reward_range(RewardSettings())
    assert low == pytest.approx(-1.1) and high == 1.0


def test_signal_sources_count_the_strongest_signal_per_row() -> None:
    rows = [row(1, "optimized", quality=0.9), row(2, "optimized", quality=0.9, feedback_quality=0.2, feedback_source="explicit"),
            row(3, "holdout", quality=0.9, feedback_quality=0.5, feedback_source="judge"), row(4, "optimized", quality=None),
            row(5, "optimized", quality=0.9, feedback_quality=0.0, feedback_source="implicit"), row(6, "optimized", task="chat", quality=0.1)]
    by = {s.task_type: s for s in reports.signal_sources(rows)}
    assert (by["code"].explicit, by["code"].judge, by["code"].implicit, by["code"].automatic, by["code"].none) == (1, 1, 1, 1, 1)
    assert (by["chat"].automatic, by["chat"].explicit) == (1, 0)


def test_burn_rate_is_fill_over_elapsed_share() -> None:
    assert reports.burn_rate(0.3, 1000.0, 400.0, 1100.0) == pytest.approx(1.2)  # 30 % used a quarter of the way through
    assert reports.burn_rate(0.5, 1000.0, 400.0, 2000.0) == pytest.approx(0.5)  # past the window's end: the whole window elapsed
    assert reports.burn_rate(0.3, 1000.0, 400.0, 1000.0) is None and reports.burn_rate(None, 0.0, 1.0, 1.0) is None


def test_parameter_evolution_carries_the_clients_values() -> None:
    rows = [row(10, "optimized", baseline_params={"temperature": 0.7, "max_tokens": 300, "effort": "low"}, policy_params={"effort": "high"}),
            row(20, "holdout", baseline_params={"temperature": 0.9, "max_tokens": 100, "effort": "medium"}, policy_params={"effort": "medium"})]
    [task] = reports.parameter_evolution(rows, 0.0, 100.0, 1).tasks
    p = task.series[0]
    assert p.client_temperature == pytest.approx(0.8) and p.client_max_tokens == pytest.approx(200.0)
    assert p.client_effort_rank == pytest.approx(2.5) and p.policy_effort_rank == pytest.approx(3.5)  # low 2, medium 3, high 4


def test_holdout_series_leaves_other_baseline_modes_out() -> None:
    rows = [row(10, "optimized", reward=0.8), row(20, "holdout", reward=0.4), row(30, "shadow", reward=0.0), row(40, "off", reward=0.0)]
    [point] = reports.holdout_reward_series(rows, 0.0, 100.0, 1)
    assert (point.optimized, point.baseline, point.baseline_n) == (0.8, 0.4, 1)
    assert math.isclose(reports.reward_series(rows, 0.0, 100.0, 1)[0].baseline or 0.0, 0.4 / 3)


def test_judged_quality_is_compared_only_among_judged_rows() -> None:
    """Regression (issue 22): at sample_rate 0.1 versus_holdout showed +0.035 for a true +0.30, mixing unjudged rows as 1.0."""
    rows = []
    for i in range(2000):
        mode = "holdout" if i % 2 else "optimized"
        judged = i % 20 < 2  # a tenth of each stream
        extra = {"feedback_quality": 0.9 if mode == "optimized" else 0.6, "feedback_source": "judge"} if judged else {}
        rows.append(row(i, mode, quality=1.0, reward=0.9, **extra))
    [code] = reports.tuned_vs_holdout(rows, -1.1, 1.0)
    metrics = {m.metric: m for m in code.metrics}
    judge = metrics["quality_judge"]
    assert (judge.optimized_n, judge.holdout_n) == (100, 100) and judge.difference == pytest.approx(0.3)
    assert judge.ci_low is not None and judge.ci_low > 0 and judge.verdict == "better" and code.verdict == "better"
    assert metrics["quality_automatic"].difference == 0.0 and (metrics["quality_automatic"].optimized_n, metrics["quality_automatic"].holdout_n) == (1000, 1000)
    assert code.summary.startswith("code: +0.30 judged quality")


def test_pairwise_verdicts_are_a_win_rate_with_their_own_interval() -> None:
    wins = [1.0, 1.0, 0.5, 0.0]  # 0.625
    rows = [row(i, "optimized", quality=1.0, feedback_quality=wins[i % 4], feedback_source="judge_pairwise") for i in range(400)]
    rows += [row(1000 + i, "holdout", quality=1.0, feedback_quality=[1.0, 0.0][i % 2], feedback_source="judge_pairwise") for i in range(100)]
    [code] = reports.tuned_vs_holdout(rows, -1.1, 1.0)
    m = next(m for m in code.metrics if m.metric == "pairwise_win_rate")
    assert not any(x.metric == "quality_judge_pairwise" for x in code.metrics)  # never labelled a quality
    lo, hi = sequences.bounds(sequences.observe_many(sequences.new_sequence(0.05), [wins[i % 4] for i in range(400)]))
    assert m.optimized == pytest.approx(0.625) and m.holdout == pytest.approx(0.5) and m.difference == pytest.approx(0.125)
    assert (m.ci_low, m.ci_high) == (pytest.approx(lo - 0.5), pytest.approx(hi - 0.5)) and m.verdict == "better"
    assert "win rate against the baseline answer 0.62 (0.5 = no difference)" in m.summary


def test_the_monitor_summary_names_every_kind_cost_trust_and_relearning() -> None:
    from guards import conservative as cm

    s = cm.ConservativeSettings()
    state = cm.new_state()
    for i in range(60):
        for mode, q, tokens in (("holdout", 0.5, 100.0), ("optimized", 0.9, 120.0)):
            state, _ = cm.observe(state, s, task="code", mode=mode, quality=1.0, latency_s=1.0, now=float(i), cost=tokens, length=tokens)
            state, _ = cm.observe_signal(state, s, task="code", mode=mode, kind="judge", quality=q, now=float(i), trusted=False)
    text = reports.monitor_summary(cm.verdict(state, s, "code"))
    assert text.startswith("code: +0.40 judged quality, 99.5 % interval [") and "(untrusted: it neither rolls back nor excuses a cost)" in text
    assert "also +0.00 automatic quality" in text and "completion_tokens per request 120 tuned vs 100 holdout" in text
    changed = msgspec.structs.replace(state, tasks={"code": msgspec.structs.replace(state.tasks["code"], relearning_since=86400.0)})
    assert reports.monitor_summary(cm.verdict(changed, s, "code")).endswith(
        "re-learning since a change detected at 1970-01-02 00:00:00 UTC (tuned traffic runs on statistics reopened then)")
