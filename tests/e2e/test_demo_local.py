"""`thermostat demo --model local`: the demo on the real model, its grader teaching Thermostat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.servers import free_port, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]  # a real model on 2 shared cores: minutes, not the suite's 120 s


def test_the_demo_serves_the_real_model_and_its_grader_posts_feedback(real_model_installed: None, tmp_path: Path) -> None:
    port, model_port = free_port(), free_port()
    env = {**os.environ, "THERMOSTAT_ADMIN_TOKEN": "e2e-demo-token-0123456789", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "demo", "--model", "local", "--port", str(port), "--simulator-port", str(model_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    auth = {"authorization": "Bearer e2e-demo-token-0123456789"}
    try:
        wait_ready(f"{base}/health/readiness", proc, timeout=180)
        deadline = time.monotonic() + 180
        rows: list[dict] = []
        while time.monotonic() < deadline:
            rows = httpx.get(f"{base}/api/optimization/logs", params={"task_type": "facts", "limit": 100}, headers=auth, timeout=10).json()["items"]
            if sum(r["feedback_quality"] is not None for r in rows) >= 8:
                break
            time.sleep(1)
        graded = [r for r in rows if r["feedback_quality"] is not None]
        assert len(graded) >= 8, rows
        assert all(r["status"] == 200 and r["feedback_quality"] in (0.0, 1.0) and r["model"] == "gemma-3-270m" for r in graded)
        assert {r["baseline"]["temperature"] for r in graded} == {1.4}  # the demo client's own, too hot, setting
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    with pytest.raises(httpx.HTTPError):  # the demo took its model server down with it
        httpx.get(f"http://127.0.0.1:{model_port}/v1/models", timeout=2)
