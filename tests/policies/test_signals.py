"""Signal priority: explicit > judge > implicit > automatic, equal rank replaces."""

from __future__ import annotations

import pytest

from policies.signals import PRIORITY, judge_quality, rank, should_replace


def test_order_of_sources() -> None:
    assert sorted(PRIORITY, key=rank) == ["automatic", "implicit", "judge", "judge_pairwise", "explicit"]
    assert rank("judge_pairwise") == rank("judge")  # one judge mode at a time; a re-judgment of either kind replaces


@pytest.mark.parametrize(
    ("old", "new", "replaces"),
    [
        (None, "implicit", True),
        ("automatic", "judge", True),
        ("implicit", "judge", True),
        ("judge", "implicit", False),
        ("explicit", "judge", False),
        ("explicit", "implicit", False),
        ("judge", "explicit", True),
        ("judge", "judge", True),
        ("bogus", "implicit", True),  # unknown counts as automatic
    ],
)
def test_should_replace(old: str | None, new: str, replaces: bool) -> None:
    assert should_replace(old, new) is replaces


@pytest.mark.parametrize(("score", "quality"), [(1, 0.0), (10, 1.0), (5.5, 0.5), (4, 1 / 3), (0, 0.0), (11, 1.0)])
def test_judge_score_maps_to_quality(score: float, quality: float) -> None:
    assert judge_quality(score) == pytest.approx(quality)
