"""`/v1/models` merged over every OpenAI-format upstream (proxy/edge/models.py), against real
fake upstreams on loopback; and the operator's key in the header each upstream format reads."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from proxy.common import ProxyError
from proxy.config import build_config
from proxy.edge import Upstream, UpstreamPool
from proxy.edge.models import ModelCatalog, credential_key
from proxy.edge.upstream import forward_headers
from tests.support.fake_upstream import FakeUpstream


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeUpstream, FakeUpstream, FakeUpstream]]:
    a = FakeUpstream(models=("gpt-a", "shared")).start()
    b = FakeUpstream(models=("shared", "gpt-b")).start()
    broken = FakeUpstream(models=("never",), models_status=503).start()
    yield a, b, broken
    for fake in (a, b, broken):
        fake.stop()


def _pool(*entries: tuple[str, str, str]) -> UpstreamPool:
    ups = [{"name": name, "base_url": url, "models": ["m-" + name], "format": fmt, "timeout_s": 2.0} for name, url, fmt in entries]
    return UpstreamPool.from_settings(build_config({"upstreams": ups}, environ={}).upstreams)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_merges_dedups_in_config_order_and_caches(fakes: tuple[FakeUpstream, FakeUpstream, FakeUpstream]) -> None:
    a, b, _ = fakes
    pool = _pool(("a", a.url, "openai"), ("b", b.url, "openai"), ("claude", b.url, "anthropic"))
    clock = Clock()
    catalog = ModelCatalog(pool, ttl_s=5.0, clock=clock)
    try:
        assert catalog.needed()
        headers = [(b"authorization", b"Bearer client")]
        before = len(a.received) + len(b.received)
        body = json.loads(await catalog.body(headers))
        assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["gpt-a", "shared", "gpt-b"]
        assert len(a.received) + len(b.received) == before + 2  # the anthropic upstream is not asked
        await catalog.body(headers)
        assert len(a.received) + len(b.received) == before + 2  # cached
        await catalog.body([(b"authorization", b"Bearer someone-else")])
        assert len(a.received) + len(b.received) == before + 4  # another client's key: its own list
        clock.now += 5.0
        await catalog.body(headers)
        assert len(a.received) + len(b.received) == before + 6  # expired
    finally:
        await pool.aclose()


async def test_a_failing_upstream_is_left_out_and_logged(fakes: tuple[FakeUpstream, FakeUpstream, FakeUpstream], caplog: pytest.LogCaptureFixture) -> None:
    a, _, broken = fakes
    pool = _pool(("broken", broken.url, "openai"), ("gone", "http://127.0.0.1:9/v1", "openai"), ("a", a.url, "openai"))
    try:
        with caplog.at_level(logging.WARNING, logger="thermostat.edge.models"):
            body = json.loads(await ModelCatalog(pool).body([]))
        assert [m["id"] for m in body["data"]] == ["gpt-a", "shared"]
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert "'broken'" in logged and "HTTP 503" in logged and "'gone'" in logged
    finally:
        await pool.aclose()


async def test_all_failing_is_a_502_in_the_openai_shape(fakes: tuple[FakeUpstream, FakeUpstream, FakeUpstream]) -> None:
    _, _, broken = fakes
    pool = _pool(("broken", broken.url, "openai"), ("gone", "http://127.0.0.1:9/v1", "openai"))
    try:
        with pytest.raises(ProxyError) as info:
            await ModelCatalog(pool).body([])
        assert info.value.status == 502 and "broken: HTTP 503" in info.value.message
        assert json.loads(info.value.body())["error"]["type"] == "upstream_error"
    finally:
        await pool.aclose()


def test_with_a_default_upstream_nothing_is_merged(fakes: tuple[FakeUpstream, FakeUpstream, FakeUpstream]) -> None:
    a, _, _ = fakes
    cfg = build_config({"upstreams": [{"name": "a", "base_url": a.url}]}, environ={})
    assert not ModelCatalog(UpstreamPool.from_settings(cfg.upstreams)).needed()


def test_credential_key_never_holds_the_key() -> None:
    key = credential_key([(b"Authorization", b"Bearer sk-secret"), (b"accept", b"*/*")])
    assert "sk-secret" not in key and key != credential_key([])
    assert key == credential_key([(b"authorization", b"Bearer sk-secret")])


def test_anthropic_upstream_gets_the_operator_key_as_x_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_TEST_KEY", "sk-ant-operator")
    monkeypatch.setenv("OPENAI_TEST_KEY", "sk-operator")
    cfg = build_config({"upstreams": [
        {"name": "claude", "base_url": "http://127.0.0.1:1/v1", "format": "anthropic", "api_key_env": "ANTHROPIC_TEST_KEY", "models": ["claude-*"]},
        {"name": "oa", "base_url": "http://127.0.0.1:1/v1", "api_key_env": "OPENAI_TEST_KEY"},
    ]}, environ={})
    claude, oa = (Upstream(s) for s in cfg.upstreams)
    client = [(b"x-api-key", b"client-key"), (b"authorization", b"Bearer client"), (b"anthropic-version", b"2023-06-01"),
              (b"anthropic-beta", b"output-128k-2025-02-19"), (b"content-type", b"application/json")]
    sent = forward_headers(client, claude)
    assert sent.getall("x-api-key") == ["sk-ant-operator"] and "authorization" not in sent
    assert sent["anthropic-version"] == "2023-06-01" and sent["anthropic-beta"] == "output-128k-2025-02-19"
    to_openai = forward_headers(client, oa)
    assert to_openai.getall("authorization") == ["Bearer sk-operator"] and "x-api-key" not in to_openai
    # Without an operator key the client's own credentials pass through untouched.
    bare = Upstream(build_config({"upstreams": [{"name": "c", "base_url": "http://127.0.0.1:1/v1", "format": "anthropic"}]}, environ={}).upstreams[0])
    assert forward_headers(client, bare).getall("x-api-key") == ["client-key"]
