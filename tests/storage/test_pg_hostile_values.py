"""Values PostgreSQL cannot hold get a 400, never a 500 or an answered request without its row (issue 21, items 7 and 8).

A model name with NUL was answered 200 while PostgreSQL refused its decision row (73
answered, 72 logged); the control API's `since=-1e308` or `1e20` and a NUL in a
`task_type` filter were 500s. Real app on loopback in front of the fake upstream, real
PostgreSQL, the official SDKs where they can send the value, raw sockets where they cannot.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import anthropic
import asyncpg
import httpx
import openai
import pytest

from proxy.config import build_config
from tests.integration.test_path_confinement import raw_request
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

USER = [{"role": "user", "content": "alpha beta"}]
API = "/api/optimization"


@pytest.fixture(scope="module")
def on_pg(upstream: FakeUpstream, pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    cfg = build_config(
        {
            "server": {"data_dir": str(tmp_path_factory.mktemp("pg-hostile"))},
            "upstreams": [
                {"name": "oa", "base_url": upstream.url, "models": ["*"]},
                {"name": "an", "base_url": upstream.url, "format": "anthropic", "models": ["claude-*"]},
            ],
            "storage": {"database_url": pg_dsn, "flush_interval_s": 0.05},
            "optimization": {"mode": "general", "seed": 2},
            "admin": {"allow_unauthenticated": True},
        },
        environ={},
    )
    running = start_thermostat(cfg)
    yield running
    running.stop()


def _logged(pg_dsn: str) -> set[str]:
    async def go() -> set[str]:
        conn = await asyncpg.connect(pg_dsn)
        try:
            return {str(r["request_id"]) for r in await conn.fetch("SELECT request_id FROM logged_decisions")}
        finally:
            await conn.close()

    return asyncio.run(go())


def test_every_answered_request_is_logged_and_nul_is_a_400(on_pg: RunningThermostat, upstream: FakeUpstream, pg_dsn: str) -> None:
    oa = openai.OpenAI(base_url=on_pg.url, api_key="sk-test", max_retries=0, timeout=10)
    an = anthropic.Anthropic(base_url=on_pg.base, api_key="sk-ant-test", max_retries=0, timeout=10)
    answered: list[str] = []
    before = len(upstream.received)
    for i in range(6):
        r = oa.chat.completions.with_raw_response.create(model="echo-1", messages=USER, user=f"u{i}")  # type: ignore[arg-type]
        answered.append(r.headers["x-request-id"])
    with pytest.raises(openai.BadRequestError) as info:
        oa.chat.completions.create(model="echo-1\u0000evil", messages=USER)  # type: ignore[arg-type]
    assert (info.value.code, info.value.param) == ("invalid_model", "model")
    with pytest.raises(openai.BadRequestError):
        oa.responses.create(model="echo\u0000", input="alpha")
    with pytest.raises(anthropic.BadRequestError) as an_info:
        an.messages.create(model="claude-\u0000x", messages=USER, max_tokens=20)  # type: ignore[arg-type]
    assert an_info.value.body["type"] == "error"  # type: ignore[index]  # Anthropic's own shape
    # NUL in the x-task-type header: the HTTP layer refuses it before Thermostat (the edge would too).
    body = json.dumps({"model": "echo-1", "messages": USER}).encode()
    status, _, payload = raw_request(on_pg.port, "POST", "/v1/chat/completions", {"content-type": "application/json", "x-task-type": "a\x00b"}, body)
    assert status == 400, payload
    assert len(upstream.received) == before + 6  # nothing refused was forwarded
    r = oa.chat.completions.with_raw_response.create(model="echo-1", messages=USER)  # type: ignore[arg-type]
    answered.append(r.headers["x-request-id"])
    on_pg.flush(settle_s=0.3)
    assert set(answered) <= _logged(pg_dsn)


@pytest.mark.parametrize(
    "query",
    [
        "/logs?since=-1e308",
        "/logs?since=1e20",
        "/logs?until=1e20",
        "/logs?since=nan",
        "/logs?since=inf",
        "/logs?task_type=a%00b",
        "/logs?mode=a%00b",
        "/metrics?task_type=a%00b",
        "/quality?task_type=a%00b",
        "/performance?task_type=a%00b",
    ],
)
def test_control_api_refuses_values_postgresql_cannot_hold(on_pg: RunningThermostat, query: str) -> None:
    r = httpx.get(f"{on_pg.base}{API}{query}", timeout=10)
    assert r.status_code == 400, (query, r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err


def test_control_api_keeps_answering_ordinary_filters(on_pg: RunningThermostat) -> None:
    for query in ("/logs?since=0", "/logs?since=1700000000.5&task_type=default", "/metrics?task_type=default", "/quality?task_type=x"):
        assert httpx.get(f"{on_pg.base}{API}{query}", timeout=10).status_code == 200, query
