"""Decisions without traffic: what the decider would do for a context, asked of the decider itself.

Both endpoints call `BanditDecider.explain`, the request path's own steps, so an answer
here cannot drift from what a real request would get.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
from litestar import Controller, Request, post
from litestar.params import JSONBody

from policies.base import HasPosterior
from policies.context import context_bucket
from policies.records import Arm, RequestContext
from proxy.control import reports as cdata
from proxy.control.deps import Deps
from proxy.control.errors import ERR
from proxy.control.schemas import ArmProbability, ContextIn, GuardVerdict, Recommendation, RecommendIn, ShadowTestIn, ShadowTestResult
from proxy.control.views import DAY, actor_of, context_of, params_out, write_audit
from proxy.decision import Explanation
from proxy.learning import load_rows


def guard_verdicts(deps: Deps, ex: Explanation, now: float) -> list[GuardVerdict]:
    """Each guard's part in the explained decision, in the order the decider applies them."""
    c = deps.config.constraints
    eff, b = ex.effective, ex.budget
    verdicts = [
        GuardVerdict(guard="trust_region", ok=True, verdict=f"{len(ex.allowed)} arm(s) allowed",
                     detail={"max_delta_temperature": c.max_delta_temperature, "max_delta_max_tokens": c.max_delta_max_tokens,
                             "model_max_tokens": ex.limits.max_tokens, "fixed_temperature": ex.limits.fixed_temperature}),
        GuardVerdict(guard="rollout", ok=eff.optimizing_allowed,
                     verdict=("optimising" if eff.optimizing_allowed else "not optimising") + f" ({eff.phase}, {eff.fraction:.0%} of keys)",
                     detail={"phase": eff.phase, "fraction": eff.fraction, "assigned": ex.assigned, "held_out": ex.held_out,
                             "rollback": msgspec.to_builtins(eff.rollback) if eff.rollback is not None else None}),
    ]
    if not b.guard_ok:
        budget_text = "budget store unavailable"
    elif b.action == "reject":
        budget_text = "would refuse the request (caws.on_exhausted = reject)"
    elif b.refused is not None:
        budget_text = f"would fall back to a cheaper arm or the baseline ({b.refused})"
    else:
        budget_text = "fits"
    verdicts.append(GuardVerdict(guard="budget", ok=b.guard_ok and b.action == "send" and b.refused is None, verdict=budget_text,
                                 detail={"reason": b.reason, "reservation": b.reservation.tokens if b.reservation is not None else None,
                                         "fill": cdata.finite(b.fill), "effective_limit": b.effective_limit, "waiver_zone": b.waiver_zone}))
    report = deps.slo.report(now)
    verdicts.append(GuardVerdict(guard="slo", ok=report.compliant, verdict="compliant" if report.compliant else "breached: " + ", ".join(report.breached),
                                 detail={"optimized_p99_ms": cdata.finite(report.optimized.p99_ms), "optimized_requests": report.optimized.requests}))
    return verdicts


TYPICAL_ROWS = 200
"""Recent decisions of the task read to find its clients' typical parameters."""


async def typical_context(deps: Deps, task_type: str, c: ContextIn) -> tuple[ContextIn, dict[str, Any], list[str]]:
    """The caller's context with the knobs it left out set to the task's typical client values (medians of recent rows).

    A context without temperature or max_tokens otherwise looks like a client that sends
    neither, which is rarely the traffic the caller asks about.
    """
    missing = [k for k in ("temperature", "max_tokens") if getattr(c, k) is None]
    if not missing:
        return c, {}, []
    now = time.time()
    rows, _ = await load_rows(deps.log_store, since=now - DAY, until=now + 1e-3, max_rows=TYPICAL_ROWS, task_type=task_type)
    assumed: dict[str, Any] = {}
    for key in missing:
        values = [getattr(r.baseline_params, key) for r in rows if getattr(r.baseline_params, key) is not None]
        if values:
            median = float(np.median(values))
            assumed[key] = round(median, 4) if key == "temperature" else int(round(median))
    if not rows:
        return c, {}, [f"no recent '{task_type}' traffic: the fields left out ({', '.join(missing)}) stay unset, as from a client that omits them"]
    notes = []
    if assumed:
        listed = ", ".join(f"{k}={v}" for k, v in assumed.items())
        notes.append(f"context is partial: used the typical client values of '{task_type}' ({listed}; medians of its last {len(rows)} requests)")
    rest = [k for k in missing if k not in assumed]
    if rest:
        notes.append(f"'{task_type}' clients do not send {', '.join(rest)}: left unset, as they do")
    return msgspec.structs.replace(c, **assumed), assumed, notes


def bucket_learned(deps: Deps, ctx: RequestContext, allowed: Sequence[Arm]) -> bool | None:
    """Whether the policy has any observation for the context's allowed arms (None when it has no posterior to ask)."""
    policy = deps.decider.policy
    if not isinstance(policy, HasPosterior):
        return None
    return any(policy.posterior(ctx, arm).n > 0 for arm in allowed)


class RecommendController(Controller):
    path = "/"

    @post("/recommend", status_code=200, summary="The decision the policy would make now for a context (no upstream call, no budget kept)",
          responses={404: ERR})
    async def recommend(self, deps: Deps, data: JSONBody[RecommendIn]) -> Recommendation:
        context, assumed, notes = await typical_context(deps, data.task_type, data.context)
        ctx, _ = context_of(deps, data.task_type, context)
        rid = f"recommend-{uuid.uuid4()}"
        # A private generator: the request path's sequence stays untouched.
        ex = await deps.decider.explain(ctx, request_id=rid, assignment_key=data.context.user, rng=np.random.default_rng())
        d = ex.decision
        policy = deps.decider.policy
        assert d.policy_choice is not None and d.policy_propensity is not None  # explain always records the policy's choice
        base = ex.reference.arm
        learned = bucket_learned(deps, ctx, ex.allowed)
        if learned is False:
            notes.append(f"bucket '{context_bucket(ctx)}' is still unlearned: no outcome has been observed for any allowed arm, "
                         "so the recommendation is the policy's prior, not evidence")
        return Recommendation(
            task_type=ctx.task_type, bucket=context_bucket(ctx), policy=policy.name, policy_version=policy.version,
            recommended=params_out(d.policy_choice), propensity=d.policy_propensity, would_send=params_out(d.sent), would_mode=d.mode,
            baseline=params_out(base),
            arms=[ArmProbability(temperature=a.temperature, max_tokens=a.max_tokens, probability=p, model=a.model) for a, p in zip(ex.allowed, ex.pmf)],
            guards=guard_verdicts(deps, ex, time.time()), assumed=assumed, learned=learned, notes=notes,
        )

    @post("/test-shadow", status_code=200, summary="Run one synthetic request through the decision path; nothing is sent or logged",
          responses={404: ERR})
    async def test_shadow(self, request: Request, deps: Deps, data: JSONBody[ShadowTestIn | None] = None) -> ShadowTestResult:
        body_in = data or ShadowTestIn()
        ctx, body = context_of(deps, body_in.task_type, body_in.context)
        rid = f"shadow-test-{uuid.uuid4()}"
        ex = await deps.decider.explain(ctx, request_id=rid, assignment_key=body_in.context.user or rid, rng=np.random.default_rng())
        decision = ex.decision
        out = copy.deepcopy(body)
        deps.patch_chat(out, decision.sent)
        await write_audit(deps, actor_of(request), "test_shadow", rid, None,
                          {"mode": decision.mode, "sent": msgspec.to_builtins(decision.sent)})
        return ShadowTestResult(
            request_id=rid, task_type=ctx.task_type, mode=decision.mode, policy=decision.policy, policy_version=decision.policy_version,
            policy_choice=params_out(decision.policy_choice) if decision.policy_choice is not None else None,
            policy_propensity=decision.policy_propensity, sent=params_out(decision.sent), baseline=params_out(decision.baseline),
            guard_notes=list(decision.guard_notes), body=out, logged=False,
        )
