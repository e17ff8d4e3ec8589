"""Quality signals that arrive after the response, and which one wins.

A request can be scored several times: the automatic rules at completion, an implicit
signal (the client regenerated it), the LLM judge, explicit `record-outcome`
feedback. The policy must learn from the most trustworthy of them exactly once, so a
later signal replaces the stored one (through `correct()`) only when its source ranks
at least as high; a weaker one arriving later is dropped.
"""

from __future__ import annotations

from typing import Literal

import msgspec

SignalSource = Literal["automatic", "implicit", "judge", "judge_pairwise", "explicit"]

# Higher wins. Explicit feedback is a human (or the client's own check); the judge read the
# answer (pointwise, or against the baseline's answer: `judge_pairwise`, one mode at a time);
# an implicit mark only infers dissatisfaction; the automatic rules see the form only.
PRIORITY: dict[str, int] = {"automatic": 0, "implicit": 1, "judge": 2, "judge_pairwise": 2, "explicit": 3}

GUARDED_KINDS: tuple[str, ...] = ("automatic", "judge", "judge_pairwise", "explicit")
"""Signal kinds the guards (conservative monitor, promotion) compare, each only with itself.

`implicit` is left out: regeneration marks are one-sided (only failures are marked), so a
stream of them has no mean to compare.
"""

WIN_RATE_KINDS = frozenset({"judge_pairwise"})
"""Kinds whose values are a win rate against the baseline answer (0.5 = no difference), not a quality."""

PAIRWISE_QUALITY: dict[str, float] = {"win": 1.0, "tie": 0.5, "loss": 0.0}
"""A pairwise judgment as quality: the request's answer against a baseline answer to the same request.

The scale is "how often the request's arm beats the baseline", on which the baseline itself
sits at 0.5 (two answers from the same arm win, lose or tie with each other symmetrically),
so a tuned arm's mean rises above the baseline's exactly when it wins more than it loses.
"""


class Signal(msgspec.Struct, frozen=True):
    """A quality score for one request, from one source, in [0, 1]."""

    request_id: str
    quality: float
    source: SignalSource
    at: float = 0.0  # unix seconds; 0 when the producer has no clock to hand
    reason: str = ""
    guards_only: bool = False  # for the guards' comparisons only, never the policy (proxy/decision/feedback.deliver_signal)


def rank(source: str | None) -> int:
    """Priority of `source`; an unknown or missing source ranks as automatic."""
    return PRIORITY.get(source or "automatic", 0)


def should_replace(old_source: str | None, new_source: str) -> bool:
    """Whether a signal from `new_source` replaces the stored one from `old_source`.

    Equal rank replaces (a judge re-run or an explicit overwrite is the newer opinion of the
    same kind); the explicit path still asks for `overwrite` on top of this.
    """
    return rank(new_source) >= rank(old_source)


def judge_quality(score: float) -> float:
    """A 1-10 judge score as quality in [0, 1]: (score - 1) / 9, clamped."""
    return min(1.0, max(0.0, (float(score) - 1.0) / 9.0))
