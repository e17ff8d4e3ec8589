"""Ground truth of the simulator."""

from __future__ import annotations

import numpy as np
import pytest

from policies.arms import candidate_arms
from policies.records import Arm
from policies.settings import ArmGridSettings, RewardSettings
from proxy.demo.simulator import SimulatorTruth, _clipped_normal_mean

TRUTH = SimulatorTruth()


def test_quality_surface_peaks_where_documented() -> None:
    temperatures = np.linspace(0, 2, 201)
    for task, best in {"code": 0.2, "creative": 1.0, "summarise": 0.5, "default": 0.7}.items():
        q = [TRUTH.mean_quality(task, t) for t in temperatures]
        assert temperatures[int(np.argmax(q))] == pytest.approx(best)
    assert TRUTH.mean_quality("unknown-task", 0.7) == TRUTH.mean_quality("default", 0.7)


def test_truncation_latency_and_tokens() -> None:
    full = TRUTH.respond("code", Arm(0.2, 1000), natural_tokens=400, prompt_tokens=100, quality_z=0, latency_z=0)
    cut = TRUTH.respond("code", Arm(0.2, 200), natural_tokens=400, prompt_tokens=100, quality_z=0, latency_z=0)
    assert full.finish_reason == "stop" and full.completion_tokens == 400
    assert cut.finish_reason == "length" and cut.completion_tokens == 200
    assert cut.quality == pytest.approx(full.quality * 0.6 * 0.5)
    nu = np.exp(-0.5 * 0.1**2)
    assert full.ttft_s == pytest.approx((0.15 + 0.00005 * 100) * nu)
    assert full.latency_s == pytest.approx(full.ttft_s + 0.01 * 400 * nu)


def test_clipped_normal_mean_matches_sampling() -> None:
    rng = np.random.default_rng(0)
    for mu in (-0.1, 0.05, 0.5, 0.97):
        sampled = np.clip(mu + 0.2 * rng.standard_normal(400_000), 0, 1).mean()
        assert float(_clipped_normal_mean(np.array([mu]), 0.2)[0]) == pytest.approx(sampled, abs=2e-3)


def test_expected_reward_matches_monte_carlo() -> None:
    rng = np.random.default_rng(1)
    settings = RewardSettings()
    baseline, arm = Arm(0.7, 512), Arm(0.5, 262)
    base_latency, base_tokens = TRUTH.normalisers("code", baseline)
    rewards = []
    for _ in range(30_000):
        out = TRUTH.respond(
            "code",
            arm,
            natural_tokens=TRUTH.natural_length("code", float(rng.standard_normal())),
            prompt_tokens=TRUTH.prompt_tokens("code", float(rng.standard_normal())),
            quality_z=float(rng.standard_normal()),
            latency_z=float(rng.standard_normal()),
        )
        rewards.append(out.quality - 0.1 * out.latency_s / base_latency - 0.01 * out.completion_tokens / base_tokens)
    assert TRUTH.expected_reward("code", baseline, arm, settings) == pytest.approx(np.mean(rewards), abs=4e-3)


def test_optimum_is_the_best_allowed_arm() -> None:
    baseline = Arm(0.7, 512)
    arms = candidate_arms(baseline, max_delta_temperature=0.2, max_delta_max_tokens=500, grid=ArmGridSettings())
    index, value = TRUTH.optimum("code", baseline, arms)
    assert arms[index].temperature == 0.5  # as close to 0.2 as the trust region allows
    assert arms[index].max_tokens >= 762  # no truncation of typical code answers
    index, _ = TRUTH.optimum("creative", baseline, arms)
    assert arms[index].temperature == 0.9
    truth = TRUTH.describe(baseline, arms)
    assert truth["tasks"]["code"]["optimum_reward"] == pytest.approx(value)
