"""Where a request's budget is charged: reserved when it is decided, settled when it finishes.

`guards.budget.BudgetGuard` holds the rules and the store (tokens or dollars, leases,
waivers); this desk is the decision room's only caller of it. It keeps each request's
reservation from `decide` until `observe` settles it with what was actually spent, and
admits passed-through requests (embeddings) the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from guards.budget import BudgetGuard, BudgetVerdict, Reservation
from policies.pricing import Rates
from policies.records import Arm, Decision, Outcome, RequestContext
from proxy.decision.arm_space import StandIn

dlog = logging.getLogger("thermostat.decider")


class BudgetExceeded(Exception):
    """The token budget of this window is spent and `caws.on_exhausted = reject`.

    A domain error, not an HTTP one: the decision room knows nothing of status codes;
    the edge maps it to 429 `budget_exceeded`.
    """


class BudgetUnavailable(Exception):
    """The budget could not be checked in time, or (`unpriced`) a dollar budget has no price for the
    model, and `caws.on_exhausted = reject` (the edge answers 503)."""

    def __init__(self, unpriced: bool = False) -> None:
        super().__init__("unpriced" if unpriced else "unavailable")
        self.unpriced = unpriced


def refuse_if_rejected(verdict: BudgetVerdict) -> None:
    """A budget refusal as the domain error the edge maps to 429 (spent) or 503 (no answer in time)."""
    if verdict.action == "reject":
        raise BudgetUnavailable() if verdict.reason == "guard_unavailable" else BudgetExceeded()


class RatesSource(Protocol):
    def rates(self, upstream: str, model: str) -> Rates | None: ...


class BudgetDesk:
    """One request's budget from reservation to settlement (module docstring)."""

    def __init__(self, guard: BudgetGuard, prices: RatesSource | None = None) -> None:
        self.guard = guard
        self.prices = prices  # a dollar budget reserves at the model's price (caws.unit = "usd")
        self.reservations: dict[str, Reservation] = {}

    def rates_for(self, ctx: RequestContext) -> Rates | None:
        """The model's prices when the budget counts dollars (a cached look-up); None otherwise."""
        if self.guard.settings.unit != "usd" or self.prices is None:
            return None
        return self.prices.rates(ctx.upstream, ctx.model)

    def stand_in_rates(self, stand_ins: Mapping[str, StandIn]) -> dict[str, Rates] | None:
        """Each offered stand-in's prices when the budget counts dollars (its arms are reserved and compared at them)."""
        if not stand_ins or self.guard.settings.unit != "usd" or self.prices is None:
            return None
        found = {m: self.prices.rates(s.upstream, m) for m, s in stand_ins.items()}
        return {m: r for m, r in found.items() if r is not None}

    async def verdict(
        self, ctx: RequestContext, allowed: list[Arm], chosen: int | None, base: Arm, confidence: float, now: float,
        stand_ins: Mapping[str, StandIn] | None = None,
    ) -> BudgetVerdict:
        """Reserve for what would be sent (`chosen`, else the baseline), maybe a cheaper arm, maybe a refusal."""
        return await self.guard.decide(
            allowed=allowed,
            chosen=chosen,
            baseline=base,
            task_type=ctx.task_type,
            prompt_tokens=ctx.prompt_tokens_est,
            confidence=confidence,
            now=now,
            rates=self.rates_for(ctx),
            model_rates=self.stand_in_rates(stand_ins) if stand_ins else None,
        )

    def hold(self, request_id: str, verdict: BudgetVerdict) -> int:
        """Keep the verdict's reservation until the request finishes; the tokens reserved."""
        if verdict.reservation is None:
            return 0
        self.reservations[request_id] = verdict.reservation
        return verdict.reservation.tokens

    async def release(self, verdict: BudgetVerdict, now: float) -> None:
        """Give a reservation back at once (`explain`: nothing was sent)."""
        if verdict.reservation is not None:
            await self.guard.release(verdict.reservation, now)

    async def settle(self, decision: Decision, outcome: Outcome, now: float) -> None:
        """Count what a decided request spent against its reservation; never raises."""
        reservation = self.reservations.pop(decision.request_id, None)
        if reservation is None:
            return
        try:
            used = self.guard.spent(outcome.prompt_tokens, outcome.completion_tokens, outcome.cost_usd)
            if used is not None:
                await self.guard.settle(reservation, used, now)
            elif outcome.error_class == "client_disconnected" or outcome.prompt_tokens is not None or outcome.completion_tokens is not None:
                # it may still have been generated, or it was (usage without a price): the reservation is what it counts
                await self.guard.settle(reservation, reservation.tokens, now)
            else:
                await self.guard.release(reservation, now)
        except Exception:
            dlog.exception("budget settlement failed for %s", decision.request_id)

    async def admit(self, task_type: str, prompt_tokens: int, base: Arm, now: float) -> Reservation | None:
        """The budget's admission for a passed-through request that spends tokens (embeddings).

        Nothing is tuned on it, so it reserves what it sends, the prompt (its output is not
        generated text), and is refused exactly as a decided request would be: spent budget
        under `on_exhausted = "reject"` raises `BudgetExceeded`, no answer in time
        `BudgetUnavailable`.
        """
        verdict = await self.guard.decide(
            allowed=[base], chosen=None, baseline=base, task_type=task_type, prompt_tokens=prompt_tokens, confidence=None, now=now,
        )
        refuse_if_rejected(verdict)
        return verdict.reservation

    async def settle_admitted(self, reservation: Reservation | None, tokens: int | None, now: float) -> None:
        """Count what an admitted request spent (None: unknown, its reservation counts); never raises."""
        if reservation is None:
            return
        try:
            await self.guard.settle(reservation, reservation.tokens if tokens is None else tokens, now)
        except Exception:
            dlog.exception("budget settlement of a passed-through request failed")
