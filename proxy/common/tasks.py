"""The background loops each component owns (ticker, pruner, table refresher, read watch): started with
`every`, stopped with `cancel_and_wait`."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
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
