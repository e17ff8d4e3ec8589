"""Trust region: which sampling parameters Thermostat may send instead of the baseline.

The baseline is what the client sent (or, for a field it did not send, the
configured per-task baseline). Thermostat may only move a little away from it, so
that it can never make a request much worse than the client's own choice:

- ``|temperature - baseline.temperature| <= constraints.max_delta_temperature``
- ``|max_tokens - baseline.max_tokens| <= max_tokens_delta(baseline.max_tokens)``: the
  absolute ``constraints.max_delta_max_tokens``, narrowed to
  ``constraints.max_relative_delta_max_tokens`` of the baseline (50 -> at most 25)
- per request (`Freedom`): a knob without evidence or without a reference value
  stays at the baseline, and a ``max_tokens`` the client set is an upper bound
  (``max_tokens_cap``) unless ``constraints.raise_client_max_tokens``
- temperature inside the valid range: the intersection of the operator's range
  (``constraints.min/max_temperature``) and the model's (`ModelLimits`); if the
  model only accepts one temperature (``fixed_temperature``), exactly that one
- ``1 <= max_tokens <= constraints.max_tokens`` and ``<= limits.max_tokens`` if set
- finite numbers and an integral ``max_tokens`` (policy output is not trusted)
- reasoning effort at most ``constraints.max_delta_effort_levels`` steps from the
  baseline's (policies/effort.py), counted over the levels the model accepts
  (``limits.efforts``, all levels when empty), and only a level it accepts; an arm
  may neither add an effort the baseline lacks nor drop one it has, and with
  ``Freedom.effort`` false the effort stays the baseline's

Comparisons allow ``EPS`` (1e-9) of float slack so that a grid built as
``0.7 + 0.2`` is not rejected for being ``0.20000000000000007`` away.

API (pure, no clock, no I/O)::

    limits = ModelLimits(min_temperature=0.0, max_temperature=2.0,
                         fixed_temperature=None, max_tokens=None)
    free = Freedom(temperature=False, max_tokens=True, max_tokens_cap=50)   # FREE: both knobs, no cap
    arms = allowed_arms(candidates, baseline, constraints, limits, free)  # what the policy may pick from
    arm = enforce(verdict.arm, baseline, constraints, limits, free)       # last line before patching the body

`allowed_arms` keeps the baseline if it is itself valid (so "change nothing" is
always an option for the policy) and returns ``[baseline]`` if nothing else fits.
`enforce` returns its argument if it is inside the region and the baseline
otherwise, so whatever upstream code did, nothing outside the region leaves.
The baseline itself is always sendable: it is the client's own request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from guards.settings import ConstraintsSettings
from policies import effort as effort_scale
from policies.records import Arm

EPS = 1e-9


class ModelLimits(msgspec.Struct, frozen=True):
    """What the target model accepts (from the upstream's per-model settings).

    Maps 1:1 from `proxy.config.ModelSettings` (``max_tokens`` <- ``max_tokens_limit``).
    """

    min_temperature: float = 0.0
    max_temperature: float = 2.0
    fixed_temperature: float | None = None  # e.g. reasoning models that only take 1.0
    max_tokens: int | None = None
    default_temperature: float | None = None  # the provider's value when none is sent
    efforts: tuple[str, ...] = ()  # effort levels the model accepts; empty = every level
    accepts_temperature: bool = True  # False: a temperature is never added or moved (the decider reads it)


class Freedom(msgspec.Struct, frozen=True):
    """Which knobs may move for one request, and the client's own cap.

    A knob moves only on evidence that can see it (temperature) and only when it has a
    reference value to move around; `max_tokens_cap` is the client's explicit limit.
    """

    temperature: bool = True
    max_tokens: bool = True
    max_tokens_cap: int | None = None
    effort: bool = True


FREE = Freedom()


def max_tokens_delta(baseline_max_tokens: int, constraints: ConstraintsSettings) -> int:
    """Largest |Δ max_tokens| around `baseline_max_tokens`: the absolute band or the relative one, whichever is tighter."""
    relative = int(constraints.max_relative_delta_max_tokens * max(0, baseline_max_tokens))
    return max(0, min(constraints.max_delta_max_tokens, relative))


def temperature_range(constraints: ConstraintsSettings, limits: ModelLimits) -> tuple[float, float]:
    """The valid temperature interval: operator range intersected with the model's."""
    low = max(constraints.min_temperature, limits.min_temperature)
    high = min(constraints.max_temperature, limits.max_temperature)
    return low, high


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def valid_for_model(arm: Arm, constraints: ConstraintsSettings, limits: ModelLimits) -> bool:
    """Absolute validity (no reference to the baseline): range, fixed temperature, token caps."""
    t = arm.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        return False
    if not _is_int(arm.max_tokens):
        return False
    low, high = temperature_range(constraints, limits)
    if not (low - EPS <= t <= high + EPS):
        return False
    if limits.fixed_temperature is not None and abs(t - limits.fixed_temperature) > EPS:
        return False
    if arm.max_tokens < 1 or arm.max_tokens > constraints.max_tokens:
        return False
    return limits.max_tokens is None or arm.max_tokens <= limits.max_tokens


def within(arm: Arm, baseline: Arm, constraints: ConstraintsSettings, limits: ModelLimits, freedom: Freedom = FREE) -> bool:
    """True when `arm` is inside the trust region around `baseline`."""
    if not valid_for_model(arm, constraints, limits):
        return False
    if not math.isfinite(baseline.temperature):
        return False
    max_dt = constraints.max_delta_temperature if freedom.temperature else 0.0
    if abs(arm.temperature - baseline.temperature) > max_dt + EPS:
        return False
    if freedom.max_tokens_cap is not None and arm.max_tokens > freedom.max_tokens_cap:
        return False
    max_dm = max_tokens_delta(baseline.max_tokens, constraints) if freedom.max_tokens else 0
    if abs(arm.max_tokens - baseline.max_tokens) > max_dm:
        return False
    return effort_within(arm.effort, baseline.effort, constraints, limits, freedom)


def effort_within(effort: str | None, baseline: str | None, constraints: ConstraintsSettings, limits: ModelLimits, freedom: Freedom = FREE) -> bool:
    """The effort part of `within`: same presence as the baseline, a level the model accepts, few steps away."""
    if effort == baseline:
        return True  # the client's own level (or none) is always sendable
    scale = effort_scale.scale_of(limits.efforts)
    max_levels = max(0, constraints.max_delta_effort_levels) if freedom.effort else 0
    return effort_scale.within(effort, baseline, max_levels, scale)


def allowed_arms(
    candidates: Sequence[Arm],
    baseline: Arm,
    constraints: ConstraintsSettings,
    limits: ModelLimits,
    freedom: Freedom = FREE,
) -> list[Arm]:
    """Candidates inside the region, in their original order, without duplicates.

    The baseline is appended if it is valid and not already present, so the policy
    can always choose "no change". If no candidate is valid, ``[baseline]``.
    """
    seen: set[Arm] = set()
    out: list[Arm] = []
    for arm in candidates:
        if arm in seen or not within(arm, baseline, constraints, limits, freedom):
            continue
        seen.add(arm)
        out.append(arm)
    if baseline not in seen and within(baseline, baseline, constraints, limits, freedom):
        out.append(baseline)
    return out or [baseline]


def enforce(
    arm: Arm | None, baseline: Arm, constraints: ConstraintsSettings, limits: ModelLimits, freedom: Freedom = FREE
) -> Arm:
    """What gets sent: `arm` if it is inside the region, else the baseline."""
    if arm is not None and within(arm, baseline, constraints, limits, freedom):
        return arm
    return baseline
