"""`thermostat evaluate` on a log the simulator wrote, where the truth is known."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest

from proxy.cli import main
from proxy.config import Config, build_config
from proxy.demo.simlog import simulated_log
from proxy.demo.simulator import SimulatorTruth
from proxy.learning import evaluate as ev
from proxy.store import SqliteSink

N_REQUESTS = 3000
LOGGING = {"optimization": {"policy": "thompson_gaussian", "tune_temperature": "always"}, "policy": {"thompson": {"min_propensity": 0.01}}}


def _toml(doc: dict, data_dir: Path) -> str:
    lines = [f'[server]\ndata_dir = "{data_dir}"']
    for section, values in doc.items():
        flat = {k: v for k, v in values.items() if not isinstance(v, dict)}
        if flat:
            lines.append(f"[{section}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in flat.items()))
        for sub, inner in values.items():
            if isinstance(inner, dict):
                lines.append(f"[{section}.{sub}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in inner.items()))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Config]:
    """A data_dir whose decisions.sqlite3 holds a simulated Thompson log of the last hour."""
    data_dir = tmp_path_factory.mktemp("evaluate")
    config = build_config(LOGGING)
    entries = simulated_log(config, n_requests=N_REQUESTS, seed=1, start=time.time() - N_REQUESTS, spacing_s=1.0)

    async def write() -> None:
        store = SqliteSink(data_dir / "decisions.sqlite3")
        await store.open()
        await store.write(entries)
        await store.close()

    asyncio.run(write())
    return data_dir, config


def _truth(candidate: Config, task: str) -> tuple[float, float]:
    """(value of the uniform candidate over its allowed arms, value of the baseline arm) for `task`."""
    truth = SimulatorTruth()
    profile = truth.profile(task)
    from policies.records import RequestContext

    ctx = RequestContext(task, "sim-1", "chat", 100, 2, False, False, False, profile.client_temperature, profile.client_max_tokens)
    base, arms = ev.TrustRegion(candidate, ev.make_candidate(candidate)).allowed(ctx)
    values = [truth.expected_reward(task, base, arm, candidate.policy.reward) for arm in arms]
    return float(np.mean(values)), truth.expected_reward(task, base, base, candidate.policy.reward)


def test_evaluate_writes_a_report_whose_intervals_cover_the_truth(logged: tuple[Path, Config], tmp_path: Path) -> None:
    data_dir, _ = logged
    candidate_doc = {"optimization": {"policy": "uniform", "tune_temperature": "always"}}
    candidate_path = tmp_path / "candidate.toml"
    candidate_path.write_text(_toml(candidate_doc, data_dir))
    log_path = tmp_path / "log.toml"
    log_path.write_text(_toml(LOGGING, data_dir))
    out = tmp_path / "report"

    code = main(["evaluate", "--config", str(candidate_path), "--log-config", str(log_path), "--since", "7d", "--out", str(out)])

    assert code == 0
    text = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    candidate = build_config(candidate_doc)
    assert report["rows_read"] == N_REQUESTS and report["candidate_policy"] == "uniform"
    assert sorted(t["task_type"] for t in report["tasks"]) == sorted(SimulatorTruth().tasks)
    for task in report["tasks"]:
        name = task["task_type"]
        for method in ("IPS", "SNIPS", "DR", "holdout"):
            assert f"| {name} | {method} |" in text
        value, baseline = _truth(candidate, name)
        methods = {m["method"]: m for m in task["candidate"]}
        assert sorted(methods) == ["dr", "ips", "snips"] and task["refused"] is None
        for m in methods.values():
            assert m["ci_low"] <= value <= m["ci_high"], (name, m, value)
            assert m["eb_low"] is not None and m["eb_low"] <= value <= m["eb_high"]  # the floor bounds the weights
            assert 0 < m["ess"] <= task["optimised_rows"]
        assert task["holdout"]["ci_low"] <= baseline <= task["holdout"]["ci_high"], (name, task["holdout"], baseline)
        assert task["unsupported_mass"] == 0.0 and task["outside_logged_region"] == 0
    for png in ("reward_over_time.png", "estimates.png", "weights.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in text


def test_a_candidate_outside_the_logged_trust_region_gets_no_estimate(logged: tuple[Path, Config], tmp_path: Path) -> None:
    data_dir, log_config = logged
    wider = build_config({"optimization": {"policy": "uniform", "tune_temperature": "always"}, "constraints": {"max_delta_temperature": 0.5}})

    async def read() -> list:
        store = SqliteSink(data_dir / "decisions.sqlite3")
        await store.open()
        try:
            return await ev.read_log(store, since=0.0, until=time.time() + 1, task_type="code", max_rows=10_000)
        finally:
            await store.close()

    rows = asyncio.run(read())
    evaluation, reps, series = ev.evaluate_log(rows, wider, log_config, since=0.0, until=time.time(), n_bootstrap=200)
    (task,) = evaluation.tasks
    assert task.task_type == "code" and task.candidate == [] and task.unsupported_mass is not None and task.unsupported_mass > 0.1
    assert task.refused is not None and "never logged" in task.refused
    text = ev.markdown(evaluation, [])
    assert task.unsupported and "| code | candidate | unsupported: no estimate |" in text and "the estimate is unsupported" in text
    assert task.holdout is not None  # the on-policy baseline needs no support


def test_evaluate_without_a_log_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "candidate.toml"
    config.write_text(_toml({"optimization": {"policy": "uniform"}}, tmp_path / "nothing-here"))
    assert main(["evaluate", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "no decision log at" in capsys.readouterr().err
    assert main(["evaluate", "--config", str(config), "--since", "soon", "--out", str(tmp_path / "out")]) == 2


def test_an_empirical_bernstein_interval_over_the_whole_range_is_called_uninformative() -> None:
    bounds = (-1.1, 1.0)
    whole = ev.MethodEstimate(method="ips", value=0.5, ci_low=0.4, ci_high=0.6, eb_low=-1.1, eb_high=1.0, ess=100.0)
    unbounded = msgspec.structs.replace(whole, eb_low=None, eb_high=None)
    narrow = msgspec.structs.replace(whole, eb_low=0.2, eb_high=0.8)
    assert not ev.informative(whole, bounds).eb_informative and not ev.informative(unbounded, bounds).eb_informative
    assert ev.informative(narrow, bounds).eb_informative
    task = ev.TaskEvaluation(task_type="code", optimised_rows=100, holdout_rows=20, logged_mean=0.5, holdout=None,
                             candidate=[ev.informative(whole, bounds)], ess=100.0, max_weight=2.0, unsupported_mass=0.0,
                             outside_logged_region=0)
    evaluation = ev.Evaluation(candidate_policy="uniform", logging_policy="uniform", since=0.0, until=1.0, rows_read=120,
                               tasks=[task], confidence=0.95, min_propensity=0.01, reward_range=bounds)
    text = ev.markdown(evaluation, [])
    assert "| code | IPS | 0.5000 | [0.4000, 0.6000] | uninformative |" in text and "[-1.1000, 1.0000]" not in text
