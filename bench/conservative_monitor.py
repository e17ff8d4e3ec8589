"""The conservative monitor (guards/conservative.py) on synthetic streams with a known truth.

Per scenario and seed, one task's traffic is half holdout, half optimised; quality is
clip(mean + N(0, 0.1²), 0, 1) and latency log-normal (σ = 0.3), optimised latency scaled
by a factor.  The monitor is checked after every outcome (as the proxy would).  Reported:
the share of seeds rolled back within `--steps` outcomes and the outcomes until the
rollback (median, 90th percentile); for the Page–Hinkley detector on holdout quality,
false alarms on a stationary stream and the delay after a shift.  Also the cost of one
`observe` call.

    .venv/bin/python bench/conservative_monitor.py            # 100 seeds, ~2 min; writes bench/results/conservative_monitor.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guards import conservative as cm  # noqa: E402

S = cm.ConservativeSettings()


def run(seed: int, steps: int, opt_quality: float, hold_quality: float, opt_latency: float) -> int | None:
    rng = np.random.default_rng(seed)
    state = cm.new_state()
    holdout = rng.random(steps) < 0.5
    noise = rng.standard_normal((steps, 2))
    for i in range(steps):
        h = bool(holdout[i])
        q = float(np.clip((hold_quality if h else opt_quality) + 0.1 * noise[i, 0], 0.0, 1.0))
        lat = float(np.exp(0.3 * noise[i, 1])) * (1.0 if h else opt_latency)
        state, events = cm.observe(state, S, task="t", mode="holdout" if h else "optimized", quality=q, latency_s=lat, now=float(i))
        if any(e.kind == "rollback" for e in events):
            return i + 1
    return None


def change(seed: int, steps: int, shift_at: int | None, shift: float) -> int | None:
    rng = np.random.default_rng(seed)
    state = cm.new_state()
    for i in range(steps):
        mean = 0.6 + (shift if shift_at is not None and i >= shift_at else 0.0)
        q = float(np.clip(mean + 0.1 * rng.standard_normal(), 0.0, 1.0))
        state, events = cm.observe(state, S, task="t", mode="holdout", quality=q, latency_s=None, now=float(i))
        if events:
            return i
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "conservative_monitor.md"))
    args = parser.parse_args()
    lines = [
        "# Conservative monitor: rollbacks and change detection",
        "",
        f"`python bench/conservative_monitor.py --seeds {args.seeds} --steps {args.steps}`, {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}. Defaults: α = {S.alpha} (latency α/2; each of the four quality signal kinds and cost α/10), max_quality_regression "
        f"{S.max_quality_regression}, max_latency_regression {S.max_latency_regression}, latency warm-up {S.latency_warmup}.",
        "",
        "| scenario | rolled back | outcomes to rollback: median | p90 |",
        "| --- | --- | --- | --- |",
    ]
    scenarios = [
        ("equal (no regression)", 0.7, 0.7, 1.0),
        ("quality −3 % (inside margin)", 0.68, 0.7, 1.0),
        ("quality −10 %", 0.63, 0.7, 1.0),
        ("quality −20 %", 0.56, 0.7, 1.0),
        ("latency ×1.05 (inside margin)", 0.7, 0.7, 1.05),
        ("latency ×1.2", 0.7, 0.7, 1.2),
        ("latency ×1.5", 0.7, 0.7, 1.5),
    ]
    for name, oq, hq, ol in scenarios:
        hits = [run(seed, args.steps, oq, hq, ol) for seed in range(args.seeds)]
        found = [h for h in hits if h is not None]
        med = f"{np.median(found):.0f}" if found else "–"
        p90 = f"{np.quantile(found, 0.9):.0f}" if found else "–"
        lines.append(f"| {name} | {len(found)}/{args.seeds} | {med} | {p90} |")
        print(lines[-1], flush=True)
    lines += ["", "Page–Hinkley on holdout quality (mean 0.6, sd 0.1):", "", "| stream | alarms | delay after the shift: median | max |", "| --- | --- | --- | --- |"]
    stationary = [change(seed, args.steps, None, 0.0) for seed in range(args.seeds)]
    lines.append(f"| stationary, {args.steps} samples | {sum(s is not None for s in stationary)}/{args.seeds} | – | – |")
    for shift in (0.1, 0.2, -0.2):
        delays = [change(seed, 1000, 500, shift) for seed in range(args.seeds)]
        ok = [d - 500 for d in delays if d is not None and d >= 500]
        early = sum(d is not None and d < 500 for d in delays)
        lines.append(f"| shift {shift:+g} at 500 | {len(ok)}/{args.seeds} detected after, {early} before | "
                     f"{np.median(ok):.0f} | {max(ok) if ok else '–'} |")
        print(lines[-1], flush=True)
    state = cm.new_state()
    rng = np.random.default_rng(0)
    n = 20000
    t0 = time.perf_counter()
    for i in range(n):
        state, _ = cm.observe(state, S, task="t", mode="holdout" if i % 2 else "optimized", quality=float(rng.random()),
                              latency_s=float(rng.random()), now=float(i))
    per = (time.perf_counter() - t0) / n * 1e6
    lines += ["", f"Cost of one `observe` (quality and latency, one task): {per:.1f} µs (mean of {n})."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))


if __name__ == "__main__":
    main()
