"""Off-policy evidence beside the rollout guard's promotion, computed from the decision log off the loop.

The SNIPS improvement lower bound over the baseline (studentised bootstrap, `policies.ope`)
is computed straight from the logged arrays, and the target/baseline estimates the
report adds are skipped.  Promotion itself decides on the anytime-valid optimised-vs-holdout
comparison the rollout controller keeps (guards/rollout.py); this bound is a fixed-sample
one, recomputed every `ope_interval_s`, so it is reported (promote events,
``/rollout-status``) and never decides.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING

import numpy as np

from guards.rollout import OpeEvidence
from policies import ope
from proxy.learning.ope_rows import OpeArrays, load_rows, score_rows_async

if TYPE_CHECKING:
    from proxy.decision import BanditDecider
    from proxy.store import LogStore

PROMOTION_ESTIMATOR = "snips"


def evidence_from_arrays(arrays: OpeArrays, *, n_bootstrap: int = 200, seed: int = 0, estimator: str = PROMOTION_ESTIMATOR) -> OpeEvidence | None:
    """None below two rewarded optimized rows; a bound that is not finite counts as no improvement."""
    if arrays.n < 2:
        return None
    a = arrays
    imp = ope.improvement_lower_bound(
        rewards=a.rewards, behaviour_propensity=a.behaviour, target_propensity=a.target, baseline_propensity=a.baseline,
        rng=np.random.default_rng(seed), estimator=estimator,  # type: ignore[arg-type]
        reward_hat_logged=a.q_logged, target_value_hat=a.v_target, baseline_value_hat=a.v_baseline, n_bootstrap=n_bootstrap,
    )
    lower = float(imp.lower) if imp.lower is not None and math.isfinite(imp.lower) else -math.inf
    return OpeEvidence(improvement_lower_bound=lower, samples=imp.n, estimator=estimator)


async def compute_ope_evidence(
    store: LogStore, decider: BanditDecider, window_s: float = 7 * 86400.0, max_rows: int = 5000
) -> OpeEvidence | None:
    """Rows and the policy's propensities are read on the loop (the policy is not thread-safe, so
    in slices with yields); the bootstrap, tens of milliseconds over a full window, in a thread."""
    now = time.time()
    rows, _ = await load_rows(store, since=now - window_s, until=now + 1, max_rows=max_rows, mode="optimized")
    scored = await score_rows_async(decider, rows)
    return await asyncio.to_thread(lambda: evidence_from_arrays(OpeArrays(decider, rows, scored)))
