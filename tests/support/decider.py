"""One `BanditDecider` builder for the tests: the real parts, a fixed clock and generator.

The trust region, rollout (general phase by default), budget guard over the in-process store
and the SLO monitor are the real ones; only what a test varies is a parameter. The grid is
5 × 5 unless a test says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from guards.budget import BudgetGuard
from guards.rollout import RolloutController
from guards.settings import BaselineSettings, CawsSettings, ConstraintsSettings, RolloutSettings, SloSettings
from guards.slo import SloMonitor
from guards.state import InProcessStore
from guards.trust_region import ModelLimits
from policies.base import Policy
from policies.baseline import UniformPolicy
from policies.records import Arm, RequestContext
from policies.settings import ArmGridSettings, RewardSettings
from proxy.decision import ArmSettings, ArmSpace, BanditDecider, DeciderSettings, DecisionGuards, ModelStageSettings
from proxy.decision.decider import RatesSource, TuneMode

GRID = ArmGridSettings(temperature_steps=5, max_tokens_steps=5)
NO_STAND_IN = BaselineSettings()


def build_decider(
    policy: Policy | None = None,
    *,
    caws: CawsSettings | None = None,
    phase: str = "general",
    holdout: float = 0.0,
    tune: TuneMode = "auto",
    min_signals: int = 50,
    constraints: ConstraintsSettings | None = None,
    grid: ArmGridSettings = GRID,
    stand_in: BaselineSettings = NO_STAND_IN,
    limits: ModelLimits | None = None,
    clock: Callable[[], float] = lambda: 1000.0,
    substitutes: dict[str, tuple[tuple[str, str], ...]] | None = None,
    limits_by_model: dict[str, ModelLimits] | None = None,
    prices: RatesSource | None = None,
    models: ModelStageSettings | None = None,
) -> BanditDecider:
    """A decider over one model with `limits` and one `[baseline]` stand-in for every task.

    `substitutes`: requested model -> its declared stand-ins (model, upstream); `limits_by_model`
    gives a model other limits than `limits`."""
    slo = SloMonitor(SloSettings())
    model = limits if limits is not None else ModelLimits()
    by_model = limits_by_model or {}
    declared = substitutes or {}
    arms = ArmSettings(constraints if constraints is not None else ConstraintsSettings(), grid, tune, min_signals)
    return BanditDecider(
        policy=policy if policy is not None else UniformPolicy(),
        arms=ArmSpace(
            arms, baseline_for=lambda task: stand_in, limits_for=lambda upstream, model_name: by_model.get(model_name, model),
            stand_ins_for=lambda upstream, model_name: declared.get(model_name, ()),
        ),
        guards=DecisionGuards(budget=BudgetGuard(caws or CawsSettings(budget_limit=10**12), InProcessStore()), slo=slo, prices=prices),
        rollout=RolloutController.create(RolloutSettings(), SloSettings(), slo, now=0.0, phase=phase),  # type: ignore[arg-type]
        settings=DeciderSettings(reward=RewardSettings(), holdout_fraction=holdout, models=models or ModelStageSettings()),
        rng=np.random.default_rng(0),
        clock=clock,
    )


class RecordingUpdates:
    """Mixin over a real policy: keeps the updates it receives (baseline, arm, reward) instead of learning them."""

    def __init__(self) -> None:
        self.updates: list[tuple[Arm, Arm, float]] = []

    def update(self, ctx: RequestContext, baseline: Arm, arm: Arm, reward: float) -> None:
        self.updates.append((baseline, arm, reward))
