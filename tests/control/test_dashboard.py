"""The dashboard page in headless Chromium: loads, reads /api/optimization/dashboard, draws charts with data."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from proxy.cli import dashboard_url
from tests.conftest import IN_CI, make_config
from tests.control.conftest import drive
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import start_thermostat

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,1500", "--virtual-time-budget=8000"]


def _chromium() -> str:
    if CHROMIUM is None:
        if IN_CI:
            pytest.fail("chromium is required under CI (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    return CHROMIUM


def test_dashboard_renders_with_data(upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chromium = _chromium()
    # With an admin token, opened the way `thermostat demo` prints it: the token in the URL's fragment.
    monkeypatch.setenv("THERMOSTAT_DASHBOARD_TEST_TOKEN", "dashboard-token-0123456789")
    cfg = make_config(upstream.url, tmp_path / "data", optimization={"mode": "general", "seed": 11, "holdout_fraction": 0.3},
                      admin={"token_env": "THERMOSTAT_DASHBOARD_TEST_TOKEN"}, slo={"min_samples": 5})
    t = start_thermostat(cfg)
    url = dashboard_url("127.0.0.1", t.port, "dashboard-token-0123456789")
    try:
        drive(t, 40, "code", temperature=0.7, max_tokens=300)
        drive(t, 25, "summarise")
        t.flush()
        page = httpx.get(f"{t.base}/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<script src" not in page.text and "http://" not in page.text.replace("http://www.w3.org/2000/svg", "")  # self-contained
        profile = tmp_path / "profile"
        assert httpx.get(f"{t.base}/api/optimization/dashboard").status_code == 401  # the page's data needs the token
        dom = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=90)
        html = dom.stdout
        assert 'data-loaded="1"' in html, dom.stderr[-2000:]
        points = {m.group(1): int(m.group(2)) for m in re.finditer(r'<svg id="(chart-[a-z-]+)"[^>]*data-points="(\d+)"', html)}
        assert points.keys() >= {"chart-reward", "chart-latency", "chart-temperature", "chart-max-tokens", "chart-effort", "chart-budget"}, points
        assert all(v > 0 for k, v in points.items() if k != "chart-effort"), points  # this traffic sends no effort
        assert points["chart-effort"] == 0 and "no data in the window yet" in html
        assert html.count('class="series"') >= 4  # reward + latency + two task types' parameter lines
        assert "phase general" in html and "optimising 100.0 %" in html
        # Every panel, the holdout (baseline) line of the headline chart, and the tuned-vs-holdout intervals.
        panels = set(re.findall(r'<section id="(panel-[a-z-]+)"', html))
        assert panels == {"panel-comparison", "panel-reward", "panel-latency", "panel-temperature", "panel-max-tokens", "panel-effort", "panel-signals",
                          "panel-budget", "panel-events"}, panels
        reward_svg = re.search(r'<svg id="chart-reward".*?</svg>', html, re.S)
        assert reward_svg is not None and 'data-name="holdout"' in reward_svg.group(0) and 'data-name="optimized"' in reward_svg.group(0)
        for task in ("code", "summarise"):
            assert re.search(rf'<tr data-task="{task}" data-metric="quality">', html), task
        assert html.count('class="interval"') >= 2 * 3  # both tasks: quality, reward and tokens at least
        assert "95 % interval [" in html and "verdict" in html
        assert 'class="band"' in html and 'class="series client"' in html  # trust-region bands and the client's value
        assert "waiver 80 %" in html and "limit 100 %" in html and 'id="burn-rate"' in html
        assert re.search(r'<table id="signals">.*?<td[^>]*>code</td><td>0</td><td>0</td><td>0</td><td>40</td><td>0</td>', html, re.S)
        # THERMOSTAT_SCREENSHOT_DIR=bench/results refreshes the README's screenshot; tests never write the tree by default.
        out_dir = Path(os.environ.get("THERMOSTAT_SCREENSHOT_DIR") or tmp_path)
        out_dir.mkdir(parents=True, exist_ok=True)
        shot = out_dir / "dashboard.png"
        subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", url],
                       capture_output=True, text=True, timeout=90)
        assert shot.exists() and shot.stat().st_size > 10_000
    finally:
        t.stop()
