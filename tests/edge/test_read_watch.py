"""The read watch's clock: a stream expires after its timeout of silence, never while it writes to its client."""

from __future__ import annotations

import aiohttp

from proxy.edge import ReadWatch


class Body:
    def __init__(self) -> None:
        self.failed: BaseException | None = None

    def set_exception(self, exc: BaseException) -> None:
        self.failed = exc


def test_silence_expires_after_the_timeout_rounded_up_to_ticks() -> None:
    watch = ReadWatch(tick_s=0.25)
    body = Body()
    watch.track(body, timeout_s=1.0)  # limit ceil(1.0 / 0.25) + 1 = 5 ticks
    for _ in range(5):
        assert watch.tick() == 0
    assert watch.tick() == 1  # the 6th tick: more than 5 ticks (>= 1.25 s) without progress
    assert isinstance(body.failed, aiohttp.ServerTimeoutError) and len(watch) == 0


def test_progress_restarts_the_count_and_sending_never_expires() -> None:
    watch = ReadWatch(tick_s=0.25)
    quiet, busy = Body(), Body()
    s = watch.track(quiet, timeout_s=0.5)  # 3 ticks
    b = watch.track(busy, timeout_s=0.5)
    b.sending = True  # blocked on a slow client: backpressure, not upstream silence
    for _ in range(3):
        watch.tick()
    s.mark = watch.ticks  # a chunk arrived
    for _ in range(3):
        assert watch.tick() == 0
    assert watch.tick() == 1 and quiet.failed is not None
    for _ in range(100):
        watch.tick()
    assert busy.failed is None
    b.sending = False
    b.mark = watch.ticks
    for _ in range(4):
        watch.tick()
    assert busy.failed is not None


def test_untracked_streams_are_never_failed() -> None:
    watch = ReadWatch(tick_s=0.25)
    body = Body()
    watch.untrack(watch.track(body, timeout_s=0.25))
    for _ in range(10):
        watch.tick()
    assert body.failed is None
