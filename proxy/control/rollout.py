"""The rollout: where it stands and what promotion waits for; manual rollback and resume."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import JSONBody, Parameter

from guards.rollout import RolloutEvent
from policies import ope
from proxy.common import ProxyError
from proxy.control import reports as cdata
from proxy.control.deps import Deps
from proxy.control.errors import ERR
from proxy.control.schemas import ActionResult, EventPage, PromotionCriterion, PromotionEvidenceOut, RollbackIn, RolloutStatus
from proxy.control.views import (
    DAY,
    EventLimit,
    EventOffset,
    MaxRows,
    WindowS,
    actor_of,
    event_out,
    recent_events,
    rollback_status,
    stored_event_out,
    window,
    write_audit,
)
from proxy.learning import load_rows


async def _transition(request: Request, deps: Deps, action: str,
                      fn: Callable[[float], RolloutEvent | None]) -> ActionResult:
    """Apply one manual rollout change, publish its event like the runtime's own, and audit before/after."""
    now = time.time()
    ro = deps.rollout
    before = rollback_status(deps, now)
    phase_before = ro.state.phase
    event = fn(now)
    if event is not None:
        deps.on_rollout_events([event])
    after = rollback_status(deps, now)
    await write_audit(deps, actor_of(request), action, "rollout",
                      {"rollback": before, "phase": phase_before}, {"rollback": after, "phase": ro.state.phase})
    return ActionResult(changed=event is not None, message=(event.reason if event is not None else f"nothing to {action}"),
                        rollback=after, phase=ro.state.phase, event=event_out(event) if event is not None else None)


class RolloutApiController(Controller):
    path = "/"

    @get("/rollout-status", summary="Phase, time in phase, promotion criteria and their evidence")
    async def rollout_status(self, deps: Deps, ope_window_s: WindowS = 7 * DAY, max_rows: MaxRows = 5000) -> RolloutStatus:
        now, since, until = window(ope_window_s)
        ro = deps.rollout
        st = ro.state
        rows, _ = await load_rows(deps.log_store, since=since, until=until, max_rows=max_rows, mode="optimized")
        report, _ = cdata.ope_report(deps.decider, rows, since, until, n_bootstrap=ope.EVIDENCE_BOOTSTRAP_REPLICATES, per_task=False)
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
        promotion = ro.promotion_evidence()
        if st.phase != "shadow":
            lb = promotion.difference_lower
            criteria.append(PromotionCriterion(name="holdout_rewards", required="> 0 holdout rewards in this phase",
                                               current=str(promotion.holdout_n), met=promotion.holdout_n > 0))
            criteria.append(PromotionCriterion(name="optimised_rewards", required=f">= {s.min_samples_for_promotion}",
                                               current=str(promotion.optimised_n), met=promotion.optimised_n >= s.min_samples_for_promotion))
            criteria.append(PromotionCriterion(
                name="anytime_lower_bound",
                required=(f"> 0 (anytime-valid {1 - promotion.alpha:.2%} lower bound of mean reward optimised − holdout, "
                          f"{promotion.signal_kind} signals; each kind compared only with itself)"),
                current=f"{lb:.6g}", met=promotion.holdout_n > 0 and lb > 0))
        return RolloutStatus(
            phase=st.phase, phase_started_at=st.phase_started_at, time_in_phase_s=in_phase, next_phase=cdata.next_phase(st.phase),
            traffic_percentage=ro.fraction(st.phase), auto_promote=s.auto_promote, promotion_ready=check.ready,
            blockers=list(check.blockers), criteria=criteria, ope=evidence_out, rollback=rollback_status(deps, now),
            promotion=PromotionEvidenceOut(**msgspec.structs.asdict(promotion)),
            events=recent_events(deps, 20),
        )

    @get("/events", summary="Recorded events, newest first: promotions, rollbacks (global and per task type), detected baseline changes")
    async def events(self, deps: Deps, limit: EventLimit = 50, offset: EventOffset = 0,
                     window_s: Annotated[float | None, Parameter(ge=1.0, le=366 * DAY, description="Only events of this window ending now, in seconds")] = None
                     ) -> EventPage:
        """From the log store, so every replica's events and the per-task monitor's show, not only this process's rollout."""
        since = window(window_s)[1] if window_s is not None else None
        rows = await deps.log_store.fetch_events(limit=offset + limit + 1, since=since)  # one more tells whether a next page exists
        page = rows[offset:offset + limit]
        more = len(rows) > offset + limit
        return EventPage(limit=limit, offset=offset, next_offset=offset + limit if more else None, since=since,
                         items=[stored_event_out(e) for e in page])

    @post("/rollback", status_code=200, summary="Manual rollback: every request gets baseline parameters until resumed")
    async def rollback(self, request: Request, deps: Deps, data: JSONBody[RollbackIn | None] = None) -> ActionResult:
        actor = actor_of(request)
        reason = (data.reason if data else "") or "manual rollback"
        return await _transition(request, deps, "rollback", lambda now: deps.rollout.rollback(now, reason=reason, actor=actor))

    @post("/resume", status_code=200, summary="Resume after a manual (same phase) or SLO (one phase lower) rollback", responses={409: ERR})
    async def resume(self, request: Request, deps: Deps, data: JSONBody[RollbackIn | None] = None) -> ActionResult:
        actor = actor_of(request)
        reason = (data.reason if data else "") or "manual resume"

        def go(now: float) -> RolloutEvent | None:
            try:
                return deps.rollout.resume(now, reason=reason, actor=actor)
            except ValueError as exc:
                raise ProxyError(409, str(exc), "optimization_disabled", "conflict_error") from None

        return await _transition(request, deps, "resume", go)
