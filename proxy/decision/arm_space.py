"""The arm space: which arms one request may be sent with.

The one place in the decision room that enumerates the knobs (temperature, max_tokens,
effort): the model's limits (`model_limits`, the same live and offline), the baseline a
request stands for (`reference`), the trust region's grid around it, and the lower caps
the task's answers have shown safe (`ArmSpace.candidates`). The plan (`proxy.decision.plan`)
draws from these arms; the learning side feeds the length evidence back (`ArmSpace.observe_length`).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from guards.trust_region import ModelLimits
from proxy.config import ModelSettings, UpstreamSettings, find_model_settings

ANTHROPIC_MAX_TEMPERATURE = 1.0
"""The Messages API's temperature range is 0-1, whatever a model's settings say."""


def model_limits(settings: ModelSettings | None, wire_format: str | None) -> ModelLimits:
    """What a model accepts, from its `[[upstreams.models_config]]` entry and its upstream's wire format.

    The one mapping, used by the live decider (`proxy.runtime.Runtime.limits_for`, which caches it)
    and by `thermostat evaluate`, so both offer the same arms: temperature range and fixed value,
    the token limit, the provider's default temperature, the effort levels, whether the model takes
    a temperature at all, and the Anthropic clamp (also without settings).
    """
    found = (
        ModelLimits(
            min_temperature=settings.min_temperature,
            max_temperature=settings.max_temperature,
            fixed_temperature=settings.fixed_temperature,
            max_tokens=settings.max_tokens_limit,
            default_temperature=settings.default_temperature,
            efforts=settings.efforts,
            accepts_temperature=settings.accepts_temperature,
        )
        if settings is not None
        else ModelLimits()
    )
    if wire_format == "anthropic" and found.max_temperature > ANTHROPIC_MAX_TEMPERATURE:
        found = msgspec.structs.replace(found, max_temperature=ANTHROPIC_MAX_TEMPERATURE)
    return found


def limits_for(upstreams: Sequence[UpstreamSettings], upstream: str, model: str) -> ModelLimits:
    """`model_limits` of `model` on the upstream named `upstream` (an unknown upstream: no limits)."""
    up = next((u for u in upstreams if u.name == upstream), None)
    if up is None:
        return ModelLimits()
    return model_limits(find_model_settings(up, model), up.format)
