"""Requests a browser page or a same-host peer can forge, against a real server without a token.

The server opts in with `[admin] allow_unauthenticated` (tests/conftest.make_config), the
setting under which these attacks worked: a cross-site `text/plain` POST, DNS rebinding
(a foreign `Host`), and an `X-Forwarded-For` that uvicorn believed from any loopback peer.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_config
from tests.control.conftest import API, AUTH, assert_error_shape
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat


@pytest.fixture
def open_ctl(upstream: FakeUpstream, tmp_path: Path) -> Iterator[RunningThermostat]:
    """Per test: some roll back and resume, the others assert nothing is rolled back."""
    running = start_thermostat(make_config(upstream.url, tmp_path / "open"))
    yield running
    running.stop()


def rolled_back(t: RunningThermostat) -> bool:
    return bool(t.runtime.rollout.state.rollback.active)


def test_cross_site_text_plain_post_is_refused(open_ctl: RunningThermostat) -> None:
    """What `<form enctype="text/plain">` or `fetch(..., {mode: "no-cors"})` can send without a preflight."""
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
        r = httpx.post(f"{open_ctl.base}{API}/rollback", content=b'{"reason": "csrf"}', headers=headers, timeout=10)
        err = assert_error_shape(r, 415)
        assert err["code"] == "unsupported_media_type"
    assert not rolled_back(open_ctl)


def test_foreign_origin_is_refused_and_own_origin_accepted(open_ctl: RunningThermostat) -> None:
    url = f"{open_ctl.base}{API}/rollback"
    r = httpx.post(url, json={"reason": "csrf"}, headers={"origin": "http://evil.example"}, timeout=10)
    assert assert_error_shape(r, 403)["code"] == "origin_not_allowed"
    assert not rolled_back(open_ctl)
    # the dashboard page is served from the same origin, so its rollback button still works
    r = httpx.post(url, json={"reason": "dashboard"}, headers={"origin": open_ctl.base}, timeout=10)
    assert r.status_code == 200 and rolled_back(open_ctl)
    r = httpx.post(f"{open_ctl.base}{API}/resume", json={}, headers={"origin": open_ctl.base}, timeout=10)
    assert r.status_code == 200 and not rolled_back(open_ctl)


def test_dns_rebinding_host_is_refused(open_ctl: RunningThermostat) -> None:
    """After rebinding, the page's requests reach 127.0.0.1 but carry the attacker's name."""
    r = httpx.get(f"{open_ctl.base}{API}/status", headers={"host": f"rebind.evil.example:{open_ctl.port}"}, timeout=10)
    assert assert_error_shape(r, 403)["code"] == "loopback_only"
    assert httpx.get(f"{open_ctl.base}{API}/status", headers={"host": f"localhost:{open_ctl.port}"}, timeout=10).status_code == 200


def test_forwarded_for_from_a_loopback_peer_is_not_believed(open_ctl: RunningThermostat) -> None:
    """A same-host peer cannot pick the client address the loopback rule sees, in either direction."""
    r = httpx.get(f"{open_ctl.base}{API}/status", headers={"x-forwarded-for": "10.1.2.3"}, timeout=10)
    assert r.status_code == 200  # still 127.0.0.1: the header is ignored, not believed


def test_forwarded_allow_ips_names_the_trusted_proxy(upstream: FakeUpstream, tmp_path: Path) -> None:
    cfg = make_config(upstream.url, tmp_path, server={"data_dir": str(tmp_path), "forwarded_allow_ips": ["127.0.0.1"]})
    t = start_thermostat(cfg)
    try:
        r = httpx.get(f"{t.base}{API}/status", headers={"x-forwarded-for": "10.1.2.3"}, timeout=10)
        assert assert_error_shape(r, 403)["code"] == "loopback_only"  # the proxy's client, believed
        assert httpx.get(f"{t.base}{API}/status", timeout=10).status_code == 200
    finally:
        t.stop()


def test_allowed_hosts_guards_every_path(upstream: FakeUpstream, tmp_path: Path) -> None:
    cfg = make_config(upstream.url, tmp_path, server={"data_dir": str(tmp_path), "allowed_hosts": ["thermostat.internal", "127.0.0.1"]})
    t = start_thermostat(cfg)
    body = {"model": "echo-1", "messages": [{"role": "user", "content": "hi"}]}
    try:
        for method, path, kw in (("GET", "/health", {}), ("GET", "/metrics", {}), ("GET", f"{API}/status", {}),
                                 ("POST", "/v1/chat/completions", {"json": body})):
            r = httpx.request(method, f"{t.base}{path}", headers={"host": "evil.example"}, timeout=10, **kw)  # type: ignore[arg-type]
            assert assert_error_shape(r, 400)["code"] == "invalid_host", path
        assert httpx.post(f"{t.url}/chat/completions", json=body, timeout=10).status_code == 200  # Host 127.0.0.1:port
        r = httpx.get(f"{t.base}{API}/status", headers={"host": f"thermostat.internal:{t.port}"}, timeout=10)
        assert r.status_code == 200  # an allowed name also counts as this machine for the no-token rule
    finally:
        t.stop()


def test_token_server_checks_origin_and_body_type_too(own_ctl: RunningThermostat) -> None:
    ctl = own_ctl  # counts refused calls: a server of its own
    r = httpx.post(f"{ctl.base}{API}/rollback", content=b'{"reason": "x"}', headers={**AUTH, "content-type": "text/plain"}, timeout=10)
    assert_error_shape(r, 415)
    r = httpx.post(f"{ctl.base}{API}/rollback", json={"reason": "x"}, headers={**AUTH, "origin": "http://evil.example"}, timeout=10)
    assert_error_shape(r, 403)
    assert not rolled_back(ctl)


def test_serve_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[upstreams]]\nname = "u"\nbase_url = "http://127.0.0.1:9/v1"\n[admin]\ntoken_env = "THERMOSTAT_UNSET_TOKEN_ENV"\n')
    proc = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--port", "9"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "no admin token in $THERMOSTAT_UNSET_TOKEN_ENV" in proc.stderr and "allow_unauthenticated = true" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, no traceback
