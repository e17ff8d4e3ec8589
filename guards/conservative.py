"""The conservative guarantee: per task type, optimised traffic never stays worse than the holdout.

Every completed request of a task type is either optimised (mode ``optimized`` or
``guard_fallback``) or holdout (mode ``holdout``: the always-on random share served
the baseline).  Holdout requests are the on-policy baseline, so comparing the two
streams measures what tuning does, with no model and no reweighting.  The monitor is
checked after every outcome, so every claim it makes is *anytime-valid*: it holds at
all looks at once with probability ≥ 1 − α, and polling does not inflate false alarms
(`policies.sequences`).  α is split evenly between the two claims below, so the chance
that a task with no regression is ever rolled back is at most α (default 5 %) per
comparison (a detected change starts a new comparison with its own α).

Quality (the seed's "quality ≥ baseline − 5 %").  One PrPl-EB confidence sequence per
stream over quality in [0, 1] (`policies.sequences.Comparison` at α/2).  "worse" once
U_opt < (1 − max_quality_regression)·L_hold, i.e. mean quality of optimised traffic is
surely more than `max_quality_regression` (relative) below holdout's; "better" once
L_opt > U_hold.

Latency (the seed's "p99 ≤ baseline + 10 %").  A quantile has no bounded-mean CS of its
own, so the comparison is reduced to two Bernoulli means:

1. Warm-up: the first `latency_warmup` holdout latencies fix a reference τ₀, their
   empirical `latency_quantile` (0.99).  τ₀ is then frozen, so it is independent of
   everything the sequences below see (they stay valid; a threshold that kept moving
   with the data would not be predictable).
2. After warm-up, holdout requests feed 1[latency > τ₀] and optimised requests
   1[latency > (1 + m)·τ₀] (m = `max_latency_regression`) into a `Comparison` at α/2.
   Write p_h = P(holdout > τ₀) (≈ 1 %, by the choice of τ₀) and p_o = P(optimised >
   (1 + m)·τ₀).
3. "worse" once the lower bound of p_o exceeds the upper bound of p_h.  Then p_o > p_h,
   and with q = 1 − p_h: holdout's q-quantile is ≤ τ₀ (P(holdout > τ₀) = p_h) while
   optimised's q-quantile is > (1 + m)·τ₀ (P(optimised > (1 + m)τ₀) > 1 − q), so
   optimised's q-quantile is more than (1 + m) times holdout's.  q is the holdout's true
   exceedance level of τ₀, ≈ 0.99 and reported with its interval
   (`TaskVerdict.holdout_exceedance`); the claim is exact at that level whatever τ₀ is,
   so an unlucky warm-up moves the quantile that is compared, never the error rate.

Non-stationarity.  A two-sided Page–Hinkley detector runs on holdout quality
(standardised by its running standard deviation, so one threshold serves streams of
any spread).  A change there means the baseline itself moved: the comparison's
constant-mean assumption is broken, so the task's sequences and latency reference
restart, and a ``change_detected`` event asks the caller to reopen exploration and
raise an alert.

Rollback.  On "worse" the task is rolled back at once: `rolled_back(task)` is true
(the decider then serves the baseline with mode ``rollback``) and a ``rollback`` event
is returned for the caller to record, count and alert on.  A rollback stays until an
operator calls `resume`; rollback traffic feeds nothing (there is no optimised stream
left to compare with), so a rolled-back task cannot flap.

Everything is pure: state in, new state and events out, `now` injected.  The state is
frozen msgspec structs (persist with msgspec.json), bounded to `max_tasks` task types:
task types past the cap are folded into ``other``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import msgspec
import numpy as np

from guards.settings import SloSettings
from policies import sequences
from policies.sequences import Comparison

OTHER_TASK = "other"
OPTIMISED_MODES = frozenset({"optimized", "guard_fallback"})
HOLDOUT_MODES = frozenset({"holdout"})

TaskVerdictName = Literal["better", "not_yet_known", "worse"]
EventKind = Literal["rollback", "change_detected"]


class ConservativeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Thresholds of the monitor; the two regressions come from `[slo]` (`from_slo`)."""

    max_quality_regression: float = 0.05  # relative: optimised mean quality >= (1 − this)·holdout's
    max_latency_regression: float = 0.10  # relative: optimised p99 <= (1 + this)·holdout's
    alpha: float = 0.05  # total error of both claims (each gets alpha / 2)
    latency_warmup: int = 200  # holdout latencies that fix the reference τ₀
    latency_quantile: float = 0.99
    change_delta: float = 0.25  # Page–Hinkley slack per sample, in running standard deviations
    change_threshold: float = 20.0  # Page–Hinkley alarm level, in running standard deviations
    change_min_samples: int = 30  # no change alarm before this many holdout samples
    max_tasks: int = 64

    @classmethod
    def from_slo(cls, slo: SloSettings, **overrides: Any) -> ConservativeSettings:
        """The monitor's settings with `[slo] max_quality_regression` and `max_latency_regression`."""
        return cls(max_quality_regression=slo.max_quality_regression, max_latency_regression=slo.max_latency_regression, **overrides)


class PageHinkley(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Two-sided Page–Hinkley statistics over a stream (running mean and variance included)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0  # Σ (x − mean)², Welford
    up: float = 0.0  # Σ (x − mean − δσ): grows when the mean rises
    up_min: float = 0.0
    down: float = 0.0  # Σ (x − mean + δσ): falls when the mean drops
    down_max: float = 0.0


class LatencyState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Warm-up holdout latencies until τ₀ is fixed, then exceedance sequences (module docstring)."""

    exceed: Comparison
    warmup: tuple[float, ...] = ()
    reference_s: float | None = None  # τ₀


class TaskState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    quality: Comparison
    latency: LatencyState
    change: PageHinkley = PageHinkley()
    rolled_back_at: float | None = None
    rollback_reason: str = ""


class MonitorState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tasks: dict[str, TaskState] = {}


class MonitorEvent(msgspec.Struct, frozen=True):
    """Something the caller records (event log), counts (metric) and alerts on."""

    kind: EventKind
    task_type: str
    at: float
    reason: str
    evidence: dict[str, Any] = {}


class TaskVerdict(msgspec.Struct, frozen=True):
    """Optimised vs holdout for one task type, with the anytime-valid intervals behind the verdict."""

    task_type: str
    verdict: TaskVerdictName
    quality: TaskVerdictName
    latency: TaskVerdictName  # never "better": only a regression is tested
    rolled_back: bool
    optimised_n: int
    holdout_n: int
    optimised_quality: tuple[float, float]
    holdout_quality: tuple[float, float]
    quality_difference: tuple[float, float]  # optimised − holdout
    latency_reference_s: float | None  # τ₀; None during warm-up
    optimised_exceedance: tuple[float, float]  # P(optimised > (1 + m)·τ₀)
    holdout_exceedance: tuple[float, float]  # P(holdout > τ₀): 1 − the quantile level compared
    reason: str = ""
    optimised_mean: float | None = None  # sample mean quality; the point a reader sets against the interval
    holdout_mean: float | None = None


def new_state() -> MonitorState:
    return MonitorState()


def _new_task(s: ConservativeSettings) -> TaskState:
    half = s.alpha / 2.0
    return TaskState(quality=sequences.new_comparison(half), latency=LatencyState(exceed=sequences.new_comparison(half)))


def task_key(state: MonitorState, task: str, s: ConservativeSettings) -> str:
    """`task`, or ``other`` once `max_tasks` task types are tracked (``other`` takes the last slot)."""
    if task in state.tasks or len(state.tasks) < s.max_tasks - 1:
        return task
    return OTHER_TASK


def _page_hinkley(ph: PageHinkley, x: float, s: ConservativeSettings) -> tuple[PageHinkley, str | None]:
    n = ph.n + 1
    delta = x - ph.mean
    mean = ph.mean + delta / n
    m2 = ph.m2 + delta * (x - mean)
    sd = max(math.sqrt(m2 / n), 0.01)  # the floor keeps a constant stream from dividing by zero
    up = ph.up + x - mean - s.change_delta * sd
    down = ph.down + x - mean + s.change_delta * sd
    new = PageHinkley(n=n, mean=mean, m2=m2, up=up, up_min=min(ph.up_min, up), down=down, down_max=max(ph.down_max, down))
    if n >= s.change_min_samples:
        if up - new.up_min > s.change_threshold * sd:
            return new, f"holdout quality rose (Page–Hinkley {(up - new.up_min) / sd:.1f} sd > {s.change_threshold:g})"
        if new.down_max - down > s.change_threshold * sd:
            return new, f"holdout quality fell (Page–Hinkley {(new.down_max - down) / sd:.1f} sd > {s.change_threshold:g})"
    return new, None


def _observe_latency(lat: LatencyState, holdout: bool, latency_s: float, s: ConservativeSettings) -> LatencyState:
    if lat.reference_s is None:
        if not holdout:
            return lat  # nothing to compare with before τ₀ exists
        warmup = lat.warmup + (latency_s,)
        if len(warmup) < s.latency_warmup:
            return msgspec.structs.replace(lat, warmup=warmup)
        reference = float(np.quantile(np.asarray(warmup), s.latency_quantile))
        return msgspec.structs.replace(lat, warmup=(), reference_s=reference)
    if holdout:
        exceed = sequences.observe_holdout(lat.exceed, 1.0 if latency_s > lat.reference_s else 0.0)
    else:
        limit = (1.0 + s.max_latency_regression) * lat.reference_s
        exceed = sequences.observe_optimised(lat.exceed, 1.0 if latency_s > limit else 0.0)
    return msgspec.structs.replace(lat, exceed=exceed)


def _quality_verdict(t: TaskState, s: ConservativeSettings) -> TaskVerdictName:
    v = sequences.verdict(t.quality, margin=s.max_quality_regression)
    return "not_yet_known" if v == "unknown" else v


def _latency_verdict(t: TaskState) -> TaskVerdictName:
    c = t.latency.exceed
    if t.latency.reference_s is None or not c.optimised.n or not c.holdout.n:
        return "not_yet_known"
    return "worse" if sequences.bounds(c.optimised)[0] > sequences.bounds(c.holdout)[1] else "not_yet_known"


def _sample_mean(seq: sequences.MeanSequence) -> float | None:
    return seq.low + (seq.high - seq.low) * seq.sum_x / seq.n if seq.n else None


def _verdict(key: str, t: TaskState, s: ConservativeSettings) -> TaskVerdict:
    quality, latency = _quality_verdict(t, s), _latency_verdict(t)
    reasons = []
    opt_q, hold_q = sequences.bounds(t.quality.optimised), sequences.bounds(t.quality.holdout)
    opt_x, hold_x = sequences.bounds(t.latency.exceed.optimised), sequences.bounds(t.latency.exceed.holdout)
    if quality == "worse":
        reasons.append(
            f"optimised mean quality <= {opt_q[1]:.4f} < (1 - {s.max_quality_regression:g}) x holdout's >= {hold_q[0]:.4f}"
        )
    if latency == "worse":
        reasons.append(
            f"P(optimised latency > {1.0 + s.max_latency_regression:g} x {t.latency.reference_s:.4g}s) >= {opt_x[0]:.4f} "
            f"> P(holdout latency > {t.latency.reference_s:.4g}s) <= {hold_x[1]:.4f}"
        )
    overall: TaskVerdictName = "worse" if "worse" in (quality, latency) else quality
    return TaskVerdict(
        task_type=key,
        verdict=overall,
        quality=quality,
        latency=latency,
        rolled_back=t.rolled_back_at is not None,
        optimised_n=t.quality.optimised.n,
        holdout_n=t.quality.holdout.n,
        optimised_quality=opt_q,
        holdout_quality=hold_q,
        quality_difference=sequences.difference_bounds(t.quality),
        latency_reference_s=t.latency.reference_s,
        optimised_exceedance=opt_x,
        holdout_exceedance=hold_x,
        reason="; ".join(reasons) or t.rollback_reason,
        optimised_mean=_sample_mean(t.quality.optimised),
        holdout_mean=_sample_mean(t.quality.holdout),
    )


def observe(
    state: MonitorState,
    s: ConservativeSettings,
    *,
    task: str,
    mode: str,
    quality: float | None,
    latency_s: float | None,
    now: float,
) -> tuple[MonitorState, list[MonitorEvent]]:
    """Fold one completed request in; the events say what happened (rollback, change_detected).

    `quality` None (no signal yet) or a failed request's `latency_s` None skip that part.
    Modes other than optimised and holdout (off, shadow, rollback) change nothing.
    """
    holdout = mode in HOLDOUT_MODES
    if not holdout and mode not in OPTIMISED_MODES:
        return state, []
    key = task_key(state, task, s)
    t = state.tasks.get(key) or _new_task(s)
    if t.rolled_back_at is not None:
        return state, []
    events: list[MonitorEvent] = []
    if quality is not None and math.isfinite(quality):
        q = min(1.0, max(0.0, quality))
        if holdout:
            change, alarm = _page_hinkley(t.change, q, s)
            if alarm is not None:
                events.append(MonitorEvent(kind="change_detected", task_type=key, at=now, reason=alarm, evidence={"holdout_samples": change.n}))
                t = _new_task(s)  # the baseline moved: old evidence describes a different world
            else:
                t = msgspec.structs.replace(t, change=change, quality=sequences.observe_holdout(t.quality, q))
        else:
            t = msgspec.structs.replace(t, quality=sequences.observe_optimised(t.quality, q))
    if latency_s is not None and math.isfinite(latency_s) and latency_s >= 0:
        t = msgspec.structs.replace(t, latency=_observe_latency(t.latency, holdout, latency_s, s))
    if "worse" in (_quality_verdict(t, s), _latency_verdict(t)):  # cheap checks first; the full verdict only on a rollback
        v = _verdict(key, t, s)
        t = msgspec.structs.replace(t, rolled_back_at=now, rollback_reason=v.reason)
        events.append(MonitorEvent(kind="rollback", task_type=key, at=now, reason=v.reason, evidence=msgspec.to_builtins(v)))
    return MonitorState(tasks={**state.tasks, key: t}), events


def verdict(state: MonitorState, s: ConservativeSettings, task: str) -> TaskVerdict:
    """The task's current comparison (an empty one for a task never seen)."""
    key = task_key(state, task, s)
    return _verdict(key, state.tasks.get(key) or _new_task(s), s)


def rolled_back(state: MonitorState, task: str, s: ConservativeSettings | None = None) -> bool:
    """True while `task` (or ``other``, for a task folded into it) must be served the baseline."""
    key = task_key(state, task, s or ConservativeSettings())
    t = state.tasks.get(key)
    return t is not None and t.rolled_back_at is not None


def resume(state: MonitorState, s: ConservativeSettings, task: str) -> MonitorState:
    """An operator's resume: the task starts over with fresh sequences (the old ones convicted it)."""
    key = task_key(state, task, s)
    if key not in state.tasks:
        return state
    return MonitorState(tasks={**state.tasks, key: _new_task(s)})


class ConservativeMonitor:
    """The hook for the decision room: one in-process owner of the pure state above.

    Wiring (for the composition root):
      - call `on_outcome(decision, outcome, now)` once per completed (Decision, Outcome),
        after the automatic quality is set (a later feedback correction is not re-counted:
        each request is one sample, the sequences cannot take a sample back); record each
        returned event (EventRecord kind = event.kind, evidence = event.evidence),
        increment a metric per kind and raise an alert;
      - the decider asks `is_rolled_back(task_type)` before optimising and, when true,
        serves the baseline with mode ``rollback``;
      - on ``change_detected``, reopen exploration for that task type;
      - persist `state` (msgspec.json) with the other embedded state under data_dir.
    Not thread-safe: call it from the event loop (each call is O(1): tens of µs, bench/results/conservative_monitor.md).
    """

    def __init__(self, settings: ConservativeSettings, state: MonitorState | None = None) -> None:
        self.settings = settings
        self.state = state or new_state()

    def on_outcome(self, decision: Any, outcome: Any, now: float) -> list[MonitorEvent]:
        """`decision` a policies.records.Decision, `outcome` its policies.records.Outcome."""
        ok = 200 <= outcome.status < 300 and outcome.error_class is None
        self.state, events = observe(
            self.state,
            self.settings,
            task=decision.context.task_type,
            mode=decision.mode,
            quality=outcome.quality,
            latency_s=outcome.latency_s if ok else None,
            now=now,
        )
        return events

    def is_rolled_back(self, task_type: str) -> bool:
        return rolled_back(self.state, task_type, self.settings)

    def verdict(self, task_type: str) -> TaskVerdict:
        return verdict(self.state, self.settings, task_type)

    def verdicts(self) -> list[TaskVerdict]:
        """Every tracked task type, for the dashboard and `slo-status`."""
        return [verdict(self.state, self.settings, task) for task in sorted(self.state.tasks)]

    def resume(self, task_type: str) -> None:
        self.state = resume(self.state, self.settings, task_type)
