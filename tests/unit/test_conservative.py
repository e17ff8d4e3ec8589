"""The conservative monitor: harmful tuning is rolled back, equal traffic is not, changes are seen."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from guards import conservative as cm
from guards.settings import SloSettings
from policies.records import Decision, Outcome, Params, RequestContext

S = cm.ConservativeSettings()


def _run(
    seed: int,
    steps: int,
    *,
    opt_quality: float,
    hold_quality: float,
    opt_latency: float = 1.0,
    holdout_share: float = 0.5,
    settings: cm.ConservativeSettings = S,
) -> tuple[cm.MonitorState, int | None, list[cm.MonitorEvent]]:
    """Alternating-ish random traffic; returns the state, the step of the first rollback (None if never) and all events."""
    rng = np.random.default_rng(seed)
    state = cm.new_state()
    first: int | None = None
    events: list[cm.MonitorEvent] = []
    for i in range(steps):
        holdout = rng.random() < holdout_share
        mean = hold_quality if holdout else opt_quality
        q = float(np.clip(mean + 0.1 * rng.standard_normal(), 0.0, 1.0))
        lat = float(np.exp(0.3 * rng.standard_normal())) * (1.0 if holdout else opt_latency)
        state, new = cm.observe(state, settings, task="code", mode="holdout" if holdout else "optimized", quality=q, latency_s=lat, now=float(i))
        events += new
        if first is None and any(e.kind == "rollback" for e in new):
            first = i
    return state, first, events


def test_harmful_quality_is_rolled_back_within_a_bounded_number_of_samples() -> None:
    state, first, events = _run(1, 1500, opt_quality=0.56, hold_quality=0.7)  # 20 % lower
    assert first is not None and first < 1500
    assert cm.rolled_back(state, "code")
    rollback = next(e for e in events if e.kind == "rollback")
    assert rollback.task_type == "code" and rollback.at == float(first) and "quality" in rollback.reason
    v = cm.verdict(state, S, "code")
    assert v.verdict == "worse" and v.quality == "worse" and v.rolled_back
    assert v.optimised_quality[1] < 0.95 * v.holdout_quality[0]  # the numbers behind the claim
    assert v.quality_difference[1] < 0
    # rolled back: further traffic changes nothing, the task stays rolled back
    after, more = cm.observe(state, S, task="code", mode="optimized", quality=1.0, latency_s=0.1, now=1e6)
    assert after == state and more == []


def test_rollback_is_per_task_and_resume_starts_over() -> None:
    state, first, _ = _run(2, 1500, opt_quality=0.5, hold_quality=0.7)
    assert first is not None
    assert cm.rolled_back(state, "code") and not cm.rolled_back(state, "creative")
    resumed = cm.resume(state, S, "code")
    assert not cm.rolled_back(resumed, "code") and cm.verdict(resumed, S, "code").optimised_n == 0


def test_equal_streams_are_not_rolled_back_under_continuous_monitoring() -> None:
    """Checked after every one of 1000 outcomes, over 60 seeds: false alarms at most 5 % (α)."""
    alarms = sum(_run(seed, 1000, opt_quality=0.7, hold_quality=0.7)[1] is not None for seed in range(60))
    assert alarms <= 3


def test_a_regression_just_inside_the_margin_is_not_rolled_back() -> None:
    alarms = sum(_run(seed, 1000, opt_quality=0.68, hold_quality=0.7)[1] is not None for seed in range(20))  # 2.9 % lower
    assert alarms == 0


def test_better_quality_is_reported_better() -> None:
    state, first, _ = _run(3, 1500, opt_quality=0.85, hold_quality=0.7)
    assert first is None
    v = cm.verdict(state, S, "code")
    assert v.verdict == "better" and v.quality_difference[0] > 0 and v.latency == "not_yet_known"


def test_latency_regression_is_detected() -> None:
    state, first, events = _run(4, 3000, opt_quality=0.7, hold_quality=0.7, opt_latency=1.5)
    assert first is not None
    v = cm.verdict(state, S, "code")
    assert v.latency == "worse" and v.quality != "worse"
    assert v.latency_reference_s is not None and v.optimised_exceedance[0] > v.holdout_exceedance[1]
    assert "latency" in next(e for e in events if e.kind == "rollback").reason


def test_latency_within_the_margin_is_not_a_regression() -> None:
    alarms = sum(_run(seed, 1500, opt_quality=0.7, hold_quality=0.7, opt_latency=1.05)[1] is not None for seed in range(20))
    assert alarms == 0


def test_latency_reference_is_the_warmup_quantile() -> None:
    s = cm.ConservativeSettings(latency_warmup=100)
    state = cm.new_state()
    for i in range(100):
        state, _ = cm.observe(state, s, task="t", mode="holdout", quality=None, latency_s=float(i + 1), now=0.0)
    assert cm.verdict(state, s, "t").latency_reference_s == pytest.approx(float(np.quantile(np.arange(1, 101), 0.99)))


def _change_run(seed: int, steps: int, shift_at: int | None, shift: float = 0.2) -> int | None:
    rng = np.random.default_rng(seed)
    state = cm.new_state()
    for i in range(steps):
        mean = 0.6 + (shift if shift_at is not None and i >= shift_at else 0.0)
        q = float(np.clip(mean + 0.1 * rng.standard_normal(), 0.0, 1.0))
        state, events = cm.observe(state, S, task="t", mode="holdout", quality=q, latency_s=None, now=float(i))
        if any(e.kind == "change_detected" for e in events):
            return i
    return None


def test_change_detector_fires_on_a_shift() -> None:
    for shift in (0.2, -0.2):
        fired = [_change_run(seed, 800, shift_at=400, shift=shift) for seed in range(10)]
        assert all(f is not None and 400 <= f < 500 for f in fired), fired


def test_change_detector_false_alarms_are_rare_on_a_stationary_stream() -> None:
    alarms = sum(_change_run(seed, 1000, shift_at=None) is not None for seed in range(50))
    assert alarms <= 2


def test_change_restarts_the_comparison() -> None:
    rng = np.random.default_rng(5)
    state = cm.new_state()
    for i in range(300):
        state, _ = cm.observe(state, S, task="t", mode="optimized", quality=0.6, latency_s=None, now=float(i))
        state, events = cm.observe(state, S, task="t", mode="holdout", quality=float(0.6 + 0.05 * rng.standard_normal()), latency_s=None, now=float(i))
        assert events == []
    for i in range(300, 400):
        state, events = cm.observe(state, S, task="t", mode="holdout", quality=0.95, latency_s=None, now=float(i))
        if events:
            break
    assert [e.kind for e in events] == ["change_detected"]
    assert cm.verdict(state, S, "t").optimised_n == 0


def test_task_types_are_capped_and_folded_into_other() -> None:
    s = cm.ConservativeSettings(max_tasks=3)
    state = cm.new_state()
    for task in ("a", "b", "c", "d"):
        state, _ = cm.observe(state, s, task=task, mode="holdout", quality=0.5, latency_s=None, now=0.0)
    assert sorted(state.tasks) == ["a", "b", "other"]
    assert cm.verdict(state, s, "d").task_type == "other" and cm.verdict(state, s, "d").holdout_n == 2


def test_other_modes_change_nothing_and_state_round_trips() -> None:
    state, _, _ = _run(6, 300, opt_quality=0.7, hold_quality=0.7)
    for mode in ("off", "shadow", "rollback"):
        assert cm.observe(state, S, task="code", mode=mode, quality=0.0, latency_s=99.0, now=0.0)[0] == state
    assert msgspec.json.decode(msgspec.json.encode(state), type=cm.MonitorState) == state


def test_settings_come_from_slo() -> None:
    s = cm.ConservativeSettings.from_slo(SloSettings(max_quality_regression=0.1, max_latency_regression=0.2))
    assert (s.max_quality_regression, s.max_latency_regression) == (0.1, 0.2)


def test_monitor_hook_reads_decision_and_outcome() -> None:
    monitor = cm.ConservativeMonitor(S)
    ctx = RequestContext("code", "m", "chat", 10, 1, False, False, False, 0.7, 100)
    rng = np.random.default_rng(7)
    events: list[cm.MonitorEvent] = []
    for i in range(2000):
        mode = "holdout" if i % 2 else "optimized"
        decision = Decision(f"r{i}", ctx, 0, Params(), Params(), 1.0, "thompson_gaussian", "v", mode, float(i))
        q = float(np.clip((0.7 if mode == "holdout" else 0.5) + 0.1 * rng.standard_normal(), 0, 1))
        events += monitor.on_outcome(decision, Outcome(f"r{i}", 200, 1.0, quality=q), now=float(i))
        if monitor.is_rolled_back("code"):
            break
    assert monitor.is_rolled_back("code") and [e.kind for e in events] == ["rollback"]
    assert [v.task_type for v in monitor.verdicts()] == ["code"]


def test_slo_regression_keys_are_validated() -> None:
    from proxy.config import ConfigError, build_config

    assert build_config({"slo": {"max_quality_regression": 0.1}}).slo.max_quality_regression == 0.1
    for key in ("max_quality_regression", "max_latency_regression"):
        with pytest.raises(ConfigError, match=f"slo.{key}"):
            build_config({"slo": {key: 1.5}})


def test_verdict_carries_the_sample_means_and_the_summary_states_them() -> None:
    from proxy.control.reports import monitor_sentence, monitor_words

    state = cm.new_state()
    for i, (mode, q) in enumerate([("optimized", 0.9), ("optimized", 0.7), ("holdout", 0.5), ("holdout", 0.6), ("holdout", 0.4)]):
        state, _ = cm.observe(state, S, task="code", mode=mode, quality=q, latency_s=1.0, now=float(i))
    v = cm.verdict(state, S, "code")
    assert v.optimised_mean == pytest.approx(0.8) and v.holdout_mean == pytest.approx(0.5)
    assert cm.verdict(cm.new_state(), S, "code").optimised_mean is None
    words = monitor_words(v.verdict, v.rolled_back)
    assert words == "not yet known" and monitor_words("worse", True) == "rolled back" and monitor_words("better", False) == "better"
    assert monitor_sentence("code", 0.12, 0.05, 0.19, 3412, 0.975, "better") == "code: +0.12 quality, 97.5 % interval [+0.05, +0.19], 3,412 requests; better"
    assert monitor_sentence("chat", None, -1.0, 1.0, 3, 0.975, words) == "chat: quality not comparable yet (needs tuned and holdout requests), 3 requests; not yet known"
