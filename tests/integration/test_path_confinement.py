"""Forwarding stays inside the upstream's API, and the operator's key goes only where allowed.

Requests are written on a raw socket (as `curl --path-as-is` does) because HTTP
clients normalise `..` away before sending, which would hide the attack.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from proxy.common import PathFilter, ProxyError, confine_v1_path, url_within_base
from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

OPERATOR_KEY = "sk-operator-secret-123"


def raw_request(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    head = [f"{method} {path} HTTP/1.1", f"host: 127.0.0.1:{port}", "connection: close", f"content-length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_raw, _, payload = data.partition(b"\r\n\r\n")
    lines = head_raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, hdrs, payload


@pytest.fixture
def keyed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[RunningThermostat, FakeUpstream]]:
    monkeypatch.setenv("THERMOSTAT_TEST_OPERATOR_KEY", OPERATOR_KEY)
    fake = FakeUpstream().start()
    cfg = make_config(fake.url, tmp_path, optimization={"enabled": False})
    up = cfg.upstreams[0]
    cfg = type(cfg)(**{**{f: getattr(cfg, f) for f in cfg.__struct_fields__},
                       "upstreams": (type(up)(**{**{f: getattr(up, f) for f in up.__struct_fields__}, "api_key_env": "THERMOSTAT_TEST_OPERATOR_KEY"}),)})
    running = start_thermostat(cfg)
    try:
        yield running, fake
    finally:
        running.stop()
        fake.stop()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../admin/secret",
        "/v1/%2e%2e/admin/secret",
        "/v1/%2E%2E/admin/secret",
        "/v1/models/../../admin/secret",
        "/v1/./models",
        "/v1/models%2f..%2f..%2fadmin",
        "/v1/models%5c..%5cadmin",
        "/v1/models\\..\\admin",
        "/v1/%252e%252e/admin/secret",
        "/v1//models",
        "/v1/models/%00abc",
        "/v1/models/a%0d%0aX-Injected:%201",
    ],
)
def test_escaping_paths_refused_before_routing(keyed: tuple[RunningThermostat, FakeUpstream], path: str) -> None:
    running, fake = keyed
    before = len(fake.received)
    status, hdrs, payload = raw_request(running.port, "GET", path, {"authorization": "Bearer sk-client"})
    assert status == 400, (path, status, payload)
    assert hdrs["content-type"] == "application/json"
    assert json.loads(payload)["error"]["code"] == "invalid_path"
    assert len(fake.received) == before  # nothing, and above all not the operator's key, left


@pytest.mark.parametrize("path", ["/v1/files", "/v1/fine_tuning/jobs", "/v1/organization/users", "/v1/admin/secret", "/v1/batches"])
def test_unlisted_paths_get_404_path_not_forwarded(keyed: tuple[RunningThermostat, FakeUpstream], path: str) -> None:
    running, fake = keyed
    before = len(fake.received)
    status, _, payload = raw_request(running.port, "GET", path)
    error = json.loads(payload)["error"]
    assert status == 404 and error["code"] == "path_not_forwarded"
    assert "/chat/completions" in error["message"] and "forward_paths" in error["message"]
    assert len(fake.received) == before


def test_sdk_sees_not_found_for_unlisted_path(keyed: tuple[RunningThermostat, FakeUpstream]) -> None:
    running, _ = keyed
    client = openai.OpenAI(base_url=running.url, api_key="sk-client", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.files.list()
    assert info.value.code == "path_not_forwarded"


def test_listed_paths_carry_the_operator_key_only(keyed: tuple[RunningThermostat, FakeUpstream]) -> None:
    running, fake = keyed
    client = openai.OpenAI(
        base_url=running.url, api_key="sk-client", max_retries=0, organization="org-client", project="proj-client",
        default_headers={"api-key": "azure-client-key", "x-api-key": "anthropic-client-key", "x-custom": "kept"},
    )
    client.chat.completions.create(model="echo-1", messages=[{"role": "user", "content": "hi"}])
    headers = {k.lower(): v for k, v in fake.last().headers.items()}
    assert headers["authorization"] == f"Bearer {OPERATOR_KEY}"
    for name in ("api-key", "x-api-key", "openai-organization", "openai-project"):
        assert name not in headers
    assert headers["x-custom"] == "kept"
    client.models.list()
    assert fake.last().path == "/v1/models"
    assert {k.lower(): v for k, v in fake.last().headers.items()}["authorization"] == f"Bearer {OPERATOR_KEY}"


def test_operator_can_list_more_paths_and_keep_client_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THERMOSTAT_TEST_OPERATOR_KEY", OPERATOR_KEY)
    fake = FakeUpstream().start()
    try:
        cfg = make_config(fake.url, tmp_path, optimization={"enabled": False})
        doc_up = {f: getattr(cfg.upstreams[0], f) for f in cfg.upstreams[0].__struct_fields__}
        doc_up.update(api_key_env="THERMOSTAT_TEST_OPERATOR_KEY", forward_paths=("/chat/completions", "/files*"), forward_client_credentials=True)
        cfg = type(cfg)(**{**{f: getattr(cfg, f) for f in cfg.__struct_fields__}, "upstreams": (type(cfg.upstreams[0])(**doc_up),)})
        running = start_thermostat(cfg)
        try:
            r = httpx.get(f"{running.url}/files", headers={"openai-organization": "org-1"})
            # the fake upstream has no /files: its own 404 comes back, not Thermostat's refusal
            assert fake.last().path == "/v1/files" and r.json()["error"]["message"] == "not found"
            assert {k.lower(): v for k, v in fake.last().headers.items()}["openai-organization"] == "org-1"
            status, _, payload = raw_request(running.port, "GET", "/v1/models")
            assert status == 404 and json.loads(payload)["error"]["code"] == "path_not_forwarded"
        finally:
            running.stop()
    finally:
        fake.stop()


def test_confine_unit() -> None:
    assert confine_v1_path(b"/v1/chat/completions", "/v1/chat/completions") == "/chat/completions"
    assert confine_v1_path(b"/v1/models/", "/v1/models/") == "/models"  # one trailing '/' names the same path
    assert confine_v1_path(b"/v1/messages/", "/v1/messages/") == "/messages"
    assert confine_v1_path(b"/v1/models/ft%3Agpt-4o", "/v1/models/ft:gpt-4o") == "/models/ft:gpt-4o"
    for raw, decoded in [(b"/v1/..", "/v1/.."), (b"/v1/a/..", "/v1/a/.."), (b"/v1/%2e", "/v1/."), (b"/v1/..;/x", "/v1/..;/x"),
                         (b"/v1/models/..;", "/v1/models/..;"), (b"/v1/.;a/x", "/v1/.;a/x")]:
        with pytest.raises(ProxyError):
            confine_v1_path(raw, decoded)


def test_url_within_base_unit() -> None:
    assert url_within_base("http://h:1/v1", "/chat/completions")
    assert url_within_base("https://api.example.com/openai/v1", "/models/x")
    assert not url_within_base("http://h:1/v1", "/../admin")
    assert not url_within_base("http://h:1/v1", "/a/../../admin")
    assert not url_within_base("http://h:1/v1", "/..")
    assert not url_within_base("http://h:1/v1", "/../v1x")


def test_path_filter_unit() -> None:
    filt = PathFilter(("/chat/completions", "/responses/*", "/models*"))
    assert filt.allows("POST", "/chat/completions") and filt.allows("POST", "/responses/resp_1/cancel") and filt.allows("GET", "/models/x")
    assert not filt.allows("POST", "/chat/completions/x") and not filt.allows("GET", "/files") and not filt.allows("POST", "/responses")
    assert not PathFilter(()).allows("POST", "/chat/completions")
    by_method = PathFilter(("GET /models", "GET /models/*", "POST /embeddings"))
    assert by_method.allows("GET", "/models/x") and by_method.allows("POST", "/embeddings")
    assert not by_method.allows("DELETE", "/models/x") and not by_method.allows("GET", "/embeddings")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/..;/admin/secret"),
        ("GET", "/v1/models/..;/..;/admin"),
        ("POST", "/v1/chat/completions/..;"),
        ("GET", "/v1/%2e%2e;/admin"),
    ],
)
def test_dotdot_semicolon_segments_are_refused(keyed: tuple[RunningThermostat, FakeUpstream], method: str, path: str) -> None:
    """`..;` is `..` to servers that read `;` as a path parameter (issue 21, item 10)."""
    running, fake = keyed
    before = len(fake.received)
    status, _, payload = raw_request(running.port, method, path, {"authorization": "Bearer sk-client"})
    assert status == 400 and json.loads(payload)["error"]["code"] == "invalid_path", (path, status, payload)
    assert len(fake.received) == before


# ---- what is forwarded by default (issue 21, item 4) ----------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/responses/resp_other_client"),  # another client's stored response
        ("DELETE", "/v1/responses/resp_other_client"),
        ("POST", "/v1/responses/resp_other_client/cancel"),
        ("DELETE", "/v1/models/ft:gpt-4o:acme"),  # deleting a fine-tuned model with the operator's key
        ("POST", "/v1/models/echo-1"),
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/audio/speech"),
        ("POST", "/v1/messages/batches"),
        ("GET", "/v1/messages/batches"),
        ("GET", "/v1/messages/batches/msgbatch_1/results"),
        ("DELETE", "/v1/messages/batches/msgbatch_1"),
    ],
)
def test_default_forwards_neither_stored_data_nor_admin_calls(keyed: tuple[RunningThermostat, FakeUpstream], method: str, path: str) -> None:
    running, fake = keyed
    before = len(fake.received)
    status, hdrs, payload = raw_request(running.port, method, path, {"authorization": "Bearer sk-client", "content-type": "application/json"},
                                        b'{"model":"echo-1"}' if method == "POST" else b"")
    assert status == 404, (method, path, status, payload)
    doc = json.loads(payload)
    code = doc["error"]["type"] if path.startswith("/v1/messages/") else doc["error"]["code"]
    assert code in ("path_not_forwarded", "not_found_error")
    if path.startswith("/v1/messages/"):
        assert doc["type"] == "error"  # Anthropic's shape on its own paths
    assert len(fake.received) == before


def test_default_forwards_inference_and_listing(keyed: tuple[RunningThermostat, FakeUpstream]) -> None:
    running, fake = keyed
    client = openai.OpenAI(base_url=running.url, api_key="sk-client", max_retries=0)
    assert [m.id for m in client.models.list()]
    assert client.models.retrieve("echo-1").id == "echo-1"
    assert client.embeddings.create(model="echo-1", input="alpha").usage.total_tokens == 2
    with pytest.raises(openai.NotFoundError) as info:  # the fake upstream has no moderations: its own 404, not a refusal
        client.moderations.create(input="alpha")
    assert info.value.code is None and fake.last().path == "/v1/moderations"


def test_anthropic_upstream_never_gets_the_clients_authorization(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `forward_client_credentials = true` an Anthropic upstream still gets only the operator's key (issue 21, item 10)."""
    monkeypatch.setenv("THERMOSTAT_TEST_OPERATOR_KEY", OPERATOR_KEY)
    fake = FakeUpstream().start()
    try:
        up = {"name": "an", "base_url": fake.url, "format": "anthropic", "models": ["*"], "api_key_env": "THERMOSTAT_TEST_OPERATOR_KEY",
              "forward_client_credentials": True}
        running = start_thermostat(make_config(fake.url, tmp_path, optimization={"enabled": False}, upstreams=[up]))
        try:
            client = anthropic.Anthropic(base_url=running.base, auth_token="client-bearer", max_retries=0,  # sent as Authorization: Bearer
                                         default_headers={"openai-organization": "org-kept"})
            client.messages.create(model="claude-x", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
            headers = {k.lower(): v for k, v in fake.last().headers.items()}
            assert headers["x-api-key"] == OPERATOR_KEY
            assert "authorization" not in headers
            assert headers["openai-organization"] == "org-kept"  # the other credential headers stay, as configured
        finally:
            running.stop()
    finally:
        fake.stop()
