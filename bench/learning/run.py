"""Cumulative regret over 20,000 simulated requests: our policies vs Vowpal Wabbit.

Every policy faces the same request stream (`proxy.demo.simulator.simulate`, same seeds):
four task types with different best temperatures and answer lengths, one client
baseline (0.7, 512), a 5 x 5 grid of arms within ±0.2 temperature and ±500 tokens.
Regret is pseudo-regret against the ground truth (expected reward of the best allowed
arm minus that of the chosen arm), so reward noise does not blur the comparison.

Vowpal Wabbit runs `--cb_explore_adf` with `--squarecb` and with `--epsilon 0.05`,
shared features (task, model, prompt-length bin) crossed with categorical arm features
(`-q sa`), cost = 1 − reward.

    .venv/bin/python bench/learning/run.py [--requests 20000] [--seeds 3]
writes bench/results/learning.md and bench/results/learning.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from policies.base import Choice, sample_index
from policies.context import prompt_bin
from policies.records import Arm, RequestContext
from policies.registry import make_policy
from proxy.demo.simulator import SimulationLog, simulate

RESULTS = ROOT / "bench" / "results"


class VowpalWabbitPolicy:
    """Adapter: VW's contextual bandit behind our `Policy` surface (bench only)."""

    def __init__(self, name: str, args: str) -> None:
        import vowpalwabbit

        self.name = name
        self._vw = vowpalwabbit.Workspace(args, quiet=True)
        self._last: tuple[list[str], np.ndarray] | None = None
        self._updates = 0

    @property
    def version(self) -> str:
        return f"{self.name}-{self._updates}"

    @staticmethod
    def _example(ctx: RequestContext, arms: Sequence[Arm]) -> list[str]:
        shared = f"shared |s task={ctx.task_type} model={ctx.model} pbin={prompt_bin(ctx.prompt_tokens_est)}"
        lines = [shared]
        for arm in arms:
            lines.append(f"|a t{arm.temperature:g} m{arm.max_tokens} t{arm.temperature:g}m{arm.max_tokens}")
        return lines

    def propensities(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm]) -> np.ndarray:
        pmf = np.asarray(self._vw.predict(self._example(ctx, arms)), dtype=np.float64)
        return pmf / pmf.sum()

    def choose(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm], rng: np.random.Generator) -> Choice:
        lines = self._example(ctx, arms)
        pmf = np.asarray(self._vw.predict(lines), dtype=np.float64)
        pmf /= pmf.sum()
        index = sample_index(pmf, rng)
        self._last = (lines, pmf)
        return Choice(index=index, propensity=float(pmf[index]))

    def update(self, ctx: RequestContext, baseline: Arm, arm: Arm, reward: float) -> None:
        assert self._last is not None, "simulate() calls choose before update"
        lines, pmf = self._last
        index = next(i for i, line in enumerate(lines[1:]) if line.startswith(f"|a t{arm.temperature:g} m{arm.max_tokens} "))
        labelled = list(lines)
        labelled[index + 1] = f"0:{1.0 - reward}:{pmf[index]} " + lines[index + 1]
        self._vw.learn(labelled)
        self._updates += 1

    def export_delta(self) -> dict[str, list[float]]:
        return {}

    def load_totals(self, totals: dict[str, list[float]]) -> None:
        return None

    def load_changed(self, totals: dict[str, list[float]]) -> None:
        return None

    def snapshot(self) -> dict[str, list[float]]:
        return {}


def policies() -> dict[str, object]:
    """Fresh policy factories by label."""
    out: dict[str, object] = {
        "thompson_gaussian": lambda: make_policy("thompson_gaussian"),
        "linucb": lambda: make_policy("linucb"),
        "baseline": lambda: make_policy("baseline"),
        "uniform": lambda: make_policy("uniform"),
    }
    try:
        import vowpalwabbit  # noqa: F401

        out["vw squarecb"] = lambda: VowpalWabbitPolicy("vw_squarecb", "--cb_explore_adf --squarecb -q sa --quiet")
        out["vw epsilon 0.05"] = lambda: VowpalWabbitPolicy("vw_epsilon", "--cb_explore_adf --epsilon 0.05 -q sa --quiet")
    except ImportError:
        print("vowpalwabbit is not installed: VW rows skipped", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    n = args.requests
    curves: dict[str, np.ndarray] = {}
    rows = []
    for label, factory in policies().items():
        logs: list[SimulationLog] = []
        started = time.perf_counter()
        for seed in range(args.seeds):
            logs.append(simulate(factory(), n_requests=n, seed=seed))  # type: ignore[operator]
        elapsed = (time.perf_counter() - started) / (args.seeds * n)
        regret = np.array([log.cumulative_regret() for log in logs])
        curves[label] = regret.mean(axis=0)
        at_2k = regret[:, min(n, 2000) - 1]
        tail = slice(max(0, n - 5000), n)
        ratio = [log.expected[tail].mean() / log.optimum[tail].mean() for log in logs]
        early = [log.expected[1000:2000].mean() / log.optimum[1000:2000].mean() for log in logs] if n >= 2000 else [np.nan]
        rows.append((label, at_2k.mean(), at_2k.std(), regret[:, -1].mean(), regret[:, -1].std(),
                     float(np.mean(early)), float(np.mean(ratio)), elapsed * 1e6))  # fmt: skip
        print(f"{label}: regret@{n} {regret[:, -1].mean():.1f}", file=sys.stderr)
    lines = [
        f"# Learning: cumulative pseudo-regret over {n:,} simulated requests ({args.seeds} seeds)",
        "",
        f"Command: `.venv/bin/python bench/learning/run.py --requests {n} --seeds {args.seeds}`",
        "",
        "| policy | regret @2k (±sd) | regret @end (±sd) | % of optimum, requests 1k–2k | % of optimum, last 5k | µs / request (sim + policy) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r2, s2, rn, sn, early, ratio, us in rows:
        lines.append(f"| {label} | {r2:.1f} ± {s2:.1f} | {rn:.1f} ± {sn:.1f} | {100 * early:.1f} | {100 * ratio:.1f} | {us:.0f} |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "learning.md").write_text(text)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, curve in curves.items():
        ax.plot(np.arange(1, n + 1), curve, label=label)
    ax.set_xlabel("requests")
    ax.set_ylabel("cumulative pseudo-regret (expected reward)")
    ax.set_title(f"Thermostat policies on the simulator ({args.seeds} seeds, mean)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "learning.png", dpi=120)


if __name__ == "__main__":
    main()
