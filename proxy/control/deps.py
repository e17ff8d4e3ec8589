"""What the control API needs from the rest of the process, typed, in one frozen record.

The controllers get it through Litestar's dependency injection (`deps: ControlDeps`),
so a handler can reach only what is listed here, and a test can build the control API
around its own services instead of a whole runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from litestar.di import NamedDependency

from guards.budget import BudgetGuard
from guards.rollout import RolloutController, RolloutEvent
from guards.slo import SloMonitor
from guards.state import StateStore
from policies.records import RequestContext
from proxy.config import Config
from proxy.control.auth import AdminAuth
from proxy.decision import BanditDecider, DecisionRegistry, FeedbackBook, FeedbackServices, SignalBook
from proxy.learning import KnobPatch
from proxy.store import LogStore, Recorder


class JudgeSpendSource(Protocol):
    """What the judge's calls cost in this process (proxy.learning.listeners.JudgeCharge)."""

    cost_usd: float
    calls: int
    unpriced: int


class RoutedUpstream(Protocol):
    @property
    def name(self) -> str: ...


class Upstreams(Protocol):
    """What the control API reads of the edge's `UpstreamPool`: the configured upstreams, and which one serves a model."""

    @property
    def upstreams(self) -> Sequence[object]: ...

    def route(self, model: str | None) -> RoutedUpstream | None: ...


class ContextBuilder(Protocol):
    """The runtime's `build_context` (task types and models folded past their caps)."""

    def __call__(self, body: dict[str, object], *, task_type: str, endpoint: str, upstream: str = "") -> RequestContext: ...


@dataclass(frozen=True, slots=True)
class ControlDeps:
    """Everything a control handler may touch; frozen, so a handler cannot rewire the process."""

    config: Config
    auth: AdminAuth
    decider: BanditDecider  # also holds the live rollout controller and the policy (both replaced at start-up)
    budget: BudgetGuard
    slo: SloMonitor
    log_store: LogStore
    recorder: Recorder
    registry: DecisionRegistry
    state_store: StateStore
    pool: Upstreams  # the edge's UpstreamPool
    build_context: ContextBuilder
    learning: FeedbackServices  # explicit feedback re-enters the decision room here, as every later signal does
    on_rollout_events: Callable[[list[RolloutEvent]], None]
    patch_chat: KnobPatch  # the edge's chat adapter patch (CHAT.patch): what a shadow test would send
    started_at: float
    feedback: FeedbackBook = field(default_factory=FeedbackBook)
    signals: SignalBook = field(default_factory=SignalBook)  # judge/explicit pairs, validator counts
    judge_spend: JudgeSpendSource | None = None  # the judge's calls, priced

    @property
    def rollout(self) -> RolloutController:
        """The live controller: start-up swaps it for the stored state, so it is never captured."""
        return self.decider.rollout


Deps = NamedDependency[ControlDeps]
"""How a handler asks for the services: `deps: Deps` (injected by name, see `build_control`)."""
