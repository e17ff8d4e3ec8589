"""Prometheus metrics. One registry per app instance (tests run several in one process).

Label values are bounded: task types and models beyond `MAX_LABEL_VALUES` distinct
values collapse to "other", so a client cannot blow up cardinality.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from guards.budget import BudgetGuard, BudgetStatus
    from guards.rollout import RolloutController
    from guards.slo import SloMonitor
    from policies.records import Decision, Outcome
    from proxy.store import LogStore, Recorder

log = logging.getLogger("thermostat")

MAX_LABEL_VALUES = 50

REWARD_BUCKETS = (-1.0, -0.5, -0.25, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
QUALITY_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
PHASES = ("shadow", "canary", "guarded", "general")
ROLLBACK_TRIGGERS = ("slo", "manual", "disabled")
_GUARDS = frozenset({"budget", "budget_refused", "waiver", "require_caws", "trust_region", "rollout"})

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class BoundedLabel:
    """Maps raw values to at most `limit` label values, the rest to 'other'.

    `on_fold(value)` is called for every value folded into 'other' (the runtime counts
    and warns through it when the same admission bounds its state, not only labels).
    """

    def __init__(self, limit: int = MAX_LABEL_VALUES, on_fold: Callable[[str], None] | None = None) -> None:
        self.limit = limit
        self.seen: set[str] = set()
        self.on_fold = on_fold

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) < self.limit:
            self.seen.add(value)
            return value
        if self.on_fold is not None:
            self.on_fold(value)
        return "other"


class Adds(Protocol):
    """What `Metrics.counter` hands out: `.inc(amount)`, amount >= 0 (the caller checks a variable amount)."""

    def inc(self, amount: float) -> None: ...


class Observes(Protocol):
    """What `Metrics.histogram` hands out: `.observe(amount)`."""

    def observe(self, amount: float) -> None: ...


class _FastHistogram:
    """`Histogram.observe` of one labelled child, without the per-call work that is the same every time.

    prometheus_client's `observe` checks that the child has its labels (a child always has)
    and walks the bucket bounds one Python comparison at a time; this adds to the same value
    holders in the same order: the sum, then the first bucket whose bound is >= amount
    (`bisect_left` on the same sorted bounds, which end in +Inf), and no bucket for NaN
    (where every `amount <= bound` is false). tests/edge/test_metrics_fast_path.py compares
    the exposition with the public API's.
    """

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Any) -> None:
        self._sum = child._sum
        self._bounds = tuple(child._upper_bounds)
        self._buckets = tuple(child._buckets)

    def observe(self, amount: float) -> None:
        self._sum.inc(amount)
        if amount == amount:  # not NaN
            self._buckets[bisect.bisect_left(self._bounds, amount)].inc(1)


def _counter_handle(child: Any) -> Adds:
    """A counter child's value holder when it has the layout `Counter.inc` adds to (else the child itself).

    `Counter.inc(amount)` checks the labels (a child always has them) and the sign, then
    adds to `child._value`; calling the holder skips two Python calls per increment. The
    caller keeps the sign check for amounts that are not constant.
    """
    value: Adds = getattr(child, "_value", None) or child
    return value if callable(getattr(value, "inc", None)) else child  # type: ignore[no-any-return]


def _histogram_handle(child: Any) -> Observes:
    """`_FastHistogram` over a histogram child with the layout `Histogram.observe` uses (else the child itself)."""
    bounds, buckets, total = getattr(child, "_upper_bounds", None), getattr(child, "_buckets", None), getattr(child, "_sum", None)
    if isinstance(bounds, list | tuple) and isinstance(buckets, list) and len(bounds) == len(buckets) and callable(getattr(total, "inc", None)):
        return _FastHistogram(child)
    return child  # type: ignore[no-any-return]


NEGATIVE_INC = "Counters can only be incremented by non-negative amounts."
"""The error `Counter.inc` raises for a negative amount; the fast handles' callers raise the same."""


class Metrics:
    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, cached: label values are bounded, and labels() costs µs per call."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def counter(self, metric: Counter, *values: str) -> Adds:
        """The labelled child's fast increment handle (`_counter_handle`), cached like `child`; the child is
        created on first use only, as with `child`, so no series appears before it is counted."""
        key = (metric, values)
        found = self._fast.get(key)
        if found is None:
            found = self._fast[key] = _counter_handle(self.child(metric, *values))
        return found  # type: ignore[no-any-return]

    def histogram(self, metric: Histogram, *values: str) -> Observes:
        """The labelled child's fast observe handle (`_histogram_handle`), cached like `child`."""
        key = (metric, values)
        found = self._fast.get(key)
        if found is None:
            found = self._fast[key] = _histogram_handle(self.child(metric, *values))
        return found  # type: ignore[no-any-return]

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.task_label = BoundedLabel()
        self.model_label = BoundedLabel()
        self.requests = Counter(
            "thermostat_requests", "Completion requests by outcome", ["model", "task_type", "mode", "arm", "status"], registry=r
        )
        self.request_duration = Histogram(
            "thermostat_request_duration_seconds", "Total request latency", ["task_type", "mode"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "thermostat_time_to_first_token_seconds", "Time to first streamed byte", ["task_type", "mode"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.overhead = Histogram(
            "thermostat_overhead_seconds", "Time spent inside Thermostat, upstream excluded", buckets=OVERHEAD_BUCKETS, registry=r
        )
        self.tokens = Counter("thermostat_tokens", "Tokens reported by upstreams", ["task_type", "kind"], registry=r)
        self.upstream_errors = Counter(
            "thermostat_upstream_errors", "Upstream failures by class", ["upstream", "error_class"], registry=r
        )
        self.queue_dropped = Counter("thermostat_writer_dropped", "Entries dropped because the writer queue was full", registry=r)
        self.written = Counter("thermostat_writer_written", "Entries written to the decision log", registry=r)
        self.guard_reason_label = BoundedLabel(100)
        self.reward = Histogram("thermostat_reward", "Reward of finished requests", ["task_type", "mode"], buckets=REWARD_BUCKETS, registry=r)
        self.quality = Histogram(
            "thermostat_quality", "Quality score of finished requests (automatic or feedback)", ["task_type", "mode"], buckets=QUALITY_BUCKETS, registry=r
        )
        self.decisions = Counter(
            "thermostat_decisions", "Decisions by task type, mode and arm (sent parameters as deltas from baseline)", ["task_type", "mode", "arm"], registry=r
        )
        self.guard_interventions = Counter("thermostat_guard_interventions", "Guard interventions by guard and reason", ["guard", "reason"], registry=r)
        self.feedback = Counter("thermostat_feedback", "Explicit feedback recorded through the control API", ["result"], registry=r)
        self.live: LiveCollector | None = None
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Fast handles of the per-request series (`counter`, `histogram`): bounded like `_children`, whose children they wrap.
        self._fast: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.overhead_handle = _histogram_handle(self.overhead)  # `overhead` has no labels: one handle
        self.client_errors = Counter(
            "thermostat_rejected_requests", "Requests Thermostat answered itself with an error", ["code"], registry=r
        )
        self.unsummarised = Counter(
            "thermostat_unsummarised_responses",
            "Upstream responses relayed without reading usage, because they outgrew upstreams.max_response_bytes",
            ["upstream"],
            registry=r,
        )
        self.folded_keys = Counter(
            "thermostat_folded_keys",
            "Requests whose client-controlled key (task type, model, policy bucket) was past its cap and counted as 'other'",
            ["kind"],
            registry=r,
        )
        self.validation_failures = Counter(
            "thermostat_validation_failures", "Answers that broke their json_schema response format or a tool's parameters", ["task"], registry=r,
        )
        self.regenerations = Counter(
            "thermostat_regenerations", "Answers marked regenerated: the same client asked the same messages again within the window", ["task"], registry=r,
        )
        self.task_rollbacks = Counter(
            "thermostat_task_rollbacks", "Task types rolled back to the baseline by the conservative monitor (optimised worse than holdout)",
            ["task"], registry=r,
        )
        self.judge_muted = Gauge(
            "thermostat_judge_muted", "1 while the judge's scores are muted for the task type (proxy/decision/judge_trust.py), by reason",
            ["task", "reason"], registry=r,
        )
        self.task_changes = Counter(
            "thermostat_task_baseline_changes", "Changes the conservative monitor detected in a task type's holdout quality", ["task"], registry=r,
        )
        # What requests cost (policies/pricing.py): traffic = optimized | holdout | baseline (shadow, off,
        # rollback) | judge (the judge's own calls, task type "_judge").
        self.cost_usd = Counter(
            "thermostat_cost_usd", "US dollars spent on upstream calls, at the model's configured or table price", ["task_type", "traffic"], registry=r,
        )
        # The model as a knob: which model served each finished request (a declared stand-in or the requested one);
        # a task's traffic share per model is this over its sum across models.
        self.served_model = Counter(
            "thermostat_model_requests", "Finished requests by the model that served them, per task type and traffic",
            ["task_type", "model", "traffic"], registry=r,
        )
        self.unknown_price = Counter(
            "thermostat_unknown_price_requests",
            "Requests with reported usage whose model has no known price (cost_usd null, never guessed)", ["upstream", "model"], registry=r,
        )
        self.loop_lag = Histogram(
            "thermostat_event_loop_lag_seconds",
            "How late the event loop ran a timer that should have fired at once (sampled every 0.25 s)",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )


# ---------------------------------------------------------------------------------------------
# Control-plane metrics: decision counters the edge feeds, and gauges read from live state at
# scrape time (a custom collector plus an async refresh of the budget before each scrape).
# ---------------------------------------------------------------------------------------------

def guard_interventions(mode: str, guard_notes: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """(guard, reason) pairs of one decision, with bounded values.

    Notes like ``budget:cheaper_fit`` / ``budget_refused:waiver_required`` map to
    (budget, cheaper_fit) / (budget_refused, waiver_required); ``waiver:WV-0001`` to
    (waiver, used) (ids would be unbounded); ``budget:chosen`` / ``budget:baseline``
    are not interventions. Modes rollback/off count as (rollout, rollback|disabled),
    guard_fallback as (trust_region, arm_swapped).
    """
    out: list[tuple[str, str]] = []
    for note in guard_notes:
        guard, _, reason = note.partition(":")
        if guard not in _GUARDS:
            guard, reason = "other", "other"
        if guard == "waiver":
            reason = "used"
        if guard == "budget" and reason in ("chosen", "baseline"):
            continue
        out.append((guard, reason or "unspecified"))
    if mode == "rollback":
        out.append(("rollout", "rollback"))
    elif mode == "off":
        out.append(("rollout", "disabled"))
    elif mode == "guard_fallback":
        out.append(("trust_region", "arm_swapped"))
    return out


_MODE_INTERVENTIONS = frozenset({"rollback", "off", "guard_fallback"})
"""The modes `guard_interventions` counts even without guard notes."""


def cost_traffic(mode: str) -> str:
    """The `traffic` label of `thermostat_cost_usd_total` for a decision's mode."""
    if mode in ("optimized", "guard_fallback"):
        return "optimized"
    return "holdout" if mode == "holdout" else "baseline"


@functools.lru_cache(maxsize=1024)
def _interventions(mode: str, guard_notes: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """`guard_interventions`, cached: a pure function of its arguments, and the same few (mode, notes) recur on
    every request (notes with an id, a waiver's, are bounded by `maxsize` like any other)."""
    return tuple(guard_interventions(mode, guard_notes))


def observe_decision(m: Metrics, decision: Decision, outcome: Outcome, arm: str) -> None:
    """Call from the edge once per finished request (after `decider.observe`)."""
    decision_series(m, decision, outcome, arm)


def decision_series(m: Metrics, decision: Decision, outcome: Outcome, arm: str) -> str:
    """`observe_decision`, returning the task's label (`RecordMetrics` labels its own series with it).

    Through the fast handles (`Metrics.counter`, `Metrics.histogram`): the same series, the
    same amounts in the same order, and the same ValueError for a negative count.
    """
    task = m.task_label(decision.context.task_type)
    mode = decision.mode
    traffic = cost_traffic(mode)
    upstream, model = decision.served_by
    m.counter(m.served_model, task, m.model_label(model), traffic).inc(1)
    cost = outcome.cost_usd
    if cost is not None:
        if cost < 0:
            raise ValueError(NEGATIVE_INC)
        m.counter(m.cost_usd, task, traffic).inc(cost)
    elif outcome.prompt_tokens is not None or outcome.completion_tokens is not None:
        m.counter(m.unknown_price, upstream, m.model_label(model)).inc(1)
    m.counter(m.decisions, task, mode, arm).inc(1)
    notes = decision.guard_notes
    if notes or mode in _MODE_INTERVENTIONS:  # nothing to count otherwise (`guard_interventions`)
        for guard, reason in _interventions(mode, notes) if type(notes) is tuple else guard_interventions(mode, notes):
            m.counter(m.guard_interventions, guard, m.guard_reason_label(reason)).inc(1)
    reward = outcome.reward
    if reward is not None and math.isfinite(reward):
        m.histogram(m.reward, task, mode).observe(reward)
    quality = outcome.quality
    if quality is not None and math.isfinite(quality):
        m.histogram(m.quality, task, mode).observe(quality)
    return task


class RolloutSource(Protocol):
    """Whoever holds the live rollout controller (the decider: start-up may swap the controller, so it is never captured)."""

    @property
    def rollout(self) -> RolloutController: ...


@dataclass(frozen=True, slots=True)
class LiveSources:
    """The state the scrape-time gauges read, and nothing else."""

    slo: SloMonitor
    rollout: RolloutSource
    budget: BudgetGuard
    log_store: LogStore
    recorder: Recorder


class LiveCollector(Collector):
    """Gauges computed from live state at scrape time: SLOs, rollout, rollbacks, budget, spool."""

    def __init__(self, sources: LiveSources) -> None:
        self.sources = sources
        self.budget: BudgetStatus | None = None  # refreshed by `refresh_live` before each scrape
        self.budget_ok = False
        self._seen_rollbacks: set[tuple[float, str, str]] = set()
        self.rollbacks: dict[str, int] = {t: 0 for t in ROLLBACK_TRIGGERS}

    def _sync_rollbacks(self) -> None:
        for e in self.sources.rollout.rollout.state.events:
            if e.kind not in ("rollback", "disable"):
                continue
            key = (e.at, e.kind, e.reason)
            if key in self._seen_rollbacks:
                continue
            self._seen_rollbacks.add(key)
            trigger = "disabled" if e.kind == "disable" else ("manual" if e.actor else "slo")
            self.rollbacks[trigger] += 1

    def collect(self) -> Iterator[Any]:
        src = self.sources
        now = time.time()
        report = src.slo.report(now)
        value = GaugeMetricFamily("thermostat_slo_value", "Current SLO value (latency ms, mean quality, error rate)", labels=["slo", "traffic"])
        threshold = GaugeMetricFamily("thermostat_slo_threshold", "Configured SLO threshold", labels=["slo"])
        compliant = GaugeMetricFamily("thermostat_slo_compliant", "1 when the traffic class meets every judged SLO", labels=["traffic"])
        samples = GaugeMetricFamily("thermostat_slo_samples", "Samples in the SLO window", labels=["slo", "traffic"])
        for traffic in (report.optimized, report.baseline):
            compliant.add_metric([traffic.traffic], 1.0 if traffic.compliant else 0.0)
            for c in traffic.checks:
                if c.value is not None and math.isfinite(c.value):
                    value.add_metric([c.name, traffic.traffic], c.value)
                samples.add_metric([c.name, traffic.traffic], c.samples)
        for c in report.optimized.checks:
            threshold.add_metric([c.name], c.threshold)
        yield from (value, threshold, compliant, samples)

        rollout = src.rollout.rollout
        eff = rollout.effective(now)
        phase = GaugeMetricFamily("thermostat_rollout_phase", "1 for the current rollout phase", labels=["phase"])
        for p in PHASES:
            phase.add_metric([p], 1.0 if rollout.state.phase == p else 0.0)
        yield phase
        yield GaugeMetricFamily("thermostat_rollout_traffic_fraction", "Share of traffic optimised now", value=eff.fraction if eff.optimizing_allowed else 0.0)
        active = GaugeMetricFamily("thermostat_rollback_active", "1 while rolled back, by trigger", labels=["trigger"])
        rb = rollout.state.rollback
        for t in ROLLBACK_TRIGGERS:
            active.add_metric([t], 1.0 if (eff.rollback is not None and rb.trigger == t) else 0.0)
        yield active
        self._sync_rollbacks()
        rollbacks = CounterMetricFamily("thermostat_rollbacks", "Rollbacks seen by this process, by trigger", labels=["trigger"])
        for t in ROLLBACK_TRIGGERS:
            rollbacks.add_metric([t], self.rollbacks[t])
        yield rollbacks

        b = self.budget
        yield GaugeMetricFamily("thermostat_budget_up", "1 when the budget store answered the last scrape", value=1.0 if self.budget_ok else 0.0)
        if b is not None:
            yield GaugeMetricFamily("thermostat_budget_used_tokens", "Tokens used in the current budget window", value=b.used)
            yield GaugeMetricFamily("thermostat_budget_reserved_tokens", "Tokens reserved by requests in flight", value=b.reserved)
            yield GaugeMetricFamily("thermostat_budget_limit_tokens", "Configured token budget per window", value=b.limit)
            yield GaugeMetricFamily("thermostat_budget_effective_limit_tokens", "Budget plus active waivers", value=b.effective_limit)
            yield GaugeMetricFamily("thermostat_budget_overruns", "Requests sent past the limit this window", value=b.overruns)
            yield GaugeMetricFamily("thermostat_budget_active_waivers", "Active CAWS waivers", value=len(b.active_waivers))
            yield GaugeMetricFamily("thermostat_budget_resets_at_seconds", "Unix time the budget window resets", value=b.resets_at)

        st = src.log_store.status()
        if st is not None:
            yield GaugeMetricFamily("thermostat_spool_entries", "Entries waiting in the local spool for the database", value=st.spool_entries)
            yield GaugeMetricFamily("thermostat_spool_batches", "Batches waiting in the local spool", value=st.spool_batches)
            yield GaugeMetricFamily("thermostat_store_connected", "1 when the decision log is connected", value=1.0 if st.connected else 0.0)
        yield GaugeMetricFamily("thermostat_writer_queue_capacity", "Capacity of the writer queue", value=src.recorder.queue.maxsize)
        # Read at scrape time (not a set_function gauge: those do not survive multiprocess mode).
        yield GaugeMetricFamily("thermostat_writer_queue_depth", "Entries waiting for the decision-log writer", value=src.recorder.queue.qsize())


def install_live_metrics(m: Metrics, sources: LiveSources) -> LiveCollector:
    """Register the live collector on the process's registry (once)."""
    if m.live is not None:
        return m.live
    live = LiveCollector(sources)
    m.registry.register(live)
    m.live = live
    return live


@runtime_checkable
class FoldsBuckets(Protocol):
    """A policy that pools context buckets past its cap (`policy.thompson.max_buckets`) and counts what it pooled."""

    folded_buckets: int


class FoldedBuckets:
    """Exports the policy's pooled-bucket count (the policy is pure and keeps no metrics); called once per rollout tick."""

    def __init__(self, policy: object, metrics: Metrics) -> None:
        self.policy = policy if isinstance(policy, FoldsBuckets) else None
        self.metrics = metrics
        self.seen = 0
        self._warned = False

    def __call__(self) -> None:
        if self.policy is None:
            return
        folded = int(self.policy.folded_buckets)
        if folded > self.seen:
            self.metrics.child(self.metrics.folded_keys, "bucket").inc(folded - self.seen)
            self.seen = folded
            if not self._warned:
                self._warned = True
                log.warning("more context buckets than policy.thompson.max_buckets; new ones are learned together as 'other'")


async def refresh_live(live: LiveCollector, timeout_s: float = 0.5) -> None:
    """Read the budget (an async store call) right before a scrape."""
    try:
        live.budget = await asyncio.wait_for(live.sources.budget.status(time.time()), timeout_s)
        live.budget_ok = True
    except Exception:
        live.budget_ok = False


def exposition(m: Metrics) -> bytes:
    """`/metrics` body: this registry, or every worker's when PROMETHEUS_MULTIPROC_DIR is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import CollectorRegistry as _Registry
        from prometheus_client import multiprocess

        registry = _Registry()
        multiprocess.MultiProcessCollector(registry)
        live = m.live
        if live is not None:
            registry.register(live)  # live gauges are process-local reads of shared state
        return generate_latest(registry)
    return generate_latest(m.registry)


async def watch_loop_lag(histogram: Histogram, interval_s: float = 0.25) -> None:
    """Observe how late a `interval_s` sleep wakes up: the time callbacks wait for the loop.

    Any synchronous work longer than a few milliseconds shows up here; it is the signal
    that periodic work scales with state instead of running off the loop.
    """
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval_s)
        histogram.observe(max(0.0, loop.time() - start - interval_s))
