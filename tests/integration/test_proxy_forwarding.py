"""The proxy seen through the official openai SDK: identical answers, faithful errors."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid

import httpx
import openai
import pytest

from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

MESSAGES = [{"role": "user", "content": "hello there general kenobi"}]


def sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="sk-test-secret", max_retries=0, timeout=10)


def test_non_streaming_identical_to_direct(thermostat: RunningThermostat, upstream: FakeUpstream) -> None:
    direct = sdk(upstream.url).chat.completions.create(model="echo-1", messages=MESSAGES, temperature=0.3)
    proxied = sdk(thermostat.url).chat.completions.create(model="echo-1", messages=MESSAGES, temperature=0.3)
    assert proxied.model_dump() == direct.model_dump()
    uuid.UUID(proxied._request_id)  # Thermostat's own id, readable by SDK users


def test_legacy_completions_identical(thermostat: RunningThermostat, upstream: FakeUpstream) -> None:
    direct = sdk(upstream.url).completions.create(model="echo-1", prompt="say hi", max_tokens=5)
    proxied = sdk(thermostat.url).completions.create(model="echo-1", prompt="say hi", max_tokens=5)
    assert proxied.model_dump() == direct.model_dump()


async def test_async_streaming_chunks_identical(thermostat: RunningThermostat, upstream: FakeUpstream) -> None:
    async def collect(url: str) -> list[dict]:
        client = openai.AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0)
        stream = await client.chat.completions.create(model="echo-1", messages=MESSAGES, stream=True)
        chunks = [c.model_dump() async for c in stream]
        await client.close()
        return chunks

    direct = await collect(upstream.url)
    proxied = await collect(thermostat.url)
    assert proxied == direct
    assert all(c["usage"] is None for c in proxied)  # Thermostat's usage request is invisible
    # ...but the upstream was asked for usage, so tokens get counted
    assert upstream.last().body["stream_options"] == {"include_usage": True}


def test_stream_keeps_usage_when_client_asked(thermostat: RunningThermostat, upstream: FakeUpstream) -> None:
    client = sdk(thermostat.url)
    chunks = list(client.chat.completions.create(model="echo-1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    direct = list(sdk(upstream.url).chat.completions.create(model="echo-1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert [c.model_dump() for c in chunks] == [c.model_dump() for c in direct]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_stream_raw_bytes_identical(thermostat: RunningThermostat, upstream: FakeUpstream) -> None:
    body = {"model": "echo-1", "messages": MESSAGES, "stream": True}
    direct = httpx.post(f"{upstream.url}/chat/completions", json=body).content
    proxied = httpx.post(f"{thermostat.url}/chat/completions", json=body)
    assert proxied.content == direct
    assert proxied.headers["content-type"].startswith("text/event-stream")


def test_unknown_fields_and_headers_reach_upstream(thermostat: RunningThermostat, upstream: FakeUpstream) -> None:
    sdk(thermostat.url).chat.completions.create(
        model="echo-1",
        messages=MESSAGES,
        max_completion_tokens=50,
        extra_body={"vendor_extension": {"nested": [1, 2, {"a": None}]}, "seed": 7},
        extra_headers={"x-custom-header": "kept", "x-task-type": "code", "x-thermostat-key": "user-1"},
    )
    got = upstream.last()
    assert got.body["vendor_extension"] == {"nested": [1, 2, {"a": None}]}
    assert got.body["seed"] == 7
    assert got.body["max_completion_tokens"] == 50 and "max_tokens" not in got.body
    assert got.headers["x-custom-header"] == "kept"
    assert got.headers["Authorization"] == "Bearer sk-test-secret"
    assert "x-task-type" not in {k.lower() for k in got.headers}
    assert "x-thermostat-key" not in {k.lower() for k in got.headers}


def test_unchanged_body_forwarded_byte_for_byte(thermostat: RunningThermostat, upstream: FakeUpstream) -> None:
    raw = b'{"model":"echo-1",  "messages":[{"role":"user","content":"x"}], "temperature":1}'
    httpx.post(f"{thermostat.url}/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert upstream.last().raw == raw


def test_response_headers(thermostat: RunningThermostat) -> None:
    r = httpx.post(f"{thermostat.url}/chat/completions", json={"model": "echo-1", "messages": MESSAGES, "temperature": 0.5, "max_tokens": 70})
    assert r.status_code == 200
    uuid.UUID(r.headers["x-request-id"])
    assert r.headers["x-upstream-request-id"] == "req_upstream_123"
    assert r.headers["x-thermostat-params"] == "temperature=0.5; max_tokens=70"
    assert r.headers["x-thermostat-mode"] == "off"
    assert float(r.headers["x-thermostat-overhead-ms"]) >= 0
    assert r.headers["openai-processing-ms"] == "1"
    r2 = httpx.post(f"{thermostat.url}/chat/completions", json={"model": "echo-1", "messages": MESSAGES})
    assert r2.headers["x-thermostat-params"] == ""  # nothing sent, nothing added


def test_other_v1_paths_pass_through(thermostat: RunningThermostat, upstream: FakeUpstream) -> None:
    models = sdk(thermostat.url).models.list()
    assert [m.id for m in models.data] == ["echo-1"]
    emb = sdk(thermostat.url).embeddings.create(model="text-embed", input="hi")
    assert emb.data[0].embedding == [0.1, 0.2]
    r = httpx.get(f"{thermostat.url}/models")
    assert r.headers["x-upstream-request-id"] == "req_upstream_models"


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1,2]", 400, "invalid_body"),
        (b'{"messages": []}', 400, "invalid_model"),
        (b'{"model": 5, "messages": []}', 400, "invalid_model"),
        (b'{"model": "echo-1", "temperature": "hot"}', 400, "invalid_type"),
        (b'{"model": "echo-1", "temperature": 2.5}', 400, "invalid_value"),
        (b'{"model": "echo-1", "temperature": true}', 400, "invalid_type"),
        (b'{"model": "echo-1", "max_tokens": 0}', 400, "invalid_value"),
        (b'{"model": "echo-1", "max_tokens": 1.5}', 400, "invalid_type"),
        (b'{"model": "echo-1", "max_completion_tokens": "9"}', 400, "invalid_type"),
        (b'{"model": "echo-1", "stream": "yes"}', 400, "invalid_type"),
        (b'{"model": "echo-1", "pad": "' + b"x" * 300_000 + b'"}', 413, "request_too_large"),
    ],
)
def test_bad_input_errors(thermostat: RunningThermostat, raw: bytes, status: int, code: str) -> None:
    r = httpx.post(f"{thermostat.url}/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == code and err["type"] and err["message"]
    uuid.UUID(r.headers["x-request-id"])


def test_sdk_raises_bad_request_for_thermostat_errors(thermostat: RunningThermostat) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(thermostat.url).chat.completions.create(model="echo-1", messages=MESSAGES, temperature=7)
    assert info.value.code == "invalid_value"


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
def test_upstream_errors_passed_through_verbatim(thermostat: RunningThermostat, upstream: FakeUpstream, status: int) -> None:
    body = {"model": f"error-{status}", "messages": MESSAGES}
    direct = httpx.post(f"{upstream.url}/chat/completions", json=body)
    proxied = httpx.post(f"{thermostat.url}/chat/completions", json=body)
    assert proxied.status_code == direct.status_code == status
    assert proxied.content == direct.content
    assert proxied.headers["x-upstream-extra"] == "kept"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_upstream_for_model_404(tmp_path) -> None:
    fake = FakeUpstream().start()
    try:
        cfg = make_config(fake.url, tmp_path, optimization={"enabled": False})
        cfg = type(cfg)(**{**{f: getattr(cfg, f) for f in cfg.__struct_fields__},
                           "upstreams": (type(cfg.upstreams[0])(name="only-gpt", base_url=fake.url, models=("gpt-*",)),)})
        running = start_thermostat(cfg)
        try:
            r = httpx.post(f"{running.url}/chat/completions", json={"model": "claude-x", "messages": MESSAGES})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            ok = httpx.post(f"{running.url}/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
            assert ok.status_code == 200
        finally:
            running.stop()
    finally:
        fake.stop()


def test_unreachable_upstream_502_and_timeout_504(tmp_path) -> None:
    cfg = make_config(f"http://127.0.0.1:{_closed_port()}/v1", tmp_path, optimization={"enabled": False})
    running = start_thermostat(cfg)
    try:
        with pytest.raises(openai.APIStatusError) as info:
            sdk(running.url).chat.completions.create(model="echo-1", messages=MESSAGES)
        assert info.value.status_code == 502
        assert info.value.code == "upstream_unreachable"
    finally:
        running.stop()
    fake = FakeUpstream().start()
    cfg = make_config(fake.url, tmp_path, optimization={"enabled": False})
    running = start_thermostat(cfg)
    try:
        t0 = time.monotonic()
        r = httpx.post(f"{running.url}/chat/completions", json={"model": "hang", "messages": MESSAGES}, timeout=10)
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
        assert time.monotonic() - t0 < 5
    finally:
        running.stop()
        fake.stop()


def test_long_stream_not_cut_by_timeout(thermostat: RunningThermostat) -> None:
    # drip sends a chunk every 50 ms: total time may exceed timeout_s, silence never does
    body = {"model": "drip", "messages": [{"role": "user", "content": " ".join(["w"] * 50)}], "stream": True}
    r = httpx.post(f"{thermostat.url}/chat/completions", json=body, timeout=20)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")


def test_upstream_cut_mid_stream_ends_with_error_event(thermostat: RunningThermostat) -> None:
    body = {"model": "cut-stream", "messages": [{"role": "user", "content": "a b c d e f"}], "stream": True}
    r = httpx.post(f"{thermostat.url}/chat/completions", json=body, timeout=10)
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert "upstream_stream_error" in events[-1]


def test_upstream_silent_mid_stream_times_out_with_error_event(thermostat: RunningThermostat) -> None:
    """A stream whose upstream falls silent (connection open) ends after about `timeout_s` (2 s here)
    with the error event and a `timeout` outcome: the read watch's coarse clock, not a timer per read."""
    body = {"model": "stall-stream", "messages": [{"role": "user", "content": "a b c d e f"}], "stream": True}
    t0 = time.monotonic()
    r = httpx.post(f"{thermostat.url}/chat/completions", json=body, timeout=20)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert "upstream_stream_error" in events[-1] and len(events) >= 3  # the chunks before the silence were relayed
    # aiohttp's own per-read timer would raise its SocketTimeoutError; the watch sets ServerTimeoutError.
    assert "ServerTimeoutError" in events[-1] and "SocketTimeoutError" not in events[-1]
    assert 2.0 <= elapsed < 6.0, elapsed
    deadline = time.time() + 5
    found = None
    while time.time() < deadline:
        found = thermostat.runtime.registry.get(r.headers["x-request-id"], time.time())
        if found and found[1] is not None:
            break
        time.sleep(0.05)
    assert found and found[1] is not None and found[1].error_class == "timeout"
    assert len(thermostat.runtime.read_watch) == 0  # untracked once ended


def test_client_disconnect_mid_stream_is_recorded(thermostat: RunningThermostat) -> None:
    body = {"model": "drip", "messages": [{"role": "user", "content": " ".join(["w"] * 100)}], "stream": True}
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", f"{thermostat.url}/chat/completions", json=body) as r:
            request_id = r.headers["x-request-id"]
            next(r.iter_bytes())
    deadline = time.time() + 5
    found = None
    while time.time() < deadline:
        found = thermostat.runtime.registry.get(request_id, time.time())
        if found and found[1] is not None:
            break
        time.sleep(0.05)
    assert found and found[1] is not None
    assert found[1].error_class == "client_disconnected"


def test_outcomes_recorded_off_path(thermostat: RunningThermostat) -> None:
    ids = []
    for _ in range(5):
        r = httpx.post(f"{thermostat.url}/chat/completions", json={"model": "echo-1", "messages": MESSAGES, "max_tokens": 3})
        ids.append(r.headers["x-request-id"])
    thermostat.flush()
    rows = thermostat.call(thermostat.runtime.sink.query(
        f"SELECT request_id, status, completion_tokens, finish_reason FROM logged_decisions WHERE request_id IN ({','.join('?' * 5)})", ids))
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert all(r["status"] == 200 and r["completion_tokens"] == 3 and r["finish_reason"] == "length" for r in rows)


def test_bad_config_refused_with_clear_message(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[optimization]\nmode = "turbo"\n')
    proc = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "optimization.mode" in proc.stderr and "shadow, canary, guarded, general" in proc.stderr
    path.write_text("[servr]\nport = 1\n")
    proc = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown key 'servr'" in proc.stderr


def test_invalid_stream_options_left_for_the_upstream(thermostat: RunningThermostat, upstream: FakeUpstream) -> None:
    raw = b'{"model":"echo-1","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":"bad"}'
    httpx.post(f"{thermostat.url}/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert upstream.last().raw == raw  # not "repaired" into a valid request
