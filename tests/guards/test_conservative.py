"""The conservative monitor: harmful tuning is rolled back, equal traffic is not, changes are seen."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from guards import conservative as cm
from guards.settings import SloSettings
from policies import sequences
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


# ----------------------------------------------------------------------------- signal kinds, cost, change (issue 22)

def _signals(state: cm.MonitorState, kind: str, opt: list[float], hold: list[float], s: cm.ConservativeSettings = S,
             task: str = "code", trusted: bool = True) -> tuple[cm.MonitorState, list[cm.MonitorEvent]]:
    events: list[cm.MonitorEvent] = []
    for i in range(max(len(opt), len(hold))):
        for mode, values in (("optimized", opt), ("holdout", hold)):
            if i < len(values):
                state, new = cm.observe_signal(state, s, task=task, mode=mode, kind=kind, quality=values[i], now=float(i), trusted=trusted)
                events += new
    return state, events


def _automatic(state: cm.MonitorState, n: int, s: cm.ConservativeSettings = S, opt_tokens: float = 100.0,
               hold_tokens: float = 100.0, task: str = "code") -> tuple[cm.MonitorState, list[cm.MonitorEvent]]:
    """`n` requests per stream, all automatically perfect (the score the judge's comparison must not be mixed with)."""
    events: list[cm.MonitorEvent] = []
    rng = np.random.default_rng(0)
    for i in range(n):
        for mode, tokens in (("holdout", hold_tokens), ("optimized", opt_tokens)):
            state, new = cm.observe(state, s, task=task, mode=mode, quality=1.0, latency_s=1.0, now=float(i),
                                    cost=float(tokens * np.exp(0.1 * rng.standard_normal())), truncated=False)
            events += new
    return state, events


def test_a_judged_gain_is_seen_on_the_judge_kind_not_diluted_by_automatic_scores() -> None:
    """Regression (issue 22): slo-status showed +0.00 for a true +0.57 because the monitor read only the automatic score."""
    rng = np.random.default_rng(1)
    state, _ = _automatic(cm.new_state(), 1000)
    state, events = _signals(state, "judge", list(np.clip(0.9 + 0.1 * rng.standard_normal(100), 0, 1)),
                             list(np.clip(0.4 + 0.1 * rng.standard_normal(100), 0, 1)))
    v = cm.verdict(state, S, "code")
    assert events == [] and v.quality_kind == "judge" and v.quality == "better" and v.verdict == "better"
    judge = next(k for k in v.signals if k.kind == "judge")
    assert (judge.optimised_n, judge.holdout_n) == (100, 100) and judge.measure == "quality"
    assert v.optimised_mean is not None and v.holdout_mean is not None
    assert 0.4 < v.optimised_mean - v.holdout_mean < 0.6 and v.quality_difference[0] > 0
    automatic = next(k for k in v.signals if k.kind == "automatic")
    assert automatic.optimised_n == 1000 and automatic.verdict == "not_yet_known"  # the automatic score sees nothing


def test_a_judged_regression_rolls_back_although_the_automatic_score_is_perfect() -> None:
    state, _ = _automatic(cm.new_state(), 300)
    state, events = _signals(state, "judge", [0.3, 0.4] * 60, [0.8, 0.9] * 60)
    assert [e.kind for e in events] == ["rollback"] and cm.rolled_back(state, "code")
    assert events[0].reason.startswith("judge: optimised mean quality")


def test_kinds_are_never_mixed_explicit_against_explicit() -> None:
    state, _ = _signals(cm.new_state(), "explicit", [0.9] * 50, [])
    state, _ = _signals(state, "judge", [], [0.2] * 50)
    v = cm.verdict(state, S, "code")
    assert v.quality == "not_yet_known"  # explicit tuned against judged holdout is no comparison
    assert {k.kind: (k.optimised_n, k.holdout_n) for k in v.signals}["explicit"] == (50, 0)


def test_pairwise_is_a_win_rate_against_one_half() -> None:
    wins = [1.0, 1.0, 0.5, 1.0, 0.0] * 40  # win rate 0.7
    state, _ = _signals(cm.new_state(), "judge_pairwise", wins, [])
    k = next(k for k in cm.verdict(state, S, "code").signals if k.kind == "judge_pairwise")
    assert k.measure.startswith("win rate") and k.reference == 0.5 and k.verdict == "better"
    lo, hi = sequences.bounds(sequences.observe_many(sequences.new_sequence(S.comparison_alpha / 2), wins))
    assert k.optimised_bounds == pytest.approx((lo, hi)) and k.difference == pytest.approx((lo - 0.5, hi - 0.5))
    losing, events = _signals(cm.new_state(), "judge_pairwise", [0.0, 0.5, 0.0, 0.0] * 100, [])  # 0.125
    assert [e.kind for e in events] == ["rollback"] and "win rate" in events[0].reason
    even, _ = _signals(cm.new_state(), "judge_pairwise", [1.0, 0.0] * 100, [])
    assert next(k for k in cm.verdict(even, S, "code").signals if k.kind == "judge_pairwise").verdict == "not_yet_known"


def test_costlier_without_a_sure_gain_is_rolled_back() -> None:
    """Regression (issue 22): 48-62 % more tokens for lower hidden quality were never rolled back."""
    state, events = _automatic(cm.new_state(), 400, opt_tokens=150.0, hold_tokens=100.0)
    assert [e.kind for e in events] == ["rollback"] and "cost" in events[0].reason
    v = cm.verdict(state, S, "code")
    assert v.cost is not None and v.cost.verdict == "costlier" and v.cost.ratio_lower is not None and v.cost.ratio_lower > 1.1
    assert v.cost.cap is not None and 200.0 < v.cost.cap < 2.0 * 100.0 * np.exp(0.5)  # 2 x the largest of 50 warm-up holdout costs


def test_costlier_with_a_sure_judged_gain_is_kept_unless_that_judge_is_untrusted() -> None:
    gain, _ = _signals(cm.new_state(), "judge", [0.9] * 200, [0.4] * 200)
    state, events = _automatic(gain, 400, opt_tokens=150.0, hold_tokens=100.0)
    assert events == [] and cm.verdict(state, S, "code").cost.verdict == "costlier"  # type: ignore[union-attr]
    untrusted, _ = _signals(cm.new_state(), "judge", [0.9] * 200, [0.4] * 200, trusted=False)
    state, events = _automatic(untrusted, 400, opt_tokens=150.0, hold_tokens=100.0)
    assert [e.kind for e in events] == ["rollback"]
    assert next(k for k in cm.verdict(untrusted, S, "code").signals if k.kind == "judge").trusted is False


def test_equal_costs_are_not_rolled_back() -> None:
    alarms = 0
    for seed in range(10):
        state = cm.new_state()
        rng = np.random.default_rng(seed)
        for i in range(600):
            mode = "holdout" if rng.random() < 0.5 else "optimized"
            state, events = cm.observe(state, S, task="t", mode=mode, quality=1.0, latency_s=None, now=float(i),
                                       cost=float(rng.integers(50, 300)), truncated=False)
            alarms += any(e.kind == "rollback" for e in events)
    assert alarms == 0


def _holdout_stream(state: cm.MonitorState, n: int, start: int, **kw: float | bool) -> tuple[cm.MonitorState, int | None, list[cm.MonitorEvent]]:
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        tokens = float(kw.get("tokens", 200.0)) * float(np.exp(0.2 * rng.standard_normal()))
        truncated = bool(rng.random() < float(kw.get("truncation", 0.0)))
        state, events = cm.observe(state, S, task="t", mode="holdout", quality=None, latency_s=None, now=float(i), cost=tokens,
                                   truncated=truncated, length=tokens)
        if events:
            return state, i, events
    return state, None, []


def test_change_is_detected_on_holdout_length_and_truncation_and_flags_relearning() -> None:
    """Regression (issue 22): a silent model change that truncated 13-16 % of holdout answers was never detected."""
    state, fired, _ = _holdout_stream(cm.new_state(), 500, 0)
    assert fired is None
    state, fired, events = _holdout_stream(state, 300, 500, truncation=0.15)
    assert fired is not None and fired < 700 and events[0].kind == "change_detected" and events[0].evidence["stream"] == "truncation"
    v = cm.verdict(state, S, "t")
    assert v.relearning_since == float(fired)
    longer, fired, events = _holdout_stream(cm.new_state(), 500, 0)
    longer, fired, events = _holdout_stream(longer, 300, 500, tokens=320.0)
    assert fired is not None and events[0].evidence["stream"] == "length"


def test_change_is_detected_on_judged_holdout_quality_and_relearning_ends() -> None:
    rng = np.random.default_rng(4)
    state = cm.new_state()
    events: list[cm.MonitorEvent] = []
    for i in range(600):
        mean = 0.7 if i < 300 else 0.4
        state, new = cm.observe_signal(state, S, task="t", mode="holdout", kind="judge",
                                       quality=float(np.clip(mean + 0.1 * rng.standard_normal(), 0, 1)), now=float(i))
        events += new
    changes = [e for e in events if e.kind == "change_detected"]
    assert len(changes) == 1 and 300 <= changes[0].at < 400 and changes[0].evidence["signal_kind"] == "judge"
    assert cm.verdict(state, S, "t").relearning_since == changes[0].at
    state, ended = _signals(state, "judge", [0.5] * S.relearn_signals, [], task="t")
    assert [e.kind for e in ended] == ["relearning_ended"] and ended[0].evidence["relearning_since"] == changes[0].at
    assert cm.verdict(state, S, "t").relearning_since is None


def test_monitor_state_with_every_part_round_trips() -> None:
    state, _ = _automatic(cm.new_state(), 60)
    state, _ = _signals(state, "judge_pairwise", [1.0] * 5, [0.5] * 5, trusted=False)
    assert msgspec.json.decode(msgspec.json.encode(state), type=cm.MonitorState) == state
