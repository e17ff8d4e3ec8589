"""`GET /api/optimization/quality`: can the automatic quality signals be trusted, per task type?

Two sources, each the only place the number exists:
- the decision log window: each request counts once under the source that holds its
  quality now (`decision_feedback.source`, else "automatic" when the completion rules
  scored it, else "none"). Priority means a stronger signal hides a weaker one, so a
  regenerated answer later scored by the judge or a person counts under that source: the
  regeneration rate (requests whose quality is a regeneration mark / requests) is a lower
  bound of how often answers were regenerated;
- the runtime's `SignalBook`, not the window: the judge's (judge, explicit) pairs, which the
  log cannot give because explicit feedback replaces the judge's score (persisted and shared
  between replicas, `proxy.learning.signal_sync`), and validator checks/failures per task
  type (this process, since start-up); the stored failure reasons come from the window. The judge flag is the same
  `policies.agreement.judge_trusted` call that gates the judge's signals in `deliver_signal`;
- the judge's mutes and its length-bias check (`proxy.decision.judge_trust.JudgeTrust`, persisted):
  `trusted` is false while the judge is muted for the task type, for either reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Annotated

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import JSONBody

from policies.agreement import agreement, judge_trusted
from policies.judge_bias import LengthBias, concordance_bounds, slope
from proxy.common import ProxyError
from proxy.config import JudgeSettings
from proxy.control import reports as cdata
from proxy.control.deps import Deps
from proxy.control.errors import ERR
from proxy.control.schemas import MetricComparison
from proxy.control.views import MaxRows, TextFilter, WindowS, actor_of, window, write_audit
from proxy.decision import JudgeTrust, SignalBook
from proxy.learning import load_rows
from proxy.store import DecisionRow

SOURCES = ("explicit", "judge", "judge_pairwise", "implicit", "automatic", "none")
TOP_REASONS = 10


class JudgeLengthOut(msgspec.Struct, frozen=True, kw_only=True):
    """The length-bias check (policies/judge_bias.py): within-arm pairs of judged answers, no explicit feedback needed."""

    pairs: int  # within-arm pairs of judged answers (ties included)
    untied_pairs: int  # pairs with different lengths and scores: the ones the test counts
    concordance_low: float  # anytime-valid 95 % bounds of P(the longer answer of a pair is scored higher)
    concordance_high: float
    quality_per_doubling: float | None  # pooled within-arm slope of judge quality on log2(length), for reading
    mute_above: float  # the judge is muted once concordance_low exceeds this (0.5 + [judge] length_bias_margin)


class JudgeAgreementOut(msgspec.Struct, frozen=True, kw_only=True):
    n: int  # requests with both a judge score and explicit feedback (the last pairs kept per task)
    spearman: float | None  # rank correlation judge vs explicit; null below 2 pairs or with a constant side
    mean_difference: float | None  # mean of judge - explicit quality
    trusted: bool  # false: the judge's signals for this task type are not delivered (muted)
    min_agreement: float
    min_pairs: int
    muted: str | None = None  # why the judge is muted for this task type: length_bias or disagreement (proxy/decision/judge_trust.py)
    muted_at: float | None = None
    muted_because: str | None = None  # the mute's summary, in words
    length_check: JudgeLengthOut | None = None  # null before two judged answers of one arm


class QualityTaskOut(msgspec.Struct, frozen=True, kw_only=True):
    task_type: str
    requests: int  # logged decisions in the window
    signals: dict[str, int]  # source holding each request's quality -> count (explicit, judge, judge_pairwise, implicit, automatic, none)
    regeneration_rate: float | None  # requests whose quality is a regeneration mark / requests; null without requests
    judge: JudgeAgreementOut
    validation_checked: int  # answers checked against a schema since start-up
    validation_failed: int
    validation_failure_rate: float | None
    validator_reasons: dict[str, int]  # the most frequent stored failure reasons in the window (at most TOP_REASONS)
    # tuned vs holdout per signal kind in the window, each kind only against itself (reports.signal_comparisons):
    # automatic always; judged, explicit quality and the pairwise win rate once they have signals
    by_signal: list[MetricComparison] = []


class QualityReport(msgspec.Struct, frozen=True, kw_only=True):
    generated_at: float
    since: float
    until: float
    truncated: bool  # the window held more than max_rows decisions; counts cover the newest max_rows
    tasks: list[QualityTaskOut]


def source_of(row: DecisionRow) -> str:
    """The source that holds the row's quality now."""
    if row.feedback_quality is not None:
        return row.feedback_source or "explicit"  # rows written before sources were stored were explicit
    return "automatic" if row.quality is not None else "none"


def length_out(state: LengthBias | None, margin: float) -> JudgeLengthOut | None:
    if state is None:
        return None
    low, high = concordance_bounds(state)
    return JudgeLengthOut(pairs=state.pairs, untied_pairs=state.concordance.n, concordance_low=low, concordance_high=high,
                          quality_per_doubling=slope(state), mute_above=0.5 + margin)


def quality_report(rows: Sequence[DecisionRow], signals: SignalBook, judge: JudgeSettings,
                   now: float, since: float, until: float, truncated: bool, trust: JudgeTrust | None = None) -> QualityReport:
    counts: dict[str, dict[str, int]] = {}
    reasons: dict[str, Counter[str]] = {}
    by_task: dict[str, list[DecisionRow]] = {}
    for row in sorted(rows, key=lambda r: (r.timestamp, r.request_id)):  # the sequences read rows oldest first
        by_task.setdefault(row.task_type, []).append(row)
        per = counts.setdefault(row.task_type, dict.fromkeys(SOURCES, 0))
        per[source_of(row)] += 1
        if row.validator_reason is not None:
            reasons.setdefault(row.task_type, Counter())[row.validator_reason] += 1
    mutes = trust.state.mutes if trust is not None else {}
    lengths = trust.state.length if trust is not None else {}
    tasks = sorted(set(counts) | set(signals.pairs) | set(signals.validation) | set(mutes) | set(lengths))
    out = []
    for task in tasks:
        per = counts.get(task, dict.fromkeys(SOURCES, 0))
        n = sum(per.values())
        pairs = signals.pairs_of(task)
        agreed = agreement(pairs)
        checked, failed = signals.validation.get(task, (0, 0))
        mute = mutes.get(task)
        out.append(QualityTaskOut(
            task_type=task, requests=n, signals=per, regeneration_rate=per["implicit"] / n if n else None,
            judge=JudgeAgreementOut(
                n=agreed.n, spearman=agreed.spearman, mean_difference=agreed.mean_difference,
                trusted=mute is None and judge_trusted(pairs, judge.min_agreement, judge.min_agreement_pairs),
                min_agreement=judge.min_agreement, min_pairs=judge.min_agreement_pairs,
                muted=mute.reason if mute else None, muted_at=mute.at if mute else None, muted_because=mute.summary if mute else None,
                length_check=length_out(lengths.get(task), judge.length_bias_margin),
            ),
            validation_checked=checked, validation_failed=failed, validation_failure_rate=failed / checked if checked else None,
            validator_reasons=dict(sorted(reasons.get(task, Counter()).items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_REASONS]),
            by_signal=cdata.signal_comparisons(
                task, [r for r in by_task.get(task, []) if r.mode in cdata.OPTIMIZED_MODES],
                [r for r in by_task.get(task, []) if r.mode == cdata.HOLDOUT_MODE],
            ),
        ))
    return QualityReport(generated_at=now, since=since, until=until, truncated=truncated, tasks=out)


class UnmuteIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    task_type: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""


class UnmuteOut(msgspec.Struct, frozen=True, kw_only=True):
    task_type: str
    was: str  # the reason it had been muted for: length_bias or disagreement
    message: str


class QualityController(Controller):
    path = "/"

    @post("/judge/unmute", status_code=200, responses={404: ERR},
          summary="Let the judge's scores teach again for a task type it was muted for (length bias or disagreement)")
    async def unmute(self, request: Request, deps: Deps, data: JSONBody[UnmuteIn]) -> UnmuteOut:
        """What it taught before the mute stays taken back; a length check starts afresh from the next judged answers."""
        trust = deps.learning.trust
        mute = trust.mute_of(data.task_type) if trust is not None else None
        if trust is None or mute is None:
            raise ProxyError(404, f"the judge is not muted for task type '{data.task_type}'", "not_muted", "not_found_error", "task_type")
        actor = actor_of(request)
        trust.unmute(data.task_type, data.reason or f"unmuted by {actor}", actor=actor)
        await write_audit(deps, actor, "judge_unmute", data.task_type, {"muted": mute.reason}, {"muted": None})
        return UnmuteOut(task_type=data.task_type, was=mute.reason,
                         message=f"the judge's scores teach again for '{data.task_type}'; what it taught before the mute stays taken back")

    @get("/quality", summary="Per task type: signals by source, judge agreement with explicit feedback, regeneration and validator failure rates")
    async def quality(self, deps: Deps, window_s: WindowS = 3600.0, max_rows: MaxRows = 20_000,
                      task_type: TextFilter = None) -> QualityReport:
        now, since, until = window(window_s)
        rows, truncated = await load_rows(deps.log_store, since=since, until=until, max_rows=max_rows, task_type=task_type)
        report = quality_report(rows, deps.signals, deps.config.judge, now, since, until, truncated, deps.learning.trust)
        if task_type is not None:
            report = msgspec.structs.replace(report, tasks=[t for t in report.tasks if t.task_type == task_type])
        return report
