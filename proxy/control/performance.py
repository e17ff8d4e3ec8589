"""Reports over the decision log: metrics, performance, convergence, parameter evolution, OPE, the dashboard.

Each reads a bounded window of rows from the log store and hands it to the pure report
functions in `proxy.control.reports`.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import msgspec
from litestar import Controller, get
from litestar.params import Parameter

from policies import ope
from policies.effort import EFFORT_LEVELS
from proxy.control import reports as cdata
from proxy.control.deps import Deps
from proxy.control.schemas import ConvergenceReport, Dashboard, MetricsReport, OpeOut, ParameterEvolution, PerformanceReport, TrustRegionOut
from proxy.control.views import (
    DAY,
    Bins,
    MaxRows,
    TextFilter,
    WindowS,
    caws_status,
    judge_spend,
    recent_events,
    slo_status,
    status_of,
    window,
)
from proxy.learning import load_rows, score_rows_async


class PerformanceController(Controller):
    path = "/"

    @get("/metrics", summary="Per task type, arm and traffic class: counts, reward CI, latency quantiles, tokens, quality")
    async def metrics(self, deps: Deps, window_s: WindowS = 3600.0, max_rows: MaxRows = 20_000,
                      task_type: TextFilter = None) -> MetricsReport:
        _, since, until = window(window_s)
        rows, truncated = await load_rows(deps.log_store, since=since, until=until, max_rows=max_rows, task_type=task_type)
        return cdata.metrics_report(rows, since, until, truncated)

    @get("/performance", summary="Per task type: optimised vs baseline traffic, the improvement of mean reward, and optimised vs holdout "
                                 "with anytime-valid intervals and verdict")
    async def performance(self, deps: Deps, window_s: WindowS = 3600.0, max_rows: MaxRows = 20_000,
                          task_type: TextFilter = None) -> PerformanceReport:
        _, since, until = window(window_s)
        rows, truncated = await load_rows(deps.log_store, since=since, until=until, max_rows=max_rows, task_type=task_type)
        report = cdata.performance_report(rows, since, until, truncated, cdata.reward_range(deps.config.policy.reward))
        return msgspec.structs.replace(report, judge=judge_spend(deps))

    @get("/convergence", summary="Per task type: the policy's probability of its own choice over time, and its current arm distribution")
    async def convergence(self, deps: Deps, window_s: WindowS = DAY, bins: Bins = 24, max_rows: MaxRows = 20_000) -> ConvergenceReport:
        _, since, until = window(window_s)
        rows, _ = await load_rows(deps.log_store, since=since, until=until, max_rows=max_rows)
        return cdata.convergence(deps.decider, rows, since, until, bins)

    @get("/parameter-evolution", summary="Chosen (policy) and sent temperature / max_tokens over time per task type")
    async def parameter_evolution(self, deps: Deps, window_s: WindowS = DAY, bins: Bins = 24,
                                  max_rows: MaxRows = 20_000) -> ParameterEvolution:
        _, since, until = window(window_s)
        rows, _ = await load_rows(deps.log_store, since=since, until=until, max_rows=max_rows)
        return cdata.parameter_evolution(rows, since, until, bins)

    @get("/dashboard", summary="Everything the dashboard page draws, in one call")
    async def dashboard(self, deps: Deps, window_s: WindowS = 3600.0, bins: Bins = 30, max_rows: MaxRows = 20_000) -> Dashboard:
        now, since, until = window(window_s)
        rows, _ = await load_rows(deps.log_store, since=since, until=until, max_rows=max_rows)
        budget, budget_error = None, None
        try:
            budget = await caws_status(deps, now)
        except Exception as exc:
            budget_error = f"budget store unavailable: {type(exc).__name__}"
        evolution = cdata.parameter_evolution(rows, since, until, bins)
        c = deps.config.constraints
        return Dashboard(
            generated_at=now, status=status_of(deps, now), slo=slo_status(deps, now), slo_latency_p99_ms=deps.config.slo.latency_p99_ms,
            reward_series=cdata.reward_series(rows, since, until, bins), latency_series=cdata.latency_series(rows, since, until, bins),
            parameters=evolution, budget=budget, budget_error=budget_error, events=recent_events(deps, 20),
            performance=cdata.performance_report(rows, since, until, False).tasks, bin_s=evolution.bin_s,
            comparisons=cdata.tuned_vs_holdout(rows, *cdata.reward_range(deps.config.policy.reward)),
            holdout_reward_series=cdata.holdout_reward_series(rows, since, until, bins),
            signal_sources=cdata.signal_sources(rows),
            trust_region=TrustRegionOut(max_delta_temperature=c.max_delta_temperature, max_delta_max_tokens=c.max_delta_max_tokens,
                                        max_delta_effort_levels=c.max_delta_effort_levels, effort_levels=list(EFFORT_LEVELS),
                                        max_relative_delta_max_tokens=c.max_relative_delta_max_tokens, min_temperature=c.min_temperature,
                                        max_temperature=c.max_temperature, max_tokens=c.max_tokens,
                                        raise_client_max_tokens=c.raise_client_max_tokens),
            budget_burn_rate=cdata.burn_rate(budget.fill, budget.window_start, budget.window_s, now) if budget is not None else None,
            judge_spend=judge_spend(deps),
        )

    @get("/ope", summary="IPS / SNIPS / DR estimates with CIs: current policy vs baseline on logged exploration data")
    async def ope(self, deps: Deps, window_s: WindowS = 7 * DAY, max_rows: Annotated[int, Parameter(ge=1, le=50_000)] = 5000,
                  n_bootstrap: Annotated[int, Parameter(ge=10, le=5000)] = ope.REPORT_BOOTSTRAP_REPLICATES,
                  seed: Annotated[int, Parameter(ge=0, le=2**31, schema_extra={"minimum": 0})] = 0) -> OpeOut:
        _, since, until = window(window_s)
        rows, _ = await load_rows(deps.log_store, since=since, until=until, max_rows=max_rows, mode="optimized")
        scored = await score_rows_async(deps.decider, rows)  # the live policy is asked on the loop, in slices
        # Bootstraps for the whole log and each task type: seconds of numpy, off the event loop.
        report, _ = await asyncio.to_thread(cdata.ope_report, deps.decider, rows, since, until, seed=seed, n_bootstrap=n_bootstrap, scored=scored)
        return report
