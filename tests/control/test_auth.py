"""Every control endpoint refuses missing / malformed (401) and wrong (403) tokens; health stays open."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from proxy.auth import AdminAuth, AuthError, token_id
from tests.control.conftest import API, AUTH, TOKEN, api, assert_error_shape
from tests.support.servers import RunningThermostat


def operations(t: RunningThermostat) -> list[tuple[str, str]]:
    schema = httpx.get(f"{t.base}/schema/openapi.json", timeout=10).json()
    ops = []
    for path, item in schema["paths"].items():
        if not path.startswith(API) or path == f"{API}/health":
            continue
        for method in item:
            ops.append((method.upper(), path.replace("{waiver_id}", "WV-9999")))
    return ops


def test_every_endpoint_is_listed_and_guarded(ctl: RunningThermostat) -> None:
    ops = operations(ctl)
    paths = {p for _, p in ops}
    for name in ("status", "metrics", "performance", "slo-status", "rollout-status", "convergence", "parameter-evolution", "dashboard",
                 "rollback", "rollback-status", "resume", "baseline-parameters", "recommend", "record-outcome", "test-shadow", "waivers",
                 "caws-status", "ope", "audit-logs", "logs", "db-status", "security-status", "compliance-status"):
        assert f"{API}/{name}" in paths, name
    assert len(ops) >= 25
    before = ctl.runtime.rollout.state.rollback
    for method, path in ops:
        url = f"{ctl.base}{path}"
        err = assert_error_shape(httpx.request(method, url, timeout=10), 401)
        assert err["type"] == "authentication_error" and err["code"] == "missing_token"
        err = assert_error_shape(httpx.request(method, url, headers={"authorization": "Basic dXNlcjpwYXNz"}, timeout=10), 401)
        assert err["code"] == "invalid_authorization"
        err = assert_error_shape(httpx.request(method, url, headers={"authorization": "Bearer"}, timeout=10), 401)
        err = assert_error_shape(httpx.request(method, url, headers={"authorization": "Bearer wrong-token"}, timeout=10), 403)
        assert err["type"] == "permission_error" and err["code"] == "invalid_token"
    assert ctl.runtime.rollout.state.rollback == before  # nothing mutated without a token


def test_health_is_public_and_readiness_checks(ctl: RunningThermostat) -> None:
    assert httpx.get(f"{ctl.base}/health").status_code == 200
    r = httpx.get(f"{ctl.base}{API}/health")
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] is True
    assert {c["name"] for c in body["checks"]} == {"upstreams", "database", "state_store", "writer_queue"}


def test_security_status_shows_token_id_never_token(ctl: RunningThermostat) -> None:
    r = api(ctl, "GET", "/security-status")
    assert r.status_code == 200
    body = r.json()
    assert TOKEN not in r.text
    assert body["token_id"] == hashlib.sha256(TOKEN.encode()).hexdigest()[:8] == token_id(TOKEN)
    assert body["auth_required"] and not body["loopback_only"]
    assert body["auth_failures"]["wrong"] >= 1 or body["auth_failures"]["missing"] >= 0


def test_no_token_means_loopback_only() -> None:
    auth = AdminAuth("UNSET_TOKEN_ENV_FOR_TEST", environ={})
    assert auth.check({}, "127.0.0.1") == "loopback"
    assert auth.check({}, "::1") == "loopback"
    with pytest.raises(AuthError) as exc:
        auth.check({"authorization": f"Bearer {TOKEN}"}, "10.1.2.3")
    assert exc.value.status == 403
    with pytest.raises(AuthError):
        auth.check({}, None)


def test_token_auth_statuses() -> None:
    auth = AdminAuth("T", environ={"T": "abc"})
    assert auth.check({"authorization": "Bearer abc"}, "10.0.0.1") == f"token:{token_id('abc')}"
    for header, status in ((None, 401), ("Bearer", 401), ("Token abc", 401), ("Bearer abd", 403), ("Bearer abc extra", 401)):
        with pytest.raises(AuthError) as exc:
            auth.check({} if header is None else {"authorization": header}, "127.0.0.1")
        assert exc.value.status == status, header


def test_auth_header_constant(ctl: RunningThermostat) -> None:
    assert api(ctl, "GET", "/status", headers=AUTH).status_code == 200
