"""Stopping the background loops each component owns (ticker, pruner, table refresher)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a component's loop and wait until it has stopped, so `stop()` returns only
    once nothing of the component still runs (a later `start()` never overlaps it)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
