"""The background loops each component owns (ticker, pruner, table refresher, read watch): started with
`every`, stopped with `cancel_and_wait`."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import logging
from collections.abc import Awaitable, Callable
from typing import Any


def every(interval_s: float, step: Callable[[], Awaitable[object] | object], name: str) -> asyncio.Task[None]:
    """`step()` (awaited if it is a coroutine function) every `interval_s`, until the task is cancelled.

    A step handles its own errors: the loop lives as long as its component."""

    async def run() -> None:
        while True:
            await asyncio.sleep(interval_s)
            result = step()
            if inspect.isawaitable(result):
                await result

    return asyncio.create_task(run(), name=name)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a component's loop and wait until it has stopped, so `stop()` returns only
    once nothing of the component still runs (a later `start()` never overlaps it)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def stop_within(name: str, stop: Callable[[], Awaitable[object]], timeout_s: float, log: logging.Logger) -> bool:
    """Run one component's `stop()` for at most `timeout_s`, then go on without it.

    Shutdown is a chain (the decision log's writer and the journal's lock come last): one part
    that never returns (a pub/sub teardown stuck on a dead connection, a loop that swallowed
    its cancellation) must not keep the journal locked and the process alive. The stop runs as
    its own task and is waited for with `asyncio.wait`, which never cancels it: cancelling a
    stuck task would only wait for it again. A part left behind is logged with where it waits."""
    task = asyncio.ensure_future(stop())
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if done:
        task.result()  # its own error surfaces as before
        return True
    buf = io.StringIO()
    task.print_stack(file=buf)
    log.warning("shutdown: %s did not stop within %.0f s; going on without it. It waits at:\n%s", name, timeout_s, buf.getvalue())
    return False
