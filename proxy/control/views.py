"""Shared pieces of the controllers: query bounds, the audit write, and records -> response bodies.

Kept apart from the controllers so that two resources showing the same thing (the
rollback state on /status, /rollback-status and after /rollback) show it identically.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Annotated

import msgspec
from litestar import Request
from litestar.params import Parameter

from guards.rollout import RolloutEvent
from guards.waivers import Waiver
from policies.records import Arm, Params, RequestContext
from proxy.common import ProxyError
from proxy.control import reports as cdata
from proxy.control.deps import ControlDeps
from proxy.control.schemas import (
    BudgetLineOut,
    CawsStatus,
    ContextIn,
    DecisionOut,
    EventOut,
    JudgeSpendOut,
    OptimizationStatus,
    ParamsOut,
    RollbackStatus,
    RolloutEventOut,
    SloEntry,
    SloStatus,
    StandInEvidence,
    TaskGuarantee,
    WaiverOut,
)
from proxy.store import AuditRecord, DecisionRow, EventRecord

log = logging.getLogger("thermostat.control")

PREFIX = "/api/optimization"
CONSERVATIVE_ACTOR = "conservative"  # the actor of the per-task monitor's events (proxy.runtime)
DAY = 86_400.0

WindowS = Annotated[float, Parameter(ge=1.0, le=366 * DAY, description="Length of the window ending now, in seconds")]
MaxRows = Annotated[int, Parameter(ge=1, le=200_000, description="Newest decisions read from the log")]
Bins = Annotated[int, Parameter(ge=1, le=500, description="Time bins of a series")]
Limit = Annotated[int, Parameter(ge=1, le=1000)]
Offset = Annotated[int, Parameter(ge=0, le=10_000_000, schema_extra={"minimum": 0})]  # Litestar drops a bound of 0
# Events are paged by reading offset + limit newest rows: the offset's bound bounds that read.
EventLimit = Annotated[int, Parameter(ge=1, le=500)]
EventOffset = Annotated[int, Parameter(ge=0, le=10_000, schema_extra={"minimum": 0})]
# Query values the log is filtered by. A time must be a date the stores can hold (Python's
# datetime ends in 9999; -1e308 or 1e20 used to reach PostgreSQL as an overflow, a 500), and a
# text filter one PostgreSQL text can hold (no NUL); NaN fails the bounds too.
_LAST_UNIX_SECOND = 253_402_300_799.0  # 9999-12-31T23:59:59Z
# Litestar documents no bounds of an optional parameter: `schema_extra` puts them in the OpenAPI document.
UnixTime = Annotated[float | None, Parameter(ge=0.0, le=_LAST_UNIX_SECOND, description="Unix seconds (0 to the end of year 9999)",
                                             schema_extra={"minimum": 0, "maximum": _LAST_UNIX_SECOND})]
TextFilter = Annotated[str | None, Parameter(max_length=256, pattern=r"^[^\x00]*$", description="At most 256 characters, no NUL",
                                             schema_extra={"maxLength": 256, "pattern": r"^[^\x00]*$"})]



def window(window_s: float) -> tuple[float, float, float]:
    now = time.time()
    return now, now - window_s, now + 1e-3


def actor_of(request: Request) -> str:
    """Who is calling: set by the admin guard (token id, or "loopback") before any handler runs."""
    return str(request.scope.get("state", {}).get("thermostat_actor", "unknown"))


async def write_audit(deps: ControlDeps, actor: str, action: str, target: str, before: object, after: object) -> bool:
    """Append one audit entry; False (and logged) when the store refused it.

    The action already happened by then, so a lost audit row must be visible rather than fail the call.
    """
    record = AuditRecord(at=time.time(), actor=actor, action=action, target=target,
                         before=msgspec.to_builtins(before), after=msgspec.to_builtins(after))
    try:
        await deps.log_store.append_audit(record)
        return True
    except Exception:
        log.exception("writing the audit entry for %s failed", action)
        return False


def rollback_status(deps: ControlDeps, now: float) -> RollbackStatus:
    eff = deps.rollout.effective(now)
    rb = deps.rollout.state.rollback
    if not rb.active or eff.rollback is None:  # an elapsed SLO cooldown already counts as resumed
        return RollbackStatus(active=False, trigger=None, reason=None, since=None, resumes_at=None)
    return RollbackStatus(active=True, trigger=rb.trigger, reason=rb.reason, since=rb.since, resumes_at=rb.resumes_at, resume_phase=rb.resume_phase)


def event_out(e: RolloutEvent) -> RolloutEventOut:
    return RolloutEventOut(at=e.at, kind=e.kind, from_phase=e.from_, to_phase=e.to, reason=e.reason, actor=e.actor,
                           evidence=msgspec.to_builtins(e.evidence))


def stored_event_out(e: EventRecord) -> EventOut:
    """A stored event; the conservative monitor's are per task type (their evidence names it), the rollout's global."""
    task = e.evidence.get("task_type") if isinstance(e.evidence, dict) else None
    scoped = e.actor == CONSERVATIVE_ACTOR or task is not None
    return EventOut(id=e.id, at=e.at, kind=e.kind, scope="task" if scoped else "global", task_type=str(task) if task is not None else None,
                    from_phase=e.from_phase, to_phase=e.to_phase, reason=e.reason, actor=e.actor, evidence=dict(e.evidence or {}))


def recent_events(deps: ControlDeps, limit: int = 50) -> list[RolloutEventOut]:
    return [event_out(e) for e in reversed(deps.rollout.state.events[-limit:])]


def status_of(deps: ControlDeps, now: float) -> OptimizationStatus:
    ro = deps.rollout
    eff = ro.effective(now)
    policy = deps.decider.policy
    share = eff.fraction if eff.optimizing_allowed else 0.0
    holdout = deps.config.optimization.holdout_fraction
    return OptimizationStatus(
        enabled=ro.enabled,
        mode=deps.config.optimization.mode,
        phase=ro.state.phase,
        effective_phase=eff.phase,
        traffic_percentage=share,
        phase_traffic_percentage=ro.fraction(ro.state.phase),
        policy=policy.name,
        policy_version=policy.version,
        rollback=rollback_status(deps, now),
        uptime_s=round(now - deps.started_at, 3),
        decisions_in_registry=len(deps.registry),
        judge_muted={task: m.reason for task, m in trust.state.mutes.items()} if (trust := deps.learning.trust) is not None else {},
        holdout_fraction=holdout,
        optimised_share=share * (1.0 - holdout),
    )


def slo_status(deps: ControlDeps, now: float) -> SloStatus:
    report = deps.slo.report(now)
    slos = [
        SloEntry(name=c.name, traffic=traffic.traffic, threshold=c.threshold, value=cdata.finite(c.value), compliant=c.compliant,
                 samples=c.samples, judged=c.judged)
        for traffic in (report.optimized, report.baseline)
        for c in traffic.checks
    ]
    monitor = deps.decider.conservative
    tasks = []
    if monitor is not None:
        for v in monitor.verdicts():
            head = next(k for k in v.signals if k.kind == v.quality_kind)
            summary = cdata.monitor_summary(v)
            tasks.append(TaskGuarantee(**msgspec.structs.asdict(v), quality_level=head.level, summary=summary))
    stand_ins = msgspec.convert(deps.decider.models.report(), list[StandInEvidence])
    return SloStatus(compliant=report.compliant, window_s=report.window_s, min_samples=report.min_samples, breached=list(report.breached),
                     slos=slos, tasks=tasks, stand_ins=stand_ins)


async def caws_status(deps: ControlDeps, now: float) -> CawsStatus:
    s = deps.config.caws
    st = await deps.budget.status(now)
    return CawsStatus(
        enabled=s.enabled, window_s=s.window_s, window_start=float(st.window_start), resets_at=float(st.resets_at),
        budget_limit=st.limit, effective_limit=st.effective_limit, used=st.used, reserved=st.reserved, overruns=st.overruns,
        fill=cdata.finite(st.fill), warning=st.warning, exhausted=st.exhausted, waiver_threshold=s.waiver_threshold,
        warning_threshold=s.warning_threshold, active_waivers=list(st.active_waivers),
        tasks=[BudgetLineOut(task_type=k, limit=v.limit, effective_limit=v.effective_limit, used=v.used, reserved=v.reserved,
                             overruns=v.overruns, fill=cdata.finite(v.fill)) for k, v in sorted(st.tasks.items())],
        unit="tokens" if s.unit == "tokens" else "micro_usd",
    )


JUDGE_SPEND_NOTE = ("this process since it started, not the report's window: judge calls are not decisions in the log; "
                    "thermostat_cost_usd_total{task_type=\"_judge\", traffic=\"judge\"} sums them over replicas")


def judge_spend(deps: ControlDeps) -> JudgeSpendOut | None:
    j = deps.judge_spend
    if j is None:
        return None
    return JudgeSpendOut(since=deps.started_at, calls=j.calls, cost_usd=j.cost_usd, unpriced_calls=j.unpriced, note=JUDGE_SPEND_NOTE)


def waiver_out(w: Waiver, now: float) -> WaiverOut:
    return WaiverOut(id=w.id, task_type=w.task_type, extra_tokens=w.extra_tokens, reason=w.reason, approver=w.approver,
                     created_at=w.created_at, expires_at=w.expires_at, revoked_at=w.revoked_at, revoked_by=w.revoked_by, status=w.status(now))


def params_out(p: Params | Arm) -> ParamsOut:
    return ParamsOut(temperature=p.temperature, max_tokens=p.max_tokens, model=p.model)


def decision_out(r: DecisionRow) -> DecisionOut:
    return DecisionOut(
        request_id=r.request_id, timestamp=r.timestamp, task_type=r.task_type, model=r.model_name, upstream=r.upstream, mode=r.mode,
        policy=r.policy, policy_version=r.policy_version, sent=params_out(r.chosen_params), baseline=params_out(r.baseline_params),
        policy_choice=params_out(r.policy_params) if r.policy_params is not None else None, propensity=r.propensity,
        policy_propensity=math.exp(r.policy_log_propensity) if r.policy_log_propensity is not None else None,
        guard_notes=list(r.guard_notes), status=r.status, error_class=r.error_class, latency_s=r.latency_s, ttft_s=r.ttft_s,
        prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens, finish_reason=r.finish_reason,
        quality=r.effective_quality, reward=cdata.finite(r.effective_reward), automatic_quality=r.quality, feedback_quality=r.feedback_quality,
        validator_reason=r.validator_reason, cost_usd=cdata.finite(r.cost_usd),
    )


def body_from_context(c: ContextIn) -> dict[str, object]:
    """A request body with the context's fields (what `build_context` reads)."""
    body: dict[str, object] = {"model": c.model}
    if c.endpoint == "completions":
        body["prompt"] = c.prompt if c.prompt is not None else ""
    else:
        body["messages"] = c.messages if c.messages is not None else [{"role": "user", "content": c.prompt if isinstance(c.prompt, str) else "hello"}]
    if c.temperature is not None:
        body["temperature"] = c.temperature
    if c.max_tokens is not None:
        body["max_tokens"] = c.max_tokens
    if c.json_mode:
        body["response_format"] = {"type": "json_object"}
    if c.has_tools:
        body["tools"] = [{"type": "function", "function": {"name": "tool", "parameters": {"type": "object"}}}]
    if c.stream:
        body["stream"] = True
    if c.user:
        body["user"] = c.user
    return body


def context_of(deps: ControlDeps, task_type: str, c: ContextIn) -> tuple[RequestContext, dict[str, object]]:
    """The request context the edge would build for this synthetic body (404 without an upstream for its model)."""
    body = body_from_context(c)
    upstream = deps.pool.route(c.model)
    if upstream is None:
        raise ProxyError(404, f"no upstream is configured for model '{c.model}'", "model_not_found", "not_found_error", "context.model")
    try:
        ctx = deps.build_context(body, task_type=task_type, endpoint=c.endpoint, upstream=upstream.name)
    except Exception as exc:  # build_context is total for valid bodies; anything else is the caller's input
        raise ProxyError(422, f"the context cannot be evaluated: {exc}", "invalid_context") from None
    if c.prompt_tokens is not None:
        ctx = msgspec.structs.replace(ctx, prompt_tokens_est=int(c.prompt_tokens))
    return ctx, body
