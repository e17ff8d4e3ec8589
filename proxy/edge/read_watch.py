"""Upstream silence timeouts for relayed streams on one coarse clock, not a timer per socket read.

aiohttp enforces `sock_read` (`[[upstreams]] timeout_s`) by cancelling and re-arming a timer
on every read from the upstream's socket. A stream of small SSE chunks pays that per chunk:
5 k instructions, ~6 % of what Thermostat spends relaying one (callgrind, bench/README.md).
Here one task ticks every `tick_s`; each relayed stream records the tick of its last
progress, and a stream that has waited on its upstream for longer than its timeout gets
aiohttp's own `ServerTimeoutError` set on its body, so the edge ends it exactly as a socket
timeout would (error class `timeout`, the stream's error event). A stream blocked writing
to a slow client is not waiting on its upstream and never expires here: backpressure is
not silence. Precision is one tick (the timeout fires between timeout_s and timeout_s +
2 ticks).
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol

import aiohttp

from proxy.common import cancel_and_wait, every


class Expirable(Protocol):
    """A response body that can be failed from outside (aiohttp's `StreamReader`)."""

    def set_exception(self, exc: BaseException) -> None: ...


class Silence:
    """One watched stream: the tick of its last progress, and whether it is writing to its client."""

    __slots__ = ("content", "limit", "mark", "sending")

    def __init__(self, content: Expirable, limit: int, mark: int) -> None:
        self.content = content
        self.limit = limit
        self.mark = mark
        self.sending = False


class ReadWatch:
    """Owned by the composition root (start/stop in the lifespan); the edge tracks its streams here."""

    def __init__(self, tick_s: float = 0.25) -> None:
        self.tick_s = tick_s
        self.ticks = 0
        self._streams: set[Silence] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def track(self, content: Expirable, timeout_s: float) -> Silence:
        silence = Silence(content, limit=math.ceil(timeout_s / self.tick_s) + 1, mark=self.ticks)
        self._streams.add(silence)
        return silence

    def untrack(self, silence: Silence) -> None:
        self._streams.discard(silence)

    def tick(self) -> int:
        """Advance the clock one tick and fail the streams silent for longer than their limit; returns how many."""
        self.ticks += 1
        expired = [s for s in self._streams if not s.sending and self.ticks - s.mark > s.limit]
        for silence in expired:
            self._streams.discard(silence)
            silence.content.set_exception(aiohttp.ServerTimeoutError("Timeout on reading data from socket"))
        return len(expired)

    def __len__(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        self._task = every(self.tick_s, self.tick, "thermostat-read-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
