"""The two reference policies: `baseline` (always the client's own parameters) and `uniform`.

`baseline` is what Thermostat does when it is off, in holdout, or rolled back; its logs
give the value every optimised policy is compared against.  `uniform` picks every
allowed arm with the same probability: pure exploration logging, the best data for
off-policy evaluation of any other policy (no arm ever has a tiny propensity).

Both are stateless, so their shared-state hooks are empty and their version never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import numpy as np

from policies.arms import arm_identity
from policies.base import Choice, Correction, Discount
from policies.records import Arm, RequestContext
from policies.settings import LinUCBSettings, ThompsonSettings

TEMPERATURE_UNIT = 0.1
"""Distance scale for the fallback: 0.1 of temperature counts like MAX_TOKENS_UNIT tokens."""
MAX_TOKENS_UNIT = 100.0


def baseline_index(baseline: Arm, arms: Sequence[Arm]) -> int:
    """Index of the baseline among `arms`, else of the closest arm.

    The guards normally keep the baseline allowed; if they removed it (e.g. its
    max_tokens exceeds the model limit) the closest allowed arm is the most faithful
    stand-in, measured in units of 0.1 temperature and 100 tokens.
    """
    if not arms:
        raise ValueError("choose needs at least one arm")
    target = arm_identity(baseline)
    best, best_distance = 0, float("inf")
    for i, arm in enumerate(arms):
        key = arm_identity(arm)
        if key == target:
            return i
        distance = abs(key[0] - target[0]) / TEMPERATURE_UNIT + abs(key[1] - target[1]) / MAX_TOKENS_UNIT + (key[2] != target[2])
        if distance < best_distance:
            best, best_distance = i, distance
    return best


class _Stateless:
    """Shared-state hooks of a policy without statistics."""

    name: str

    @classmethod
    def from_settings(cls, *, thompson: ThompsonSettings, linucb: LinUCBSettings, discount: Discount | None = None) -> Self:
        """Registry constructor (`policies.registry`): nothing to tune."""
        return cls()

    @property
    def version(self) -> str:
        """Constant: the state never changes."""
        return f"{self.name}-0"

    def update(self, ctx: RequestContext, baseline: Arm, arm: Arm, reward: float) -> None:
        """Nothing to learn."""

    def correct(
        self, ctx: RequestContext, baseline: Arm, arm: Arm, old_reward: float, new_reward: float, *, logged_version: str
    ) -> Correction:
        """Nothing to correct."""
        return "skipped"

    def export_delta(self) -> dict[str, list[float]]:
        """No statistics."""
        return {}

    def load_totals(self, totals: dict[str, list[float]]) -> None:
        """No statistics."""

    def load_changed(self, totals: dict[str, list[float]]) -> None:
        """No statistics."""

    def snapshot(self) -> dict[str, list[float]]:
        """No statistics."""
        return {}


class BaselinePolicy(_Stateless):
    """Always the baseline arm (or the closest allowed one), propensity 1."""

    name = "baseline"

    def propensities(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm]) -> np.ndarray:
        """One-hot on `baseline_index`."""
        probs = np.zeros(len(arms))
        probs[baseline_index(baseline, arms)] = 1.0
        return probs

    def choose(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm], rng: np.random.Generator) -> Choice:
        """Deterministic: the generator is not used."""
        return Choice(index=baseline_index(baseline, arms), propensity=1.0)


class UniformPolicy(_Stateless):
    """Every allowed arm with probability 1/K."""

    name = "uniform"

    def propensities(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm]) -> np.ndarray:
        """1/K each."""
        if not arms:
            raise ValueError("choose needs at least one arm")
        return np.full(len(arms), 1.0 / len(arms))

    def choose(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm], rng: np.random.Generator) -> Choice:
        """One integer draw from `rng`."""
        k = len(arms)
        if k == 0:
            raise ValueError("choose needs at least one arm")
        index = int(rng.random() * k)
        return Choice(index=index, propensity=1.0 / k)
