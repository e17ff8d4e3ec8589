"""Delayed feedback (`POST /api/optimization/record-outcome`).

The decision is found by request id: first in the in-process `DecisionRegistry`
(registered before forwarding, so an id is known from the moment its response
starts), else in the log store (`get_decision`). Explicit feedback replaces the
automatic quality score; recording it twice is a conflict unless `overwrite` (the
automatic score never counts as recorded feedback).

Reward: recomputed with the given quality and the outcome's own latency and tokens,
through the same `BaselineCosts` normalisers the decider uses.

Policy: the automatic reward was already folded into the policy statistics when the
response finished. Replacing it needs `policy.correct(ctx, baseline, arm, old, new, logged_version=...)`
(an additive statistic can swap one reward for another without changing n); the policy
skips or adds instead when its statistics never held the old reward (`policies.base.Correction`). When the
policy has no such method the statistics are left untouched (adding the corrected
reward on top would count the request twice) and the response says so; when no
automatic reward was ever applied (no quality score, or the request is still in
flight) the corrected reward is applied with `update`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from policies.quality import learns
from policies.records import Arm, Decision, Outcome, Params, RequestContext
from policies.signals import Signal
from proxy.config import JudgeSettings
from proxy.decision.decider import TEMPERATURE_STATISTICS, BanditDecider
from proxy.decision.judge_trust import JudgeTrust
from proxy.decision.registry import DecisionRegistry
from proxy.store import DecisionRow, FeedbackEntry, Recorder

log = logging.getLogger("thermostat.judge")


class ExplicitFeedback(msgspec.Struct, frozen=True):
    """One explicit quality score, as the decision room takes it; the control API maps its request schema onto this."""

    request_id: str
    quality: float
    overwrite: bool = False
    payload: dict[str, Any] = {}  # logged with the feedback row (comment, source), next to the actor


class FeedbackResult(msgspec.Struct, frozen=True):
    """What one explicit score did; the control API maps it onto its response schema."""

    request_id: str
    found_in: str  # "registry" or "log"
    quality: float
    previous_quality: float | None
    automatic_quality: float | None
    reward: float | None  # recomputed with the given quality (None while the request is still in flight)
    previous_reward: float | None
    policy_updated: bool
    policy_update: str  # what happened to the policy statistics, and why
    overwritten: bool


class DecisionFinder(Protocol):
    """Another replica's decisions (`proxy.learning.sync.SharedState`): feedback may arrive at any replica."""

    def find_decision(self, request_id: str) -> Awaitable[tuple[Decision, Outcome | None] | None]: ...


class DecisionLog(Protocol):
    """The decision log, read only for decisions that have left the registry."""

    async def get_decision(self, request_id: str) -> DecisionRow | None: ...

    async def fetch_decisions(
        self, *, since: float | None = None, until: float | None = None, task_type: str | None = None, mode: str | None = None,
        limit: int = 100, offset: int = 0,
    ) -> list[DecisionRow]: ...


class GuardSignals(Protocol):
    """The guards' ear for delayed signals (`proxy.decision.conservative.ConservativeListener.on_signal`).

    Every judge score, pairwise verdict and explicit score of a successful request reaches
    it with its kind (`source`), the request's mode and task type, the quality and the reward
    recomputed with it, whether or not it teaches the policy (an untrusted or explicitly
    overridden judge score is still a judged observation of that request). The listener
    counts each (request, kind) once.
    """

    def on_signal(
        self, *, request_id: str, task_type: str, mode: str, kind: str, quality: float, reward: float | None, trusted: bool = True
    ) -> None: ...


class FeedbackConflict(Exception):
    pass


class DecisionNotFound(Exception):
    pass


# Per-request signal bookkeeping in this process (each map at most this many request ids, oldest
# dropped first; a few hundred bytes an entry): explicit feedback recorded and waiting for its
# outcome (`FeedbackBook`), each signal's source and the judge's scores (`SignalBook`).
MAX_SIGNAL_ENTRIES = 100_000
MAX_JUDGE_PAIRS = 1_000  # (judge, explicit) pairs kept per task type for the agreement check


class _Pending(msgspec.Struct):
    quality: float
    overwrite: bool


class FeedbackBook:
    """Explicit feedback recorded by this process (bounded), and feedback for requests in flight."""

    def __init__(self, max_entries: int = MAX_SIGNAL_ENTRIES) -> None:
        self.max_entries = max_entries
        self.recorded: OrderedDict[str, tuple[float, float | None]] = OrderedDict()  # id -> (quality, reward)
        self.pending: OrderedDict[str, _Pending] = OrderedDict()

    def remember(self, request_id: str, quality: float, reward: float | None) -> None:
        self.recorded[request_id] = (quality, reward)
        self.recorded.move_to_end(request_id)
        while len(self.recorded) > self.max_entries:
            self.recorded.popitem(last=False)


@dataclass(frozen=True, slots=True)
class FeedbackServices:
    """What a later signal needs to find its decision and re-teach the policy; built once by the composition root.

    `learns` is False when the active decider is not the bandit (it folds nothing in, so
    nothing is corrected).
    """

    registry: DecisionRegistry
    recorder: Recorder
    log: DecisionLog
    bandit: BanditDecider
    book: FeedbackBook
    signals: SignalBook
    judge: JudgeSettings
    shared: DecisionFinder | None = None
    learns: bool = True
    trust: JudgeTrust | None = None  # per-task judge mutes (length bias, disagreement)
    guards: GuardSignals | None = None


GUARD_SOURCES = frozenset({"judge", "judge_pairwise", "explicit"})
"""Delayed signal kinds the guards compare (`policies.signals.GUARDED_KINDS` less the automatic one)."""


def _to_guards(
    fx: FeedbackServices, request_id: str, task_type: str, mode: str, kind: str, quality: float, reward: float | None,
    ok: bool, trusted: bool = True, *, model: str | None = None,
) -> None:
    """Hand one delayed signal of a successful request to the guards (`GuardSignals`) and to the model stage's
    evidence (`proxy.decision.model_stage.ModelEvidence`: `model` is the stand-in that served it, None the requested model)."""
    if ok and fx.learns:
        fx.bandit.models.observe(task_type, model, kind, quality, trusted=trusted)
    if fx.guards is not None and ok and kind in GUARD_SOURCES:
        fx.guards.on_signal(request_id=request_id, task_type=task_type, mode=mode, kind=kind, quality=quality, reward=reward, trusted=trusted)


def context_from_features(features: dict[str, Any]) -> RequestContext | None:
    """Rebuild the `RequestContext` from a log row's `context_features` (None if it cannot)."""
    fields = set(RequestContext.__struct_fields__)
    try:
        return msgspec.convert({k: v for k, v in features.items() if k in fields}, RequestContext)
    except (msgspec.ValidationError, TypeError):
        return None


def _pair_explicit(fx: FeedbackServices, request_id: str, quality: float, row: DecisionRow | None) -> None:
    """Explicit feedback meets the judge's score of the same request, if any (`SignalBook` docstring).

    The judge's score is looked up in this process's book, else in the decision log: after a
    restart, or once the book has forgotten the request, the log's feedback row still holds it.
    """
    if request_id not in fx.signals.judged and row is not None and row.feedback_source == "judge" and row.feedback_quality is not None:
        fx.signals.judge_scored(request_id, row.task_type, row.feedback_quality, None)
    fx.signals.explicit_scored(request_id, quality)
    judged = fx.signals.judged.get(request_id)
    if judged is not None:
        _check_agreement(fx, judged[0])  # a new pair may mute the judge (or lift a disagreement mute) at once


def _count_signal(fx: FeedbackServices, task_type: str, already: bool, learns: bool) -> None:
    """A first explicit score of a request that could teach the policy is evidence that sees temperature.

    It counts towards `optimization.min_quality_signals` (`decider.QualitySignals`); an
    overwrite is the same signal again, and the automatic score never counts.
    """
    if not already and learns:
        fx.bandit.signals.add(task_type)


ONE_SIDED = frozenset({"implicit"})
"""Signal sources that only ever mark failures (a regeneration), never successes.

Measured (bench/results/learning_sources.md, "regeneration only"): fed alone to the
temperature-only statistics, whose other rewards are signals too, every temperature's
rewards are all zeros, the comparison has no denominator, and the creative task drifted to
22 % below the client's settings. Such marks still replace the automatic reward in the
usual statistics (`_apply`), but neither count towards `min_quality_signals` nor feed the
temperature stage. (Counting an unmarked answer as an implicit success once its
regeneration window has passed would give them a denominator: not built.)
"""


async def _logged_signal(fx: FeedbackServices, request_id: str) -> DecisionRow | None:
    """The log row of a request whose delayed signals this process has not seen (a restart, another replica).

    A decision found in Redis after a restart may hold a judge score this process's book
    never saw; the log's feedback row names it. Best effort: a store hiccup leaves it unknown.
    """
    if request_id in fx.signals.sources:
        return None
    try:
        return await fx.log.get_decision(request_id)
    except Exception:  # noqa: BLE001 - the explicit score is recorded regardless
        return None


def _held_source(fx: FeedbackServices, row: DecisionRow) -> str | None:
    """The source of the logged delayed signal whose reward the policy statistics hold, if any.

    A judge score taken back when the judge was muted for the task (`retract_judge`) is still in
    the log (the agreement with explicit feedback reads it) but no longer in the statistics.
    """
    if row.feedback_quality is None:
        return None
    source = row.feedback_source or "explicit"  # rows written before sources were stored were explicit
    if source == "judge" and fx.trust is not None and fx.trust.retracted(row.task_type, row.timestamp):
        return None
    return source


def _judged(fx: FeedbackServices, request_id: str) -> bool:
    """A judge score already counted this request (`deliver_signal`): explicit feedback is not a second signal.

    An implicit mark is not counted (`ONE_SIDED`), so explicit feedback after one still counts.
    """
    return fx.signals.sources.get(request_id) not in (None, *ONE_SIDED)


def _reward(fx: FeedbackServices, task_type: str, quality: float, latency_s: float, completion_tokens: int | None,
            cost_usd: float | None = None) -> float:
    """A logged request's reward with a new quality: the decider's one reward computation (`Learner.reward`)."""
    return fx.bandit.learner.reward(task_type, quality, latency_s, completion_tokens, cost_usd)


def _apply(fx: FeedbackServices, ctx: RequestContext, base: Arm, arm: Arm, old: float | None, new: float, logged_version: str) -> tuple[bool, str]:
    """Fold the corrected reward into the policy without double counting (`BanditDecider.correct`)."""
    if not fx.learns:
        return False, "the active decider does not learn (passthrough)"
    fx.bandit.drain_learning()  # the automatic reward being replaced must be in the statistics first
    return fx.bandit.correct(ctx, base, arm, old, new, logged_version)


def _teach_temperature(
    fx: FeedbackServices, ctx: RequestContext, baseline: Params, sent: Params, new: float, previous: float | None, logged_version: str
) -> None:
    """Every temperature-visible signal also feeds the temperature-only statistics (`BanditDecider.pmf`).

    Those statistics never hold automatic rewards, so there is nothing to swap unless an
    earlier signal of the same request is in them (`previous`).
    """
    if fx.learns:
        fx.bandit.drain_learning()
        fx.bandit.learn_signal(ctx, baseline, sent, new, previous, logged_version=logged_version)


async def record_outcome(fx: FeedbackServices, body: ExplicitFeedback, actor: str, now: float | None = None) -> FeedbackResult:
    now = time.time() if now is None else now
    book = fx.book
    rid = body.request_id
    quality = float(body.quality)
    payload: dict[str, Any] = {**body.payload, "actor": actor, "overwrite": body.overwrite}

    item = fx.registry.get(rid, now)
    if item is None and fx.shared is not None:
        item = await fx.shared.find_decision(rid)  # served by another replica
    if item is not None:
        decision, outcome = item
        already = (outcome is not None and outcome.feedback) or rid in book.recorded or rid in book.pending
        if already and not body.overwrite:
            raise FeedbackConflict(rid)
        previous_quality = book.recorded[rid][0] if rid in book.recorded else (book.pending[rid].quality if rid in book.pending else None)
        if outcome is None:
            # Still streaming: the reward needs the outcome's latency and tokens.
            book.pending[rid] = _Pending(quality=quality, overwrite=body.overwrite)
            while len(book.pending) > book.max_entries:
                book.pending.popitem(last=False)
            fx.recorder.submit(FeedbackEntry(request_id=rid, quality=quality, reward=None, payload=payload, received_at=now))
            book.remember(rid, quality, None)
            _pair_explicit(fx, rid, quality, None)
            _count_signal(fx, decision.context.task_type, already or _judged(fx, rid), learns=True)  # in flight: status not known yet
            return FeedbackResult(
                request_id=rid, found_in="registry", quality=quality, previous_quality=previous_quality,
                automatic_quality=None, reward=None, previous_reward=None, policy_updated=False,
                policy_update="request still in flight: the reward is computed when its outcome is known",
                overwritten=already,
            )
        return await _with_outcome(fx, decision, outcome, quality, payload, already, previous_quality, now)

    row = await fx.log.get_decision(rid)
    if row is None:
        raise DecisionNotFound(rid)
    # Only explicit feedback makes a conflict: a judge score or a regeneration mark in the log is
    # a weaker signal that this one replaces (as it does while the decision is in the registry).
    held = _held_source(fx, row)
    already = rid in book.recorded or held == "explicit"
    if already and not body.overwrite:
        raise FeedbackConflict(rid)
    previous_quality = book.recorded[rid][0] if rid in book.recorded else (row.feedback_quality if already else None)
    previous_signal: float | None = None
    if rid in book.recorded:
        old_reward = previous_signal = book.recorded[rid][1]
    elif held is not None:
        old_reward = row.feedback_reward  # the delayed signal's reward is the one the policy holds
        if held not in ONE_SIDED:
            previous_signal = row.feedback_reward  # and the temperature-only statistics too (`_teach_temperature`)
    else:
        old_reward = row.reward
    new_reward = _reward(fx, row.task_type, quality, row.latency_s, row.completion_tokens, row.cost_usd)
    ctx = context_from_features(row.context_features)
    if not learns(row.status, row.error_class):
        updated, note = False, "failed requests do not update the policy"
    elif ctx is None:
        updated, note = False, "the logged context could not be rebuilt"
    else:
        updated, note = _apply(
            fx, ctx, row.baseline_params.arm(), row.chosen_params.arm(row.baseline_params), old_reward, new_reward,
            row.policy_version,
        )
        _teach_temperature(fx, ctx, row.baseline_params, row.chosen_params, new_reward, previous_signal, row.policy_version)
    fx.recorder.submit(FeedbackEntry(request_id=rid, quality=quality, reward=new_reward, payload=payload, received_at=now))
    book.remember(rid, quality, new_reward)
    _pair_explicit(fx, rid, quality, row)
    _count_signal(fx, row.task_type, already or previous_signal is not None or _judged(fx, rid), learns(row.status, row.error_class))
    _to_guards(fx, rid, row.task_type, row.mode, "explicit", quality, new_reward, learns(row.status, row.error_class), model=row.chosen_params.model)
    return FeedbackResult(
        request_id=rid, found_in="log", quality=quality, previous_quality=previous_quality, automatic_quality=row.quality,
        reward=new_reward, previous_reward=old_reward, policy_updated=updated, policy_update=note, overwritten=already,
    )


async def _with_outcome(
    fx: FeedbackServices, decision: Decision, outcome: Outcome, quality: float, payload: dict[str, Any],
    already: bool, previous_quality: float | None, now: float,
) -> FeedbackResult:
    book = fx.book
    rid = decision.request_id
    row = await _logged_signal(fx, rid)
    signalled = _judged(fx, rid) or (row is not None and _held_source(fx, row) not in (None, *ONE_SIDED))
    automatic = outcome.quality if not outcome.feedback and not signalled else None
    old_reward = outcome.reward
    if already and previous_quality is None:
        previous_quality = outcome.quality
    new_reward = fx.bandit.reward_for(decision, outcome, quality)
    if not learns(outcome.status, outcome.error_class):
        updated, note = False, "failed requests do not update the policy"
    else:
        updated, note = _apply(
            fx, decision.context, decision.baseline.arm(), decision.sent.arm(decision.baseline), old_reward, new_reward,
            decision.policy_version,
        )
        previous_signal = old_reward if outcome.feedback or signalled else None
        _teach_temperature(fx, decision.context, decision.baseline, decision.sent, new_reward, previous_signal, decision.policy_version)
    # A copy: the queued LogEntry shares the original Outcome and must keep the automatic score.
    fx.registry.complete(decision, msgspec.structs.replace(outcome, quality=quality, reward=new_reward, feedback=True))
    fx.recorder.submit(FeedbackEntry(request_id=rid, quality=quality, reward=new_reward, payload=payload, received_at=now))
    book.remember(rid, quality, new_reward)
    _pair_explicit(fx, rid, quality, row)
    _count_signal(fx, decision.context.task_type, already or signalled, learns(outcome.status, outcome.error_class))
    _to_guards(fx, rid, decision.context.task_type, decision.mode, "explicit", quality, new_reward, learns(outcome.status, outcome.error_class),
               model=decision.sent.model)
    return FeedbackResult(
        request_id=rid, found_in="registry", quality=quality, previous_quality=previous_quality, automatic_quality=automatic,
        reward=new_reward, previous_reward=old_reward, policy_updated=updated, policy_update=note, overwritten=already,
    )


def apply_pending_feedback(fx: FeedbackServices, decision: Decision, outcome: Outcome) -> None:
    """For the edge, right after `decider.observe`: feedback that arrived while the response streamed.

    Swaps the automatic reward just applied for the one computed with the explicit quality.
    """
    book = fx.book
    pending = book.pending.pop(decision.request_id, None)
    if pending is None:
        return
    new_reward = fx.bandit.reward_for(decision, outcome, pending.quality)
    if learns(outcome.status, outcome.error_class):
        _apply(
            fx, decision.context, decision.baseline.arm(), decision.sent.arm(decision.baseline), outcome.reward, new_reward,
            decision.policy_version,
        )
        _teach_temperature(fx, decision.context, decision.baseline, decision.sent, new_reward, None, decision.policy_version)
    fx.recorder.submit(
        FeedbackEntry(request_id=decision.request_id, quality=pending.quality, reward=new_reward,
                      payload={"deferred": True}, received_at=time.time())
    )
    book.remember(decision.request_id, pending.quality, new_reward)
    _to_guards(fx, decision.request_id, decision.context.task_type, decision.mode, "explicit", pending.quality, new_reward,
               learns(outcome.status, outcome.error_class), model=decision.sent.model)
    outcome_copy = msgspec.structs.replace(outcome, quality=pending.quality, reward=new_reward, feedback=True)
    fx.registry.complete(decision, outcome_copy)


class SignalBook:
    """Source of the last automatic-path signal (judge, implicit) applied per request, bounded.

    Explicit feedback lives in `FeedbackBook`; this book lets a judge score replace an
    implicit mark (and not the other way round) without a store round trip.

    Judge agreement. Explicit feedback replaces the judge's score in the log, so the judge's
    own score would be lost by the time both exist. The book therefore keeps, per request, the
    judge's quality (`judged`, bounded like `sources`) and, per task type, the last
    `max_pairs` (judge, explicit) pairs as they meet, whichever arrives first. The pairs are
    what `policies.agreement.judge_trusted` reads before a judge score is delivered; they keep
    accumulating while the judge is untrusted, so it regains trust when its agreement recovers.
    The runtime uses `proxy.learning.signal_sync.SyncedSignalBook`, whose pairs survive a restart
    and are shared between replicas; the per-request maps stay in this process.
    Validator checks and failures per task type are counted here too, for the quality report.
    """

    def __init__(self, max_entries: int = MAX_SIGNAL_ENTRIES, max_pairs: int = MAX_JUDGE_PAIRS) -> None:
        self.max_entries = max_entries
        self.max_pairs = max_pairs
        self.sources: OrderedDict[str, str] = OrderedDict()
        self.results: dict[tuple[str, str], int] = {}  # (source, result) -> count
        self.judged: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> (task type, judge quality)
        self.pairs: dict[str, OrderedDict[str, tuple[float, float]]] = {}  # task -> id -> (judge, explicit)
        self.validation: dict[str, tuple[int, int]] = {}  # task (metrics label, capped) -> (checked, failed)

    def judge_scored(self, request_id: str, task_type: str, quality: float, explicit: float | None) -> None:
        """The judge's quality for a request; paired at once when explicit feedback is already known."""
        self.judged[request_id] = (task_type, quality)
        self.judged.move_to_end(request_id)
        while len(self.judged) > self.max_entries:
            self.judged.popitem(last=False)
        if explicit is not None:
            self._pair(task_type, request_id, quality, explicit)

    def explicit_scored(self, request_id: str, quality: float) -> None:
        """Explicit feedback for a request; paired when the judge scored it (an overwrite replaces the pair)."""
        judged = self.judged.get(request_id)
        if judged is not None:
            self._pair(judged[0], request_id, judged[1], quality)

    def _pair(self, task_type: str, request_id: str, judge: float, explicit: float) -> None:
        pairs = self.pairs.setdefault(task_type, OrderedDict())
        pairs[request_id] = (judge, explicit)
        pairs.move_to_end(request_id)
        while len(pairs) > self.max_pairs:
            pairs.popitem(last=False)

    def pairs_of(self, task_type: str) -> list[tuple[float, float]]:
        return list(self.pairs.get(task_type, {}).values())

    def validated(self, task_label: str, failed: bool) -> None:
        checked, failures = self.validation.get(task_label, (0, 0))
        self.validation[task_label] = (checked + 1, failures + int(failed))

    def remember(self, request_id: str, source: str) -> None:
        self.sources[request_id] = source
        self.sources.move_to_end(request_id)
        while len(self.sources) > self.max_entries:
            self.sources.popitem(last=False)

    def count(self, source: str, result: str) -> str:
        self.results[(source, result)] = self.results.get((source, result), 0) + 1
        return result


@dataclass(frozen=True, slots=True)
class SignalDelivery:
    """Where a judge score (or a regeneration mark) enters the decision room: the judge holds one of these.

    `await delivery(signal)` is `deliver_signal` over the process's `FeedbackServices`: it finds
    the decision (registry, Redis, log), recomputes the reward with `BanditDecider.reward_for`
    and swaps it into the policy with `correct()` (`_apply`). Built once by the composition root.
    """

    services: FeedbackServices

    async def __call__(self, signal: Signal) -> str:
        return await deliver_signal(self.services, signal)


async def deliver_signal(fx: FeedbackServices, signal: Signal, now: float | None = None) -> str:
    """Entry point for judge scores and implicit marks (`policies.signals.Signal`); returns what happened.

    Judge scores and pairwise verdicts of finished requests also reach the guards
    (`FeedbackServices.guards`) first, for optimised and holdout requests alike. A signal
    with `guards_only` (a holdout request judged beyond `[judge] sample_rate`, so the holdout
    has as many judged requests as the tuned traffic) stops there ("guards_only"): teaching the
    policy from it would give the baseline arm more judged rewards than the others.

    Results: "applied" (quality and reward replaced, the policy corrected once through
    `_apply`/`correct()`), "weaker" (explicit feedback, or a stronger signal, is already
    there), "not_found" (the decision left the registry), "in_flight" (no outcome yet),
    "explicit_not_here" (explicit feedback must come through `record_outcome`), "untrusted"
    (a judge score for a task type where the judge disagrees with explicit feedback,
    `policies.agreement.judge_trusted`; its score is still kept for the agreement).

    The outcome is replaced with `feedback=False`: only explicit feedback makes a later
    `record-outcome` a conflict, and its `correct()` then swaps this signal's reward (the one
    the policy holds now) for the explicit one, so a request is never counted twice.
    """
    from policies.signals import rank, should_replace

    now = time.time() if now is None else now
    book, signals = fx.book, fx.signals
    rid = signal.request_id
    if signal.source == "explicit":
        return signals.count(signal.source, "explicit_not_here")
    explicit = rid in book.recorded or rid in book.pending
    if explicit and signal.source not in GUARD_SOURCES:
        return signals.count(signal.source, "weaker")
    item = fx.registry.get(rid, now)
    if item is None and fx.shared is not None:
        item = await fx.shared.find_decision(rid)
    if item is None:
        return signals.count(signal.source, "not_found")
    decision, outcome = item
    task_type = decision.context.task_type
    q = min(1.0, max(0.0, float(signal.quality)))
    trusted = True
    if signal.source == "judge":
        # Kept for agreement whatever happens next: the explicit score, if any, wins in the log.
        explicit_quality = book.recorded[rid][0] if rid in book.recorded else (book.pending[rid].quality if rid in book.pending else None)
        signals.judge_scored(rid, task_type, q, explicit_quality)
        trusted = judge_gate(fx, decision, outcome, q)
    if outcome is not None and signal.source in GUARD_SOURCES:
        # The guards see every judged request of both streams, whatever the policy does with the score next;
        # a muted judge's kind is marked untrusted there (it neither rolls back nor excuses a cost regression).
        _to_guards(fx, rid, task_type, decision.mode, signal.source, q, fx.bandit.reward_for(decision, outcome, q),
                   learns(outcome.status, outcome.error_class), trusted, model=decision.sent.model)
    if signal.guards_only:
        return signals.count(signal.source, "guards_only")
    if signal.source == "judge":
        if explicit:
            return signals.count(signal.source, "weaker")
        if not trusted:
            return signals.count(signal.source, "untrusted")
    if explicit:
        return signals.count(signal.source, "weaker")
    if outcome is None:
        return signals.count(signal.source, "in_flight")
    if outcome.feedback or not should_replace(signals.sources.get(rid), signal.source):
        return signals.count(signal.source, "weaker")
    quality = min(1.0, max(0.0, float(signal.quality)))
    new_reward = fx.bandit.reward_for(decision, outcome, quality)
    # Judge scores see temperature as explicit feedback does; one count per request. Implicit marks are
    # one-sided (only failures are ever marked), so alone they cannot rank temperatures (`ONE_SIDED`).
    one_sided = signal.source in ONE_SIDED
    earlier = _judged(fx, rid)
    if not one_sided:
        _count_signal(fx, decision.context.task_type, earlier, learns(outcome.status, outcome.error_class))
    if learns(outcome.status, outcome.error_class):
        _apply(
            fx, decision.context, decision.baseline.arm(), decision.sent.arm(decision.baseline), outcome.reward, new_reward,
            decision.policy_version,
        )
        if not one_sided:
            previous_signal = outcome.reward if earlier else None
            _teach_temperature(fx, decision.context, decision.baseline, decision.sent, new_reward, previous_signal, decision.policy_version)
    fx.registry.complete(decision, msgspec.structs.replace(outcome, quality=quality, reward=new_reward))
    payload: dict[str, Any] = {"source": signal.source, "rank": rank(signal.source)}
    if signal.reason:
        payload["reason"] = signal.reason
    fx.recorder.submit(
        FeedbackEntry(request_id=rid, quality=quality, reward=new_reward, payload=payload, received_at=now, source=signal.source)
    )
    signals.remember(rid, signal.source)
    return signals.count(signal.source, "applied")


RETRACT_MAX_ROWS = 200_000
"""Logged decisions of one task type read back when its judge is muted (newest first)."""

RETRACT_CHUNK = 128
"""Rows taken back between two yields to the event loop (a correction is a few µs)."""


async def retract_judge(fx: FeedbackServices, task_type: str, now: float | None = None) -> int:
    """Take back what a muted judge taught for `task_type`; returns how many judge scores left the statistics.

    * the usual statistics: each logged judge score's reward is swapped back for the
      automatic reward with `correct()` (what it replaced in the first place), so the arms
      are ranked again on what the automatic score sees;
    * the temperature-only statistics hold signals only, so the judge's rewards cannot be
      swapped for anything there: the task's temperature stage is reopened and taught again
      from the explicit feedback in the log (a policy that cannot reopen keeps them, said in
      the log); while the judge is muted temperature stays at the client's anyway
      (`BanditDecider.temperature_evidence`);
    * decisions still in the registry get their automatic quality and reward back, so a later
      explicit score swaps the right reward; for those only in the log, the trust state
      remembers up to when judge scores were taken back (`_held_source`).

    The log keeps the judge's scores: the agreement with explicit feedback still reads them.
    """
    now = time.time() if now is None else now
    if fx.trust is not None:
        fx.trust.mark_retracted(task_type, now)
    if not fx.learns:
        return 0
    await fx.recorder.flush()  # the judge scores delivered just before the mute are still queued for the log
    rows = await fx.log.fetch_decisions(task_type=task_type, until=now + 1.0, limit=RETRACT_MAX_ROWS)
    taken = 0
    explicit: list[tuple[RequestContext, DecisionRow]] = []
    for i, row in enumerate(rows):
        if i % RETRACT_CHUNK == RETRACT_CHUNK - 1:
            await asyncio.sleep(0)  # the policy is changed on the loop, in slices well under a millisecond
        if not learns(row.status, row.error_class) or row.feedback_quality is None:
            continue
        ctx = context_from_features(row.context_features)
        if ctx is None:
            continue
        if (row.feedback_source or "explicit") == "explicit":
            if row.feedback_reward is not None:
                explicit.append((ctx, row))
            continue
        if row.feedback_source != "judge" or row.feedback_reward is None or row.reward is None:
            continue
        base, arm = row.baseline_params.arm(), row.chosen_params.arm(row.baseline_params)
        correct = getattr(fx.bandit.policy, "correct", None)
        if callable(correct) and correct(ctx, base, arm, row.feedback_reward, row.reward, logged_version=row.policy_version) == "corrected":
            taken += 1
        fx.signals.sources.pop(row.request_id, None)
        item = fx.registry.get(row.request_id, now)
        if item is not None and item[1] is not None and not item[1].feedback:
            fx.registry.complete(item[0], msgspec.structs.replace(item[1], quality=row.quality, reward=row.reward))
    policy: Any = fx.bandit.policy
    if callable(getattr(policy, "reopen", None)):
        policy.reopen(task_type + TEMPERATURE_STATISTICS)
        for i, (ctx, row) in enumerate(reversed(explicit)):  # oldest first, as they were taught
            if i % RETRACT_CHUNK == RETRACT_CHUNK - 1:
                await asyncio.sleep(0)
            assert row.feedback_reward is not None
            fx.bandit.learn_signal(ctx, row.baseline_params, row.chosen_params, row.feedback_reward, None, logged_version=row.policy_version)
    else:
        log.warning("policy %r cannot reopen: its temperature stage keeps what the muted judge taught for %r", policy.name, task_type)
    log.warning("judge muted for task type %r: %d judge scores taken back from the policy statistics, temperature stage "
                "re-taught from %d explicit scores", task_type, taken, len(explicit))
    return taken


def _retract_later(fx: FeedbackServices, task_type: str) -> None:
    """Start `retract_judge` off the caller's path (a log read), keeping a reference until it ends."""
    trust = fx.trust
    if trust is None:
        return
    task = asyncio.get_running_loop().create_task(retract_judge(fx, task_type), name=f"judge-retract-{task_type[:32]}")
    trust.tasks.add(task)

    def done(t: asyncio.Task[int]) -> None:
        trust.tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("taking back the muted judge's scores for %r failed: %s", task_type, t.exception())

    task.add_done_callback(done)


def judge_gate(fx: FeedbackServices, decision: Decision, outcome: Outcome | None, quality: float) -> bool:
    """Is the judge trusted for this decision's task type? Feeds the length check and the agreement check first.

    Called for every judge score of a known decision, whatever happens to it next: the length
    statistic needs every judged answer, holdout included. A check that mutes the judge starts
    `retract_judge`.
    """
    task_type = decision.context.task_type
    trust = fx.trust
    if trust is None:
        return _check_agreement(fx, task_type)
    if outcome is not None and learns(outcome.status, outcome.error_class) and outcome.finish_reason != "length":
        arm = repr((decision.context.model, decision.baseline, decision.sent))
        if trust.observe_length(task_type, arm, outcome.completion_tokens, quality) is not None:
            _retract_later(fx, task_type)
    _check_agreement(fx, task_type)
    return not trust.muted(task_type)


def _check_agreement(fx: FeedbackServices, task_type: str) -> bool:
    """The agreement check (`policies.agreement.judge_trusted`) for a task type, handed to the mutes; its verdict."""
    from policies.agreement import agreement, judge_trusted

    judge = fx.judge
    pairs = fx.signals.pairs_of(task_type)
    agreed = judge_trusted(pairs, judge.min_agreement, judge.min_agreement_pairs)
    if fx.trust is None:
        return agreed
    evidence: dict[str, float | int | str | None] = {}
    if not agreed:
        a = agreement(pairs)
        evidence = {"pairs": a.n, "spearman": None if a.spearman is None else round(a.spearman, 4), "min_agreement": judge.min_agreement}
    if fx.trust.agreement(task_type, agreed, evidence) is not None:
        _retract_later(fx, task_type)
    return agreed
