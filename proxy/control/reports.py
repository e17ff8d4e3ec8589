"""Numbers the control API reports, computed from the decision log and the live guards.

Everything here reads `DecisionRow`s (the log store's `fetch_decisions`) or the
runtime's live objects; nothing is cached, nothing is invented: a statistic without
data is `None`.

Conventions (pinned by tests/control):
- traffic class: rows with mode ``optimized`` or ``guard_fallback`` are "optimized",
  every other mode (off, shadow, holdout, rollback) was served the baseline/client
  parameters and is "baseline".
- reward / quality: the effective value (explicit feedback wins over the automatic score).
- mean intervals: mean ± z·s/√n (z = `ope.Z_CONFIDENCE`, 1.96 at 95%) (s the sample standard deviation, n ≥ 2); a
  difference of means uses the Welch standard error √(s₁²/n₁ + s₂²/n₂).
- latency quantiles: `numpy.quantile` (linear) over the rows' `latency_s`.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from guards.conservative import KindVerdict, TaskVerdict
from guards.rollout import OpeEvidence, higher
from policies import ope, sequences
from policies.base import HasPosterior
from policies.context import context_bucket
from policies.effort import EFFORT_LEVELS
from policies.effort import rank as effort_rank
from policies.quality import learns
from policies.records import Params
from policies.reward import reward_bounds
from policies.settings import RewardSettings
from policies.signals import GUARDED_KINDS, WIN_RATE_KINDS
from proxy.control.schemas import (
    ArmPosterior,
    ArmStats,
    ConvergencePoint,
    ConvergenceReport,
    CostComparison,
    EstimateOut,
    ImprovementOut,
    Interval,
    LatencyPoint,
    MetricComparison,
    MetricsReport,
    OpeEvidenceOut,
    OpeOut,
    OpeTaskOut,
    ParameterEvolution,
    ParamPoint,
    PerformanceReport,
    PolicyEstimates,
    RewardPoint,
    SignalSources,
    TaskComparison,
    TaskConvergence,
    TaskEvolution,
    TaskPerformance,
)
from proxy.decision import context_from_features
from proxy.learning import OpeArrays, Scored, score_rows
from proxy.store import DecisionRow

if TYPE_CHECKING:
    from proxy.decision import BanditDecider

OPTIMIZED_MODES = frozenset({"optimized", "guard_fallback"})
OPE_METHOD_NAME = (
    "self-normalised importance sampling (SNIPS) on the logged optimised requests, with inverse propensity "
    "scoring (IPS) and doubly robust (DR) estimates alongside; the improvement is the current policy minus the "
    "client's own parameters, scored on the same log"
)
MIN_ESS = 10.0
"""Below this effective sample size (or a tenth of the rows) the weights rest on a handful of requests: say so."""
OPE_METHOD = (
    "logged rows with mode 'optimized' (behaviour propensity = the logged propensity); for each row the "
    "RequestContext is rebuilt from context_features, the allowed arms from today's trust region "
    "(BanditDecider.allowed_for), and the target probability of the logged arm is the current policy's "
    "Policy.propensities(ctx, baseline, allowed) at that arm (0 if the arm is no longer allowed); the baseline "
    "policy's probability is 1 when the logged arm is the baseline arm, else 0. DR uses a tabular reward model "
    "(shrunk mean reward per context bucket and arm) fitted on the same rows."
)


def traffic_of(mode: str) -> str:
    return "optimized" if mode in OPTIMIZED_MODES else "baseline"


def finite(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def mean_interval(values: Sequence[float]) -> Interval:
    n = len(values)
    if n == 0:
        return Interval(mean=None, ci_low=None, ci_high=None, n=0)
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    if n < 2:
        return Interval(mean=mean, ci_low=None, ci_high=None, n=n)
    half = ope.Z_CONFIDENCE * float(arr.std(ddof=1)) / math.sqrt(n)
    return Interval(mean=mean, ci_low=mean - half, ci_high=mean + half, n=n)


def diff_interval(a: Sequence[float], b: Sequence[float]) -> Interval | None:
    """Mean(a) − mean(b) with a Welch interval; None without data on either side."""
    if not a or not b:
        return None
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(xa.mean() - xb.mean())
    if len(a) < 2 or len(b) < 2:
        return Interval(mean=diff, ci_low=None, ci_high=None, n=len(a) + len(b))
    se = math.sqrt(float(xa.var(ddof=1)) / len(a) + float(xb.var(ddof=1)) / len(b))
    return Interval(mean=diff, ci_low=diff - ope.Z_CONFIDENCE * se, ci_high=diff + ope.Z_CONFIDENCE * se, n=len(a) + len(b))


def quantile(values: Sequence[float], q: float) -> float | None:
    return float(np.quantile(np.asarray(values, dtype=np.float64), q)) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(np.asarray(values, dtype=np.float64))) if values else None


def arm_label(p: Params) -> str:
    return p.render() or "client"


def _arm_stats(task: str, label: str, params: Params | None, traffic: str, rows: list[DecisionRow], base_rewards: list[float] | None) -> ArmStats:
    rewards = [r.effective_reward for r in rows if r.effective_reward is not None and math.isfinite(r.effective_reward)]
    quality = [r.effective_quality for r in rows if r.effective_quality is not None]
    latency = [r.latency_s for r in rows if r.status and math.isfinite(r.latency_s)]
    prompt = [r.prompt_tokens for r in rows if r.prompt_tokens is not None]
    completion = [r.completion_tokens for r in rows if r.completion_tokens is not None]
    return ArmStats(
        task_type=task,
        arm=label,
        temperature=params.temperature if params is not None else None,
        max_tokens=params.max_tokens if params is not None else None,
        traffic=traffic,
        requests=len(rows),
        errors=sum(1 for r in rows if not learns(r.status, r.error_class)),
        reward=mean_interval(rewards),
        quality_mean=_mean(quality),
        latency_p50_s=quantile(latency, 0.5),
        latency_p95_s=quantile(latency, 0.95),
        latency_p99_s=quantile(latency, 0.99),
        prompt_tokens_mean=_mean(prompt),
        completion_tokens_mean=_mean(completion),
        improvement_over_baseline=diff_interval(rewards, base_rewards) if base_rewards is not None else None,
    )


def _baseline_rewards(rows: Iterable[DecisionRow]) -> dict[str, list[float]]:
    """Per task type, the rewards of the reference traffic: the randomised holdout when the task has rewarded holdout rows,
    else every baseline-served row (shadow, off and rollback traffic is not a randomised control, so it only stands in)."""
    served: dict[str, list[float]] = defaultdict(list)
    holdout: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if traffic_of(r.mode) == "baseline" and r.effective_reward is not None and math.isfinite(r.effective_reward):
            served[r.task_type].append(r.effective_reward)
            if r.mode == "holdout":
                holdout[r.task_type].append(r.effective_reward)
    return {task: holdout.get(task) or rewards for task, rewards in served.items()}


def _self_difference(n: int) -> Interval:
    """The reference traffic's improvement over itself: exactly 0, stated rather than left null."""
    return Interval(mean=0.0, ci_low=0.0, ci_high=0.0, n=n)


def metrics_report(rows: list[DecisionRow], since: float, until: float, truncated: bool) -> MetricsReport:
    """Per task type, arm (sent parameters) and traffic class."""
    base = _baseline_rewards(rows)
    groups: dict[tuple[str, str, str], list[DecisionRow]] = defaultdict(list)
    params: dict[tuple[str, str, str], Params] = {}
    for r in rows:
        key = (r.task_type, arm_label(r.chosen_params), traffic_of(r.mode))
        groups[key].append(r)
        params[key] = r.chosen_params
    arms = [
        _arm_stats(task, label, params[(task, label, traffic)], traffic, group, base.get(task, []))
        for (task, label, traffic), group in sorted(groups.items())
    ]
    return MetricsReport(since=since, until=until, rows=len(rows), truncated=truncated, arms=arms)


def performance_report(rows: list[DecisionRow], since: float, until: float, truncated: bool,
                       reward_bounds: tuple[float, float] | None = None) -> PerformanceReport:
    """Per task type: optimised vs baseline-served traffic and the difference of mean rewards.

    With `reward_bounds` each task also carries `versus_holdout`: optimised against the
    randomised holdout only, with the anytime-valid intervals and verdict of
    `tuned_vs_holdout` (the Welch `improvement` is a fixed-sample interval over every
    baseline-served row, shown beside it).
    """
    versus = {c.task_type: c for c in tuned_vs_holdout(rows, *reward_bounds)} if reward_bounds is not None else {}
    by_task: dict[str, dict[str, list[DecisionRow]]] = defaultdict(lambda: {"optimized": [], "baseline": []})
    rows_of: dict[str, list[DecisionRow]] = defaultdict(list)
    for r in rows:
        by_task[r.task_type][traffic_of(r.mode)].append(r)
        rows_of[r.task_type].append(r)
    base = _baseline_rewards(rows)
    tasks = []
    for task in sorted(by_task):
        groups = by_task[task]
        base_rewards = base.get(task, [])
        opt = _arm_stats(task, "*", None, "optimized", groups["optimized"], base_rewards) if groups["optimized"] else None
        bas = _arm_stats(task, "*", None, "baseline", groups["baseline"], None) if groups["baseline"] else None
        if bas is not None and base_rewards:
            served = [r.effective_reward for r in groups["baseline"] if r.effective_reward is not None and math.isfinite(r.effective_reward)]
            same = len(served) == len(base_rewards)  # the reference is all of it (no shadow/off/rollback rows beside the holdout)
            bas = msgspec.structs.replace(bas, improvement_over_baseline=_self_difference(len(served)) if same else diff_interval(served, base_rewards))
        opt_rewards = [r.effective_reward for r in groups["optimized"] if r.effective_reward is not None and math.isfinite(r.effective_reward)]
        tasks.append(TaskPerformance(task_type=task, optimized=opt, baseline=bas, improvement=diff_interval(opt_rewards, base_rewards),
                                     versus_holdout=versus.get(task), cost=cost_comparison(task, rows_of[task])))
    return PerformanceReport(since=since, until=until, rows=len(rows), truncated=truncated, tasks=tasks)


# ----------------------------------------------------------------------------- cost

COST_NOTE = ("saving = (mean holdout cost − mean tuned cost) × 1,000 over the priced requests of each stream; 95 % Welch "
             "interval (normal, standard error √(s²_hold/n_hold + s²_tuned/n_tuned)), valid for this window's fixed sample "
             "(coverage checked over many seeds in tests/control/test_cost_report.py), not anytime-valid; requests without a "
             "cost (no usage reported or no known price) are counted apart and left out")


def _dollars(x: float) -> str:
    return f"${abs(x):,.4f}" if abs(x) < 1 else f"${abs(x):,.2f}"


def _signed_dollars(x: float) -> str:
    return ("−" if x < 0 else "+") + _dollars(x)


def model_shares(rows: list[DecisionRow]) -> dict[str, float]:
    """Share of `rows` served by each model (a stand-in sent, else the requested model), largest first."""
    counts = Counter(r.chosen_params.model or r.model_name for r in rows)
    return {m: n / len(rows) for m, n in counts.most_common()} if rows else {}


def cost_comparison(task: str, rows: Iterable[DecisionRow]) -> CostComparison | None:
    """Tuned (optimised) vs holdout spend of one task type, and the saving per 1,000 requests with a Welch interval.

    Like with like: both streams are the same window's requests of the same task type, and the
    holdout is the randomised control. None when neither stream has a request.
    """
    opt_all = [r for r in rows if r.mode in OPTIMIZED_MODES]
    hold_all = [r for r in rows if r.mode == HOLDOUT_MODE]
    if not opt_all and not hold_all:
        return None
    opt = [float(r.cost_usd) for r in opt_all if r.cost_usd is not None and math.isfinite(r.cost_usd)]
    hold = [float(r.cost_usd) for r in hold_all if r.cost_usd is not None and math.isfinite(r.cost_usd)]
    diff = diff_interval(hold, opt)  # holdout − tuned: positive is a saving
    saving = diff.mean * 1000.0 if diff is not None and diff.mean is not None else None
    low = diff.ci_low * 1000.0 if diff is not None and diff.ci_low is not None else None
    high = diff.ci_high * 1000.0 if diff is not None and diff.ci_high is not None else None
    n = len(opt) + len(hold)
    models = model_shares(opt_all)
    if saving is None:
        summary = f"{task}: spend not comparable yet (needs priced tuned and holdout requests), {n:,} priced requests"
    else:
        words = f"saves {_dollars(saving)}" if saving >= 0 else f"costs {_dollars(saving)} more"
        span = f"[{_signed_dollars(low)}, {_signed_dollars(high)}]" if low is not None and high is not None else "[not yet known]"
        summary = f"{task}: {words} per 1,000 requests, {round(100 * (1 - ALPHA))} % interval {span}, {n:,} priced requests"
    if any(r.chosen_params.model is not None for r in opt_all):
        summary += "; tuned traffic by model: " + ", ".join(f"{m} {100 * share:.0f} %" for m, share in models.items())
    return CostComparison(
        tuned_models=models,
        optimized_cost_usd=_mean(opt), holdout_cost_usd=_mean(hold), optimized_spend_usd=float(sum(opt)), holdout_spend_usd=float(sum(hold)),
        optimized_priced=len(opt), holdout_priced=len(hold), optimized_unpriced=len(opt_all) - len(opt),
        holdout_unpriced=len(hold_all) - len(hold), saving_per_1k_usd=saving, ci_low=low, ci_high=high, interval=COST_NOTE, summary=summary,
    )


# ----------------------------------------------------------------------------- time series


def bin_edges(since: float, until: float, bins: int) -> tuple[float, int]:
    bins = max(1, bins)
    width = max((until - since) / bins, 1e-9)
    return width, bins


def _bin(t: float, since: float, width: float, bins: int) -> int:
    return min(bins - 1, max(0, int((t - since) / width)))


def reward_series(rows: list[DecisionRow], since: float, until: float, bins: int) -> list[RewardPoint]:
    width, bins = bin_edges(since, until, bins)
    opt: list[list[float]] = [[] for _ in range(bins)]
    bas: list[list[float]] = [[] for _ in range(bins)]
    for r in rows:
        if r.effective_reward is None or not math.isfinite(r.effective_reward):
            continue
        (opt if traffic_of(r.mode) == "optimized" else bas)[_bin(r.timestamp, since, width, bins)].append(r.effective_reward)
    return [
        RewardPoint(t=since + i * width, optimized=_mean(opt[i]), baseline=_mean(bas[i]), optimized_n=len(opt[i]), baseline_n=len(bas[i]))
        for i in range(bins)
    ]


def latency_series(rows: list[DecisionRow], since: float, until: float, bins: int) -> list[LatencyPoint]:
    width, bins = bin_edges(since, until, bins)
    opt: list[list[float]] = [[] for _ in range(bins)]
    bas: list[list[float]] = [[] for _ in range(bins)]
    for r in rows:
        if not r.status or not math.isfinite(r.latency_s):
            continue
        (opt if traffic_of(r.mode) == "optimized" else bas)[_bin(r.timestamp, since, width, bins)].append(r.latency_s * 1000.0)
    return [
        LatencyPoint(t=since + i * width, optimized_p99_ms=quantile(opt[i], 0.99), baseline_p99_ms=quantile(bas[i], 0.99),
                     optimized_n=len(opt[i]), baseline_n=len(bas[i]))
        for i in range(bins)
    ]


def bins_per_task(rows: Iterable[DecisionRow], since: float, width: float, bins: int) -> dict[str, list[list[DecisionRow]]]:
    """Rows grouped by task type, then by time bin."""
    per_task: dict[str, list[list[DecisionRow]]] = defaultdict(lambda: [[] for _ in range(bins)])
    for r in rows:
        per_task[r.task_type][_bin(r.timestamp, since, width, bins)].append(r)
    return per_task


def _effort_rank(level: str | None) -> float:
    return float(effort_rank(level or ""))


def parameter_evolution(rows: list[DecisionRow], since: float, until: float, bins: int) -> ParameterEvolution:
    width, bins = bin_edges(since, until, bins)
    per_task = bins_per_task(rows, since, width, bins)
    tasks = []
    for task in sorted(per_task):
        series = []
        for i, group in enumerate(per_task[task]):
            if not group:
                continue
            pol = [r.policy_params for r in group if r.policy_params is not None]
            series.append(
                ParamPoint(
                    t=since + i * width,
                    decisions=len(group),
                    policy_temperature=_mean([p.temperature for p in pol if p.temperature is not None]),
                    policy_max_tokens=_mean([p.max_tokens for p in pol if p.max_tokens is not None]),
                    sent_temperature=_mean([r.chosen_params.temperature for r in group if r.chosen_params.temperature is not None]),
                    sent_max_tokens=_mean([r.chosen_params.max_tokens for r in group if r.chosen_params.max_tokens is not None]),
                    client_temperature=_mean([r.baseline_params.temperature for r in group if r.baseline_params.temperature is not None]),
                    client_max_tokens=_mean([r.baseline_params.max_tokens for r in group if r.baseline_params.max_tokens is not None]),
                    policy_effort_rank=_mean([_effort_rank(p.effort) for p in pol if p.effort in EFFORT_LEVELS]),
                    client_effort_rank=_mean([_effort_rank(r.baseline_params.effort) for r in group if r.baseline_params.effort in EFFORT_LEVELS]),
                )
            )
        tasks.append(TaskEvolution(task_type=task, series=series))
    return ParameterEvolution(since=since, until=until, bin_s=width, tasks=tasks)


def convergence(decider: BanditDecider, rows: list[DecisionRow], since: float, until: float, bins: int) -> ConvergenceReport:
    """Per task type: the policy's confidence in its own choices over time, and its current arm distribution."""
    width, bins = bin_edges(since, until, bins)
    judged = [r for r in rows if r.policy_log_propensity is not None and r.policy_params is not None]
    per_task = bins_per_task(judged, since, width, bins)
    latest: dict[str, DecisionRow] = {}
    for r in judged:  # newest first
        latest.setdefault(r.task_type, r)
    tasks = []
    for task in sorted(per_task):
        series = []
        for i, group in enumerate(per_task[task]):
            if not group:
                continue
            probs = [math.exp(r.policy_log_propensity) for r in group if r.policy_log_propensity is not None]
            series.append(
                ConvergencePoint(
                    t=since + i * width,
                    decisions=len(group),
                    mean_choice_probability=float(np.mean(probs)),
                    distinct_arms=len({arm_label(r.policy_params) for r in group if r.policy_params is not None}),
                )
            )
        bucket, best, entropy, current = None, None, None, []
        ctx = context_from_features(latest[task].context_features)
        if ctx is not None:
            options = decider.arms.options(ctx)  # stand-ins' arms included
            base, allowed = options.reference.arm, options.allowed
            p = decider.pmf(ctx, base, allowed)
            bucket = context_bucket(ctx)
            best = float(p.max())
            nz = p[p > 0]
            entropy = float(-(nz * np.log(nz)).sum())
            policy = decider.policy
            for arm, prob in zip(allowed, p.tolist()):
                post = policy.posterior(ctx, arm) if isinstance(policy, HasPosterior) else None
                current.append(
                    ArmPosterior(
                        temperature=arm.temperature, max_tokens=arm.max_tokens, probability=prob, model=arm.model,
                        posterior_mean=finite(post.mean) if post is not None else None,
                        posterior_sd=finite(post.sd) if post is not None else None,
                        n=post.n if post is not None else None,
                    )
                )
        tasks.append(TaskConvergence(task_type=task, bucket=bucket, best_arm_probability=best, entropy=entropy, current=current, series=series))
    return ConvergenceReport(policy=decider.policy.name, policy_version=decider.policy.version, since=since, until=until, bin_s=width, tasks=tasks)


# ----------------------------------------------------------------------------- OPE


def _est(e: ope.Estimate | None) -> EstimateOut | None:
    if e is None:
        return None
    return EstimateOut(
        estimator=e.estimator, value=e.value, ci_low=finite(e.ci_low), ci_high=finite(e.ci_high), eb_low=finite(e.eb_low),
        eb_high=finite(e.eb_high), std_error=finite(e.std_error), n=e.n, ess=e.ess, interval=e.interval,
    )


def _policy_estimates(name: str, report: ope.OpeReport) -> PolicyEstimates:
    ips, snips = _est(report.ips), _est(report.snips)
    assert ips is not None and snips is not None
    return PolicyEstimates(policy=name, ips=ips, snips=snips, dr=_est(report.dr), ess=report.ess, max_weight=report.max_weight)


def _ess_too_small(ess: float, n: int) -> bool:
    return ess < MIN_ESS or ess < 0.1 * n


def _statement(report: OpeOut) -> str:
    """The estimate in one sentence, or why there is none / why it should not be trusted."""
    if report.target is None:
        return f"no estimate: {report.reason}"
    snips = report.target.snips
    imp = next((i for i in report.improvement if i.estimator == "snips"), None)
    low = f"{snips.ci_low:.3f}" if snips.ci_low is not None else "−∞"
    high = f"{snips.ci_high:.3f}" if snips.ci_high is not None else "+∞"
    text = (f"the current policy is worth {snips.value:.3f} mean reward (95 % studentised bootstrap interval [{low}, {high}]) "
            f"on {report.rows:,} logged requests")
    if imp is not None:
        lower = f"{imp.lower:+.3f}" if imp.lower is not None else "unknown"
        text += f", {imp.difference:+.3f} against the client's own parameters (lower bound {lower})"
    if _ess_too_small(report.target.ess, report.rows):
        text += (f"; the effective sample size is only {report.target.ess:.1f} of {report.rows} rows, so the estimate rests on "
                 "a few heavily weighted requests and is not reliable yet")
    return text


def _unsupported(since: float, until: float, arrays: OpeArrays, exc: ope.UnsupportedTarget) -> OpeOut:
    reason = f"the log does not support the current policy: {exc}; no estimate is given until it has explored those arms"
    return OpeOut(since=since, until=until, rows=arrays.n, skipped=arrays.skipped, method=OPE_METHOD_NAME, method_detail=OPE_METHOD,
                  logged_mean_reward=_mean(arrays.rewards.tolist()), target=None, baseline=None, improvement=[], reason=reason,
                  statement=f"no estimate: {reason}")


def ope_report(
    decider: BanditDecider, rows: list[DecisionRow], since: float, until: float, *, seed: int = 0, n_bootstrap: int = ope.REPORT_BOOTSTRAP_REPLICATES,
    scored: tuple[list[Scored], int] | None = None, per_task: bool = True,
) -> tuple[OpeOut, OpeArrays]:
    """The estimate over every task type, and (per_task) the same estimate restricted to each task type's rows."""
    if per_task and scored is None:
        scored = score_rows(decider, rows)
    report, arrays = _ope_all(decider, rows, since, until, seed=seed, n_bootstrap=n_bootstrap, scored=scored)
    if not per_task or scored is None:
        return report, arrays
    kept, _ = scored
    tasks = []
    for task in sorted({k[0].task_type for k in kept}):
        part, _ = _ope_all(decider, [], since, until, seed=seed, n_bootstrap=n_bootstrap, scored=([k for k in kept if k[0].task_type == task], 0))
        imp = next((i for i in part.improvement if i.estimator == "snips"), None)
        t = part.target
        tasks.append(OpeTaskOut(
            task_type=task, rows=part.rows, ess=t.ess if t is not None else None, policy_value=t.snips.value if t is not None else None,
            baseline_value=part.baseline.snips.value if part.baseline is not None else None,
            improvement=imp.difference if imp is not None else None, improvement_lower=imp.lower if imp is not None else None,
            supported=t is not None and not _ess_too_small(t.ess, part.rows), statement=f"{task}: {part.statement}",
        ))
    return msgspec.structs.replace(report, tasks=tasks), arrays


def _ope_all(
    decider: BanditDecider, rows: list[DecisionRow], since: float, until: float, *, seed: int, n_bootstrap: int,
    scored: tuple[list[Scored], int] | None,
) -> tuple[OpeOut, OpeArrays]:
    arrays = OpeArrays(decider, rows, scored)
    if arrays.n < 2:
        reason = f"{arrays.n} optimized row(s) with a reward in the window; at least 2 are needed"
        return OpeOut(
            since=since, until=until, rows=arrays.n, skipped=arrays.skipped, method=OPE_METHOD_NAME, method_detail=OPE_METHOD,
            logged_mean_reward=_mean(arrays.rewards.tolist()), target=None, baseline=None, improvement=[],
            reason=reason, statement=f"no estimate: {reason}",
        ), arrays
    a = arrays
    try:
        bounds = reward_bounds(decider.reward_settings)
        target = ope.evaluate(
            rewards=a.rewards, behaviour_propensity=a.behaviour, target_propensity=a.target, rng=np.random.default_rng(seed),
            reward_hat_logged=a.q_logged, target_value_hat=a.v_target, n_bootstrap=n_bootstrap, reward_range=bounds, logged_at=a.logged_at,
        )
        baseline = ope.evaluate(
            rewards=a.rewards, behaviour_propensity=a.behaviour, target_propensity=a.baseline, rng=np.random.default_rng(seed),
            reward_hat_logged=a.q_logged, target_value_hat=a.v_baseline, n_bootstrap=n_bootstrap, reward_range=bounds, logged_at=a.logged_at,
        )
    except ope.UnsupportedTarget as exc:
        return _unsupported(since, until, a, exc), a
    improvements = []
    for estimator in ("ips", "snips", "dr"):
        imp = ope.improvement_lower_bound(
            rewards=a.rewards, behaviour_propensity=a.behaviour, target_propensity=a.target, baseline_propensity=a.baseline,
            rng=np.random.default_rng(seed), estimator=estimator, reward_hat_logged=a.q_logged,  # type: ignore[arg-type]
            target_value_hat=a.v_target, baseline_value_hat=a.v_baseline, n_bootstrap=n_bootstrap,
        )
        improvements.append(
            ImprovementOut(estimator=estimator, target=imp.target, baseline=imp.baseline, difference=imp.difference,
                           lower=finite(imp.lower), upper=finite(imp.upper), n=imp.n)
        )
    out = OpeOut(
        since=since, until=until, rows=a.n, skipped=a.skipped, method=OPE_METHOD_NAME, method_detail=OPE_METHOD,
        logged_mean_reward=float(a.rewards.mean()), target=_policy_estimates(decider.policy.name, target),
        baseline=_policy_estimates("baseline", baseline), improvement=improvements,
    )
    return msgspec.structs.replace(out, statement=_statement(out)), a


def ope_evidence(report: OpeOut, estimator: str = "snips") -> tuple[OpeEvidence | None, OpeEvidenceOut]:
    """The rollout guard's promotion evidence (SNIPS improvement lower bound) from an OPE report."""
    imp = next((i for i in report.improvement if i.estimator == estimator), None)
    if imp is None:
        return None, OpeEvidenceOut(estimator=estimator, improvement_lower_bound=None, difference=None, samples=report.rows, reason=report.reason)
    lower = imp.lower if imp.lower is not None else -math.inf
    return (
        OpeEvidence(improvement_lower_bound=lower, samples=imp.n, estimator=estimator),
        OpeEvidenceOut(estimator=estimator, improvement_lower_bound=imp.lower, difference=imp.difference, samples=imp.n),
    )


def next_phase(phase: str) -> str | None:
    return higher(phase)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- tuned vs holdout

HOLDOUT_MODE = "holdout"
ALPHA = 0.05
CS_NOTE = ("anytime-valid {level} % confidence sequence (PrPl-EB, policies.sequences) per stream at α/2, "
           "difference = [L_opt − U_hold, U_opt − L_hold]; values bounded in [{low:g}, {high:g}]{extra}")
P99_NOTE = ("distribution-free order-statistic interval for each stream's p99 at α/2 (exact binomial ranks), "
            "difference = [L_opt − U_hold, U_opt − L_hold]; valid for this window's fixed sample, not anytime-valid; "
            "an open end means too few requests to bound that side")


def quantile_interval(values: Sequence[float], q: float, alpha: float) -> tuple[float | None, float | None]:
    """Order statistics [x_(l), x_(u)] covering the q-quantile with probability ≥ 1 − alpha, whatever the distribution.

    With B ~ Binomial(n, q) the count of values at or below the true quantile,
    P(x_(l) ≤ ξ_q ≤ x_(u)) ≥ P(l ≤ B ≤ u − 1); l is the largest rank with P(B < l) ≤ α/2 and
    u the smallest with P(B ≥ u) ≤ α/2.  A side with no such rank (too few values) is None.
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return None, None
    cdf, acc = [], 0.0  # cdf[k] = P(B ≤ k), in log space per term to stay finite for large n
    log_q, log_p = math.log(q), math.log1p(-q)
    for k in range(n + 1):
        acc += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_q + (n - k) * log_p)
        cdf.append(acc)
    lower_rank = max((k for k in range(1, n + 1) if cdf[k - 1] <= alpha / 2), default=None)
    upper_rank = min((k for k in range(1, n + 1) if 1.0 - cdf[k - 1] <= alpha / 2), default=None)
    return (xs[lower_rank - 1] if lower_rank else None), (xs[upper_rank - 1] if upper_rank else None)


def _signed(x: float, digits: int) -> str:
    return f"{x:+,.{digits}f}"


def _verdict(low: float | None, high: float | None, higher_is_better: bool) -> str:
    if low is None or high is None:
        return "not yet known"
    if low > 0:
        return "better" if higher_is_better else "worse"
    if high < 0:
        return "worse" if higher_is_better else "better"
    return "not yet known"


def _sentence(task: str, label: str, diff: float | None, low: float | None, high: float | None, n: int, digits: int) -> str:
    if diff is None:
        return f"{task}: {label} not comparable yet (needs tuned and holdout requests), {n:,} requests"
    if low is None and high is None:  # neither side bounded: an interval of [−∞, +∞] says only that
        return f"{task}: {_signed(diff, digits)} {label}, not enough data for a {round(100 * (1 - ALPHA))} % interval, {n:,} requests"
    lo = _signed(low, digits) if low is not None else "−∞"
    hi = _signed(high, digits) if high is not None else "+∞"
    return f"{task}: {_signed(diff, digits)} {label}, {round(100 * (1 - ALPHA))} % interval [{lo}, {hi}], {n:,} requests"


MONITOR_WORDS = {"better": "better", "not_yet_known": "not yet known", "worse": "worse"}


def monitor_words(verdict: str, rolled_back: bool) -> str:
    """The conservative monitor's verdict as the dashboard shows it; a rollback outranks the live comparison."""
    return "rolled back" if rolled_back else MONITOR_WORDS.get(verdict, verdict)


def monitor_sentence(task: str, diff: float | None, low: float, high: float, n: int, level: float, words: str) -> str:
    """The monitor's quality comparison in plain words, e.g. "code: +0.12 quality, 97.5 % interval [+0.05, +0.19], 3,412 requests; better"."""
    if diff is None:
        return f"{task}: quality not comparable yet (needs tuned and holdout requests), {n:,} requests; {words}"
    return f"{task}: {_signed(diff, 2)} quality, {100 * level:g} % interval [{_signed(low, 2)}, {_signed(high, 2)}], {n:,} requests; {words}"


KIND_WORDS = {"automatic": "automatic quality", "judge": "judged quality", "explicit": "explicit quality",
              "judge_pairwise": "pairwise win rate against the baseline answer"}


def _kind_clause(k: KindVerdict) -> str:
    """One kind of the monitor's comparison in words, with its interval and the signals behind it."""
    level = f"{100 * k.level:g} % interval"
    if k.reference is not None:
        mean = "n/a" if k.optimised_mean is None else f"{k.optimised_mean:.2f}"
        return (f"{KIND_WORDS.get(k.kind, k.kind)} {mean} (0.5 = no difference), {level} "
                f"[{k.optimised_bounds[0]:.2f}, {k.optimised_bounds[1]:.2f}], {k.optimised_n:,} verdicts")
    diff = k.optimised_mean - k.holdout_mean if k.optimised_mean is not None and k.holdout_mean is not None else None
    if diff is None:
        return f"{KIND_WORDS.get(k.kind, k.kind)} not comparable yet ({k.optimised_n:,} tuned, {k.holdout_n:,} holdout signals)"
    lo, hi = k.difference
    return (f"{_signed(diff, 2)} {KIND_WORDS.get(k.kind, k.kind)}, {level} [{_signed(lo, 2)}, {_signed(hi, 2)}], "
            f"{k.optimised_n + k.holdout_n:,} signals ({k.optimised_n:,} tuned, {k.holdout_n:,} holdout)")


def monitor_summary(v: TaskVerdict) -> str:
    """The monitor's verdict in words: the headline kind first, then every other kind with signals, cost and re-learning.

    e.g. "code: +0.12 judged quality, 98.75 % interval [+0.05, +0.19], 412 signals (380 tuned, 32 holdout); better;
    also +0.00 automatic quality ...; completion_tokens per request 212 tuned vs 150 holdout".
    """
    words = monitor_words(v.verdict, v.rolled_back)
    head = next(k for k in v.signals if k.kind == v.quality_kind)
    parts = [f"{v.task_type}: {_kind_clause(head)}{'' if head.trusted else ' (untrusted: it neither rolls back nor excuses a cost)'}; {words}"]
    others = [_kind_clause(k) + ("" if k.trusted else " (untrusted)") for k in v.signals
              if k.kind != head.kind and (k.optimised_n or k.holdout_n)]
    if others:
        parts.append("also " + "; ".join(others))
    c = v.cost
    if c is not None and c.optimised_mean is not None and c.holdout_mean is not None:
        ratio = f", tuned/holdout >= {c.ratio_lower:.2f}" if c.ratio_lower is not None else ""
        parts.append(f"{c.unit} per request {c.optimised_mean:,.0f} tuned vs {c.holdout_mean:,.0f} holdout{ratio}"
                     + ("; costlier" if c.verdict == "costlier" else ""))
    if v.relearning_since is not None:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(v.relearning_since))
        parts.append(f"re-learning since a change detected at {since} (tuned traffic runs on statistics reopened then)")
    return "; ".join(parts)


def _cs_metric(task: str, metric: str, unit: str, label: str, opt: list[float], hold: list[float], low: float, high: float,
               higher_is_better: bool, digits: int, extra: str = "") -> MetricComparison:
    """Mean tuned − mean holdout with the anytime-valid difference bounds of `policies.sequences`."""
    n = len(opt) + len(hold)
    note = CS_NOTE.format(level=round(100 * (1 - ALPHA)), low=low, high=high, extra=extra)
    if not opt or not hold or not high > low:
        return MetricComparison(metric=metric, unit=unit, optimized=_mean(opt), holdout=_mean(hold), difference=None, ci_low=None,
                                ci_high=None, optimized_n=len(opt), holdout_n=len(hold), anytime_valid=True, interval=note,
                                verdict="not yet known", summary=_sentence(task, label, None, None, None, n, digits))
    comp = sequences.new_comparison(ALPHA, low, high)
    comp = sequences.Comparison(optimised=sequences.observe_many(comp.optimised, np.clip(opt, low, high)),
                                holdout=sequences.observe_many(comp.holdout, np.clip(hold, low, high)))
    d_low, d_high = sequences.difference_bounds(comp)
    diff = float(np.mean(opt) - np.mean(hold))
    return MetricComparison(metric=metric, unit=unit, optimized=_mean(opt), holdout=_mean(hold), difference=diff, ci_low=d_low,
                            ci_high=d_high, optimized_n=len(opt), holdout_n=len(hold), anytime_valid=True, interval=note,
                            verdict=_verdict(d_low, d_high, higher_is_better), summary=_sentence(task, label, diff, d_low, d_high, n, digits))


def _p99_metric(task: str, opt: list[float], hold: list[float]) -> MetricComparison:
    n = len(opt) + len(hold)
    po, ph = quantile(opt, 0.99), quantile(hold, 0.99)
    diff = po - ph if po is not None and ph is not None else None
    lo_o, hi_o = quantile_interval(opt, 0.99, ALPHA / 2)
    lo_h, hi_h = quantile_interval(hold, 0.99, ALPHA / 2)
    d_low = lo_o - hi_h if lo_o is not None and hi_h is not None else None
    d_high = hi_o - lo_h if hi_o is not None and lo_h is not None else None
    return MetricComparison(metric="latency_p99", unit="ms", optimized=po, holdout=ph, difference=diff, ci_low=d_low, ci_high=d_high,
                            optimized_n=len(opt), holdout_n=len(hold), anytime_valid=False, interval=P99_NOTE,
                            verdict="better" if d_high is not None and d_high < 0 else "worse" if d_low is not None and d_low > 0 else "not yet known",
                            summary=_sentence(task, "ms p99 latency", diff, d_low, d_high, n, 0))


def signal_of(row: DecisionRow, kind: str) -> float | None:
    """The row's quality from one signal kind, or None when that kind did not score it.

    ``automatic`` is the completion rules' score (every request). A delayed kind is the log's
    feedback when that kind holds it now (rows written before sources were stored were
    explicit); a stronger kind hides a weaker one, so the judged stream is the requests whose
    strongest signal is the judge's. Nothing unscored counts as 1.0.
    """
    if kind == "automatic":
        return row.quality
    if row.feedback_quality is None:
        return None
    return row.feedback_quality if (row.feedback_source or "explicit") == kind else None


def _win_rate_metric(task: str, opt: list[float], hold: list[float]) -> MetricComparison:
    """Pairwise verdicts: tuned's win rate against the baseline answer, its own interval, 0.5 = no difference."""
    note = (f"anytime-valid {round(100 * (1 - ALPHA))} % confidence sequence (PrPl-EB, policies.sequences) of the tuned "
            "requests' win rate against a baseline answer to the same request (win 1, tie 0.5, loss 0); difference = "
            "win rate − 0.5, the baseline against itself; the holdout column is that check (expected 0.5)")
    label = "win rate against the baseline answer"
    if not opt:
        return MetricComparison(metric="pairwise_win_rate", unit="win rate (0.5 = no difference)", optimized=None, holdout=_mean(hold),
                                difference=None, ci_low=None, ci_high=None, optimized_n=0, holdout_n=len(hold), anytime_valid=True,
                                interval=note, verdict="not yet known", summary=f"{task}: {label} not known yet (no tuned verdicts)")
    lo, hi = sequences.bounds(sequences.observe_many(sequences.new_sequence(ALPHA), np.clip(opt, 0.0, 1.0)))
    rate = float(np.mean(opt))
    d_low, d_high = lo - 0.5, hi - 0.5
    summary = (f"{task}: {label} {rate:.2f} (0.5 = no difference), {round(100 * (1 - ALPHA))} % interval [{lo:.2f}, {hi:.2f}], "
               f"{len(opt):,} verdicts")
    return MetricComparison(metric="pairwise_win_rate", unit="win rate (0.5 = no difference)", optimized=rate, holdout=_mean(hold),
                            difference=rate - 0.5, ci_low=d_low, ci_high=d_high, optimized_n=len(opt), holdout_n=len(hold),
                            anytime_valid=True, interval=note, verdict=_verdict(d_low, d_high, True), summary=summary)


def signal_comparisons(task: str, opt: list[DecisionRow], hold: list[DecisionRow]) -> list[MetricComparison]:
    """Tuned vs holdout per signal kind, like with like (`signal_of`); automatic always, the others once they have signals."""
    out = []
    for kind in GUARDED_KINDS:
        o = [float(v) for v in (signal_of(r, kind) for r in opt) if v is not None and math.isfinite(v)]
        h = [float(v) for v in (signal_of(r, kind) for r in hold) if v is not None and math.isfinite(v)]
        if kind != "automatic" and not o and not h:
            continue
        if kind in WIN_RATE_KINDS:
            out.append(_win_rate_metric(task, o, h))
        else:
            out.append(_cs_metric(task, f"quality_{kind}", "score in [0, 1]", KIND_WORDS[kind], o, h, 0.0, 1.0, True, 2,
                                  extra=f"; only requests scored by this kind ({kind}), never a mix of kinds"))
    return out


def tuned_vs_holdout(rows: Iterable[DecisionRow], reward_low: float, reward_high: float) -> list[TaskComparison]:
    """Per task type: optimised traffic against the always-on holdout (mode ``holdout``), oldest row first.

    Holdout rows are randomised baseline traffic, so the difference needs no model or
    reweighting.  Rows of other baseline modes (off, shadow, rollback) are not a
    randomised control and stay out.  Quality is compared per signal kind
    (`signal_comparisons`); the reward at completion (automatic quality) is its own metric.
    The task's verdict is "rolled back" when its newest row was served in mode ``rollback``;
    else "worse" when some kind is surely worse, "better" when one is surely better and none
    worse, otherwise "not yet known". The headline is the first of explicit, judge, pairwise
    and automatic with tuned and holdout signals.
    """
    by_task: dict[str, list[DecisionRow]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: (r.timestamp, r.request_id)):  # a sequence depends on order: ties broken the same way every time
        by_task[r.task_type].append(r)
    out = []
    for task in sorted(by_task):
        task_rows = by_task[task]
        opt = [r for r in task_rows if r.mode in OPTIMIZED_MODES]
        hold = [r for r in task_rows if r.mode == HOLDOUT_MODE]

        def vals(rs: list[DecisionRow], get: Any) -> list[float]:
            return [float(v) for v in (get(r) for r in rs) if v is not None and math.isfinite(v)]

        ok = lambda r: 200 <= r.status < 300  # noqa: E731
        r_o, r_h = vals(opt, lambda r: r.reward), vals(hold, lambda r: r.reward)
        l_o = vals([r for r in opt if ok(r)], lambda r: r.latency_s * 1000.0)
        l_h = vals([r for r in hold if ok(r)], lambda r: r.latency_s * 1000.0)
        t_o, t_h = vals(opt, lambda r: r.completion_tokens), vals(hold, lambda r: r.completion_tokens)
        t_max = max(t_o + t_h, default=0.0)
        kinds = signal_comparisons(task, opt, hold)
        metrics = [
            *kinds,
            _cs_metric(task, "reward", "reward at completion (automatic quality)", "reward", r_o, r_h, reward_low, reward_high, True, 2),
            _p99_metric(task, l_o, l_h),
            _cs_metric(task, "completion_tokens", "tokens", "completion tokens", t_o, t_h, 0.0, t_max, False, 0,
                       extra=" (the upper bound is the window's largest count, taken from the data)"),
        ]
        rolled = bool(task_rows) and task_rows[-1].mode == "rollback"
        by_metric = {m.metric: m for m in kinds}
        order = ("quality_explicit", "quality_judge", "pairwise_win_rate", "quality_automatic")
        headline = next((by_metric[k] for k in order if k in by_metric and by_metric[k].difference is not None), kinds[0])
        verdicts = [m.verdict for m in kinds]
        verdict = ("rolled back" if rolled else "worse" if "worse" in verdicts else "better" if "better" in verdicts else "not yet known")
        summary = headline.summary + ("; rolled back: this task now gets the baseline" if rolled else f"; verdict: {verdict}")
        out.append(TaskComparison(task_type=task, requests=len(task_rows), optimized_n=len(opt), holdout_n=len(hold), verdict=verdict,
                                  summary=summary, metrics=metrics))
    return out


def reward_range(settings: RewardSettings) -> tuple[float, float]:
    """The bounds `policies.reward.compute_reward` can produce (`policies.reward.reward_bounds`)."""
    return reward_bounds(settings)


def holdout_reward_series(rows: list[DecisionRow], since: float, until: float, bins: int) -> list[RewardPoint]:
    """`reward_series` restricted to optimised vs the randomised holdout (the dashboard's baseline line)."""
    return reward_series([r for r in rows if r.mode in OPTIMIZED_MODES or r.mode == HOLDOUT_MODE], since, until, bins)


def signal_sources(rows: Iterable[DecisionRow]) -> list[SignalSources]:
    """Per task type, how many rows' effective quality came from each source (the strongest one kept)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(("explicit", "judge", "implicit", "automatic", "none"), 0))
    for r in rows:
        if r.feedback_quality is not None:
            source = r.feedback_source if r.feedback_source in ("explicit", "judge", "implicit") else "explicit"
            if r.feedback_source == "judge_pairwise":
                source = "judge"  # the judge in pairwise mode (`GET quality` tells the two apart)
        else:
            source = "automatic" if r.quality is not None else "none"
        counts[r.task_type][source] += 1
    return [SignalSources(task_type=task, **c) for task, c in sorted(counts.items())]


def burn_rate(fill: float | None, window_start: float, window_s: float, now: float) -> float | None:
    """Share of the budget used over the share of the window elapsed: above 1 the window ends over its limit at this pace."""
    elapsed = (now - window_start) / window_s if window_s > 0 else 0.0
    if fill is None or elapsed <= 0:
        return None
    return fill / min(elapsed, 1.0)
