"""Learning in batches: finished requests are collected for a moment, then learnt from in one step.

The edge's listeners used to run every learner once per request. What does not have to
answer anything right away (the conservative monitor's fold and its breach check, and
whatever else registers a step) now runs on a batch: `add` queues the (decision, outcome)
pair and the first `add` of a batch arms a timer; the batch runs once it holds
`max_outcomes` requests or its oldest one is `max_delay_s` old, whichever comes first.
Work that is the same for the whole batch (a task's breach check, the state copies of
the pure monitor) is then done once per batch instead of once per request.

Staleness is bounded by those two numbers: a table the decision path reads from a step
(`ConservativeMonitor.is_rolled_back`) is at most `max_delay_s` plus one loop iteration
behind, or `max_outcomes` requests, and `max_age_s` / `max_size` record what was seen.
Anything that must see every outcome so far first (a delayed signal folded into the same
state, a test's flush, shutdown) calls `drain`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from policies.records import Decision, Outcome

log = logging.getLogger("thermostat.learning")

Finished = tuple[Decision, Outcome]
Step = Callable[[Sequence[Finished]], None]

MAX_OUTCOMES = 512
"""A batch runs at once when it holds this many requests."""
MAX_DELAY_S = 0.05
"""... or when its oldest request has waited this long (the timer armed by its first `add`)."""


class OutcomeBatch:
    """The batch step's queue and timer (see the module docstring); runs on the event loop only."""

    def __init__(self, *, max_outcomes: int = MAX_OUTCOMES, max_delay_s: float = MAX_DELAY_S) -> None:
        self.max_outcomes = max_outcomes
        self.max_delay_s = max_delay_s
        self.steps: list[Step] = []  # run in this order on each batch
        self._items: list[Finished] = []
        self._first_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.batches = 0
        self.outcomes = 0
        self.max_size = 0
        self.max_age_s = 0.0  # the longest an outcome waited for its batch

    def add(self, decision: Decision, outcome: Outcome) -> None:
        items = self._items
        items.append((decision, outcome))
        if len(items) >= self.max_outcomes:
            self.drain()
        elif len(items) == 1:
            self._first_at = time.perf_counter()
            try:
                self._timer = asyncio.get_running_loop().call_later(self.max_delay_s, self.drain)
            except RuntimeError:  # no loop: nothing to wait for
                self.drain()

    def drain(self) -> None:
        """Run the steps on everything queued now (nothing to do when empty). Never raises."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items = self._items
        if not items:
            return
        self._items = []
        age = time.perf_counter() - self._first_at
        self.batches += 1
        self.outcomes += len(items)
        self.max_size = max(self.max_size, len(items))
        self.max_age_s = max(self.max_age_s, age)
        for step in self.steps:
            try:
                step(items)
            except Exception:
                log.exception("a learning step failed on a batch of %d outcome(s)", len(items))

    def __len__(self) -> int:
        return len(self._items)
