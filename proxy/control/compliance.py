"""Security and CAWS compliance: each check tests the live thing it names, never a configuration flag alone.

- `trust_region`: every logged optimised decision re-checked with the guard's own `within`;
- `budget`, `slo`: the live budget store and SLO monitor;
- `audit_log`: an audit entry written to the log store and read back by id;
- `admin_auth`: the live admin guard made to refuse a request it must refuse.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import msgspec
from litestar import Controller, Request, get

from guards.settings import ConstraintsSettings
from guards.trust_region import ModelLimits, within
from proxy.config import AdminSettings
from proxy.control.auth import AdminAuth
from proxy.control.deps import Deps
from proxy.control.schemas import ComplianceCheck, ComplianceStatus, SecurityStatus
from proxy.control.views import DAY, MaxRows, WindowS, actor_of, window
from proxy.learning import load_rows
from proxy.store import AuditRecord, DecisionRow, LogStore

ModelLimitsFor = Callable[[str, str], ModelLimits]
StandInsFor = Callable[[str, str], tuple[tuple[str, str], ...]]


def trust_region_check(rows: list[DecisionRow], constraints: ConstraintsSettings,
                       limits_for: ModelLimitsFor, truncated: bool, stand_ins_for: StandInsFor | None = None) -> ComplianceCheck:
    """Sent arms re-checked against the baseline with `guards.trust_region.within` (the test `enforce` applies).

    Sending the baseline itself is always allowed, whatever the model's limits say of it. A stand-in
    sent (`chosen_params.model`) must be one declared for the requested model (`stand_ins_for`), and
    its arm is checked within that stand-in's own limits; an undeclared one counts as outside.
    """
    outside = 0
    for r in rows:
        base = r.baseline_params.arm()
        sent = r.chosen_params.arm(r.baseline_params)
        upstream, model = r.upstream, r.model_name
        if sent.model is not None:
            served = next((u for m, u in (stand_ins_for(r.upstream, r.model_name) if stand_ins_for else ()) if m == sent.model), None)
            if served is None:
                outside += 1
                continue
            upstream, model, sent = served, sent.model, msgspec.structs.replace(sent, model=None)
        if sent != base and not within(sent, base, constraints, limits_for(upstream, model)):
            outside += 1
    return ComplianceCheck(name="trust_region", ok=outside == 0,
                           detail=f"{outside} of {len(rows)} optimized decisions outside ±{constraints.max_delta_temperature:g} temperature / "
                                  f"±{constraints.max_delta_max_tokens} max_tokens or the model's limits" + (" (newest rows only)" if truncated else ""))


async def audit_log_check(store: LogStore, actor: str) -> ComplianceCheck:
    """Writes one audit entry (this check, by its caller) and reads it back by id from the log store."""
    record = AuditRecord(at=time.time(), actor=actor, action="compliance_check", target="audit_log")
    try:
        await store.append_audit(record)
        back = await store.get_audit(record.id)
    except Exception as exc:
        return ComplianceCheck(name="audit_log", ok=False, detail=f"log store {store.name}: audit round trip failed ({type(exc).__name__})")
    if back is None or (back.actor, back.action) != (record.actor, record.action):
        return ComplianceCheck(name="audit_log", ok=False, detail=f"log store {store.name}: an audit entry written was not read back")
    return ComplianceCheck(name="audit_log", ok=True, detail=f"log store {store.name}: audit entry {record.id} written and read back")


def admin_auth_check(auth: AdminAuth, admin: AdminSettings) -> ComplianceCheck:
    """The live guard must refuse what its mode promises to refuse."""
    if auth.configured:
        refused = (auth.refuses({"host": "localhost"}, "127.0.0.1")
                   and auth.refuses({"host": "localhost", "authorization": f"Bearer {secrets.token_urlsafe(24)}"}, "127.0.0.1"))
        return ComplianceCheck(name="admin_auth", ok=refused,
                               detail=f"bearer token from ${auth.token_env} (id {auth.token_id}): "
                                      + ("calls without it or with another token are refused" if refused else "a call without the token was let through"))
    if not admin.allow_unauthenticated:
        return ComplianceCheck(name="admin_auth", ok=False,
                               detail=f"no admin token in ${auth.token_env} and [admin] allow_unauthenticated is not set")
    refused = auth.refuses({"host": "localhost"}, "192.0.2.1") and auth.refuses({"host": "rebound.example"}, "127.0.0.1")
    return ComplianceCheck(name="admin_auth", ok=refused,
                           detail="no token ([admin] allow_unauthenticated = true): "
                                  + ("only loopback clients addressing this host are served, and every process on this host is admin"
                                     if refused else "a non-loopback call was let through"))



class ComplianceController(Controller):
    path = "/"

    @get("/security-status", summary="Admin auth configuration and refused calls since start")
    async def security_status(self, deps: Deps) -> SecurityStatus:
        auth = deps.auth
        try:
            audit_entries: int | None = await deps.log_store.count_audit()
        except Exception:  # the store is down: the page still shows the auth state
            audit_entries = None
        return SecurityStatus(
            auth_required=auth.configured, token_env=auth.token_env, token_configured=auth.configured, token_id=auth.token_id,
            loopback_only=not auth.configured, auth_failures=auth.stats(), audit_entries=audit_entries,
            prompts_stored=deps.config.server.store_prompts, upstream_keys_from_env=sum(1 for u in deps.config.upstreams if u.api_key_env),
        )

    @get("/compliance-status", summary="CAWS compliance: trust region held, budget, SLO, audit, auth")
    async def compliance_status(self, request: Request, deps: Deps, window_s: WindowS = DAY,
                                max_rows: MaxRows = 20_000) -> ComplianceStatus:
        now, since, until = window(window_s)
        cfg = deps.config
        c = cfg.constraints
        rows, truncated = await load_rows(deps.log_store, since=since, until=until, max_rows=max_rows, mode="optimized")
        checks = [trust_region_check(rows, c, deps.decider.limits_for, truncated, deps.decider.arms.stand_ins_for)]
        checks.append(ComplianceCheck(name="caws_enabled", ok=cfg.caws.enabled or not c.require_caws,
                                      detail=f"caws.enabled={cfg.caws.enabled}, constraints.require_caws={c.require_caws}"))
        try:
            b = await deps.budget.status(now)
            checks.append(ComplianceCheck(name="budget", ok=b.used <= b.effective_limit and b.overruns == 0,
                                          detail=f"used {b.used} + reserved {b.reserved} of {b.effective_limit}; overruns {b.overruns}"))
        except Exception as exc:
            checks.append(ComplianceCheck(name="budget", ok=False, detail=f"budget store unavailable: {type(exc).__name__}"))
        slo_report = deps.slo.report(now)
        checks.append(ComplianceCheck(name="slo", ok=slo_report.compliant, detail="breached: " + (", ".join(slo_report.breached) or "none")))
        checks.append(await audit_log_check(deps.log_store, actor_of(request)))
        checks.append(admin_auth_check(deps.auth, cfg.admin))
        return ComplianceStatus(compliant=all(ch.ok for ch in checks), checks=checks)
