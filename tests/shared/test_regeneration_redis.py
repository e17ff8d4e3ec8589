"""Regeneration marks shared through Redis: two replicas see each other's answers."""

from __future__ import annotations

import asyncio

import redis

from proxy.decision import MemoryRegenerationBook, RedisRegenerationBook
from proxy.decision.regeneration import fingerprint
from proxy.store import RedisStore

MSGS = [{"role": "user", "content": "capital of France?"}]


async def test_two_replicas_share_the_book(redis_store: RedisStore, redis_prefix: str, sync_redis: redis.Redis) -> None:
    a = RedisRegenerationBook(redis_store, window_s=600)
    b = RedisRegenerationBook(redis_store, window_s=600, fallback=MemoryRegenerationBook(600))
    fp = fingerprint(MSGS, "user-1") or ""
    assert await a.observe(fp, "r1", "qa") is None
    assert await b.observe(fp, "r2", "qa") == "r1"
    assert await a.observe(fingerprint(MSGS, "user-2") or "", "r3", "qa") is None
    assert b.counts == {"qa": 1} and a.counts == {}
    keys = [k.decode() for k in sync_redis.scan_iter(match=redis_prefix + "regen:*")]
    assert len(keys) == 2 and all("France" not in k for k in keys)
    assert 0 < sync_redis.pttl(keys[0]) <= 600_000


async def test_expires_with_the_window(redis_store: RedisStore) -> None:
    book = RedisRegenerationBook(redis_store, window_s=0.2)
    fp = fingerprint(MSGS, "user-1") or ""
    assert await book.observe(fp, "r1", "qa") is None
    await asyncio.sleep(0.4)
    assert await book.observe(fp, "r2", "qa") is None


async def test_redis_down_falls_back_to_memory() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", prefix="test:down:", timeout_s=0.2)
    book = RedisRegenerationBook(store, window_s=600)
    fp = fingerprint(MSGS, "user-1") or ""
    assert await book.observe(fp, "r1", "qa", now=1000.0) is None
    assert await book.observe(fp, "r2", "qa", now=1001.0) == "r1"
    assert book.failures == 2
    await store.aclose()
