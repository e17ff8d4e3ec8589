"""A Thermostat with an admin token and a small scenario driven through the proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

TOKEN_ENV = "THERMOSTAT_TEST_CONTROL_TOKEN"
TOKEN = "test-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
API = "/api/optimization"


def drive(t: RunningThermostat, n: int, task_type: str, **body: object) -> list[str]:
    ids = []
    with httpx.Client(timeout=10) as client:
        for i in range(n):
            payload = {"model": "echo-1", "messages": [{"role": "user", "content": f"question {i} about {task_type}"}], **body}
            r = client.post(f"{t.url}/chat/completions", json=payload, headers={"x-task-type": task_type})
            assert r.status_code == 200, r.text
            ids.append(r.headers["x-request-id"])
    return ids


SCENARIO_LATENCY_SLO_MS = 60_000


def start_scenario(upstream: FakeUpstream, data_dir: Path) -> RunningThermostat:
    """A token-protected Thermostat with 40 "code" and 20 "chat" requests logged (the token must be in the env)."""
    cfg = make_config(
        upstream.url,
        data_dir,
        optimization={"mode": "general", "seed": 7, "holdout_fraction": 0.0},  # every row optimised: values pinned to the log
        admin={"token_env": TOKEN_ENV},
        # a latency SLO far above what a loaded test machine can take: a breach would roll the scenario back
        # mid-test and change what the read-only tests read (the latency SLO has its own tests)
        slo={"min_samples": 5, "check_interval_s": 0, "latency_p99_ms": SCENARIO_LATENCY_SLO_MS},
    )
    running = start_thermostat(cfg)
    running.ids = {  # type: ignore[attr-defined]
        "code": drive(running, 40, "code", temperature=0.7, max_tokens=300),
        "chat": drive(running, 20, "chat"),
    }
    running.flush()
    return running


@pytest.fixture(scope="module")
def ctl(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    """Shared by a module's tests, so READ-ONLY: a test that changes state (rollout, waivers,
    feedback, audit rows, auth counters) takes `own_ctl` instead."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, TOKEN)
        running = start_scenario(upstream, tmp_path_factory.mktemp("control"))
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture
def own_ctl(upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningThermostat]:
    """The same scenario in a server of the test's own, for tests that change state."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    running = start_scenario(upstream, tmp_path / "control")
    try:
        yield running
    finally:
        running.stop()


def api(t: RunningThermostat, method: str, path: str, **kw: object) -> httpx.Response:
    headers = kw.pop("headers", AUTH)
    return httpx.request(method, f"{t.base}{API}{path}", headers=headers, timeout=30, **kw)  # type: ignore[arg-type]


def assert_error_shape(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and "code" in err
    return err
