"""Each compliance check tests the live thing it names, and `/recommend` and `/test-shadow` ask the decider itself."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import msgspec
import numpy as np

from guards.trust_region import ModelLimits
from policies.context import build_context
from proxy.config import AdminSettings
from proxy.control import AdminAuth
from proxy.control.compliance import admin_auth_check, trust_region_check
from proxy.runtime import Runtime
from proxy.store import DecisionRow
from tests.conftest import make_config
from tests.control.conftest import API, TOKEN, api
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

NO_FAILURES = {"missing": 0, "malformed": 0, "wrong": 0, "not_loopback": 0, "origin": 0, "content_type": 0}


def checks_of(t: RunningThermostat) -> dict[str, dict]:
    body = api(t, "GET", "/compliance-status").json()
    return {c["name"]: c for c in body["checks"]} | {"": body}


def test_audit_log_check_writes_and_reads_back(own_ctl: RunningThermostat) -> None:
    checks = checks_of(own_ctl)
    assert checks["audit_log"]["ok"] is True and "read back" in checks["audit_log"]["detail"]
    entry = own_ctl.call(own_ctl.runtime.sink.fetch_audit(limit=1))[0]
    assert entry.action == "compliance_check" and entry.actor == f"token:{AdminAuth('T', environ={'T': TOKEN}).token_id}"
    assert api(own_ctl, "GET", "/security-status").json()["audit_entries"] == 1


def test_audit_log_check_fails_when_the_store_cannot_keep_audit_rows(own_ctl: RunningThermostat) -> None:
    own_ctl.call(own_ctl.runtime.sink.query("DROP TABLE audit_log"))
    checks = checks_of(own_ctl)
    assert checks["audit_log"]["ok"] is False and "round trip failed" in checks["audit_log"]["detail"]
    assert checks[""]["compliant"] is False
    assert api(own_ctl, "GET", "/security-status").json()["audit_entries"] is None


def test_admin_auth_check_probes_the_live_guard() -> None:
    token = AdminAuth("T", environ={"T": "s3cret-token"})
    ok = admin_auth_check(token, AdminSettings(token_env="T"))
    assert ok.ok and "refused" in ok.detail and token.stats() == NO_FAILURES  # the probes are not counted as attacks
    unset = AdminAuth("T", environ={})
    missing = admin_auth_check(unset, AdminSettings(token_env="T"))
    assert not missing.ok and "allow_unauthenticated is not set" in missing.detail
    opted = admin_auth_check(unset, AdminSettings(token_env="T", allow_unauthenticated=True))
    assert opted.ok and "loopback" in opted.detail and unset.stats() == NO_FAILURES


def test_admin_auth_check_fails_when_the_guard_lets_a_call_through() -> None:
    class Broken(AdminAuth):
        def check(self, headers: object, client_host: str | None) -> str:  # type: ignore[override]
            return "anyone"

    assert not admin_auth_check(Broken("T", environ={"T": "x"}), AdminSettings(token_env="T")).ok
    assert not admin_auth_check(Broken("T", environ={}), AdminSettings(token_env="T", allow_unauthenticated=True)).ok


def test_open_server_reports_what_no_token_implies(upstream: FakeUpstream, tmp_path: Path) -> None:
    t = start_thermostat(make_config(upstream.url, tmp_path))  # allow_unauthenticated = true, no token
    try:
        body = httpx.get(f"{t.base}{API}/compliance-status", timeout=10).json()
        check = next(c for c in body["checks"] if c["name"] == "admin_auth")
        assert check["ok"] is True and "allow_unauthenticated = true" in check["detail"] and "loopback" in check["detail"]
    finally:
        t.stop()


def _row(sent: dict, base: dict) -> DecisionRow:
    doc = {
        "request_id": "r", "timestamp": 0.0, "task_type": "code", "model_name": "m", "upstream": "u", "context_fingerprint": 0,
        "context_features": {}, "chosen_params": sent, "baseline_params": base, "policy_params": None, "log_propensity": 0.0,
        "policy_log_propensity": None, "arm_index": None, "policy": "p", "policy_version": "v", "mode": "optimized",
        "guard_notes": [], "status": 200, "error_class": None, "latency_s": 0.1, "ttft_s": None, "prompt_tokens": None,
        "completion_tokens": None, "finish_reason": None, "quality": None, "reward": None, "outcome": {},
    }
    return msgspec.convert(doc, DecisionRow)


def test_trust_region_check_uses_the_guards_relative_band(tmp_path: Path) -> None:
    """300 -> 500 max_tokens is inside the absolute ±500 band but outside the relative one (50 % of 300)."""
    c = make_config("http://127.0.0.1:9/v1", tmp_path).constraints
    base = {"temperature": 0.7, "max_tokens": 300}

    def limits(upstream: str, model: str) -> ModelLimits:
        return ModelLimits()

    inside = trust_region_check([_row({"temperature": 0.8, "max_tokens": 400}, base), _row(base, base)], c, limits, False)
    assert inside.ok and inside.detail.startswith("0 of 2")
    outside = trust_region_check([_row({"temperature": 0.7, "max_tokens": 500}, base)], c, limits, False)
    assert not outside.ok and outside.detail.startswith("1 of 1")


def test_test_shadow_leaves_the_request_paths_random_sequence_alone(own_ctl: RunningThermostat) -> None:
    rng = own_ctl.runtime.bandit.rng
    before = rng.bit_generator.state
    r = api(own_ctl, "POST", "/test-shadow", json={"task_type": "code", "context": {"model": "echo-1", "temperature": 0.7, "max_tokens": 300}})
    assert r.status_code == 200 and r.json()["mode"] == "optimized"
    assert rng.bit_generator.state == before


def test_explain_is_what_decide_does(upstream: FakeUpstream, tmp_path: Path) -> None:
    """Same context, same draw: `explain` (behind /recommend and /test-shadow) and `decide` agree."""
    cfg = make_config(upstream.url, tmp_path, optimization={"mode": "general", "seed": 7, "holdout_fraction": 0.0})
    rt = Runtime(cfg)
    body = {"model": "echo-1", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7, "max_tokens": 300}
    ctx = build_context(body, task_type="code", endpoint="chat", upstream="fake")

    async def both() -> tuple[object, object]:
        for seed in range(20):
            rt.bandit.rng = np.random.default_rng(seed)
            decided = await rt.bandit.decide(ctx, request_id="a", assignment_key="k")
            reservation = rt.bandit.reservations.pop("a", None)
            if reservation is not None:
                await rt.budget.release(reservation, time.time())
            ex = await rt.bandit.explain(ctx, request_id="a", assignment_key="k", rng=np.random.default_rng(seed))
            explained = ex.decision
            fields = ("sent", "baseline", "propensity", "mode", "policy_choice", "policy_propensity", "arm_index", "guard_notes")
            assert {f: getattr(explained, f) for f in fields} == {f: getattr(decided, f) for f in fields}, seed
            assert explained.budget_reserved == 0 and ex.pmf[ex.allowed.index(ex.decision.policy_choice.arm())] == explained.policy_propensity
        return (await rt.budget.status(time.time())).reserved, 0

    reserved, zero = asyncio.run(both())
    assert reserved == zero  # explain released its reservation
