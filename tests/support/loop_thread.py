"""Servers the blocking tests talk to: an event loop of their own in a daemon thread.

One copy of the pattern every loopback server in the tests used to write out (a loop, a
thread, a readiness event, a threadsafe stop)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


class LoopThread:
    """An event loop running forever in a daemon thread; `run` hands it a coroutine and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Awaitable[T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self, timeout: float = 10) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)


class AppInThread:
    """An aiohttp application on a loopback port, served from its own `LoopThread`."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 0.5) -> None:
        self.host = host
        self.thread = LoopThread()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
        self.port = self.thread.run(self._start(port))

    async def _start(self, port: int) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.thread.loop

    def stop(self) -> None:
        try:
            self.thread.run(self._runner.cleanup())
        finally:
            self.thread.stop()


def serve_app(build: Callable[[web.Application], None], host: str = "127.0.0.1", port: int = 0, **options: Any) -> AppInThread:
    """An application whose routes `build` adds, served in a thread (stop it with `.stop()`)."""
    app = web.Application()
    build(app)
    return AppInThread(app, host, port, **options)


@contextmanager
def started_in_thread(start: Callable[[], Awaitable[T]], close: Callable[[T], Awaitable[Any]]) -> Iterator[T]:
    """Whatever `start` builds on a loop thread (a simulator, a server), closed with `close` on the way out."""
    thread = LoopThread()
    handle = thread.run(start())
    try:
        yield handle
    finally:
        try:
            thread.run(close(handle))
        finally:
            thread.stop()
