"""Does the judge reward length? A test that needs no explicit feedback.

Within one arm (the same settings for the same task type) the length of an answer varies by
chance: the prompt, the sampling. Real quality may move with it a little, but a judge whose
scores climb with length *within* an arm is mostly rewarding length, a well-documented bias
of LLM judges, and between arms it would push traffic towards settings that write more
(hotter, higher effort) and cost more, for nothing.

The statistic. Judged answers of one (task type, arm) are paired as they arrive, each answer in
at most one pair (the first waits, the second closes the pair). A pair's differences (Δ length,
Δ score) are within-arm centred data: the arm's own mean quality and length cancel, so pairs
from every arm (holdout included) pool into one per-task statistic. For each pair with both
differences non-zero, x = 1 when they have the same sign (concordant), else 0.

Why this test is honest. If, within an arm, the score does not depend on the length and the
answers are exchangeable, the sign of Δ score is independent of the sign of Δ length and each x
is a fair coin, independent of every other pair (disjoint pairs). So the mean of x is 1/2 under
the null, whatever the distribution of lengths and scores (discrete 1-10 scores, skewed lengths,
ties: all fine), and the anytime-valid confidence sequence of `policies.sequences` over the x's
can be checked after every judged answer: P(ever flagging a judge whose concordance is at most
1/2 + margin) ≤ α. The price of distribution-freeness is power: a sign throws away magnitudes
(bench/judge_bias.py measures how many judged answers it takes).

The flag is `lower bound of P(concordant) > 1/2 + margin`: a margin (default 0.1, i.e. Kendall's
τ of score on length within an arm above 0.2) leaves room for the genuine part, where longer
answers really are a little better, so a truthful judge on such a task is not flagged
(bench/judge_bias.py: real quality rising by 0.05 per doubling of length gives a concordance of
about 0.59). Cut answers (finish reason "length") are left out by the caller: their length is the
cap's, not chance's, and they are the worst of their arm, which would hide a length-biased judge.

The slope (quality per doubling of the answer's length, pooled within arms: Σ Δq·Δlog₂n / Σ Δlog₂n²)
is reported next to it, for a person to read: it is not what the test uses.
"""

from __future__ import annotations

import math

import msgspec

from policies.sequences import MeanSequence, bounds, new_sequence, observe


class LengthBias(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One task type's within-arm pairs: the concordance sequence and the pooled slope sums."""

    concordance: MeanSequence = msgspec.field(default_factory=new_sequence)
    pairs: int = 0  # closed pairs, ties included
    ties: int = 0  # pairs with equal lengths or equal scores (no sign, not in the sequence)
    sxy: float = 0.0  # Σ Δlog2(length) · Δquality
    sxx: float = 0.0  # Σ Δlog2(length)²
    # The running intersection of the sequence's bounds: the tightest seen so far. A confidence sequence
    # covers at every n at once, so the intersection covers too (same α), and it never loosens: a judge
    # flagged once stays above the line in every report, instead of drifting below it by chance.
    low: float = 0.0
    high: float = 1.0


def new_length_bias(alpha: float = 0.05) -> LengthBias:
    return LengthBias(concordance=new_sequence(alpha))


def observe_pair(state: LengthBias, length_a: int, quality_a: float, length_b: int, quality_b: float) -> LengthBias:
    """Fold one within-arm pair (two judged answers of the same arm) into the statistic."""
    if length_a <= 0 or length_b <= 0:
        raise ValueError("answer lengths must be positive")
    dx = math.log2(length_a) - math.log2(length_b)
    dy = float(quality_a) - float(quality_b)
    sxy, sxx = state.sxy + dx * dy, state.sxx + dx * dx
    if dx == 0.0 or dy == 0.0:
        return msgspec.structs.replace(state, pairs=state.pairs + 1, ties=state.ties + 1, sxy=sxy, sxx=sxx)
    concordant = 1.0 if (dx > 0) == (dy > 0) else 0.0
    moved = msgspec.structs.replace(state, concordance=observe(state.concordance, concordant), pairs=state.pairs + 1, sxy=sxy, sxx=sxx)
    low, high = concordance_bounds(moved)
    return msgspec.structs.replace(moved, low=low, high=high)


def concordance_bounds(state: LengthBias) -> tuple[float, float]:
    """Anytime-valid (1 − α) bounds of P(Δ score has the sign of Δ length), over the untied pairs: the running intersection.

    Intersected with the sequence's bounds now as well, so a state saved before the running bounds were kept
    reads right at once after an upgrade.
    """
    now_low, now_high = bounds(state.concordance)
    low, high = max(state.low, now_low), min(state.high, now_high)
    if low > high:  # disjoint (probability ≤ α): the latest bounds, rather than an empty interval
        return now_low, now_high
    return low, high


def slope(state: LengthBias) -> float | None:
    """Quality per doubling of the answer's length, pooled within arms (None before any length difference)."""
    return state.sxy / state.sxx if state.sxx > 0.0 else None


def rewards_length(state: LengthBias, margin: float) -> bool:
    """Surely more concordant than 1/2 + `margin`: the judge's scores follow length within arms."""
    return state.concordance.n > 0 and concordance_bounds(state)[0] > 0.5 + margin
