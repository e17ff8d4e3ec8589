"""A request the upstream refuses because of the client's own body is no verdict on the parameters.

Before: a 400 from the upstream was logged as mode `optimized` with automatic quality 0.0,
and that 0 went into the conservative monitor's optimised-vs-holdout quality, the quality
histogram and the performance report, as if the arm drawn had produced a bad answer.
Now it keeps its row and its error count, and has no quality and no reward.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat


@pytest.fixture(scope="module")
def tuned(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    cfg = make_config(
        upstream.url, tmp_path_factory.mktemp("client-errors"),
        optimization={"mode": "general", "seed": 5, "holdout_fraction": 0.5, "tune_temperature": "always"},
    )
    running = start_thermostat(cfg)
    yield running
    running.stop()


def _logs(t: RunningThermostat, task: str) -> list[dict]:
    return httpx.get(f"{t.base}/api/optimization/logs", params={"task_type": task, "limit": 500}, timeout=10).json()["items"]


def test_a_client_400_keeps_its_row_and_error_count_but_no_quality(tuned: RunningThermostat) -> None:
    client = openai.OpenAI(base_url=tuned.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "typos"})
    for i in range(40):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="error-400", messages=[{"role": "user", "content": "hi"}], temperature=0.7, max_tokens=50, user=f"u{i}")
        assert err.value.body == {"message": "upstream says 400", "type": "invalid_request_error", "code": "code_400", "param": None}
    tuned.flush()

    rows = _logs(tuned, "typos")
    assert len(rows) == 40 and all(r["status"] == 400 for r in rows)  # kept in the log
    modes = {r["mode"] for r in rows}
    assert modes == {"optimized", "holdout"}  # both kinds of traffic were drawn
    assert any(r["sent"]["temperature"] != 0.7 for r in rows if r["mode"] == "optimized")  # a tuned arm was sent
    assert all(r["quality"] is None and r["automatic_quality"] is None and r["reward"] is None for r in rows)

    verdict = tuned.runtime.conservative.verdict("typos")
    assert (verdict.optimised_n, verdict.holdout_n) == (0, 0)  # the monitor saw no quality

    metrics = httpx.get(f"{tuned.base}/metrics", timeout=10).text
    assert 'thermostat_quality_count{mode="optimized",task_type="typos"}' not in metrics
    errors = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith("thermostat_requests_total{") and 'task_type="typos"' in line and 'status="400"' in line)
    assert errors == 40  # still counted as errors

    perf = httpx.get(f"{tuned.base}/api/optimization/performance", timeout=10).json()
    task = next(t for t in perf["tasks"] if t["task_type"] == "typos")
    assert task["optimized"]["quality_mean"] is None and task["optimized"]["errors"] == task["optimized"]["requests"] > 0


def test_feedback_on_a_client_400_stays_out_of_quality(tuned: RunningThermostat) -> None:
    client = openai.OpenAI(base_url=tuned.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "typos-fb"})
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="error-400", messages=[{"role": "user", "content": "hi"}], temperature=0.7)
    rid = err.value.response.headers["x-request-id"]
    tuned.flush()
    posted = httpx.post(f"{tuned.base}/api/optimization/record-outcome", json={"request_id": rid, "outcome": {"quality": 1.0}}, timeout=10)
    assert posted.status_code == 200 and posted.json()["policy_updated"] is False
    tuned.flush()
    (row,) = _logs(tuned, "typos-fb")
    assert row["feedback_quality"] == 1.0 and row["quality"] is None  # recorded, not compared


def test_rate_limits_and_server_errors_still_count(tuned: RunningThermostat) -> None:
    """429 (rate) and 5xx are not the client's body: they keep their automatic 0."""
    client = openai.OpenAI(base_url=tuned.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "limits"})
    for model, exc in (("error-429", openai.RateLimitError), ("error-500", openai.InternalServerError)):
        with pytest.raises(exc):
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], temperature=0.7)
    tuned.flush()
    assert sorted((r["status"], r["automatic_quality"]) for r in _logs(tuned, "limits")) == [(429, 0.0), (500, 0.0)]
