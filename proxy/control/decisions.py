"""The logs: decisions (paginated, filterable) and control-plane audit entries, newest first."""

from __future__ import annotations

from litestar import Controller, get

from proxy.control.deps import Deps
from proxy.control.schemas import AuditOut, AuditPage, DecisionPage
from proxy.control.views import Limit, Offset, TextFilter, UnixTime, decision_out


class DecisionsController(Controller):
    path = "/"

    @get("/logs", summary="Recent logged decisions, newest first, paginated and filterable")
    async def logs(self, deps: Deps, limit: Limit = 50, offset: Offset = 0, task_type: TextFilter = None,
                   mode: TextFilter = None, since: UnixTime = None,
                   until: UnixTime = None) -> DecisionPage:
        store = deps.log_store
        rows = await store.fetch_decisions(since=since, until=until, task_type=task_type, mode=mode, limit=limit, offset=offset)
        total = await store.count_decisions(since=since, until=until, task_type=task_type, mode=mode)
        return DecisionPage(total=total, limit=limit, offset=offset, items=[decision_out(r) for r in rows])

    @get("/audit-logs", summary="Control-plane actions, newest first")
    async def audit_logs(self, deps: Deps, limit: Limit = 100, offset: Offset = 0) -> AuditPage:
        items = await deps.log_store.fetch_audit(limit=limit, offset=offset)
        return AuditPage(limit=limit, offset=offset, items=[AuditOut(id=a.id, at=a.at, actor=a.actor, action=a.action, target=a.target,
                                                                    before=a.before, after=a.after) for a in items])
