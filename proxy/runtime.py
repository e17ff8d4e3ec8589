"""Wiring: everything one Thermostat process holds, built from a validated Config.

The edge and the control API read from this object; nothing here runs on import,
and nothing here does I/O until `start()`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from guards.budget import BudgetGuard
from guards.rollout import RolloutController, RolloutEvent, load_state, save_state
from guards.slo import SloMonitor
from guards.state import InProcessStore, StateStore, StoreUnavailable
from guards.trust_region import ModelLimits
from policies.base import make_policy
from policies.context import build_context, context_features
from policies.quality import auto_quality
from policies.records import Decision, Outcome, RequestContext
from proxy.config import Config
from proxy.control_data import compute_ope_evidence
from proxy.decider import BanditDecider, Decider
from proxy.metrics import Metrics
from proxy.recorder import DecisionRegistry, Recorder
from proxy.shared import SharedState
from proxy.sse import ResponseSummary
from proxy.store import EventRecord, make_log_store
from proxy.store.redis_state import RedisStore
from proxy.upstream import UpstreamPool

log = logging.getLogger("thermostat")


def _log_save_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # The shared-state layer replays failed blob writes once the store is back.
        log.warning("saving the rollout state failed: %s", task.exception())


class Runtime:
    def __init__(
        self, config: Config, *, decider: Decider | None = None, store: StateStore | None = None, spool_dir: Path | None = None
    ) -> None:
        self.config = config
        self.started_at = time.time()
        self.metrics = Metrics()
        self.pool = UpstreamPool.from_settings(config.upstreams)
        self.registry = DecisionRegistry()
        redis = config.storage
        self.state_store: StateStore = store or (
            RedisStore(redis.redis_url, prefix=redis.redis_key_prefix, timeout_s=redis.redis_timeout_s) if redis.redis_url else InProcessStore()
        )
        self.events: deque[RolloutEvent] = deque(maxlen=500)
        # SQLite under data_dir when no database_url, else PostgreSQL behind a local spool.
        self.sink = make_log_store(config, spool_dir)
        st = config.storage
        self.recorder = Recorder(
            self.sink,
            queue_size=st.queue_size,
            batch_size=st.batch_size,
            flush_interval_s=st.flush_interval_s,
            on_drop=self.metrics.queue_dropped.inc,
            on_written=self.metrics.written.inc,
        )
        self.build_context = build_context
        self._limits: dict[tuple[str, str], ModelLimits] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.ope_interval_s = 60.0
        self.prune_interval_s = 3600.0
        self.control: Any = None  # set by the control API (proxy/control.py) when it is mounted
        self.alerts: Any = None

        self.policy = make_policy(config.optimization.policy, thompson=config.policy.thompson, linucb=config.policy.linucb)
        self.slo = SloMonitor(config.slo)
        self.rollout = self._make_rollout(None)
        self.budget = BudgetGuard(config.caws, self.state_store, require_caws=config.constraints.require_caws)
        self.bandit: BanditDecider = BanditDecider(
            policy=self.policy,
            budget=self.budget,
            rollout=self.rollout,
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
        )
        self.decider: Decider = decider or self.bandit
        # Several replicas: posterior, rollout state and decisions shared through Redis (proxy/shared.py).
        self.shared: SharedState | None = SharedState(self, self.state_store) if isinstance(self.state_store, RedisStore) else None
        if self.shared is not None:
            self.registry = self.shared.registry  # also writes decisions to Redis for feedback posted elsewhere

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
        )

    async def start(self) -> None:
        try:
            stored = await load_state(self.state_store)
        except StoreUnavailable:
            # Redis down at start-up: serve with the configured phase; SharedState
            # adopts the shared state as soon as Redis answers.
            log.warning("state store unreachable at start-up; starting from the configured rollout phase")
            stored = None
        if stored is not None:
            self.rollout = self._make_rollout(stored)
            self.bandit.rollout = self.rollout
        if self.shared is not None:
            await self.shared.start()
        await self.recorder.start()
        self._ticker = asyncio.create_task(self._tick_forever(), name="thermostat-rollout-tick")
        refresh = getattr(self.policy, "refresh_stale", None)
        if refresh is not None:
            self.policy.deferred_refresh = True  # type: ignore[attr-defined]
            self._refresher = asyncio.create_task(self._refresh_forever(refresh), name="thermostat-policy-refresh")
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
                    self.bandit.ope_evidence = await compute_ope_evidence(self)
                except Exception as exc:  # the store may be down; promotion just waits
                    log.warning("OPE evidence for promotion not computed: %s", exc)
            try:
                self.bandit.maybe_tick(now, force=True)
            except Exception:
                log.exception("rollout tick failed")

    async def _refresh_forever(self, refresh: Any) -> None:
        """Posterior tables are rebuilt here, at most every 50 ms, not inside a request.

        Measured (bench/README.md): rebuilding on the request path cost ~0.33 ms every
        8th decision of a bucket, 10 % of the CPU at 2,500 req/s and the p90.
        """
        while True:
            await asyncio.sleep(0.05)
            try:
                refresh()
            except Exception:
                log.exception("refreshing the policy's tables failed")

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
        for task in (self._ticker, self._refresher):
            if task is not None:
                task.cancel()
        if self.shared is not None:
            await self.shared.stop()
        await self.recorder.stop()
        await self.pool.aclose()

    @property
    def ready(self) -> bool:
        return self.recorder.ready and bool(self.pool.upstreams)

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
                )
                if ms is not None
                else ModelLimits()
            )
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

    def auto_quality(self, outcome: Outcome, summary: ResponseSummary, ctx: RequestContext) -> float | None:
        return auto_quality(
            status=outcome.status if outcome.error_class is None else 599,
            content=summary.content,
            finish_reason=summary.finish_reason,
            json_mode=ctx.json_mode,
            tool_arguments=summary.tool_arguments,
            settings=self.config.policy.quality,
        )

    def context_features(self, ctx: RequestContext) -> dict[str, object]:
        return context_features(ctx)

    def arm_label(self, decision: Decision) -> str:
        """Bounded label: the sent parameters as deltas from the baseline."""
        sent, base = decision.sent, decision.baseline
        if sent.temperature is None and sent.max_tokens is None:
            return "client"
        dt = (sent.temperature or 0.0) - (base.temperature or 0.0) if sent.temperature is not None else 0.0
        dm = (sent.max_tokens or 0) - (base.max_tokens or 0) if sent.max_tokens is not None else 0
        return f"t{dt:+.2f}/m{dm:+d}"
