"""Safe knobs: a knob moves only on evidence that can see it, caps are contracts, and an always-on holdout.

The decider is built from its real parts (trust region, rollout, budget guard over the
in-process store, real policies); only the clock and the generator are fixed.
"""

from __future__ import annotations

import asyncio

import pytest

from guards.rollout import assign
from guards.settings import MODE_TRAFFIC, MODES, BaselineSettings, ConstraintsSettings
from guards.trust_region import FREE, Freedom, ModelLimits, allowed_arms, enforce, max_tokens_delta, within
from policies.arms import candidate_arms
from policies.base import Policy
from policies.baseline import BaselinePolicy
from policies.records import Arm, Decision, Outcome, Params, RequestContext
from policies.settings import ArmGridSettings
from proxy.config import ConfigError, build_config
from proxy.decision import BanditDecider
from proxy.decision.decider import HOLDOUT_SALT, TuneMode
from tests.support.decider import RecordingUpdates, build_decider

C = ConstraintsSettings()  # ±0.2, ±500 and ±50 %, max_tokens 4096
L = ModelLimits()
NO_STAND_IN = BaselineSettings()


def ctx(task: str = "code", temperature: float | None = None, max_tokens: int | None = None) -> RequestContext:
    return RequestContext(task, "m", "chat", 100, 1, False, False, False, temperature, max_tokens, "up")


def decider(
    *,
    phase: str = "general",
    holdout: float = 0.0,
    tune: TuneMode = "auto",
    min_signals: int = 50,
    constraints: ConstraintsSettings = C,
    stand_in: BaselineSettings = NO_STAND_IN,
    limits: ModelLimits = L,
    policy: Policy | None = None,
) -> BanditDecider:
    return build_decider(
        policy, phase=phase, holdout=holdout, tune=tune, min_signals=min_signals, constraints=constraints, stand_in=stand_in, limits=limits,
    )


def decide_many(d: BanditDecider, c: RequestContext, n: int, key: str = "k") -> list[Decision]:
    async def run() -> list[Decision]:
        return [await d.decide(c, request_id=f"r{i}", assignment_key=f"{key}{i}") for i in range(n)]

    return asyncio.run(run())


# ---- trust region math --------------------------------------------------------------


def test_relative_band_tightens_the_absolute_one() -> None:
    assert max_tokens_delta(50, C) == 25  # 50 % of 50
    assert max_tokens_delta(600, C) == 300
    assert max_tokens_delta(2000, C) == 500  # the absolute ±500 binds
    assert max_tokens_delta(2000, ConstraintsSettings(max_relative_delta_max_tokens=0.0)) == 0
    assert within(Arm(0.7, 75), Arm(0.7, 50), C, L) and within(Arm(0.7, 25), Arm(0.7, 50), C, L)
    assert not within(Arm(0.7, 76), Arm(0.7, 50), C, L) and not within(Arm(0.7, 24), Arm(0.7, 50), C, L)
    assert not within(Arm(0.7, 550), Arm(0.7, 50), C, L)  # what the ±500 band alone allowed


def test_client_cap_of_50_keeps_every_arm_within_25_to_50() -> None:
    base, cap = Arm(0.7, 50), Freedom(max_tokens_cap=50)
    cands = candidate_arms(base, max_delta_temperature=0.2, max_delta_max_tokens=max_tokens_delta(50, C), grid=ArmGridSettings())
    arms = allowed_arms(cands, base, C, L, cap)
    assert {a.max_tokens for a in arms} == {25, 38, 50}  # grid 25, 37.5 -> 38, 50 (62 and 75 are above the cap)
    assert not within(Arm(0.7, 51), base, C, L, cap) and enforce(Arm(0.7, 75), base, C, L, cap) == base
    # With the cap lifted (raise_client_max_tokens = true) the relative band still holds: 25..75.
    assert {a.max_tokens for a in allowed_arms(cands, base, C, L, FREE)} == {25, 38, 50, 62, 75}


def test_frozen_knobs_stay_at_the_baseline() -> None:
    base = Arm(0.7, 600)
    assert not within(Arm(0.8, 600), base, C, L, Freedom(temperature=False))
    assert within(Arm(0.7, 400), base, C, L, Freedom(temperature=False))
    assert not within(Arm(0.7, 601), base, C, L, Freedom(max_tokens=False))
    assert within(base, base, C, L, Freedom(temperature=False, max_tokens=False, max_tokens_cap=600))


def test_decider_respects_the_cap_and_raises_only_with_the_flag() -> None:
    capped = decider(tune="always")
    _, arms, _ = capped.allowed_for(ctx(temperature=0.5, max_tokens=50))
    assert {a.max_tokens for a in arms} == {25, 31, 38, 44, 50}  # the grid's 5 steps all below the cap
    assert {a.temperature for a in arms} == {0.3, 0.4, 0.5, 0.6, 0.7}
    assert {d.sent.max_tokens for d in decide_many(capped, ctx(temperature=0.5, max_tokens=50), 60)} <= set(range(25, 51))
    raising = decider(tune="always", constraints=ConstraintsSettings(raise_client_max_tokens=True))
    _, arms, _ = raising.allowed_for(ctx(temperature=0.5, max_tokens=50))
    assert max(a.max_tokens for a in arms) == 75 and min(a.max_tokens for a in arms) == 25


# ---- temperature only on evidence -----------------------------------------------------


def temperatures(d: BanditDecider, c: RequestContext) -> set[float]:
    return {a.temperature for a in d.allowed_for(c)[1]}


def test_auto_tunes_temperature_only_after_min_quality_signals_per_task() -> None:
    d = decider(tune="auto", min_signals=50)
    c = ctx("code", temperature=0.7, max_tokens=600)
    assert temperatures(d, c) == {0.7}
    assert len(d.allowed_for(c)[1]) > 1  # max_tokens arms still compete
    d.signals.add("code", 49)
    assert temperatures(d, c) == {0.7}
    d.signals.add("code")
    assert temperatures(d, c) == {0.5, 0.6, 0.7, 0.8, 0.9}
    assert temperatures(d, ctx("chat", temperature=0.7, max_tokens=600)) == {0.7}  # per task type
    assert {x.sent.temperature for x in decide_many(d, ctx("chat", temperature=0.7, max_tokens=600), 30)} == {0.7}


def test_never_and_always() -> None:
    never = decider(tune="never")
    never.signals.add("code", 10_000)
    assert temperatures(never, ctx(temperature=0.7, max_tokens=600)) == {0.7}
    assert temperatures(decider(tune="always"), ctx(temperature=0.7, max_tokens=600)) == {0.5, 0.6, 0.7, 0.8, 0.9}


def test_signal_counter_is_bounded() -> None:
    d = decider()
    d.signals.max_task_types = 2
    for task in ("a", "b", "c"):
        d.signals.add(task, 60)
    assert (d.signals.count("a"), d.signals.count("b"), d.signals.count("c")) == (60, 60, 0)  # "c" stays gated


# ---- nothing added that the client did not send ----------------------------------------


def test_client_sends_neither_knob_nothing_is_added_under_auto_without_evidence() -> None:
    d = decider(tune="auto")
    decisions = decide_many(d, ctx(), 40)
    assert {x.mode for x in decisions} == {"optimized"}
    assert all(x.sent == Params() for x in decisions)
    assert d.allowed_for(ctx())[1] == [Arm(1.0, 1024)]  # one arm: the labels of "not sent"


def test_omitted_temperature_label_stays_inside_the_model_range() -> None:
    d = decider(limits=ModelLimits(max_temperature=0.8))
    base, arms, _ = d.allowed_for(ctx(max_tokens=100))
    assert base == Arm(0.8, 100) and {a.max_tokens for a in arms} == {50, 62, 75, 88, 100}  # max_tokens still tuned below the cap
    assert all(x.sent.temperature is None for x in decide_many(d, ctx(max_tokens=100), 10))


def test_absent_knobs_stay_absent_even_with_evidence_unless_a_reference_is_declared() -> None:
    d = decider(tune="always")
    assert all(x.sent == Params() for x in decide_many(d, ctx(), 20))
    # The provider default declared per model: an omitted temperature may move around it; max_tokens stays uncapped.
    declared = decider(tune="always", limits=ModelLimits(default_temperature=1.0))
    sent = decide_many(declared, ctx(), 80)
    assert all(x.sent.max_tokens is None for x in sent)
    moved = {x.sent.temperature for x in sent}
    assert None in moved and moved - {None} <= {0.8, 0.9, 1.1, 1.2} and len(moved) > 1  # the default itself is not sent
    for x in sent:
        assert x.baseline == Params(temperature=1.0, max_tokens=1024)
        assert x.sent.arm(x.baseline) in declared.allowed_for(ctx())[1]


def test_explicit_stand_ins_go_to_holdout_and_tuned_traffic_alike() -> None:
    stand_in = BaselineSettings(temperature=0.3, max_tokens=200)
    tuned = decide_many(decider(stand_in=stand_in, holdout=0.0), ctx(), 30)
    assert all(x.sent.temperature == 0.3 and 100 <= (x.sent.max_tokens or 0) <= 300 for x in tuned)  # temperature gated
    held = decide_many(decider(stand_in=stand_in, holdout=1.0), ctx(), 10)
    assert {x.mode for x in held} == {"holdout"} and all(x.sent == Params(temperature=0.3, max_tokens=200) for x in held)


def test_fixed_temperature_model_gets_no_temperature_it_was_not_sent() -> None:
    d = decider(tune="always", limits=ModelLimits(fixed_temperature=1.0))
    assert all(x.sent.temperature is None for x in decide_many(d, ctx(max_tokens=300), 20))
    assert all(x.sent.temperature == 1.0 for x in decide_many(d, ctx(temperature=0.4, max_tokens=300), 20))


# ---- always-on holdout ---------------------------------------------------------------


@pytest.mark.parametrize("phase", MODES)
def test_holdout_share_in_every_phase(phase: str) -> None:
    d = decider(phase=phase, holdout=0.05)
    n = 4000
    decisions = decide_many(d, ctx(temperature=0.7, max_tokens=600), n)
    held = [x for i, x in enumerate(decisions) if assign(f"k{i}", 0.05, HOLDOUT_SALT)]
    assert abs(len(held) / n - 0.05) < 0.012  # binomial sd ≈ 0.0034
    assert all(x.mode == "holdout" and x.propensity == 1.0 and x.sent == Params(0.7, 600) for x in held)
    optimised = sum(x.mode == "optimized" for x in decisions) / n
    expected = 0.0 if phase == "shadow" else MODE_TRAFFIC[phase] * 0.95  # drawn independently among the rest
    assert abs(optimised - expected) < 0.03
    if phase == "general":
        assert {x.mode for x in decisions} == {"optimized", "holdout"}
    if phase == "shadow":
        assert {x.mode for x in decisions} == {"shadow", "holdout"}


def test_holdout_is_independent_of_the_rollout_share() -> None:
    keys = [f"user-{i}" for i in range(4000)]
    both = sum(assign(k, 0.05) and assign(k, 0.05, HOLDOUT_SALT) for k in keys)
    assert both < 40  # ≈ 0.25 % (10 keys) when independent; the same hash would put all ~200 in both


class RecordingBaseline(RecordingUpdates, BaselinePolicy):
    """The real baseline policy, keeping the updates it receives."""


def test_holdout_outcomes_update_the_policy_as_the_baseline_arm() -> None:
    policy = RecordingBaseline()
    d = decider(holdout=1.0, policy=policy)
    [x] = decide_many(d, ctx(temperature=0.7, max_tokens=600), 1)
    assert x.mode == "holdout" and x.propensity == 1.0
    reward = d.score(x, status=200, error_class=None, latency_s=0.1, completion_tokens=10, quality=0.9)
    asyncio.run(d.observe(x, Outcome(request_id=x.request_id, status=200, latency_s=0.1, completion_tokens=10, quality=0.9, reward=reward)))
    assert [(b, a) for b, a, _ in policy.updates] == [(Arm(0.7, 600), Arm(0.7, 600))]


# ---- configuration ----------------------------------------------------------------------


def test_config_keys_and_one_line_errors() -> None:
    cfg = build_config({}, environ={})
    assert (cfg.optimization.tune_temperature, cfg.optimization.min_quality_signals, cfg.optimization.holdout_fraction) == ("auto", 50, 0.05)
    assert (cfg.constraints.max_relative_delta_max_tokens, cfg.constraints.raise_client_max_tokens) == (0.5, False)
    assert cfg.baseline_for("anything") == BaselineSettings(temperature=None, max_tokens=None)
    with pytest.raises(ConfigError, match="holdout_fraction"):
        build_config({"optimization": {"holdout_fraction": 1.0}}, environ={})
    with pytest.raises(ConfigError, match="tune_temperature.*auto, always, never"):
        build_config({"optimization": {"tune_temperature": "sometimes"}}, environ={})
    with pytest.raises(ConfigError, match="max_relative_delta_max_tokens"):
        build_config({"constraints": {"max_relative_delta_max_tokens": 2}}, environ={})
    up = {"name": "u", "base_url": "http://127.0.0.1:1", "models_config": [{"pattern": "*", "default_temperature": 3.0}]}
    with pytest.raises(ConfigError, match="default_temperature"):
        build_config({"upstreams": [up]}, environ={})
