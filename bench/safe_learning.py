"""Safe learning, measured on a second simulator (`bench/learning/world.py`), issue 13's "Measure".

1. Regret against Vowpal Wabbit `--cb_explore_adf` (squarecb and ε-greedy 0.05), every
   policy behind the same real `BanditDecider` (defaults: 5 % holdout, tune_temperature
   auto, the client's max_tokens as a cap) on the same request stream, with explicit
   feedback on every request: stationary, and with a model change under the same name
   half-way. Pseudo-regret = E[reward] of the best arm of the full trust region minus
   E[reward] of what was sent (no reward noise in it).
2. No feedback at all: true quality of the optimised traffic against the client's own
   settings on the same requests, per task, with the shipped defaults and the default
   policy; `tune_temperature = "always"` alongside for contrast.

    .venv/bin/python bench/safe_learning.py [--requests 20000] [--seeds 2] [--sections regret,no_feedback]

writes bench/results/safe_learning.md. ~3 min on the shared 2-core machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.learning.world import TASKS, RunLog, make_decider, run
from policies.base import Policy
from policies.registry import make_policy

RESULTS = ROOT / "bench" / "results"


def contenders() -> dict[str, Callable[[], Policy]]:
    out: dict[str, Callable[[], Policy]] = {
        "thompson_gaussian": lambda: make_policy("thompson_gaussian"),
        "linucb": lambda: make_policy("linucb"),
        "baseline (client's settings)": lambda: make_policy("baseline"),
    }
    try:
        from bench.learning.run import VowpalWabbitPolicy

        out["vw squarecb"] = lambda: VowpalWabbitPolicy("vw_squarecb", "--cb_explore_adf --squarecb -q sa --quiet")  # type: ignore[assignment,return-value]
        out["vw epsilon 0.05"] = lambda: VowpalWabbitPolicy("vw_epsilon", "--cb_explore_adf --epsilon 0.05 -q sa --quiet")  # type: ignore[assignment,return-value]
    except ImportError:
        print("vowpalwabbit is not installed (.venv/bin/pip install vowpalwabbit): VW rows skipped", file=sys.stderr)
    return out


def regret_table(n: int, seeds: int) -> list[str]:
    lines = [
        "## 1. Regret against Vowpal Wabbit (explicit feedback on every request)",
        "",
        "| scenario | policy | regret @n/2 (±sd) | regret @n (±sd) | regret in 2nd half | true quality, last 2k | µs / request |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for scenario, change in (("stationary", None), ("model change at n/2", n // 2)):
        for label, factory in contenders().items():
            started = time.perf_counter()
            logs = [run(factory(), n=n, seed=s, source="explicit", immediate=True, change_at=change) for s in range(seeds)]
            us = (time.perf_counter() - started) / (seeds * n) * 1e6
            regret = np.array([np.cumsum(lg.best_reward - lg.expected_reward) for lg in logs])
            half, end = regret[:, n // 2 - 1], regret[:, -1]
            quality = np.mean([lg.true_quality[-2000:].mean() for lg in logs])
            lines.append(f"| {scenario} | {label} | {half.mean():.1f} ± {half.std():.1f} | {end.mean():.1f} ± {end.std():.1f} "
                         f"| {(end - half).mean():.1f} | {quality:.3f} | {us:.0f} |")  # fmt: skip
            print(lines[-1], file=sys.stderr)
    return lines


def per_task(logs: list[RunLog], start: int) -> dict[str, tuple[float, float, float, int, float]]:
    """Per task: (tuned quality, client quality, 95 % half-width of the paired difference, n, largest max_tokens sent)."""
    out = {}
    for k, name in enumerate(logs[0].names):
        diffs, tuned, client, top = [], [], [], 0.0
        for lg in logs:
            m = (lg.task == k) & np.array([mode == "optimized" for mode in lg.mode])
            m[:start] = False
            diffs.append(lg.true_quality[m] - lg.client_quality[m])
            tuned.append(lg.true_quality[m])
            client.append(lg.client_quality[m])
            top = max(top, float(lg.sent_max_tokens[m].max()) if m.any() else 0.0)
        d = np.concatenate(diffs)
        half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        out[name] = (float(np.concatenate(tuned).mean()), float(np.concatenate(client).mean()), float(half), len(d), top)
    return out


def no_feedback_table(n: int, seeds: int) -> list[str]:
    lines = [
        "## 2. No feedback at all: true quality of optimised traffic vs the client's own settings",
        "",
        "Default policy (thompson_gaussian), shipped defaults; only the automatic quality score reaches the policy.",
        "Optimised requests only (the 5 % holdout gets the client's settings anyway), all n requests; the",
        "difference is paired (same requests), ± is a 95 % interval over requests (a policy's arm choices are",
        "correlated in time, so read it as indicative).",
        "",
        "| scenario | tune_temperature | task | client sends (t, max_tokens) | tuned | client's own | difference (95 %) | verdict | difference, 2nd half | largest max_tokens sent |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for scenario, change in (("stationary", None), ("model change at n/2", n // 2)):
        for tune in ("auto", "always"):
            logs = [run(make_policy("thompson_gaussian"), n=n, seed=s, source="none", change_at=change,
                        decider_factory=partial(make_decider, tune=tune, seed=s)) for s in range(seeds)]  # fmt: skip
            late = per_task(logs, n // 2)
            for name, (tuned, client, half, _count, top) in per_task(logs, 0).items():
                task = TASKS[name]
                sends = f"{'omitted' if task.client_temperature is None else task.client_temperature}, {task.client_max_tokens or 'omitted'}"
                diff = tuned - client
                verdict = "lower" if diff + half < 0 else ("higher" if diff - half > 0 else "same within noise")
                top_s = "none" if top >= 4096 else f"{top:.0f}"
                late_diff = late[name][0] - late[name][1]
                lines.append(f"| {scenario} | {tune} | {name} | {sends} | {tuned:.3f} | {client:.3f} | {diff:+.3f} ± {half:.3f} | {verdict} "
                             f"| {late_diff:+.3f} ± {late[name][2]:.3f} | {top_s} |")  # fmt: skip
                print(lines[-1], file=sys.stderr)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--sections", default="regret,no_feedback",
                        help="comma-separated: regret, no_feedback; a section not run keeps its text from the existing results file, marked as such")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    started = time.perf_counter()
    previous = (RESULTS / "safe_learning.md").read_text() if (RESULTS / "safe_learning.md").exists() else ""
    cut = previous.find("## 2. ")
    old = {"regret": previous[previous.find("## 1. "):cut].rstrip().split("\n") if cut > 0 else [],
           "no_feedback": previous[cut:].rstrip().split("\n") if cut > 0 else []}
    stale = ["", "(Not re-run by the command above: kept from the previous run of this file, which predates it.)"]
    regret = regret_table(args.requests, args.seeds) if "regret" in sections else old["regret"][:1] + stale + old["regret"][1:]
    nofb = no_feedback_table(args.requests, args.seeds) if "no_feedback" in sections else old["no_feedback"][:1] + stale + old["no_feedback"][1:]
    flag = "" if sections >= {"regret", "no_feedback"} else f" --sections {args.sections}"
    body = regret + [""] + nofb
    head = [
        f"# Safe learning on the second simulator ({args.requests:,} requests, {args.seeds} seeds)",
        "",
        f"Command: `.venv/bin/python bench/safe_learning.py --requests {args.requests} --seeds {args.seeds}{flag}` "
        f"({time.perf_counter() - started:.0f} s). Simulator: `bench/learning/world.py`.",
        "",
    ]
    text = "\n".join(head + body) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "safe_learning.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
