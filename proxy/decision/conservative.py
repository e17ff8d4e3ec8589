"""The conservative monitor's listener: optimised vs holdout per task type, after every outcome.

`guards/conservative.py` holds the pure rule; this listener feeds it each finished
request, records and counts what it decides, raises the alert, and persists its state
(a rollback survives a restart: the state is a blob in the state store, like the rollout's).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import msgspec

from guards.conservative import ConservativeMonitor, MonitorEvent, MonitorState
from guards.state import StateStore, StoreUnavailable
from policies.base import Adaptive, Policy
from policies.records import Decision, Outcome
from proxy.decision.batch import Finished, OutcomeBatch
from proxy.decision.decider import TEMPERATURE_STATISTICS
from proxy.observability import Alert, AlertManager, Metrics, RolloutSource
from proxy.store import EventRecord, Recorder

log = logging.getLogger("thermostat")

CONSERVATIVE_KEY = "conservative:state"


def _log_save_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("saving the conservative monitor's state failed: %s", task.exception())


# (request id, signal kind) pairs already counted by the monitor, so a repeated signal is not
# counted twice (oldest forgotten first; ~200 bytes each).
MAX_SEEN_SIGNALS = 200_000


class ConservativeListener:
    def __init__(
        self, monitor: ConservativeMonitor, *, rollout: RolloutSource, recorder: Recorder, metrics: Metrics,
        alerts: AlertManager, state_store: StateStore, policy: Policy, max_seen: int = MAX_SEEN_SIGNALS,
        batch: OutcomeBatch | None = None,
    ) -> None:
        self.monitor = monitor
        self.policy = policy
        self.rollout = rollout
        self.recorder = recorder
        self.metrics = metrics
        self.alerts = alerts
        self.state_store = state_store
        self._save: asyncio.Task[None] | None = None
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()  # (request id, kind) already counted
        self.max_seen = max_seen
        # Outcomes are folded in batches (proxy/decision/batch.py); without one, each at once.
        self.batch = batch
        if batch is not None:
            batch.steps.append(self.on_outcomes)

    async def load(self) -> None:
        try:
            raw = await self.state_store.get(CONSERVATIVE_KEY)
        except StoreUnavailable:
            log.warning("state store unreachable at start-up; the conservative monitor starts empty")
            return
        if raw is None:
            return
        try:
            self.monitor.state = msgspec.json.decode(raw, type=MonitorState)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:  # an older layout: start over rather than fail start-up
            log.warning("stored conservative-monitor state ignored: %s", exc)

    def on_outcome(self, decision: Decision, outcome: Outcome) -> None:
        """Completion listener after the decider's: queued for the next batch (or folded at once without one)."""
        if self.batch is not None:
            self.batch.add(decision, outcome)
        else:
            self.on_outcomes(((decision, outcome),))

    def on_outcomes(self, finished: Sequence[Finished]) -> None:
        """The batch step: promotion's comparison fed, the monitor's fold and breach check; events recorded, counted, alerted."""
        # Promotion's optimised-vs-holdout comparison. A task type the monitor rolled back has no optimised
        # traffic left; its holdout rewards stay out too, so both streams keep the same task mix.
        rollout, monitor = self.rollout.rollout, self.monitor
        for decision, outcome in finished:
            if not monitor.is_rolled_back(decision.context.task_type):
                rollout.observe_reward(decision.mode, outcome.reward)
        events = monitor.on_outcomes(finished, time.time())
        if events:
            self.on_events(events)

    def on_signal(
        self, *, request_id: str, task_type: str, mode: str, kind: str, quality: float, reward: float | None, trusted: bool = True
    ) -> None:
        """A delayed signal (judge score, pairwise verdict, explicit score): its own kind's comparison, once per request.

        Promotion gets the reward recomputed with it (`RolloutController.observe_reward(kind=)`),
        the monitor its quality (`guards.conservative.observe_signal`). A second signal of the
        same kind for the same request (a judge re-run, an explicit overwrite) is not a new
        sample: the sequences cannot take the first one back, so it is ignored here.
        """
        if self.batch is not None:
            self.batch.drain()  # the request's own outcome is folded before its signal
        key = (request_id, kind)
        if key in self._seen:
            return
        self._seen[key] = None
        while len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)
        if not self.monitor.is_rolled_back(task_type):
            self.rollout.rollout.observe_reward(mode, reward, kind=kind)
        events = self.monitor.on_signal(task_type, mode, kind, quality, time.time(), trusted)
        if events:
            self.on_events(events)

    def on_events(self, events: list[MonitorEvent]) -> None:
        for event in events:
            reopened: dict[str, bool] = {}
            if event.kind == "change_detected" and isinstance(self.policy, Adaptive):
                # The holdout's own quality moved: what the policy learnt for this task describes
                # the old model. Its statistics start afresh (shared with the other replicas through
                # the reopen count, policies.base.Adaptive), so exploration resumes from the prior.
                self.policy.reopen(event.task_type)
                self.policy.reopen(event.task_type + TEMPERATURE_STATISTICS)  # the temperature stage learnt the old model too
                reopened = {"exploration_reopened": True}
            task = self.metrics.task_label(event.task_type)
            self.recorder.submit(
                EventRecord(
                    at=event.at, kind=event.kind, from_phase=self.rollout.rollout.state.phase,
                    to_phase="rollback" if event.kind == "rollback" else None,
                    reason=event.reason, evidence={**event.evidence, **reopened, "task_type": event.task_type}, actor="conservative",
                )
            )
            if event.kind == "relearning_ended":  # recorded for the reports; nothing to alert on
                log.info("task type %r re-learnt after a change: %s", event.task_type, event.reason)
                continue
            if event.kind == "rollback":
                self.metrics.child(self.metrics.task_rollbacks, task).inc()
            else:
                self.metrics.child(self.metrics.task_changes, task).inc()
            log.warning("conservative monitor %s for task type %r: %s", event.kind, event.task_type, event.reason)
            name = "ThermostatTaskRollback" if event.kind == "rollback" else "ThermostatBaselineChanged"
            self.alerts.enqueue(Alert(
                name=name, severity="critical" if event.kind == "rollback" else "warning", status="firing", at=event.at,
                summary=f"task type {event.task_type}: {event.reason}", labels={"task_type": task, "actor": "conservative"},
            ))
        # One save in flight at a time is enough: the blob is the whole state, the last write wins.
        if self._save is None or self._save.done():
            self._save = asyncio.get_running_loop().create_task(
                self.state_store.set(CONSERVATIVE_KEY, msgspec.json.encode(self.monitor.state))
            )
            self._save.add_done_callback(_log_save_failure)
