"""The length-bias check of the judge: its statistic by hand, its false-alarm rate over many seeds, its state."""

from __future__ import annotations

import asyncio
import math

import msgspec
import numpy as np
import pytest

from guards.state import InProcessStore
from policies.judge_bias import LengthBias, concordance_bounds, new_length_bias, observe_pair, rewards_length, slope
from policies.sequences import bounds, bounds_path
from proxy.decision import JudgeTrust


def test_pairs_by_hand() -> None:
    s = new_length_bias()
    s = observe_pair(s, 200, 0.8, 100, 0.6)  # longer and better: concordant; Δlog2 n = 1, Δq = 0.2
    s = observe_pair(s, 100, 0.9, 400, 0.5)  # shorter and better: discordant; Δlog2 n = -2, Δq = 0.4
    s = observe_pair(s, 100, 0.5, 100, 0.7)  # same length: a tie (no sign), Δlog2 n = 0
    s = observe_pair(s, 300, 0.5, 150, 0.5)  # same score: a tie, Δlog2 n = 1
    assert (s.pairs, s.ties, s.concordance.n, s.concordance.sum_x) == (4, 2, 2, 1.0)
    assert slope(s) == pytest.approx((1 * 0.2 + (-2) * 0.4 + 0 + 0) / (1 + 4 + 0 + 1))
    low, high = concordance_bounds(s)
    assert 0.0 <= low < 0.5 < high <= 1.0
    assert not rewards_length(s, 0.1)
    with pytest.raises(ValueError):
        observe_pair(s, 0, 0.5, 10, 0.5)


def test_a_judge_that_always_prefers_the_longer_answer_is_flagged_and_a_coin_is_not() -> None:
    s = new_length_bias()
    for i in range(200):
        s = observe_pair(s, 100 + i, 0.9, 50 + i, 0.1)
    assert rewards_length(s, 0.1)
    d = [math.log2((100 + i) / (50 + i)) for i in range(200)]
    assert slope(s) == pytest.approx(sum(0.8 * x for x in d) / sum(x * x for x in d))
    rng = np.random.default_rng(0)
    c = new_length_bias()
    for _ in range(2000):
        c = observe_pair(c, int(rng.integers(10, 1000)), float(rng.random()), int(rng.integers(10, 1000)), float(rng.random()))
    assert not rewards_length(c, 0.1)


def test_reported_bounds_are_the_running_intersection_of_the_sequence() -> None:
    """What the report shows and the mute reads: the tightest bounds so far, never loosening (a judge flagged once
    is not shown below the line later by chance), equal to the running max / min of the sequence's own path."""
    rng = np.random.default_rng(5)
    s = new_length_bias()
    xs: list[float] = []
    lows: list[float] = []
    for _ in range(400):
        longer_better = bool(rng.random() < 0.7)
        s = observe_pair(s, 200, 0.8 if longer_better else 0.2, 100, 0.5)
        xs.append(1.0 if longer_better else 0.0)
        lows.append(concordance_bounds(s)[0])
    lower, upper = bounds_path(np.array(xs), alpha=0.05)
    assert concordance_bounds(s) == pytest.approx((float(np.maximum.accumulate(lower)[-1]), float(np.minimum.accumulate(upper)[-1])))
    assert all(b >= a for a, b in zip(lows, lows[1:], strict=False))
    assert lower[-1] < lows[-1] or lower[-1] == pytest.approx(lows[-1])
    # A state saved before the running bounds were kept (no low / high) reads as the sequence's bounds now.
    old = msgspec.json.decode(msgspec.json.encode({"concordance": msgspec.to_builtins(s.concordance), "pairs": s.pairs}), type=LengthBias)
    assert concordance_bounds(old) == bounds(s.concordance)


def test_false_mute_rate_at_the_margin_over_many_seeds_checked_after_every_pair() -> None:
    """At the worst null (P(concordant) exactly 0.5 + margin) the check, run after every one of 3,000 pairs, flags
    at most α of the seeds (it uses the lower side of a two-sided 95 % sequence: ~α/2 expected)."""
    margin, seeds, pairs = 0.1, 400, 3000
    rng = np.random.default_rng(22)
    flagged = 0
    for _ in range(seeds):
        xs = (rng.random(pairs) < 0.5 + margin).astype(float)
        lower, _ = bounds_path(xs, alpha=0.05)
        flagged += bool((lower > 0.5 + margin).any())
    assert flagged / seeds <= 0.05, flagged


def test_trust_mutes_once_persists_and_an_operator_unmute_starts_afresh() -> None:
    async def go() -> None:
        store = InProcessStore()
        trust = JudgeTrust(margin=0.1, state_store=store)
        made = []
        for i in range(400):
            m = trust.observe_length("qa", "arm", 100 + (i % 2) * 100, 0.2 + (i % 2) * 0.6, now=1000.0 + i)
            if m is not None:
                made.append(m)
        assert len(made) == 1 and made[0].reason == "length_bias" and trust.muted("qa") and not trust.muted("code")
        assert made[0].evidence["concordance_low"] is not None
        trust.mark_retracted("qa", 2000.0)
        await trust.flush()
        again = JudgeTrust(margin=0.1, state_store=store)
        await again.load()
        assert again.muted("qa") and again.retracted("qa", 1999.0) and not again.retracted("qa", 2001.0)
        assert again.unmute("qa", "checked by hand", actor="admin")
        assert not again.muted("qa") and again.length_of("qa") is None and not again.unmute("qa", "twice")
        # Disagreement mutes lift themselves when the agreement recovers; length mutes do not.
        assert again.agreement("code", False, {"pairs": 40, "spearman": 0.1}) is not None and again.muted("code")
        assert again.agreement("code", True, {}) is None and not again.muted("code")

    asyncio.run(go())
