"""Automatic quality, measured: learning curves of true quality with each signal source alone (issue 14's "Measure").

The real `BanditDecider` with the shipped defaults (thompson_gaussian, 5 % holdout,
tune_temperature auto with min_quality_signals 50, the client's max_tokens as a cap) on
the second simulator (`bench/learning/world.py`, stationary), one source at a time:

* none: the automatic score only (1, or 0.6 when cut by max_tokens);
* explicit: the hidden quality + N(0, 0.1²), posted for every request (rate 1.0) or for 5 %;
* judge at sample rates 0.05 / 0.2 / 1.0: hidden quality + N(0, 0.1²), rounded to the 1-10
  scale and mapped by (score - 1) / 9 as proxy/learning/judge.py does;
* regeneration: the user regenerates with a probability that falls with quality
  (`world.regenerate_probability`), and a regenerated decision gets quality 0.

Every signal after the automatic one re-enters through `correct()` and counts towards
`min_quality_signals` (judge scores; regeneration marks only replace the automatic reward: they are one-sided,
proxy/decision/feedback.py ONE_SIDED, and neither count nor feed the temperature stage).
Judge cost: rubric (180) + prompt + answer + reply (30) tokens per judged request, divided by
the true quality gained over the "none" run on the same stream (Σ over requests).

    .venv/bin/python -m bench.learning.sources [--requests 20000] [--seeds 3]

writes bench/results/learning_sources.md and learning_sources.png (~2 min).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.learning.world import JudgeModel, RunLog, Source, run
from policies.registry import make_policy

RESULTS = ROOT / "bench" / "results"
WINDOW = 500

SOURCES: dict[str, tuple[Source, float | None]] = {
    "none": ("none", None),
    "explicit (every request)": ("explicit", 1.0),
    "explicit (5 %)": ("explicit", 0.05),
    "judge 0.05": ("judge", 0.05),
    "judge 0.2": ("judge", 0.2),
    "judge 1.0": ("judge", 1.0),
    "regeneration only": ("regeneration", None),
}


def run_source(source: Source, rate: float | None, n: int, seed: int) -> RunLog:
    judge = JudgeModel(sample_rate=rate) if source == "judge" and rate is not None else None
    return run(make_policy("thompson_gaussian"), n=n, seed=seed, source=source, judge=judge,
               explicit_rate=rate if source == "explicit" and rate is not None else 1.0)  # fmt: skip


def mean_temperature(logs: list[RunLog], task: str, last: int) -> float:
    k = logs[0].names.index(task)
    return float(np.mean([lg.sent_temperature[-last:][lg.task[-last:] == k].mean() for lg in logs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    n, seeds = args.requests, args.seeds
    started = time.perf_counter()
    logs = {label: [run_source(src, rate, n, s) for s in range(seeds)] for label, (src, rate) in SOURCES.items()}
    none = logs["none"]
    client = float(np.mean([lg.client_quality.mean() for lg in none]))
    lines = [
        f"# Learning from each quality source alone ({n:,} requests, {seeds} seeds, second simulator)",
        "",
        f"Command: `.venv/bin/python -m bench.learning.sources --requests {n} --seeds {seeds}` ({time.perf_counter() - started:.0f} s).",
        f"True quality is the simulator's hidden expected quality of what was sent, all traffic (holdout included); "
        f"the client's own settings give {client:.3f} on the same requests.",
        "",
        "| source | signals | true quality, requests 0-2k | 2k-5k | last 5k | gain over none (Σ quality) | judge tokens | judge tokens per unit of quality gained | creative t, last 2k (client 0.7, best in region 0.9) | extract t, last 2k (client 0.6, best in region 0.4) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    curves: dict[str, np.ndarray] = {}
    for label, group in logs.items():
        q = np.array([lg.true_quality for lg in group])
        curves[label] = q.reshape(seeds, -1, WINDOW).mean(axis=(0, 2)) if n % WINDOW == 0 else q.mean(axis=0)
        gain = float(np.mean([lg.true_quality.sum() - base.true_quality.sum() for lg, base in zip(group, none)]))
        tokens = float(np.mean([lg.judge_tokens for lg in group]))
        per_unit = f"{tokens / gain:,.0f}" if tokens and gain > 0 else ("–" if not tokens else "no gain")
        signals = float(np.mean([lg.signals for lg in group]))
        lines.append(
            f"| {label} | {signals:,.0f} | {q[:, :2000].mean():.3f} | {q[:, 2000:5000].mean():.3f} | {q[:, -5000:].mean():.3f} "
            f"| {gain:+.1f} | {tokens:,.0f} | {per_unit} | {mean_temperature(group, 'creative', 2000):.2f} | {mean_temperature(group, 'extract', 2000):.2f} |"
        )
        print(lines[-1], file=sys.stderr)
    names = none[0].names
    lines += [
        "",
        "Per task, last 5k requests: true quality of all traffic (holdout included) against the client's own settings",
        "on the same requests. The difference is paired (same requests, seeds pooled); ± is a 95 % interval over",
        "requests (choices are correlated in time, so read it as indicative); verdict: lower / higher when the",
        "interval excludes 0.",
        "",
        "| source | " + " | ".join(f"{task}: tuned / client's own, difference (95 %)" for task in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for label, group in logs.items():
        cells = []
        for k in range(len(names)):
            tuned = np.concatenate([lg.true_quality[-5000:][lg.task[-5000:] == k] for lg in group])
            own = np.concatenate([lg.client_quality[-5000:][lg.task[-5000:] == k] for lg in group])
            d = tuned - own
            half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
            verdict = "lower" if d.mean() + half < 0 else ("higher" if d.mean() - half > 0 else "same")
            cells.append(f"{tuned.mean():.3f} / {own.mean():.3f}, {d.mean():+.3f} ± {half:.3f} ({100 * (tuned.mean() / own.mean() - 1):+.1f} %, {verdict})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "learning_sources.md").write_text(text)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, curve in curves.items():
        ax.plot((np.arange(len(curve)) + 0.5) * (n / len(curve)), curve, label=label)
    ax.axhline(client, color="grey", linestyle="--", label="client's own settings")
    ax.set_xlabel("requests")
    ax.set_ylabel(f"true quality (mean per {WINDOW} requests, {seeds} seeds)")
    ax.set_title("Learning from each quality source alone (second simulator)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "learning_sources.png", dpi=120)


if __name__ == "__main__":
    main()
