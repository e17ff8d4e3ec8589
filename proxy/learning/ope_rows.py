"""The logged decisions that off-policy evaluation reads, and the arrays it computes over them.

In the learning room because promotion evidence (`evidence.py`) needs them off the
request path; the control API's reports (`proxy/control/reports.py`) read the same
arrays, so the report and the promotion gate agree on every number.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from policies import ope
from policies.arms import arm_key, arm_model_key
from policies.context import context_bucket
from policies.records import Arm
from proxy.decision import BanditDecider, context_from_features
from proxy.store import DecisionRow, LogStore


async def load_rows(
    store: LogStore,
    *,
    since: float,
    until: float,
    max_rows: int,
    task_type: str | None = None,
    mode: str | None = None,
) -> tuple[list[DecisionRow], bool]:
    """Newest `max_rows` decisions in [since, until); True when the window held more."""
    rows = await store.fetch_decisions(since=since, until=until, task_type=task_type, mode=mode, limit=max_rows + 1)
    truncated = len(rows) > max_rows
    return rows[:max_rows], truncated


Scored = tuple[DecisionRow, Any, Arm, list[Arm], np.ndarray, Arm]


def ope_label(arm: Arm) -> str:
    """The reward model's key of an arm (the requested model's as before, a stand-in's with `#model`)."""
    t, m = arm_key(arm)
    return f"{t:g}|{m}" if arm.model is None else f"{t:g}|{m}#{arm.model}"


def score_rows(decider: BanditDecider, rows: Sequence[DecisionRow]) -> tuple[list[Scored], int]:
    """Rows usable for OPE with the current policy's propensities, and how many were skipped.

    Asks the live policy, so it runs on the event loop (`score_rows_async` in slices).
    """
    skipped = 0
    kept: list[Scored] = []
    for r in rows:
        reward = r.effective_reward
        if r.mode != "optimized" or reward is None or not math.isfinite(reward) or not math.isfinite(r.log_propensity):
            skipped += 1
            continue
        ctx = context_from_features(r.context_features)
        if ctx is None:
            skipped += 1
            continue
        options = decider.arms.options(ctx)
        base, allowed = options.reference.arm, options.allowed
        probs = decider.pmf(ctx, base, allowed)  # what the decider plays now (model and temperature stages, safe caps, stand-ins)
        kept.append((r, ctx, r.chosen_params.arm(r.baseline_params), allowed, probs, base))
    return kept, skipped


async def score_rows_async(decider: BanditDecider, rows: list[DecisionRow], slice_rows: int = 128) -> tuple[list[Scored], int]:
    """`score_rows` in slices with a yield between them, so requests are served meanwhile."""
    kept: list[Scored] = []
    skipped = 0
    for start in range(0, len(rows), slice_rows):
        part, n = score_rows(decider, rows[start : start + slice_rows])
        kept += part
        skipped += n
        await asyncio.sleep(0)
    return kept, skipped


class OpeArrays:
    """Per logged optimized row: reward, behaviour/target/baseline propensities and DR terms."""

    def __init__(self, decider: BanditDecider, rows: list[DecisionRow], scored: tuple[list[Scored], int] | None = None) -> None:
        """`scored` (from `score_rows`) skips querying the policy, so the rest may run in a thread."""
        kept, self.skipped = scored if scored is not None else score_rows(decider, rows)
        n = len(kept)
        self.n = n
        self.rewards = np.array([k[0].effective_reward for k in kept], dtype=np.float64)
        self.logged_at = np.array([k[0].timestamp for k in kept], dtype=np.float64)  # the betting interval reads rows oldest first
        self.behaviour = np.array([math.exp(k[0].log_propensity) for k in kept], dtype=np.float64)
        self.target = np.zeros(n)
        self.baseline = np.zeros(n)
        keys = []
        for i, (_r, ctx, arm, allowed, probs, base) in enumerate(kept):
            key = arm_model_key(arm)
            idx = next((j for j, a in enumerate(allowed) if arm_model_key(a) == key), None)
            self.target[i] = probs[idx] if idx is not None else 0.0
            self.baseline[i] = 1.0 if key == arm_model_key(base) else 0.0
            keys.append(f"{context_bucket(ctx)}|{ope_label(arm)}")
        model = ope.TabularRewardModel(keys, self.rewards) if n else None
        self.q_logged = np.array([model.predict(k) for k in keys]) if model else np.zeros(0)
        self.v_target = np.zeros(n)
        self.v_baseline = np.zeros(n)
        for i, (_r, ctx, _arm, allowed, probs, base) in enumerate(kept):
            assert model is not None
            bucket = context_bucket(ctx)
            qs = np.array([model.predict(f"{bucket}|{ope_label(a)}") for a in allowed])
            self.v_target[i] = float(probs @ qs)
            self.v_baseline[i] = model.predict(f"{bucket}|{ope_label(base)}")
