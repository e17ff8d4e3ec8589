"""The shipped compose set-up (deploy/), checked without Docker: the files parsed, and the
control API driven with exactly the headers the shipped nginx sends.

Behind nginx the dashboard's Roll back / Resume come with the browser's
`Origin: http://localhost:8080`; Thermostat accepts an Origin only when `Host` names the
same authority, so nginx must pass the Host the browser used (it sends the upstream
block's name, `thermostat`, unless told otherwise).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest
import yaml

from proxy.config import build_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import start_thermostat

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TOKEN_ENV = "THERMOSTAT_DEPLOY_TEST_TOKEN"
TOKEN = "deploy-test-token-0123456789"
BROWSER = "localhost:8080"  # where compose publishes nginx, as the browser addresses it
# nginx's variables for one browser request arriving from the Docker bridge.
NGINX_VARIABLES = {"$http_host": BROWSER, "$host": "localhost", "$proxy_host": "thermostat", "$scheme": "http",
                   "$remote_addr": "172.18.0.1", "$proxy_add_x_forwarded_for": "172.18.0.1"}


def nginx_request_headers(browser: Mapping[str, str]) -> dict[str, str]:
    """The headers nginx.conf's `location /` sends upstream for a browser request.

    nginx passes the client's headers on, except that it sets `Host: $proxy_host` and
    `Connection: close` unless `proxy_set_header` says otherwise; an empty value drops one.
    """
    conf = (DEPLOY / "nginx.conf").read_text()
    block = conf.split("location / {", 1)[1].split("}", 1)[0]
    sent = {k.lower(): v for k, v in browser.items()}
    sent.update({"host": NGINX_VARIABLES["$proxy_host"], "connection": "close"})
    for name, value in re.findall(r"^\s*proxy_set_header\s+(\S+)\s+(.+?);", block, flags=re.M):
        value = value.strip('"')
        for variable, replacement in sorted(NGINX_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            value = value.replace(variable, replacement)
        assert "$" not in value, f"nginx variable not modelled here: {value}"
        if value:
            sent[name.lower()] = value
        else:
            sent.pop(name.lower(), None)
    return sent


def test_nginx_passes_the_browsers_host() -> None:
    sent = nginx_request_headers({"Host": BROWSER, "Origin": f"http://{BROWSER}"})
    assert sent["host"] == BROWSER and sent["x-forwarded-proto"] == "http"


@pytest.fixture
def replica(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """One replica with deploy/thermostat.toml's own settings, its upstream a fake and its log local."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    upstream = FakeUpstream().start()
    doc = tomllib.loads((DEPLOY / "thermostat.toml").read_text())
    doc["server"].update(host="127.0.0.1", data_dir=str(tmp_path))  # start_thermostat picks the port
    doc["upstreams"][0].update(base_url=upstream.url)
    doc["admin"]["token_env"] = TOKEN_ENV
    running = start_thermostat(build_config(doc, environ={}))
    try:
        yield running
    finally:
        running.stop()
        upstream.stop()


def _admin(running, path: str, browser_host: str = BROWSER) -> httpx.Response:  # type: ignore[no-untyped-def]
    """What the dashboard's button sends, as it reaches a replica through nginx."""
    browser = {"Host": browser_host, "Origin": f"http://{browser_host}", "Authorization": f"Bearer {TOKEN}",
               "Content-Type": "application/json"}
    headers = nginx_request_headers(browser)
    body = b'{"reason": "dashboard button"}' if path.endswith("rollback") else b"{}"
    with httpx.Client(timeout=10) as client:
        return client.post(f"{running.base}/api/optimization/{path}", content=body, headers=headers)


def test_dashboard_roll_back_and_resume_work_behind_the_shipped_nginx(replica) -> None:  # type: ignore[no-untyped-def]
    r = _admin(replica, "rollback")
    assert r.status_code == 200, r.text
    status = httpx.get(f"{replica.base}/api/optimization/rollback-status", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert status.json()["active"] is True and status.json()["reason"] == "dashboard button"
    r = _admin(replica, "resume")
    assert r.status_code == 200, r.text


def test_a_page_from_another_origin_is_still_refused_behind_nginx(replica) -> None:  # type: ignore[no-untyped-def]
    browser = {"Host": BROWSER, "Origin": "http://evil.example", "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    r = httpx.post(f"{replica.base}/api/optimization/resume", content=b"{}", headers=nginx_request_headers(browser), timeout=10)
    assert r.status_code == 403 and "origin_not_allowed" in r.text


def _interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` (an unset or empty VAR)."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise ValueError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_monitoring_ports_are_on_loopback_by_default() -> None:
    services = _compose()["services"]
    for name, port in (("prometheus", "9090"), ("grafana", "3000")):
        published = [_interpolate(p, {}) for p in services[name]["ports"]]
        assert published == [f"127.0.0.1:{port}:{port}"], (name, published)
        assert [_interpolate(p, {"MONITORING_BIND": "0.0.0.0"}) for p in services[name]["ports"]] == [f"0.0.0.0:{port}:{port}"]


def test_grafana_needs_an_admin_password_from_the_environment() -> None:
    env = _compose()["services"]["grafana"]["environment"]
    password = env["GF_SECURITY_ADMIN_PASSWORD"]
    with pytest.raises(ValueError, match="GRAFANA_ADMIN_PASSWORD"):
        _interpolate(password, {})
    assert _interpolate(password, {"GRAFANA_ADMIN_PASSWORD": "s3cret"}) == "s3cret"
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED") == "false"


def test_every_service_that_publishes_a_port_is_meant_to() -> None:
    """Only nginx (the clients' entry) publishes on all interfaces; the stores publish nothing."""
    services = _compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            host = _interpolate(port, {}).rsplit(":", 2)
            assert name == "lb" or host[0] == "127.0.0.1", (name, port)
    assert "ports" not in services["postgres"] and "ports" not in services["redis"]
