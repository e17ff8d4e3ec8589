"""The rollout's clock: SLO cooldowns and promotions happen on time even when no traffic arrives.

Owned next to the decider it ticks (the decider holds the live rollout controller). The
OPE evidence promotion needs (improvement lower bound over baseline on the exploration
data) is recomputed from the decision log every `ope_interval_s`, off the request path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from policies.base import Adaptive
from proxy.common import cancel_and_wait, every
from proxy.learning.evidence import compute_ope_evidence

if TYPE_CHECKING:
    from proxy.decision import BanditDecider
    from proxy.store import LogStore

log = logging.getLogger("thermostat")


class RolloutTicker:
    """Every `interval_s`: refresh the evidence when it is due, run `each_tick` listeners, tick the rollout."""

    def __init__(
        self, decider: BanditDecider, log_store: LogStore, *, interval_s: float = 1.0, ope_interval_s: float = 60.0,
        each_tick: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.decider = decider
        self.log_store = log_store
        self.interval_s = interval_s
        self.ope_interval_s = ope_interval_s
        self.each_tick = tuple(each_tick)
        self._task: asyncio.Task[None] | None = None
        self._last_ope = 0.0

    def start(self) -> None:
        self._last_ope = 0.0  # evidence first thing after a (re)start
        self._task = every(self.interval_s, self._tick, "thermostat-rollout-tick")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _tick(self) -> None:
        now = time.time()
        if now - self._last_ope >= self.ope_interval_s:
            self._last_ope = now
            try:
                self.decider.ope_evidence = await compute_ope_evidence(self.log_store, self.decider)
            except Exception as exc:  # the store may be down; promotion just waits
                log.warning("OPE evidence for promotion not computed: %s", exc)
        for listener in self.each_tick:
            listener()
        try:
            self.decider.maybe_tick(now, force=True)
        except Exception:
            log.exception("rollout tick failed")


class PolicyEpochs:
    """Each tick: discount the statistics once a `[policy] half_life_s` epoch boundary has passed.

    A no-op for a policy without discounting; the epoch is wall-clock time shared by every
    replica, so their decays line up and merges stay additive (policies.base.Discount)."""

    def __init__(self, policy: object, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.clock = clock

    def __call__(self) -> None:
        policy = self.policy
        if isinstance(policy, Adaptive) and policy.discount.enabled:
            policy.advance(policy.discount.epoch_at(self.clock()))
