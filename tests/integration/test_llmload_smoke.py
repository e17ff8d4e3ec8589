"""The LLM-shaped benchmark harness runs end to end at tiny scale and writes its result files.

No timing assertions: this guards the one command the benchmark is run with (bench/README.md),
not Thermostat's speed. It starts the real fake upstream and a real `thermostat serve`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ROW_KEYS = {
    "concurrency_held", "concurrency_planned", "ttft_excess_p50_ms", "ttft_excess_p99_ms", "added_ttft_p50_ms", "added_ttft_p99_ms",
    "chunk_p99_ms", "chunk_max_ms", "added_chunk_p99_ms", "added_chunk_max_ms", "target_loop_lag_p99_ms", "probe_p99_ms",
    "gen_lag_p99_ms", "rss_kb_per_stream", "cpu_us_per_chunk", "cpu_ms_per_request", "error_count",
    "machine_busy_cores", "listen_overflows", "quiesce_s",
}


def test_llm_load_harness_writes_results(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.llmload.run", "--steps", "8", "--warmup", "1.5", "--duration", "2", "--targets", "direct,thermostat",
           "--slow-readers", "0", "--generators", "1", "--tag", "test", "--results-dir", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]

    md = next(tmp_path.glob("llm-load-*-test.md")).read_text()
    assert "| step | target | held / planned | err/cut | TTFT exc p50 |" in md
    assert "## Targets from the issue" in md
    payload = json.loads(next(tmp_path.glob("llm-load-*-test.json")).read_text())
    rows = {(r["step"], r["target"]): r for r in payload["rows"]}
    assert set(rows) == {(8, "direct"), (8, "thermostat")}
    for row in rows.values():
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
    th = rows[(8, "thermostat")]
    # The machine's busy cores cover at least the target's own CPU over the same window.
    assert th["machine_busy_cores"] >= th["cpu_util"] - 0.05
    # Through Thermostat the chunks carried the upstream's send stamps and the first ones were timed.
    assert th["chunks_in_window"] > 0 and th["streams_measured"] > 0
    assert th["added_ttft_p50_ms"] is not None and th["added_chunk_p99_ms"] is not None
    assert th["error_count"] == 0, th["errors"]
    assert {c["target"].split(" at ")[0] for c in payload["checks"]} == {
        "added TTFT p99", "added inter-chunk delay p99", "event-loop lag p99", "RSS per concurrent stream beyond idle"}
