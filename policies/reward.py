"""Reward of one outcome, and the running per-task baseline that normalises it.

    reward = w_quality · quality
           − w_latency · min(latency / baseline_latency, max_ratio)
           − w_tokens  · min(tokens  / baseline_tokens,  max_ratio)

Where prices are known the last term is a cost term in dollars instead, with the same
weight and cap: `w_tokens · min(cost_usd / baseline_cost_usd, max_ratio)`, so a cheaper
setting is valued by the share of the baseline's spend it saves (input and cached
tokens and the model's own prices included, not just how many tokens it wrote). It
applies when the request has a cost and the task's baseline traffic has a mean cost
(the same fallbacks as below); otherwise the token term stands. Both ratios are 1 at
the baseline's typical request, so the two terms sit on one scale.

Latency and tokens are divided by what the *baseline* parameters typically cost for the
same task type, so the penalty is unit-free and comparable across tasks (a 10 s code
answer is normal, a 10 s classification is not).  The ratios are capped at `max_ratio`
so one timeout cannot swamp a posterior.  The normalisers are floored (1 ms, 1 token)
so a zero never divides.

`BaselineCosts` keeps those normalisers: per task type the additive vector
[n, Σlatency_s, Σtokens, n_priced, Σcost_usd] of outcomes **served with the baseline arm** (off, holdout,
shadow traffic: the parameters the client would have got anyway).  Until a task has
`min_samples` such outcomes it falls back to all tasks pooled, then to the defaults.
It is additive, so replicas can share it through the same export/load cycle as the
policies (`export_delta` / `load_totals`).
"""

from __future__ import annotations

import math

import msgspec

from policies.settings import RewardSettings

MIN_LATENCY_S = 1e-3
MIN_TOKENS = 1.0
MIN_COST_USD = 1e-9
_WIDTH = 5  # [n, Σlatency_s, Σtokens, n_priced, Σcost_usd]; vectors shared before dollars have 3
POOLED = "*"
"""Key of the all-tasks pool in `BaselineCosts`."""


def compute_reward(
    *,
    quality: float,
    latency_s: float,
    tokens: int,
    baseline_latency_s: float,
    baseline_tokens: float,
    settings: RewardSettings,
    cost_usd: float | None = None,
    baseline_cost_usd: float | None = None,
) -> float:
    """Reward of one outcome (formula in the module docstring): the cost term in dollars when both costs are known."""
    latency_ratio = max(0.0, latency_s) / max(baseline_latency_s, MIN_LATENCY_S)
    if cost_usd is not None and baseline_cost_usd is not None and math.isfinite(cost_usd):
        spend_ratio = max(0.0, cost_usd) / max(baseline_cost_usd, MIN_COST_USD)
    else:
        spend_ratio = max(0, tokens) / max(baseline_tokens, MIN_TOKENS)
    return (
        settings.w_quality * min(1.0, max(0.0, quality))
        - settings.w_latency * min(latency_ratio, settings.max_ratio)
        - settings.w_tokens * min(spend_ratio, settings.max_ratio)
    )


def reward_bounds(settings: RewardSettings) -> tuple[float, float]:
    """The bounds `compute_reward` can produce; the one copy (confidence sequences, OPE intervals and
    `thermostat evaluate` need them).

    Quality lies in [0, 1] and each cost ratio in [0, max_ratio], so each term spans
    [min(0, w·end), max(0, w·end)]: a weight of either sign gives exact bounds. With the usual
    non-negative weights this is [−(w_latency + w_tokens)·max_ratio, w_quality].
    """
    w_q, w_l, w_t, cap = settings.w_quality, settings.w_latency, settings.w_tokens, settings.max_ratio
    low = min(w_q, 0.0) - (max(w_l, 0.0) + max(w_t, 0.0)) * cap
    high = max(w_q, 0.0) + (max(-w_l, 0.0) + max(-w_t, 0.0)) * cap
    return low, high


class BaselineCosts(msgspec.Struct):
    """Running mean latency, tokens and cost of baseline-served outcomes, per task type."""

    default_latency_s: float = 1.0
    default_tokens: float = 256.0
    min_samples: int = 20
    totals: dict[str, list[float]] = {}  # task -> [n, Σlatency_s, Σtokens, n_priced, Σcost_usd]; "*" = all tasks
    pending: dict[str, list[float]] = {}

    def observe(self, task_type: str, latency_s: float, tokens: int, cost_usd: float | None = None) -> None:
        """Record one baseline-served outcome (ignored if latency is not finite); `cost_usd` None = no price."""
        if not math.isfinite(latency_s) or latency_s < 0:
            return
        priced = cost_usd is not None and math.isfinite(cost_usd) and cost_usd >= 0
        added = float(max(0, tokens))  # the same value for the four vectors: computed once
        cost = float(cost_usd) if priced else 0.0  # type: ignore[arg-type]
        for store in (self.totals, self.pending):
            for key in (task_type, POOLED):
                stats = store.get(key)
                if stats is None:
                    stats = store[key] = [0.0] * _WIDTH
                elif len(stats) < _WIDTH:
                    stats.extend([0.0] * (_WIDTH - len(stats)))
                stats[0] += 1.0
                stats[1] += latency_s
                stats[2] += added
                if priced:
                    stats[3] += 1.0
                    stats[4] += cost

    def _stats(self, task_type: str) -> list[float] | None:
        for key in (task_type, POOLED):
            stats = self.totals.get(key)
            if stats is not None and stats[0] >= self.min_samples:
                return stats
        return None

    def latency_s(self, task_type: str) -> float:
        """Mean baseline latency of the task (fallbacks in the module docstring)."""
        stats = self._stats(task_type)
        return stats[1] / stats[0] if stats else self.default_latency_s

    def tokens(self, task_type: str) -> float:
        """Mean baseline completion tokens of the task (fallbacks in the module docstring)."""
        stats = self._stats(task_type)
        return stats[2] / stats[0] if stats else self.default_tokens

    def cost_usd(self, task_type: str) -> float | None:
        """Mean cost of the task's priced baseline outcomes (then all tasks pooled); None below `min_samples` priced ones."""
        for key in (task_type, POOLED):
            stats = self.totals.get(key)
            if stats is not None and len(stats) >= _WIDTH and stats[3] >= self.min_samples:
                return stats[4] / stats[3]
        return None

    def export_delta(self) -> dict[str, list[float]]:
        """Increments since the last export; resets them."""
        delta, self.pending = self.pending, {}
        return delta

    def load_totals(self, totals: dict[str, list[float]]) -> None:
        """Adopt merged totals, keeping unexported increments on top."""
        merged = {key: [float(v) for v in values] for key, values in totals.items()}
        for key, values in self.pending.items():
            into = merged.setdefault(key, [0.0] * _WIDTH)
            if len(into) < len(values):
                into.extend([0.0] * (len(values) - len(into)))
            for i, v in enumerate(values):
                into[i] += v
        self.totals = merged

    def load_changed(self, totals: dict[str, list[float]]) -> None:
        """`load_totals` for the given task types only; the others stay as they are."""
        for key, values in totals.items():
            merged = [float(v) for v in values]
            extra = self.pending.get(key, ())
            if len(merged) < len(extra):
                merged.extend([0.0] * (len(extra) - len(merged)))
            for i, v in enumerate(extra):
                merged[i] += v
            self.totals[key] = merged

    def reward(
        self, *, task_type: str, quality: float, latency_s: float, tokens: int, settings: RewardSettings, cost_usd: float | None = None
    ) -> float:
        """`compute_reward` with this task's normalisers (the cost term when `cost_usd` and the baseline's mean cost are known)."""
        stats = self._stats(task_type)  # what `latency_s` and `tokens` read, looked up once
        return compute_reward(
            quality=quality,
            latency_s=latency_s,
            tokens=tokens,
            baseline_latency_s=stats[1] / stats[0] if stats else self.default_latency_s,
            baseline_tokens=stats[2] / stats[0] if stats else self.default_tokens,
            settings=settings,
            cost_usd=cost_usd,
            baseline_cost_usd=self.cost_usd(task_type) if cost_usd is not None else None,
        )
