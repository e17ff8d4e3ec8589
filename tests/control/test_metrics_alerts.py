"""Prometheus: new metrics are exposed with bounded labels; alert rules reference only exposed metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from proxy.observability.metrics import guard_interventions
from tests.conftest import IN_CI
from tests.control.conftest import SCENARIO_LATENCY_SLO_MS
from tests.support.servers import RunningThermostat

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",), "summary": ("_sum", "_count")}
PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "histogram_quantile", "on", "group_left", "max", "min", "clamp_min", "le", "without", "and", "or",
    "unless", "avg", "count", "ignoring", "bool", "mode", "status", "slo", "traffic", "trigger", "upstream", "error_class", "offset",
}


def exposed_names(text: str) -> set[str]:
    names: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            base, kind = m.groups()
            names.add(base)
            for suffix in SUFFIXES.get(kind, ("",)):
                names.add(base + suffix)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_alert_rules_reference_exposed_metrics(ctl: RunningThermostat) -> None:
    text = httpx.get(f"{ctl.base}/metrics").text
    names = exposed_names(text)
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {
        "ThermostatSloLatencyViolation", "ThermostatTokenBudgetHigh", "ThermostatQualityDegradation", "ThermostatRollback", "ThermostatErrorRateHigh",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning")
        expr = re.sub(r'"[^"]*"', '""', rule["expr"])  # drop label values
        expr = re.sub(r"\[[0-9a-z]+\]", "", expr)  # range selectors
        expr = re.sub(r"(?<![A-Za-z_])\d+(\.\d+)?([eE][-+]?\d+)?", "", expr)  # numbers (1e-9)
        for ident in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
            if ident in PROMQL_WORDS:
                continue
            assert ident.startswith("thermostat_"), (rule["alert"], ident)
            assert ident in names, f"{rule['alert']}: {ident} is not exposed by /metrics"
    by = {r["alert"]: r for r in rules}
    assert by["ThermostatSloLatencyViolation"]["labels"]["severity"] == "critical"
    assert by["ThermostatTokenBudgetHigh"]["labels"]["severity"] == "warning" and "0.9" in by["ThermostatTokenBudgetHigh"]["expr"]
    assert "< 0.7" in by["ThermostatQualityDegradation"]["expr"]


def _promtool() -> str:
    """promtool's path; under CI=true a missing one fails (.ci/run installs Debian's `prometheus`)."""
    found = shutil.which("promtool")
    if found is None:
        if IN_CI:
            pytest.fail("promtool is required under CI (Debian package 'prometheus'; .ci/run installs it)")
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    return found


def test_promtool_accepts_rules() -> None:
    promtool = _promtool()
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([promtool, "check", "config", str(RULES.with_name("prometheus.yml"))], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_live_gauges_match_state(ctl: RunningThermostat) -> None:
    text = httpx.get(f"{ctl.base}/metrics").text
    rt = ctl.runtime
    assert 'thermostat_rollout_phase{phase="general"} 1.0' in text
    assert f'thermostat_slo_threshold{{slo="latency_p99_ms"}} {float(SCENARIO_LATENCY_SLO_MS)}' in text
    import time

    status = ctl.call(rt.budget.status(time.time()))
    used = float(re.search(r"^thermostat_budget_used_tokens (\S+)$", text, re.MULTILINE).group(1))
    assert used == status.used and "thermostat_budget_effective_limit_tokens 1e+06" in text
    samples = float(re.search(r'^thermostat_slo_samples\{slo="error_rate_max",traffic="optimized"\} (\S+)$', text, re.MULTILINE).group(1))
    assert samples == rt.slo.report(time.time()).optimized.requests


def test_guard_intervention_labels_are_bounded() -> None:
    assert guard_interventions("optimized", ("budget:chosen",)) == []
    assert guard_interventions("guard_fallback", ("budget:cheaper_fit", "budget_refused:waiver_required", "waiver:WV-0042")) == [
        ("budget", "cheaper_fit"), ("budget_refused", "waiver_required"), ("waiver", "used"), ("trust_region", "arm_swapped")]
    assert guard_interventions("rollback", ("weird:thing",)) == [("other", "other"), ("rollout", "rollback")]
