"""The control API answers as a person reads: named methods, stated assumptions, errors that name the problem."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from policies import ope, sequences
from proxy.control import reports
from tests.conftest import make_config
from tests.control.conftest import API, AUTH, TOKEN, TOKEN_ENV, api, assert_error_shape, drive
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

JSON = {**AUTH, "content-type": "application/json"}


@pytest.fixture(scope="module")
def held(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    """40 "code" requests at the client's temperature 0.7 / max_tokens 300 and 20 "chat", a third of the keys held out."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, TOKEN)
        cfg = make_config(upstream.url, tmp_path_factory.mktemp("readable"), optimization={"mode": "general", "seed": 5, "holdout_fraction": 0.3},
                          admin={"token_env": TOKEN_ENV},
                          # A loaded machine must not trip the latency SLO: its rollback would serve the rest (all of
                          # "chat") as the client sent it outside the holdout, and the reports here read the holdout.
                          slo={"min_samples": 5, "check_interval_s": 0, "latency_p99_ms": 60_000})
        t = start_thermostat(cfg)
        try:
            t.ids = {"code": drive(t, 40, "code", temperature=0.7, max_tokens=300), "chat": drive(t, 20, "chat")}  # type: ignore[attr-defined]
            t.flush()
            yield t
        finally:
            t.stop()


def test_recommend_without_a_body_is_a_clear_400(held: RunningThermostat) -> None:
    err = assert_error_shape(httpx.post(f"{held.base}{API}/recommend", headers=JSON, timeout=10), 400)
    assert err["code"] == "missing_body" and "needs a JSON object" in err["message"] and "'data'" not in err["message"]


def test_record_outcome_names_bad_json_and_unknown_fields(held: RunningThermostat) -> None:
    err = assert_error_shape(httpx.post(f"{held.base}{API}/record-outcome", content=b'{"request_id": ', headers=JSON, timeout=10), 400)
    assert err["code"] == "invalid_json"
    raw = b'{"request_id": "a", "outcome": {"quality": 0.5}, "qualty": 1}'
    err = assert_error_shape(httpx.post(f"{held.base}{API}/record-outcome", content=raw, headers=JSON, timeout=10), 400)
    assert (err["code"], err["param"]) == ("unknown_field", "qualty") and "'qualty'" in err["message"]


def test_performance_states_the_improvement_whenever_a_holdout_exists(held: RunningThermostat) -> None:
    body = api(held, "GET", "/performance").json()
    holdout = {c["task_type"] for c in api(held, "GET", "/dashboard").json()["comparisons"] if c["holdout_n"] > 0}
    assert holdout, "the run must contain holdout traffic"
    for task in body["tasks"]:
        if task["task_type"] not in holdout:
            continue
        assert task["improvement"] is not None
        for side in ("optimized", "baseline"):
            if task[side] is not None:
                assert task[side]["improvement_over_baseline"] is not None, (task["task_type"], side)
        assert task["baseline"]["improvement_over_baseline"]["mean"] == 0.0  # the holdout against itself


def test_recommend_fills_a_partial_context_from_the_tasks_traffic(held: RunningThermostat) -> None:
    body = api(held, "POST", "/recommend", json={"task_type": "code", "context": {"model": "echo-1"}}).json()
    assert body["assumed"] == {"temperature": 0.7, "max_tokens": 300}
    assert any("typical client values of 'code' (temperature=0.7, max_tokens=300" in n for n in body["notes"]), body["notes"]
    assert body["baseline"] == {"temperature": 0.7, "max_tokens": 300}
    full = api(held, "POST", "/recommend", json={"task_type": "code", "context": {"model": "echo-1", "temperature": 0.2, "max_tokens": 50}}).json()
    assert full["assumed"] == {} and not any("typical" in n for n in full["notes"])


def test_recommend_says_when_a_bucket_is_unlearned(held: RunningThermostat) -> None:
    body = api(held, "POST", "/recommend", json={"task_type": "translate", "context": {"model": "echo-1", "temperature": 0.5, "max_tokens": 100}}).json()
    assert body["learned"] is False and any("still unlearned" in n for n in body["notes"]), body
    seen = api(held, "POST", "/recommend", json={"task_type": "chat", "context": {"model": "echo-1"}}).json()
    assert seen["learned"] is True and not any("unlearned" in n for n in seen["notes"]), seen


def test_ope_names_its_method_and_answers_per_task(held: RunningThermostat) -> None:
    body = api(held, "GET", "/ope", params={"n_bootstrap": 50}).json()
    assert body["method"].startswith("self-normalised importance sampling (SNIPS)") and "Policy.propensities" not in body["method"]
    assert "Policy.propensities" in body["method_detail"]
    assert {t["task_type"] for t in body["tasks"]} == {"code", "chat"}
    assert sum(t["rows"] for t in body["tasks"]) == body["rows"]
    assert body["statement"].startswith("the current policy is worth")
    for t in body["tasks"]:
        assert t["statement"].startswith(f"{t['task_type']}: ")


def test_record_outcome_says_what_it_replaced(held: RunningThermostat) -> None:
    rid = held.ids["code"][0]  # type: ignore[attr-defined]
    first = api(held, "POST", "/record-outcome", json={"request_id": rid, "outcome": {"quality": 0.3}}).json()
    assert first["replaced"] == f"replaced the automatic score (quality {first['automatic_quality']:g})"
    held.flush()
    err = assert_error_shape(api(held, "POST", "/record-outcome", json={"request_id": rid, "outcome": {"quality": 0.6}}), 409)
    assert err["message"].startswith("earlier explicit feedback was already recorded")
    again = api(held, "POST", "/record-outcome", json={"request_id": rid, "outcome": {"quality": 0.6}, "overwrite": True}).json()
    assert again["replaced"] == "replaced earlier explicit feedback (quality 0.3)"


def test_ope_states_a_small_effective_sample_and_missing_support() -> None:
    est = reports.EstimateOut(estimator="snips", value=0.5, ci_low=0.4, ci_high=0.6, eb_low=None, eb_high=None, std_error=0.05, n=100, ess=4.0)
    pol = reports.PolicyEstimates(policy="p", ips=est, snips=est, dr=None, ess=4.0, max_weight=20.0)
    out = reports.OpeOut(since=0, until=1, rows=100, skipped=0, method="m", logged_mean_reward=0.5, target=pol, baseline=pol, improvement=[])
    assert "effective sample size is only 4.0 of 100 rows" in reports._statement(out)
    support = ope.Support(unsupported_mass=0.4, below_floor_mass=0.0, rows=7, floor=0.01)
    arrays = type("A", (), {"n": 7, "skipped": 0, "rewards": np.ones(7)})()
    bad = reports._unsupported(0.0, 1.0, arrays, ope.UnsupportedTarget(support, 0.05))  # type: ignore[arg-type]
    assert bad.target is None and bad.statement.startswith("no estimate: the log does not support the current policy")
    assert "0.4 of its probability on arms never logged" in bad.statement


def _log_in_time_order(t: RunningThermostat) -> list:
    return sorted(t.call(t.runtime.sink.fetch_decisions(limit=10_000)), key=lambda r: (r.timestamp, r.request_id))


def test_performance_shows_optimised_vs_holdout_with_the_anytime_valid_interval(held: RunningThermostat) -> None:
    """Reference: each stream's PrPl-EB path (`bounds_path`, at α/2) over the log's rows in time order, by hand."""
    held.flush()  # earlier tests' feedback is written first: report and reference read the same log
    body = api(held, "GET", "/performance").json()
    log = _log_in_time_order(held)
    low, high = reports.reward_range(held.runtime.config.policy.reward)
    for task in body["tasks"]:
        versus = task["versus_holdout"]
        rows = [r for r in log if r.task_type == task["task_type"]]
        # the reward at completion (automatic quality): quality signals are compared per kind, never mixed
        opt = np.array([r.reward for r in rows if r.mode in ("optimized", "guard_fallback") and r.reward is not None])
        hold = np.array([r.reward for r in rows if r.mode == "holdout" and r.reward is not None])
        reward = next(m for m in versus["metrics"] if m["metric"] == "reward")
        assert (reward["optimized_n"], reward["holdout_n"]) == (len(opt), len(hold)) and reward["anytime_valid"] is True
        if not len(opt) or not len(hold):
            assert reward["ci_low"] is None and reward["verdict"] == "not yet known"
            continue
        lo_o, hi_o = sequences.bounds_path(np.clip(opt, low, high), 0.025, low, high)
        lo_h, hi_h = sequences.bounds_path(np.clip(hold, low, high), 0.025, low, high)
        assert reward["difference"] == pytest.approx(opt.mean() - hold.mean(), rel=1e-12)
        assert reward["ci_low"] == pytest.approx(lo_o[-1] - hi_h[-1], rel=1e-9) and reward["ci_high"] == pytest.approx(hi_o[-1] - lo_h[-1], rel=1e-9)
        expected = "better" if reward["ci_low"] > 0 else "worse" if reward["ci_high"] < 0 else "not yet known"
        assert reward["verdict"] == expected
        kinds = [m["verdict"] for m in versus["metrics"] if m["metric"].startswith("quality_") or m["metric"] == "pairwise_win_rate"]
        task_verdict = "worse" if "worse" in kinds else "better" if "better" in kinds else "not yet known"
        assert versus["verdict"] in (task_verdict, "rolled back")
    assert any(t["versus_holdout"]["holdout_n"] > 0 for t in body["tasks"])


def test_slo_status_shows_each_tasks_quality_sequences(held: RunningThermostat) -> None:
    """The conservative monitor's per-task intervals against the log's automatic quality.

    α/2 for latency; α/2 shared by the four quality kinds and cost (α/10 each), so α/20 per stream."""
    body = api(held, "GET", "/slo-status").json()
    log = _log_in_time_order(held)
    tasks = {t["task_type"]: t for t in body["tasks"]}
    assert set(tasks) == {"code", "chat"}
    for name, t in tasks.items():
        rows = [r for r in log if r.task_type == name and r.quality is not None]
        opt = np.array([r.quality for r in rows if r.mode in ("optimized", "guard_fallback")])
        hold = np.array([r.quality for r in rows if r.mode == "holdout"])
        assert (t["optimised_n"], t["holdout_n"]) == (len(opt), len(hold))
        assert t["quality_kind"] == "automatic"
        lo_o, hi_o = sequences.bounds_path(opt, 0.0025)
        lo_h, hi_h = sequences.bounds_path(hold, 0.0025)
        assert t["optimised_quality"] == pytest.approx([lo_o[-1], hi_o[-1]], rel=1e-9)
        assert t["holdout_quality"] == pytest.approx([lo_h[-1], hi_h[-1]], rel=1e-9)
        assert t["quality_difference"] == pytest.approx([lo_o[-1] - hi_h[-1], hi_o[-1] - lo_h[-1]], rel=1e-9)
        worse = hi_o[-1] < 0.95 * lo_h[-1]
        assert t["quality"] == ("worse" if worse else "better" if lo_o[-1] > hi_h[-1] else "not_yet_known")


def test_rollout_status_reports_the_anytime_valid_promotion_comparison(held: RunningThermostat) -> None:
    """Promotion's optimised-vs-holdout automatic-reward sequences (α/4 per kind, α/8 per stream) against the log's rewards;
    OPE is still reported beside it."""
    body = api(held, "GET", "/rollout-status").json()
    log = _log_in_time_order(held)
    low, high = reports.reward_range(held.runtime.config.policy.reward)
    opt = np.clip([r.reward for r in log if r.mode in ("optimized", "guard_fallback") and r.reward is not None], low, high)
    hold = np.clip([r.reward for r in log if r.mode == "holdout" and r.reward is not None], low, high)
    p = body["promotion"]
    assert (p["optimised_n"], p["holdout_n"], p["alpha"], p["signal_kind"]) == (len(opt), len(hold), 0.0125, "automatic")
    lo_o, hi_o = sequences.bounds_path(opt, 0.00625, low, high)
    lo_h, hi_h = sequences.bounds_path(hold, 0.00625, low, high)
    assert p["difference_lower"] == pytest.approx(lo_o[-1] - hi_h[-1], rel=1e-9)
    assert p["difference_upper"] == pytest.approx(hi_o[-1] - lo_h[-1], rel=1e-9)
    assert p["optimised_mean"] == pytest.approx(float(opt.mean()), rel=1e-9)
    assert "improvement_lower_bound" in body["ope"]
