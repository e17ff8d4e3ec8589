"""The conservative guarantee: per task type, optimised traffic never stays worse than the holdout.

Every completed request of a task type is either optimised (mode ``optimized`` or
``guard_fallback``) or holdout (mode ``holdout``: the always-on random share served
the baseline).  Holdout requests are the on-policy baseline, so comparing the two
streams measures what tuning does, with no model and no reweighting.  The monitor is
checked after every observation, so every claim it makes is *anytime-valid*: it holds at
all looks at once with probability ≥ 1 − α, and polling does not inflate false alarms
(`policies.sequences`).  α is split evenly between latency (α/2) and the quality and
cost claims (α/2, shared evenly by the `QUALITY_KINDS` comparisons and the cost one), so
the chance that a task with no regression is ever rolled back is at most α (default 5 %)
per comparison (a detected change starts a new comparison with its own α).

Quality, one comparison per signal kind (like with like).  A request is scored by the
automatic rules when it completes (``automatic``: every request), and later, for some
requests, by the judge (``judge``, pointwise; ``judge_pairwise``, a verdict against the
baseline's answer) or by the client (``explicit``).  Each kind is its own pair of streams:
judged optimised requests are compared with judged holdout requests, explicit with
explicit, and a request without a signal of that kind is simply not in that comparison
(never scored 1.0).  So a sample rate dilutes nothing: the judged comparison measures the
judged difference, at the width its number of judged requests allows.  Regeneration marks
(``implicit``) are one-sided (only failures are ever marked; an unmarked answer is not yet a
success), so they have no mean to compare and stay out of the guards.

For a quality kind, one PrPl-EB confidence sequence per stream over quality in [0, 1]
(`policies.sequences.Comparison`).  "worse" once U_opt < (1 − max_quality_regression)·L_hold,
i.e. mean quality of optimised traffic is surely more than `max_quality_regression`
(relative) below holdout's; "better" once L_opt > U_hold.  A pairwise verdict is not a
quality: it is the win rate of the request's answer against a baseline answer to the same
request, on which "no difference" is exactly 0.5 (the baseline against itself, shown in a
random order), so that kind is "better" once L_opt > 0.5 and "worse" once
U_opt < (1 − max_quality_regression)·0.5; its holdout stream is kept as a check of the 0.5.

Cost.  Per-request cost (completion tokens today: the prompt is the client's and the same
in both streams; the same stream takes dollars once they are known per request, `cost_unit`)
is bounded by a cap S frozen after `cost_warmup` holdout requests: S = `cost_cap_factor` ×
the largest warm-up holdout cost, so it is independent of everything the sequences see.
Costs are clipped to [0, S] and compared with a `Comparison`.  "costlier" once
L_opt > (1 + max_cost_regression)·U_hold: the mean clipped cost of optimised traffic is
surely more than `max_cost_regression` above holdout's (clipping can only lower optimised
cost, and binds for holdout only beyond twice its warm-up maximum; the verdict reports the
share of holdout requests clipped).  A costlier task is rolled back unless some trusted
quality kind says "better": the client never pays more for nothing.  When the task has
delayed signals, the rollback waits until each trusted delayed kind has
`cost_patience_signals` signals per stream (`_cost_breach`: a sparse judge gives the cost
comparison many samples for each of its own, and a real gain needs its signals to show).

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

Trust.  A kind can be marked untrusted for a task (`observe_signal(trusted=False)`, e.g. a
judge whose scores disagree with explicit feedback or were found biased): its comparison
is still kept and shown, but it neither rolls back nor excuses a cost regression.

Non-stationarity.  Two-sided Page–Hinkley detectors (standardised by their running
standard deviation, so one threshold serves streams of any spread) run on the holdout's
quality of every kind but the pairwise one (the baseline against itself does not move when
the model does), on its answer length (completion tokens) and on its truncation rate
(finish reason ``length``).  A change there means the baseline itself moved: the
comparison's constant-mean assumption is broken, so the task's sequences, latency reference
and cost cap restart, and a ``change_detected`` event asks the caller to reopen exploration
and raise an alert.  From then on the task is *re-learning* (`TaskVerdict.relearning_since`)
until `relearn_signals` optimised signals of the kind that saw the change (the automatic
one for length and truncation) have been compared afresh; a ``relearning_ended`` event closes
the interval, so reports can show when tuned traffic ran on re-learnt statistics.

Rollback.  On "worse" (or costlier without a sure gain) the task is rolled back at once:
`rolled_back(task)` is true (the decider then serves the baseline with mode ``rollback``)
and a ``rollback`` event is returned for the caller to record, count and alert on.  A
rollback stays until an operator calls `resume`; rollback traffic feeds nothing (there is
no optimised stream left to compare with), so a rolled-back task cannot flap.

Everything is pure: state in, new state and events out, `now` injected.  The state is
frozen msgspec structs (persist with msgspec.json), bounded to `max_tasks` task types:
task types past the cap are folded into ``other``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import msgspec
import numpy as np

from guards.settings import SloSettings
from policies import sequences
from policies.quality import learns
from policies.sequences import Comparison
from policies.signals import GUARDED_KINDS, WIN_RATE_KINDS

OTHER_TASK = "other"
OPTIMISED_MODES = frozenset({"optimized", "guard_fallback"})
HOLDOUT_MODES = frozenset({"holdout"})

QUALITY_KINDS = GUARDED_KINDS  # each compared only with itself (module docstring)
HEADLINE_ORDER: tuple[str, ...] = ("explicit", "judge", "automatic")
"""The kind the top-level quality fields of a verdict describe: the first of these with both streams."""
WIN_RATE_REFERENCE = 0.5
CHANGE_FLOORS: dict[str, float] = {"automatic": 0.01, "judge": 0.01, "explicit": 0.01, "length": 1.0, "truncation": 0.1}
"""Page–Hinkley streams on the holdout and the floor of each one's running sd (a constant stream must not divide by
zero; a 0/1 stream that was all zeros must not alarm on its first one)."""

TaskVerdictName = Literal["better", "not_yet_known", "worse"]
CostVerdictName = Literal["costlier", "not_yet_known"]
EventKind = Literal["rollback", "change_detected", "relearning_ended"]


class ConservativeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Thresholds of the monitor; the regressions come from `[slo]` (`from_slo`)."""

    max_quality_regression: float = 0.05  # relative: optimised mean quality >= (1 − this)·holdout's
    max_latency_regression: float = 0.10  # relative: optimised p99 <= (1 + this)·holdout's
    max_cost_regression: float = 0.10  # relative: optimised mean cost <= (1 + this)·holdout's, unless quality surely gained
    alpha: float = 0.05  # total error of all claims (latency α/2; quality kinds and cost share α/2)
    latency_warmup: int = 200  # holdout latencies that fix the reference τ₀
    latency_quantile: float = 0.99
    cost_warmup: int = 50  # holdout costs that fix the cap S
    cost_cap_factor: float = 2.0  # S = this × the largest warm-up holdout cost
    cost_unit: str = "completion_tokens"
    cost_patience_signals: int = 100  # a costlier task waits for this many signals per stream of each delayed kind it has
    change_delta: float = 0.25  # Page–Hinkley slack per sample, in running standard deviations
    change_threshold: float = 20.0  # Page–Hinkley alarm level, in running standard deviations
    change_min_samples: int = 30  # no change alarm before this many holdout samples
    relearn_signals: int = 100  # optimised signals after a change that close the re-learning interval
    max_tasks: int = 64

    @classmethod
    def from_slo(cls, slo: SloSettings, **overrides: Any) -> ConservativeSettings:
        """The monitor's settings with `[slo] max_quality_regression`, `max_latency_regression` and `max_cost_regression`."""
        return cls(
            max_quality_regression=slo.max_quality_regression, max_latency_regression=slo.max_latency_regression,
            max_cost_regression=slo.max_cost_regression, **overrides,
        )

    @property
    def comparison_alpha(self) -> float:
        """α of each quality-kind comparison and of the cost comparison: α/2 shared evenly."""
        return self.alpha / 2.0 / (len(QUALITY_KINDS) + 1)


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


class CostState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Warm-up holdout costs until the cap S is fixed, then clipped-cost sequences (module docstring)."""

    compare: Comparison
    warmup: tuple[float, ...] = ()
    cap: float | None = None  # S
    holdout_clipped: int = 0


class TaskState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    quality: dict[str, Comparison]  # per signal kind
    latency: LatencyState
    cost: CostState
    change: dict[str, PageHinkley] = {}  # per detector stream (CHANGE_FLOORS)
    untrusted: tuple[str, ...] = ()  # kinds that neither roll back nor excuse a cost regression
    rolled_back_at: float | None = None
    rollback_reason: str = ""
    relearning_since: float | None = None
    relearning_kind: str = ""


class MonitorState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tasks: dict[str, TaskState] = {}


class MonitorEvent(msgspec.Struct, frozen=True):
    """Something the caller records (event log), counts (metric) and alerts on."""

    kind: EventKind
    task_type: str
    at: float
    reason: str
    evidence: dict[str, Any] = {}


class KindVerdict(msgspec.Struct, frozen=True):
    """Optimised vs holdout on one signal kind, with the number of signals behind it."""

    kind: str
    measure: str  # "quality" or "win rate against the baseline answer (0.5 = no difference)"
    verdict: TaskVerdictName
    trusted: bool
    optimised_n: int
    holdout_n: int
    optimised_bounds: tuple[float, float]  # anytime-valid at 1 − level's complement (below)
    holdout_bounds: tuple[float, float]
    difference: tuple[float, float]  # quality: optimised − holdout; win rate: optimised − 0.5
    optimised_mean: float | None
    holdout_mean: float | None
    level: float  # coverage of `difference`
    reference: float | None = None  # 0.5 for a win rate


class CostVerdict(msgspec.Struct, frozen=True):
    """Optimised vs holdout mean cost per request (clipped at `cap`), anytime-valid at `level`."""

    verdict: CostVerdictName
    unit: str
    cap: float | None  # None during warm-up
    optimised_n: int
    holdout_n: int
    optimised_bounds: tuple[float, float]
    holdout_bounds: tuple[float, float]
    optimised_mean: float | None
    holdout_mean: float | None
    ratio_lower: float | None  # optimised's lower bound over holdout's upper bound
    holdout_clipped: int
    level: float


class TaskVerdict(msgspec.Struct, frozen=True):
    """Optimised vs holdout for one task type, with the anytime-valid intervals behind the verdict.

    The top-level quality fields describe `quality_kind` (the first of `HEADLINE_ORDER` with
    both streams); `signals` has every kind, `cost` the cost comparison.
    """

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
    quality_kind: str = "automatic"
    signals: list[KindVerdict] = []
    cost: CostVerdict | None = None
    relearning_since: float | None = None  # set from a detected change until `relearning_ended`


def new_state() -> MonitorState:
    return MonitorState()


def _new_task(s: ConservativeSettings) -> TaskState:
    each = s.comparison_alpha
    return TaskState(
        quality={kind: sequences.new_comparison(each) for kind in QUALITY_KINDS},
        latency=LatencyState(exceed=sequences.new_comparison(s.alpha / 2.0)),
        cost=CostState(compare=sequences.new_comparison(each)),
    )


def task_key(state: MonitorState, task: str, s: ConservativeSettings) -> str:
    """`task`, or ``other`` once `max_tasks` task types are tracked (``other`` takes the last slot)."""
    if task in state.tasks or len(state.tasks) < s.max_tasks - 1:
        return task
    return OTHER_TASK


def _page_hinkley(ph: PageHinkley, x: float, s: ConservativeSettings, floor: float) -> tuple[PageHinkley, str | None]:
    n = ph.n + 1
    delta = x - ph.mean
    mean = ph.mean + delta / n
    m2 = ph.m2 + delta * (x - mean)
    sd = max(math.sqrt(m2 / n), floor)
    up = ph.up + x - mean - s.change_delta * sd
    down = ph.down + x - mean + s.change_delta * sd
    new = PageHinkley(n=n, mean=mean, m2=m2, up=up, up_min=min(ph.up_min, up), down=down, down_max=max(ph.down_max, down))
    if n >= s.change_min_samples:
        if up - new.up_min > s.change_threshold * sd:
            return new, f"rose (Page–Hinkley {(up - new.up_min) / sd:.1f} sd > {s.change_threshold:g})"
        if new.down_max - down > s.change_threshold * sd:
            return new, f"fell (Page–Hinkley {(new.down_max - down) / sd:.1f} sd > {s.change_threshold:g})"
    return new, None


STREAM_WORDS = {
    "automatic": "holdout automatic quality", "judge": "holdout judged quality", "explicit": "holdout explicit quality",
    "length": "holdout answer length", "truncation": "holdout truncation rate",
}


def _detect(t: TaskState, stream: str, x: float, s: ConservativeSettings) -> tuple[TaskState, str | None]:
    """Feed one holdout value to the stream's detector; the alarm's words, if it fired."""
    change, alarm = _page_hinkley(t.change.get(stream, PageHinkley()), x, s, CHANGE_FLOORS[stream])
    t = msgspec.structs.replace(t, change={**t.change, stream: change})
    return t, None if alarm is None else f"{STREAM_WORDS[stream]} {alarm}"


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


def _observe_cost(c: CostState, holdout: bool, cost: float, s: ConservativeSettings) -> CostState:
    if c.cap is None:
        if not holdout:
            return c  # nothing to compare with before S exists
        warmup = c.warmup + (cost,)
        if len(warmup) < s.cost_warmup:
            return msgspec.structs.replace(c, warmup=warmup)
        return msgspec.structs.replace(c, warmup=(), cap=max(1.0, s.cost_cap_factor * max(warmup)))
    x = min(cost, c.cap) / c.cap
    if holdout:
        return msgspec.structs.replace(c, compare=sequences.observe_holdout(c.compare, x), holdout_clipped=c.holdout_clipped + int(cost > c.cap))
    return msgspec.structs.replace(c, compare=sequences.observe_optimised(c.compare, x))


def _kind_verdict(kind: str, c: Comparison, s: ConservativeSettings, trusted: bool) -> KindVerdict:
    opt, hold = sequences.bounds(c.optimised), sequences.bounds(c.holdout)
    level = 1.0 - (c.optimised.alpha + c.holdout.alpha)
    if kind in WIN_RATE_KINDS:
        ref = WIN_RATE_REFERENCE
        verdict: TaskVerdictName = "not_yet_known"
        if c.optimised.n:
            verdict = "better" if opt[0] > ref else "worse" if opt[1] < (1.0 - s.max_quality_regression) * ref else "not_yet_known"
        return KindVerdict(
            kind=kind, measure="win rate against the baseline answer (0.5 = no difference)", verdict=verdict, trusted=trusted,
            optimised_n=c.optimised.n, holdout_n=c.holdout.n, optimised_bounds=opt, holdout_bounds=hold,
            difference=(opt[0] - ref, opt[1] - ref), optimised_mean=_sample_mean(c.optimised), holdout_mean=_sample_mean(c.holdout),
            level=1.0 - c.optimised.alpha, reference=ref,
        )
    v = sequences.verdict(c, margin=s.max_quality_regression)
    return KindVerdict(
        kind=kind, measure="quality", verdict="not_yet_known" if v == "unknown" else v, trusted=trusted,
        optimised_n=c.optimised.n, holdout_n=c.holdout.n, optimised_bounds=opt, holdout_bounds=hold,
        difference=sequences.difference_bounds(c), optimised_mean=_sample_mean(c.optimised), holdout_mean=_sample_mean(c.holdout),
        level=level,
    )


def _kinds(t: TaskState, s: ConservativeSettings) -> list[KindVerdict]:
    return [_kind_verdict(kind, c, s, kind not in t.untrusted) for kind, c in t.quality.items()]


def _quality_verdict(kinds: list[KindVerdict]) -> TaskVerdictName:
    """Worse once any trusted kind is surely worse; better once one is surely better and none worse."""
    trusted = [k.verdict for k in kinds if k.trusted]
    if "worse" in trusted:
        return "worse"
    return "better" if "better" in trusted else "not_yet_known"


def _cost_verdict(c: CostState, s: ConservativeSettings) -> CostVerdict:
    cmp_ = c.compare
    cap = c.cap or 0.0
    opt, hold = sequences.bounds(cmp_.optimised), sequences.bounds(cmp_.holdout)
    costlier = bool(c.cap is not None and cmp_.optimised.n and cmp_.holdout.n and opt[0] > (1.0 + s.max_cost_regression) * hold[1])
    om, hm = _sample_mean(cmp_.optimised), _sample_mean(cmp_.holdout)
    return CostVerdict(
        verdict="costlier" if costlier else "not_yet_known", unit=s.cost_unit, cap=c.cap,
        optimised_n=cmp_.optimised.n, holdout_n=cmp_.holdout.n,
        optimised_bounds=(opt[0] * cap, opt[1] * cap), holdout_bounds=(hold[0] * cap, hold[1] * cap),
        optimised_mean=None if om is None else om * cap, holdout_mean=None if hm is None else hm * cap,
        ratio_lower=opt[0] / hold[1] if c.cap is not None and cmp_.optimised.n and hold[1] > 0 else None,
        holdout_clipped=c.holdout_clipped, level=1.0 - (cmp_.optimised.alpha + cmp_.holdout.alpha),
    )


def _cost_breach(kinds: list[KindVerdict], quality: TaskVerdictName, cost: CostVerdict, s: ConservativeSettings) -> bool:
    """Costlier with no sure gain, once every trusted delayed kind with signals has had `cost_patience_signals` per stream.

    Without delayed signals it acts at once. With them, a real gain needs its signals to show:
    a judge sampling a tenth of the requests gives the cost comparison ten samples for each of
    its own, so a costlier task that is truly better would be rolled back before its gain could
    be seen. The wait is a stopping rule, so the cost claim stays anytime-valid.
    """
    if cost.verdict != "costlier" or quality == "better":
        return False
    waiting = [k for k in kinds if k.kind != "automatic" and k.trusted and (k.optimised_n or k.holdout_n)
               and min(k.optimised_n, k.holdout_n if k.reference is None else k.optimised_n) < s.cost_patience_signals]
    return not waiting


def _latency_verdict(t: TaskState) -> TaskVerdictName:
    c = t.latency.exceed
    if t.latency.reference_s is None or not c.optimised.n or not c.holdout.n:
        return "not_yet_known"
    return "worse" if sequences.bounds(c.optimised)[0] > sequences.bounds(c.holdout)[1] else "not_yet_known"


def _sample_mean(seq: sequences.MeanSequence) -> float | None:
    return seq.low + (seq.high - seq.low) * seq.sum_x / seq.n if seq.n else None


def _headline(kinds: list[KindVerdict]) -> KindVerdict:
    by_kind = {k.kind: k for k in kinds}
    for kind in HEADLINE_ORDER:
        k = by_kind.get(kind)
        if k is not None and k.optimised_n and k.holdout_n:
            return k
    return by_kind["automatic"]


def _verdict(key: str, t: TaskState, s: ConservativeSettings) -> TaskVerdict:
    kinds = _kinds(t, s)
    quality, latency, cost = _quality_verdict(kinds), _latency_verdict(t), _cost_verdict(t.cost, s)
    reasons = []
    for k in kinds:
        if k.verdict == "worse" and k.trusted:
            if k.reference is None:
                reasons.append(
                    f"{k.kind}: optimised mean quality <= {k.optimised_bounds[1]:.4f} < (1 - {s.max_quality_regression:g}) x "
                    f"holdout's >= {k.holdout_bounds[0]:.4f} ({k.optimised_n} vs {k.holdout_n} signals)"
                )
            else:
                reasons.append(
                    f"{k.kind}: win rate against the baseline answer <= {k.optimised_bounds[1]:.4f} < (1 - "
                    f"{s.max_quality_regression:g}) x 0.5 ({k.optimised_n} verdicts)"
                )
    cost_breach = _cost_breach(kinds, quality, cost, s)
    if cost_breach:
        reasons.append(
            f"cost: optimised mean {cost.unit} per request >= {cost.optimised_bounds[0]:.1f} > (1 + {s.max_cost_regression:g}) x "
            f"holdout's <= {cost.holdout_bounds[1]:.1f} with no trusted quality kind surely better"
        )
    opt_x, hold_x = sequences.bounds(t.latency.exceed.optimised), sequences.bounds(t.latency.exceed.holdout)
    if latency == "worse":
        reasons.append(
            f"P(optimised latency > {1.0 + s.max_latency_regression:g} x {t.latency.reference_s:.4g}s) >= {opt_x[0]:.4f} "
            f"> P(holdout latency > {t.latency.reference_s:.4g}s) <= {hold_x[1]:.4f}"
        )
    overall: TaskVerdictName = "worse" if "worse" in (quality, latency) or cost_breach else quality
    head = _headline(kinds)
    return TaskVerdict(
        task_type=key,
        verdict=overall,
        quality=quality,
        latency=latency,
        rolled_back=t.rolled_back_at is not None,
        optimised_n=head.optimised_n,
        holdout_n=head.holdout_n,
        optimised_quality=head.optimised_bounds,
        holdout_quality=head.holdout_bounds,
        quality_difference=head.difference,
        latency_reference_s=t.latency.reference_s,
        optimised_exceedance=opt_x,
        holdout_exceedance=hold_x,
        reason="; ".join(reasons) or t.rollback_reason,
        optimised_mean=head.optimised_mean,
        holdout_mean=head.holdout_mean,
        quality_kind=head.kind,
        signals=kinds,
        cost=cost,
        relearning_since=t.relearning_since,
    )


def _breached(t: TaskState, s: ConservativeSettings) -> bool:
    """Cheap check before the full verdict: some trusted kind worse, latency worse, or costlier with no sure gain."""
    if _latency_verdict(t) == "worse":
        return True
    kinds = _kinds(t, s)
    quality = _quality_verdict(kinds)
    return quality == "worse" or _cost_breach(kinds, quality, _cost_verdict(t.cost, s), s)


def _settle(
    state: MonitorState, key: str, t: TaskState, s: ConservativeSettings, now: float, events: list[MonitorEvent]
) -> tuple[MonitorState, list[MonitorEvent]]:
    """Close a finished re-learning interval, roll back on a breach, and store the task."""
    if t.relearning_since is not None:
        c = t.quality.get(t.relearning_kind)
        if c is not None and c.optimised.n >= s.relearn_signals:
            events.append(MonitorEvent(
                kind="relearning_ended", task_type=key, at=now,
                reason=f"{c.optimised.n} optimised {t.relearning_kind} signals compared since the change",
                evidence={"relearning_since": t.relearning_since, "duration_s": now - t.relearning_since, "signal_kind": t.relearning_kind},
            ))
            t = msgspec.structs.replace(t, relearning_since=None, relearning_kind="")
    if _breached(t, s):
        v = _verdict(key, t, s)
        t = msgspec.structs.replace(t, rolled_back_at=now, rollback_reason=v.reason)
        events.append(MonitorEvent(kind="rollback", task_type=key, at=now, reason=v.reason, evidence=msgspec.to_builtins(v)))
    return MonitorState(tasks={**state.tasks, key: t}), events


def _changed(key: str, t: TaskState, s: ConservativeSettings, now: float, alarm: str, stream: str) -> tuple[TaskState, MonitorEvent]:
    """The baseline moved: old evidence describes a different world; the task re-learns from here."""
    kind = stream if stream in QUALITY_KINDS else "automatic"
    fresh = msgspec.structs.replace(_new_task(s), untrusted=t.untrusted, relearning_since=now, relearning_kind=kind)
    event = MonitorEvent(
        kind="change_detected", task_type=key, at=now, reason=alarm,
        evidence={"stream": stream, "holdout_samples": t.change[stream].n, "relearning_since": now, "signal_kind": kind},
    )
    return fresh, event


def observe(
    state: MonitorState,
    s: ConservativeSettings,
    *,
    task: str,
    mode: str,
    quality: float | None,
    latency_s: float | None,
    now: float,
    cost: float | None = None,
    truncated: bool | None = None,
    length: float | None = None,
) -> tuple[MonitorState, list[MonitorEvent]]:
    """Fold one completed request in (its automatic score); the events say what happened.

    `quality` None (no signal yet), a failed request's `latency_s` None, `cost` None (no price
    or usage), `length` None (answer length in tokens unknown) or `truncated` None (no finish
    reason) skip that part. Modes other than optimised and holdout (off, shadow, rollback)
    change nothing.
    """
    holdout = mode in HOLDOUT_MODES
    if not holdout and mode not in OPTIMISED_MODES:
        return state, []
    key = task_key(state, task, s)
    t = state.tasks.get(key) or _new_task(s)
    if t.rolled_back_at is not None:
        return state, []
    t, events = _fold_outcome(key, t, s, Observation(task, mode, quality, latency_s, cost, truncated, length), holdout, now)
    return _settle(state, key, t, s, now, events)


class Observation(NamedTuple):
    """One completed request as `observe` takes it (its keyword arguments, `now` aside)."""

    task: str
    mode: str
    quality: float | None
    latency_s: float | None
    cost: float | None = None
    truncated: bool | None = None
    length: float | None = None


def observation(decision: Any, outcome: Any) -> Observation:
    """A policies.records.Decision and its Outcome as the monitor reads them."""
    ok = learns(outcome.status, outcome.error_class)
    tokens = float(outcome.completion_tokens) if ok and outcome.completion_tokens is not None else None
    return Observation(
        task=decision.context.task_type,
        mode=decision.mode,
        quality=outcome.quality,
        latency_s=outcome.latency_s if ok else None,
        cost=tokens,  # the cost unit today; dollars per request take this place once known
        truncated=(outcome.finish_reason == "length") if ok and outcome.finish_reason is not None else None,
        length=tokens,
    )


def _fold_outcome(key: str, t: TaskState, s: ConservativeSettings, o: Observation, holdout: bool, now: float) -> tuple[TaskState, list[MonitorEvent]]:
    """`observe` without the settling: the request's samples folded into its task's sequences."""
    events: list[MonitorEvent] = []
    length, truncated, quality, latency_s, cost = o.length, o.truncated, o.quality, o.latency_s, o.cost
    if holdout:
        for stream, x in (("length", length), ("truncation", None if truncated is None else float(truncated))):
            if x is not None and math.isfinite(x) and x >= 0:
                t, alarm = _detect(t, stream, x, s)
                if alarm is not None:
                    t, event = _changed(key, t, s, now, alarm, stream)
                    events.append(event)
    if quality is not None and math.isfinite(quality):
        t, more = _fold_quality(key, t, s, "automatic", holdout, quality, now)
        events += more
    if latency_s is not None and math.isfinite(latency_s) and latency_s >= 0:
        t = msgspec.structs.replace(t, latency=_observe_latency(t.latency, holdout, latency_s, s))
    if cost is not None and math.isfinite(cost) and cost >= 0:
        t = msgspec.structs.replace(t, cost=_observe_cost(t.cost, holdout, cost, s))
    return t, events


def observe_many(state: MonitorState, s: ConservativeSettings, batch: Iterable[Observation], now: float) -> tuple[MonitorState, list[MonitorEvent]]:
    """`observe` for a batch: every request folded in, in order, then each task it touched settled once.

    The comparisons are confidence sequences, valid at any stopping time, so looking for a
    breach after the batch rather than after each request keeps their guarantee; a rollback
    comes at most one batch later (proxy/decision/batch.py bounds a batch's size and age).
    """
    tasks = dict(state.tasks)
    touched: dict[str, None] = {}
    events: list[MonitorEvent] = []
    for o in batch:
        holdout = o.mode in HOLDOUT_MODES
        if not holdout and o.mode not in OPTIMISED_MODES:
            continue
        key = o.task if o.task in tasks or len(tasks) < s.max_tasks - 1 else OTHER_TASK  # `task_key`
        t = tasks.get(key) or _new_task(s)
        if t.rolled_back_at is not None:
            continue
        tasks[key], more = _fold_outcome(key, t, s, o, holdout, now)
        touched[key] = None
        events += more
    state = MonitorState(tasks=tasks)
    for key in touched:
        state, events = _settle(state, key, state.tasks[key], s, now, events)
    return state, events


def _fold_quality(
    key: str, t: TaskState, s: ConservativeSettings, kind: str, holdout: bool, quality: float, now: float
) -> tuple[TaskState, list[MonitorEvent]]:
    q = min(1.0, max(0.0, quality))
    if holdout and kind in CHANGE_FLOORS:
        t, alarm = _detect(t, kind, q, s)
        if alarm is not None:
            t, event = _changed(key, t, s, now, alarm, kind)
            return t, [event]
    c = t.quality.get(kind) or sequences.new_comparison(s.comparison_alpha)
    c = sequences.observe_holdout(c, q) if holdout else sequences.observe_optimised(c, q)
    return msgspec.structs.replace(t, quality={**t.quality, kind: c}), []


def observe_signal(
    state: MonitorState,
    s: ConservativeSettings,
    *,
    task: str,
    mode: str,
    kind: str,
    quality: float,
    now: float,
    trusted: bool = True,
) -> tuple[MonitorState, list[MonitorEvent]]:
    """Fold one delayed quality signal (judge, pairwise verdict, explicit feedback) into its own kind's comparison.

    The caller sends each request at most once per kind (a re-run or an overwrite is the same
    request again, and a sequence cannot take a sample back). `trusted` False marks the kind
    untrusted for this task from now on (True marks it trusted again); unknown kinds and
    modes other than optimised and holdout change nothing.
    """
    holdout = mode in HOLDOUT_MODES
    if kind not in QUALITY_KINDS or (not holdout and mode not in OPTIMISED_MODES) or not math.isfinite(quality):
        return state, []
    key = task_key(state, task, s)
    t = state.tasks.get(key) or _new_task(s)
    if t.rolled_back_at is not None:
        return state, []
    untrusted = tuple(sorted(set(t.untrusted) - {kind})) if trusted else tuple(sorted({*t.untrusted, kind}))
    t = msgspec.structs.replace(t, untrusted=untrusted)
    t, events = _fold_quality(key, t, s, kind, holdout, quality, now)
    return _settle(state, key, t, s, now, events)


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
    return MonitorState(tasks={**state.tasks, key: msgspec.structs.replace(_new_task(s), untrusted=state.tasks[key].untrusted)})


class ConservativeMonitor:
    """The hook for the decision room: one in-process owner of the pure state above.

    Wiring (for the composition root):
      - call `on_outcome(decision, outcome, now)` once per completed (Decision, Outcome),
        after the automatic quality is set; call `on_signal(...)` once per request and
        delayed signal kind (judge score, pairwise verdict, first explicit score); record
        each returned event (EventRecord kind = event.kind, evidence = event.evidence),
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
        o = observation(decision, outcome)
        self.state, events = observe(
            self.state, self.settings, task=o.task, mode=o.mode, quality=o.quality, latency_s=o.latency_s, now=now,
            cost=o.cost, truncated=o.truncated, length=o.length,
        )
        return events

    def on_outcomes(self, finished: Iterable[tuple[Any, Any]], now: float) -> list[MonitorEvent]:
        """`on_outcome` for a batch of (decision, outcome): each task settled once (`observe_many`)."""
        self.state, events = observe_many(self.state, self.settings, [observation(d, o) for d, o in finished], now)
        return events

    def on_signal(self, task_type: str, mode: str, kind: str, quality: float, now: float, trusted: bool = True) -> list[MonitorEvent]:
        """One delayed signal of one request (`observe_signal`)."""
        self.state, events = observe_signal(
            self.state, self.settings, task=task_type, mode=mode, kind=kind, quality=quality, now=now, trusted=trusted
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
