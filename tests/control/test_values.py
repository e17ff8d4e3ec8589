"""Shapes and values of the control API against the scenario driven through the proxy."""

from __future__ import annotations

import hashlib
import math
import time

import httpx
import numpy as np

from policies.arms import arm_key
from policies.context import context_bucket
from policies.records import Arm, Params
from policies.thompson import stat_key
from proxy.decision import context_from_features
from tests.control.conftest import SCENARIO_LATENCY_SLO_MS, TOKEN, api, assert_error_shape
from tests.support.servers import RunningThermostat

Z = 1.959963984540054


def rows(t: RunningThermostat, **kw: object) -> list:
    return t.call(t.runtime.sink.fetch_decisions(limit=10_000, **kw))


def test_status(ctl: RunningThermostat) -> None:
    body = api(ctl, "GET", "/status").json()
    rt = ctl.runtime
    assert body["enabled"] is True and body["mode"] == "general" and body["phase"] == "general"
    assert body["traffic_percentage"] == 1.0 and body["policy"] == "thompson_gaussian"
    assert body["policy_version"] == rt.policy.version
    assert body["rollback"] == {"active": False, "trigger": None, "reason": None, "since": None, "resumes_at": None, "resume_phase": None}


def test_metrics_per_arm_match_log(ctl: RunningThermostat) -> None:
    body = api(ctl, "GET", "/metrics", params={"window_s": 3600}).json()
    log = rows(ctl)
    assert body["rows"] == len(log) == 60 and body["truncated"] is False
    assert sum(a["requests"] for a in body["arms"]) == 60
    for arm in body["arms"]:
        group = [r for r in log if r.task_type == arm["task_type"] and (r.chosen_params.render() or "client") == arm["arm"]]
        assert len(group) == arm["requests"]
        rewards = np.array([r.reward for r in group])
        assert math.isclose(arm["reward"]["mean"], rewards.mean(), rel_tol=1e-12)
        if len(group) > 1:
            half = Z * rewards.std(ddof=1) / math.sqrt(len(group))
            assert math.isclose(arm["reward"]["ci_low"], rewards.mean() - half, rel_tol=1e-9, abs_tol=1e-12)
        lat = np.array([r.latency_s for r in group])
        assert math.isclose(arm["latency_p99_s"], float(np.quantile(lat, 0.99)), rel_tol=1e-12)
        assert math.isclose(arm["completion_tokens_mean"], float(np.mean([r.completion_tokens for r in group])), rel_tol=1e-12)
        assert arm["traffic"] == "optimized"


def test_performance_per_task(ctl: RunningThermostat) -> None:
    body = api(ctl, "GET", "/performance").json()
    tasks = {t["task_type"]: t for t in body["tasks"]}
    assert set(tasks) == {"code", "chat"}
    for name, task in tasks.items():
        group = [r for r in rows(ctl, task_type=name)]
        assert task["optimized"]["requests"] == len(group) and task["baseline"] is None and task["improvement"] is None
        assert math.isclose(task["optimized"]["reward"]["mean"], float(np.mean([r.reward for r in group])), rel_tol=1e-12)
        assert math.isclose(task["optimized"]["quality_mean"], float(np.mean([r.quality for r in group])), rel_tol=1e-12)


def test_slo_status_matches_numpy(ctl: RunningThermostat) -> None:
    body = api(ctl, "GET", "/slo-status").json()
    assert set(body) >= {"compliant", "window_s", "slos"}
    entries = {(s["name"], s["traffic"]): s for s in body["slos"]}
    lat_ms = np.array([r.latency_s * 1000 for r in rows(ctl)])
    p99 = entries[("latency_p99_ms", "optimized")]
    assert p99["samples"] == 60 and p99["threshold"] == SCENARIO_LATENCY_SLO_MS
    assert math.isclose(p99["value"], float(np.quantile(lat_ms, 0.99)), rel_tol=1e-9)
    q = entries[("quality_min", "optimized")]
    assert math.isclose(q["value"], float(np.mean([r.quality for r in rows(ctl)])), rel_tol=1e-9)
    assert entries[("error_rate_max", "optimized")]["value"] == 0.0
    assert entries[("latency_p99_ms", "baseline")]["samples"] == 0


def test_logs_pagination_and_filters(ctl: RunningThermostat) -> None:
    page = api(ctl, "GET", "/logs", params={"limit": 7, "offset": 3, "task_type": "code"}).json()
    log = rows(ctl, task_type="code")
    assert page["total"] == 40 and [d["request_id"] for d in page["items"]] == [r.request_id for r in log[3:10]]
    first = page["items"][0]
    assert math.isclose(first["propensity"], math.exp(log[3].log_propensity))
    assert api(ctl, "GET", "/logs", params={"mode": "shadow"}).json()["total"] == 0
    assert_error_shape(api(ctl, "GET", "/logs", params={"limit": 0}), 400)
    assert_error_shape(api(ctl, "GET", "/logs", params={"limit": "x"}), 400)


def test_caws_status_counts_all_tokens(ctl: RunningThermostat) -> None:
    body = api(ctl, "GET", "/caws-status").json()
    used = sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in rows(ctl))
    assert body["used"] == used and body["reserved"] == 0 and body["budget_limit"] == 1_000_000
    assert math.isclose(body["fill"], used / 1_000_000)
    assert body["resets_at"] - body["window_start"] == 86400


def test_parameter_evolution_and_convergence(ctl: RunningThermostat) -> None:
    body = api(ctl, "GET", "/parameter-evolution", params={"window_s": 3600, "bins": 1}).json()
    code = next(t for t in body["tasks"] if t["task_type"] == "code")
    log = rows(ctl, task_type="code")
    assert code["series"][0]["decisions"] == 40
    assert math.isclose(code["series"][0]["policy_temperature"], float(np.mean([r.policy_params.temperature for r in log])), rel_tol=1e-12)
    assert math.isclose(code["series"][0]["sent_max_tokens"], float(np.mean([r.chosen_params.max_tokens for r in log])), rel_tol=1e-12)
    conv = api(ctl, "GET", "/convergence", params={"window_s": 3600, "bins": 1}).json()
    task = next(t for t in conv["tasks"] if t["task_type"] == "code")
    assert math.isclose(task["series"][0]["mean_choice_probability"], float(np.mean([math.exp(r.policy_log_propensity) for r in log])), rel_tol=1e-12)
    probs = [a["probability"] for a in task["current"]]
    assert math.isclose(sum(probs), 1.0, abs_tol=1e-9) and task["best_arm_probability"] == max(probs)


def test_ope_ips_by_hand(ctl: RunningThermostat) -> None:
    body = api(ctl, "GET", "/ope", params={"n_bootstrap": 50}).json()
    rt = ctl.runtime
    log = rows(ctl, mode="optimized")
    r, mu, pi, pb = [], [], [], []
    for row in log:
        ctx = context_from_features(row.context_features)
        ref, allowed, _ = rt.bandit.candidates(ctx)  # what the decider plays from now (the lower caps shown safe)
        base = ref.arm
        probs = rt.bandit.pmf(ctx, base, allowed)
        sent = row.chosen_params.arm(row.baseline_params)  # a knob the client omitted stays omitted: the baseline names it
        idx = [arm_key(a) for a in allowed].index(arm_key(sent))
        r.append(row.reward)
        mu.append(math.exp(row.log_propensity))
        pi.append(probs[idx])
        pb.append(1.0 if arm_key(sent) == arm_key(base) else 0.0)
    r, mu, pi, pb = map(np.array, (r, mu, pi, pb))
    assert body["rows"] == 60 and body["skipped"] == 0 and "propensities" in body["method_detail"] and body["method"].startswith("self-normalised importance sampling (SNIPS)")
    assert math.isclose(body["target"]["ips"]["value"], float(np.mean(pi / mu * r)), rel_tol=1e-9)
    assert math.isclose(body["target"]["snips"]["value"], float(np.sum(pi / mu * r) / np.sum(pi / mu)), rel_tol=1e-9)
    assert math.isclose(body["baseline"]["ips"]["value"], float(np.mean(pb / mu * r)), rel_tol=1e-9)
    assert body["target"]["dr"] is not None
    imp = {i["estimator"]: i for i in body["improvement"]}
    assert math.isclose(imp["ips"]["difference"], float(np.mean(pi / mu * r) - np.mean(pb / mu * r)), rel_tol=1e-9, abs_tol=1e-12)
    assert body["target"]["ips"]["ci_low"] <= body["target"]["ips"]["value"] <= body["target"]["ips"]["ci_high"]


def test_recommend_and_test_shadow(own_ctl: RunningThermostat, upstream) -> None:
    n_before = len(upstream.received)
    rt = own_ctl.runtime
    body = api(own_ctl, "POST", "/recommend", json={"task_type": "code", "context": {"model": "echo-1", "temperature": 0.7, "max_tokens": 300}}).json()
    assert body["baseline"] == {"temperature": 0.7, "max_tokens": 300}
    assert math.isclose(sum(a["probability"] for a in body["arms"]), 1.0, abs_tol=1e-9)
    chosen = next(a for a in body["arms"] if (a["temperature"], a["max_tokens"]) == (body["recommended"]["temperature"], body["recommended"]["max_tokens"]))
    assert body["propensity"] == chosen["probability"]
    assert abs(body["recommended"]["temperature"] - 0.7) <= 0.2 + 1e-9 and abs(body["recommended"]["max_tokens"] - 300) <= 500
    assert {g["guard"] for g in body["guards"]} == {"trust_region", "rollout", "budget", "slo"}
    reserved_before = own_ctl.call(rt.budget.status(time.time())).reserved
    shadow = api(own_ctl, "POST", "/test-shadow", json={"task_type": "code", "context": {"model": "echo-1", "temperature": 0.7, "max_tokens": 300}}).json()
    assert shadow["logged"] is False and shadow["mode"] == "optimized"
    assert shadow["body"]["temperature"] == shadow["sent"]["temperature"] and shadow["body"]["max_tokens"] == shadow["sent"]["max_tokens"]
    assert len(upstream.received) == n_before  # no upstream call
    assert own_ctl.call(rt.budget.status(time.time())).reserved == reserved_before  # reservation released
    own_ctl.flush()
    assert own_ctl.call(rt.sink.get_decision(shadow["request_id"])) is None
    assert_error_shape(api(own_ctl, "POST", "/recommend", json={"context": {"model": "echo-1", "temperature": 5}}), 400)


def test_record_outcome_flow(own_ctl: RunningThermostat) -> None:
    rid = own_ctl.ids["code"][0]  # type: ignore[attr-defined]
    row = own_ctl.call(own_ctl.runtime.sink.get_decision(rid))
    rt = own_ctl.runtime
    ctx = context_from_features(row.context_features)
    key = stat_key(context_bucket(ctx), Arm(temperature=row.chosen_params.temperature, max_tokens=row.chosen_params.max_tokens))
    n0, s0, _ = rt.policy.snapshot()[key]
    r = api(own_ctl, "POST", "/record-outcome", json={"request_id": rid, "outcome": {"quality": 0.25, "comment": "meh"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["found_in"] == "registry" and body["automatic_quality"] == row.quality and body["previous_reward"] == row.reward
    # same latency and tokens, same normalisers: only the quality term changes (w_quality = 1).
    assert math.isclose(body["reward"], row.reward - (row.quality - 0.25), rel_tol=1e-9)
    # the automatic reward's contribution is replaced, not added to: n stays, Σr moves by new - old.
    assert body["policy_updated"] is True and "correct()" in body["policy_update"]
    n1, s1, _ = rt.policy.snapshot()[key]
    assert n1 == n0 and math.isclose(s1 - s0, body["reward"] - row.reward, rel_tol=1e-9, abs_tol=1e-12)
    err = assert_error_shape(api(own_ctl, "POST", "/record-outcome", json={"request_id": rid, "outcome": {"quality": 0.5}}), 409)
    assert err["code"] == "feedback_exists"
    r = api(own_ctl, "POST", "/record-outcome", json={"request_id": rid, "outcome": {"quality": 0.5}, "overwrite": True})
    assert r.status_code == 200 and r.json()["overwritten"] is True and r.json()["previous_quality"] == 0.25
    own_ctl.flush()
    stored = own_ctl.call(own_ctl.runtime.sink.get_decision(rid))
    assert stored.feedback_quality == 0.5 and stored.quality == row.quality  # the automatic score is kept beside it
    assert_error_shape(api(own_ctl, "POST", "/record-outcome", json={"request_id": "no-such-id", "outcome": {"quality": 0.5}}), 404)
    assert_error_shape(api(own_ctl, "POST", "/record-outcome", json={"request_id": rid, "outcome": {"quality": 1.5}}), 400)
    # an id only in the log (not in the registry): found through get_decision
    other = own_ctl.ids["chat"][0]  # type: ignore[attr-defined]
    own_ctl.runtime.registry._items.pop(other)
    r = api(own_ctl, "POST", "/record-outcome", json={"request_id": other, "outcome": {"quality": 0.9}})
    assert r.status_code == 200 and r.json()["found_in"] == "log"
    assert_error_shape(api(own_ctl, "POST", "/record-outcome", json={"request_id": other, "outcome": {"quality": 0.9}}), 409)


def test_rollback_resume_and_audit(own_ctl: RunningThermostat, upstream) -> None:
    r = api(own_ctl, "POST", "/rollback", json={"reason": "investigating"})
    assert r.status_code == 200 and r.json()["changed"] is True
    st = api(own_ctl, "GET", "/rollback-status").json()
    assert st["active"] is True and st["trigger"] == "manual" and st["reason"] == "investigating" and st["resumes_at"] is None
    resp = httpx.post(f"{own_ctl.url}/chat/completions", json={"model": "echo-1", "messages": [{"role": "user", "content": "x"}], "temperature": 0.7, "max_tokens": 300},
                      headers={"x-task-type": "code"})
    assert resp.headers["x-thermostat-mode"] == "rollback" and upstream.last().body["temperature"] == 0.7
    again = api(own_ctl, "POST", "/rollback", json={}).json()
    assert again["changed"] is False
    assert api(own_ctl, "POST", "/resume", json={}).json()["changed"] is True
    assert api(own_ctl, "GET", "/rollback-status").json()["active"] is False
    metrics = httpx.get(f"{own_ctl.base}/metrics").text
    assert 'thermostat_rollbacks_total{trigger="manual"} 1.0' in metrics
    audit = api(own_ctl, "GET", "/audit-logs", params={"limit": 100}).json()["items"]
    actions = [a["action"] for a in audit]
    assert "rollback" in actions and "resume" in actions
    who = "token:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:8]
    entry = next(a for a in reversed(audit) if a["action"] == "rollback")  # the first (oldest) one changed the state
    assert entry["actor"] == who and entry["before"]["rollback"]["active"] is False and entry["after"]["rollback"]["active"] is True
    assert all(TOKEN not in str(a) for a in audit)
    events = api(own_ctl, "GET", "/rollout-status").json()["events"]
    assert events[0]["kind"] == "resume" and events[1]["kind"] == "rollback" and events[1]["actor"] == who


def test_waivers(own_ctl: RunningThermostat) -> None:
    before = api(own_ctl, "GET", "/caws-status").json()
    r = api(own_ctl, "POST", "/waivers", json={"task_type": "code", "extra_tokens": 5000, "reason": "launch", "approver": "alice", "duration_s": 3600})
    assert r.status_code == 201, r.text
    w = r.json()
    assert w["status"] == "active" and w["id"].startswith("WV-")
    after = api(own_ctl, "GET", "/caws-status").json()
    assert after["effective_limit"] == before["effective_limit"] + 5000 and [x["id"] for x in after["active_waivers"]] == [w["id"]]
    assert w["id"] in [x["id"] for x in api(own_ctl, "GET", "/waivers").json()["waivers"]]
    d = api(own_ctl, "DELETE", f"/waivers/{w['id']}")
    assert d.status_code == 200 and d.json()["status"] == "revoked"
    assert api(own_ctl, "GET", "/caws-status").json()["effective_limit"] == before["effective_limit"]
    assert_error_shape(api(own_ctl, "DELETE", "/waivers/WV-9999"), 404)
    assert_error_shape(api(own_ctl, "POST", "/waivers", json={"task_type": "code", "extra_tokens": 1, "reason": "r", "approver": "a", "expires_at": 1.0}), 422)
    assert_error_shape(api(own_ctl, "POST", "/waivers", json={"task_type": "code", "extra_tokens": 1, "reason": "r", "approver": "a"}), 422)
    assert_error_shape(api(own_ctl, "POST", "/waivers", json={"task_type": "code", "extra_tokens": -1, "reason": "r", "approver": "a", "duration_s": 5}), 400)


def test_other_status_pages(own_ctl: RunningThermostat) -> None:
    db = api(own_ctl, "GET", "/db-status").json()
    assert db["kind"] == "sqlite" and db["connected"] and db["decisions_total"] == own_ctl.call(own_ctl.runtime.sink.count_decisions())
    comp = api(own_ctl, "GET", "/compliance-status").json()
    checks = {c["name"]: c for c in comp["checks"]}
    assert checks["trust_region"]["ok"] and checks["audit_log"]["ok"]
    base = api(own_ctl, "GET", "/baseline-parameters").json()
    assert base["parameters"] == [{"task_type": "default", "temperature": None, "max_tokens": None, "source": "built-in"}]
    ro = api(own_ctl, "GET", "/rollout-status").json()
    assert ro["phase"] == "general" and ro["next_phase"] is None and ro["blockers"] == ["general is the final phase"]
    dash = api(own_ctl, "GET", "/dashboard", params={"window_s": 600, "bins": 10}).json()
    assert len(dash["reward_series"]) == 10 and sum(p["optimized_n"] for p in dash["reward_series"]) >= 60
    assert dash["budget"]["used"] > 0 and dash["slo_latency_p99_ms"] == SCENARIO_LATENCY_SLO_MS


def test_unused_params_helper() -> None:
    assert Params(temperature=0.5, max_tokens=10).render() == "temperature=0.5; max_tokens=10"
