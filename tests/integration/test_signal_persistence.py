"""Quality-signal counts and judge/explicit pairs survive a restart (embedded and Redis) and are shared by replicas."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from policies.signals import Signal
from tests.conftest import make_config
from tests.shared.conftest import REDIS_URL, _delete_prefix, _require_redis
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

MESSAGES = [{"role": "user", "content": "summarise: the cat sat on the mat"}]
JUDGE = (0.2, 0.5, 0.9)
EXPLICIT = (0.1, 0.6, 1.0)


def ask(t: RunningThermostat, task: str = "summary") -> str:
    client = openai.OpenAI(base_url=t.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": task})
    raw = client.chat.completions.with_raw_response.create(model="echo-1", messages=MESSAGES, max_tokens=300)  # type: ignore[arg-type]
    return raw.http_response.headers["x-request-id"]


def judge_then_explicit(t: RunningThermostat, judge: float, explicit: float) -> None:
    """One request: the judge scores it (a first signal), then explicit feedback meets that score (a pair, no second count)."""
    rid = ask(t)
    t.flush()
    assert t.call(t.runtime.deliver(Signal(rid, judge, "judge"))) == "applied"
    r = httpx.post(f"{t.base}/api/optimization/record-outcome", json={"request_id": rid, "outcome": {"quality": explicit}}, timeout=10)
    assert r.status_code == 200, r.text


def state(t: RunningThermostat) -> tuple[int, list[tuple[float, float]]]:
    rt = t.runtime
    return rt.bandit.signals.count("summary"), sorted(rt.signal_book.pairs_of("summary"))


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.05)


def test_embedded_counts_and_pairs_survive_a_restart(upstream: FakeUpstream, tmp_path: Path) -> None:
    cfg = make_config(upstream.url, tmp_path, optimization={"mode": "general", "seed": 5})
    first = start_thermostat(cfg)
    try:
        for judge, explicit in zip(JUDGE, EXPLICIT, strict=True):
            judge_then_explicit(first, judge, explicit)
        before = state(first)
    finally:
        first.stop()
    assert before == (3, sorted(zip(JUDGE, EXPLICIT, strict=True)))  # one count per request, three pairs

    again = start_thermostat(cfg)
    try:
        assert state(again) == before
        judge_then_explicit(again, 0.3, 0.4)  # counting goes on from the restored values
        assert state(again)[0] == 4
    finally:
        again.stop()
    third = start_thermostat(cfg)
    try:
        assert state(third) == (4, sorted([*zip(JUDGE, EXPLICIT, strict=True), (0.3, 0.4)]))
    finally:
        third.stop()


@pytest.fixture
def prefix() -> Any:
    _require_redis()
    name = f"test:{time.time_ns()}:"
    yield name
    _delete_prefix(name)


def redis_config(upstream: FakeUpstream, data_dir: Path, prefix: str) -> Any:
    return make_config(
        upstream.url, data_dir, optimization={"mode": "general", "seed": 5},
        storage={"flush_interval_s": 0.05, "redis_url": REDIS_URL, "redis_key_prefix": prefix, "sync_interval_s": 0.1},
    )


def test_replicas_on_redis_share_counts_and_pairs_and_keep_them_across_restarts(upstream: FakeUpstream, tmp_path: Path, prefix: str) -> None:
    a = start_thermostat(redis_config(upstream, tmp_path / "a", prefix))
    b = start_thermostat(redis_config(upstream, tmp_path / "b", prefix))
    try:
        judge_then_explicit(a, JUDGE[0], EXPLICIT[0])
        judge_then_explicit(b, JUDGE[1], EXPLICIT[1])
        judge_then_explicit(a, JUDGE[2], EXPLICIT[2])
        expected = (3, sorted(zip(JUDGE, EXPLICIT, strict=True)))
        wait_for(lambda: state(a) == expected and state(b) == expected)  # each sees the other's signals
    finally:
        a.stop()
        b.stop()
    c = start_thermostat(redis_config(upstream, tmp_path / "c", prefix))  # a fresh replica, no local state of its own
    try:
        assert state(c) == expected
    finally:
        c.stop()


def test_redis_counts_are_capped_by_the_task_type_cap(upstream: FakeUpstream, tmp_path: Path, prefix: str) -> None:
    cfg = make_config(
        upstream.url, tmp_path, optimization={"mode": "general", "seed": 5}, server={"data_dir": str(tmp_path), "max_task_types": 2},
        storage={"flush_interval_s": 0.05, "redis_url": REDIS_URL, "redis_key_prefix": prefix, "sync_interval_s": 0.1},
    )
    t = start_thermostat(cfg)
    try:
        signals = t.runtime.bandit.signals
        for task in ("a", "b", "c", "d"):
            signals.add(task)  # the in-memory counter already refuses past the cap
        assert set(signals.counts) == {"a", "b"}
        assert t.runtime.signal_sync is not None
        t.call(t.runtime.signal_sync.sync_once())
    finally:
        t.stop()
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        stored = client.hgetall(f"{prefix}quality:signals")
        assert stored == {b"a": b"1", b"b": b"1"}
        assert 0 < client.pttl(f"{prefix}quality:signals") <= 30 * 86_400 * 1000
    finally:
        client.close()


async def test_a_batch_retried_after_a_lost_reply_is_counted_once(prefix: str) -> None:
    from proxy.learning import SignalSync, SyncedQualitySignals, SyncedSignalBook
    from proxy.learning.signal_sync import _Batch
    from proxy.store import RedisStore

    store = RedisStore(REDIS_URL, prefix=prefix)
    try:
        sync = SignalSync(store, SyncedQualitySignals(), SyncedSignalBook(), interval_s=60)
        batch = _Batch(7, {"code": 2}, {("code", "r1"): (0.5, 0.25, 1.0)})
        await sync._push_redis(batch)
        await sync._push_redis(batch)  # same sequence number: the reply was lost, the retry must not add again
        await sync.refresh(force=True)
        assert sync.counts.counts == {"code": 2}
        assert sync.book.pairs_of("code") == [(0.5, 0.25)]
    finally:
        await store.aclose()
