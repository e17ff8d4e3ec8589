"""Joint LinUCB over context × arm features, with softmax exploration, a propensity floor and exact propensities.

One ridge-regression model per (task type, model@upstream, endpoint), over the features

    φ(ctx, arm) = a(arm) ⊗ c(ctx)        (dimension D = 8 · 7 = 56)

where c(ctx) is `policies.context.numeric_features` (bias, log prompt tokens, log message
count, tools, JSON mode, stream, the client's temperature) and a(arm) is

    a = [1, t, t², m, m², t·m, e, e²]

with t = temperature / 2, m = ln(max_tokens) / ln(65536) and e the effort level's rank
on `policies.effort.EFFORT_LEVELS` scaled to [0, 1] (0 without effort).  Every term of a is
crossed with every context feature, so the context moves the whole reward surface.  The
quadratic terms let the model have an optimum inside the grid (reward is not monotone in
temperature), and because every arm is a point on one surface, what is learnt about two
arms informs the arms between them: an arm never played between two good ones scores well.

    A = λI + Σ φφᵀ        b = Σ r φ        θ = A⁻¹ b
    ucb(arm) = θ·φ + alpha · sqrt(φᵀ A⁻¹ φ)

A model is kept per task type rather than crossing a task one-hot into φ: known task types
cannot collide in a hashed slot, φ stays 56 wide whatever the number of task types, and a
detected change in one task (`reopen`) restarts that task's models without touching the
others.  At most `max_models` models are kept (memory is bounded: 2·D² floats each);
contexts past that share the model "other" (counted in `folded_buckets`).  The model key
contains the upstream (`policies.context.model_group`), so the same model name on two
upstreams learns separately.

A⁻¹ is kept up to date with the Sherman–Morrison identity
(A + φφᵀ)⁻¹ = A⁻¹ − (A⁻¹φ)(A⁻¹φ)ᵀ / (1 + φᵀA⁻¹φ), so an update costs O(D²); after a
load or a discount it is recomputed (one inverse) the next time the model is read.

Exploration.  UCB alone is deterministic, which would give every other arm
propensity 0 and make the logs useless for off-policy evaluation.  The played
distribution is

    p = floor + (1 − K·floor) · softmax(ucb / exploration_factor)

(argmax with ties split equally when exploration_factor is 0; uniform when K·floor ≥ 1),
with floor = min_propensity.  `choose` samples from exactly this p, so the logged
propensity is exact, not an estimate.

Shared state.  The additive statistics are G = Σ φφᵀ (without λI) and b per model,
exported under `j<D>|<task>|<model@upstream>|<endpoint>|G` (D·D values, row-major) and
`...|b` (D values); a replica merge is a sum of these.  `~reopen|<task>` counts reopens
(`reopen`): a task reopened g times keeps its statistics under `<task>#<g>`, so every
replica that has seen the count writes to, and reads, the same fresh keys.

Discounting (`policies.base.Discount`).  `advance(epoch)` multiplies G, b and the
unexported increments by γ^(epochs passed); a model's A is then λI + γ^k·G, i.e. a
reward seen k epochs ago weighs γ^k.  Sums of decayed increments are decayed sums, so
merges stay additive (the store is decayed at the same boundaries by proxy/learning/sync.py).

Corrections.  c[0] = a[0] = 1, so G[0, 0] is the model's (decayed) count n; `correct`
swaps a reward only when n >= 1 and the decision was logged under the same statistics
version (`policies.base.Correction`), scaled by γ^(epochs since the decision) like the
reward it replaces; otherwise b would move with A still at the prior.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from policies.base import (
    RESERVED_PREFIX,
    Choice,
    Correction,
    Discount,
    ReopenCounts,
    apply_floor,
    sample_index,
    statistics_version,
    version_epoch,
)
from policies.context import NUMERIC_FEATURES, model_group, numeric_features
from policies.effort import EFFORT_LEVELS
from policies.records import Arm, RequestContext
from policies.settings import LinUCBSettings, ThompsonSettings

ARM_FEATURES: tuple[str, ...] = ("bias", "t", "t2", "m", "m2", "tm", "e", "e2")
CONTEXT_DIMENSION = len(NUMERIC_FEATURES)
DIMENSION = len(ARM_FEATURES) * CONTEXT_DIMENSION
TEMPERATURE_SCALE = 2.0
LOG_MAX_TOKENS_SCALE = math.log(65536.0)
OTHER_MODEL = "other"
REOPEN_PREFIX = RESERVED_PREFIX + "reopen|"
EPOCH_KEY = RESERVED_PREFIX + "epoch"
FEATURE_CACHE_SIZE = 4096


def arm_features(arm: Arm) -> np.ndarray:
    """a(arm) of the module docstring."""
    t = arm.temperature / TEMPERATURE_SCALE
    m = math.log(max(1, arm.max_tokens)) / LOG_MAX_TOKENS_SCALE
    e = 0.0
    if arm.effort is not None and arm.effort in EFFORT_LEVELS:
        e = EFFORT_LEVELS.index(arm.effort) / (len(EFFORT_LEVELS) - 1)
    return np.array([1.0, t, t * t, m, m * m, t * m, e, e * e])


def joint_features(ctx_features: np.ndarray, arm: Arm) -> np.ndarray:
    """φ = a(arm) ⊗ c(ctx)."""
    return np.kron(arm_features(arm), ctx_features)


def task_part(task_type: str, generation: int) -> str:
    """The task's part of a key: separators replaced, `#<generation>` once reopened."""
    clean = task_type.replace("|", "/").replace("#", "/")
    return f"{clean}#{generation}" if generation else clean


def _split_task(part: str) -> tuple[str, int]:
    name, sep, gen = part.rpartition("#")
    return (name, int(gen)) if sep and gen.isdigit() else (part, 0)


class _Model:
    """Statistics of one key; A⁻¹ and θ are derived, recomputed lazily after a load or a discount."""

    __slots__ = ("a_inv", "b", "gram", "stale", "theta")

    def __init__(self, regularization: float) -> None:
        self.gram = np.zeros((DIMENSION, DIMENSION))
        self.b = np.zeros(DIMENSION)
        self.a_inv = np.eye(DIMENSION) / regularization
        self.theta = np.zeros(DIMENSION)
        self.stale = False


class LinUCBPolicy(ReopenCounts):
    """Joint LinUCB (module docstring)."""

    name = "linucb"

    @classmethod
    def from_settings(cls, *, thompson: ThompsonSettings, linucb: LinUCBSettings, discount: Discount | None = None) -> LinUCBPolicy:
        """Registry constructor (`policies.registry`)."""
        return cls(linucb, discount=discount)

    def __init__(self, settings: LinUCBSettings | None = None, *, discount: Discount | None = None) -> None:
        self.settings = settings or LinUCBSettings()
        s = self.settings
        if s.regularization <= 0:
            raise ValueError("regularization must be > 0")
        if not 0 <= s.min_propensity <= 1:
            raise ValueError("min_propensity must be in [0, 1]")
        if s.max_models < 1:
            raise ValueError("max_models must be >= 1")
        self.discount = discount or Discount()
        self._revision = 0
        self._features: dict[RequestContext, np.ndarray] = {}
        self._arm_cache: dict[Arm, np.ndarray] = {}
        self.lineage = ""  # set by the proxy; part of `version` (policies.base.Correction)
        self.folded_buckets = 0
        self._decay_epoch = 0
        self._models: dict[str, _Model] = {}
        self._pending: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._reopens: dict[str, float] = {}  # task -> merged count (totals + unexported)
        self._reopens_pending: dict[str, float] = {}
        self._prior = _Model(s.regularization)

    # ----------------------------------------------------------------- state
    def _key(self, ctx: RequestContext) -> str:
        key = f"{task_part(ctx.task_type, self._generation(ctx.task_type))}|{model_group(ctx)}|{ctx.endpoint}"
        return key.replace(" ", "_")

    def _x(self, ctx: RequestContext) -> np.ndarray:
        x = self._features.get(ctx)
        if x is None:
            if len(self._features) >= FEATURE_CACHE_SIZE:
                self._features.pop(next(iter(self._features)))
            x = numeric_features(ctx)
            x.setflags(write=False)
            self._features[ctx] = x
        return x

    def _a(self, arm: Arm) -> np.ndarray:
        a = self._arm_cache.get(arm)
        if a is None:
            if len(self._arm_cache) >= FEATURE_CACHE_SIZE:
                self._arm_cache.pop(next(iter(self._arm_cache)))
            a = arm_features(arm)
            a.setflags(write=False)
            self._arm_cache[arm] = a
        return a

    def _phi(self, ctx: RequestContext, arm: Arm) -> np.ndarray:
        return np.outer(self._a(arm), self._x(ctx)).ravel()

    def _model_for_update(self, key: str) -> tuple[str, _Model]:
        """The key's model, created when new, or "other" once `max_models` exist."""
        model = self._models.get(key)
        if model is not None:
            return key, model
        if len(self._models) >= self.settings.max_models:
            self.folded_buckets += 1
            key = OTHER_MODEL
            model = self._models.get(key)
            if model is not None:
                return key, model
        model = self._models[key] = _Model(self.settings.regularization)
        return key, model

    def _read(self, key: str) -> _Model:
        """The model `choose` reads for `key` (the prior when the key has none), made current."""
        model = self._models.get(key)
        if model is None:
            if len(self._models) >= self.settings.max_models and OTHER_MODEL in self._models:
                model = self._models[OTHER_MODEL]
            else:
                return self._prior
        if model.stale:
            a = model.gram + self.settings.regularization * np.eye(DIMENSION)
            model.a_inv = np.asarray(np.linalg.inv(a), dtype=np.float64)
            model.theta = np.asarray(np.linalg.solve(a, model.b), dtype=np.float64)
            model.stale = False
        return model

    def _add_pending(self, key: str, gram: np.ndarray | None, b: np.ndarray) -> None:
        pending = self._pending.get(key)
        if pending is None:
            self._pending[key] = (np.zeros((DIMENSION, DIMENSION)) if gram is None else gram.copy(), b.copy())
        else:
            if gram is not None:
                pending[0].__iadd__(gram)
            pending[1].__iadd__(b)

    def update(self, ctx: RequestContext, baseline: Arm, arm: Arm, reward: float) -> None:
        """Sherman–Morrison update of the context's model; raises ValueError on a non-finite reward."""
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward!r}")
        phi = self._phi(ctx, arm)
        key, model = self._model_for_update(self._key(ctx))
        model = self._read(key)
        a_inv_x = model.a_inv @ phi
        model.a_inv -= np.outer(a_inv_x, a_inv_x) / (1.0 + phi @ a_inv_x)
        xxt = np.outer(phi, phi)
        rx = reward * phi
        model.gram += xxt
        model.b += rx
        model.theta = model.a_inv @ model.b
        self._add_pending(key, xxt, rx)
        self._revision += 1

    def correct(
        self, ctx: RequestContext, baseline: Arm, arm: Arm, old_reward: float, new_reward: float, *, logged_version: str
    ) -> Correction:
        """Replace one reward already folded in (delayed feedback): A stays, b moves by γ^k·(new − old)·φ."""
        if not (math.isfinite(old_reward) and math.isfinite(new_reward)):
            raise ValueError("rewards must be finite")
        if statistics_version(logged_version) != statistics_version(self.version):
            return "skipped"
        key = self._key(ctx)
        phi = self._phi(ctx, arm)
        known = self._models.get(key)
        if known is None or known.gram[0, 0] < 1.0 or not self._could_hold(self._read(key), phi):
            self.update(ctx, baseline, arm, new_reward)
            return "updated"
        scale = self.discount.factor(self._decay_epoch - version_epoch(logged_version))
        model = self._read(key)
        rx = (new_reward - old_reward) * scale * phi
        model.b += rx
        model.theta = model.a_inv @ model.b
        self._add_pending(key, None, rx)
        self._revision += 1
        return "corrected"

    def _could_hold(self, model: _Model, phi: np.ndarray) -> bool:
        """Whether G can contain φφᵀ at all: if it does, A ⪰ λI + φφᵀ, so φᵀA⁻¹φ ≤ |φ|²/(λ + |φ|²).

        A larger leverage proves the reward at φ was never folded in (the joint model's n >= 1
        test: with one-hot features it is exactly n > 1 − λ); small rounding slack allowed.
        """
        norm = float(phi @ phi)
        bound = norm / (self.settings.regularization + norm)
        return float(phi @ model.a_inv @ phi) <= bound * (1.0 + 1e-9)

    # --------------------------------------------------------- non-stationarity
    def advance(self, epoch: int) -> None:
        """Discount everything to `epoch` (`policies.base.Adaptive`)."""
        if epoch <= self._decay_epoch:
            return
        factor = self.discount.factor(epoch - self._decay_epoch)
        self._decay_epoch = epoch
        if factor == 1.0:
            return
        for model in self._models.values():
            model.gram *= factor
            model.b *= factor
            model.stale = True
        for gram, b in self._pending.values():
            gram *= factor
            b *= factor
        self._revision += 1

    def reopen(self, task_type: str) -> None:
        """Restart the task type's models: its reopen count goes up by one (shared like any statistic),
        so this and every replica that merges it learn under fresh keys from now on."""
        old = task_part(task_type, self._generation(task_type)) + "|"
        self._reopens[task_type] = self._reopens.get(task_type, 0.0) + 1.0
        self._reopens_pending[task_type] = self._reopens_pending.get(task_type, 0.0) + 1.0
        for store in (self._models, self._pending):
            for key in [k for k in store if k.startswith(old)]:
                del store[key]
        self._revision += 1

    def _current(self, key: str) -> bool:
        """Whether a stored key belongs to its task's current generation."""
        name, gen = _split_task(key.split("|", 1)[0])
        return key == OTHER_MODEL or gen == self._generation(name)

    # ------------------------------------------------------------ sharing
    def export_delta(self) -> dict[str, list[float]]:
        """Increments of G (…|G), b (…|b) per model and reopen counts since the last export; resets them."""
        out: dict[str, list[float]] = {}
        for key, (gram, b) in self._pending.items():
            prefix = f"j{DIMENSION}|{key}"
            out[prefix + "|G"] = gram.ravel().tolist()
            out[prefix + "|b"] = b.tolist()
        for task, count in self._reopens_pending.items():
            out[REOPEN_PREFIX + task] = [count]
        self._pending = {}
        self._reopens_pending = {}
        return out

    def snapshot(self) -> dict[str, list[float]]:
        """All statistics (including unexported increments); `~epoch` says which epoch they are in."""
        out: dict[str, list[float]] = {}
        for key, model in self._models.items():
            prefix = f"j{DIMENSION}|{key}"
            out[prefix + "|G"] = model.gram.ravel().tolist()
            out[prefix + "|b"] = model.b.tolist()
        for task, count in self._reopens.items():
            out[REOPEN_PREFIX + task] = [count]
        if self.discount.enabled:
            out[EPOCH_KEY] = [float(self._decay_epoch)]
        return out

    def _parse(self, totals: dict[str, list[float]]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float], float]:
        """(model statistics by key, reopen counts by task, factor to this epoch); other layouts are not ours."""
        parsed: dict[str, dict[str, np.ndarray]] = {}
        reopens: dict[str, float] = {}
        factor = 1.0
        stamp = totals.get(EPOCH_KEY)
        if stamp:
            epoch = int(stamp[0])
            self.advance(epoch)
            factor = self.discount.factor(self._decay_epoch - epoch)
        for name, values in totals.items():
            if name.startswith(REOPEN_PREFIX):
                reopens[name[len(REOPEN_PREFIX):]] = float(values[0]) if values else 0.0
                continue
            head, _, part = name.rpartition("|")
            dim, _, key = head.partition("|")
            if dim != f"j{DIMENSION}" or name.startswith(RESERVED_PREFIX):
                continue
            expected = DIMENSION * DIMENSION if part == "G" else DIMENSION
            if part not in ("G", "b") or len(values) != expected:
                raise ValueError(f"bad LinUCB statistic {name!r} ({len(values)} values)")
            parsed.setdefault(key, {})[part] = np.asarray(values, dtype=np.float64) * factor
        return parsed, reopens, factor

    def _adopt_reopens(self, reopens: dict[str, float]) -> None:
        for task, count in reopens.items():
            old = self._generation(task)
            self._reopens[task] = count + self._reopens_pending.get(task, 0.0)
            if self._generation(task) != old:
                stale = task_part(task, old) + "|"
                for store in (self._models, self._pending):
                    for key in [k for k in store if k.startswith(stale)]:
                        del store[key]

    def _set(self, key: str, stats: dict[str, np.ndarray]) -> None:
        """Merged totals (plus unexported increments) into the key's model; A⁻¹ and θ recomputed on the next read."""
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = _Model(self.settings.regularization)
        pending = self._pending.get(key)
        if "G" in stats:
            model.gram = stats["G"].reshape(DIMENSION, DIMENSION) + (pending[0] if pending is not None else 0.0)
        if "b" in stats:
            model.b = stats["b"] + (pending[1] if pending is not None else 0.0)
        model.stale = True

    def load_totals(self, totals: dict[str, list[float]]) -> None:
        """Adopt merged totals, re-applying unexported local increments."""
        parsed, reopens, _ = self._parse(totals)
        self._reopens = {}
        self._adopt_reopens(reopens)
        for task, count in self._reopens_pending.items():
            self._reopens.setdefault(task, count)
        self._models = {}
        for key in parsed.keys() | self._pending.keys():
            if not self._current(key):
                continue
            stats = parsed.get(key, {})
            self._set(key, {"G": stats.get("G", np.zeros(DIMENSION * DIMENSION)), "b": stats.get("b", np.zeros(DIMENSION))})
        self._revision += 1

    def load_changed(self, totals: dict[str, list[float]]) -> None:
        """Adopt merged totals of these keys only (one inverse per model changed, when next read)."""
        parsed, reopens, _ = self._parse(totals)
        self._adopt_reopens(reopens)
        for key, stats in parsed.items():
            if self._current(key):
                self._set(key, stats)
        if parsed or reopens:
            self._revision += 1

    # ------------------------------------------------------------- deciding
    def scores(self, ctx: RequestContext, arms: Sequence[Arm]) -> tuple[np.ndarray, np.ndarray]:
        """(θ·φ, sqrt(φᵀA⁻¹φ)) per arm: the estimate and its uncertainty width."""
        x = self._x(ctx)
        model = self._read(self._key(ctx))
        # φ = a ⊗ x, so θ·φ = aᵀ(Θx) and φᵀA⁻¹φ = aᵀ(M_x)a with M_x = Σ_jl x_j A⁻¹[(·,j),(·,l)] x_l:
        # x is contracted once (O(D²)) instead of building K vectors of length D.
        n_arm = len(ARM_FEATURES)
        a = np.array([self._a(arm) for arm in arms])
        mean = a @ (model.theta.reshape(n_arm, CONTEXT_DIMENSION) @ x)
        m_x = (model.a_inv.reshape(n_arm, CONTEXT_DIMENSION, n_arm, CONTEXT_DIMENSION) @ x).transpose(0, 2, 1) @ x
        width = np.sqrt(np.maximum(((a @ m_x) * a).sum(axis=1), 0.0))
        return mean, width

    def propensities(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm]) -> np.ndarray:
        """The exact distribution `choose` samples from (module docstring)."""
        if not arms:
            raise ValueError("choose needs at least one arm")
        mean, width = self.scores(ctx, arms)
        ucb = mean + self.settings.alpha * width
        tau = self.settings.exploration_factor
        if tau > 0:
            weights = np.exp((ucb - ucb.max()) / tau)
        else:
            weights = (ucb >= ucb.max() - 1e-12).astype(np.float64)
        return apply_floor(weights / weights.sum(), self.settings.min_propensity)

    def choose(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm], rng: np.random.Generator) -> Choice:
        """Sample from `propensities` with one uniform from `rng`."""
        probs = self.propensities(ctx, baseline, arms)
        index = sample_index(probs, rng)
        return Choice(index=index, propensity=float(probs[index]))
