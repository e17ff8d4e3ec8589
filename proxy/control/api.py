"""The control API: `/api/optimization/*` (Litestar), its auth guard, audit and error shape.

`build_control(rt)` returns the router, the exception handlers and the start-up hooks
that `proxy.app.build_litestar` installs. Every response body is a msgspec struct from
`proxy.control.schemas`; every error is `{"error": {"message", "type", "code"}}`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import numpy as np
from litestar import Request, Response, Router, delete, get, post
from litestar._openapi.schema_generation import SchemaCreator  # private, but the plugin's own signature type
from litestar._openapi.schema_generation.plugins import StructSchemaPlugin  # not exported publicly (litestar 2.25)
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Schema
from litestar.params import FromPath, FromQuery, JSONBody, Parameter
from litestar.typing import FieldDefinition

from guards.rollout import RolloutEvent, assign
from guards.trust_region import enforce
from guards.waivers import Waiver
from policies import ope
from policies.context import context_bucket
from proxy.control import reports as cdata
from proxy.control.auth import AdminAuth, AuthError
from proxy.control.schemas import (
    ActionResult,
    ApiError,
    ApiErrorBody,
    ArmProbability,
    AuditOut,
    AuditPage,
    BaselineParam,
    BaselineParameters,
    BudgetLineOut,
    CawsStatus,
    ComplianceCheck,
    ComplianceStatus,
    ContextIn,
    ConvergenceReport,
    Dashboard,
    DbStatus,
    DecisionOut,
    DecisionPage,
    GuardVerdict,
    HealthCheck,
    MetricsReport,
    OpeOut,
    OptimizationStatus,
    ParameterEvolution,
    ParamsOut,
    PerformanceReport,
    PromotionCriterion,
    Readiness,
    Recommendation,
    RecommendIn,
    RecordOutcomeIn,
    RecordOutcomeResult,
    RollbackIn,
    RollbackStatus,
    RolloutEventOut,
    RolloutStatus,
    SecurityStatus,
    ShadowTestIn,
    ShadowTestResult,
    SloEntry,
    SloStatus,
    WaiverIn,
    WaiverList,
    WaiverOut,
)
from proxy.decision.decider import HOLDOUT_SALT, tuned_params, unoptimised_mode
from proxy.decision.feedback import DecisionNotFound, FeedbackBook, FeedbackConflict, record_outcome
from proxy.edge.errors import ErrorEnvelope, ProxyError
from proxy.store.base import AuditRecord, DecisionRow

_ERR = ResponseSpec(data_container=ErrorEnvelope, description="Error in the OpenAI shape")

log = logging.getLogger("thermostat.control")

PREFIX = "/api/optimization"
DAY = 86_400.0

WindowS = Annotated[float, Parameter(ge=1.0, le=366 * DAY, description="Length of the window ending now, in seconds")]
MaxRows = Annotated[int, Parameter(ge=1, le=200_000, description="Newest decisions read from the log")]
Bins = Annotated[int, Parameter(ge=1, le=500, description="Time bins of a series")]
Limit = Annotated[int, Parameter(ge=1, le=1000)]
Offset = Annotated[int, Parameter(ge=0, le=10_000_000, schema_extra={"minimum": 0})]  # Litestar drops a bound of 0


def error_response(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> Response[ApiError]:
    return Response(ApiError(ApiErrorBody(message=message, type=type_, code=code, param=param)), status_code=status)


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def _auth_error(_: Request, exc: AuthError) -> Response[ApiError]:
    resp = error_response(exc.status, exc.message, _TYPE_BY_STATUS.get(exc.status, "permission_error"), exc.code)
    if exc.status == 401:
        resp.headers["www-authenticate"] = "Bearer"
    return resp


def _validation_error(_: Request, exc: ValidationException) -> Response[ApiError]:
    message = exc.detail or "invalid request"
    param = None
    extra = exc.extra
    if isinstance(extra, list) and extra:
        first = extra[0]
        if isinstance(first, dict):
            param = str(first.get("key")) if first.get("key") is not None else None
            detail = first.get("message")
            if detail:
                message = f"{message}: {detail}"
    return error_response(400, message, "invalid_request_error", "invalid_body", param)


def _http_error(_: Request, exc: HTTPException) -> Response[ApiError]:
    status = exc.status_code
    codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden", 413: "request_too_large", 415: "unsupported_media_type"}
    resp = error_response(status, str(exc.detail), _TYPE_BY_STATUS.get(status, "api_error"), codes.get(status, f"http_{status}"))
    if exc.headers:  # e.g. 405's Allow, which RFC 9110 requires
        resp.headers.update(exc.headers)
    return resp


def _proxy_error(_: Request, exc: ProxyError) -> Response[ApiError]:
    return error_response(exc.status, exc.message, exc.type, exc.code, exc.param)


def _internal_error(request: Request, exc: Exception) -> Response[ApiError]:
    log.exception("control API %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}", "api_error", "internal_error")


_ERROR_TEXT = {
    400: "Malformed request, or a Host not in [server] allowed_hosts (OpenAI error shape)",
    401: "Missing or malformed Authorization header",
    403: "Wrong admin token; an Origin that is neither this server nor in [admin] allowed_origins; "
         "without a token, not a loopback client or a Host other than localhost",
    404: "Unknown id (or no upstream for the context's model)",
    409: "Conflict with the current state",
    415: "The body is not declared as content-type: application/json",
    422: "Well-formed but invalid values",
    503: "Not ready / a backing store is unavailable",
}


def document_errors(handler: BaseRouteHandler) -> None:
    """The error statuses a control operation really returns, so the OpenAPI document matches.

    400 everywhere (a disallowed Host is refused at the edge for any path); 401/403 where
    the admin guard runs; 415 where it checks the body type; plus the handler's own.
    """
    public = bool(handler.opt.get("public"))
    codes = {400} if public else {400, 401, 403}
    methods: set[str] = set(getattr(handler, "http_methods", ()))
    if not public and methods - {"GET", "HEAD"}:
        codes.add(415)
    own: dict[int, ResponseSpec] = dict(getattr(handler, "responses", None) or {})
    specs = {code: ResponseSpec(data_container=ApiError, description=_ERROR_TEXT[code]) for code in sorted(codes | own.keys())}
    specs.update({code: spec for code, spec in own.items() if spec is not _ERR})  # a body other than the error shape
    handler.responses = specs  # type: ignore[attr-defined]
    if not public:
        handler.security = [{"bearer": []}]  # type: ignore[attr-defined]


EXCEPTION_HANDLERS: dict[Any, Any] = {
    AuthError: _auth_error,
    ValidationException: _validation_error,
    ProxyError: _proxy_error,
    HTTPException: _http_error,
    Exception: _internal_error,
}


class StrictStructSchemaPlugin(StructSchemaPlugin):
    """Litestar's struct schemas, made to say what msgspec enforces.

    `additionalProperties: false` where the struct forbids unknown fields (the document
    promised extra keys were fine; the decoder answers them with 400), and numeric bounds
    of 0 (`ge=0.0` on a quality score), which Litestar drops because it tests them for
    truthiness.
    """

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: SchemaCreator) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        info = msgspec.inspect.type_info(field_definition.type_)
        if not isinstance(info, msgspec.inspect.StructType):
            return schema
        if info.forbid_unknown_fields:
            schema.additional_properties = False
        for f in info.fields:  # Litestar drops bounds equal to 0 (it tests their truthiness): put them back
            prop = (schema.properties or {}).get(f.encode_name)
            bounds = _numeric_type(f.type)
            if not isinstance(prop, Schema) or bounds is None:
                continue
            for attr, key in (("ge", "minimum"), ("gt", "exclusive_minimum"), ("le", "maximum"), ("lt", "exclusive_maximum")):
                if getattr(bounds, attr) == 0 and getattr(prop, key) is None:
                    setattr(prop, key, 0)
        return schema


def _integral_floats_as_ints(value: Any) -> Any:
    """JSON Schema counts 3.0 as an integer; msgspec's strict mode does not."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    return value


def _numeric_type(t: Any) -> msgspec.inspect.IntType | msgspec.inspect.FloatType | None:
    if isinstance(t, msgspec.inspect.UnionType):
        inner = [x for x in t.types if not isinstance(x, msgspec.inspect.NoneType)]
        t = inner[0] if len(inner) == 1 else None
    if isinstance(t, msgspec.inspect.Metadata):
        t = t.type
    return t if isinstance(t, (msgspec.inspect.IntType, msgspec.inspect.FloatType)) else None


# ----------------------------------------------------------------------------- helpers


@dataclass
class ControlState:
    rt: Any
    auth: AdminAuth
    feedback: FeedbackBook = field(default_factory=FeedbackBook)


def actor_of(request: Request) -> str:
    return str(request.scope.get("state", {}).get("thermostat_actor", "unknown"))


async def write_audit(rt: Any, actor: str, action: str, target: str, before: Any, after: Any) -> bool:
    """Append one audit entry to the log store (False, logged, if the store has no audit table)."""
    record = AuditRecord(at=time.time(), actor=actor, action=action, target=target,
                         before=msgspec.to_builtins(before), after=msgspec.to_builtins(after))
    append = getattr(rt.sink, "append_audit", None)
    if append is None:
        log.warning("audit (log store has no append_audit): %s", msgspec.json.encode(record).decode())
        return False
    try:
        await append(record)
        return True
    except Exception:  # the action already happened; losing its audit row must be visible
        log.exception("writing the audit entry for %s failed", action)
        return False


def rollback_status(rt: Any, now: float) -> RollbackStatus:
    eff = rt.rollout.effective(now)
    rb = rt.rollout.state.rollback
    if not rb.active or eff.rollback is None:  # an elapsed SLO cooldown already counts as resumed
        return RollbackStatus(active=False, trigger=None, reason=None, since=None, resumes_at=None)
    return RollbackStatus(active=True, trigger=rb.trigger, reason=rb.reason, since=rb.since, resumes_at=rb.resumes_at, resume_phase=rb.resume_phase)


def event_out(e: RolloutEvent) -> RolloutEventOut:
    return RolloutEventOut(at=e.at, kind=e.kind, from_phase=e.from_, to_phase=e.to, reason=e.reason, actor=e.actor,
                           evidence=msgspec.to_builtins(e.evidence))


def recent_events(rt: Any, limit: int = 50) -> list[RolloutEventOut]:
    return [event_out(e) for e in reversed(rt.rollout.state.events[-limit:])]


def status_of(rt: Any, now: float) -> OptimizationStatus:
    eff = rt.rollout.effective(now)
    opt = rt.config.optimization
    return OptimizationStatus(
        enabled=rt.rollout.enabled,
        mode=opt.mode,
        phase=rt.rollout.state.phase,
        effective_phase=eff.phase,
        traffic_percentage=eff.fraction if eff.optimizing_allowed else 0.0,
        phase_traffic_percentage=rt.rollout.fraction(rt.rollout.state.phase),
        policy=rt.policy.name,
        policy_version=rt.policy.version,
        rollback=rollback_status(rt, now),
        uptime_s=round(now - rt.started_at, 3),
        decisions_in_registry=len(rt.registry),
    )


def slo_status(rt: Any, now: float) -> SloStatus:
    report = rt.slo.report(now)
    slos = [
        SloEntry(name=c.name, traffic=traffic.traffic, threshold=c.threshold, value=cdata.finite(c.value), compliant=c.compliant,
                 samples=c.samples, judged=c.judged)
        for traffic in (report.optimized, report.baseline)
        for c in traffic.checks
    ]
    return SloStatus(compliant=report.compliant, window_s=report.window_s, min_samples=report.min_samples, breached=list(report.breached), slos=slos)


async def caws_status(rt: Any, now: float) -> CawsStatus:
    s = rt.config.caws
    st = await rt.budget.status(now)
    return CawsStatus(
        enabled=s.enabled, window_s=s.window_s, window_start=float(st.window_start), resets_at=float(st.resets_at),
        budget_limit=st.limit, effective_limit=st.effective_limit, used=st.used, reserved=st.reserved, overruns=st.overruns,
        fill=cdata.finite(st.fill), warning=st.warning, exhausted=st.exhausted, waiver_threshold=s.waiver_threshold,
        warning_threshold=s.warning_threshold, active_waivers=list(st.active_waivers),
        tasks=[BudgetLineOut(task_type=k, limit=v.limit, effective_limit=v.effective_limit, used=v.used, reserved=v.reserved,
                             overruns=v.overruns, fill=cdata.finite(v.fill)) for k, v in sorted(st.tasks.items())],
    )


def waiver_out(w: Waiver, now: float) -> WaiverOut:
    return WaiverOut(id=w.id, task_type=w.task_type, extra_tokens=w.extra_tokens, reason=w.reason, approver=w.approver,
                     created_at=w.created_at, expires_at=w.expires_at, revoked_at=w.revoked_at, revoked_by=w.revoked_by, status=w.status(now))


def params_out(p: Any) -> ParamsOut:
    return ParamsOut(temperature=p.temperature, max_tokens=p.max_tokens)


def decision_out(r: DecisionRow) -> DecisionOut:
    return DecisionOut(
        request_id=r.request_id, timestamp=r.timestamp, task_type=r.task_type, model=r.model_name, upstream=r.upstream, mode=r.mode,
        policy=r.policy, policy_version=r.policy_version, sent=params_out(r.chosen_params), baseline=params_out(r.baseline_params),
        policy_choice=params_out(r.policy_params) if r.policy_params is not None else None, propensity=r.propensity,
        policy_propensity=math.exp(r.policy_log_propensity) if r.policy_log_propensity is not None else None,
        guard_notes=list(r.guard_notes), status=r.status, error_class=r.error_class, latency_s=r.latency_s, ttft_s=r.ttft_s,
        prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens, finish_reason=r.finish_reason,
        quality=r.effective_quality, reward=cdata.finite(r.effective_reward), automatic_quality=r.quality, feedback_quality=r.feedback_quality,
    )


def body_from_context(c: ContextIn) -> dict[str, Any]:
    """A request body with the context's fields (what `build_context` reads)."""
    body: dict[str, Any] = {"model": c.model}
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


def context_of(rt: Any, task_type: str, c: ContextIn) -> tuple[Any, dict[str, Any]]:
    body = body_from_context(c)
    upstream = rt.pool.route(c.model)
    if upstream is None:
        raise ProxyError(404, f"no upstream is configured for model '{c.model}'", "model_not_found", "not_found_error", "context.model")
    try:
        ctx = rt.build_context(body, task_type=task_type, endpoint=c.endpoint, upstream=upstream.name)
    except Exception as exc:  # build_context is total for valid bodies; anything else is the caller's input
        raise ProxyError(422, f"the context cannot be evaluated: {exc}", "invalid_context") from None
    if c.prompt_tokens is not None:
        ctx = msgspec.structs.replace(ctx, prompt_tokens_est=int(c.prompt_tokens))
    return ctx, body


def window(window_s: float) -> tuple[float, float, float]:
    now = time.time()
    return now, now - window_s, now + 1e-3


# ----------------------------------------------------------------------------- router


def build_control(rt: Any, *, environ: dict[str, str] | None = None) -> tuple[Router, ControlState]:
    auth = AdminAuth.from_settings(rt.config.admin, rt.config.server.allowed_hosts, environ)
    state = ControlState(rt=rt, auth=auth)

    def admin_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
        # Guards run before Litestar reads the body, so a forged request never reaches a handler.
        if handler.opt.get("public"):
            return
        headers = connection.headers
        auth.check_origin(headers)
        client = connection.scope.get("client")
        actor = auth.check(headers, client[0] if client else None)
        auth.check_content_type(str(connection.scope.get("method", "GET")), headers)
        connection.scope.setdefault("state", {})["thermostat_actor"] = actor

    async def strict_body(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
        """Litestar converts bodies leniently (0 or "true" for a boolean, "5" for a number);
        the OpenAPI document promises JSON types, so the body is first decoded strictly."""
        data = getattr(handler, "parsed_fn_signature", None)
        field = data.parameters.get("data") if data is not None else None
        if field is None or not isinstance(connection, Request):
            return
        raw = await connection.body()
        if not raw.strip():
            return  # absent body: Litestar applies the default or reports the missing one
        try:
            msgspec.convert(_integral_floats_as_ints(msgspec.json.decode(raw)), type=field.annotation, strict=True)
        except msgspec.ValidationError as exc:
            message, _, where = str(exc).partition(" - at `")
            param = where.rstrip("`").removeprefix("$").lstrip(".") or None
            raise ProxyError(400, f"invalid request body: {message}", "invalid_body", param=param) from None
        except msgspec.DecodeError as exc:
            raise ProxyError(400, f"request body is not valid JSON: {exc}", "invalid_json") from None

    # ---- read-only ------------------------------------------------------------------

    @get("/health", opt={"public": True}, summary="Readiness (no auth): upstreams, database, state store, writer queue",
         responses={503: ResponseSpec(data_container=Readiness, description="Not ready: the checks, at least one failing")})
    async def health() -> Response[Readiness]:
        checks = [HealthCheck(name="upstreams", ok=bool(rt.pool.upstreams), detail=f"{len(rt.pool.upstreams)} configured")]
        st = rt.sink.status() if hasattr(rt.sink, "status") else None
        if st is not None:
            checks.append(HealthCheck(name="database", ok=bool(st.connected), detail=st.last_error or st.kind))
        try:
            await asyncio.wait_for(rt.state_store.get("thermostat:health"), 1.0)
            checks.append(HealthCheck(name="state_store", ok=True, detail=type(rt.state_store).__name__))
        except Exception as exc:
            checks.append(HealthCheck(name="state_store", ok=False, detail=f"{type(exc).__name__}"))
        q = rt.recorder.queue
        full = q.maxsize > 0 and q.qsize() >= q.maxsize
        checks.append(HealthCheck(name="writer_queue", ok=bool(rt.recorder.ready) and not full,
                                  detail=f"{q.qsize()}/{q.maxsize} queued, {rt.recorder.dropped} dropped"))
        ready = all(c.ok for c in checks)
        return Response(Readiness(ready=ready, checks=checks), status_code=200 if ready else 503)

    @get("/status", summary="Enabled, mode, phase, traffic, policy and version, rollback state", sync_to_thread=False)
    def status() -> OptimizationStatus:
        return status_of(rt, time.time())

    @get("/metrics", summary="Per task type, arm and traffic class: counts, reward CI, latency quantiles, tokens, quality")
    async def metrics_(window_s: WindowS = 3600.0, max_rows: MaxRows = 20_000, task_type: FromQuery[str | None] = None) -> MetricsReport:
        _, since, until = window(window_s)
        rows, truncated = await cdata.load_rows(rt, since=since, until=until, max_rows=max_rows, task_type=task_type)
        return cdata.metrics_report(rows, since, until, truncated)

    @get("/performance", summary="Per task type: optimised vs baseline traffic and the improvement of mean reward")
    async def performance(window_s: WindowS = 3600.0, max_rows: MaxRows = 20_000, task_type: FromQuery[str | None] = None) -> PerformanceReport:
        _, since, until = window(window_s)
        rows, truncated = await cdata.load_rows(rt, since=since, until=until, max_rows=max_rows, task_type=task_type)
        return cdata.performance_report(rows, since, until, truncated)

    @get("/slo-status", summary="SLO values and compliance for optimised and baseline traffic", sync_to_thread=False)
    def slo() -> SloStatus:
        return slo_status(rt, time.time())

    @get("/rollout-status", summary="Phase, time in phase, promotion criteria and their evidence")
    async def rollout_status(ope_window_s: WindowS = 7 * DAY, max_rows: MaxRows = 5000) -> RolloutStatus:
        now, since, until = window(ope_window_s)
        ro = rt.rollout
        st = ro.state
        rows, _ = await cdata.load_rows(rt, since=since, until=until, max_rows=max_rows, mode="optimized")
        report, _ = cdata.ope_report(rt, rows, since, until, n_bootstrap=ope.EVIDENCE_BOOTSTRAP_REPLICATES)
        evidence, evidence_out = cdata.ope_evidence(report)
        check = ro.promotion_check(now, evidence)
        s = ro.settings
        hours = {"shadow": s.shadow_duration_hours, "canary": s.canary_duration_hours, "guarded": s.guarded_duration_hours}.get(st.phase)
        in_phase = now - st.phase_started_at
        criteria: list[PromotionCriterion] = []
        if hours is not None:
            criteria.append(PromotionCriterion(name="minimum_duration", required=f">= {hours * 3600:g} s", current=f"{in_phase:.1f} s", met=in_phase >= hours * 3600))
        breach_in_phase = st.last_breach_at is not None and st.last_breach_at >= st.phase_started_at
        criteria.append(PromotionCriterion(name="no_slo_breach_in_phase", required="no breach since the phase started",
                                           current=f"breach at {st.last_breach_at:.3f}" if breach_in_phase else "none", met=not breach_in_phase))
        criteria.append(PromotionCriterion(name="not_rolled_back", required="no active rollback", current=str(st.rollback.trigger or "none"), met=not st.rollback.active))
        if st.phase != "shadow":
            lb = evidence_out.improvement_lower_bound
            criteria.append(PromotionCriterion(name="ope_samples", required=f">= {s.min_samples_for_promotion}", current=str(evidence_out.samples),
                                               met=evidence_out.samples >= s.min_samples_for_promotion))
            criteria.append(PromotionCriterion(name="ope_lower_bound", required=">= 0 (SNIPS improvement over baseline)",
                                               current="none" if lb is None else f"{lb:.6g}", met=lb is not None and lb >= 0))
        return RolloutStatus(
            phase=st.phase, phase_started_at=st.phase_started_at, time_in_phase_s=in_phase, next_phase=cdata.next_phase(st.phase),
            traffic_percentage=ro.fraction(st.phase), auto_promote=s.auto_promote, promotion_ready=check.ready,
            blockers=list(check.blockers), criteria=criteria, ope=evidence_out, rollback=rollback_status(rt, now), events=recent_events(rt, 20),
        )

    @get("/convergence", summary="Per task type: the policy's probability of its own choice over time, and its current arm distribution")
    async def convergence(window_s: WindowS = DAY, bins: Bins = 24, max_rows: MaxRows = 20_000) -> ConvergenceReport:
        _, since, until = window(window_s)
        rows, _ = await cdata.load_rows(rt, since=since, until=until, max_rows=max_rows)
        return cdata.convergence(rt, rows, since, until, bins)

    @get("/parameter-evolution", summary="Chosen (policy) and sent temperature / max_tokens over time per task type")
    async def parameter_evolution(window_s: WindowS = DAY, bins: Bins = 24, max_rows: MaxRows = 20_000) -> ParameterEvolution:
        _, since, until = window(window_s)
        rows, _ = await cdata.load_rows(rt, since=since, until=until, max_rows=max_rows)
        return cdata.parameter_evolution(rows, since, until, bins)

    @get("/dashboard", summary="Everything the dashboard page draws, in one call")
    async def dashboard(window_s: WindowS = 3600.0, bins: Bins = 30, max_rows: MaxRows = 20_000) -> Dashboard:
        now, since, until = window(window_s)
        rows, _ = await cdata.load_rows(rt, since=since, until=until, max_rows=max_rows)
        budget, budget_error = None, None
        try:
            budget = await caws_status(rt, now)
        except Exception as exc:
            budget_error = f"budget store unavailable: {type(exc).__name__}"
        evolution = cdata.parameter_evolution(rows, since, until, bins)
        return Dashboard(
            generated_at=now, status=status_of(rt, now), slo=slo_status(rt, now), slo_latency_p99_ms=rt.config.slo.latency_p99_ms,
            reward_series=cdata.reward_series(rows, since, until, bins), latency_series=cdata.latency_series(rows, since, until, bins),
            parameters=evolution, budget=budget, budget_error=budget_error, events=recent_events(rt, 20),
            performance=cdata.performance_report(rows, since, until, False).tasks, bin_s=evolution.bin_s,
        )

    @get("/rollback-status", summary="Whether everything is on baseline parameters now, and why", sync_to_thread=False)
    def rollback_status_() -> RollbackStatus:
        return rollback_status(rt, time.time())

    @get("/baseline-parameters", summary="Parameters sent when Thermostat does not optimise a request", sync_to_thread=False)
    def baseline_parameters() -> BaselineParameters:
        cfg = rt.config
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

    @get("/caws-status", summary="Token budget of the current window, waivers, reset time", responses={503: _ERR})
    async def caws() -> CawsStatus:
        try:
            return await caws_status(rt, time.time())
        except Exception as exc:
            raise ProxyError(503, f"the budget store is unavailable: {type(exc).__name__}", "budget_store_unavailable", "service_unavailable") from None

    @get("/waivers", summary="All CAWS waivers (any status), newest first")
    async def list_waivers() -> WaiverList:
        now = time.time()
        return WaiverList(waivers=[waiver_out(w, now) for w in await rt.budget.list_waivers()])

    @get("/ope", summary="IPS / SNIPS / DR estimates with CIs: current policy vs baseline on logged exploration data")
    async def ope_(window_s: WindowS = 7 * DAY, max_rows: Annotated[int, Parameter(ge=1, le=50_000)] = 5000,
                   n_bootstrap: Annotated[int, Parameter(ge=10, le=5000)] = ope.REPORT_BOOTSTRAP_REPLICATES, seed: Annotated[int, Parameter(ge=0, le=2**31, schema_extra={"minimum": 0})] = 0) -> OpeOut:
        _, since, until = window(window_s)
        rows, _ = await cdata.load_rows(rt, since=since, until=until, max_rows=max_rows, mode="optimized")
        return cdata.ope_report(rt, rows, since, until, seed=seed, n_bootstrap=n_bootstrap)[0]

    @get("/audit-logs", summary="Control-plane actions, newest first")
    async def audit_logs(limit: Limit = 100, offset: Offset = 0) -> AuditPage:
        items = await rt.sink.fetch_audit(limit=limit, offset=offset)
        return AuditPage(limit=limit, offset=offset, items=[AuditOut(id=a.id, at=a.at, actor=a.actor, action=a.action, target=a.target,
                                                                    before=a.before, after=a.after) for a in items])

    @get("/logs", summary="Recent logged decisions, newest first, paginated and filterable")
    async def logs(limit: Limit = 50, offset: Offset = 0, task_type: FromQuery[str | None] = None, mode: FromQuery[str | None] = None,
                   since: FromQuery[float | None] = None, until: FromQuery[float | None] = None) -> DecisionPage:
        for name, value in (("since", since), ("until", until)):
            if value is not None and not math.isfinite(value):
                raise ProxyError(400, f"'{name}' must be a finite number of unix seconds", "invalid_value", param=name)
        rows = await rt.sink.fetch_decisions(since=since, until=until, task_type=task_type, mode=mode, limit=limit, offset=offset)
        total = await rt.sink.count_decisions(since=since, until=until, task_type=task_type, mode=mode)
        return DecisionPage(total=total, limit=limit, offset=offset, items=[decision_out(r) for r in rows])

    @get("/db-status", summary="Decision log and writer status")
    async def db_status() -> DbStatus:
        st = rt.sink.status()
        total = last_hour = None
        if st.connected:
            try:
                total = await rt.sink.count_decisions()
                last_hour = await rt.sink.count_decisions(since=time.time() - 3600)
            except Exception:
                pass
        rec = rt.recorder
        return DbStatus(kind=st.kind, connected=st.connected, last_error=st.last_error, rows_written=st.rows_written,
                        spool_batches=st.spool_batches, spool_entries=st.spool_entries, dead_letter_batches=st.dead_letter_batches,
                        decisions_total=total, decisions_last_hour=last_hour, writer_queue_depth=rec.queue.qsize(),
                        writer_queue_capacity=rec.queue.maxsize, writer_dropped=rec.dropped, writer_written=rec.written,
                        writer_failures=rec.write_failures, state_store=type(rt.state_store).__name__)

    @get("/security-status", summary="Admin auth configuration and refused calls since start")
    async def security_status() -> SecurityStatus:
        audit_entries = None
        if hasattr(rt.sink, "query"):
            try:
                audit_entries = int((await rt.sink.query("SELECT COUNT(*) AS n FROM audit_log"))[0]["n"])
            except Exception:
                audit_entries = None
        return SecurityStatus(
            auth_required=auth.configured, token_env=auth.token_env, token_configured=auth.configured, token_id=auth.token_id,
            loopback_only=not auth.configured, auth_failures=auth.stats(), audit_entries=audit_entries,
            prompts_stored=rt.config.server.store_prompts, upstream_keys_from_env=sum(1 for u in rt.config.upstreams if u.api_key_env),
        )

    @get("/compliance-status", summary="CAWS compliance: trust region held, budget, SLO, audit, auth")
    async def compliance_status(window_s: WindowS = DAY, max_rows: MaxRows = 20_000) -> ComplianceStatus:
        now, since, until = window(window_s)
        cfg = rt.config
        c = cfg.constraints
        checks: list[ComplianceCheck] = []
        rows, truncated = await cdata.load_rows(rt, since=since, until=until, max_rows=max_rows, mode="optimized")
        outside = 0
        for r in rows:
            sent, base = r.chosen_params, r.baseline_params
            if sent.temperature is not None and base.temperature is not None and abs(sent.temperature - base.temperature) > c.max_delta_temperature + 1e-9 or sent.max_tokens is not None and base.max_tokens is not None and abs(sent.max_tokens - base.max_tokens) > c.max_delta_max_tokens:
                outside += 1
        checks.append(ComplianceCheck(name="trust_region", ok=outside == 0,
                                      detail=f"{outside} of {len(rows)} optimized decisions outside ±{c.max_delta_temperature:g} temperature / "
                                             f"±{c.max_delta_max_tokens} max_tokens" + (" (newest rows only)" if truncated else "")))
        checks.append(ComplianceCheck(name="caws_enabled", ok=cfg.caws.enabled or not c.require_caws,
                                      detail=f"caws.enabled={cfg.caws.enabled}, constraints.require_caws={c.require_caws}"))
        try:
            b = await rt.budget.status(now)
            checks.append(ComplianceCheck(name="budget", ok=b.used <= b.effective_limit and b.overruns == 0,
                                          detail=f"used {b.used} + reserved {b.reserved} of {b.effective_limit}; overruns {b.overruns}"))
        except Exception as exc:
            checks.append(ComplianceCheck(name="budget", ok=False, detail=f"budget store unavailable: {type(exc).__name__}"))
        slo_report = rt.slo.report(now)
        checks.append(ComplianceCheck(name="slo", ok=slo_report.compliant, detail="breached: " + (", ".join(slo_report.breached) or "none")))
        checks.append(ComplianceCheck(name="audit_log", ok=hasattr(rt.sink, "append_audit"), detail=f"log store {getattr(rt.sink, 'name', '?')}"))
        checks.append(ComplianceCheck(name="admin_auth", ok=True, detail="bearer token" if auth.configured else "no token ([admin] allow_unauthenticated): same-host clients only"))
        return ComplianceStatus(compliant=all(ch.ok for ch in checks), checks=checks)

    # ---- decisions without traffic ------------------------------------------------------

    @post("/recommend", status_code=200, summary="The decision the policy would make now for a context (no upstream call, no budget reserved)",
          responses={404: _ERR})
    async def recommend(data: JSONBody[RecommendIn]) -> Recommendation:
        now = time.time()
        ctx, _ = context_of(rt, data.task_type, data.context)
        bandit = rt.bandit
        ref, allowed, limits = bandit.reference_for(ctx)
        base = ref.arm
        probs = np.asarray(rt.policy.propensities(ctx, base, allowed), dtype=np.float64)
        # A private generator: the request path's sequence stays untouched.
        choice = rt.policy.choose(ctx, base, allowed, np.random.default_rng())
        arm = allowed[choice.index]
        eff = rt.rollout.effective(now)
        key = data.context.user
        held_out = assign(key, bandit.holdout_fraction, HOLDOUT_SALT) if key else False
        assigned = (not held_out and assign(key, eff.fraction)) if key else None
        guards = [
            GuardVerdict(guard="trust_region", ok=True, verdict=f"{len(allowed)} arm(s) allowed",
                         detail={"max_delta_temperature": rt.config.constraints.max_delta_temperature,
                                 "max_delta_max_tokens": rt.config.constraints.max_delta_max_tokens,
                                 "model_max_tokens": limits.max_tokens, "fixed_temperature": limits.fixed_temperature}),
            GuardVerdict(guard="rollout", ok=eff.optimizing_allowed,
                         verdict=("optimising" if eff.optimizing_allowed else "not optimising") + f" ({eff.phase}, {eff.fraction:.0%} of keys)",
                         detail={"phase": eff.phase, "fraction": eff.fraction, "assigned": assigned,
                                 "rollback": msgspec.to_builtins(eff.rollback) if eff.rollback is not None else None}),
        ]
        fits = True
        try:
            b = await rt.budget.status(now)
            need = ctx.prompt_tokens_est + arm.max_tokens
            fill = b.used + b.reserved
            zone = fill >= rt.config.caws.waiver_threshold * b.effective_limit
            fits = fill + need <= b.effective_limit and not (zone and arm.max_tokens > base.max_tokens and choice.propensity < rt.config.caws.confidence_threshold)
            guards.append(GuardVerdict(guard="budget", ok=fits, verdict="fits" if fits else "would fall back to a cheaper arm or the baseline",
                                       detail={"reservation": need, "used": b.used, "reserved": b.reserved, "effective_limit": b.effective_limit,
                                               "waiver_zone": zone}))
        except Exception as exc:
            fits = not rt.config.constraints.require_caws
            guards.append(GuardVerdict(guard="budget", ok=False, verdict=f"budget store unavailable ({type(exc).__name__})"))
        report = rt.slo.report(now)
        guards.append(GuardVerdict(guard="slo", ok=report.compliant, verdict="compliant" if report.compliant else "breached: " + ", ".join(report.breached),
                                   detail={"optimized_p99_ms": cdata.finite(report.optimized.p99_ms), "optimized_requests": report.optimized.requests}))
        optimised = eff.optimizing_allowed and (assigned if assigned is not None else eff.fraction >= 1.0)
        if optimised and fits:
            sent = tuned_params(enforce(arm, base, rt.config.constraints, limits, ref.freedom), ref)
            would = ParamsOut(temperature=sent.temperature, max_tokens=sent.max_tokens)
            mode = "optimized"
        elif optimised:
            would = ParamsOut(temperature=ref.sent.temperature, max_tokens=ref.sent.max_tokens)
            mode = "guard_fallback"  # the budget would swap the arm (cheapest fitting arm or the baseline)
        else:
            would = ParamsOut(temperature=ref.sent.temperature, max_tokens=ref.sent.max_tokens)
            mode = unoptimised_mode(eff, held_out)
        return Recommendation(
            task_type=ctx.task_type, bucket=context_bucket(ctx), policy=rt.policy.name, policy_version=rt.policy.version,
            recommended=ParamsOut(temperature=arm.temperature, max_tokens=arm.max_tokens), propensity=choice.propensity,
            would_send=would, would_mode=mode, baseline=ParamsOut(temperature=base.temperature, max_tokens=base.max_tokens),
            arms=[ArmProbability(temperature=a.temperature, max_tokens=a.max_tokens, probability=float(p)) for a, p in zip(allowed, probs)],
            guards=guards,
        )

    @post("/test-shadow", status_code=200, summary="Run one synthetic request through the decision path; nothing is sent or logged",
          responses={404: _ERR})
    async def test_shadow(request: Request, data: JSONBody[ShadowTestIn | None] = None) -> ShadowTestResult:
        from proxy.edge.asgi import patch_body

        body_in = data or ShadowTestIn()
        now = time.time()
        ctx, body = context_of(rt, body_in.task_type, body_in.context)
        rid = f"shadow-test-{uuid.uuid4()}"
        decision = await rt.bandit.decide(ctx, request_id=rid, assignment_key=body_in.context.user or rid)
        reservation = rt.bandit.reservations.pop(rid, None)
        if reservation is not None:
            await rt.budget.release(reservation, now)
        out = copy.deepcopy(body)
        patch_body(out, decision.sent, "max_tokens" if body_in.context.max_tokens is not None else None)
        await write_audit(rt, actor_of(request), "test_shadow", rid, None,
                          {"mode": decision.mode, "sent": msgspec.to_builtins(decision.sent)})
        return ShadowTestResult(
            request_id=rid, task_type=ctx.task_type, mode=decision.mode, policy=decision.policy, policy_version=decision.policy_version,
            policy_choice=params_out(decision.policy_choice) if decision.policy_choice is not None else None,
            policy_propensity=decision.policy_propensity, sent=params_out(decision.sent), baseline=params_out(decision.baseline),
            guard_notes=list(decision.guard_notes), body=out, logged=False,
        )

    # ---- mutations -------------------------------------------------------------------

    @post("/record-outcome", status_code=200, summary="Delayed feedback: replace the automatic quality of a request",
          responses={404: _ERR, 409: _ERR})
    async def record_outcome_(request: Request, data: JSONBody[RecordOutcomeIn]) -> RecordOutcomeResult:
        actor = actor_of(request)
        try:
            result = await record_outcome(rt, state.feedback, data, actor)
        except DecisionNotFound:
            raise ProxyError(404, f"no decision is known for request id '{data.request_id}'", "request_not_found", "not_found_error", "request_id") from None
        except FeedbackConflict:
            raise ProxyError(409, f"feedback for '{data.request_id}' was already recorded; send overwrite=true to replace it",
                               "feedback_exists", "conflict_error", "overwrite") from None
        await write_audit(rt, actor, "record_outcome", data.request_id,
                          {"quality": result.previous_quality, "reward": result.previous_reward},
                          {"quality": result.quality, "reward": result.reward, "policy_updated": result.policy_updated})
        return result

    async def _transition(request: Request, action: str, fn: Any) -> ActionResult:
        now = time.time()
        before = rollback_status(rt, now)
        phase_before = rt.rollout.state.phase
        event = fn(now)
        if event is not None:
            rt.on_rollout_events([event])
        after = rollback_status(rt, now)
        await write_audit(rt, actor_of(request), action, "rollout",
                          {"rollback": before, "phase": phase_before}, {"rollback": after, "phase": rt.rollout.state.phase})
        return ActionResult(changed=event is not None, message=(event.reason if event is not None else f"nothing to {action}"),
                            rollback=after, phase=rt.rollout.state.phase, event=event_out(event) if event is not None else None)

    @post("/rollback", status_code=200, summary="Manual rollback: every request gets baseline parameters until resumed")
    async def rollback(request: Request, data: JSONBody[RollbackIn | None] = None) -> ActionResult:
        actor = actor_of(request)
        reason = (data.reason if data else "") or "manual rollback"
        return await _transition(request, "rollback", lambda now: rt.rollout.rollback(now, reason=reason, actor=actor))

    @post("/resume", status_code=200, summary="Resume after a manual (same phase) or SLO (one phase lower) rollback", responses={409: _ERR})
    async def resume(request: Request, data: JSONBody[RollbackIn | None] = None) -> ActionResult:
        actor = actor_of(request)
        reason = (data.reason if data else "") or "manual resume"

        def go(now: float) -> Any:
            try:
                return rt.rollout.resume(now, reason=reason, actor=actor)
            except ValueError as exc:
                raise ProxyError(409, str(exc), "optimization_disabled", "conflict_error") from None

        return await _transition(request, "resume", go)

    @post("/waivers", status_code=201, summary="Create a CAWS waiver (extra tokens for a task type until it expires)", responses={422: _ERR})
    async def create_waiver(request: Request, data: JSONBody[WaiverIn]) -> WaiverOut:
        now = time.time()
        if (data.expires_at is None) == (data.duration_s is None):
            raise ProxyError(422, "give exactly one of 'expires_at' (unix seconds) or 'duration_s'", "invalid_value", param="expires_at")
        expires = data.expires_at if data.expires_at is not None else now + float(data.duration_s or 0)
        if not math.isfinite(expires) or expires <= now:
            raise ProxyError(422, "'expires_at' must be in the future", "invalid_value", param="expires_at")
        try:
            waiver = await rt.budget.create_waiver(task_type=data.task_type, extra_tokens=data.extra_tokens, reason=data.reason,
                                                   approver=data.approver, expires_at=expires, now=now)
        except ValueError as exc:
            raise ProxyError(422, str(exc), "invalid_value") from None
        await write_audit(rt, actor_of(request), "create_waiver", waiver.id, None, waiver)
        return waiver_out(waiver, now)

    @delete("/waivers/{waiver_id:str}", status_code=200, summary="Revoke a waiver", responses={404: _ERR})
    async def revoke_waiver(request: Request, waiver_id: FromPath[str]) -> WaiverOut:
        now = time.time()
        actor = actor_of(request)
        before = next((w for w in await rt.budget.list_waivers() if w.id == waiver_id), None)
        if before is None:
            raise ProxyError(404, f"no waiver '{waiver_id}'", "waiver_not_found", "not_found_error", "waiver_id")
        revoked = await rt.budget.revoke_waiver(waiver_id, now=now, by=actor)
        if revoked is None:
            raise ProxyError(404, f"no waiver '{waiver_id}'", "waiver_not_found", "not_found_error", "waiver_id")
        await write_audit(rt, actor, "revoke_waiver", waiver_id, before, revoked)
        return waiver_out(revoked, now)

    handlers = [
            health, status, metrics_, performance, slo, rollout_status, convergence, parameter_evolution, dashboard,
            rollback_status_, baseline_parameters, caws, list_waivers, ope_, audit_logs, logs, db_status, security_status,
            compliance_status, recommend, test_shadow, record_outcome_, rollback, resume, create_waiver, revoke_waiver,
    ]
    for handler in handlers:
        document_errors(handler)
    router = Router(
        path=PREFIX,
        route_handlers=handlers,
        guards=[admin_guard, strict_body],
        tags=["optimization"],
    )
    return router, state
