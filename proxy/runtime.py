"""The composition root: everything one Thermostat process holds, built once from a validated Config.

Consumers never receive this object: the edge gets a frozen `EdgeServices`, the control
API a frozen `ControlDeps` (`control_deps`), the feedback path `FeedbackServices`, the
live metrics `LiveSources` and the alert manager its three sources, each typed and narrow.
Nothing here runs on import, and nothing here does I/O until `start()` (the Litestar lifespan).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from guards.budget import BudgetGuard
from guards.conservative import ConservativeMonitor, ConservativeSettings
from guards.lease import LeaseBook
from guards.rollout import RolloutController, RolloutEvent, load_state, save_state
from guards.slo import SloMonitor
from guards.state import InProcessStore, StateStore, StoreUnavailable
from guards.trust_region import ModelLimits
from policies.base import Adaptive
from policies.context import build_context
from policies.records import RequestContext
from policies.registry import make_policy
from policies.reward import reward_bounds
from policies.signals import Signal
from policies.validators import SchemaValidators
from proxy.common import load_table, stop_within
from proxy.config import Config, ModelSettings
from proxy.decision import (
    ArmSettings,
    ArmSpace,
    BanditDecider,
    ConservativeListener,
    Decider,
    DeciderSettings,
    DecisionGuards,
    DecisionRegistry,
    FeedbackBook,
    FeedbackServices,
    JudgeTrust,
    LeaseRefiller,
    MemoryRegenerationBook,
    ModelEvidenceKeeper,
    OutcomeBatch,
    PriceBook,
    RedisRegenerationBook,
    RegenerationBook,
    SignalDelivery,
    apply_pending_feedback,
    declared_stand_ins,
    model_limits,
)
from proxy.edge import CHAT, EdgeServices, HandOverAnswer, Listener, LogOutcome, OnOutcome, ReadWatch, RecordMetrics, RecordSpan, Transport, UpstreamPool
from proxy.learning import (
    AnswerListener,
    AnswerValidator,
    BaselineRequest,
    Judge,
    JudgeCharge,
    JudgeMetrics,
    PolicyEpochs,
    RolloutTicker,
    SharedState,
    SignalSync,
    SyncedQualitySignals,
    SyncedSignalBook,
    TableRefresher,
    named_upstream_transport,
    upstream_transport,
)
from proxy.observability import AlertManager, BoundedLabel, FoldedBuckets, LiveSources, Metrics, NullTracer, Tracer, make_tracer, watch_loop_lag
from proxy.store import EventRecord, Journal, LocalState, Recorder, RedisStore, RetentionPruner, make_log_store

log = logging.getLogger("thermostat")

STOP_STEP_S = 15.0  # the longest any one part may take to stop (see `Runtime.stop`); the recorder's own writes are bounded below it
VERSION = "0.1.0"  # the service.version of exported spans (pyproject's version)


def _log_save_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # The shared-state layer replays failed blob writes once the store is back.
        log.warning("saving the rollout state failed: %s", task.exception())


def outcome_listeners(
    *,
    decider: Decider,
    conservative: ConservativeListener,
    registry: DecisionRegistry,
    feedback: FeedbackServices,
    metrics: Metrics,
    recorder: Recorder,
    answers: AnswerListener,
    tracer: Tracer | NullTracer,
    capture_prompts: bool,
) -> tuple[Listener, ...]:
    """What the edge calls, in this order, once a decided request's Outcome is built (and its answer checked).

    The order matters: the decider learns first (budget settle, SLO, policy update, rollout
    tick), so the conservative monitor and the registry see the same outcome the policy did;
    feedback that arrived while the answer streamed is applied only once the registry holds
    the outcome; the log row and the judge come last, because nothing waits for them.
    docs/architecture.md lists the same names in the same order (tests/edge/test_pipeline.py).
    """
    return (
        OnOutcome("decider.observe", decider.observe),
        OnOutcome("conservative.on_outcome", conservative.on_outcome),
        OnOutcome("registry.complete", registry.complete),
        OnOutcome("apply_pending_feedback", functools.partial(apply_pending_feedback, feedback)),
        RecordMetrics(metrics),
        LogOutcome(recorder),
        HandOverAnswer(answers),
        RecordSpan(tracer, capture_prompts),
    )


class Runtime:
    """Every part of one Thermostat process, built once from `Config` by the `_build_*` steps below, in order.

    Each step reads only what the earlier ones made; the edge's listeners are assembled by
    `outcome_listeners` (the one place their order is declared).
    """

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
        self._build_storage(config, store, spool_dir, transport)
        self._build_labels(config)
        self._build_decider(config, decider)
        self._build_feedback(config)
        self._build_judge(config)
        self._build_edge(config)
        self._build_loops(config)

    def _build_storage(self, config: Config, store: StateStore | None, spool_dir: Path | None, transport: Transport | None) -> None:
        """Metrics, tracer, upstreams, the decision registry, the state store and the decision log with its recorder."""
        self.metrics = Metrics()
        # One span per proxied request (OTLP/HTTP); a NullTracer costs nothing when [telemetry] is off.
        self.tracer: Tracer | NullTracer = make_tracer(config.telemetry, version=VERSION, registry=self.metrics.registry)
        self.pool = UpstreamPool.from_settings(config.upstreams, transport)
        self.registry = DecisionRegistry()
        st = config.storage
        self.state_store: StateStore = store or (
            RedisStore(st.redis_url, prefix=st.redis_key_prefix, timeout_s=st.redis_timeout_s) if st.redis_url else InProcessStore()
        )
        self.events: deque[RolloutEvent] = deque(maxlen=500)
        # SQLite under data_dir when no database_url, else PostgreSQL behind a local spool.
        self.sink = make_log_store(config, spool_dir)
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
        self.pruner = RetentionPruner(self.sink, st.retention_days)
        self._lag_watch: asyncio.Task[None] | None = None

    def _build_labels(self, config: Config) -> None:
        """The caps on client-controlled keys, and the context builder that applies them."""
        srv = config.server
        self.build_context = self._bounded_context
        # Everything keyed by a client-controlled value is capped: past the cap a new task type
        # or model shares the bucket "other" (policy keys, costs, baselines, metrics, logs).
        self.task_types = BoundedLabel(srv.max_task_types, on_fold=lambda value: self._folded("task_type", value))
        for name in (*config.baseline, *config.caws.per_task_limits):
            # configured task types keep their own baseline and budget whatever arrives first
            self.task_types.seen.add(name.strip().lower())
        self._models: dict[str, BoundedLabel] = {}
        self._fold_warned: set[str] = set()
        self._limits: dict[tuple[str, str], ModelLimits] = {}
        self._stand_ins: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}

    def _build_decider(self, config: Config, decider: Decider | None) -> None:
        """The policy and the guards around it (SLO, budget and leases, conservative monitor), prices, and the decider."""
        self.policy = make_policy(
            config.optimization.policy, thompson=config.policy.thompson, linucb=config.policy.linucb,
            half_life_s=config.policy.half_life_s or math.inf,
        )
        if isinstance(self.policy, Adaptive):
            self.policy.advance(self.policy.discount.epoch_at(time.time()))
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
        # Each model's price, looked up once (overrides over the genai-prices table); the table is loaded in start().
        self.prices = PriceBook(config.upstreams, self._model_settings)
        self.conservative = ConservativeMonitor(ConservativeSettings.from_slo(config.slo, max_tasks=config.server.max_task_types))
        # Counted per task type; persisted and shared by `self.signal_sync` (proxy/learning/signal_sync.py).
        self.quality_signals = SyncedQualitySignals(max_task_types=config.server.max_task_types)
        self.bandit: BanditDecider = BanditDecider(
            policy=self.policy,
            arms=ArmSpace(
                ArmSettings.from_config(config), baseline_for=config.baseline_for, limits_for=self.limits_for, signals=self.quality_signals,
                stand_ins_for=self.stand_ins_for,
            ),
            guards=DecisionGuards(budget=self.budget, slo=self.slo, conservative=self.conservative, prices=self.prices),
            rollout=self._make_rollout(None),
            settings=DeciderSettings.from_config(config),
            rng=np.random.default_rng(config.optimization.seed),
            on_events=self.on_rollout_events,
        )
        # What a finished request teaches the policy and the length evidence is learnt per batch (proxy/decision/batch.py).
        self.bandit.learn_in_batches(OutcomeBatch())
        self.decider: Decider = decider or self.bandit

    def _build_feedback(self, config: Config) -> None:
        """The way back in for later signals: feedback book, regeneration book, replica sharing, alerts, judge trust."""
        srv, fb = config.server, config.feedback
        self.validators = SchemaValidators()  # compiled schemas cached by hash
        # Signals that arrive after the outcome (explicit, judge, implicit) re-enter through proxy/decision/feedback.py.
        self.feedback = FeedbackBook()
        self.signal_book = SyncedSignalBook(max_task_types=srv.max_task_types)
        memory_book = MemoryRegenerationBook(fb.regenerate_window_s, fb.max_fingerprints)
        self.regeneration: RegenerationBook = (
            RedisRegenerationBook(self.state_store, fb.regenerate_window_s, memory_book) if isinstance(self.state_store, RedisStore) else memory_book
        )
        # Replicas must agree on the digest to match each other's requests; alone, a process-random key
        # means a digest cannot be confirmed against guessed prompts.
        self.regeneration_salt = config.storage.redis_key_prefix.encode() if isinstance(self.state_store, RedisStore) else secrets.token_bytes(32)
        # Webhooks for the conditions of deploy/prometheus/alerts.yml; also carries the judge's and the monitor's alerts.
        self.alerts = AlertManager(config.alerts.webhook_urls, slo=self.slo, budget=self.budget, rollout=self.bandit)
        # Several replicas: posterior, rollout state and decisions shared through Redis (proxy/learning/sync.py).
        self.shared: SharedState | None = (
            SharedState(self.state_store, storage=config.storage, policy=self.policy, costs=self.bandit.costs, rollout=self.bandit,
                        registry=self.registry)
            if isinstance(self.state_store, RedisStore)
            else None
        )
        if self.shared is not None:
            self.registry = self.shared.registry  # also writes decisions to Redis for feedback posted elsewhere
        self.conservative_listener = ConservativeListener(
            self.conservative, rollout=self.bandit, recorder=self.recorder, metrics=self.metrics, alerts=self.alerts,
            state_store=self.state_store, policy=self.policy, batch=OutcomeBatch(),  # folded per batch of finished requests
        )
        # Per task type, whether the judge's scores may teach (length bias, disagreement); persisted.
        self.judge_trust = JudgeTrust(
            check_length=config.judge.length_bias_check, margin=config.judge.length_bias_margin, max_task_types=srv.max_task_types,
            recorder=self.recorder, alerts=self.alerts, metrics=self.metrics, state_store=self.state_store,
        )
        self.bandit.judge_muted = self.judge_trust.muted
        # The model stage's evidence (stand-in vs requested model, per task type); persisted like the monitor's state.
        self.model_evidence = ModelEvidenceKeeper(self.bandit.models, self.state_store)
        # Later signals (explicit, judge, implicit) re-enter through the decision room with exactly these;
        # judge scores, pairwise verdicts and explicit feedback also reach the conservative monitor and promotion.
        self.feedback_services = FeedbackServices(
            registry=self.registry, recorder=self.recorder, log=self.sink, bandit=self.bandit, book=self.feedback,
            signals=self.signal_book, judge=config.judge, shared=self.shared, learns=self.decider is self.bandit,
            trust=self.judge_trust, guards=self.conservative_listener,
        )
        # The one door for judge scores and regeneration marks into the decision room.
        self.signal_delivery = SignalDelivery(self.feedback_services)

    def _build_judge(self, config: Config) -> None:
        """The judge (when `[judge] enabled`) and the two listeners that read an answer: schema check, judge + regeneration."""
        seed = config.optimization.seed
        self.judge_charge = JudgeCharge(self.budget, self.prices, self.metrics, route=self._upstream_of)
        self.judge: Judge | None = (
            Judge(
                config.judge, transport=upstream_transport(self.pool, config.judge.model),
                deliver=self.signal_delivery,  # judge score -> proxy.decision.SignalDelivery -> reward_for -> correct()
                charge=self.judge_charge, rng=np.random.default_rng(None if seed is None else seed + 1),
                metrics=JudgeMetrics(self.metrics.registry), alert=self.alerts.judge_alert,
                baseline_request=BaselineRequest(self.bandit, CHAT.patch), send_baseline=named_upstream_transport(self.pool),
                holdout_sample_rate=config.judge.holdout_rate(config.optimization.holdout_fraction),
            )
            if config.judge.enabled
            else None
        )
        self.answer_validator = AnswerValidator(self.validators, config.policy.quality, self.signal_book, self.metrics, self.bandit)
        self.answers = AnswerListener(
            self.judge, self.regeneration, salt=self.regeneration_salt, regenerated_quality=config.feedback.regenerated_quality,
            feedback=self.feedback_services, metrics=self.metrics,
        )

    def _build_edge(self, config: Config) -> None:
        """What the `/v1/*` edge receives, with its listeners in their one order."""
        self.read_watch = ReadWatch()
        self.listeners = outcome_listeners(
            decider=self.decider, conservative=self.conservative_listener, registry=self.registry, feedback=self.feedback_services,
            metrics=self.metrics, recorder=self.recorder, answers=self.answers, tracer=self.tracer,
            capture_prompts=config.telemetry.capture_prompts,
        )
        self.edge = EdgeServices(
            config=config, metrics=self.metrics, tracer=self.tracer, pool=self.pool, build_context=self.build_context,
            decider=self.decider, scorer=self.bandit, registry=self.registry, recorder=self.recorder, read_watch=self.read_watch,
            answer_check=self.answer_validator, listeners=self.listeners, prices=self.prices,
        )

    def _build_loops(self, config: Config) -> None:
        """The background loops that are not built with their component: ticker, live gauges, local state, signal sync."""
        st = config.storage
        self.folded_buckets = FoldedBuckets(self.policy, self.metrics)
        self.ticker = RolloutTicker(self.bandit, self.sink, each_tick=(self.folded_buckets, PolicyEpochs(self.policy)))
        self.live = LiveSources(slo=self.slo, rollout=self.bandit, budget=self.budget, log_store=self.sink, recorder=self.recorder)
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
        # Quality-signal counts and judge/explicit pairs: in the journaled local store, or shared through Redis.
        self.signal_sync: SignalSync | None = None
        if isinstance(self.state_store, RedisStore) or self.local_state is not None:
            self.signal_sync = SignalSync(
                self.state_store, self.quality_signals, self.signal_book,
                interval_s=st.sync_interval_s if self.local_state is None else st.journal_fsync_interval_s, ttl_s=st.state_ttl_s,
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
        await asyncio.to_thread(load_table)  # ~0.6 s once per process: never on the request path
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
        await self.conservative_listener.load()
        await self.judge_trust.load()
        await self.model_evidence.load()
        if self.signal_sync is not None:
            await self.signal_sync.start()
        if self.shared is not None:
            await self.shared.start()
        await self.recorder.start()
        self._lag_watch = asyncio.create_task(watch_loop_lag(self.metrics.loop_lag), name="thermostat-loop-lag")
        self.read_watch.start()
        if self.lease_refiller is not None:
            self.lease_refiller.start()
        self.ticker.start()
        self.pruner.start()
        if self.refresher is not None:
            self.refresher.start()
        if self.judge is not None:
            self.judge.start()
        await self.tracer.start()
        await self.alerts.start()
        log.info(
            "thermostat started: %d upstream(s), policy %s, phase %s, decision log %s",
            len(self.pool.upstreams), self.policy.name, self.rollout.state.phase, self.sink.name,
        )

    async def stop(self) -> None:
        """Stop every part in order, each bounded by `STOP_STEP_S`: whatever hangs, the decision
        log is flushed, the journal closed and its lock released (`proxy.common.stop_within`)."""
        self.drain_learning()  # what the last requests taught, before anything that stores it stops
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("alerts", self.alerts.stop), ("rollout ticker", self.ticker.stop), ("pruner", self.pruner.stop),
        ]
        if self._lag_watch is not None:
            self._lag_watch.cancel()
        if self.judge is not None:
            steps.append(("judge", self.judge.stop))
        steps.append(("tracer", self.tracer.stop))
        steps.append(("answer listener", self._stop_answers))
        if self.refresher is not None:
            steps.append(("table refresher", self.refresher.stop))
        if self.lease_refiller is not None:
            steps.append(("budget lease refiller", self.lease_refiller.stop))
        if self.signal_sync is not None:
            steps.append(("quality-signal sync", self.signal_sync.stop))
        if self.shared is not None:
            steps.append(("shared state (redis)", self.shared.stop))
        steps.append(("learning batches", self._drain_learning))  # requests that finished during the stops above
        steps.append(("decision log recorder", self.recorder.stop))
        if self.local_state is not None:
            steps.append(("local state", self.local_state.stop))
        steps.append(("read watch", self.read_watch.stop))
        steps.append(("upstream pool", self.pool.aclose))
        for name, stop in steps:
            await stop_within(name, stop, STOP_STEP_S, log)

    def drain_learning(self) -> None:
        """Run the batch steps (policy and length evidence, conservative monitor) on every finished request queued now."""
        self.bandit.drain_learning()
        if self.conservative_listener.batch is not None:
            self.conservative_listener.batch.drain()

    async def _drain_learning(self) -> None:
        self.drain_learning()

    async def _stop_answers(self) -> None:
        self.answers.stop()
        await self.judge_trust.flush()  # retractions and the last save of the mutes
        await self.model_evidence.flush()

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

    def _upstream_of(self, model: str) -> str | None:
        up = self.pool.route(model)
        return up.name if up is not None else None

    def _model_settings(self, upstream: str, model: str) -> ModelSettings | None:
        up = next((u for u in self.pool.upstreams if u.name == upstream), None)
        return up.model_settings(model) if up is not None else None

    def limits_for(self, upstream: str, model: str) -> ModelLimits:
        key = (upstream, model)
        found = self._limits.get(key)
        if found is None:
            up = next((u for u in self.pool.upstreams if u.name == upstream), None)
            found = model_limits(up.model_settings(model), up.format) if up is not None else ModelLimits()
            if len(self._limits) < 4096:
                self._limits[key] = found
        return found

    def stand_ins_for(self, upstream: str, model: str) -> tuple[tuple[str, str], ...]:
        """The declared stand-ins of `model` on `upstream`, each with its upstream (`declared_stand_ins`, cached)."""
        key = (upstream, model)
        found = self._stand_ins.get(key)
        if found is None:
            found = declared_stand_ins(self.config.upstreams, upstream, model)
            if len(self._stand_ins) < 4096:
                self._stand_ins[key] = found
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

    async def deliver(self, signal: Signal) -> str:
        """A judge score or implicit mark for an earlier decision, through the decision room's `SignalDelivery`."""
        return await self.signal_delivery(signal)
