"""Candidate arms: a grid of (temperature, max_tokens) deltas around the baseline.

The grid is `temperature_steps` evenly spaced deltas in [-max_delta_temperature,
+max_delta_temperature] times `max_tokens_steps` evenly spaced deltas in
[-max_delta_max_tokens, +max_delta_max_tokens].  Delta 0 is always part of each
axis (added when an even step count would skip it), and **the baseline arm is
always index `BASELINE_INDEX` (0)**; the other arms follow in row-major order
(temperature delta outer, max_tokens delta inner), duplicates removed.

When the baseline has an effort level, every (temperature, max_tokens) pair is also
offered at the effort levels within `max_delta_effort_levels` steps (policies/effort.py,
over the levels in `efforts`, all levels when empty), nearest first; the baseline's own
effort comes first so the arm order without effort shifts is unchanged. A baseline
without effort gives exactly the grid it always gave.

Model limits (max temperature, context window, the trust region's own bounds) are
the guards' business; this module only drops arms that no API accepts at all:
negative temperatures and max_tokens below 1.
"""

from __future__ import annotations

import numpy as np

from policies.effort import neighbours, scale_of
from policies.records import Arm
from policies.settings import ArmGridSettings

BASELINE_INDEX = 0
"""Index of the baseline arm in every list `candidate_arms` returns."""


def arm_key(arm: Arm) -> tuple[float, int]:
    """Canonical absolute key of an arm: temperature rounded to 3 decimals, max_tokens."""
    return (round(arm.temperature, 3) + 0.0, int(arm.max_tokens))


def arm_model_key(arm: Arm) -> tuple[float, int, str | None]:
    """`arm_key` plus the model: a declared stand-in's arm (`Arm.model`) is another arm for OPE and replay."""
    return (*arm_key(arm), arm.model)


def arm_identity(arm: Arm) -> tuple[float, int, str | None]:
    """`arm_key` plus the effort: what tells two arms apart once effort is a knob."""
    return (*arm_key(arm), arm.effort)


def _axis(max_delta: float, steps: int) -> list[float]:
    """Evenly spaced deltas in [-max_delta, max_delta], always containing 0."""
    if steps <= 1 or max_delta <= 0:
        return [0.0]
    values = [float(v) for v in np.linspace(-max_delta, max_delta, steps)]
    if not any(abs(v) < 1e-12 for v in values):
        values.append(0.0)
        values.sort()
    return values


def candidate_arms(
    baseline: Arm,
    *,
    max_delta_temperature: float,
    max_delta_max_tokens: int,
    grid: ArmGridSettings,
    max_delta_effort_levels: int = 0,
    efforts: tuple[str, ...] = (),
) -> list[Arm]:
    """The candidate grid around `baseline`, baseline first (see module docstring)."""
    base_t, base_m = arm_key(baseline)
    first = Arm(temperature=base_t, max_tokens=base_m, effort=baseline.effort)
    scale = scale_of(efforts)
    levels: list[str | None] = [baseline.effort]
    if baseline.effort is not None and baseline.effort in scale:
        levels = list(neighbours(baseline.effort, max_delta_effort_levels, scale))
    arms = [first]
    seen = {arm_identity(first)}
    for dt in _axis(float(max_delta_temperature), grid.temperature_steps):
        temperature = round(base_t + dt, 3) + 0.0
        if temperature < 0:
            continue
        for dm in _axis(float(max_delta_max_tokens), grid.max_tokens_steps):
            max_tokens = round(base_m + dm)
            if max_tokens < 1:
                continue
            for effort in levels:
                candidate = Arm(temperature=temperature, max_tokens=max_tokens, effort=effort)
                key = arm_identity(candidate)
                if key not in seen:
                    seen.add(key)
                    arms.append(candidate)
    return arms
