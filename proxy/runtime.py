"""Wiring: everything one Thermostat process holds, built from a validated Config.

The edge and the control API read from this object; nothing here runs on import,
and nothing here does I/O until `start()`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from guards.budget import BudgetGuard
from guards.conservative import ConservativeMonitor, ConservativeSettings, MonitorEvent, MonitorState
from guards.lease import LeaseBook
from guards.rollout import RolloutController, RolloutEvent, load_state, save_state
from guards.slo import SloMonitor
from guards.state import InProcessStore, StateStore, StoreUnavailable
from guards.trust_region import ModelLimits
from policies.context import build_context
from policies.records import Decision, Outcome, RequestContext
from policies.registry import make_policy
from policies.reward import reward_bounds
from policies.signals import Signal
from policies.validators import SchemaValidators, validated_quality
from proxy.config import Config
from proxy.decision.decider import BanditDecider, Decider
from proxy.decision.feedback import FeedbackBook, SignalBook, deliver_signal
from proxy.decision.lease_refill import LeaseRefiller
from proxy.decision.regeneration import MemoryRegenerationBook, RedisRegenerationBook, RegenerationBook, regeneration_signal
from proxy.decision.registry import DecisionRegistry
from proxy.edge.upstream import Transport, UpstreamPool
from proxy.learning.evidence import compute_ope_evidence
from proxy.learning.judge import Judge, JudgeMetrics, upstream_transport
from proxy.learning.refresh import TableRefresher
from proxy.learning.sync import SharedState
from proxy.learning.validation import validate_answer
from proxy.observability.alerts import Alert
from proxy.observability.metrics import BoundedLabel, Metrics, watch_loop_lag
from proxy.observability.tracing import NullTracer, Tracer, make_tracer
from proxy.store import EventRecord, make_log_store
from proxy.store.journal import Journal
from proxy.store.local_state import LocalState
from proxy.store.recorder import Recorder
from proxy.store.redis_state import RedisStore

if TYPE_CHECKING:
    from proxy.control.deps import ControlDeps
    from proxy.observability.alerts import AlertManager

log = logging.getLogger("thermostat")

CONSERVATIVE_KEY = "conservative:state"
VERSION = "0.1.0"  # the service.version of exported spans (pyproject's version)


def _log_save_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # The shared-state layer replays failed blob writes once the store is back.
        log.warning("saving the rollout state failed: %s", task.exception())


class Runtime:
    def __init__(
        self,
        config: Config,
        *,
        decider: Decider | None = None,
        store: StateStore | None = None,
        spool_dir: Path | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.started_at = time.time()
        self.metrics = Metrics()
        # One span per proxied request (OTLP/HTTP); a NullTracer costs nothing when [telemetry] is off.
        self.tracer: Tracer | NullTracer = make_tracer(config.telemetry, version=VERSION, registry=self.metrics.registry)
        self.pool = UpstreamPool.from_settings(config.upstreams, transport)
        self.registry = DecisionRegistry()
        redis = config.storage
        self.state_store: StateStore = store or (
            RedisStore(redis.redis_url, prefix=redis.redis_key_prefix, timeout_s=redis.redis_timeout_s) if redis.redis_url else InProcessStore()
        )
        self.events: deque[RolloutEvent] = deque(maxlen=500)
        # SQLite under data_dir when no database_url, else PostgreSQL behind a local spool.
        self.sink = make_log_store(config, spool_dir)
        st = config.storage
        # Per process like the spool (serve --workers N gives each worker its own spool_dir).
        journal = Journal(spool_dir or Path(config.server.data_dir) / "spool", fsync_interval_s=st.journal_fsync_interval_s) if st.journal else None
        self.recorder = Recorder(
            self.sink,
            queue_size=st.queue_size,
            batch_size=st.batch_size,
            flush_interval_s=st.flush_interval_s,
            on_drop=self.metrics.queue_dropped.inc,
            on_written=self.metrics.written.inc,
            journal=journal,
        )
        self.build_context = self._bounded_context
        srv = config.server
        # Everything keyed by a client-controlled value is capped: past the cap a new task type
        # or model shares the bucket "other" (policy keys, costs, baselines, metrics, logs).
        self.task_types = BoundedLabel(srv.max_task_types, on_fold=lambda value: self._folded("task_type", value))
        for name in (*config.baseline, *config.caws.per_task_limits):
            # configured task types keep their own baseline and budget whatever arrives first
            self.task_types.seen.add(name.strip().lower())
        self._models: dict[str, BoundedLabel] = {}
        self._fold_warned: set[str] = set()
        self._folded_buckets_seen = 0
        self._limits: dict[tuple[str, str], ModelLimits] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._lag_watch: asyncio.Task[None] | None = None
        self.ope_interval_s = 60.0
        self.prune_interval_s = 3600.0
        # Attached by `proxy.app.build_litestar` until the control layer takes typed deps (docs/architecture.md).
        self.control: ControlDeps | None = None
        self.alerts: AlertManager | None = None

        self.policy = make_policy(config.optimization.policy, thompson=config.policy.thompson, linucb=config.policy.linucb)
        self.slo = SloMonitor(config.slo)
        self.refresher = TableRefresher.for_policy(self.policy)
        # Replicas on Redis admit from budget leases refilled in the background (guards/lease.py).
        caws = config.caws
        store_now = self.state_store
        leased = caws.enabled and caws.lease_enabled and isinstance(store_now, RedisStore)
        self.leases = LeaseBook(caws, holder=store_now.instance_id) if isinstance(store_now, RedisStore) and leased else None
        self.budget = BudgetGuard(config.caws, self.state_store, require_caws=config.constraints.require_caws, leases=self.leases)
        self.lease_refiller = (
            LeaseRefiller(self.budget, self.leases, self.state_store, clock=lambda: self.bandit.clock(), call_timeout_s=caws.lease_ttl_s / 2)
            if self.leases is not None
            else None
        )
        self.conservative = ConservativeMonitor(ConservativeSettings.from_slo(config.slo, max_tasks=srv.max_task_types))
        self._conservative_save: asyncio.Task[None] | None = None
        self.bandit: BanditDecider = BanditDecider(
            policy=self.policy,
            budget=self.budget,
            rollout=self._make_rollout(None),
            slo=self.slo,
            constraints=config.constraints,
            grid=config.policy.grid,
            reward_settings=config.policy.reward,
            baseline_for=config.baseline_for,
            limits_for=self.limits_for,
            rng=np.random.default_rng(config.optimization.seed),
            require_caws=config.constraints.require_caws,
            tick_interval_s=config.slo.check_interval_s,
            on_events=self.on_rollout_events,
            tune_temperature=config.optimization.tune_temperature,
            min_quality_signals=config.optimization.min_quality_signals,
            holdout_fraction=config.optimization.holdout_fraction,
            conservative=self.conservative,
        )
        self.decider: Decider = decider or self.bandit
        self.validators = SchemaValidators()  # compiled schemas cached by hash
        # Signals that arrive after the outcome (explicit, judge, implicit) re-enter through proxy/decision/feedback.py.
        self.feedback = FeedbackBook()
        self.signal_book = SignalBook()
        fb = config.feedback
        memory_book = MemoryRegenerationBook(fb.regenerate_window_s, fb.max_fingerprints)
        self.regeneration: RegenerationBook = (
            RedisRegenerationBook(self.state_store, fb.regenerate_window_s, memory_book) if isinstance(self.state_store, RedisStore) else memory_book
        )
        # Replicas must agree on the digest to match each other's requests; alone, a process-random key
        # means a digest cannot be confirmed against guessed prompts.
        self.regeneration_salt = redis.redis_key_prefix.encode() if isinstance(self.state_store, RedisStore) else secrets.token_bytes(32)
        self._background: set[asyncio.Task[Any]] = set()
        seed = config.optimization.seed
        self.judge: Judge | None = (
            Judge(
                config.judge, transport=upstream_transport(self.pool, config.judge.model), deliver=self._deliver_judged,
                charge=self._charge_judge, rng=np.random.default_rng(None if seed is None else seed + 1),
                metrics=JudgeMetrics(self.metrics.registry), alert=self._judge_alert,
            )
            if config.judge.enabled
            else None
        )
        # Several replicas: posterior, rollout state and decisions shared through Redis (proxy/learning/sync.py).
        self.shared: SharedState | None = (
            SharedState(self.state_store, storage=config.storage, policy=self.policy, costs=self.bandit.costs, rollout=self.bandit,
                        registry=self.registry)
            if isinstance(self.state_store, RedisStore)
            else None
        )
        if self.shared is not None:
            self.registry = self.shared.registry  # also writes decisions to Redis for feedback posted elsewhere
        # Embedded default (no Redis): budget, waivers, rollout state and posterior persisted under data_dir.
        self.local_state: LocalState | None = None
        if isinstance(self.state_store, InProcessStore) and st.state_persist:
            self.local_state = LocalState(
                Path(config.server.data_dir) / "state",
                self.state_store,
                stats={
                    f"policy:{self.policy.name}:{st.policy_family}": (self.policy.snapshot, self.policy.load_totals),
                    f"costs:{st.policy_family}": (lambda: self.bandit.costs.totals, self.bandit.costs.load_totals),
                },
                interval_s=st.state_snapshot_interval_s,
                fsync_interval_s=st.journal_fsync_interval_s,
            )

    @property
    def rollout(self) -> RolloutController:
        """The decider owns the live controller; readers (control API, alerts) see the same one."""
        return self.bandit.rollout

    def _make_rollout(self, state: object) -> RolloutController:
        opt = self.config.optimization
        return RolloutController.create(
            self.config.rollout,
            self.config.slo,
            self.slo,
            now=time.time(),
            phase=opt.mode,
            enabled=opt.enabled,
            traffic_percentage=opt.traffic_percentage,
            state=state,  # type: ignore[arg-type]
            reward_range=reward_bounds(self.config.policy.reward),
        )

    async def start(self) -> None:
        if self.local_state is not None:
            await self.local_state.start()
        try:
            stored = await load_state(self.state_store)
        except StoreUnavailable:
            # Redis down at start-up: serve with the configured phase; SharedState
            # adopts the shared state as soon as Redis answers.
            log.warning("state store unreachable at start-up; starting from the configured rollout phase")
            stored = None
        if stored is not None:
            self.bandit.rollout = self._make_rollout(stored)
        await self._load_conservative()
        if self.shared is not None:
            await self.shared.start()
        await self.recorder.start()
        self._lag_watch = asyncio.create_task(watch_loop_lag(self.metrics.loop_lag), name="thermostat-loop-lag")
        if self.lease_refiller is not None:
            self.lease_refiller.start()
        self._ticker = asyncio.create_task(self._tick_forever(), name="thermostat-rollout-tick")
        if self.refresher is not None:
            self.refresher.start()
        if self.judge is not None:
            self.judge.start()
        await self.tracer.start()
        log.info(
            "thermostat started: %d upstream(s), policy %s, phase %s, decision log %s",
            len(self.pool.upstreams), self.policy.name, self.rollout.state.phase, self.sink.name,
        )

    async def _tick_forever(self) -> None:
        """SLO cooldowns and promotions happen on time even when no traffic arrives.

        The OPE evidence promotion needs (improvement lower bound over baseline on the
        exploration data) is recomputed from the decision log every `ope_interval_s`.
        """
        last_ope = 0.0
        last_prune = time.time()  # first prune an interval after start, not during start-up
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            if now - last_prune >= self.prune_interval_s:
                last_prune = now
                await self.prune_expired()
            if now - last_ope >= self.ope_interval_s:
                last_ope = now
                try:
                    self.bandit.ope_evidence = await compute_ope_evidence(self.sink, self.bandit)
                except Exception as exc:  # the store may be down; promotion just waits
                    log.warning("OPE evidence for promotion not computed: %s", exc)
            self._count_folded_buckets()
            try:
                self.bandit.maybe_tick(now, force=True)
            except Exception:
                log.exception("rollout tick failed")

    def _count_folded_buckets(self) -> None:
        """The policy (pure, no metrics) counts rewards and choices it pooled in "other"; exported here."""
        folded = int(getattr(self.policy, "folded_buckets", 0))
        if folded > self._folded_buckets_seen:
            self.metrics.child(self.metrics.folded_keys, "bucket").inc(folded - self._folded_buckets_seen)
            self._folded_buckets_seen = folded
            if "bucket" not in self._fold_warned:
                self._fold_warned.add("bucket")
                log.warning("more context buckets than policy.thompson.max_buckets; new ones are learned together as 'other'")

    async def prune_expired(self) -> int:
        """Delete decisions older than `storage.retention_days` (0 keeps everything)."""
        days = self.config.storage.retention_days
        if days <= 0:
            return 0
        try:
            deleted = await self.sink.prune(days * 86_400.0)
        except Exception as exc:  # the store may be down; the next interval tries again
            log.warning("pruning the decision log failed: %s", exc)
            return 0
        if deleted:
            log.info("pruned %d decision(s) older than %d day(s)", deleted, days)
        return deleted

    async def stop(self) -> None:
        for task in (self._ticker, self._lag_watch):
            if task is not None:
                task.cancel()
        if self.judge is not None:
            await self.judge.stop()
        await self.tracer.stop()
        for task in list(self._background):
            task.cancel()
        if self.refresher is not None:
            await self.refresher.stop()
        if self.lease_refiller is not None:
            await self.lease_refiller.stop()
        if self.shared is not None:
            await self.shared.stop()
        await self.recorder.stop()
        if self.local_state is not None:
            await self.local_state.stop()
        await self.pool.aclose()

    @property
    def ready(self) -> bool:
        return self.recorder.ready and bool(self.pool.upstreams)

    def _bounded_context(self, body: Any, *, task_type: str, endpoint: str, upstream: str = "", effort: str | None = None) -> RequestContext:
        """`build_context` with the task type and model folded past their caps (one set lookup each)."""
        ctx = build_context(body, task_type=task_type, endpoint=endpoint, upstream=upstream, effort=effort)
        task = self.task_types(ctx.task_type)
        models = self._models.get(upstream)
        if models is None:
            models = self._models[upstream] = BoundedLabel(
                self.config.server.max_models_per_upstream, on_fold=lambda value: self._folded("model", f"{upstream}/{value}")
            )
        model = models(ctx.model)
        if model != ctx.model and model == "other":
            model = self._model_group(upstream, ctx.model)
        if task is ctx.task_type and model is ctx.model:
            return ctx
        return msgspec.structs.replace(ctx, task_type=task, model=model)

    def _model_group(self, upstream: str, model: str) -> str:
        """The shared name of a model past the cap: "other", or "other:<pattern>" when the model
        has `models_config` settings, so that folded models keep their limits (a fixed temperature)."""
        up = next((u for u in self.pool.upstreams if u.name == upstream), None)
        ms = up.model_settings(model) if up is not None else None
        group = "other" if ms is None else f"other:{ms.pattern}"
        if (upstream, group) not in self._limits:
            self._limits[(upstream, group)] = self.limits_for(upstream, model)
        return group

    def _folded(self, kind: str, value: str) -> None:
        self.metrics.child(self.metrics.folded_keys, kind).inc()
        if kind not in self._fold_warned:
            self._fold_warned.add(kind)
            log.warning("more distinct %s values than the configured cap; %r and later new ones count as 'other'", kind, value[:80])

    def limits_for(self, upstream: str, model: str) -> ModelLimits:
        key = (upstream, model)
        found = self._limits.get(key)
        if found is None:
            up = next((u for u in self.pool.upstreams if u.name == upstream), None)
            ms = up.model_settings(model) if up is not None else None
            found = (
                ModelLimits(
                    min_temperature=ms.min_temperature,
                    max_temperature=ms.max_temperature,
                    fixed_temperature=ms.fixed_temperature,
                    max_tokens=ms.max_tokens_limit,
                    default_temperature=ms.default_temperature,
                    efforts=ms.efforts,
                    accepts_temperature=ms.accepts_temperature,
                )
                if ms is not None
                else ModelLimits()
            )
            if up is not None and up.format == "anthropic" and found.max_temperature > 1.0:
                found = msgspec.structs.replace(found, max_temperature=1.0)  # the Messages API's range is 0-1
            if len(self._limits) < 4096:
                self._limits[key] = found
        return found

    def on_rollout_events(self, events: list[RolloutEvent]) -> None:
        for event in events:
            self.events.append(event)
            self.recorder.submit(
                EventRecord(
                    at=event.at, kind=event.kind, from_phase=event.from_, to_phase=event.to,
                    reason=event.reason, evidence=event.evidence, actor=event.actor,
                )
            )
            log.warning("rollout %s: %s -> %s (%s)", event.kind, event.from_, event.to, event.reason)
        # Persisted so other replicas and restarts see the same phase and rollback.
        task = asyncio.get_running_loop().create_task(save_state(self.state_store, self.rollout.state))
        task.add_done_callback(_log_save_failure)

    # ---- the conservative monitor (guards/conservative.py) ----------------------------

    async def _load_conservative(self) -> None:
        """A rollback survives a restart: the monitor's state is a blob in the state store, like the rollout's."""
        try:
            raw = await self.state_store.get(CONSERVATIVE_KEY)
        except StoreUnavailable:
            log.warning("state store unreachable at start-up; the conservative monitor starts empty")
            return
        if raw is None:
            return
        try:
            self.conservative.state = msgspec.json.decode(raw, type=MonitorState)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:  # an older layout: start over rather than fail start-up
            log.warning("stored conservative-monitor state ignored: %s", exc)

    def on_conservative_outcome(self, decision: Any, outcome: Any) -> None:
        """Completion listener after the decider's: optimised vs holdout per task type, events recorded, counted, alerted."""
        # Promotion's optimised-vs-holdout comparison. A task type the monitor rolled back has no optimised
        # traffic left; its holdout rewards stay out too, so both streams keep the same task mix.
        if not self.conservative.is_rolled_back(decision.context.task_type):
            self.rollout.observe_reward(decision.mode, outcome.reward)
        events = self.conservative.on_outcome(decision, outcome, time.time())
        if events:
            self.on_conservative_events(events)

    def on_conservative_events(self, events: list[MonitorEvent]) -> None:
        for event in events:
            task = self.metrics.task_label(event.task_type)
            self.recorder.submit(
                EventRecord(
                    at=event.at, kind=event.kind, from_phase=self.rollout.state.phase, to_phase="rollback" if event.kind == "rollback" else None,
                    reason=event.reason, evidence={**event.evidence, "task_type": event.task_type}, actor="conservative",
                )
            )
            if event.kind == "rollback":
                self.metrics.child(self.metrics.task_rollbacks, task).inc()
            else:
                self.metrics.child(self.metrics.task_changes, task).inc()
            log.warning("conservative monitor %s for task type %r: %s", event.kind, event.task_type, event.reason)
            if self.alerts is not None:
                name = "ThermostatTaskRollback" if event.kind == "rollback" else "ThermostatBaselineChanged"
                self.alerts.enqueue(Alert(
                    name=name, severity="critical" if event.kind == "rollback" else "warning", status="firing", at=event.at,
                    summary=f"task type {event.task_type}: {event.reason}", labels={"task_type": task, "actor": "conservative"},
                ))
        # One save in flight at a time is enough: the blob is the whole state, the last write wins.
        if self._conservative_save is None or self._conservative_save.done():
            self._conservative_save = asyncio.get_running_loop().create_task(
                self.state_store.set(CONSERVATIVE_KEY, msgspec.json.encode(self.conservative.state))
            )
            self._conservative_save.add_done_callback(_log_save_failure)

    # ---- signals after the outcome: judge, regeneration (issue 14) ----------------------

    def on_answer(self, decision: Decision, outcome: Outcome, answer: str, body: Any, key: str) -> None:
        """Last completion listener for chat requests: queue the judge sample, look for a regeneration.

        Never waits: the judge only samples and enqueues; the regeneration lookup (a Redis
        round trip with several replicas) runs as a background task.
        """
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            return
        if self.judge is not None:
            self.judge.on_complete(decision, outcome, answer, messages)
        # Without a client key, identical messages from different clients would look like retries.
        if key and 200 <= outcome.status < 300 and outcome.error_class is None:
            task = asyncio.get_running_loop().create_task(self._regenerated(messages, key, decision))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _regenerated(self, messages: list[Any], key: str, decision: Decision) -> None:
        try:
            signal = await regeneration_signal(
                self.regeneration, messages, key, decision.request_id, decision.context.task_type,
                self.config.feedback.regenerated_quality, salt=self.regeneration_salt,
            )
            if signal is not None:
                self.metrics.child(self.metrics.regenerations, self.metrics.task_label(decision.context.task_type)).inc()
                await self.deliver(signal)
        except Exception:
            log.exception("regeneration check for %s failed", decision.request_id)

    async def deliver(self, signal: Signal) -> str:
        """A judge score or implicit mark for an earlier decision (proxy.decision.feedback.deliver_signal)."""
        return await deliver_signal(self, self.feedback, self.signal_book, signal)

    async def _deliver_judged(self, signal: Signal) -> str:
        return await self.deliver(signal)

    async def _charge_judge(self, task_type: str, tokens: int) -> None:
        if not await self.budget.charge(task_type, tokens, time.time()):
            log.warning("judge tokens (%d) could not be counted against the budget", tokens)

    def _judge_alert(self, name: str, summary: str) -> None:
        log.warning("judge %s: %s", name, summary)
        if self.alerts is not None:
            firing = name != "judge_recovered"
            self.alerts.enqueue(Alert(name="ThermostatJudgeFailing", severity="warning", status="firing" if firing else "resolved",
                                      at=time.time(), summary=summary))

    async def validated(self, decision: Decision, outcome: Outcome, summary: Any, body: Any) -> Outcome:
        """The automatic quality once a `json_schema` response format or the tools' `parameters` are checked.

        A violation caps the automatic score (`[policy.quality] schema_invalid_score`) and the
        reward follows; the reason is logged and counted per task type. Nothing asked, nothing done.
        """
        if not isinstance(body, dict) or outcome.quality is None or outcome.feedback:
            return outcome
        response_format, tools = body.get("response_format"), body.get("tools")
        if response_format is None and not tools:
            return outcome
        violation = await validate_answer(self.validators, summary.content, response_format, summary.tool_calls if tools else (), tools)
        task = self.metrics.task_label(decision.context.task_type)
        self.signal_book.validated(task, violation is not None)
        if violation is None:
            return outcome
        self.metrics.child(self.metrics.validation_failures, task).inc()
        log.info("answer %s breaks its schema: %s", decision.request_id, violation[:200])
        quality = validated_quality(outcome.quality, violation, self.config.policy.quality)
        if quality == outcome.quality:
            return outcome
        return msgspec.structs.replace(outcome, quality=quality, reward=self.bandit.reward_for(decision, outcome, quality))
