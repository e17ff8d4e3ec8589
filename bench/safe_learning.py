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

    .venv/bin/python bench/safe_learning.py [--requests 20000] [--seeds 2] [--half-life 5000] [--sections regret,no_feedback] [--regret-only --out NAME.md]

writes bench/results/safe_learning.md (or NAME.md). ~3 min on the shared 2-core machine.
Non-stationarity: each learning policy also runs with `[policy] half_life_s` = --half-life
(one request per simulated second), with the conservative monitor reopening a task on a
detected change (`change_detected`, as the runtime does), and with both.
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


def contenders(half_life: float) -> dict[str, tuple[Callable[[], Policy], bool]]:
    """label -> (policy factory, reopen on a detected change)."""
    out: dict[str, tuple[Callable[[], Policy], bool]] = {}
    for name in ("thompson_gaussian", "linucb"):
        out[name] = (partial(make_policy, name), False)
        out[f"{name}, half_life_s {half_life:g}"] = (partial(make_policy, name, half_life_s=half_life), False)
        out[f"{name}, reopen on change"] = (partial(make_policy, name), True)
        out[f"{name}, half_life_s {half_life:g} + reopen"] = (partial(make_policy, name, half_life_s=half_life), True)
    out["baseline (client's settings)"] = (partial(make_policy, "baseline"), False)
    try:
        from bench.learning.run import VowpalWabbitPolicy

        out["vw squarecb"] = (lambda: VowpalWabbitPolicy("vw_squarecb", "--cb_explore_adf --squarecb -q sa --quiet"), False)  # type: ignore[return-value]
        out["vw epsilon 0.05"] = (lambda: VowpalWabbitPolicy("vw_epsilon", "--cb_explore_adf --epsilon 0.05 -q sa --quiet"), False)  # type: ignore[return-value]
    except ImportError:
        print("vowpalwabbit is not installed (.venv/bin/pip install vowpalwabbit): VW rows skipped", file=sys.stderr)
    return out


def regret_table(n: int, seeds: int, half_life: float) -> list[str]:
    lines = [
        "## 1. Regret against Vowpal Wabbit (explicit feedback on every request)",
        "",
        "One request per simulated second. `half_life_s`: statistics discounted (`[policy] half_life_s`);",
        "`reopen`: the conservative monitor runs on the outcomes and a `change_detected` on a task's",
        "holdout quality reopens that task's statistics, as the runtime does. Changes detected: mean number",
        "of `change_detected` events per run, and the mean delay (requests after the change) of the first.",
        "",
        "| scenario | policy | regret @n/2 (±sd) | regret @n (±sd) | regret in 2nd half | true quality, last 2k | changes detected (first after) | µs / request |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario, change in (("stationary", None), ("model change at n/2", n // 2)):
        for label, (factory, reopen) in contenders(half_life).items():
            started = time.perf_counter()
            logs = [run(factory(), n=n, seed=s, source="explicit", immediate=True, change_at=change, reopen_on_change=reopen) for s in range(seeds)]
            us = (time.perf_counter() - started) / (seeds * n) * 1e6
            regret = np.array([np.cumsum(lg.best_reward - lg.expected_reward) for lg in logs])
            half, end = regret[:, n // 2 - 1], regret[:, -1]
            quality = np.mean([lg.true_quality[-2000:].mean() for lg in logs])
            detected = np.mean([len(lg.changes) for lg in logs]) if reopen else float("nan")
            firsts = [lg.changes[0][0] - (change or 0) for lg in logs if lg.changes]
            changes = "—" if not reopen else f"{detected:.1f}" + (f" ({np.mean(firsts):.0f})" if firsts else "")
            lines.append(f"| {scenario} | {label} | {half.mean():.1f} ± {half.std():.1f} | {end.mean():.1f} ± {end.std():.1f} "
                         f"| {(end - half).mean():.1f} | {quality:.3f} | {changes} | {us:.0f} |")  # fmt: skip
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
    parser.add_argument("--half-life", type=float, default=5000.0, help="half_life_s of the discounted variants (simulated seconds = requests)")
    parser.add_argument("--regret-only", action="store_true", help="only the regret table, nothing else in the file (with --out)")
    parser.add_argument("--out", default="safe_learning.md")
    parser.add_argument("--sections", default="regret,no_feedback",
                        help="comma-separated: regret, no_feedback; a section not run keeps its text from the existing results file, marked as such")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    started = time.perf_counter()
    previous = (RESULTS / args.out).read_text() if (RESULTS / args.out).exists() else ""
    cut = previous.find("## 2. ")
    old = {"regret": previous[previous.find("## 1. "):cut].rstrip().split("\n") if cut > 0 else [],
           "no_feedback": previous[cut:].rstrip().split("\n") if cut > 0 else []}
    stale = ["", "(Not re-run by the command above: kept from the previous run of this file, which predates it.)"]
    if args.regret_only:
        sections = {"regret"}
    regret = regret_table(args.requests, args.seeds, args.half_life) if "regret" in sections else old["regret"][:1] + stale + old["regret"][1:]
    if args.regret_only:
        body = regret
    else:
        nofb = no_feedback_table(args.requests, args.seeds) if "no_feedback" in sections else old["no_feedback"][:1] + stale + old["no_feedback"][1:]
        body = regret + [""] + nofb
    flags = (f" --half-life {args.half_life:g}" + (" --regret-only" if args.regret_only else "")
             + ("" if args.regret_only or sections >= {"regret", "no_feedback"} else f" --sections {args.sections}")
             + (f" --out {args.out}" if args.out != "safe_learning.md" else ""))
    head = [
        f"# Safe learning on the second simulator ({args.requests:,} requests, {args.seeds} seeds)",
        "",
        f"Command: `.venv/bin/python bench/safe_learning.py --requests {args.requests} --seeds {args.seeds}{flags}` "
        f"({time.perf_counter() - started:.0f} s). Simulator: `bench/learning/world.py`.",
        "",
    ]
    text = "\n".join(head + body) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
