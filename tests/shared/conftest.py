"""Fixtures for the shared-state tests: a real Redis (127.0.0.1:6379, or THERMOSTAT_TEST_REDIS_URL).

Each test gets its own key prefix (and deletes its keys afterwards), so tests never
see each other's state and may share the server with anything else. Redis missing:
skip locally, but fail under CI=true (a CI run without its Redis must not pass green).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from proxy.store import RedisStore

REDIS_URL = os.environ.get("THERMOSTAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() == "true"

pytestmark = pytest.mark.redis


def _require_redis() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1).ping()
    except Exception as exc:  # noqa: BLE001
        message = f"Redis not reachable at {REDIS_URL}: {exc}"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def _delete_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix on a reachable Redis; its keys are deleted after the test."""
    _require_redis()
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    _delete_prefix(prefix)


@pytest.fixture
def sync_redis(redis_prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
async def redis_store(redis_prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(REDIS_URL, prefix=redis_prefix, timeout_s=2.0)
    yield store
    await store.aclose()


@pytest.fixture
async def aio_redis(redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()
