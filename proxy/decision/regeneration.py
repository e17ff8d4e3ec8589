"""Implicit feedback: the client asked the same thing again, so the earlier answer failed.

A chat request whose `messages` are identical (same roles and contents, in order) to one
answered within `[feedback] regenerate_window_s`, under the same assignment key
(`x-thermostat-key`, else the body's `user`), marks the earlier decision as regenerated;
the caller turns that into `Signal(earlier_id, [feedback] regenerated_quality, "implicit")`.

Only a keyed digest of the messages is kept (never the prompt): in memory, a bounded LRU
whose entries also expire; with several replicas, in Redis under the store's prefix with
a TTL, so a retry served by another replica is still recognised. Both are consulted after
the response completed (a listener), never before forwarding.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec

from policies.signals import Signal
from proxy.store import REDIS_UNAVAILABLE, RedisStore

_encoder = msgspec.json.Encoder(order="sorted")


def fingerprint(messages: Sequence[Any], key: str, salt: bytes = b"") -> str | None:
    """Digest of (assignment key, roles and contents of `messages`); None when there are none.

    Only role and content count: a retry that differs in tool ids or `name` fields is still a
    different conversation for the model, but the same question for the user is judged by the
    text. `salt` keys the digest so that it cannot be confirmed against guessed prompts.
    """
    if not messages:
        return None
    parts = [(m.get("role"), m.get("content")) if isinstance(m, dict) else (None, m) for m in messages]
    h = hashlib.blake2b(key=salt[:64], digest_size=20)
    h.update(key.encode("utf-8", "replace"))
    h.update(b"\x00")
    h.update(_encoder.encode(parts))
    return h.hexdigest()


class RegenerationBook(Protocol):
    counts: Counter[str]

    async def observe(self, fp: str, request_id: str, task_type: str, now: float | None = None) -> str | None:
        """Remember `request_id` under `fp`; return the earlier request it regenerates, if any."""
        ...


class MemoryRegenerationBook:
    """Fingerprint -> (request id, expiry), bounded LRU with a TTL: one replica's memory."""

    def __init__(self, window_s: float = 600.0, max_entries: int = 100_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.counts: Counter[str] = Counter()  # regenerations per task type

    def __len__(self) -> int:
        return len(self._seen)

    async def observe(self, fp: str, request_id: str, task_type: str, now: float | None = None) -> str | None:
        return self.observe_now(fp, request_id, task_type, time.time() if now is None else now)

    def observe_now(self, fp: str, request_id: str, task_type: str, now: float) -> str | None:
        previous = self._seen.pop(fp, None)
        earlier = previous[0] if previous is not None and previous[1] > now and previous[0] != request_id else None
        self._seen[fp] = (request_id, now + self.window_s)
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        if earlier is not None:
            self.counts[task_type] += 1
        return earlier


class RedisRegenerationBook:
    """The same book in Redis for several replicas: one `SET key id EX window GET` per completed request.

    SET ... GET records this request and returns the one it replaces in one atomic round
    trip (SET NX would say only that an entry exists, not which request it names). The key
    expires with the window, so Redis holds at most one digest per conversation per window.
    On a Redis failure the in-process book answers (a retry on the same replica is still seen).
    """

    def __init__(self, store: RedisStore, window_s: float = 600.0, fallback: MemoryRegenerationBook | None = None) -> None:
        self.store = store
        self.window_s = window_s
        self.fallback = fallback or MemoryRegenerationBook(window_s)
        self.counts = self.fallback.counts
        self.failures = 0

    async def observe(self, fp: str, request_id: str, task_type: str, now: float | None = None) -> str | None:
        ms = max(1, int(self.window_s * 1000))
        try:
            raw = await self.store.redis.set(self.store.k(f"regen:{fp}"), request_id, px=ms, get=True)
        except REDIS_UNAVAILABLE:
            self.failures += 1
            return await self.fallback.observe(fp, request_id, task_type, now)
        earlier = raw.decode() if isinstance(raw, bytes) else raw
        if earlier is None or earlier == request_id:
            return None
        self.counts[task_type] += 1
        return str(earlier)


def assignment_key(headers: Any, body: Any) -> str:
    """The key regenerations are matched under: `x-thermostat-key`, else the body's `user`, else ""."""
    key = headers.get("x-thermostat-key") if headers is not None else None
    if isinstance(key, str) and key:
        return key
    user = body.get("user") if isinstance(body, dict) else None
    return user if isinstance(user, str) else ""


async def regeneration_signal(
    book: RegenerationBook, messages: Sequence[Any], key: str, request_id: str, task_type: str, quality: float,
    salt: bytes = b"", now: float | None = None,
) -> Signal | None:
    """Completion listener for chat requests: the implicit signal for the request this one regenerates, if any.

    The caller hands a returned signal to `proxy.decision.feedback.deliver_signal`, which keeps a
    stronger signal (judge, explicit) already stored for that request.
    """
    fp = fingerprint(messages, key, salt)
    if fp is None:
        return None
    earlier = await book.observe(fp, request_id, task_type, now)
    if earlier is None:
        return None
    return Signal(request_id=earlier, quality=quality, source="implicit", at=time.time() if now is None else now, reason="regenerated")
