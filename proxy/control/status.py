"""Read-only state of this process: readiness, status, SLO, rollback state, baselines, the decision log's health."""

from __future__ import annotations

import asyncio
import time

import msgspec
from litestar import Controller, Response, get
from litestar.openapi.datastructures import ResponseSpec

from proxy.control.deps import Deps
from proxy.control.schemas import (
    BaselineParam,
    BaselineParameters,
    DbStatus,
    HealthCheck,
    OptimizationStatus,
    Readiness,
    RollbackStatus,
    SloStatus,
)
from proxy.control.views import rollback_status, slo_status, status_of


class StatusController(Controller):
    path = "/"

    @get("/health", opt={"public": True}, summary="Readiness (no auth): upstreams, database, state store, writer queue",
         responses={503: ResponseSpec(data_container=Readiness, description="Not ready: the checks, at least one failing")})
    async def health(self, deps: Deps) -> Response[Readiness]:
        checks = [HealthCheck(name="upstreams", ok=bool(deps.pool.upstreams), detail=f"{len(deps.pool.upstreams)} configured")]
        st = deps.log_store.status()
        checks.append(HealthCheck(name="database", ok=bool(st.connected), detail=st.last_error or st.kind))
        try:
            await asyncio.wait_for(deps.state_store.get("thermostat:health"), 1.0)
            checks.append(HealthCheck(name="state_store", ok=True, detail=type(deps.state_store).__name__))
        except Exception as exc:
            checks.append(HealthCheck(name="state_store", ok=False, detail=f"{type(exc).__name__}"))
        rec = deps.recorder
        q = rec.queue
        full = q.maxsize > 0 and q.qsize() >= q.maxsize
        failing = f", last write failed: {rec.last_error}" if rec.last_error is not None else ""
        checks.append(HealthCheck(name="writer_queue", ok=bool(rec.ready) and not full and rec.last_error is None,
                                  detail=f"{q.qsize()}/{q.maxsize} queued, {rec.dropped} dropped{failing}"))
        ready = all(c.ok for c in checks)
        return Response(Readiness(ready=ready, checks=checks), status_code=200 if ready else 503)

    @get("/status", summary="Enabled, mode, phase, traffic, policy and version, rollback state", sync_to_thread=False)
    def status(self, deps: Deps) -> OptimizationStatus:
        return status_of(deps, time.time())

    @get("/slo-status", summary="SLO values and compliance for optimised and baseline traffic", sync_to_thread=False)
    def slo(self, deps: Deps) -> SloStatus:
        return slo_status(deps, time.time())

    @get("/rollback-status", summary="Whether everything is on baseline parameters now, and why", sync_to_thread=False)
    def rollback_status(self, deps: Deps) -> RollbackStatus:
        return rollback_status(deps, time.time())

    @get("/baseline-parameters", summary="Parameters sent when Thermostat does not optimise a request", sync_to_thread=False)
    def baseline_parameters(self, deps: Deps) -> BaselineParameters:
        cfg = deps.config
        params = [BaselineParam(task_type=k, temperature=v.temperature, max_tokens=v.max_tokens, source="config") for k, v in sorted(cfg.baseline.items())]
        if "default" not in cfg.baseline:
            d = cfg.baseline_for("default")
            params.append(BaselineParam(task_type="default", temperature=d.temperature, max_tokens=d.max_tokens, source="built-in"))
        return BaselineParameters(
            note="the client's own temperature / max_tokens win; these stand in for values the client did not send "
                 "(per task type, else 'default'; null = none, the knob stays omitted), for holdout, rolled-back and "
                 "optimised requests alike",
            parameters=params,
            constraints=msgspec.to_builtins(cfg.constraints),
        )

    @get("/db-status", summary="Decision log and writer status")
    async def db_status(self, deps: Deps) -> DbStatus:
        store = deps.log_store
        st = store.status()
        total = last_hour = None
        if st.connected:
            try:
                total = await store.count_decisions()
                last_hour = await store.count_decisions(since=time.time() - 3600)
            except Exception:  # the page reports the store's state; the counts are a bonus
                pass
        rec = deps.recorder
        return DbStatus(kind=st.kind, connected=st.connected, last_error=st.last_error, rows_written=st.rows_written,
                        spool_batches=st.spool_batches, spool_entries=st.spool_entries, dead_letter_batches=st.dead_letter_batches,
                        decisions_total=total, decisions_last_hour=last_hour, writer_queue_depth=rec.queue.qsize(),
                        writer_queue_capacity=rec.queue.maxsize, writer_dropped=rec.dropped, writer_written=rec.written,
                        writer_failures=rec.write_failures, state_store=type(deps.state_store).__name__)
