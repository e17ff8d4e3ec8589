"""Is a coverage shortfall the interval's fault or the seeds'?  The OPE standard errors over many seeds, without a bootstrap.

`bench/ope_coverage.py` bootstraps every seed, which limits it to a few hundred seeds: a
coverage there moves by ±1.3 points (one standard error at 300 seeds) by chance alone.  This
check runs the same uniform-logging world (`bench/ope_coverage.py`: 4 task types x 5 arms, 2000
rows, the same target policy) over many more seeds, each scored only by its point estimate and
its delta-method standard error (what the studentised bootstrap divides by), and reports

  * the spread of the estimates across seeds (the true standard error, up to Monte Carlo noise),
  * the mean standard error the interval uses, and their ratio,
  * the coverage of estimate ± 1.96·se,

for IPS, SNIPS and DR with the same 2-fold cross-fitted tabular reward model.  If the ratio is
≈ 1 and the normal interval covers ≈ 95 %, a shortfall in the bootstrapped table is seed noise,
not a short interval.  The seeds are those of `bench/ope_coverage.py` (same draws), so the last
column shows what the normal interval gets on the seeds the bootstrapped table used.

    .venv/bin/python bench/ope_se_check.py --seeds 10000     # ~1-3 min; writes bench/results/ope_se_check.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ope_coverage import MEANS, TASKS, K, target_policy, wilson  # noqa: E402

Z = 1.959964


def one_seed(rng: np.random.Generator, rows: int, target: np.ndarray) -> dict[str, tuple[float, float]]:
    """estimator -> (estimate, delta-method standard error) for one uniformly logged seed."""
    x = rng.integers(0, len(TASKS), size=rows)  # drawn exactly as `ope_coverage.log_decisions` draws a uniform log:
    a = (rng.random(rows) * K).astype(np.intp)  # seed s here is seed s there
    r = (rng.random(rows) < MEANS[x, a]).astype(np.float64)
    w = target[x, a] * K
    n = rows
    out: dict[str, tuple[float, float]] = {}
    ips = w * r
    out["IPS"] = (float(ips.mean()), float(ips.std(ddof=1) / np.sqrt(n)))
    theta = float(np.sum(w * r) / np.sum(w))
    out["SNIPS"] = (theta, float(np.std(w * (r - theta) / w.mean(), ddof=1) / np.sqrt(n)))
    # DR with the 2-fold cross-fitted shrunk tabular model of policies.ope.cross_fit_tabular (prior weight 1)
    key = x * K + a
    fold = np.arange(n) % 2
    q_logged = np.empty(n)
    v_hat = np.empty(n)
    for f in (0, 1):
        train, held = fold != f, fold == f
        counts = np.bincount(key[train], minlength=len(TASKS) * K)
        sums = np.bincount(key[train], weights=r[train], minlength=len(TASKS) * K)
        q = (float(r[train].mean()) + sums) / (1.0 + counts)
        q_logged[held] = q[key[held]]
        v_hat[held] = (target * q.reshape(len(TASKS), K)).sum(axis=1)[x[held]]
    dr = v_hat + w * (r - q_logged)
    out["DR (cross-fit)"] = (float(dr.mean()), float(dr.std(ddof=1) / np.sqrt(n)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ope_se_check.md")
    args = parser.parse_args()
    target = target_policy()
    truth = float(np.mean(np.sum(target * MEANS, axis=1)))
    started = time.perf_counter()
    results: dict[str, list[tuple[float, float]]] = {}
    for seed in range(args.seeds):
        for name, value in one_seed(np.random.default_rng(seed), args.rows, target).items():
            results.setdefault(name, []).append(value)
    elapsed = time.perf_counter() - started
    lines = [
        "# OPE standard errors over many seeds (uniform logging, no bootstrap)",
        "",
        f"`.venv/bin/python bench/ope_se_check.py --seeds {args.seeds} --rows {args.rows}` "
        f"({elapsed:.0f} s, Python {platform.python_version()}, numpy {np.__version__}).",
        "",
        f"True target value {truth:.4f}; the world, the rows per seed and the target of `bench/ope_coverage.py` (uniform logging, w <= 5).",
        "",
        "| estimator | sd of the estimate across seeds | mean delta-method se | ratio sd / se | coverage of estimate ± 1.96 se | Monte Carlo 95 % interval | mean error | coverage on seeds 0-299 alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, values in results.items():
        arr = np.array(values)
        sd, se = float(arr[:, 0].std(ddof=1)), float(arr[:, 1].mean())
        covered = float(np.mean(np.abs(arr[:, 0] - truth) <= Z * arr[:, 1]))
        low, high = wilson(covered, args.seeds)
        first = float(np.mean(np.abs(arr[:300, 0] - truth) <= Z * arr[:300, 1]))
        lines.append(
            f"| {name} | {sd:.5f} | {se:.5f} | {sd / se:.3f} | {covered:.1%} | {low:.1%} to {high:.1%} | "
            f"{float(arr[:, 0].mean() - truth):+.5f} | {first:.1%} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
