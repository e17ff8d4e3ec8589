"""The decider's reference over the knobs a request has: effort, and temperature where a model takes one.

Pure: the reference and the allowed arms are computed from hand-built contexts and limits.
"""

from __future__ import annotations

from guards.settings import BaselineSettings, ConstraintsSettings
from guards.trust_region import ModelLimits
from policies.records import RequestContext
from policies.settings import ArmGridSettings
from proxy.decision import BanditDecider
from proxy.decision.decider import reference, reference_effort, tuned_params
from tests.support.decider import build_decider

C = ConstraintsSettings()
EFFORTS = ("low", "medium", "high", "xhigh")


def ctx(endpoint: str = "chat", temperature: float | None = 0.7, effort: str | None = None) -> RequestContext:
    return RequestContext("code", "m", endpoint, 100, 1, False, False, False, temperature, 600, "up", effort)


def decider(limits: ModelLimits, stand_in: BaselineSettings | None = None) -> BanditDecider:
    return build_decider(
        constraints=C, grid=ArmGridSettings(temperature_steps=3, max_tokens_steps=3), stand_in=stand_in or BaselineSettings(),
        limits=limits, tune="always",
    )


def test_effort_moves_one_level_only_on_a_model_that_lists_its_efforts() -> None:
    ref, allowed, _ = decider(ModelLimits(efforts=EFFORTS)).reference_for(ctx(effort="medium"))
    assert ref.sent.effort == "medium" and ref.freedom.effort
    assert {a.effort for a in allowed} == {"low", "medium", "high"}  # max_delta_effort_levels = 1
    ref, allowed, _ = decider(ModelLimits()).reference_for(ctx(effort="medium"))
    assert not ref.freedom.effort and {a.effort for a in allowed} == {"medium"}


def test_effort_stand_in_only_where_the_format_has_the_field_and_the_model_the_level() -> None:
    stand_in = BaselineSettings(effort="low")
    limits = ModelLimits(efforts=EFFORTS)
    assert reference_effort(ctx(), stand_in, limits) == ("low", True)
    assert reference_effort(ctx("completions"), stand_in, limits) == (None, False)
    assert reference_effort(ctx(), BaselineSettings(effort="minimal"), limits) == (None, False)
    assert reference_effort(ctx(), BaselineSettings(), limits) == (None, False)  # nothing sent, nothing named: untouched


def test_a_model_without_temperature_never_gets_one_added_or_moved() -> None:
    limits = ModelLimits(accepts_temperature=False, default_temperature=1.0)
    ref = reference(ctx(temperature=None), BaselineSettings(temperature=0.5), limits, C, temperature_evidence=True)
    assert ref.sent.temperature is None and not ref.freedom.temperature
    ref, allowed, _ = decider(limits).reference_for(ctx(temperature=0.7))
    assert ref.sent.temperature == 0.7 and {a.temperature for a in allowed} == {0.7}
    assert all(tuned_params(a, ref).temperature == 0.7 for a in allowed)


def test_messages_add_a_temperature_only_where_the_client_sent_one() -> None:
    limits = ModelLimits(max_temperature=1.0, default_temperature=1.0)
    ref, allowed, _ = decider(limits, BaselineSettings(temperature=0.5)).reference_for(ctx("anthropic", temperature=None))
    assert ref.sent.temperature is None and all(tuned_params(a, ref).temperature is None for a in allowed)
    ref, allowed, _ = decider(limits).reference_for(ctx("anthropic", temperature=0.9))
    assert ref.freedom.temperature and all(0.7 - 1e-9 <= a.temperature <= 1.0 for a in allowed)
