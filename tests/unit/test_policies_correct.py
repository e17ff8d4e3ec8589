"""Delayed feedback replaces a reward: the state equals one that saw the new reward only."""

from __future__ import annotations

import numpy as np
import pytest

from policies.base import make_policy
from policies.records import Arm, RequestContext

CTX = RequestContext("code", "m", "chat", 120, 2, False, False, False, 0.7, 600)
BASE = Arm(0.7, 600)
ARM = Arm(0.8, 850)


@pytest.mark.parametrize("name", ["thompson_gaussian", "linucb"])
def test_correct_equals_seeing_the_new_reward(name: str) -> None:
    corrected = make_policy(name)
    direct = make_policy(name)
    for r in (0.2, 0.9, 0.4):
        corrected.update(CTX, BASE, ARM, r)
        direct.update(CTX, BASE, ARM, r)
    corrected.update(CTX, BASE, ARM, 0.1)
    direct.update(CTX, BASE, ARM, 0.75)
    corrected.correct(CTX, BASE, ARM, 0.1, 0.75)
    a, b = corrected.snapshot(), direct.snapshot()
    assert a.keys() == b.keys()
    for key in a:
        assert np.allclose(a[key], b[key])
    # the correction travels to other replicas like any other increment
    replica = make_policy(name)
    merged: dict[str, list[float]] = {}
    for key, values in corrected.export_delta().items():
        merged[key] = list(values)
    replica.load_totals(merged)
    for key, values in replica.snapshot().items():
        assert np.allclose(values, b[key])
