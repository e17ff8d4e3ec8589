"""Whether the judge's scores may teach, per task type: earned, lost, and remembered across restarts.

A judge is muted for a task type for one of two reasons:

* ``length_bias``: within arms, its scores follow the answers' length
  (`policies.judge_bias`; no explicit feedback needed). Checked after every judged answer,
  anytime-valid, so the check can run for ever without inflating its false-alarm rate. A
  judge that rewards length keeps doing so: the mute stays until an operator lifts it
  (`POST /api/optimization/judge/unmute`, which also starts the length statistic afresh);
* ``disagreement``: its rank agreement with explicit feedback on the same requests fell below
  `[judge] min_agreement` (`policies.agreement.judge_trusted`); lifted by itself when the
  agreement recovers, as before.

Muting is more than ignoring the next scores: the scores the judge already gave for the task
are taken back (`proxy.decision.feedback.retract_judge`), and while it is muted the task's
temperature stays at the client's (`BanditDecider.temperature_evidence`), so a muted judge
does not keep steering traffic through what it taught.

Each change is an event in the decision log (kind ``judge_muted`` / ``judge_unmuted``, actor
``judge``, so `GET events` and the dashboard show it), an alert (``ThermostatJudgeMuted``), the
gauge ``thermostat_judge_muted{task,reason}``, and a save of the whole state (a blob in the
state store, like the conservative monitor's): mutes and the length statistics survive a
restart. With several replicas on Redis the last save wins and each replica adopts the stored
state at start-up only, so a mute reaches the other replicas at their next restart (or when
their own evidence gets there, which is usually soon after: they see the same judge).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Literal

import msgspec

from guards.state import StateStore, StoreUnavailable
from policies.judge_bias import LengthBias, concordance_bounds, new_length_bias, observe_pair, rewards_length, slope
from proxy.observability import Alert, AlertManager, Metrics
from proxy.store import EventRecord, Recorder

log = logging.getLogger("thermostat.judge")

TRUST_KEY = "judge:trust"
ACTOR = "judge"
MuteReason = Literal["length_bias", "disagreement"]
# Judged answers waiting for a second one of the same (task type, arm): keyed by the arm, not the
# request, so the task-type cap bounds it long before this does.
MAX_WAITING_PAIRS = 50_000


class Mute(msgspec.Struct, frozen=True):
    reason: MuteReason
    at: float  # unix seconds
    summary: str
    evidence: dict[str, float | int | str | None] = {}


class TrustState(msgspec.Struct):
    length: dict[str, LengthBias] = {}  # task type -> within-arm pairs
    mutes: dict[str, Mute] = {}  # task type -> why the judge is muted there
    # task type -> unix time: the judge scores of decisions made up to then were taken back (`retract_judge`)
    retracted: dict[str, float] = {}


def length_evidence(state: LengthBias) -> dict[str, float | int | str | None]:
    low, high = concordance_bounds(state)
    s = slope(state)
    return {"pairs": state.pairs, "untied_pairs": state.concordance.n, "concordance_low": round(low, 4),
            "concordance_high": round(high, 4), "quality_per_doubling": None if s is None else round(s, 4)}


class JudgeTrust:
    """Mutes per task type, the length statistic behind them, and what a change does (module docstring)."""

    def __init__(
        self, *, check_length: bool = True, margin: float = 0.1, alpha: float = 0.05, max_task_types: int = 4096,
        max_waiting: int = MAX_WAITING_PAIRS, recorder: Recorder | None = None, alerts: AlertManager | None = None,
        metrics: Metrics | None = None, state_store: StateStore | None = None,
    ) -> None:
        self.check_length = check_length
        self.margin = margin
        self.alpha = alpha
        self.max_task_types = max_task_types
        self.max_waiting = max_waiting
        self.recorder = recorder
        self.alerts = alerts
        self.metrics = metrics
        self.state_store = state_store
        self.state = TrustState()
        # (task type, arm) -> (length, quality) of the judged answer waiting for its pair; not persisted (one answer per arm)
        self.waiting: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self.tasks: set[asyncio.Task[int]] = set()  # retractions running (kept so they are not collected mid-way)
        self._save: asyncio.Task[None] | None = None
        self._dirty = False

    # -- reading --------------------------------------------------------------------------

    def muted(self, task_type: str) -> bool:
        return task_type in self.state.mutes

    def mute_of(self, task_type: str) -> Mute | None:
        return self.state.mutes.get(task_type)

    def length_of(self, task_type: str) -> LengthBias | None:
        return self.state.length.get(task_type)

    def retracted(self, task_type: str, decided_at: float) -> bool:
        """Was the judge's score of a decision made at `decided_at` taken back from the statistics?"""
        until = self.state.retracted.get(task_type)
        return until is not None and decided_at <= until

    def mark_retracted(self, task_type: str, until: float) -> None:
        if task_type in self.state.retracted or len(self.state.retracted) < self.max_task_types:
            self.state.retracted[task_type] = max(until, self.state.retracted.get(task_type, until))
            self._persist()

    # -- evidence -------------------------------------------------------------------------

    def observe_length(self, task_type: str, arm: str, length: int | None, quality: float, now: float | None = None) -> Mute | None:
        """One judged answer of `arm` (any stable label of the settings it was sent with); a new mute, if this made one."""
        if not self.check_length or length is None or length <= 0:
            return None
        key = (task_type, arm)
        first = self.waiting.pop(key, None)
        if first is None:
            self.waiting[key] = (int(length), float(quality))
            while len(self.waiting) > self.max_waiting:
                self.waiting.popitem(last=False)
            return None
        state = self.state.length.get(task_type)
        if state is None:
            if len(self.state.length) >= self.max_task_types:
                return None  # client-controlled keys never grow state without bound
            state = new_length_bias(self.alpha)
        state = observe_pair(state, first[0], first[1], int(length), float(quality))
        self.state.length[task_type] = state
        self._persist()
        if task_type in self.state.mutes or not rewards_length(state, self.margin):
            return None
        evidence = length_evidence(state)
        summary = (f"the judge's scores follow answer length within arms: P(longer answer scored higher) >= "
                   f"{evidence['concordance_low']:.2f} over {state.concordance.n} pairs (more than 0.5 + {self.margin:g}); "
                   f"its scores no longer teach and the ones it gave are taken back")
        return self.mute(task_type, "length_bias", summary, evidence, now)

    def agreement(self, task_type: str, trusted: bool, evidence: dict[str, float | int | str | None], now: float | None = None) -> Mute | None:
        """The agreement check's verdict for a task type: a new mute when it fails, an unmute when a disagreement mute recovers."""
        current = self.state.mutes.get(task_type)
        if not trusted and current is None:
            summary = (f"the judge disagrees with explicit feedback (Spearman {evidence.get('spearman')} over "
                       f"{evidence.get('pairs')} pairs); its scores no longer teach and the ones it gave are taken back")
            return self.mute(task_type, "disagreement", summary, evidence, now)
        if trusted and current is not None and current.reason == "disagreement":
            self.unmute(task_type, "the judge's agreement with explicit feedback recovered", evidence, now=now)
        return None

    # -- changes --------------------------------------------------------------------------

    def mute(self, task_type: str, reason: MuteReason, summary: str, evidence: dict[str, float | int | str | None],
             now: float | None = None) -> Mute | None:
        if task_type in self.state.mutes:
            return None
        if len(self.state.mutes) >= self.max_task_types:
            return None
        at = time.time() if now is None else now
        m = Mute(reason=reason, at=at, summary=summary, evidence=evidence)
        self.state.mutes[task_type] = m
        self._announce("judge_muted", task_type, m.summary, {**evidence, "reason": reason}, at, firing=True, reason=reason)
        return m

    def unmute(self, task_type: str, summary: str, evidence: dict[str, float | int | str | None] | None = None,
               *, actor: str = ACTOR, now: float | None = None) -> bool:
        """Lift a mute (the agreement recovered, or an operator); the length statistic starts afresh after a length mute."""
        m = self.state.mutes.pop(task_type, None)
        if m is None:
            return False
        if m.reason == "length_bias":
            self.state.length.pop(task_type, None)
            self.waiting = OrderedDict((k, v) for k, v in self.waiting.items() if k[0] != task_type)
        at = time.time() if now is None else now
        self._announce("judge_unmuted", task_type, summary, {**(evidence or {}), "reason": m.reason}, at, firing=False,
                       reason=m.reason, actor=actor)
        return True

    def _announce(self, kind: str, task_type: str, summary: str, evidence: dict[str, float | int | str | None], at: float,
                  *, firing: bool, reason: str, actor: str = ACTOR) -> None:
        label = self.metrics.task_label(task_type) if self.metrics is not None else task_type
        log.warning("judge %s for task type %r: %s", kind.removeprefix("judge_"), task_type, summary)
        if self.recorder is not None:
            self.recorder.submit(EventRecord(at=at, kind=kind, reason=summary, evidence={**evidence, "task_type": task_type}, actor=actor))
        if self.metrics is not None:
            self.metrics.child(self.metrics.judge_muted, label, reason).set(1.0 if firing else 0.0)
        if self.alerts is not None:
            self.alerts.enqueue(Alert(name="ThermostatJudgeMuted", severity="warning", status="firing" if firing else "resolved", at=at,
                                      summary=f"task type {task_type}: {summary}", labels={"task_type": label, "reason": reason}))
        self._persist()

    # -- persistence ----------------------------------------------------------------------

    async def load(self) -> None:
        if self.state_store is None:
            return
        try:
            raw = await self.state_store.get(TRUST_KEY)
        except StoreUnavailable:
            log.warning("state store unreachable at start-up; the judge's mutes start empty")
            return
        if raw is None:
            return
        try:
            self.state = msgspec.json.decode(raw, type=TrustState)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("stored judge trust state ignored: %s", exc)
            return
        if self.metrics is not None:
            for task, m in self.state.mutes.items():
                self.metrics.child(self.metrics.judge_muted, self.metrics.task_label(task), m.reason).set(1.0)

    def _persist(self) -> None:
        """Save the whole state; one save in flight at a time (the blob is the whole state, the next save catches up)."""
        if self.state_store is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._save is not None and not self._save.done():
            self._dirty = True
            return
        self._dirty = False
        self._save = loop.create_task(self._write())

    async def _write(self) -> None:
        assert self.state_store is not None
        while True:
            try:
                await self.state_store.set(TRUST_KEY, msgspec.json.encode(self.state))
            except Exception as exc:  # noqa: BLE001 - a failed save is retried with the next change
                log.warning("saving the judge's trust state failed: %s", exc)
                return
            if not self._dirty:
                return
            self._dirty = False

    async def flush(self) -> None:
        """Wait for the retractions and the save in flight (shutdown, tests)."""
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._save is not None:
            await asyncio.gather(self._save, return_exceptions=True)
