"""The model as a knob, measured (issue 28): which model serves each task, at what hidden quality and cost.

Thermostat (general phase, thompson_gaussian, defaults otherwise: 5 % judged-quality margin,
temperature tuned once judged) runs in front of the bundled simulator
(`proxy/demo/simulator_server.py`, time_scale 0) with a 10 % holdout and a truthful judge
(`sim-judge`, every request). The requested model is "sim-1" ($2 / $8 per million input /
output tokens); its declared stand-in "sim-1-mini" costs a tenth and is as good on
summarise and default, 0.35 worse on code and 0.25 worse on creative (the simulator's
hidden truth, `proxy.demo.simulator.DEFAULT_MODEL_PROFILES`). Each stand-in gets
`--explore` of a task's tuned traffic until the judge's scores show it, anytime-valid, no
worse than the requested model by more than 5 % (`proxy/decision/model_stage.py`).

Reported per task and per quarter of the run, tuned vs holdout: the share of requests each
model served, the mean hidden (true) quality of the answers (`x-sim-true-quality`) and the
cost per 1,000 requests (the answers' usage at the serving model's price); and when each
stand-in was shown no worse or worse.

    .venv/bin/python bench/model_knob.py [--requests 24000] [--explore 0.1] [--out bench/results/model_knob.md]

Loopback only; both servers stop when it ends.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIG, MINI = "sim-1", "sim-1-mini"
PRICES = {BIG: (2.0, 8.0), MINI: (0.2, 0.8)}  # US dollars per million input / output tokens, as the simulator's profiles
TASKS = ("summarise", "default", "code", "creative")
SYSTEM = {"summarise": "Summarise the text.", "default": "Answer the question.", "code": "You write code.", "creative": "You are a creative writer."}
BATCH = 200
WINDOWS = 4


def measure(requests: int, explore: float, seed: int) -> tuple[list[tuple[int, str, str, str, float, float]], dict[str, dict[str, int]], float]:
    from proxy.demo.simulator import DEFAULT_TASKS
    from tests.conftest import make_config
    from tests.support.servers import simulator_in_thread, start_thermostat

    rows: list[tuple[int, str, str, str, float, float]] = []  # (i, task, mode, model, true quality, dollars)
    changed: dict[str, dict[str, int]] = defaultdict(dict)  # task -> status -> first request index seen
    with simulator_in_thread(seed=seed) as sim, tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(
            sim.url, Path(tmp),
            upstreams=[
                {"name": "big", "base_url": sim.url, "models": [BIG, "sim-judge"], "timeout_s": 10.0, "models_config": [
                    {"pattern": BIG, "substitutes": [MINI], "input_price_per_mtok": PRICES[BIG][0], "output_price_per_mtok": PRICES[BIG][1]},
                ]},
                {"name": "small", "base_url": sim.url, "models": [MINI], "timeout_s": 10.0, "models_config": [
                    {"pattern": MINI, "input_price_per_mtok": PRICES[MINI][0], "output_price_per_mtok": PRICES[MINI][1]},
                ]},
            ],
            optimization={"mode": "general", "seed": seed, "holdout_fraction": 0.1, "model_exploration_share": explore},
            judge={"enabled": True, "model": "sim-judge", "sample_rate": 1.0, "max_concurrency": 8, "queue_size": 10_000},
            caws={"budget_limit": 10**12},  # the token budget stays out of the way
        )
        running = start_thermostat(cfg)
        rt = running.runtime
        clients = {task: httpx.Client(timeout=30, headers={"x-task-type": task}) for task in TASKS}

        def ask(i: int) -> tuple[int, str, str, str, float, float]:
            task = TASKS[i % len(TASKS)]
            p = DEFAULT_TASKS[task]
            body = {"model": BIG, "messages": [{"role": "system", "content": SYSTEM[task]}, {"role": "user", "content": f"item {i}"}],
                    "temperature": p.client_temperature, "max_tokens": p.client_max_tokens, "user": f"u{i}"}
            r = clients[task].post(f"{running.url}/chat/completions", json=body)
            r.raise_for_status()
            doc = r.json()
            usage = doc["usage"]
            price_in, price_out = PRICES[doc["model"]]
            dollars = (usage["prompt_tokens"] * price_in + usage["completion_tokens"] * price_out) / 1e6
            return i, task, r.headers["x-thermostat-mode"], doc["model"], float(r.headers["x-sim-true-quality"]), dollars

        t0 = time.monotonic()
        try:
            with ThreadPoolExecutor(4) as pool:
                for start in range(0, requests, BATCH):
                    rows.extend(pool.map(ask, range(start, min(requests, start + BATCH))))
                    running.call(rt.judge.drain(), timeout=120)  # every answer judged before the next batch
                    for task in TASKS:
                        status = rt.bandit.models.status(task, MINI)
                        changed[task].setdefault(status, start + BATCH)
        finally:
            for c in clients.values():
                c.close()
            running.stop()
    return rows, changed, time.monotonic() - t0


def report(rows: list[tuple[int, str, str, str, float, float]], changed: dict[str, dict[str, int]], requests: int, explore: float,
           seconds: float) -> str:
    from proxy.demo.simulator import DEFAULT_MODEL_PROFILES

    lines = [
        f"{requests:,} requests ({requests // len(TASKS):,} per task), 10 % holdout, judge on every request, exploration share {explore:g}, "
        f"{seconds:.0f} s. Hidden truth: sim-1-mini's quality shift per task "
        + ", ".join(f"{t} {DEFAULT_MODEL_PROFILES[MINI].quality_shift.get(t, 0.0):+.2f}" for t in TASKS)
        + "; sim-1-mini costs a tenth of sim-1.", "",
        "| task | window (requests of all tasks) | tuned: sim-1-mini share | tuned hidden quality | holdout hidden quality | tuned $ per 1,000 | holdout $ per 1,000 | saving |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    size = requests // WINDOWS
    for task in TASKS:
        for w in range(WINDOWS):
            part = [r for r in rows if r[1] == task and w * size <= r[0] < (w + 1) * size]
            tuned = [r for r in part if r[2] in ("optimized", "guard_fallback")]
            hold = [r for r in part if r[2] == "holdout"]
            if not tuned or not hold:
                continue
            share = sum(r[3] == MINI for r in tuned) / len(tuned)
            q_t, q_h = sum(r[4] for r in tuned) / len(tuned), sum(r[4] for r in hold) / len(hold)
            c_t, c_h = 1000 * sum(r[5] for r in tuned) / len(tuned), 1000 * sum(r[5] for r in hold) / len(hold)
            lines.append(f"| {task} | {w * size:,}-{(w + 1) * size:,} | {100 * share:.0f} % | {q_t:.3f} | {q_h:.3f} | ${c_t:.3f} | ${c_h:.3f} "
                         f"| {100 * (1 - c_t / c_h):.0f} % |")
    lines += ["", "| task | stand-in shown no worse by request (all tasks) | shown worse by request | holdout served by |", "|---|---:|---:|---|"]
    for task in TASKS:
        seen = changed.get(task, {})
        served = sorted({r[3] for r in rows if r[1] == task and r[2] == "holdout"})
        lines.append(f"| {task} | {seen.get('proven', '—')} | {seen.get('worse', '—')} | {', '.join(served)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=24_000)
    ap.add_argument("--explore", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    rows, changed, seconds = measure(args.requests, args.explore, args.seed)
    text = report(rows, changed, args.requests, args.explore, seconds)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
