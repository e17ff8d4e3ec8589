"""The sampling strategy over the allowed arms: the model, then temperature, from signals that see them, then the rest.

One strategy behind one small interface (`Sampler`: `pmf`, `choose`), used by the live
decision, `explain` and the offline replay alike, so the probabilities logged, shown and
evaluated are one computation. Why two stages: `TwoStageSampler.pmf`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec
import numpy as np

from policies.base import Choice, Correction, Policy, apply_floor, sample_index
from policies.records import Arm, Params, RequestContext
from proxy.decision.model_stage import ModelEvidence, ModelStageSettings, model_arm, model_context

TEMPERATURE_STATISTICS = "~temperature"
"""Suffix of the task type under which the policy keeps its temperature-only statistics (`TwoStageSampler.pmf`)."""


def temperature_context(ctx: RequestContext) -> RequestContext:
    """The context under which temperatures are compared: statistics fed by quality signals only.

    A separate task type gives these statistics their own keys in the same policy, so they
    are exported, merged across replicas and decayed like every other additive statistic,
    with no second policy to keep in step.
    """
    return msgspec.structs.replace(ctx, task_type=ctx.task_type + TEMPERATURE_STATISTICS)


def temperature_arm(temperature: float, base: Arm, model: str | None = None) -> Arm:
    """A temperature's arm in the temperature-only statistics: the baseline's cap and effort stand for every cap
    (a stand-in's temperatures are its own arms, `model`)."""
    return Arm(temperature=temperature, max_tokens=base.max_tokens, effort=base.effort, model=model)


def model_groups(allowed: list[Arm]) -> dict[str | None, list[int]]:
    """The rows of `allowed` per model, in order of first appearance (the requested model's arms come first)."""
    groups: dict[str | None, list[int]] = {}
    for i, a in enumerate(allowed):
        groups.setdefault(a.model, []).append(i)
    return groups


def _all_share(allowed: list[Arm], field: str) -> bool:
    """Do all of `allowed` share one value of `field` (one group by it), without building the groups?"""
    if not allowed:
        return True
    first = getattr(allowed[0], field)
    for a in allowed:
        value = getattr(a, field)
        if value is not first and value != first:  # a dict key's test: identity, then equality
            return False
    return True


def _no_stand_ins(_upstream: str, _model: str) -> bool:
    return False


class Sampler(Protocol):
    def pmf(self, ctx: RequestContext, base: Arm, allowed: list[Arm]) -> np.ndarray: ...

    def choose(self, ctx: RequestContext, base: Arm, allowed: list[Arm], rng: np.random.Generator) -> Choice: ...


class TwoStageSampler:
    """The model and temperature from signal-only statistics, then the other knobs from every reward (`pmf`)."""

    def __init__(self, policy: Policy, models: ModelEvidence | None = None) -> None:
        self.policy = policy
        self.models = models if models is not None else ModelEvidence(ModelStageSettings())
        # (upstream, model) -> does it declare stand-ins (the arm space's `stand_ins_for`; set by the decider)
        self.has_stand_ins: Callable[[str, str], object] = _no_stand_ins

    def model_pmf(self, ctx: RequestContext, base: Arm, models: list[str | None]) -> np.ndarray:
        """P(model): exploration shares until a stand-in is shown no worse, then the model-stage statistics
        (`proxy.decision.model_stage.ModelEvidence.shares`)."""
        mctx = model_context(ctx)

        def propensities(rows: list[int]) -> list[float]:
            return [float(p) for p in self.policy.propensities(mctx, base, [model_arm(models[j], base) for j in rows])]

        return np.asarray(self.models.shares(ctx, models, propensities), dtype=np.float64)

    def pmf(self, ctx: RequestContext, base: Arm, allowed: list[Arm]) -> np.ndarray:
        """What `decide` plays over `allowed`: the model first (when stand-ins are offered), then `within`.

        With stand-ins, P(arm) = P(model) · P(arm | model) (`model_pmf`, then `within` over that
        model's arms), an exact product, so IPS/DR stay unbiased; without them, `within` alone.
        """
        groups = model_groups(allowed)
        if len(groups) <= 1:
            return self.within(ctx, base, allowed)
        models = list(groups)
        p_m = self.model_pmf(ctx, base, models)
        out = np.zeros(len(allowed))
        for j, rows in enumerate(groups.values()):
            out[rows] = p_m[j] * self.within(ctx, base, [allowed[i] for i in rows], models[j])
        return out

    def within(self, ctx: RequestContext, base: Arm, allowed: list[Arm], model: str | None = None) -> np.ndarray:
        """What `decide` plays over `allowed`: temperature from signal-only statistics, then the rest.

        Why two stages. The automatic quality score cannot see temperature (it is 1 unless an
        answer is cut, empty, refused or invalid), while hotter answers run longer and cost
        more, so automatic rewards alone pull every task cold whatever the true quality.
        Counting signals before temperature moves is not enough when signals are sparse: the
        arms would still be ranked mostly on automatic rewards. So when `allowed` spans
        several temperatures:

        1. a temperature is drawn from statistics fed only by signals that see it (explicit
           feedback and judge scores, `learn_signal`; not the one-sided regeneration marks,
           proxy/decision/feedback.py `ONE_SIDED`), kept under
           `temperature_context`, one arm per temperature;
        2. among the allowed arms at that temperature (max_tokens, effort), from the usual
           statistics, which every reward feeds: those arms differ only in what the
           automatic score does see (cuts, tokens, latency).

        The played probability is P(t)·P(arm | t), mixed with the policy's propensity floor
        over all allowed arms so the logged propensities keep the support OPE needs. With one
        temperature this is the policy's own pmf.
        """
        temps = list(dict.fromkeys(a.temperature for a in allowed))
        if len(temps) <= 1:
            return np.asarray(self.policy.propensities(ctx, base, allowed), dtype=np.float64)
        t_arms = [temperature_arm(t, base, model) for t in temps]
        p_t = np.asarray(self.policy.propensities(temperature_context(ctx), base, t_arms), dtype=np.float64)
        out = np.zeros(len(allowed))
        for j, t in enumerate(temps):
            rows = [i for i, a in enumerate(allowed) if a.temperature == t]
            p_m = np.asarray(self.policy.propensities(ctx, base, [allowed[i] for i in rows]), dtype=np.float64)
            out[rows] = p_t[j] * p_m
        return apply_floor(out, self.propensity_floor())

    def propensity_floor(self) -> float:
        """The policy's `min_propensity` (0 for policies without one)."""
        settings = getattr(self.policy, "settings", None)
        return float(getattr(settings, "min_propensity", 0.0))

    def choose(self, ctx: RequestContext, base: Arm, allowed: list[Arm], rng: np.random.Generator) -> Choice:
        """A draw from `pmf` with its exact propensity: the model first (when stand-ins are offered), then `choose_within`."""
        if _all_share(allowed, "model"):  # the common case, decided without building the groups
            return self.choose_within(ctx, base, allowed, rng)
        groups = model_groups(allowed)
        models = list(groups)
        p_m = self.model_pmf(ctx, base, models)
        j = sample_index(p_m, rng)
        rows = list(groups.values())[j]
        inner = self.choose_within(ctx, base, [allowed[i] for i in rows], rng, models[j])
        return Choice(index=rows[inner.index], propensity=float(p_m[j]) * inner.propensity)

    def choose_within(
        self, ctx: RequestContext, base: Arm, allowed: list[Arm], rng: np.random.Generator, model: str | None = None
    ) -> Choice:
        """A draw from `within` with its exact propensity (the policy's own `choose` when there is one temperature).

        Only the tables it needs are read: the temperature stage and the chosen temperature's
        arms, so a decision costs two table look-ups however many temperatures there are.
        With probability K·floor a uniformly random allowed arm, as `apply_floor` mixes it.
        """
        if _all_share(allowed, "temperature"):  # the common case, decided without building the list
            return self.policy.choose(ctx, base, allowed, rng)
        temps = list(dict.fromkeys(a.temperature for a in allowed))
        k, floor = len(allowed), self.propensity_floor()
        explore = k * floor
        u = rng.random()
        p_t = np.asarray(
            self.policy.propensities(temperature_context(ctx), base, [temperature_arm(t, base, model) for t in temps]), dtype=np.float64
        )
        if explore >= 1.0:
            return Choice(index=min(int(u * k), k - 1), propensity=1.0 / k)
        if u < explore:
            index = min(int(u / floor), k - 1)
            j = temps.index(allowed[index].temperature)
        else:
            j = sample_index(p_t, rng)
            index = -1
        rows = [i for i, a in enumerate(allowed) if a.temperature == temps[j]]
        p_m = np.asarray(self.policy.propensities(ctx, base, [allowed[i] for i in rows]), dtype=np.float64)
        if index < 0:
            index = rows[sample_index(p_m, rng)]
        within = float(p_m[rows.index(index)])
        return Choice(index=index, propensity=floor + (1.0 - explore) * float(p_t[j]) * within)

    def learn_signal(
        self, ctx: RequestContext, baseline: Params, sent: Params, new_reward: float, previous: float | None, *, logged_version: str
    ) -> Correction:
        """Feed a quality signal's reward to the signal-only statistics: temperature (`within`, stage 1) and,
        for a task with stand-ins, the model stage (`model_pmf`).

        `previous`: the reward of an earlier signal for the same request that is in those
        statistics already (a judge score now replaced by explicit feedback, an overwrite),
        swapped with `correct` so a request counts once; None adds the reward.
        """
        base = baseline.arm()
        arm = sent.arm(baseline)
        stages = [(temperature_context(ctx), temperature_arm(base.temperature, base), temperature_arm(arm.temperature, base, arm.model))]
        if arm.model is not None or self.has_stand_ins(ctx.upstream, ctx.model):
            stages.append((model_context(ctx), model_arm(None, base), model_arm(arm.model, base)))
        done: Correction = "updated"
        for sctx, s_base, s_arm in stages:
            if previous is None:
                self.policy.update(sctx, s_base, s_arm, new_reward)
            else:
                done = self.policy.correct(sctx, s_base, s_arm, previous, new_reward, logged_version=logged_version)
        return done
