"""Smoke tests of the second simulator the safe-learning and quality-source benchmarks run on (bench/learning/world.py).

They pin the structure the benchmarks rely on (hotter answers run longer, a plateau at
t*, the model change moves t*), the judge's 1-10 mapping, and that a short run through
the real decider without feedback leaves the client's temperature and cap alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.learning.world import TASKS, JudgeModel, World, regenerate_probability, run  # noqa: E402
from policies.registry import make_policy  # noqa: E402


def test_hotter_answers_run_longer_and_quality_peaks_at_the_task_optimum() -> None:
    w = World()
    assert w.natural_length("creative", 1.0, 0.0, False) > w.natural_length("creative", 0.5, 0.0, False)
    assert w.quality_at("creative", 1.2, False) == TASKS["creative"].peak
    assert w.quality_at("creative", 0.7, False) < w.quality_at("creative", 0.9, False)
    # Asymmetric: the same distance above t* costs twice what it costs below.
    assert TASKS["creative"].peak - w.quality_at("creative", 1.6, False) == pytest.approx(2 * (TASKS["creative"].peak - w.quality_at("creative", 0.8, False)))
    # The model change moves t* under the same name.
    assert w.quality_at("creative", 0.9, True) == TASKS["creative"].peak > w.quality_at("creative", 0.9, False)


def test_judge_scores_land_on_the_1_to_10_grid_and_regeneration_falls_with_quality() -> None:
    judge = JudgeModel(sample_rate=1.0)
    scores = {judge.score(q, np.random.default_rng(i)) for i, q in enumerate(np.linspace(0, 1, 40))}
    assert scores <= {k / 9 for k in range(10)}
    assert judge.score(2.0, np.random.default_rng(0)) == 1.0
    assert regenerate_probability(0.0) > regenerate_probability(0.5) > regenerate_probability(0.95) == 0.02


def test_without_feedback_the_decider_keeps_the_clients_temperature_and_cap() -> None:
    log = run(make_policy("thompson_gaussian"), n=400, seed=3, source="none")
    assert log.signals == 0 and "optimized" in log.mode and "holdout" in log.mode
    for k, name in enumerate(log.names):
        mine = log.task == k
        task = TASKS[name]
        expected_t = 1.0 if task.client_temperature is None else task.client_temperature
        assert set(log.sent_temperature[mine]) == {expected_t}
        cap = task.client_max_tokens or 4096
        assert log.sent_max_tokens[mine].max() <= cap
