"""How soon does `thermostat demo` show a verdict? Requests (and minutes at the demo's rate)
until the dashboard's tuned-vs-holdout comparison says "better" or "worse" per task.

The demo's own configuration (`proxy.cli.demo_config`: simulator upstream, judge played by
the simulator) and its own clients (`proxy.demo.traffic`, open loop) run against the real
app with the simulator's latency at zero, so a run of N requests takes seconds instead of
N / 5 seconds; learning and verdicts depend on the order of requests, not on the clock.
Every `--step` requests the decision log is read and the dashboard's comparison
(`proxy.control.reports.tuned_vs_holdout`, the code behind `/performance` and the page)
is computed on everything so far; the first step at which a task's verdict is no longer
"not yet known" is reported, in requests and in minutes at 5 requests/s.

    .venv/bin/python bench/demo_verdict.py [--requests 6000] [--step 150] [--holdout 0.2] \\
        [--judge-sample 0.5] [--seeds 2] [--out bench/results/demo_verdict.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.cli import demo_config  # noqa: E402
from proxy.config import build_config  # noqa: E402
from proxy.control.reports import reward_range, tuned_vs_holdout  # noqa: E402
from tests.support.servers import run_demo_traffic, simulator_in_thread, start_thermostat  # noqa: E402

DEMO_RATE = 5.0  # requests per second, the demo's default (--traffic)
TOKEN_ENV = "THERMOSTAT_DEMO_VERDICT_TOKEN"


def one_run(requests: int, step: int, holdout: float, judge_sample: float, seed: int) -> dict[str, object]:
    """Per task: the first request count with a verdict, the verdict, and the final comparison's summary."""
    os.environ[TOKEN_ENV] = "demo-verdict-token"
    with tempfile.TemporaryDirectory() as data, simulator_in_thread(seed=seed) as sim:
        base = build_config({"server": {"data_dir": data}, "storage": {"flush_interval_s": 0.05}, "admin": {"token_env": TOKEN_ENV},
                             "optimization": {"seed": seed}}, environ={})
        cfg = demo_config(base, sim.url, mode="general", holdout=holdout, feedback="judge")
        if judge_sample != cfg.judge.sample_rate:
            import msgspec

            cfg = msgspec.structs.replace(cfg, judge=msgspec.structs.replace(cfg.judge, sample_rate=judge_sample))
        running = start_thermostat(cfg)
        first: dict[str, tuple[int, str]] = {}
        last: dict[str, str] = {}
        low, high = reward_range(cfg.policy.reward)
        try:
            rate, rows, chunk = 60.0, [], 0
            while len(rows) < requests:  # counted in the log: requests cancelled at a chunk's end are not counted
                run_demo_traffic(running.base, rate, step / rate, admin_token="demo-verdict-token", feedback="judge", seed=seed * 1000 + chunk)
                chunk += 1
                assert running.runtime.judge is not None
                running.call(running.runtime.judge.drain(), timeout=120)
                running.flush(0.1)
                rows = running.call(running.runtime.sink.fetch_decisions(limit=1_000_000), timeout=120)
                for c in tuned_vs_holdout(rows, low, high):
                    last[c.task_type] = f"{c.verdict}: {c.summary}"
                    if c.verdict != "not yet known" and c.task_type not in first:
                        first[c.task_type] = (len(rows), c.verdict)
        finally:
            running.stop()
    return {"first": first, "last": last}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=6000)
    p.add_argument("--step", type=int, default=150)
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--judge-sample", type=float, default=0.5)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    started = time.time()
    lines = [f"# Demo verdict timing: holdout {a.holdout}, judge sample rate {a.judge_sample}", "",
             f"`.venv/bin/python bench/demo_verdict.py --requests {a.requests} --step {a.step} --holdout {a.holdout} "
             f"--judge-sample {a.judge_sample} --seeds {a.seeds}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"load average {os.getloadavg()[0]:.1f}.", "",
             f"Requests until the dashboard's verdict is no longer \"not yet known\" (minutes at {DEMO_RATE:g} requests/s in brackets); "
             f"checked every {a.step} requests, so a verdict is found up to {a.step} requests late.", "",
             "| seed | task | first verdict | at request | minutes |", "| ---: | --- | --- | ---: | ---: |"]
    finals = []
    for seed in range(a.seeds):
        out = one_run(a.requests, a.step, a.holdout, a.judge_sample, seed)
        first, last = out["first"], out["last"]
        assert isinstance(first, dict) and isinstance(last, dict)
        for task in sorted(last):
            if task in first:
                n, verdict = first[task]
                lines.append(f"| {seed} | {task} | {verdict} | {n:,} | {n / DEMO_RATE / 60:.1f} |")
            else:
                lines.append(f"| {seed} | {task} | none within {a.requests:,} | – | > {a.requests / DEMO_RATE / 60:.0f} |")
            finals.append(f"- seed {seed}, {last[task]}")
    lines += ["", f"At the end of each run ({a.requests:,} requests):", "", *finals, "", f"Wall time {time.time() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
