"""The policy interface the decider calls, the `Choice` it gets back, and `make_policy`.

Every policy is pure decision math over additive sufficient statistics:

* `choose` picks an index into the arms the guards allowed (never anything else) and
  reports the exact probability it had of picking each of them, so the decision can be
  logged counterfactually (`log_propensity = ln(choice.propensity)`).
* `update` folds one reward into the statistics of (context, arm).
* `export_delta` / `load_totals` / `snapshot` let several replicas share one posterior
  through a store that can only add numbers (Redis HINCRBYFLOAT): each replica exports
  the increments it made since its last export, the store adds them up, and every
  replica loads the merged totals back while keeping its not-yet-exported increments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import msgspec
import numpy as np

from policies.records import Arm, RequestContext
from policies.settings import LinUCBSettings, ThompsonSettings

POLICY_NAMES: tuple[str, ...] = ("thompson_gaussian", "linucb", "baseline", "uniform")


class Choice(msgspec.Struct, frozen=True):
    """One choice: the arm index, its propensity, and the propensity of every allowed arm."""

    index: int
    propensity: float
    propensities: tuple[float, ...]


@runtime_checkable
class Policy(Protocol):
    """What the decider needs from a policy (see module docstring)."""

    name: str

    @property
    def version(self) -> str:
        """Identifier of the current state; changes whenever the statistics change."""
        ...

    def choose(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm], rng: np.random.Generator) -> Choice:
        """Pick one of `arms` (len >= 1, already filtered by the guards)."""
        ...

    def update(self, ctx: RequestContext, baseline: Arm, arm: Arm, reward: float) -> None:
        """Fold `reward` observed for `arm` in `ctx` into the statistics."""
        ...

    def propensities(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm]) -> np.ndarray:
        """Probability that `choose` picks each of `arms` right now (sums to 1)."""
        ...

    def correct(self, ctx: RequestContext, baseline: Arm, arm: Arm, old_reward: float, new_reward: float) -> None:
        """Replace a reward already folded in by `update` (delayed feedback), without counting twice."""
        ...

    def export_delta(self) -> dict[str, list[float]]:
        """Additive increments since the last export (then forgets them)."""
        ...

    def load_totals(self, totals: dict[str, list[float]]) -> None:
        """Replace local statistics by merged totals, re-applying unexported increments."""
        ...

    def load_changed(self, totals: dict[str, list[float]]) -> None:
        """Like `load_totals` for the keys given only; every other key stays as it is.

        Replica sync reads just the keys changed since its last read, so its cost follows
        what changed, not the size of the state.
        """
        ...

    def snapshot(self) -> dict[str, list[float]]:
        """All statistics (totals including unexported increments)."""
        ...


def sample_index(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw an index with probabilities `probs` using one uniform from `rng`.

    Cheaper than `rng.choice(p=...)` (which validates and copies) on the hot path.
    """
    cumulative = np.cumsum(probs)
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return min(index, len(probs) - 1)


def apply_floor(probs: np.ndarray, floor: float) -> np.ndarray:
    """Mix `probs` with the uniform distribution so every entry is >= `floor`, exactly.

    p' = floor + (1 - K*floor) * p.  When K*floor >= 1 the only distribution that
    honours the floor is uniform, which is what we return.
    """
    k = probs.shape[0]
    if floor <= 0:
        return probs
    if k * floor >= 1.0:
        return np.full(k, 1.0 / k)
    return floor + (1.0 - k * floor) * probs


def make_policy(
    name: str,
    *,
    thompson: ThompsonSettings | None = None,
    linucb: LinUCBSettings | None = None,
) -> Policy:
    """Build a policy by its configured name ("thompson_gaussian", "linucb", "baseline", "uniform")."""
    if name == "thompson_gaussian":
        from policies.thompson import ThompsonGaussianPolicy

        return ThompsonGaussianPolicy(thompson or ThompsonSettings())
    if name == "linucb":
        from policies.linucb import LinUCBPolicy

        return LinUCBPolicy(linucb or LinUCBSettings())
    if name == "baseline":
        from policies.baseline import BaselinePolicy

        return BaselinePolicy()
    if name == "uniform":
        from policies.baseline import UniformPolicy

        return UniformPolicy()
    raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
