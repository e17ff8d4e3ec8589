"""Speed of the decision math: choose (25 arms) and update, per policy.

Steady state: the policy is first trained on 5,000 simulated rewards, then each
measured iteration is one `choose` followed by one `update` in the same bucket, as in
live traffic.  For Thompson that means a table rebuild every `refresh_every` updates;
both the median (typical decision) and the mean (rebuilds amortised) are reported, and
the rebuild itself is timed separately.

    .venv/bin/python bench/policy_speed.py            # writes bench/results/policy_speed.md
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.arms import candidate_arms
from policies.context import build_context
from policies.records import Arm
from policies.registry import make_policy
from policies.settings import ArmGridSettings, ThompsonSettings
from policies.thompson import ThompsonGaussianPolicy

ITERATIONS = 20_000
BODY = {
    "model": "sim-1",
    "messages": [{"role": "system", "content": "You write code."}, {"role": "user", "content": "x" * 2000}],
    "temperature": 0.7,
    "max_tokens": 512,
}


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": statistics.median(ordered) * 1e6,
        "mean_us": statistics.fmean(ordered) * 1e6,
        "p99_us": ordered[int(0.99 * (len(ordered) - 1))] * 1e6,
    }


def measure(name: str, policy=None) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    """Median/mean/p99 of choose and update for one policy."""
    policy = policy or make_policy(name)
    baseline = Arm(0.7, 512)
    arms = candidate_arms(baseline, max_delta_temperature=0.2, max_delta_max_tokens=500, grid=ArmGridSettings())
    ctx = build_context(BODY, task_type="code", endpoint="chat")
    rng = np.random.default_rng(0)
    means = np.linspace(0.4, 0.8, len(arms))
    for _ in range(5_000):
        choice = policy.choose(ctx, baseline, arms, rng)
        policy.update(ctx, baseline, arms[choice.index], float(means[choice.index] + 0.1 * rng.standard_normal()))
    choose_t: list[float] = []
    update_t: list[float] = []
    clock = time.perf_counter
    for _ in range(ITERATIONS):
        t0 = clock()
        choice = policy.choose(ctx, baseline, arms, rng)
        t1 = clock()
        policy.update(ctx, baseline, arms[choice.index], float(means[choice.index] + 0.1 * rng.standard_normal()))
        t2 = clock()
        choose_t.append(t1 - t0)
        update_t.append(t2 - t1)
    return {"choose": _stats(choose_t), "update": _stats(update_t)}


def main() -> None:
    rows = []
    for name in ("thompson_gaussian", "linucb", "baseline", "uniform"):
        result = measure(name)
        rows.append((name, result))
    cold = measure("thompson_gaussian (refresh_every=1)", ThompsonGaussianPolicy(ThompsonSettings(refresh_every=1)))
    rows.append(("thompson_gaussian, refresh_every=1 (table rebuilt every decision)", cold))
    lines = [
        "# Policy speed (25 arms, one choose + one update per iteration, steady state)",
        "",
        (
            f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
            f"numpy {np.__version__}; {ITERATIONS} iterations after 5,000 warm-up updates."
        ),
        "Command: `.venv/bin/python bench/policy_speed.py`. Targets: choose ≤ 50 µs median, update ≤ 20 µs.",
        "",
        "| policy | choose median µs | choose mean µs | choose p99 µs | update median µs | update mean µs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        c, u = r["choose"], r["update"]
        lines.append(
            f"| {name} | {c['median_us']:.1f} | {c['mean_us']:.1f} | {c['p99_us']:.1f} | {u['median_us']:.1f} | {u['mean_us']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    out = Path(__file__).resolve().parent / "results" / "policy_speed.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
