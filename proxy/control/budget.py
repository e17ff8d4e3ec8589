"""The CAWS token budget and its waivers."""

from __future__ import annotations

import math
import time

from litestar import Controller, Request, delete, get, post
from litestar.params import FromPath, JSONBody

from proxy.common import ProxyError
from proxy.control.deps import Deps
from proxy.control.errors import ERR
from proxy.control.schemas import CawsStatus, WaiverIn, WaiverList, WaiverOut
from proxy.control.views import actor_of, caws_status, waiver_out, write_audit


class BudgetController(Controller):
    path = "/"

    @get("/caws-status", summary="Token budget of the current window, waivers, reset time", responses={503: ERR})
    async def caws(self, deps: Deps) -> CawsStatus:
        try:
            return await caws_status(deps, time.time())
        except Exception as exc:
            raise ProxyError(503, f"the budget store is unavailable: {type(exc).__name__}", "budget_store_unavailable", "service_unavailable") from None

    @get("/waivers", summary="All CAWS waivers (any status), newest first")
    async def list_waivers(self, deps: Deps) -> WaiverList:
        now = time.time()
        return WaiverList(waivers=[waiver_out(w, now) for w in await deps.budget.list_waivers()])

    @post("/waivers", status_code=201, summary="Create a CAWS waiver (extra tokens for a task type until it expires)", responses={422: ERR})
    async def create_waiver(self, request: Request, deps: Deps, data: JSONBody[WaiverIn]) -> WaiverOut:
        now = time.time()
        if (data.expires_at is None) == (data.duration_s is None):
            raise ProxyError(422, "give exactly one of 'expires_at' (unix seconds) or 'duration_s'", "invalid_value", param="expires_at")
        expires = data.expires_at if data.expires_at is not None else now + float(data.duration_s or 0)
        if not math.isfinite(expires) or expires <= now:
            raise ProxyError(422, "'expires_at' must be in the future", "invalid_value", param="expires_at")
        try:
            waiver = await deps.budget.create_waiver(task_type=data.task_type, extra_tokens=data.extra_tokens, reason=data.reason,
                                                     approver=data.approver, expires_at=expires, now=now)
        except ValueError as exc:
            raise ProxyError(422, str(exc), "invalid_value") from None
        await write_audit(deps, actor_of(request), "create_waiver", waiver.id, None, waiver)
        return waiver_out(waiver, now)

    @delete("/waivers/{waiver_id:str}", status_code=200, summary="Revoke a waiver", responses={404: ERR})
    async def revoke_waiver(self, request: Request, deps: Deps, waiver_id: FromPath[str]) -> WaiverOut:
        now = time.time()
        actor = actor_of(request)
        before = next((w for w in await deps.budget.list_waivers() if w.id == waiver_id), None)
        if before is None:
            raise ProxyError(404, f"no waiver '{waiver_id}'", "waiver_not_found", "not_found_error", "waiver_id")
        revoked = await deps.budget.revoke_waiver(waiver_id, now=now, by=actor)
        if revoked is None:
            raise ProxyError(404, f"no waiver '{waiver_id}'", "waiver_not_found", "not_found_error", "waiver_id")
        await write_audit(deps, actor, "revoke_waiver", waiver_id, before, revoked)
        return waiver_out(revoked, now)
