"""Every control endpoint refuses missing / malformed (401) and wrong (403) tokens; health stays open."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from proxy.app import create_app
from proxy.config import AdminSettings, ConfigError, build_config
from proxy.control import AdminAuth, require_token_or_opt_in
from proxy.control.auth import AuthError, token_id
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


def test_every_endpoint_is_listed_and_guarded(own_ctl: RunningThermostat) -> None:
    ctl = own_ctl  # counts refused calls: a server of its own
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


def test_security_status_shows_token_id_never_token(own_ctl: RunningThermostat) -> None:
    ctl = own_ctl
    url = f"{ctl.base}{API}/status"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer wrong-token"}, timeout=10).status_code == 403
    assert httpx.get(url, headers={"authorization": "Bearer wrong-token"}, timeout=10).status_code == 403
    assert api(ctl, "POST", "/rollback", json={"reason": "one audit row"}).status_code == 200
    r = api(ctl, "GET", "/security-status")
    assert r.status_code == 200
    body = r.json()
    assert TOKEN not in r.text
    assert body["token_id"] == hashlib.sha256(TOKEN.encode()).hexdigest()[:8] == token_id(TOKEN)
    assert body["auth_required"] and not body["loopback_only"]
    assert body["auth_failures"] == {"missing": 1, "malformed": 0, "wrong": 2, "not_loopback": 0, "origin": 0, "content_type": 0}
    assert body["audit_entries"] == 1 == len(ctl.call(ctl.runtime.sink.fetch_audit()))


def test_no_token_means_loopback_only() -> None:
    auth = AdminAuth("UNSET_TOKEN_ENV_FOR_TEST", environ={})
    assert auth.check({"host": "127.0.0.1:8080"}, "127.0.0.1") == "loopback"
    assert auth.check({"host": "[::1]:8080"}, "::1") == "loopback"
    assert auth.check({"host": "LOCALHOST"}, "127.0.0.1") == "loopback"
    with pytest.raises(AuthError) as exc:
        auth.check({"host": "127.0.0.1", "authorization": f"Bearer {TOKEN}"}, "10.1.2.3")
    assert exc.value.status == 403
    with pytest.raises(AuthError):
        auth.check({"host": "127.0.0.1"}, None)


@pytest.mark.parametrize("host", ["rebound.example.com:8080", "10.0.0.5:8080", "127.0.0.1.nip.io", None])
def test_no_token_refuses_a_host_that_is_not_this_machine(host: str | None) -> None:
    """DNS rebinding: the browser connects to 127.0.0.1 but names the attacker's host."""
    auth = AdminAuth("UNSET_TOKEN_ENV_FOR_TEST", environ={})
    with pytest.raises(AuthError) as exc:
        auth.check({} if host is None else {"host": host}, "127.0.0.1")
    assert (exc.value.status, exc.value.code) == (403, "loopback_only")
    pinned = AdminAuth("UNSET_TOKEN_ENV_FOR_TEST", environ={}, allowed_hosts=("thermostat.internal",))
    assert pinned.check({"host": "thermostat.internal:8080"}, "127.0.0.1") == "loopback"


@pytest.mark.parametrize(
    ("origin", "host", "ok"),
    [
        (None, "127.0.0.1:8080", True),
        ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
        ("https://thermostat.example.com", "thermostat.example.com", True),  # TLS ends at a proxy in front
        ("http://localhost:8080", "localhost:8080", True),
        ("https://admin.example.com", "127.0.0.1:8080", True),  # [admin] allowed_origins
        ("http://evil.example", "127.0.0.1:8080", False),
        ("http://127.0.0.1:9999", "127.0.0.1:8080", False),  # another local app on another port
        ("null", "127.0.0.1:8080", False),  # sandboxed iframe, file://
        ("http://127.0.0.1:8080", None, False),
    ],
)
def test_origin_must_be_own_or_allowed(origin: str | None, host: str | None, ok: bool) -> None:
    auth = AdminAuth("T", environ={"T": "abc"}, allowed_origins=("https://Admin.example.com:443/",))
    headers = {k: v for k, v in (("origin", origin), ("host", host)) if v is not None}
    if ok:
        auth.check_origin(headers)
        return
    with pytest.raises(AuthError) as exc:
        auth.check_origin(headers)
    assert (exc.value.status, exc.value.code) == (403, "origin_not_allowed")
    assert auth.stats()["origin"] == 1


@pytest.mark.parametrize(
    ("method", "headers", "ok"),
    [
        ("GET", {}, True),
        ("POST", {"content-type": "application/json"}, True),
        ("POST", {"content-type": "Application/JSON; charset=utf-8", "content-length": "2"}, True),
        ("DELETE", {}, True),
        ("POST", {}, False),  # an empty form POST
        ("POST", {"content-type": "text/plain", "content-length": "20"}, False),  # the CSRF body a page can send
        ("POST", {"content-type": "application/x-www-form-urlencoded", "content-length": "5"}, False),
        ("POST", {"content-type": "application/json-patch+json", "content-length": "5"}, False),
        ("DELETE", {"content-type": "text/plain", "content-length": "3"}, False),
    ],
)
def test_bodies_must_be_declared_json(method: str, headers: dict[str, str], ok: bool) -> None:
    auth = AdminAuth("T", environ={"T": "abc"})
    if ok:
        auth.check_content_type(method, headers)
        return
    with pytest.raises(AuthError) as exc:
        auth.check_content_type(method, headers)
    assert (exc.value.status, exc.value.code) == (415, "unsupported_media_type")


def test_serving_without_a_token_needs_an_explicit_opt_in() -> None:
    with pytest.raises(ConfigError, match=r"no admin token in \$ADMIN_T: .*allow_unauthenticated = true"):
        require_token_or_opt_in(AdminSettings(token_env="ADMIN_T"), environ={"ADMIN_T": "  "})
    require_token_or_opt_in(AdminSettings(token_env="ADMIN_T"), environ={"ADMIN_T": "secret-0123456789"})
    require_token_or_opt_in(AdminSettings(token_env="ADMIN_T", allow_unauthenticated=True), environ={})


@pytest.mark.parametrize("token", ["x", "secret", "fifteen-chars-x"])
def test_a_short_admin_token_is_a_config_error(token: str) -> None:
    """A one-character token used to be accepted (issue 21, item 10); opting out of auth does not excuse it."""
    for admin in (AdminSettings(token_env="ADMIN_T"), AdminSettings(token_env="ADMIN_T", allow_unauthenticated=True)):
        with pytest.raises(ConfigError, match=rf"admin token in \$ADMIN_T has {len(token)} characters; at least 16"):
            require_token_or_opt_in(admin, environ={"ADMIN_T": token})
    require_token_or_opt_in(AdminSettings(token_env="ADMIN_T"), environ={"ADMIN_T": token.ljust(16, "0")})


def test_create_app_refuses_without_token(tmp_path: Path) -> None:
    """The check lives in the composition root, so `serve`, each worker and tests all obey it."""
    cfg = build_config({"server": {"data_dir": str(tmp_path)}, "admin": {"token_env": "THERMOSTAT_UNSET_TOKEN_ENV"}}, environ={})
    with pytest.raises(ConfigError, match="allow_unauthenticated"):
        create_app(cfg)


def test_token_auth_statuses() -> None:
    auth = AdminAuth("T", environ={"T": "abc"})
    assert auth.check({"authorization": "Bearer abc"}, "10.0.0.1") == f"token:{token_id('abc')}"
    for header, status in ((None, 401), ("Bearer", 401), ("Token abc", 401), ("Bearer abd", 403), ("Bearer abc extra", 401)):
        with pytest.raises(AuthError) as exc:
            auth.check({} if header is None else {"authorization": header}, "127.0.0.1")
        assert exc.value.status == status, header


def test_auth_header_constant(ctl: RunningThermostat) -> None:
    assert api(ctl, "GET", "/status", headers=AUTH).status_code == 200


# Statuses an operation documents beyond the generic ones, each with the test that produces it.
SPECIFIC = {
    ("GET", "/health/readiness"): {503},  # test_statuses.py
    ("GET", f"{API}/health"): {503},  # test_statuses.py
    ("POST", f"{API}/record-outcome"): {404, 409},  # test_values.py
    ("POST", f"{API}/resume"): {409},  # test_statuses.py
    ("POST", f"{API}/waivers"): {422},  # test_bad_bodies.py
    ("DELETE", f"{API}/waivers/{{waiver_id}}"): {404},  # test_values.py
    ("POST", f"{API}/recommend"): {404},  # test_statuses.py
    ("POST", f"{API}/test-shadow"): {404},  # test_statuses.py
    ("POST", f"{API}/judge/unmute"): {404},  # tests/integration/test_judge_length_bias.py
}


def test_documented_statuses_are_the_ones_returned(own_ctl: RunningThermostat) -> None:
    """400 everywhere (a disallowed Host, test_forgery.py), 401/403 exactly where the token is
    required (and then returned, above), 503 there too (a store down, test_statuses.py), 415 on every operation that takes a body (checked here)."""
    ctl = own_ctl  # counts refused calls: a server of its own
    schema = httpx.get(f"{ctl.base}/schema/openapi.json", timeout=10).json()
    assert "security" not in schema  # no document-wide requirement: public operations are public
    for path, item in schema["paths"].items():
        for method, op in item.items():
            key = (method.upper(), path)
            codes = {int(c) for c in op["responses"] if not c.startswith("2")}
            secured = op.get("security") == [{"bearer": []}]
            assert secured == (path.startswith(API) and path != f"{API}/health"), key
            expected = {400} | ({401, 403, 503} if secured else set()) | ({415} if method != "get" else set()) | SPECIFIC.get(key, set())
            assert codes == expected, (key, codes, expected)
            if method != "get":
                url = f"{ctl.base}{path.replace('{waiver_id}', 'WV-9999')}"
                r = httpx.request(method.upper(), url, content=b"{}", headers={**AUTH, "content-type": "text/plain"}, timeout=10)
                assert_error_shape(r, 415)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("server", "allowed_hosts", ["example.com:8080"]),
        ("server", "allowed_hosts", ["http://example.com"]),
        ("server", "forwarded_allow_ips", ["*"]),
        ("server", "forwarded_allow_ips", ["proxy.internal"]),
        ("admin", "allowed_origins", ["admin.example.com"]),
        ("admin", "allowed_origins", ["https://admin.example.com/path"]),
    ],
)
def test_security_settings_are_validated_in_one_line(section: str, key: str, value: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        build_config({section: {key: value}}, environ={})
    assert str(exc.value).startswith(f"invalid value for '{section}.{key}'") and "\n" not in str(exc.value)


def test_security_settings_accept_what_they_document() -> None:
    cfg = build_config({"server": {"allowed_hosts": ["Thermostat.Internal", "[::1]", "10.0.0.5"],
                                   "forwarded_allow_ips": ["10.0.0.0/8", "127.0.0.1"]},
                        "admin": {"allowed_origins": ["https://admin.example.com", "http://127.0.0.1:3000"]}}, environ={})
    auth = AdminAuth.from_settings(cfg.admin, cfg.server.allowed_hosts, environ={})
    assert {"thermostat.internal", "::1", "10.0.0.5"} <= auth.local_hosts
    assert auth.allowed_origins == {"https://admin.example.com", "http://127.0.0.1:3000"}
