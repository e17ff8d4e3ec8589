"""Judge agreement with explicit feedback: ranks, Spearman, the trust flag and the pairs the SignalBook keeps.

scipy is not installed here, so Spearman is pinned to hand-worked examples (ties included).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from policies.agreement import agreement, average_ranks, judge_trusted, spearman
from proxy.decision import SignalBook


def test_average_ranks_share_ties() -> None:
    # sorted: 1 (rank 1), 2, 2 (ranks 2 and 3 -> 2.5 each), 4 (rank 4); 7, 7, 7 share (5+6+7)/3 = 6
    assert average_ranks(np.array([2.0, 1.0, 4.0, 2.0])).tolist() == [2.5, 1.0, 4.0, 2.5]
    assert average_ranks(np.array([7.0, 3.0, 7.0, 7.0])).tolist() == [3.0, 1.0, 3.0, 3.0]


def test_spearman_without_ties_matches_the_textbook_formula() -> None:
    # d = rank differences (-1, 1, -1, 1, 0): rho = 1 - 6 * 4 / (5 * 24) = 0.8
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8, abs=1e-12)
    assert spearman([0.1, 0.2, 0.3], [0.9, 0.5, 0.0]) == pytest.approx(-1.0, abs=1e-12)


def test_spearman_with_ties_by_hand() -> None:
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4); centred: (-1.5, 0, 0, 1.5), (-1.5, .5, -.5, 1.5)
    # sum dx*dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5 -> rho = 4.5 / sqrt(22.5) = sqrt(0.9)
    assert spearman([1, 2, 2, 4], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9), abs=1e-12)


def test_spearman_undefined() -> None:
    assert spearman([0.5], [0.5]) is None
    assert spearman([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]) is None  # a constant judge ranks nothing
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


def test_agreement_mean_difference() -> None:
    a = agreement([(0.8, 0.5), (0.6, 0.6), (0.1, 0.2)])  # judge - explicit: 0.3, 0, -0.1 -> mean 0.2/3
    assert a.n == 3 and a.mean_difference == pytest.approx(0.2 / 3, abs=1e-12)
    assert a.spearman == pytest.approx(0.5, abs=1e-12)  # rank differences (1, -1, 0): 1 - 6 * 2 / (3 * 8)
    assert agreement([]) == agreement(()) and agreement([]).n == 0 and agreement([]).spearman is None


def test_judge_trusted_needs_enough_pairs_to_distrust() -> None:
    against = [(i / 10, 1 - i / 10) for i in range(10)]  # rho = -1
    assert judge_trusted(against, 0.3, 11) is True  # 10 pairs < 11: not enough evidence
    assert judge_trusted(against, 0.3, 10) is False
    along = [(i / 10, i / 10) for i in range(10)]
    assert judge_trusted(along, 0.3, 10) is True
    constant = [(0.5, i / 10) for i in range(10)]
    assert judge_trusted(constant, 0.3, 10) is False
    # exactly at the threshold counts as trusted: rho = 0.8 (above)
    assert judge_trusted([(1, 2), (2, 1), (3, 4), (4, 3), (5, 5)], 0.8 - 1e-12, 5) is True
    assert judge_trusted([(1, 2), (2, 1), (3, 4), (4, 3), (5, 5)], 0.81, 5) is False


def test_signal_book_pairs_in_either_order_and_stays_bounded() -> None:
    book = SignalBook(max_entries=10, max_pairs=3)
    book.judge_scored("a", "code", 0.9, None)
    book.explicit_scored("a", 0.7)  # judge first, explicit later
    book.judge_scored("b", "code", 0.2, 0.4)  # explicit already known
    book.explicit_scored("zz", 0.5)  # never judged: no pair
    assert book.pairs_of("code") == [(0.9, 0.7), (0.2, 0.4)]
    book.explicit_scored("a", 0.1)  # an overwrite replaces the pair, not adds one
    assert book.pairs_of("code") == [(0.2, 0.4), (0.9, 0.1)]
    for rid in ("c", "d"):
        book.judge_scored(rid, "code", 0.5, 0.5)
    assert book.pairs_of("code") == [(0.9, 0.1), (0.5, 0.5), (0.5, 0.5)]  # oldest dropped past max_pairs
    assert book.pairs_of("chat") == []
    book.validated("code", True)
    book.validated("code", False)
    assert book.validation == {"code": (2, 1)}
