"""How far the LLM judge agrees with explicit feedback, and whether its scores may still teach.

A judge is only worth listening to while it ranks answers the way the people (or the
client's own checks) behind explicit feedback do. Spearman's rank correlation measures
exactly that and ignores a constant offset or a monotone rescaling of the judge's scale;
the mean difference (judge - explicit) reports the offset separately. Both are computed
over (judge, explicit) quality pairs of the same requests.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np


class Agreement(msgspec.Struct, frozen=True):
    """Judge vs explicit feedback on the requests that have both; `spearman` is None below 2 pairs or with a constant side."""

    n: int
    spearman: float | None
    mean_difference: float | None  # mean of judge - explicit, in quality units [−1, 1]


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing the mean of the ranks they span (the usual Spearman convention)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start of each run of equal values, and the run each sorted position belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run = np.repeat(np.arange(len(starts)), ends - starts)
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=float)
    ranks[order] = mean_rank[run]
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of the average ranks; None when undefined (n < 2 or a side is constant)."""
    if len(x) != len(y):
        raise ValueError("spearman needs two sequences of the same length")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(np.asarray(x, dtype=float)), average_ranks(np.asarray(y, dtype=float))
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((dx * dx).sum() * (dy * dy).sum()))
    if denom == 0.0:
        return None
    return float((dx * dy).sum() / denom)


def agreement(pairs: Sequence[tuple[float, float]]) -> Agreement:
    """Agreement over (judge quality, explicit quality) pairs."""
    if not pairs:
        return Agreement(n=0, spearman=None, mean_difference=None)
    judge = [p[0] for p in pairs]
    explicit = [p[1] for p in pairs]
    diff = float(np.mean(np.asarray(judge, dtype=float) - np.asarray(explicit, dtype=float)))
    return Agreement(n=len(pairs), spearman=spearman(judge, explicit), mean_difference=diff)


def judge_trusted(pairs: Sequence[tuple[float, float]], min_agreement: float, min_pairs: int) -> bool:
    """Whether the judge's signals may teach the policy for a task type.

    Innocent until proven otherwise: below `min_pairs` there is not enough evidence to
    overrule it. With enough pairs, an undefined correlation (one side constant: a judge that
    gives everything the same score tells nothing about rank) counts as no agreement.
    """
    if len(pairs) < min_pairs:
        return True
    rho = agreement(pairs).spearman
    return rho is not None and rho >= min_agreement
