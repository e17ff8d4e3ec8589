"""The sampling strategy over the allowed arms: temperature first, from signals that see it, then the rest.

One strategy behind one small interface (`Sampler`: `pmf`, `choose`), used by the live
decision, `explain` and the offline replay alike, so the probabilities logged, shown and
evaluated are one computation. Why two stages: `TwoStageSampler.pmf`.
"""

from __future__ import annotations

from typing import Protocol

import msgspec
import numpy as np

from policies.base import Choice, Correction, Policy, apply_floor, sample_index
from policies.records import Arm, Params, RequestContext

TEMPERATURE_STATISTICS = "~temperature"
"""Suffix of the task type under which the policy keeps its temperature-only statistics (`TwoStageSampler.pmf`)."""


def temperature_context(ctx: RequestContext) -> RequestContext:
    """The context under which temperatures are compared: statistics fed by quality signals only.

    A separate task type gives these statistics their own keys in the same policy, so they
    are exported, merged across replicas and decayed like every other additive statistic,
    with no second policy to keep in step.
    """
    return msgspec.structs.replace(ctx, task_type=ctx.task_type + TEMPERATURE_STATISTICS)


def temperature_arm(temperature: float, base: Arm) -> Arm:
    """A temperature's arm in the temperature-only statistics: the baseline's cap and effort stand for every cap."""
    return Arm(temperature=temperature, max_tokens=base.max_tokens, effort=base.effort)


class Sampler(Protocol):
    def pmf(self, ctx: RequestContext, base: Arm, allowed: list[Arm]) -> np.ndarray: ...

    def choose(self, ctx: RequestContext, base: Arm, allowed: list[Arm], rng: np.random.Generator) -> Choice: ...


class TwoStageSampler:
    """Temperature from signal-only statistics, then the other knobs from every reward (`pmf`)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def pmf(self, ctx: RequestContext, base: Arm, allowed: list[Arm]) -> np.ndarray:
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
        t_arms = [temperature_arm(t, base) for t in temps]
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
        """A draw from `pmf` with its exact propensity (the policy's own `choose` when there is one temperature).

        Only the tables it needs are read: the temperature stage and the chosen temperature's
        arms, so a decision costs two table look-ups however many temperatures there are.
        With probability K·floor a uniformly random allowed arm, as `apply_floor` mixes it.
        """
        temps = list(dict.fromkeys(a.temperature for a in allowed))
        if len(temps) <= 1:
            return self.policy.choose(ctx, base, allowed, rng)
        k, floor = len(allowed), self.propensity_floor()
        explore = k * floor
        u = rng.random()
        p_t = np.asarray(self.policy.propensities(temperature_context(ctx), base, [temperature_arm(t, base) for t in temps]), dtype=np.float64)
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
        """Feed a temperature-visible signal's reward to the temperature-only statistics (`pmf`, stage 1).

        `previous`: the reward of an earlier signal for the same request that is in those
        statistics already (a judge score now replaced by explicit feedback, an overwrite),
        swapped with `correct` so a request counts once; None adds the reward.
        """
        base = baseline.arm()
        arm = sent.arm(baseline)
        tctx = temperature_context(ctx)
        t_base, t_arm = temperature_arm(base.temperature, base), temperature_arm(arm.temperature, base)
        if previous is None:
            self.policy.update(tctx, t_base, t_arm, new_reward)
            return "updated"
        return self.policy.correct(tctx, t_base, t_arm, previous, new_reward, logged_version=logged_version)
