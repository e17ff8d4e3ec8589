"""Safe knobs, measured: what tuned traffic does to hidden true quality when no feedback arrives.

Thermostat (general phase, thompson_gaussian, defaults otherwise) runs in front of the
bundled simulator (`proxy/demo/simulator_server.py`, time_scale 0), which reports the true
quality of each answer in `x-sim-true-quality`. No explicit feedback is posted, so only
the automatic quality score reaches the policy. Two clients:

- ``creative-omitted``: a creative task, the SDK sends neither temperature nor max_tokens
  (the provider default, 1.0, is this task's best temperature);
- ``cap-50``: the client sends ``max_tokens=50`` (and temperature 1.0).

For each, the same prompts also go straight to the simulator (the client's own settings).
Reported: mean true quality through Thermostat and direct, as a share of the task's
optimum (peak quality), and the largest max_tokens / the temperatures Thermostat sent.

    .venv/bin/python bench/safe_knobs.py [--requests 600] [--root PATH] [--out FILE]

`--root` runs another checkout of the code (e.g. the commit before this change) with the
same harness. Loopback only; both servers stop when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS: dict[str, tuple[str, str, dict[str, object]]] = {
    "creative-omitted": ("creative", "Write a short story.", {}),
    "cap-50": ("default", "Answer the question.", {"max_tokens": 50, "temperature": 1.0}),
}


def start_simulator() -> tuple[str, asyncio.AbstractEventLoop]:
    from proxy.demo.simulator_server import start_simulator as start

    loop = asyncio.new_event_loop()
    ready: list[str] = []
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        handle = loop.run_until_complete(start("127.0.0.1", 0, seed=0, time_scale=0.0))
        ready.append(handle.url)
        started.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    if not started.wait(20):
        raise RuntimeError("the simulator did not start")
    return ready[0], loop


def measure(requests: int) -> dict[str, dict[str, object]]:
    from tests.conftest import make_config
    from tests.support.servers import start_thermostat

    sim_url, sim_loop = start_simulator()
    base = sim_url if sim_url.endswith("/v1") else f"{sim_url}/v1"
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (task, system, extra) in SCENARIOS.items():
            cfg = make_config(base, Path(tmp) / name, optimization={"mode": "general", "seed": 1})
            running = start_thermostat(cfg)
            through, direct, sent_max, sent_temps = [], [], 0, set()
            try:
                with httpx.Client(timeout=10) as client:
                    for i in range(requests):
                        body = {"model": "sim-1", "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"item {i}"}], **extra}
                        headers = {"x-task-type": task, "x-thermostat-key": f"user-{i}"}
                        r = client.post(f"{running.url}/chat/completions", json=body, headers=headers)
                        r.raise_for_status()
                        through.append(float(r.headers["x-sim-true-quality"]))
                        params = dict(p.split("=") for p in r.headers["x-thermostat-params"].split("; ") if p)
                        sent_max = max(sent_max, int(params.get("max_tokens", 0)))
                        sent_temps.add(params.get("temperature", "omitted"))
                        d = client.post(f"{base}/chat/completions", json=body, headers={"x-task-type": task})
                        direct.append(float(d.headers["x-sim-true-quality"]))
            finally:
                running.stop()
            results[name] = {
                "through": sum(through) / len(through),
                "direct": sum(direct) / len(direct),
                "max_tokens_sent_max": sent_max,
                "temperatures_sent": sorted(sent_temps),
            }
    sim_loop.call_soon_threadsafe(sim_loop.stop)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose code is measured")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(args.root.resolve()))
    from proxy.demo.simulator import DEFAULT_TASKS

    results = measure(args.requests)
    lines = [f"code: {args.root.resolve()}, {args.requests} requests per scenario, no feedback", "",
             "| scenario | true quality via Thermostat (% of optimum) | direct, client's own settings (% of optimum) | largest max_tokens sent | temperatures sent |",
             "|---|---:|---:|---:|---|"]
    for name, res in results.items():
        peak = DEFAULT_TASKS[SCENARIOS[name][0]].peak_quality
        through, direct = float(res["through"]), float(res["direct"])  # type: ignore[arg-type]
        temps = ", ".join(str(t) for t in res["temperatures_sent"])  # type: ignore[attr-defined]
        lines.append(f"| {name} | {through:.3f} ({100 * through / peak:.0f} %) | {direct:.3f} ({100 * direct / peak:.0f} %) "
                     f"| {res['max_tokens_sent_max'] or 'none'} | {temps} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
