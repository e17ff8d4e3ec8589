"""A part that never stops cannot hold the rest of the shutdown (and the journal's lock) hostage."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import pytest

import proxy.runtime
from proxy.common import stop_within
from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import start_thermostat


async def _swallows_its_cancellation(release: asyncio.Event) -> None:
    """A loop that catches its cancellation and waits on (until the test lets it go)."""
    while not release.is_set():
        try:
            await release.wait()
        except asyncio.CancelledError:
            continue


async def test_a_stop_that_never_returns_is_left_behind_and_named(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()
    stuck = asyncio.ensure_future(_swallows_its_cancellation(release))

    async def stop() -> None:
        stuck.cancel()
        await stuck  # never returns: the cancellation is swallowed

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="test"):
        assert await stop_within("stuck part", stop, 0.2, logging.getLogger("test")) is False
    assert time.monotonic() - started < 5
    assert "shutdown: stuck part did not stop within 0 s; going on without it" in caplog.text
    assert "await stuck" in caplog.text  # where it waits
    release.set()
    await asyncio.wait_for(stuck, 5)


async def test_a_stop_that_returns_or_fails_is_waited_for() -> None:
    async def fine() -> None:
        await asyncio.sleep(0.01)

    async def broken() -> None:
        raise RuntimeError("its own error")

    assert await stop_within("fine", fine, 1.0, logging.getLogger("test")) is True
    with pytest.raises(RuntimeError, match="its own error"):
        await stop_within("broken", broken, 1.0, logging.getLogger("test"))


def test_a_stuck_part_still_lets_the_log_flush_and_the_journal_go(upstream: FakeUpstream, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracer's stop hangs; the request is still in the log and a restart on the same data_dir takes the journal."""
    monkeypatch.setattr(proxy.runtime, "STOP_STEP_S", 0.5)
    cfg = make_config(upstream.url, tmp_path, storage={"flush_interval_s": 30})
    first = start_thermostat(cfg)

    async def hangs() -> None:
        await asyncio.Event().wait()

    first.runtime.tracer.stop = hangs  # type: ignore[method-assign]
    r = httpx.post(f"{first.url}/chat/completions", json={"model": "echo-1", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    first.stop(timeout_s=20)

    again = start_thermostat(cfg)  # would fail on the journal's lock had the recorder not stopped
    try:
        assert again.call(again.runtime.sink.get_decision(rid)) is not None
    finally:
        again.stop()
