"""Gaussian Thompson sampling with exact (Monte Carlo) win-probability propensities.

Model.  For every (context bucket, absolute arm) the rewards are Normal with unknown
mean and noise.  The state is the additive triple (n, Σr, Σr²).  With a Normal-Gamma
prior (m0, κ0 = prior_precision, α0 = prior_alpha, β0 = prior_beta):

    κn = κ0 + n
    μn = (κ0·m0 + Σr) / κn
    αn = α0 + n/2
    βn = β0 + ½·(Σr² + κ0·m0² − κn·μn²)      (= β0 + ½Σ(r−r̄)² + κ0·n·(r̄−m0)²/(2κn))
    sd = (1 + exploration_factor) · sqrt(βn / (αn·κn))

and the arm's mean reward is sampled from N(μn, sd²): a Gaussian posterior on the mean
with the Normal-Gamma estimate of the noise (the scale of the Student-t marginal).

The prior mean m0 of an arm is empirical Bayes: the mean reward of the *other* arms
of the same bucket, itself shrunk to `prior_mean` with weight `prior_precision`:

    m0 = (κ0·prior_mean + Σr_others) / (κ0 + n_others)

Why: rewards live around 0.5–0.9, so a fixed prior mean of 0 would make every untried
arm look hopeless once one arm has data, and Thompson would stop exploring.  Centering
untried arms on what the bucket already achieves keeps them plausible without being
optimistic.  m0 is a function of the additive statistics, so merging still adds.

Keys use the *absolute* arm (temperature rounded to 3 decimals, max_tokens), so two
clients with different baselines share what they learn about the same parameters.

Choosing and propensity.  For a (bucket, arm set) we draw `propensity_draws` joint
posterior samples at once (one vectorised matrix op on a fixed, seeded float32 bank of
standard normals), record which arm wins in each row, and cache that table.  The table
is recomputed once the bucket has had `refresh_every` updates since it was built (or
totals were loaded): the posterior is *published* in small batches, which keeps the
typical decision at ~2 µs instead of ~400 µs for a rebuild (bench/results/policy_speed.md),
at the price of acting on statistics at most `refresh_every − 1` rewards old.  `choose` then picks a uniformly random row with the caller's
Generator and plays its winner: that *is* a Thompson draw from the posterior, and the
propensity of every arm is exactly its share of rows, i.e. the posterior probability
that it is the best arm, with Monte Carlo standard error ≤ 0.5/sqrt(draws) (0.0078 for
4096).  Arms that cannot win (upper 4.5-sd bound below the best lower bound; true win
probability < 1e-5) are left out of the table and get propensity 0; the policy never
plays them, so the logged propensity stays exact for what was actually done.

Propensity floor.  A converged bucket would log [1, 0, 0, …]: no support for any other
arm, so no off-policy estimate of anything else.  The played distribution is therefore
p = floor + (1 − K·floor)·win_probability (`apply_floor`, floor = min_propensity): with
probability K·floor a uniformly random allowed arm, else the Thompson winner.  `choose`
does both with one uniform from the caller's Generator, so the logged propensity is exact.

Corrections (`correct`) only touch statistics that hold the old reward: see
`policies.base.Correction`.  `lineage` (set by the proxy, e.g. the policy family plus a
process id when there is no shared store) is part of `version` for that check.

Non-stationarity (`policies.base.Adaptive`).  `advance(epoch)` multiplies n, Σr and Σr²
(totals and unexported increments) by γ^(epochs passed) (`policies.base.Discount`, from
`[policy] half_life_s`): means are ratios of decayed sums, so they stay put while the
posterior widens, and an arm not played for a few half-lives is explored again.  The
store decays its totals at the same epoch boundaries (proxy/learning/sync.py), so merges
stay additive.  `reopen(task)` (a change detected on that task's holdout) adds 1 to the
shared count `~reopen|<task>`; a task reopened g times keeps its buckets under
`<task>#<g>|…`, so it starts from the prior on every replica that merged the count.
The bucket contains the upstream (`policies.context.model_group`): the same model name on
another upstream learns separately.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec
import numpy as np

from policies.arms import arm_key
from policies.base import (
    RESERVED_PREFIX,
    Choice,
    Correction,
    Discount,
    ReopenCounts,
    apply_floor,
    statistics_version,
    version_epoch,
)
from policies.context import context_bucket
from policies.records import Arm, RequestContext
from policies.settings import LinUCBSettings, ThompsonSettings

PRUNE_SDS = 4.5
"""Arms whose mean + PRUNE_SDS·sd is below the best arm's mean − PRUNE_SDS·sd cannot win."""
STAT_FIELDS = 3  # n, Σr, Σr²
REOPEN_PREFIX = RESERVED_PREFIX + "reopen|"
EPOCH_KEY = RESERVED_PREFIX + "epoch"
OTHER_BUCKET = "other"
"""Where rewards of buckets past `max_buckets` go (a bucket embeds client-chosen values)."""


class Posterior(msgspec.Struct, frozen=True):
    """Posterior summary of one (bucket, arm): for the control API and the tests."""

    n: float
    mean: float
    sd: float
    noise_sd: float


class _Table(msgspec.Struct):
    """Cached Monte Carlo result for one (bucket, arm set) at one statistics version."""

    epoch: int
    bucket_version: int
    winners: np.ndarray  # (draws,) arm index that wins each joint draw
    probs: np.ndarray  # (K,) share of draws each arm wins
    played: np.ndarray  # (K,) probs with the propensity floor: what `choose` plays


def stat_key(bucket: str, arm: Arm) -> str:
    """Flat string key of one (bucket, absolute arm): `<bucket>|T<temperature>|M<max_tokens>`,
    with `@<effort>` appended when the arm has an effort level and `#<model>` when it is served by a
    stand-in (`Arm.model`), so the requested model's keys are unchanged (`bucket_of` holds as long as
    a model name has no `|`; one that has gets it replaced)."""
    temperature, max_tokens = arm_key(arm)
    key = f"{bucket}|T{temperature:g}|M{max_tokens}"
    if arm.effort is not None:
        key = f"{key}@{arm.effort}"
    return key if arm.model is None else f"{key}#{arm.model.replace('|', '/')}"


def bucket_of(key: str) -> str:
    """The bucket part of a `stat_key`."""
    return key.rsplit("|", 2)[0]


class ThompsonGaussianPolicy(ReopenCounts):
    """Thompson sampling over per-(bucket, arm) Gaussian posteriors (module docstring)."""

    name = "thompson_gaussian"

    @classmethod
    def from_settings(
        cls, *, thompson: ThompsonSettings, linucb: LinUCBSettings, discount: Discount | None = None
    ) -> ThompsonGaussianPolicy:
        """Registry constructor (`policies.registry`)."""
        return cls(thompson, discount=discount)

    def __init__(self, settings: ThompsonSettings | None = None, *, discount: Discount | None = None) -> None:
        self.settings = settings or ThompsonSettings()
        s = self.settings
        if s.prior_precision <= 0 or s.prior_alpha <= 0 or s.prior_beta <= 0:
            raise ValueError("prior_precision, prior_alpha and prior_beta must be > 0")
        if not 0.0 <= s.min_propensity <= 1.0:
            raise ValueError("min_propensity must be in [0, 1]")
        if s.propensity_draws < 2500:
            raise ValueError("propensity_draws must be >= 2500 (standard error < 0.01)")
        self._stats: dict[str, list[float]] = {}
        self._pooled: dict[str, list[float]] = {}  # bucket -> Σ over its arms (derived from _stats)
        self._pending: dict[str, list[float]] = {}
        self._bucket_versions: dict[str, int] = {}
        self._epoch = 0  # bumped by load_totals: every cached table is stale
        self._revision = 0
        self._tables: dict[tuple[str, tuple[Arm, ...]], _Table] = {}
        self._spread = 1.0 + s.exploration_factor
        # Deferred mode (the proxy turns it on): `choose` never rebuilds a table it already has;
        # the caller runs `refresh_stale` from a background task instead.
        self.deferred_refresh = False
        self._stale: dict[tuple[str, tuple[Arm, ...]], None] = {}
        self._bank = self._make_bank(32)
        self.folded_buckets = 0  # decisions and updates counted in OTHER_BUCKET (past max_buckets)
        self.lineage = ""  # see module docstring (Corrections)
        self.discount = discount or Discount()
        self._decay_epoch = 0
        self._reopens: dict[str, float] = {}  # task -> merged reopen count (totals + unexported)

    # ----------------------------------------------------------------- state
    def posterior(self, ctx: RequestContext, arm: Arm) -> Posterior:
        """Posterior of one arm in the context's bucket (closed form in the module doc)."""
        bucket = self._bucket(ctx)
        n, total, total_sq = self._stats.get(stat_key(bucket, arm), (0.0, 0.0, 0.0))
        pooled = self._pooled.get(bucket, (0.0, 0.0, 0.0))
        mean, sd, noise = self._posterior(n, total, total_sq, pooled[0] - n, pooled[1] - total)
        return Posterior(n=n, mean=mean, sd=sd, noise_sd=noise)

    def _posterior(self, n: float, total: float, total_sq: float, n_others: float, total_others: float) -> tuple[float, float, float]:
        """(posterior mean, sampling sd of the mean, noise sd estimate) from the statistics."""
        s = self.settings
        k0 = s.prior_precision
        m0 = (k0 * s.prior_mean + total_others) / (k0 + n_others)
        kappa = k0 + n
        mean = (k0 * m0 + total) / kappa
        alpha = s.prior_alpha + 0.5 * n
        beta = s.prior_beta + 0.5 * (total_sq + k0 * m0 * m0 - kappa * mean * mean)
        beta = max(beta, s.prior_beta * 1e-6)  # rounding can push an all-equal sample below β0
        noise_var = beta / alpha
        return mean, self._spread * math.sqrt(noise_var / kappa), math.sqrt(noise_var)

    def update(self, ctx: RequestContext, baseline: Arm, arm: Arm, reward: float) -> None:
        """Add one reward to (bucket, arm); raises ValueError on a non-finite reward."""
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward!r}")
        bucket = self._bucket(ctx)
        key = stat_key(bucket, arm)
        for store, store_key in ((self._stats, key), (self._pending, key), (self._pooled, bucket)):
            stats = store.get(store_key)
            if stats is None:
                store[store_key] = [1.0, reward, reward * reward]
            else:
                stats[0] += 1.0
                stats[1] += reward
                stats[2] += reward * reward
        self._bucket_versions[bucket] = self._bucket_versions.get(bucket, 0) + 1
        self._revision += 1

    def correct(
        self, ctx: RequestContext, baseline: Arm, arm: Arm, old_reward: float, new_reward: float, *, logged_version: str
    ) -> Correction:
        """Replace one reward already folded in (delayed feedback): n stays, Σr and Σr² move.

        Only when these statistics hold it (`policies.base.Correction`).  A swap that would
        leave Σr² < (Σr)²/n (a negative spread) proves the old reward is not in the
        statistics, so it is skipped as well.
        """
        if not (math.isfinite(old_reward) and math.isfinite(new_reward)):
            raise ValueError("rewards must be finite")
        if statistics_version(logged_version) != statistics_version(self.version):
            return "skipped"
        bucket = self._bucket(ctx)
        key = stat_key(bucket, arm)
        n, total, total_sq = self._stats.get(key, (0.0, 0.0, 0.0))
        if n < 1.0:
            self.update(ctx, baseline, arm, new_reward)
            return "updated"
        scale = self.discount.factor(self._decay_epoch - version_epoch(logged_version))
        d1 = (new_reward - old_reward) * scale
        d2 = (new_reward * new_reward - old_reward * old_reward) * scale
        new_total, new_sq = total + d1, total_sq + d2
        if new_sq < new_total * new_total / n - 1e-9 * max(1.0, abs(new_sq)):
            return "skipped"
        for store, store_key in ((self._stats, key), (self._pending, key), (self._pooled, bucket)):
            stats = store.setdefault(store_key, [0.0, 0.0, 0.0])
            stats[1] += d1
            stats[2] += d2
        self._bucket_versions[bucket] = self._bucket_versions.get(bucket, 0) + 1
        self._revision += 1
        return "corrected"

    def export_delta(self) -> dict[str, list[float]]:
        """Increments [n, Σr, Σr²] per key since the last export; resets them."""
        delta, self._pending = self._pending, {}
        return delta

    def load_totals(self, totals: dict[str, list[float]]) -> None:
        """Adopt merged totals; unexported local increments stay applied on top."""
        totals, factor = self._reserved(totals, full=True)
        merged: dict[str, list[float]] = {}
        for key, values in totals.items():
            if len(values) != STAT_FIELDS:
                raise ValueError(f"statistics for {key!r} must have {STAT_FIELDS} values")
            if self._current(key):
                merged[key] = [float(v) * factor for v in values]
        for key, values in self._pending.items():
            if key.startswith(RESERVED_PREFIX):
                continue
            into = merged.setdefault(key, [0.0, 0.0, 0.0])
            for i in range(STAT_FIELDS):
                into[i] += values[i]
        self._stats = merged
        self._pooled = {}
        for key, values in list(merged.items()):
            if key.startswith(RESERVED_PREFIX):
                continue
            into = self._pooled.setdefault(bucket_of(key), [0.0, 0.0, 0.0])
            for i in range(STAT_FIELDS):
                into[i] += values[i]
        for task, count in self._reopens.items():
            merged[REOPEN_PREFIX + task] = [count, 0.0, 0.0]
        self._epoch += 1
        self._revision += 1
        if not self.deferred_refresh:
            self._tables.clear()  # deferred: the epoch bump marks them stale instead

    def load_changed(self, totals: dict[str, list[float]]) -> None:
        """Adopt merged totals of these keys only; their buckets' tables become stale."""
        totals, factor = self._reserved(totals, full=False)
        touched: set[str] = set()
        for key, values in totals.items():
            if len(values) != STAT_FIELDS:
                raise ValueError(f"statistics for {key!r} must have {STAT_FIELDS} values")
            if not self._current(key):
                continue
            new = [float(v) * factor for v in values]
            for i, v in enumerate(self._pending.get(key, ())):
                new[i] += v
            old = self._stats.get(key, (0.0, 0.0, 0.0))
            bucket = bucket_of(key)
            pooled = self._pooled.setdefault(bucket, [0.0, 0.0, 0.0])
            for i in range(STAT_FIELDS):
                pooled[i] += new[i] - old[i]
            self._stats[key] = new
            touched.add(bucket)
        for bucket in touched:
            # As many versions as a rebuild needs: the bucket's tables are stale, no other table is.
            self._bucket_versions[bucket] = self._bucket_versions.get(bucket, 0) + self.settings.refresh_every
        if touched:
            self._revision += 1

    # --------------------------------------------------------- non-stationarity
    def advance(self, epoch: int) -> None:
        """Discount everything to `epoch` (`policies.base.Adaptive`); every table becomes stale."""
        if epoch <= self._decay_epoch:
            return
        factor = self.discount.factor(epoch - self._decay_epoch)
        self._decay_epoch = epoch
        if factor == 1.0:
            return
        for store in (self._stats, self._pooled, self._pending):
            for key, values in store.items():
                if not key.startswith(RESERVED_PREFIX):
                    values[:] = [v * factor for v in values]
        self._epoch += 1
        self._revision += 1
        if not self.deferred_refresh:
            self._tables.clear()

    def reopen(self, task_type: str) -> None:
        """Start the task type afresh: its reopen count goes up by one (shared like any statistic), its
        buckets move to the next generation, and the old generation's statistics are dropped here."""
        key = REOPEN_PREFIX + task_type
        for store in (self._stats, self._pending):
            store.setdefault(key, [0.0, 0.0, 0.0])[0] += 1.0
        self._set_generation(task_type, self._reopens.get(task_type, 0.0) + 1.0)
        self._revision += 1

    def _set_generation(self, task: str, count: float) -> None:
        old = self._generation(task)
        self._reopens[task] = count
        if self._generation(task) == old:
            return
        prefix = _task_part(task, old) + "|"
        for store in (self._stats, self._pending, self._pooled):
            for key in [k for k in store if k.startswith(prefix)]:
                del store[key]
        self._epoch += 1  # cached tables of the old generation are never read again; new ones are built
        if not self.deferred_refresh:
            self._tables.clear()

    def _current(self, key: str) -> bool:
        """Whether a stored key belongs to its task's current generation (reserved keys are handled apart)."""
        if key.startswith(RESERVED_PREFIX):
            return False
        name, gen = _split_task(key.split("|", 1)[0])
        return key.startswith(OTHER_BUCKET + "|") or gen == self._generation(name)

    def _reserved(self, totals: dict[str, list[float]], *, full: bool) -> tuple[dict[str, list[float]], float]:
        """Take the reopen counts and the epoch stamp (a local snapshot's) out of `totals`.

        Returns the remaining totals and the factor that brings them to this policy's epoch."""
        factor = 1.0
        stamp = totals.get(EPOCH_KEY)
        if stamp:
            epoch = int(stamp[0])
            self.advance(epoch)
            factor = self.discount.factor(self._decay_epoch - epoch)
        if full:
            # counts only this replica has not exported yet stay on top of the merged ones
            seen = {k[len(REOPEN_PREFIX):] for k in totals if k.startswith(REOPEN_PREFIX)}
            for task in [t for t in self._reopens if t not in seen]:
                pending = self._pending.get(REOPEN_PREFIX + task)
                self._set_generation(task, pending[0] if pending else 0.0)
        rest: dict[str, list[float]] = {}
        for key, values in totals.items():
            if key.startswith(REOPEN_PREFIX):
                task = key[len(REOPEN_PREFIX):]
                count = float(values[0]) + self._pending.get(key, (0.0,))[0]
                self._stats[key] = [count, 0.0, 0.0]
                self._set_generation(task, count)
            elif not key.startswith(RESERVED_PREFIX):
                rest[key] = values
        return rest, factor

    def _bucket(self, ctx: RequestContext) -> str:
        """The context's bucket, or `OTHER_BUCKET` once `max_buckets` buckets have statistics."""
        bucket = context_bucket(ctx)
        gen = self._generation(ctx.task_type) if self._reopens else 0  # no task reopened: generation 0
        if gen or "#" in ctx.task_type:
            bucket = _task_part(ctx.task_type, gen) + bucket[len(ctx.task_type):]
        if bucket in self._pooled or len(self._pooled) < self.settings.max_buckets:
            return bucket
        self.folded_buckets += 1
        return OTHER_BUCKET

    def snapshot(self) -> dict[str, list[float]]:
        """Copy of all statistics [n, Σr, Σr²] per key (and the reopen counts); `~epoch` says which
        discount epoch they are in."""
        out = {key: list(values) for key, values in self._stats.items()}
        if self.discount.enabled:
            out[EPOCH_KEY] = [float(self._decay_epoch), 0.0, 0.0]
        return out

    # ------------------------------------------------------------- deciding
    def choose(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm], rng: np.random.Generator) -> Choice:
        """With probability K·floor a uniform arm, else the winner of one uniformly chosen joint posterior draw.

        One uniform u decides both: u < K·floor picks arm int(u / floor); otherwise the
        rescaled u picks the table row.  So P(arm) = floor + (1 − K·floor)·win share, exactly.
        """
        table = self._table(ctx, arms)
        k = len(arms)
        floor = self.settings.min_propensity
        u = rng.random()
        explore = k * floor
        if u < explore or explore >= 1.0:
            index = min(int(u * k) if explore >= 1.0 else int(u / floor), k - 1)
        else:
            row = int((u - explore) / (1.0 - explore) * table.winners.shape[0])
            index = int(table.winners[min(row, table.winners.shape[0] - 1)])
        return Choice(index=index, propensity=float(table.played[index]))

    def propensities(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm]) -> np.ndarray:
        """What `choose` plays: the floored posterior probability that each arm is the best."""
        return self._table(ctx, arms).played.copy()

    def refresh_stale(self, limit: int = 64) -> int:
        """Rebuild up to `limit` tables that `choose` found stale in deferred mode; returns how many."""
        done = 0
        while self._stale and done < limit:
            key = next(iter(self._stale))
            del self._stale[key]
            if key not in self._tables:
                continue
            bucket, arms = key
            self._tables[key] = self._compute(bucket, arms, self._epoch, self._bucket_versions.get(bucket, 0))
            done += 1
        return done

    def settle(self) -> int:
        """Rebuild every cached table its bucket's statistics have outgrown, read or not.

        `refresh_stale` only knows the tables `choose` has found stale; a consistent read
        (a checkpoint, or a test comparing an endpoint's propensities with its own) needs
        all of them current at once."""
        for key, table in self._tables.items():
            if table.epoch != self._epoch or self._bucket_versions.get(key[0], 0) - table.bucket_version >= self.settings.refresh_every:
                self._stale[key] = None
        return self.refresh_stale(limit=len(self._stale))

    def _make_bank(self, width: int) -> np.ndarray:
        """Fixed standard-normal draws (draws x width), seeded by (seed, width).

        float32 halves the memory traffic of the Monte Carlo; its 1e-7 relative
        precision is far below the posterior spreads being compared.
        """
        rng = np.random.default_rng([self.settings.seed, width])
        return rng.standard_normal((self.settings.propensity_draws, width), dtype=np.float32)

    def _table(self, ctx: RequestContext, arms: Sequence[Arm]) -> _Table:
        if not arms:
            raise ValueError("choose needs at least one arm")
        bucket = self._bucket(ctx)
        bucket_version = self._bucket_versions.get(bucket, 0)
        cache_key = (bucket, tuple(arms))
        table = self._tables.get(cache_key)
        if table is not None:
            if table.epoch == self._epoch and bucket_version - table.bucket_version < self.settings.refresh_every:
                return table
            if self.deferred_refresh:
                # Play the previous table (its propensities are exact for what it plays) and let
                # `refresh_stale` rebuild it off the request path.
                self._stale[cache_key] = None
                return table
        table = self._compute(bucket, arms, self._epoch, bucket_version)
        if len(self._tables) >= self.settings.cache_size:
            self._tables.pop(next(iter(self._tables)))
        self._tables[cache_key] = table
        return table

    def _compute(self, bucket: str, arms: Sequence[Arm], epoch: int, bucket_version: int) -> _Table:
        k = len(arms)
        means = np.empty(k)
        sds = np.empty(k)
        empty = (0.0, 0.0, 0.0)
        pool_n, pool_total, _ = self._pooled.get(bucket, empty)
        for i, arm in enumerate(arms):
            n, total, total_sq = self._stats.get(stat_key(bucket, arm), empty)
            means[i], sds[i], _ = self._posterior(n, total, total_sq, pool_n - n, pool_total - total)
        draws = self.settings.propensity_draws
        if k == 1:
            winners = np.zeros(draws, dtype=np.intp)
        else:
            contenders = np.flatnonzero(means + PRUNE_SDS * sds >= np.max(means - PRUNE_SDS * sds))
            width = contenders.shape[0]
            if width > self._bank.shape[1]:
                self._bank = self._make_bank(1 << (width - 1).bit_length())
            if width == 1:
                winners = np.full(draws, contenders[0], dtype=np.intp)
            else:
                samples = means[contenders].astype(np.float32) + sds[contenders].astype(np.float32) * self._bank[:, :width]
                winners = contenders[np.argmax(samples, axis=1)]
        probs = np.bincount(winners, minlength=k) / draws
        # int16: an arm index needs 2 bytes, so 4,096 cached tables stay ~32 MB, not 128.
        winners = winners.astype(np.int16)
        played = apply_floor(probs, self.settings.min_propensity)
        return _Table(
            epoch=epoch, bucket_version=bucket_version, winners=winners, probs=probs, played=played
        )


def _task_part(task_type: str, generation: int) -> str:
    """The task's part of a bucket: "#" replaced (it marks the generation), `#<generation>` once reopened."""
    clean = task_type.replace("#", "/")
    return f"{clean}#{generation}" if generation else clean


def _split_task(part: str) -> tuple[str, int]:
    name, sep, gen = part.rpartition("#")
    return (name, int(gen)) if sep and gen.isdigit() else (part, 0)
