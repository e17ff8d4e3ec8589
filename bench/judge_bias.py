"""How fast the length-bias check mutes a length-biased judge, and how rarely it mutes a truthful one.

The judged answers come from the demo simulator's truth (`proxy.demo.simulator.SimulatorTruth`):
one task type, answers from four arms (the client's settings, two other temperatures, and a
lower max_tokens cap that cuts ~20 % of the answers), natural lengths log-normal as in the
simulator, true quality from the arm (a cut answer is the longest its arm allows and worse).
The judges score as the simulator's `sim-judge` does, round(1 + 9·clip(q + bias·log2(n / 256) + N(0, 0.1²)))
with bias 0 (truthful), 0.05, 0.1 or 0.25 (`sim-judge-length`) quality per doubling of length,
plus a truthful judge on a task where real quality does rise with length within an arm
(+0.05 per doubling: longer answers are more complete), which the margin is there to spare.

For each judge and seed, the answers are paired within arms exactly as
`proxy.decision.judge_trust.JudgeTrust.observe_length` pairs them, and the anytime-valid
sequence (`policies.judge_bias`, through the vectorised `policies.sequences.bounds_path`) is
checked after every pair: the first judged answer at which the judge would be muted, and the
share of seeds muted within the horizon.

    .venv/bin/python bench/judge_bias.py                 # 400 seeds x 6,000 judged answers, ~1 min; writes bench/results/judge_bias.md
    .venv/bin/python bench/judge_bias.py --seeds 100 --answers 3000
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.records import Arm
from policies.sequences import bounds_path
from proxy.demo.simulator import SimulatorTruth

TASK = "default"
PIVOT = 256  # proxy.demo.simulator_server.LENGTH_PIVOT
NOISE = 0.1  # proxy.demo.simulator_server.JUDGE_NOISE
MARGIN = 0.1  # [judge] length_bias_margin default
ALPHA = 0.05
JUDGES = {  # name -> (judge's length bias, real quality per doubling within an arm)
    "truthful": (0.0, 0.0),
    "truthful, quality rises with length (+0.05/doubling)": (0.0, 0.05),
    "length-biased 0.05/doubling": (0.05, 0.0),
    "length-biased 0.1/doubling": (0.1, 0.0),
    "length-biased 0.25/doubling (sim-judge-length)": (0.25, 0.0),
}


def judged_answers(rng: np.random.Generator, n: int, judge_bias: float, real_slope: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arm index, length, judge quality in [0, 1]) of `n` judged answers, arms drawn uniformly."""
    truth = SimulatorTruth()
    p = truth.profile(TASK)
    arms = [Arm(0.7, 512), Arm(0.3, 512), Arm(1.1, 512), Arm(0.7, int(p.length_median * 1.3))]
    arm = rng.integers(0, len(arms), n)
    natural = np.maximum(1, np.round(p.length_median * np.exp(p.length_sigma * rng.standard_normal(n)))).astype(int)
    caps = np.array([a.max_tokens for a in arms])[arm]
    temps = np.array([a.temperature for a in arms])[arm]
    length = np.minimum(natural, caps)
    q = np.array([truth.mean_quality(TASK, t) for t in temps]) + real_slope * np.log2(natural / p.length_median)
    cut = natural > caps
    q = np.where(cut, q * truth.truncation_keep * caps / natural, q)
    noisy = np.clip(q + judge_bias * np.log2(length / PIVOT) + NOISE * rng.standard_normal(n), 0.0, 1.0)
    score = np.round(1 + 9 * noisy)
    return np.where(cut, -1, arm), length, (score - 1) / 9


def concordances(arm: np.ndarray, length: np.ndarray, quality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Within-arm disjoint pairs as `JudgeTrust` forms them: (x per untied pair, index of the answer that closed it)."""
    waiting: dict[int, int] = {}
    xs, at = [], []
    for i, a in enumerate(arm.tolist()):
        if a < 0:
            continue  # a cut answer: its length is the cap's, not chance's
        j = waiting.pop(a, None)
        if j is None:
            waiting[a] = i
            continue
        dx, dy = np.log2(length[j]) - np.log2(length[i]), quality[j] - quality[i]
        if dx != 0 and dy != 0:
            xs.append(1.0 if (dx > 0) == (dy > 0) else 0.0)
            at.append(i + 1)
    return np.asarray(xs), np.asarray(at)


def first_mute(arm: np.ndarray, length: np.ndarray, quality: np.ndarray) -> int | None:
    xs, at = concordances(arm, length, quality)
    if len(xs) == 0:
        return None
    lower, _ = bounds_path(xs, alpha=ALPHA)
    hit = np.flatnonzero(lower > 0.5 + MARGIN)
    return int(at[hit[0]]) if len(hit) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=400)
    ap.add_argument("--answers", type=int, default=6000, help="judged answers per seed (the horizon)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "judge_bias.md"))
    args = ap.parse_args()
    started = time.time()
    lines = [
        "# Length-bias check of the judge (bench/judge_bias.py)",
        "",
        f"Command: `.venv/bin/python bench/judge_bias.py --seeds {args.seeds} --answers {args.answers}`; "
        f"{platform.python_implementation()} {platform.python_version()}, numpy {np.__version__}.",
        f"One task type, four arms, {args.answers:,} judged answers per seed, margin {MARGIN} (`[judge] length_bias_margin`), "
        f"α = {ALPHA}. 'Muted' = the share of seeds where the judge was muted within the horizon (with its 95 % Wilson interval); "
        "'judged answers to mute' = quantiles over the muted seeds.",
        "",
        "| judge | muted | 95 % interval | judged answers to mute: median | p90 | max |",
        "|---|---|---|---|---|---|",
    ]
    for name, (bias, real) in JUDGES.items():
        mutes: list[int] = []
        for seed in range(args.seeds):
            rng = np.random.default_rng([seed, int(bias * 1000), int(real * 1000)])
            t = first_mute(*judged_answers(rng, args.answers, bias, real))
            if t is not None:
                mutes.append(t)
        k, n = len(mutes), args.seeds
        z = 1.96
        centre = (k + z * z / 2) / (n + z * z)
        half = z * np.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
        q = np.percentile(mutes, [50, 90, 100]) if mutes else [float("nan")] * 3
        cells = " | ".join("-" if np.isnan(v) else f"{v:,.0f}" for v in q)
        lines.append(f"| {name} | {k}/{n} ({k / n:.1%}) | {max(0.0, centre - half):.1%} - {min(1.0, centre + half):.1%} | {cells} |")
        print(lines[-1], flush=True)
    lines += ["", f"Run time {time.time() - started:.0f} s."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
