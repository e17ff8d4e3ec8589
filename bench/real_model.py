"""Thermostat learning on a real model: llama.cpp serving Gemma 3 270M on this CPU (issue 23).

The loop of tests/e2e at a larger scale, with the holdout on. A client asks short factual
completions (proxy/demo/local_model.QUESTIONS) at too hot a temperature, sampling from the
whole distribution; a grader checks each answer and posts it as explicit feedback. Reported:

1. the grader's truth: how often the model is right at each temperature of the trust region,
   measured straight on the server (same questions, fixed seeds);
2. tuned vs holdout traffic through Thermostat as the grader saw it, next to what
   Thermostat's own API says (`GET /api/optimization/performance`, `versus_holdout`: what the
   dashboard draws) for the same requests;
3. a plot of accuracy and temperature over requests, tuned vs holdout.

    .venv/bin/python bench/real_model.py [--requests 600] [--holdout 0.3] [--temperature 1.4] [--truth-reps 2] [--out real_model]

writes bench/results/real_model.md and .png. Needs the real-model extra (pip install -e '.[real-model]').
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.demo import local_model
from proxy.demo.local_model import ANSWER, FULL_DISTRIBUTION, MODEL_ALIAS, QUESTIONS, SLO_LATENCY_P99_MS, grade

RESULTS = ROOT / "bench" / "results"
TASK = "facts"
USERS = 100  # assignment keys: the holdout is drawn per key, as in production


def ask(http: httpx.Client, base: str, i: int, temperature: float, headers: dict[str, str] | None = None) -> tuple[float, httpx.Response]:
    q = QUESTIONS[i % len(QUESTIONS)]
    body = {"model": MODEL_ALIAS, "prompt": q.prompt, "temperature": temperature, "seed": i, "user": f"user-{i % USERS}",
            **ANSWER, **FULL_DISTRIBUTION}
    r = http.post(f"{base}/completions", json=body, headers=headers or {}, timeout=300)
    r.raise_for_status()
    return grade(q, r.json()["choices"][0]["text"]), r


def truth(http: httpx.Client, base: str, temperatures: list[float], reps: int) -> dict[float, tuple[float, int]]:
    """Accuracy at each temperature straight from the server: every question `reps` times, seeds fixed."""
    out = {}
    for t in temperatures:
        scores = [ask(http, base, 100_000 + k, t)[0] for k in range(reps * len(QUESTIONS))]
        out[t] = (sum(scores) / len(scores), len(scores))
        print(f"truth: temperature {t:g}: {out[t][0]:.3f} right of {len(scores)}", flush=True)
    return out


def wilson(k: float, n: int) -> tuple[float, float]:
    """95 % Wilson interval of a proportion."""
    if n == 0:
        return (math.nan, math.nan)
    z, p = 1.959964, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def rolling(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(rows: list[dict[str, Any]], path: Path, client_t: float, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_q, ax_t) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for mode, colour, label in (("optimized", "tab:blue", "tuned"), ("holdout", "tab:orange", "holdout (client's own settings)")):
        sel = [r for r in rows if r["mode"] == mode]
        if not sel:
            continue
        xs = [r["i"] for r in sel]
        ax_q.plot(xs, rolling([r["score"] for r in sel], window), color=colour, label=f"{label}, rolling mean of {window}")
        ax_t.scatter(xs, [r["temperature"] for r in sel], s=6, color=colour, alpha=0.35)
        ax_t.plot(xs, rolling([r["temperature"] for r in sel], window), color=colour, label=label)
    ax_q.set_ylabel("graded accuracy")
    ax_q.set_ylim(0, 1.02)
    ax_q.legend(loc="lower right")
    ax_t.axhline(client_t, color="grey", lw=0.8, ls="--")
    ax_t.set_ylabel("temperature sent")
    ax_t.set_xlabel("request")
    ax_t.legend(loc="upper right")
    fig.suptitle(f"Thermostat on Gemma 3 270M (llama.cpp, CPU): client sends temperature {client_t:g}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--holdout", type=float, default=0.3)
    ap.add_argument("--temperature", type=float, default=1.4, help="the client's own (too hot) temperature")
    ap.add_argument("--truth-reps", type=int, default=2, help="passes over the questions per temperature for the truth table")
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--out", default="real_model")
    ap.add_argument("--from-json", help="redraw the report and plot from this saved run instead of running")
    args = ap.parse_args()
    if args.from_json:
        write(json.loads(Path(args.from_json).read_text()), args.out)
        return
    reason = local_model.missing()
    if reason is not None:
        sys.exit(reason)

    from tests.conftest import make_config
    from tests.support.servers import start_thermostat

    started = time.time()
    llama = local_model.start(n_ctx=512)
    print(f"llama.cpp server up on {llama.url} in {time.time() - started:.1f} s", flush=True)
    data = Path(tempfile.mkdtemp(prefix="real-model-bench-"))
    upstream = {"name": "llama", "base_url": llama.url, "models": ["*"], "timeout_s": 300.0, "connect_timeout_s": 2.0}
    cfg = make_config(
        llama.url, data, upstreams=[upstream],
        optimization={"mode": "general", "seed": 1, "holdout_fraction": args.holdout},  # tune_temperature auto: 50 signals first
        slo={"latency_p99_ms": SLO_LATENCY_P99_MS},
        constraints={"max_delta_temperature": args.temperature, "max_delta_max_tokens": 0},
        policy={"grid": {"temperature_steps": 9}},
    )
    thermostat = start_thermostat(cfg)
    rows: list[dict[str, Any]] = []
    try:
        with httpx.Client() as http:
            t0 = time.time()
            for i in range(args.requests):
                score, r = ask(http, thermostat.url, i, args.temperature, {"x-task-type": TASK})
                sent = dict(p.split("=") for p in r.headers["x-thermostat-params"].split("; "))
                rows.append({"i": i, "mode": r.headers["x-thermostat-mode"], "temperature": float(sent["temperature"]), "score": score})
                http.post(f"{thermostat.base}/api/optimization/record-outcome",
                          json={"request_id": r.headers["x-request-id"], "outcome": {"quality": score}}, timeout=30).raise_for_status()
                if (i + 1) % 50 == 0:
                    late = rows[-50:]
                    print(f"{i + 1} requests, {time.time() - t0:.0f} s; last 50: accuracy {sum(x['score'] for x in late) / 50:.2f}, "
                          f"mean temperature tuned {_mean([x['temperature'] for x in late if x['mode'] == 'optimized']):.2f}", flush=True)
            loop_s = time.time() - t0
            thermostat.flush()
            perf = http.get(f"{thermostat.base}/api/optimization/performance", timeout=60).json()
            dashboard = http.get(f"{thermostat.base}/api/optimization/dashboard", timeout=60).json()
            arms = sorted({x["temperature"] for x in rows} | {args.temperature})
            t1 = time.time()
            table = truth(http, llama.url, arms, args.truth_reps)
            truth_s = time.time() - t1
    finally:
        thermostat.stop()
        llama.stop()
    saved = {"args": vars(args), "requests": rows, "performance": perf, "dashboard_comparisons": dashboard.get("comparisons"),
             "truth": {str(k): v for k, v in table.items()}, "loop_s": loop_s, "truth_s": truth_s}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(saved, indent=1))
    write(saved, args.out)


def write(saved: dict[str, Any], out: str) -> None:
    """The report and the plot from a run's saved JSON (`--from-json` redraws them without re-running)."""
    args = argparse.Namespace(**saved["args"])
    png = RESULTS / f"{out}.png"
    plot(saved["requests"], png, args.temperature, args.window)
    table = {float(k): (v[0], int(v[1])) for k, v in saved["truth"].items()}
    report = render(args, saved["requests"], saved, table, saved["loop_s"], saved["truth_s"], png.name)
    (RESULTS / f"{out}.md").write_text(report)
    print(report)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


QUALITY_ORDER = ("quality_explicit", "quality_judge", "pairwise_win_rate", "quality_automatic", "quality")
"""The dashboard's headline quality: the strongest kind of signal with a comparison (dashboard.html `headlineQuality`)."""


def comparison(saved: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The task's tuned-vs-holdout comparison as the dashboard reads it (`GET /dashboard` comparisons), else `performance`'s."""
    for source, rows in (("GET /api/optimization/dashboard `comparisons`", saved.get("dashboard_comparisons") or []),
                         ("GET /api/optimization/performance `versus_holdout`",
                          [t.get("versus_holdout") or {} for t in saved["performance"]["tasks"]])):
        found = next((c for c in rows if c.get("task_type") == TASK), None)
        if found:
            return found, source
    return {}, "none"


def render(args: argparse.Namespace, rows: list[dict[str, Any]], saved: dict[str, Any], table: dict[float, tuple[float, int]],
           loop_s: float, truth_s: float, png: str) -> str:
    versus, source = comparison(saved)
    metrics = {m["metric"]: m for m in versus.get("metrics", [])}
    quality = next((metrics[k] for k in QUALITY_ORDER if k in metrics and metrics[k]["difference"] is not None), {})
    n = len(rows)
    half = [r for r in rows if r["i"] >= n // 2]
    lines = [
        "# Thermostat on a real model (llama.cpp + Gemma 3 270M, CPU)",
        "",
        f"`.venv/bin/python bench/real_model.py --requests {args.requests} --holdout {args.holdout:g} --temperature {args.temperature:g} "
        f"--truth-reps {args.truth_reps}` ({time.strftime('%Y-%m-%d')}, the shared 2-core machine; {n} requests through Thermostat "
        f"in {loop_s:.0f} s, {loop_s / n:.2f} s each with the feedback post; truth table {truth_s:.0f} s).",
        "",
        f"The client asks {len(QUESTIONS)} short factual completions in turn (`proxy/demo/local_model.QUESTIONS`, one line of at most "
        f"{ANSWER['max_tokens']} tokens, a fixed seed per request, sampling the whole distribution) at temperature {args.temperature:g}, as {USERS} users; "
        f"the grader scores each answer 1 or 0 and posts it to `record-outcome`. Thermostat runs its defaults (Thompson sampling, "
        f"`tune_temperature = \"auto\"`: the temperature stays at the client's until 50 graded answers) with a holdout of "
        f"{args.holdout:g} of the users and a trust region of ±{args.temperature:g} around the client's temperature (9 grid steps).",
        "",
        "## The grader's truth: accuracy by temperature, straight from the server",
        "",
        "| temperature | right | 95 % interval (Wilson) | answers |",
        "| --- | --- | --- | --- |",
    ]
    for t, (acc, k) in sorted(table.items()):
        lo, hi = wilson(acc * k, k)
        lines.append(f"| {t:g}{' (client)' if abs(t - args.temperature) < 1e-9 else ''} | {acc:.3f} | [{lo:.3f}, {hi:.3f}] | {k} |")
    lines += ["", "## Tuned vs holdout: the grader's count and Thermostat's API side by side", "",
              f"Thermostat's numbers are its `{quality.get('metric')}` comparison, read from {source} (what the dashboard's "
              "headline and comparison table show).", "",
              "| traffic | requests (grader) | accuracy (grader) | 95 % Wilson | Thermostat's mean quality | Thermostat's n | mean temperature sent |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode, label, api, api_n in (("optimized", "tuned", quality.get("optimized"), quality.get("optimized_n")),
                                     ("holdout", "holdout", quality.get("holdout"), quality.get("holdout_n"))):
        sel = [r for r in rows if r["mode"] == mode]
        k = sum(r["score"] for r in sel)
        lo, hi = wilson(k, len(sel))
        lines.append(f"| {label} | {len(sel)} | {_mean([r['score'] for r in sel]):.3f} | [{lo:.3f}, {hi:.3f}] | "
                     f"{'n/a' if api is None else f'{api:.3f}'} | {api_n} | {_mean([r['temperature'] for r in sel]):.2f} |")
    lines += [
        "",
        f"Thermostat's difference tuned − holdout: {_num(quality.get('difference'))}, 95 % interval [{_num(quality.get('ci_low'))}, "
        f"{_num(quality.get('ci_high'))}] ({quality.get('interval', '')}), verdict **{quality.get('verdict')}**; the task's "
        f"verdict: **{versus.get('verdict')}** ({versus.get('summary')}).",
        "",
        "Second half only (after learning):",
        "",
        "| traffic | requests | accuracy | mean temperature sent |",
        "| --- | --- | --- | --- |",
    ]
    for mode, label in (("optimized", "tuned"), ("holdout", "holdout")):
        sel = [r for r in half if r["mode"] == mode]
        lines.append(f"| {label} | {len(sel)} | {_mean([r['score'] for r in sel]):.3f} | {_mean([r['temperature'] for r in sel]):.2f} |")
    counts: dict[float, int] = {}
    for r in half:
        if r["mode"] == "optimized":
            counts[r["temperature"]] = counts.get(r["temperature"], 0) + 1
    lines += ["", "Temperatures the tuned traffic was sent in the second half: "
              + ", ".join(f"{t:g} × {c}" for t, c in sorted(counts.items())) + ".", "", f"![accuracy and temperature over requests]({png})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
