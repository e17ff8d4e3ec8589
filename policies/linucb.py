"""Disjoint LinUCB with softmax exploration, a propensity floor and exact propensities.

One ridge-regression model per (model, absolute arm), over the context features of
`policies.context.feature_vector` (dimension d = feature_dimension):

    A = λI + Σ x xᵀ        b = Σ r x        θ = A⁻¹ b
    ucb(arm) = θ·x + alpha · sqrt(xᵀ A⁻¹ x)

A⁻¹ is kept up to date with the Sherman–Morrison identity
(A + x xᵀ)⁻¹ = A⁻¹ − (A⁻¹x)(A⁻¹x)ᵀ / (1 + xᵀA⁻¹x), so an update costs O(d²).
Each arm has its own θ, so the arm changes the estimate: the same context gets a
different prediction per (temperature, max_tokens).  Keys are absolute, so clients
with different baselines share what they learn about the same parameters; the model
name is part of the key because a temperature that suits one model need not suit another.
An arm never updated uses the prior (θ = 0, A⁻¹ = I/λ), i.e. a large optimistic bonus.

Exploration.  UCB alone is deterministic, which would give every other arm
propensity 0 and make the logs useless for off-policy evaluation.  The played
distribution is

    p = floor + (1 − K·floor) · softmax(ucb / exploration_factor)

(argmax with ties split equally when exploration_factor is 0; uniform when K·floor ≥ 1),
with floor = min_propensity.  `choose` samples from exactly this p, so the logged
propensity is exact, not an estimate.

Shared state.  The additive statistics are G = Σ x xᵀ (without λI) and b per arm,
exported under `d<d>|<model>|T<t>|M<m>|G` (d·d values, row-major) and `...|b` (d values).
`load_totals` rebuilds A⁻¹ = (λI + G)⁻¹ with one solve per arm.

Corrections.  Feature 0 is the constant 1, so G[0, 0] is the arm's count n; `correct`
swaps a reward only when n >= 1 and the decision was logged under the same statistics
version (`policies.base.Correction`), otherwise b would move with A still at the prior
and θ = b/λ would jump by (new − old)/λ per feature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from policies.arms import arm_key
from policies.base import Choice, Correction, apply_floor, format_version, sample_index, statistics_version
from policies.context import feature_vector
from policies.records import Arm, RequestContext
from policies.settings import LinUCBSettings, ThompsonSettings

PRIOR_ROW = 0
"""Row of the shared prior model (never updated) that arms without data read from."""
FEATURE_CACHE_SIZE = 4096


class LinUCBPolicy:
    """Disjoint LinUCB (module docstring)."""

    name = "linucb"

    @classmethod
    def from_settings(cls, *, thompson: ThompsonSettings, linucb: LinUCBSettings) -> LinUCBPolicy:
        """Registry constructor (`policies.registry`)."""
        return cls(linucb)

    def __init__(self, settings: LinUCBSettings | None = None) -> None:
        self.settings = settings or LinUCBSettings()
        s = self.settings
        if s.regularization <= 0:
            raise ValueError("regularization must be > 0")
        if not 0 <= s.min_propensity <= 1:
            raise ValueError("min_propensity must be in [0, 1]")
        self._d = s.feature_dimension
        feature_vector(_PROBE, self._d)  # validates the dimension early
        self._revision = 0
        self._features: dict[RequestContext, np.ndarray] = {}
        self.lineage = ""  # set by the proxy; part of `version` (policies.base.Correction)
        self._reset()

    def _reset(self) -> None:
        """Empty state: only the prior row."""
        d = self._d
        self._rows: dict[tuple[str, float, int], int] = {}
        self._row_keys: list[tuple[str, float, int] | None] = [None]
        self._a_inv = np.empty((16, d, d))
        self._a_inv[PRIOR_ROW] = np.eye(d) / self.settings.regularization
        self._theta = np.zeros((16, d))
        self._gram = np.zeros((16, d, d))
        self._b = np.zeros((16, d))
        self._pending: dict[tuple[str, float, int], tuple[np.ndarray, np.ndarray]] = {}

    # ----------------------------------------------------------------- state
    @property
    def version(self) -> str:
        """`linucb[.<lineage>]-<revision>`; the revision counts updates and loads."""
        return format_version(self.name, self.lineage, self._revision)

    def _x(self, ctx: RequestContext) -> np.ndarray:
        x = self._features.get(ctx)
        if x is None:
            if len(self._features) >= FEATURE_CACHE_SIZE:
                self._features.pop(next(iter(self._features)))
            x = feature_vector(ctx, self._d)
            x.setflags(write=False)
            self._features[ctx] = x
        return x

    def _row(self, key: tuple[str, float, int]) -> int:
        """Row of `key`, creating it from the prior when new."""
        row = self._rows.get(key)
        if row is not None:
            return row
        row = len(self._row_keys)
        if row >= self._a_inv.shape[0]:
            grow = self._a_inv.shape[0]
            d = self._d
            self._a_inv = np.concatenate([self._a_inv, np.empty((grow, d, d))])
            self._theta = np.concatenate([self._theta, np.zeros((grow, d))])
            self._gram = np.concatenate([self._gram, np.zeros((grow, d, d))])
            self._b = np.concatenate([self._b, np.zeros((grow, d))])
        self._a_inv[row] = self._a_inv[PRIOR_ROW]
        self._theta[row] = 0.0
        self._gram[row] = 0.0
        self._b[row] = 0.0
        self._rows[key] = row
        self._row_keys.append(key)
        return row

    @staticmethod
    def _key(ctx: RequestContext, arm: Arm) -> tuple[str, float, int]:
        """(model, temperature, max_tokens); an effort level rides on the model part
        (`model@high`) so arms that differ only in effort keep separate statistics."""
        temperature, max_tokens = arm_key(arm)
        return (_model_part(ctx.model, arm), temperature, max_tokens)

    def update(self, ctx: RequestContext, baseline: Arm, arm: Arm, reward: float) -> None:
        """Sherman–Morrison update of the arm's model; raises ValueError on a non-finite reward."""
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward!r}")
        x = self._x(ctx)
        key = self._key(ctx, arm)
        row = self._row(key)
        a_inv = self._a_inv[row]
        a_inv_x = a_inv @ x
        a_inv -= np.outer(a_inv_x, a_inv_x) / (1.0 + x @ a_inv_x)
        xxt = np.outer(x, x)
        rx = reward * x
        self._gram[row] += xxt
        self._b[row] += rx
        self._theta[row] = a_inv @ self._b[row]
        pending = self._pending.get(key)
        if pending is None:
            self._pending[key] = (xxt, rx.copy())
        else:
            pending[0].__iadd__(xxt)
            pending[1].__iadd__(rx)
        self._revision += 1

    def correct(
        self, ctx: RequestContext, baseline: Arm, arm: Arm, old_reward: float, new_reward: float, *, logged_version: str
    ) -> Correction:
        """Replace one reward already folded in (delayed feedback): A stays, b moves by (new − old)·x."""
        if not (math.isfinite(old_reward) and math.isfinite(new_reward)):
            raise ValueError("rewards must be finite")
        if statistics_version(logged_version) != statistics_version(self.version):
            return "skipped"
        key = self._key(ctx, arm)
        known = self._rows.get(key)
        if known is None or self._gram[known][0, 0] < 1.0:
            self.update(ctx, baseline, arm, new_reward)
            return "updated"
        x = self._x(ctx)
        row = known
        rx = (new_reward - old_reward) * x
        self._b[row] += rx
        self._theta[row] = self._a_inv[row] @ self._b[row]
        pending = self._pending.get(key)
        if pending is None:
            self._pending[key] = (np.zeros((self._d, self._d)), rx.copy())
        else:
            pending[1].__iadd__(rx)
        self._revision += 1
        return "corrected"

    def _stat_prefix(self, key: tuple[str, float, int]) -> str:
        model, temperature, max_tokens = key
        return f"d{self._d}|{model}|T{temperature:g}|M{max_tokens}"

    def export_delta(self) -> dict[str, list[float]]:
        """Increments of G (…|G) and b (…|b) per arm since the last export; resets them."""
        out: dict[str, list[float]] = {}
        for key, (gram, b) in self._pending.items():
            prefix = self._stat_prefix(key)
            out[prefix + "|G"] = gram.ravel().tolist()
            out[prefix + "|b"] = b.tolist()
        self._pending = {}
        return out

    def snapshot(self) -> dict[str, list[float]]:
        """All statistics G and b per arm (including unexported increments)."""
        out: dict[str, list[float]] = {}
        for key, row in self._rows.items():
            prefix = self._stat_prefix(key)
            out[prefix + "|G"] = self._gram[row].ravel().tolist()
            out[prefix + "|b"] = self._b[row].tolist()
        return out

    def _parse(self, totals: dict[str, list[float]]) -> dict[tuple[str, float, int], dict[str, np.ndarray]]:
        """Exported statistics by arm key; those of another feature dimension are not ours to read."""
        d = self._d
        parsed: dict[tuple[str, float, int], dict[str, np.ndarray]] = {}
        for name, values in totals.items():
            head, _, part = name.rpartition("|")
            dim, _, rest = head.partition("|")
            if dim != f"d{d}":
                continue
            model, t_part, m_part = rest.rsplit("|", 2)
            key = (model, round(float(t_part[1:]), 3) + 0.0, int(m_part[1:]))
            expected = d * d if part == "G" else d
            if part not in ("G", "b") or len(values) != expected:
                raise ValueError(f"bad LinUCB statistic {name!r} ({len(values)} values)")
            parsed.setdefault(key, {})[part] = np.asarray(values, dtype=np.float64)
        return parsed

    def _set_row(self, key: tuple[str, float, int], stats: dict[str, np.ndarray]) -> None:
        """Merged totals (plus unexported increments) into the arm's row; A⁻¹ and θ recomputed."""
        d = self._d
        row = self._row(key)
        pending = self._pending.get(key)
        if "G" in stats:
            self._gram[row] = stats["G"].reshape(d, d) + (pending[0] if pending is not None else 0.0)
        if "b" in stats:
            self._b[row] = stats["b"] + (pending[1] if pending is not None else 0.0)
        a = self._gram[row] + self.settings.regularization * np.eye(d)
        self._a_inv[row] = np.linalg.inv(a)
        self._theta[row] = np.linalg.solve(a, self._b[row])

    def load_totals(self, totals: dict[str, list[float]]) -> None:
        """Adopt merged totals (G, b per arm), re-applying unexported local increments."""
        parsed = self._parse(totals)
        pending = self._pending
        self._reset()
        self._pending = pending
        d = self._d
        for key in parsed.keys() | pending.keys():
            stats = parsed.get(key, {})
            # An arm with only local increments starts from zero totals.
            self._set_row(key, {"G": stats.get("G", np.zeros(d * d)), "b": stats.get("b", np.zeros(d))})
        self._revision += 1

    def load_changed(self, totals: dict[str, list[float]]) -> None:
        """Adopt merged totals of these arms only (one inverse per arm changed)."""
        parsed = self._parse(totals)
        for key, stats in parsed.items():
            self._set_row(key, stats)
        if parsed:
            self._revision += 1

    # ------------------------------------------------------------- deciding
    def scores(self, ctx: RequestContext, arms: Sequence[Arm]) -> tuple[np.ndarray, np.ndarray]:
        """(θ·x, sqrt(xᵀA⁻¹x)) per arm: the estimate and its uncertainty width."""
        x = self._x(ctx)
        model = ctx.model
        rows = [self._rows.get((_model_part(model, a), *arm_key(a)), PRIOR_ROW) for a in arms]
        mean = self._theta[rows] @ x
        width = np.sqrt(np.maximum((self._a_inv[rows] @ x) @ x, 0.0))
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


def _model_part(model: str, arm: Arm) -> str:
    return model if arm.effort is None else f"{model}@{arm.effort}"


_PROBE = RequestContext(
    task_type="default",
    model="",
    endpoint="chat",
    prompt_tokens_est=0,
    message_count=0,
    has_tools=False,
    json_mode=False,
    stream=False,
    client_temperature=None,
    client_max_tokens=None,
)
