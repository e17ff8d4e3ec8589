"""Hostile input gets a 4xx in the OpenAI shape, never a 500, and cannot pin sockets or memory."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

MESSAGES = [{"role": "user", "content": "hello there"}]
HEAD = b'{"model":"echo-1","messages":[{"role":"user","content":"hi"}]'


@pytest.fixture(scope="module")
def hostile(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    up = {
        "name": "fake", "base_url": upstream.url, "models": ["*"], "timeout_s": 2.0, "connect_timeout_s": 1.0,
        "max_response_bytes": 4096, "models_config": [{"pattern": "capped-*", "max_tokens_limit": 1000}],
    }
    cfg = make_config(
        upstream.url, tmp_path_factory.mktemp("hostile"), upstreams=[up], optimization={"enabled": False},
        server={"data_dir": str(tmp_path_factory.mktemp("hostile-data")), "max_body_bytes": 200_000,
                "header_timeout_s": 0.5, "body_timeout_s": 0.5, "max_connections": 64},
    )
    running = start_thermostat(cfg)
    yield running
    running.stop()


def post(t: RunningThermostat, raw: bytes, path: str = "/chat/completions") -> httpx.Response:
    return httpx.post(f"{t.url}{path}", content=raw, headers={"content-type": "application/json", "authorization": "Bearer sk-x"}, timeout=10)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"} and isinstance(err["message"], str)
    return err


BAD = [
    # (body, code, param)
    (HEAD + b',"max_tokens":' + str(10**30).encode() + b"}", "invalid_value", "max_tokens"),
    (HEAD + b',"max_completion_tokens":9223372036854775808}', "invalid_value", "max_completion_tokens"),
    (HEAD + b',"seed":-9223372036854775809}', "invalid_value", "seed"),
    (b"[" * 100_000, "json_too_deep", None),  # msgspec's own RecursionError
    (HEAD + b',"metadata":' + b"[" * 65 + b"]" * 65 + b"}", "json_too_deep", None),  # 66 levels: over the bound of 64
    (HEAD + b',"temperature":5,"temperature":0.5}', "duplicate_key", "temperature"),
    (HEAD + b',"temperature":0.5,"temp\\u0065rature":5}', "duplicate_key", "temperature"),
    (b'{"model":"echo-1","model":"other","messages":[]}', "duplicate_key", "model"),
    (b'{"model":"capped-1","messages":[],"max_tokens":1001}', "invalid_value", "max_tokens"),
    # Inside the objects whose fields Thermostat reads (issue 21, item 10): compact, spaced and escaped.
    (HEAD + b',"stream_options":{"include_usage":false,"include_usage":true}}', "duplicate_key", "stream_options.include_usage"),
    (HEAD + b', "reasoning": {"effort": "low", "effort": "high"}}', "duplicate_key", "reasoning.effort"),
    (HEAD + b',"output_config":{"effort":"low","\\u0065ffort":"max"}}', "duplicate_key", "output_config.effort"),
]


@pytest.mark.parametrize(("raw", "code", "param"), BAD, ids=[f"{c}-{i}" for i, (_, c, _) in enumerate(BAD)])
def test_hostile_body_is_a_400(hostile: RunningThermostat, upstream: FakeUpstream, raw: bytes, code: str, param: str | None) -> None:
    before = len(upstream.received)
    err = error_of(post(hostile, raw), 400)
    assert (err["code"], err["param"], err["type"]) == (code, param, "invalid_request_error")
    assert len(upstream.received) == before  # nothing was forwarded


def test_duplicate_inside_output_config_is_an_anthropic_400(hostile: RunningThermostat, upstream: FakeUpstream) -> None:
    before = len(upstream.received)
    raw = b'{"model":"claude-x","max_tokens":50,"messages":[],"output_config":{"effort":"low","effort":"max"}}'
    r = post(hostile, raw, "/messages")
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and "output_config.effort" in r.json()["error"]["message"]
    assert len(upstream.received) == before


def test_largest_int64_reaches_the_upstream_unchanged(hostile: RunningThermostat, upstream: FakeUpstream) -> None:
    r = post(hostile, HEAD + b',"max_tokens":9223372036854775807}')
    assert r.status_code == 200, r.text
    assert upstream.last().body["max_tokens"] == 2**63 - 1


def test_model_limit_itself_is_accepted(hostile: RunningThermostat, upstream: FakeUpstream) -> None:
    assert post(hostile, b'{"model":"capped-1","messages":[],"max_tokens":1000}').status_code == 200


def test_repeated_names_below_the_top_level_are_not_duplicates(hostile: RunningThermostat, upstream: FakeUpstream) -> None:
    """A tool schema may well have a `temperature` property in two tools; that is not a repeated field."""
    tool = lambda name: {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {"temperature": {"type": "number"}}}}}  # noqa: E731
    body = {"model": "echo-1", "messages": [{"role": "user", "content": '"temperature" twice: "temperature"'}], "tools": [tool("a"), tool("b")], "temperature": 0.4}
    raw = json.dumps(body).encode()
    r = post(hostile, raw)
    assert r.status_code == 200, r.text
    assert upstream.last().raw == raw  # nothing decided changes it: forwarded byte for byte


def test_405_on_a_decided_path_is_openai_shaped_with_allow(hostile: RunningThermostat) -> None:
    for method in ("GET", "PUT", "DELETE"):
        r = httpx.request(method, f"{hostile.url}/chat/completions", timeout=10)
        err = error_of(r, 405)
        assert err["code"] == "method_not_allowed"
        assert r.headers["allow"] == "POST"


def test_response_above_the_cap_is_relayed_whole_and_counted(hostile: RunningThermostat, upstream: FakeUpstream) -> None:
    counter = hostile.runtime.metrics.unsummarised.labels("fake")
    before = counter._value.get()
    body = {"model": "big-20000", "messages": MESSAGES}
    direct = httpx.post(f"{upstream.url}/chat/completions", json=body, timeout=10)
    proxied = httpx.post(f"{hostile.url}/chat/completions", json=body, timeout=10)
    assert proxied.status_code == 200
    assert len(proxied.content) > 4096
    assert proxied.json() == direct.json()
    assert counter._value.get() == before + 1
    small = httpx.post(f"{hostile.url}/chat/completions", json={"model": "echo-1", "messages": MESSAGES}, timeout=10)
    assert small.status_code == 200 and "content-length" in small.headers
    assert counter._value.get() == before + 1  # below the cap: summarised as before


# ---- slow clients ------------------------------------------------------------------------


def _connect(t: RunningThermostat) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", t.port), timeout=10)
    return s


def _read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket timeout bounds the wait)."""
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def _status_and_error(data: bytes) -> tuple[int, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


def test_slow_clients_are_answered_408_and_closed(hostile: RunningThermostat) -> None:
    silent = [_connect(hostile) for _ in range(3)]
    partial_headers = [_connect(hostile) for _ in range(3)]
    partial_bodies = [_connect(hostile) for _ in range(3)]
    for s in partial_headers:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-ty")
    for path, s in zip((b"/v1/chat/completions", b"/v1/completions", b"/api/optimization/recommend"), partial_bodies, strict=True):
        s.sendall(b"POST " + path + b" HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n" + HEAD)
    try:
        for s in silent + partial_headers:
            status, err = _status_and_error(_read_until_closed(s))
            assert (status, err["code"]) == (408, "request_timeout")
            assert "headers" in err["message"]
        for s in partial_bodies:
            status, err = _status_and_error(_read_until_closed(s))
            assert (status, err["code"]) == (408, "request_timeout")
            assert "body" in err["message"]
    finally:
        for s in silent + partial_headers + partial_bodies:
            s.close()
    # The server is healthy afterwards, and the stalled requests reached nothing.
    assert httpx.post(f"{hostile.url}/chat/completions", json={"model": "echo-1", "messages": MESSAGES}, timeout=10).status_code == 200


def test_kept_alive_connection_gets_a_header_deadline_per_request(hostile: RunningThermostat) -> None:
    s = _connect(hostile)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\nhost")  # the next request stalls mid-headers
        status, err = _status_and_error(_read_until_closed(s))
        assert (status, err["code"]) == (408, "request_timeout")
    finally:
        s.close()


def test_endless_headers_get_431(hostile: RunningThermostat) -> None:
    s = _connect(hostile)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        for i in range(100):  # 100 KiB of headers, never finished
            try:
                s.sendall(b"x-pad-%d: " % i + b"a" * 1024 + b"\r\n")
            except OSError:
                break  # the server already closed the connection
        status, err = _status_and_error(_read_until_closed(s))
        assert (status, err["code"]) == (431, "headers_too_large")
    finally:
        s.close()


def test_connections_beyond_the_limit_get_503(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    cfg = make_config(
        upstream.url, tmp_path_factory.mktemp("limit"), optimization={"enabled": False},
        server={"data_dir": str(tmp_path_factory.mktemp("limit-data")), "header_timeout_s": 30.0, "max_connections": 4},
    )
    t = start_thermostat(cfg)
    held = [_connect(t) for _ in range(4)]
    try:
        with httpx.Client(timeout=10) as client:
            r = client.post(f"{t.url}/chat/completions", json={"model": "echo-1", "messages": MESSAGES})
            err = error_of(r, 503)
            assert err["code"] == "server_busy" and r.headers["retry-after"] == "1"
        for s in held:
            s.close()
        held.clear()
        ok = None
        for _ in range(50):  # the server notices the closed sockets on its next loop turns
            ok = httpx.post(f"{t.url}/chat/completions", json={"model": "echo-1", "messages": MESSAGES}, timeout=10)
            if ok.status_code == 200:
                break
        assert ok is not None and ok.status_code == 200
    finally:
        for s in held:
            s.close()
        t.stop()


def test_one_client_cannot_hold_every_connection(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Idle sockets of one address stop at `max_connections_per_client`; another client is still served (issue 21, item 10).

    Two client addresses on one machine: 127.0.0.2 (the one holding sockets) and 127.0.0.1.
    """
    cfg = make_config(
        upstream.url, tmp_path_factory.mktemp("per-client"), optimization={"enabled": False},
        server={"data_dir": str(tmp_path_factory.mktemp("per-client-data")), "header_timeout_s": 30.0, "max_connections": 24,
                "max_connections_per_client": 8},
    )
    t = start_thermostat(cfg)
    held = [socket.create_connection(("127.0.0.1", t.port), timeout=10, source_address=("127.0.0.2", 0)) for _ in range(30)]
    try:
        refused = [s for s in held[8:]]
        for s in refused:  # answered at once, in the OpenAI shape, and closed
            status, err = _status_and_error(_read_until_closed(s))
            assert (status, err["code"]) == (503, "server_busy") and "max_connections_per_client" in err["message"]
        r = httpx.post(f"{t.url}/chat/completions", json={"model": "echo-1", "messages": MESSAGES}, timeout=10)
        assert r.status_code == 200, r.text
        for s in held[:8]:  # the first eight are still open, waiting for their headers
            s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert _read_until_closed(s).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()
        t.stop()


# ---- each /v1 endpoint's own errors in its own format's shape (issue 21, item 10) ------------------


def test_thermostats_own_errors_on_messages_paths_are_anthropic_shaped(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Refusals made before the format is known (path, Host, protocol deadlines, a dead upstream of a
    passed-through path) used to answer `/v1/messages...` in OpenAI's shape."""
    ups = [
        {"name": "an", "base_url": upstream.url, "format": "anthropic", "models": ["claude-*"], "timeout_s": 2.0, "connect_timeout_s": 1.0},
        {"name": "gone", "base_url": "http://127.0.0.1:9/v1", "format": "anthropic", "models": ["dead-*"], "retries": 0, "connect_timeout_s": 1.0},
        {"name": "oa", "base_url": upstream.url, "models": ["*"], "timeout_s": 2.0, "connect_timeout_s": 1.0},
    ]
    cfg = make_config(upstream.url, tmp_path_factory.mktemp("shapes"), upstreams=ups, optimization={"enabled": False},
                      server={"data_dir": str(tmp_path_factory.mktemp("shapes-data")), "header_timeout_s": 0.5, "body_timeout_s": 0.5,
                              "allowed_hosts": ["127.0.0.1"]})
    t = start_thermostat(cfg)

    def answer(raw: bytes) -> tuple[int, dict]:
        s = _connect(t)
        try:
            s.sendall(raw)
            head, _, body = _read_until_closed(s).partition(b"\r\n\r\n")
            return int(head.split()[1]), json.loads(body)
        finally:
            s.close()

    count = b'{"model":"dead-1","messages":[]}'
    cases = {
        "invalid_path": b"POST /v1/messages/..;/x HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
        "invalid_host": b"POST /v1/messages HTTP/1.1\r\nhost: evil.example\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
        "body_timeout": b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 100\r\n\r\n{",
        "headers_too_large": b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\nx-a: " + b"a" * 70_000 + b"\r\n\r\n",
        "dead_upstream": b"POST /v1/messages/count_tokens HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\nconnection: close\r\n\r\n" % len(count) + count,
    }
    try:
        for name, raw in cases.items():
            status, doc = answer(raw)
            assert status >= 400 and doc.get("type") == "error", (name, status, doc)
            assert set(doc["error"]) == {"type", "message"}, (name, doc)
        status, doc = answer(b"POST /v1/chat/completions/..;/x HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
        assert status == 400 and doc["error"]["code"] == "invalid_path"  # OpenAI's paths keep OpenAI's shape
    finally:
        t.stop()
