"""Trust region: which sampling parameters Thermostat may send instead of the baseline.

The baseline is what the client sent (or, for a field it did not send, the
configured per-task baseline). Thermostat may only move a little away from it, so
that it can never make a request much worse than the client's own choice:

- ``|temperature - baseline.temperature| <= constraints.max_delta_temperature``
- ``|max_tokens - baseline.max_tokens| <= constraints.max_delta_max_tokens``
- temperature inside the valid range: the intersection of the operator's range
  (``constraints.min/max_temperature``) and the model's (`ModelLimits`); if the
  model only accepts one temperature (``fixed_temperature``), exactly that one
- ``1 <= max_tokens <= constraints.max_tokens`` and ``<= limits.max_tokens`` if set
- finite numbers and an integral ``max_tokens`` (policy output is not trusted)

Comparisons allow ``EPS`` (1e-9) of float slack so that a grid built as
``0.7 + 0.2`` is not rejected for being ``0.20000000000000007`` away.

API (pure, no clock, no I/O)::

    limits = ModelLimits(min_temperature=0.0, max_temperature=2.0,
                         fixed_temperature=None, max_tokens=None)
    arms = allowed_arms(candidates, baseline, constraints, limits)  # what the policy may pick from
    arm = enforce(verdict.arm, baseline, constraints, limits)       # last line before patching the body

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


def within(arm: Arm, baseline: Arm, constraints: ConstraintsSettings, limits: ModelLimits) -> bool:
    """True when `arm` is inside the trust region around `baseline`."""
    if not valid_for_model(arm, constraints, limits):
        return False
    if not math.isfinite(baseline.temperature):
        return False
    if abs(arm.temperature - baseline.temperature) > constraints.max_delta_temperature + EPS:
        return False
    return abs(arm.max_tokens - baseline.max_tokens) <= constraints.max_delta_max_tokens


def allowed_arms(
    candidates: Sequence[Arm],
    baseline: Arm,
    constraints: ConstraintsSettings,
    limits: ModelLimits,
) -> list[Arm]:
    """Candidates inside the region, in their original order, without duplicates.

    The baseline is appended if it is valid and not already present, so the policy
    can always choose "no change". If no candidate is valid, ``[baseline]``.
    """
    seen: set[Arm] = set()
    out: list[Arm] = []
    for arm in candidates:
        if arm in seen or not within(arm, baseline, constraints, limits):
            continue
        seen.add(arm)
        out.append(arm)
    if baseline not in seen and within(baseline, baseline, constraints, limits):
        out.append(baseline)
    return out or [baseline]


def enforce(arm: Arm | None, baseline: Arm, constraints: ConstraintsSettings, limits: ModelLimits) -> Arm:
    """What gets sent: `arm` if it is inside the region, else the baseline."""
    if arm is not None and within(arm, baseline, constraints, limits):
        return arm
    return baseline
