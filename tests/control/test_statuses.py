"""The error statuses the OpenAPI document lists beyond 400/401/403/415, produced for real.

test_auth.test_documented_statuses_are_the_ones_returned pins the document to this list.
Two servers: one whose state store (Redis on a port nobody listens on) is unreachable and
whose only upstream serves `echo-*`, one with no upstream and optimisation disabled.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import make_config
from tests.control.conftest import API, assert_error_shape
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import free_port, start_thermostat


def test_store_down_and_unrouted_model(upstream: FakeUpstream, tmp_path: Path) -> None:
    cfg = make_config(upstream.url, tmp_path,
                      upstreams=[{"name": "fake", "base_url": upstream.url, "models": ["echo-*"]}],
                      storage={"flush_interval_s": 0.05, "redis_url": f"redis://127.0.0.1:{free_port()}/0", "redis_timeout_s": 0.3},
                      caws={"store_timeout_s": 0.3})
    t = start_thermostat(cfg)
    try:
        r = httpx.get(f"{t.base}{API}/health", timeout=10)
        assert r.status_code == 503 and {c["name"]: c["ok"] for c in r.json()["checks"]}["state_store"] is False
        assert assert_error_shape(httpx.get(f"{t.base}{API}/caws-status", timeout=10), 503)["code"] == "budget_store_unavailable"
        for path in ("/recommend", "/test-shadow"):
            r = httpx.post(f"{t.base}{API}{path}", json={"context": {"model": "gpt-unrouted"}}, timeout=10)
            assert assert_error_shape(r, 404)["code"] == "model_not_found"
    finally:
        t.stop()


def test_log_store_down_is_503_not_500(upstream: FakeUpstream, tmp_path: Path) -> None:
    """PostgreSQL unreachable from the start: the proxy still serves (rows spool locally), and
    reads of the log answer 503 with a retry hint, in the error shape, never 500."""
    cfg = make_config(upstream.url, tmp_path,
                      storage={"flush_interval_s": 0.05, "database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/test"})
    t = start_thermostat(cfg)
    try:
        r = httpx.post(f"{t.url}/chat/completions", json={"model": "echo-1", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        assert r.status_code == 200, r.text
        for path in ("/logs", "/metrics", "/performance"):
            r = httpx.get(f"{t.base}{API}{path}", timeout=10)
            assert assert_error_shape(r, 503)["code"] == "log_store_unavailable", path
            assert r.headers["retry-after"] == "5"
    finally:
        t.stop()


def test_no_upstream_and_optimisation_disabled(upstream: FakeUpstream, tmp_path: Path) -> None:
    t = start_thermostat(make_config(upstream.url, tmp_path, upstreams=[], optimization={"enabled": False}))
    try:
        r = httpx.get(f"{t.base}/health/readiness", timeout=10)
        assert r.status_code == 503 and r.json() == {"status": "not_ready", "checks": {"upstreams": False, "writer": True, "log_writes": True}}
        assert httpx.get(f"{t.base}{API}/health", timeout=10).status_code == 503
        assert assert_error_shape(httpx.post(f"{t.base}{API}/resume", json={}, timeout=10), 409)["code"] == "optimization_disabled"
    finally:
        t.stop()
