"""The policy interface the decider calls and the `Choice` it gets back.

The implementations import this module, never the other way round: the names they are
configured by live in `policies.registry`, which imports them all.

Every policy is pure decision math over additive sufficient statistics:

* `choose` picks an index into the arms the guards allowed (never anything else) and
  reports the exact probability it had of picking each of them, so the decision can be
  logged counterfactually (`log_propensity = ln(choice.propensity)`).
* `update` folds one reward into the statistics of (context, arm).
* `export_delta` / `load_totals` / `snapshot` let several replicas share one posterior
  through a store that can only add numbers (Redis HINCRBYFLOAT): each replica exports
  the increments it made since its last export, the store adds them up, and every
  replica loads the merged totals back while keeping its not-yet-exported increments.
* `correct` swaps a reward already folded in for a better one (delayed feedback), but
  only into statistics that hold it: the logged decision's `statistics_version` must
  match the policy's and the key must have n >= 1 (see `Correction`).
* `decay_factor` / `decay_statistics` / `Discount` discount the statistics for
  non-stationarity; policies that support it (and `reopen`) satisfy `Adaptive`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import msgspec
import numpy as np

from policies.records import Arm, RequestContext
from policies.settings import LinUCBSettings, ThompsonSettings

Correction = Literal["corrected", "updated", "skipped"]
"""What `correct` did.

corrected: the old reward was swapped for the new one (n unchanged).
updated:   the key had n < 1 in statistics of the logged lineage, so the old reward is
           not in them (a fresh replica, or it was discounted away): the new reward was
           added once with `update`.  Correcting instead would leave n = 0 with Σr != 0.
skipped:   the decision was logged under other statistics (another policy, another
           `lineage`, e.g. a `policy_family` bump or a restart without shared state):
           nothing was changed, because these statistics never saw the old reward and
           the operator chose to start them afresh.
"""


def format_version(name: str, lineage: str, revision: int, *, epoch: int = 0, reopened: int = 0) -> str:
    """`<name>[.<lineage>][~r<reopened>]-<revision>[e<epoch>]`.

    The part before the last "-" is the statistics version: decisions logged under
    the same one were folded into the same statistics (see `statistics_version`).
    `reopened` counts `reopen` calls (a reopened task's keys start afresh, so a correction
    logged before must not land in them); `epoch` is the discount epoch the decision was
    made in, so a correction can be scaled by γ^(epochs since) like the reward it replaces.
    Both are left out while 0, so a policy without discounting keeps `<name>-<revision>`.
    """
    if "-" in name:
        raise ValueError(f"policy name {name!r} must not contain '-'")
    head = f"{name}.{lineage}" if lineage else name
    if reopened:
        head += f"~r{reopened}"
    return f"{head}-{revision}e{epoch}" if epoch else f"{head}-{revision}"


def version_epoch(version: str) -> int:
    """The discount epoch a version was taken in (`format_version`); 0 when it carries none."""
    _, sep, tail = version.rpartition("-")
    _, e, epoch = tail.partition("e")
    return int(epoch) if sep and e and epoch.isdigit() else 0


def statistics_version(version: str) -> str:
    """The statistics part of a policy version: `thompson_gaussian.f2-1234` -> `thompson_gaussian.f2`.

    The revision after the last "-" counts updates and changes all the time; what must
    match for a correction is the lineage: same policy, same family, same process state.
    """
    head, sep, _ = version.rpartition("-")
    return head if sep else version


class Choice(msgspec.Struct, frozen=True):
    """One choice: the arm index and the probability it had of being picked (logged as its propensity)."""

    index: int
    propensity: float


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

    def correct(
        self, ctx: RequestContext, baseline: Arm, arm: Arm, old_reward: float, new_reward: float, *, logged_version: str
    ) -> Correction:
        """Replace a reward already folded in by `update` (delayed feedback), without counting twice.

        `logged_version` is the `version` the decision was logged with (see `Correction`).
        """
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


class ArmPosterior(Protocol):
    """A posterior summary of one arm in one bucket: observations, mean reward, its standard deviation."""

    @property
    def n(self) -> float: ...

    @property
    def mean(self) -> float: ...

    @property
    def sd(self) -> float: ...


@runtime_checkable
class HasPosterior(Protocol):
    """A policy that can say what it believes about an arm (Thompson sampling); reports and `/recommend` show it."""

    def posterior(self, ctx: RequestContext, arm: Arm) -> ArmPosterior: ...


class PolicyClass(Protocol):
    """What `policies.registry` needs from a policy class: its configured name and a constructor.

    A class object satisfies this through its `name` attribute and its `from_settings`
    classmethod, so the registry and config validation read names from the classes
    themselves and no list of names is kept anywhere else.
    """

    name: str

    def from_settings(self, *, thompson: ThompsonSettings, linucb: LinUCBSettings, discount: Discount | None = None) -> Policy:
        """A fresh policy; each class takes the settings section it is tuned by (and the discount, if it
        learns) and ignores the rest."""
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
    floored: np.ndarray = floor + (1.0 - k * floor) * probs
    return floored


def decay_factor(half_life_s: float, epoch_s: float) -> float:
    """γ per epoch for a half-life: 0.5 ** (epoch_s / half_life_s); 1.0 (no decay) when half_life_s is inf.

    Why a per-epoch γ on the statistics rather than on each reward's age: multiplying
    n, Σr, Σr² (or LinUCB's G and b) by γ is linear, so every replica can decay its
    totals and its unexported increments by the same γ^k and the merged sum is still
    the decayed sum (γ^k·(a + b) = γ^k·a + γ^k·b); a reward folded in k epochs ago then
    weighs γ^k.  Means are ratios of decayed sums, so decay widens a posterior (smaller
    n) without moving its centre.
    """
    if not half_life_s > 0 or not epoch_s >= 0:
        raise ValueError(f"half_life_s must be > 0 and epoch_s >= 0, got {half_life_s!r}, {epoch_s!r}")
    if math.isinf(half_life_s):
        return 1.0
    return math.pow(0.5, epoch_s / half_life_s)


def decay_statistics(stats: dict[str, list[float]], gamma: float, epochs: int) -> dict[str, list[float]]:
    """Every additive statistic multiplied by γ^epochs (a new dict; `stats` is not touched).

    Applies to a snapshot, an exported delta or merged totals alike (all are sums).
    A correction of a reward folded in k epochs ago must be scaled by γ^k as well.
    """
    if not 0.0 < gamma <= 1.0 or epochs < 0:
        raise ValueError(f"gamma must be in (0, 1] and epochs >= 0, got {gamma!r}, {epochs!r}")
    factor = gamma**epochs
    return {key: [v * factor for v in values] for key, values in stats.items()}


DECAY_EPOCHS_PER_HALF_LIFE = 16
"""Epochs per half-life: γ = 2^(-1/16) ≈ 0.958 per epoch, so the weight of a reward drops in
steps of 4 %, not in one halving, and a half-life is exact at every 16th boundary."""
RESERVED_PREFIX = "~"
"""Statistic keys starting with this are bookkeeping (reopen counters): summed across replicas
like the rest, never discounted."""


class Discount(msgspec.Struct, frozen=True):
    """`[policy] half_life_s` as shared epochs: every replica derives the same epoch from its clock.

    Epoch k covers [k·epoch_s, (k+1)·epoch_s) of Unix time with epoch_s = half_life_s / 16.
    Entering epoch k+j multiplies every statistic by γ^j (`decay_factor`); since all replicas
    and the store use the same boundaries, sums of decayed increments are decayed sums and
    replica merges stay additive (proxy/learning/sync.py decays the store's totals once per
    boundary).  inf (the default) switches discounting off: the epoch is always 0.
    """

    half_life_s: float = math.inf

    def __post_init__(self) -> None:
        if not self.half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0 (inf = off), got {self.half_life_s!r}")

    @property
    def enabled(self) -> bool:
        return not math.isinf(self.half_life_s)

    @property
    def epoch_s(self) -> float:
        return self.half_life_s / DECAY_EPOCHS_PER_HALF_LIFE

    @property
    def gamma(self) -> float:
        """γ per epoch (1.0 when off)."""
        return decay_factor(self.half_life_s, self.epoch_s) if self.enabled else 1.0

    def epoch_at(self, now: float) -> int:
        """The epoch Unix time `now` falls in (0 when off)."""
        return int(math.floor(now / self.epoch_s)) if self.enabled else 0

    def factor(self, epochs: int) -> float:
        """γ^epochs: the weight now of a statistic `epochs` boundaries old."""
        return 1.0 if epochs <= 0 or not self.enabled else self.gamma**epochs


class ReopenCounts:
    """The version and generation bookkeeping every discounting, reopenable policy shares.

    A policy keeps `_reopens` (task -> merged reopen count) and `_decay_epoch`; a task's
    statistics live under its current generation, and the version names both, so a
    correction logged before a reopen or in another epoch is recognised (`format_version`)."""

    name: str
    lineage: str
    _revision: int
    _decay_epoch: int
    _reopens: dict[str, float]
    # The last version string and every input it was formatted from: read once per decision, while the
    # inputs change only with an update or a load, so most reads format nothing.
    _version_memo: tuple[tuple[str, str, int, int, int], str] | None = None

    @property
    def version(self) -> str:
        """`<name>[.<lineage>][~r<reopens>]-<revision>[e<epoch>]` (`format_version`)."""
        reopened = int(round(sum(self._reopens.values()))) if self._reopens else 0
        key = (self.name, self.lineage, self._revision, self._decay_epoch, reopened)
        memo = self._version_memo
        if memo is not None and memo[0] == key:
            return memo[1]
        version = format_version(self.name, self.lineage, self._revision, epoch=self._decay_epoch, reopened=reopened)
        self._version_memo = (key, version)
        return version

    @property
    def decay_epoch(self) -> int:
        return self._decay_epoch

    def _generation(self, task: str) -> int:
        return int(round(self._reopens.get(task, 0.0)))


@runtime_checkable
class Adaptive(Protocol):
    """A policy that discounts its statistics and can reopen exploration for one task type."""

    discount: Discount

    @property
    def decay_epoch(self) -> int:
        """The discount epoch the statistics are expressed in."""
        ...

    def advance(self, epoch: int) -> None:
        """Move the statistics to `epoch`: everything (totals and unexported increments) times γ^(epoch − current).
        A call with an epoch not after the current one does nothing."""
        ...

    def reopen(self, task_type: str) -> None:
        """Start the task type's statistics afresh (a detected change): replicated, idempotent per call."""
        ...
