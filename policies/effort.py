"""Reasoning effort as an ordinal knob: named levels on one scale, moved by whole steps.

OpenAI chat `reasoning_effort` and Responses `reasoning.effort` take
none < minimal < low < medium < high < xhigh < max (the installed SDK's
`ReasoningEffort`); Anthropic `output_config.effort` takes low … max. Both sit on one
scale so a bucket's statistics mean the same thing across formats. A model may accept
only some levels (`models_config` `efforts`): steps are then counted over the levels it
accepts, so "one step up" from `medium` on a model without `xhigh` is `high`, then `max`.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

EFFORT_LEVELS: tuple[str, ...] = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
OPENAI_EFFORTS: tuple[str, ...] = EFFORT_LEVELS
ANTHROPIC_EFFORTS: tuple[str, ...] = ("low", "medium", "high", "xhigh", "max")


def scale_of(accepted: Sequence[str] = ()) -> tuple[str, ...]:
    """The levels a model accepts in scale order (all of them when `accepted` is empty);
    names outside `EFFORT_LEVELS` are ignored."""
    if not accepted:
        return EFFORT_LEVELS
    wanted = set(accepted)
    return tuple(level for level in EFFORT_LEVELS if level in wanted)


def rank(level: str, scale: Sequence[str] = EFFORT_LEVELS) -> int:
    """Position of `level` on `scale`; ValueError for a level the scale does not hold."""
    try:
        return list(scale).index(level)
    except ValueError:
        raise ValueError(f"unknown effort level {level!r} (known: {', '.join(scale)})") from None


def shift(level: str, k: int, scale: Sequence[str] = EFFORT_LEVELS) -> str | None:
    """`level` moved `k` steps along `scale` (negative = less effort); None past either end."""
    i = rank(level, scale) + k
    return scale[i] if 0 <= i < len(scale) else None


def steps(a: str, b: str, scale: Sequence[str] = EFFORT_LEVELS) -> int:
    """Signed number of steps from `a` to `b`."""
    return rank(b, scale) - rank(a, scale)


def within(a: str | None, b: str | None, max_levels: int, scale: Sequence[str] = EFFORT_LEVELS) -> bool:
    """True when `a` is at most `max_levels` steps from `b` on `scale`.

    Two absent efforts agree; an absent one never matches a present one (adding or
    dropping the field is not a step), and a level the scale does not hold is outside.
    """
    if a is None or b is None:
        return a is None and b is None
    if a not in scale or b not in scale:
        return False
    return abs(steps(a, b, scale)) <= max_levels


def neighbours(level: str, max_levels: int, scale: Sequence[str] = EFFORT_LEVELS) -> list[str]:
    """`level` first, then the levels within `max_levels` steps, nearest first, lower before higher."""
    out = [level]
    for k in range(1, max(0, max_levels) + 1):
        for candidate in (shift(level, -k, scale), shift(level, k, scale)):
            if candidate is not None:
                out.append(candidate)
    return out
