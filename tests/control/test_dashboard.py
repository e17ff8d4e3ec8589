"""The dashboard page in headless Chromium: loads, reads /api/optimization/dashboard, draws charts with data."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from html.parser import HTMLParser
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from policies.base import Choice
from policies.records import Arm, RequestContext
from policies.thompson import ThompsonGaussianPolicy
from proxy.cli import dashboard_url
from proxy.demo.simulator_server import SimulatorHandle
from proxy.runtime import Runtime
from tests.conftest import IN_CI, make_config
from tests.control.conftest import API, AUTH, drive
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, simulator_in_thread, start_thermostat

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
                      admin={"token_env": "THERMOSTAT_DASHBOARD_TEST_TOKEN"},
                      slo={"min_samples": 5, "latency_p99_ms": 60_000})  # no rollback from a loaded test machine's latency
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
        assert "phase general" in html and "optimising 70.0 % · holdout 30.0 %" in html  # the true share: 30 % is holdout
        assert '<option value="900" selected="">15 min</option>' in html  # a fresh run fits the default range
        # The axis starts at the data, not an hour before it: the points spread over the chart, not into its right edge.
        reward_points = [float(x) for x in re.findall(r'<circle cx="([\d.]+)"', re.search(r'<svg id="chart-reward".*?</svg>', html, re.S).group(0))]
        assert reward_points and min(reward_points) < 450, reward_points  # an hour's axis put them at ~590
        for chart in re.findall(r'<svg id="chart-[a-z-]+".*?</svg>', html, re.S):  # round values: 1, 2, 2.5 or 5 times 10^k apart
            ticks = [float(v.replace(",", "")) for v in re.findall(r'class="ytick">([^<]+)<', chart)]
            if len(ticks) < 2:
                continue
            step = ticks[1] - ticks[0]
            assert all(abs((b - a) - step) <= 1e-6 * abs(step) + 1e-9 for a, b in zip(ticks, ticks[1:])), ticks
            scale = 10 ** np.floor(np.log10(step))
            nice = min((1, 2, 2.5, 5, 10), key=lambda m: abs(step / scale - m)) * scale  # the step without the labels' rounding
            assert abs(step - nice) < 1e-6 * nice and all(abs(v / nice - round(v / nice)) < 1e-3 for v in ticks), ticks
        assert re.search(r'class="xtick">\d', html)
        glance = {a["data-task"]: cells for a, cells in table(html, "glance")}
        assert set(glance) == {"code", "summarise"} and "tokens per request" in glance["code"][3] and "$" not in glance["code"][3]  # unpriced
        # Every panel, the holdout (baseline) line of the headline chart, and the tuned-vs-holdout intervals.
        panels = set(re.findall(r'<section id="(panel-[a-z-]+)"', html))
        assert panels == {"panel-glance", "panel-comparison", "panel-spend", "panel-monitor", "panel-reward", "panel-latency", "panel-temperature", "panel-max-tokens", "panel-effort", "panel-signals",
                          "panel-budget", "panel-events"}, panels
        reward_svg = re.search(r'<svg id="chart-reward".*?</svg>', html, re.S)
        assert reward_svg is not None and 'data-name="holdout"' in reward_svg.group(0) and 'data-name="optimized"' in reward_svg.group(0)
        for task in ("code", "summarise"):
            assert re.search(rf'<tr data-task="{task}" data-metric="quality_automatic">', html), task
        assert html.count('class="interval"') >= 2 * 3  # both tasks: quality, reward and tokens at least
        assert "95 % interval [" in html and "verdict" in html
        assert 'class="band"' in html and 'class="series client"' in html  # trust-region bands and the client's value
        assert "waiver 80 %" in html and "limit 100 %" in html and 'id="burn-rate"' in html
        signals = {a["data-task"]: cells for a, cells in table(html, "signals")}
        assert signals["code"][:7] == ["code", "40", "0", "0", "0", "40", "0"]  # requests, explicit, judge, regeneration, automatic, none
        assert signals["code"][8] == "none checked" and signals["code"][9] == "no pairs yet"
        # THERMOSTAT_SCREENSHOT_DIR=bench/results refreshes the README's screenshot; tests never write the tree by default.
        out_dir = Path(os.environ.get("THERMOSTAT_SCREENSHOT_DIR") or tmp_path)
        out_dir.mkdir(parents=True, exist_ok=True)
        shot = out_dir / "dashboard.png"
        subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", url],
                       capture_output=True, text=True, timeout=90)
        assert shot.exists() and shot.stat().st_size > 10_000
    finally:
        t.stop()


def test_dashboard_shows_spend_and_saving_against_the_holdout(upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Priced traffic (docs/cost.md): the spend panel's numbers per task are the API's, digit for digit."""
    chromium = _chromium()
    monkeypatch.setenv("THERMOSTAT_DASHBOARD_TEST_TOKEN", "dashboard-token-0123456789")
    ups = [{"name": "fake", "base_url": upstream.url, "models": ["*"], "timeout_s": 2.0, "connect_timeout_s": 1.0,
            "models_config": [{"pattern": "echo-1", "input_price_per_mtok": 2.5, "output_price_per_mtok": 10.0}]}]
    cfg = make_config(upstream.url, tmp_path / "data", upstreams=ups, optimization={"mode": "general", "seed": 11, "holdout_fraction": 0.4},
                      admin={"token_env": "THERMOSTAT_DASHBOARD_TEST_TOKEN"}, caws={"unit": "usd", "budget_limit": 5.0})
    t = start_thermostat(cfg)
    try:
        drive(t, 40, "code", temperature=0.7, max_tokens=300)
        drive(t, 25, "summarise", max_tokens=200)
        t.flush()
        auth = {"Authorization": "Bearer dashboard-token-0123456789"}
        api = {p["task_type"]: p["cost"] for p in httpx.get(f"{t.base}/api/optimization/dashboard", headers=auth, timeout=10).json()["performance"]}
        dom = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                              dashboard_url("127.0.0.1", t.port, "dashboard-token-0123456789")], capture_output=True, text=True, timeout=90)
        assert 'data-loaded="1"' in dom.stdout, dom.stderr[-2000:]
        assert "Dollar budget (current window, in micro-dollars)" in dom.stdout
        rows = {a["data-task"]: (a, cells) for a, cells in table(dom.stdout, "spend")}
        assert set(rows) == {"code", "summarise"}
        for task, (attrs, cells) in rows.items():
            cost = api[task]
            assert cost["optimized_priced"] > 0 and cost["holdout_priced"] > 0 and cost["saving_per_1k_usd"] is not None
            for key, field in (("tuned", "optimized_cost_usd"), ("holdout", "holdout_cost_usd"), ("saving", "saving_per_1k_usd"),
                               ("low", "ci_low"), ("high", "ci_high"), ("tuned-spend", "optimized_spend_usd"), ("holdout-spend", "holdout_spend_usd")):
                assert float(attrs[f"data-{key}"] or "nan") == cost[field], (task, key)
            assert cells[1] == f"${cost['optimized_cost_usd']:.6f} · {cost['optimized_priced']} req"
            assert cells[2] == f"${cost['holdout_cost_usd']:.6f} · {cost['holdout_priced']} req"
            assert cells[4].startswith(f"{signed(cost['saving_per_1k_usd'])} [{signed(cost['ci_low'])}, {signed(cost['ci_high'])}]")
            assert cells[5] == cost["summary"] and "per 1,000 requests" in cost["summary"]
        # the logged costs behind the panel: the same rows' cost_usd, summed
        logged = httpx.get(f"{t.base}/api/optimization/logs", params={"limit": 500, "task_type": "code"}, headers=auth, timeout=10).json()["items"]
        assert sum(r["cost_usd"] for r in logged if r["mode"] == "holdout") == pytest.approx(api["code"]["holdout_spend_usd"], rel=1e-12)
    finally:
        t.stop()


def signed(v: float, digits: int = 4) -> str:
    """The dashboard's `signed`: a value that rounds to zero is "+0.0000", never "-0.0000"."""
    return f"{(round(v, digits) or 0.0):+.{digits}f}"


class _Cells(HTMLParser):
    """Rows of one table (by id) as lists of cell texts, with each row's attributes."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id, self.depth, self.rows = table_id, 0, []  # type: ignore[var-annotated]
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.depth += 1 if self.depth or a.get("id") == self.table_id else 0
        elif self.depth and tag == "tr":
            self.rows.append((a, []))
        elif self.depth and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self.depth:
            self.depth -= 1
        elif tag in ("td", "th") and self._cell is not None and self.rows:
            self.rows[-1][1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def table(html: str, table_id: str) -> list[tuple[dict[str, str | None], list[str]]]:
    parser = _Cells(table_id)
    parser.feed(html)
    return [(a, cells) for a, cells in parser.rows if cells and "th" not in a.get("class", "") and a]


class HarmfulForExtraction(ThompsonGaussianPolicy):
    """Harmful on purpose for one task type (the smallest max_tokens: answers cut short), ordinary elsewhere."""

    def choose(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm], rng: np.random.Generator) -> Choice:
        if ctx.task_type == "extraction":
            return Choice(index=min(range(len(arms)), key=lambda i: arms[i].max_tokens), propensity=1.0)
        return super().choose(ctx, baseline, arms, rng)

    def propensities(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm]) -> np.ndarray:
        # Once judge scores unlock temperature the decider draws in two stages from these (BanditDecider.choose):
        # the cap stage at any temperature is the smallest cap, so the harm holds whatever temperature is drawn.
        if ctx.task_type == "extraction":
            out = np.zeros(len(arms))
            out[min(range(len(arms)), key=lambda i: arms[i].max_tokens)] = 1.0
            return out
        return super().propensities(ctx, baseline, arms)


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorHandle]:
    with simulator_in_thread(seed=3) as sim:
        yield sim


SCHEMA_OK = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
SCHEMA_FAILS = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer", "confidence"]}


def test_dashboard_shows_a_simulated_run_with_judge_holdout_monitor_and_events(simulator: SimulatorHandle, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator behind the real app, its judge on, a holdout, and one task type made worse on purpose: every
    panel in the DOM carries the numbers the API returns."""
    chromium = _chromium()
    token = "dashboard-sim-token-0123456789"
    monkeypatch.setenv("THERMOSTAT_DASHBOARD_TEST_TOKEN", token)
    cfg = make_config(simulator.url, tmp_path / "data", optimization={"mode": "general", "seed": 5, "holdout_fraction": 0.3},
                      admin={"token_env": "THERMOSTAT_DASHBOARD_TEST_TOKEN"},
                      slo={"quality_min": 0.0, "min_samples": 10_000},  # the global SLO stays out: the per-task monitor acts
                      constraints={"max_extra_truncation": 1.0},  # lower caps offered at once, so the harmful policy can cut answers
                      judge={"enabled": True, "model": "sim-judge", "sample_rate": 0.5, "max_concurrency": 4},
                      upstreams=[{"name": "sim", "base_url": simulator.url, "models": ["*"], "timeout_s": 2.0,  # priced: the glance shows dollars
                                  "models_config": [{"pattern": "*", "input_price_per_mtok": 1.0, "output_price_per_mtok": 4.0}]}])
    rt = Runtime(cfg)
    rt.bandit.policy = HarmfulForExtraction.from_settings(thompson=cfg.policy.thompson, linucb=cfg.policy.linucb)
    t = start_thermostat(cfg, rt)
    auth = {"authorization": f"Bearer {token}"}
    try:
        client = openai.OpenAI(base_url=t.url, api_key="sk-test", max_retries=0, timeout=10)
        ids: dict[str, list[tuple[str, float]]] = {"code": [], "creative": []}
        for i in range(60):
            for task, temperature in (("code", 0.7), ("creative", 0.6)):
                kw: dict[str, object] = {}
                if task == "code" and i < 15:  # validators: 10 schemas the answer meets, 5 it cannot
                    kw["response_format"] = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA_OK if i < 10 else SCHEMA_FAILS}}
                raw = client.chat.completions.with_raw_response.create(
                    model="sim-1", messages=[{"role": "user", "content": f"{task} question {i}"}], temperature=temperature, max_tokens=800,
                    user=f"u{i}", extra_headers={"x-task-type": task}, **kw)  # type: ignore[arg-type]
                ids[task].append((raw.http_response.headers["x-request-id"], float(raw.http_response.headers["x-sim-true-quality"])))
        for i in range(16):  # regeneration: the same conversation asked again by the same user
            for _ in range(2):
                client.chat.completions.create(model="sim-1", messages=[{"role": "user", "content": f"creative again {i}"}], temperature=0.6,
                                               max_tokens=800, user=f"r{i}", extra_headers={"x-task-type": "creative"})
        modes = []
        for i in range(300):  # the harmful task type until the monitor rolls it back
            raw = client.chat.completions.with_raw_response.create(
                model="sim-1", messages=[{"role": "user", "content": f"extract fields {i}"}], temperature=0.7, max_tokens=300,
                user=f"x{i}", extra_headers={"x-task-type": "extraction"})
            modes.append(raw.http_response.headers["x-thermostat-mode"])
            if modes[-1] == "rollback":
                break
        assert modes[-1] == "rollback", set(modes)
        assert rt.judge is not None
        t.call(rt.judge.drain(), timeout=60)
        for rid, true_quality in ids["code"][:40]:  # a person's feedback (the simulator's hidden quality) next to the judge's scores
            r = httpx.post(f"{t.base}/api/optimization/record-outcome", headers=auth, timeout=10,
                           json={"request_id": rid, "outcome": {"quality": true_quality}})
            assert r.status_code in (200, 201), r.text
        for action in ("rollback", "resume"):  # a global rollback and its resume, by hand
            assert httpx.post(f"{t.base}/api/optimization/{action}", headers=auth, json={"reason": f"dashboard test {action}"}, timeout=10).status_code == 200
        t.flush(0.2)

        quality = {q["task_type"]: q for q in httpx.get(f"{t.base}/api/optimization/quality", headers=auth, timeout=30).json()["tasks"]}
        slo = {m["task_type"]: m for m in httpx.get(f"{t.base}/api/optimization/slo-status", headers=auth, timeout=30).json()["tasks"]}
        events = httpx.get(f"{t.base}/api/optimization/events", headers=auth, params={"limit": 50}, timeout=30).json()
        assert quality["code"]["signals"]["explicit"] == 40 and quality["code"]["judge"]["n"] > 0
        assert quality["code"]["validation_checked"] == 15 and quality["code"]["validation_failed"] == 5
        assert quality["creative"]["signals"]["implicit"] > 0 and quality["creative"]["signals"]["judge"] > 0
        assert slo["extraction"]["rolled_back"] is True and slo["code"]["holdout_n"] > 0
        kinds = [(e["kind"], e["scope"], e["task_type"]) for e in events["items"]]
        assert kinds[:3] == [("resume", "global", None), ("rollback", "global", None), ("rollback", "task", "extraction")], kinds

        dom = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", dashboard_url("127.0.0.1", t.port, token)],
                             capture_output=True, text=True, timeout=90)
        html = dom.stdout
        assert 'data-loaded="1"' in html, dom.stderr[-2000:]
        assert 'id="error"></div>' in html  # no read failed

        # Signals & judge: every count, rate and the judge's agreement as /quality has them.
        rows = {a["data-task"]: cells for a, cells in table(html, "signals")}
        assert set(rows) == set(quality), rows
        for task, q in quality.items():
            cells = rows[task]
            assert cells[1] == str(q["requests"])
            judge = q["signals"]["judge"] + q["signals"]["judge_pairwise"]
            assert cells[2:7] == [str(q["signals"][k] if k != "judge" else judge) for k in ("explicit", "judge", "implicit", "automatic", "none")]
            assert cells[7] == ("—" if q["regeneration_rate"] is None else f"{100 * q['regeneration_rate']:.1f} %")
            j = q["judge"]
            if j["n"]:
                rho = "—" if j["spearman"] is None else f"{j['spearman']:+.2f}"
                assert cells[9] == f"ρ {rho} · {j['mean_difference']:+.2f} · {j['n']} pairs", (cells, j)
            assert cells[10].startswith("trusted" if j["trusted"] else "muted")
        v = quality["code"]
        assert rows["code"][8] == f"5 / 15 ({100 * v['validation_failure_rate']:.1f} %)"

        # The conservative monitor: its verdict in words, both means and the interval, per task type.
        rows = {a["data-task"]: cells for a, cells in table(html, "monitor")}
        assert set(rows) == set(slo)
        for task, m in slo.items():
            cells = rows[task]
            assert cells[1] == ("rolled back" if m["rolled_back"] else {"better": "better", "not_yet_known": "not yet known"}.get(m["verdict"], m["verdict"]))
            assert cells[2] == m["summary"] and f"{100 * m['quality_level']:g} % interval [" in cells[2]
            lo, hi = m["quality_difference"]
            assert cells[5] == f"[{lo:+.2f}, {hi:+.2f}]"
            assert cells[3].endswith(f"· {m['optimised_n']} signals") and cells[4].endswith(f"· {m['holdout_n']} signals")
            assert cells[3].startswith(m["quality_kind"])
        assert rows["extraction"][1] == "rolled back" and "rolled back" in rows["extraction"][2]
        assert re.search(r'<svg[^>]*class="ci"', html)

        # Events: newest first, scope and reason from the stored log.
        rows = table(html, "events")
        assert [(a["data-kind"], a["data-scope"]) for a, _ in rows] == [(e["kind"], e["scope"]) for e in events["items"]]
        assert rows[0][1][1:3] == ["resume", "global"] and rows[0][1][4] == "dashboard test resume"
        task_rollback = next(cells for a, cells in rows if a["data-scope"] == "task")
        stored = next(e for e in events["items"] if e["scope"] == "task")
        assert task_rollback[1:3] == ["rollback", "task extraction"] and task_rollback[4] == stored["reason"] and task_rollback[6] == "conservative"
        assert task_rollback[3] == f"{stored['from_phase']} → rollback" and "optimised mean quality" in stored["reason"]

        # Knob bands as the guard draws them (hand-worked): temperature 0.7 ± 0.2; max_tokens 800 lowered by at most
        # min(500, 0.5 × 800) = 400 and never raised (raise_client_max_tokens = false).
        def band(chart: str, task: str) -> str:
            m = re.search(rf'<svg id="{chart}".*?</svg>', html, re.S)
            assert m is not None
            found = re.search(rf'<path[^>]*class="band"[^>]*data-name="{task}"[^>]*data-last="([^"]+)"', m.group(0))
            assert found is not None, chart
            return found.group(1)

        lo, hi = (float(x) for x in band("chart-temperature", "code").split(","))
        assert lo == pytest.approx(0.5) and hi == pytest.approx(0.9)
        assert band("chart-max-tokens", "code") == "400,800" and band("chart-max-tokens", "extraction") == "150,300"

        # At a glance: per task, the verdict, by how much in quality and cost, on how many signals, from the same comparison.
        payload = httpx.get(f"{t.base}/api/optimization/dashboard", headers=auth, timeout=30).json()
        comparisons = {c["task_type"]: c for c in payload["comparisons"]}
        priced = {p["task_type"]: p["cost"] for p in payload["performance"] if p.get("cost") and p["cost"]["saving_per_1k_usd"] is not None}
        glance = {a["data-task"]: cells for a, cells in table(html, "glance")}
        assert set(glance) == set(comparisons)
        order = ("quality_explicit", "quality_judge", "pairwise_win_rate", "quality_automatic", "quality")
        for task, c in comparisons.items():
            cells = glance[task]
            assert cells[1] == {"better": "better", "worse": "worse", "rolled back": "worse: rolled back"}.get(c["verdict"], "not yet known")
            metrics = {m["metric"]: m for m in c["metrics"]}
            q = next((metrics[k] for k in order if k in metrics and metrics[k]["difference"] is not None), None)
            assert q is not None
            assert cells[2].startswith(f"{q['difference']:+.2f} [{q['ci_low']:+.2f}, {q['ci_high']:+.2f}]"), (cells, q)
            assert cells[4] == f"{q['optimized_n'] + q['holdout_n']:,} ({q['optimized_n']:,} tuned, {q['holdout_n']:,} holdout)"
            k = metrics["completion_tokens"]
            assert task in priced  # the simulator's model is priced here: dollars first (tuned − holdout = −saving), then tokens
            assert cells[3].startswith(f"{-priced[task]['saving_per_1k_usd']:+.4f}".replace("+", "+$").replace("-", "-$")), cells[3]
            assert f"per 1,000 requests; {k['difference']:+.0f} tokens per request" in cells[3]
        assert glance["extraction"][1] == "worse: rolled back"

        # Tuned vs holdout over the range, and the headline chart's holdout line.
        reward_svg = re.search(r'<svg id="chart-reward".*?</svg>', html, re.S)
        assert reward_svg is not None and 'data-name="holdout"' in reward_svg.group(0)
        assert re.search(r'<tr data-task="code" data-metric="quality_automatic">', html) and html.count('class="interval"') >= 3 * 4
    finally:
        t.stop()


def test_open_intervals_are_not_drawn_as_dots_at_the_edge(upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few requests: the p99 latency interval has open ends; the page says "not enough data" instead of a dot at the edge."""
    chromium = _chromium()
    monkeypatch.setenv("THERMOSTAT_DASHBOARD_TEST_TOKEN", "dashboard-token-0123456789")
    cfg = make_config(upstream.url, tmp_path / "data", optimization={"mode": "general", "seed": 11, "holdout_fraction": 0.5},
                      admin={"token_env": "THERMOSTAT_DASHBOARD_TEST_TOKEN"})
    t = start_thermostat(cfg)
    try:
        drive(t, 12, "code", temperature=0.7, max_tokens=300)
        t.flush()
        latency = next(m for c in httpx.get(f"{t.base}/api/optimization/dashboard", timeout=30,
                                            headers={"authorization": "Bearer dashboard-token-0123456789"}).json()["comparisons"]
                       for m in c["metrics"] if m["metric"] == "latency_p99")
        assert latency["difference"] is not None and latency["ci_low"] is None and latency["ci_high"] is None  # the case drawn here
        dom = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                              dashboard_url("127.0.0.1", t.port, "dashboard-token-0123456789")], capture_output=True, text=True, timeout=90)
        html = dom.stdout
        assert 'data-loaded="1"' in html, dom.stderr[-2000:]
        row = re.search(r'<tr data-task="code" data-metric="latency_p99">.*?</tr>', html, re.S)
        assert row is not None
        assert "not enough data" in row.group(0) and "<circle" not in row.group(0) and "−∞" not in row.group(0)
    finally:
        t.stop()


def test_no_page_may_frame_the_dashboard_or_the_api(ctl: RunningThermostat) -> None:
    """Anti-framing and nosniff on the page and on the control API, refusals included (issue 21, item 10)."""
    for path, headers in [("/dashboard", {}), (f"{API}/status", AUTH), (f"{API}/dashboard", {}), ("/health/readiness", {})]:
        r = httpx.get(f"{ctl.base}{path}", headers=headers, timeout=10)
        assert r.status_code in (200, 401), (path, r.status_code)
        assert r.headers["x-frame-options"] == "DENY", path
        assert r.headers["content-security-policy"] == "frame-ancestors 'none'", path
        assert r.headers["x-content-type-options"] == "nosniff", path
