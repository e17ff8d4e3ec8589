"""Reasoning effort as an ordinal knob: the scale, the grid, the trust region, the records, the config."""

from __future__ import annotations

import msgspec
import pytest

from guards.settings import ConstraintsSettings
from guards.trust_region import Freedom, ModelLimits, allowed_arms, enforce, within
from policies.arms import candidate_arms
from policies.baseline import baseline_index
from policies.effort import ANTHROPIC_EFFORTS, EFFORT_LEVELS, neighbours, rank, scale_of, shift, steps
from policies.effort import within as effort_within
from policies.records import Arm, Params
from policies.settings import ArmGridSettings
from policies.thompson import bucket_of, stat_key
from proxy.config import ConfigError, build_config

C = ConstraintsSettings()  # max_delta_effort_levels = 1
L = ModelLimits()


def test_scale_matches_the_installed_sdks() -> None:
    from typing import get_args

    from anthropic.types.output_config_param import OutputConfigParam
    from openai.types.shared.reasoning_effort import ReasoningEffort

    openai_levels = next(get_args(a) for a in get_args(ReasoningEffort) if get_args(a))
    assert tuple(openai_levels) == EFFORT_LEVELS
    effort_type = OutputConfigParam.__annotations__["effort"]
    assert "'low', 'medium', 'high', 'xhigh', 'max'" in str(effort_type)
    assert all(level in EFFORT_LEVELS for level in ANTHROPIC_EFFORTS)


def test_shift_steps_and_within_by_hand() -> None:
    assert shift("medium", 1) == "high" and shift("medium", -2) == "minimal" and shift("max", 1) is None and shift("none", -1) is None
    assert steps("low", "xhigh") == 3 and rank("none") == 0
    assert effort_within("low", "medium", 1) and not effort_within("low", "high", 1) and effort_within("low", "high", 2)
    assert effort_within(None, None, 0) and not effort_within("low", None, 5) and not effort_within(None, "low", 5)
    with pytest.raises(ValueError, match="unknown effort level"):
        rank("huge")


def test_steps_count_only_the_levels_a_model_accepts() -> None:
    scale = scale_of(("max", "medium", "high", "bogus"))
    assert scale == ("medium", "high", "max")
    assert shift("high", 1, scale) == "max"  # xhigh is skipped: the model does not take it
    assert neighbours("high", 1, scale) == ["high", "medium", "max"]
    assert neighbours("medium", 2, ANTHROPIC_EFFORTS) == ["medium", "low", "high", "xhigh"]
    assert scale_of(()) == EFFORT_LEVELS


def test_arm_without_effort_encodes_hashes_and_compares_as_before() -> None:
    assert msgspec.json.encode(Arm(0.7, 500)) == b'{"temperature":0.7,"max_tokens":500}'
    assert msgspec.json.decode(b'{"temperature":0.7,"max_tokens":500}', type=Arm) == Arm(0.7, 500)
    assert Arm(0.7, 500) != Arm(0.7, 500, "low") and len({Arm(0.7, 500), Arm(0.7, 500, "low"), Arm(0.7, 500, "high")}) == 3
    assert Params(max_tokens=700, effort="high").render() == "max_tokens=700; effort=high"
    assert Params(temperature=0.5).arm(Params(temperature=0.2, max_tokens=9, effort="low")) == Arm(0.5, 9, "low")
    assert msgspec.json.encode(Params(temperature=0.5)) == b'{"temperature":0.5}'


def test_grid_without_effort_is_unchanged_and_with_effort_adds_neighbours() -> None:
    grid = ArmGridSettings()
    plain = candidate_arms(Arm(0.7, 1000), max_delta_temperature=0.2, max_delta_max_tokens=500, grid=grid)
    again = candidate_arms(Arm(0.7, 1000), max_delta_temperature=0.2, max_delta_max_tokens=500, grid=grid, max_delta_effort_levels=1)
    assert plain == again and all(a.effort is None for a in plain)
    tuned = candidate_arms(Arm(0.7, 1000, "medium"), max_delta_temperature=0.2, max_delta_max_tokens=500, grid=grid, max_delta_effort_levels=1)
    assert tuned[0] == Arm(0.7, 1000, "medium")
    assert len(tuned) == 3 * len(plain) and len(set(tuned)) == len(tuned)
    assert {a.effort for a in tuned} == {"low", "medium", "high"}
    # The arms at the baseline's own effort come in the plain grid's order.
    assert [msgspec.structs.replace(a, effort=None) for a in tuned if a.effort == "medium"] == plain
    capped = candidate_arms(Arm(0.7, 1000, "max"), max_delta_temperature=0.0, max_delta_max_tokens=0, grid=grid,
                            max_delta_effort_levels=2, efforts=ANTHROPIC_EFFORTS)
    assert capped == [Arm(0.7, 1000, "max"), Arm(0.7, 1000, "xhigh"), Arm(0.7, 1000, "high")]


def test_trust_region_bounds_effort_steps() -> None:
    base = Arm(0.7, 1000, "medium")
    assert within(Arm(0.7, 1000, "high"), base, C, L) and within(Arm(0.7, 1000, "low"), base, C, L)
    assert not within(Arm(0.7, 1000, "xhigh"), base, C, L)
    assert within(Arm(0.7, 1000, "xhigh"), base, ConstraintsSettings(max_delta_effort_levels=2), L)
    assert not within(Arm(0.7, 1000, "high"), base, ConstraintsSettings(max_delta_effort_levels=0), L)
    assert not within(Arm(0.7, 1000, "high"), base, C, L, Freedom(effort=False))
    # Neither adds an effort the client did not send nor drops one it did.
    assert not within(Arm(0.7, 1000, "low"), Arm(0.7, 1000), C, L)
    assert not within(Arm(0.7, 1000), base, C, L)
    # Model capabilities: only accepted levels, steps counted over them.
    limited = ModelLimits(efforts=("medium", "max"))
    assert within(Arm(0.7, 1000, "max"), base, C, limited) and not within(Arm(0.7, 1000, "high"), base, C, limited)
    assert enforce(Arm(0.7, 1000, "max"), base, C, L) == base
    allowed = allowed_arms([Arm(0.7, 1000, e) for e in EFFORT_LEVELS], base, C, L)
    assert [a.effort for a in allowed] == ["low", "medium", "high"]


def test_policy_keys_tell_effort_levels_apart() -> None:
    assert stat_key("b", Arm(0.7, 500)) == "b|T0.7|M500"  # unchanged without effort
    key = stat_key("chat|m", Arm(0.7, 500, "high"))
    assert key == "chat|m|T0.7|M500@high" and bucket_of(key) == "chat|m"
    arms = [Arm(0.7, 500, "low"), Arm(0.7, 500, "medium")]
    assert baseline_index(Arm(0.7, 500, "medium"), arms) == 1


def _cfg(**doc: object) -> None:
    build_config(dict(doc), environ={})


def test_config_validates_effort_keys_in_one_line() -> None:
    _cfg(constraints={"max_delta_effort_levels": 2}, baseline={"default": {"effort": "low"}},
         upstreams=[{"name": "a", "base_url": "http://127.0.0.1:1/v1", "format": "anthropic",
                     "models_config": [{"pattern": "claude-*", "efforts": ["low", "high"], "accepts_temperature": False}]}])
    cases = [
        ({"constraints": {"max_delta_effort_levels": -1}}, "constraints.max_delta_effort_levels"),
        ({"baseline": {"code": {"effort": "huge"}}}, "baseline.code.effort"),
        ({"upstreams": [{"name": "a", "base_url": "http://h/v1", "format": "gemini"}]}, "upstreams[0].format"),
        ({"upstreams": [{"name": "a", "base_url": "http://h/v1", "format": "anthropic", "models_config": [{"pattern": "*", "efforts": ["minimal"]}]}]},
         "upstreams[a].models_config[*].efforts"),
    ]
    for doc, key in cases:
        with pytest.raises(ConfigError) as info:
            _cfg(**doc)
        assert key in str(info.value) and "\n" not in str(info.value)
