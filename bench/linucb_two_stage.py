"""LinUCB inside the two-stage decider when the best temperature lies inside the trust region (issue 22, item 6).

The real `BanditDecider` on the second simulator (`bench/learning/world.py`) with two tasks changed so that the
best temperature is inside the trust region (client ± 0.2) and not the client's: "creative" (client 0.7, best 0.8)
and "extract" (client 0.6, best 0.5), quality a tent around the best temperature (no plateau). Judge on every
request (`JudgeModel(sample_rate=1.0)`). Reported: per task, the share of *tuned* requests at the best arm among
the last 1,000 requests (all tasks together; ~200-250 per task), and where the temperature stage sent them.

    .venv/bin/python bench/linucb_two_stage.py            # ~3 min; writes bench/results/linucb_two_stage.md
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.learning.world import TASKS, JudgeModel, Regime, RunLog, Task, World, run
from policies.base import Policy
from policies.linucb import LinUCBPolicy
from policies.registry import make_policy
from policies.settings import LinUCBSettings

INTERIOR = dict(TASKS)
INTERIOR["creative"] = Task(Regime(0.8, 500), Regime(0.8, 650), 0.7, 1200, 150, 0.2, slope=0.8, flat=0.0)
INTERIOR["extract"] = Task(Regime(0.5, 120), Regime(0.5, 180), 0.6, 400, 1200, 0.25, flat=0.0)
WORLD = World(tasks=INTERIOR)
LAST = 1000

POLICIES: dict[str, Callable[[], Policy]] = {
    "thompson_gaussian (default)": lambda: make_policy("thompson_gaussian"),
    "linucb (defaults: alpha 0.3, softmax 0.02)": lambda: LinUCBPolicy(LinUCBSettings()),
    "linucb, softmax 0.005": lambda: LinUCBPolicy(LinUCBSettings(exploration_factor=0.005)),
    "linucb, alpha 1.0": lambda: LinUCBPolicy(LinUCBSettings(alpha=1.0)),
    "linucb, regularization 1e-4": lambda: LinUCBPolicy(LinUCBSettings(regularization=1e-4)),
}


def at_best(log: RunLog) -> dict[str, tuple[float, str]]:
    sel = slice(-LAST, None)
    tuned = np.array([m == "optimized" for m in log.mode])[sel]
    best = log.expected_reward[sel] >= log.best_reward[sel] - 0.005
    out = {}
    for i, name in enumerate(log.names):
        m = tuned & (log.task[sel] == i)
        temps, counts = np.unique(log.sent_temperature[sel][m], return_counts=True)
        where = ", ".join(f"{t:.1f}: {c}" for t, c in zip(temps.tolist(), counts.tolist(), strict=True))
        out[name] = (float(best[m].mean()) if m.any() else float("nan"), where)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "linucb_two_stage.md"))
    args = ap.parse_args()
    started = time.time()
    lines = [
        "# LinUCB in the two-stage decider, best temperature inside the trust region (bench/linucb_two_stage.py)",
        "",
        f"Command: `.venv/bin/python bench/linucb_two_stage.py --requests {args.requests} --seeds {args.seeds}`. "
        f"Share of tuned requests at the best arm in the last {LAST} requests, per seed; in brackets the temperatures "
        "sent (temperature: requests). creative: client 0.7, best 0.8; extract: client 0.6, best 0.5; classify and chat: "
        "the client's settings are already best.",
        "",
        "| policy | seed | classify | chat | creative | extract |",
        "|---|---|---|---|---|---|",
    ]
    for label, make in POLICIES.items():
        for seed in range(args.seeds):
            res = at_best(run(make(), n=args.requests, seed=seed, source="judge", judge=JudgeModel(sample_rate=1.0), world=WORLD))
            cells = " | ".join(f"{res[t][0]:.0%} ({res[t][1]})" for t in ("classify", "chat", "creative", "extract"))
            lines.append(f"| {label} | {seed} | {cells} |")
            print(lines[-1], flush=True)
    lines += ["", f"Run time {time.time() - started:.0f} s."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
