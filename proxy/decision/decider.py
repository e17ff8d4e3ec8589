"""The decider: one request context in, the parameters to send and a Decision out.

The proxy edge only knows this interface; the bandit, the trust region, the budget,
the SLO fallback and the rollout plug in behind it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, Protocol

import msgspec
import numpy as np

from guards.budget import BudgetGuard, BudgetVerdict, Reservation
from guards.conservative import ConservativeMonitor
from guards.rollout import Effective, OpeEvidence, RolloutController, RolloutEvent, assign
from guards.settings import BaselineSettings, ConstraintsSettings
from guards.slo import SloMonitor
from guards.truncation import TruncationGuard, TruncationKey
from guards.trust_region import Freedom, ModelLimits, allowed_arms, enforce, max_tokens_delta, temperature_range
from policies.arms import candidate_arms
from policies.base import Choice, Correction, Policy, apply_floor, sample_index
from policies.context import context_fingerprint
from policies.pricing import Rates
from policies.records import Arm, Decision, Outcome, Params, RequestContext
from policies.reward import BaselineCosts
from policies.settings import ArmGridSettings, RewardSettings
from proxy.decision.batch import OutcomeBatch


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


class Decider(Protocol):
    async def decide(self, ctx: RequestContext, *, request_id: str, assignment_key: str) -> Decision:
        """Choose what to send. May raise `BudgetExceeded` or `BudgetUnavailable` (the edge answers 429 / 503)."""
        ...

    async def admit(self, task_type: str, prompt_tokens: int) -> Reservation | None:
        """Budget a passed-through request that spends tokens (nothing is tuned); may raise like `decide`."""
        ...

    async def settle_admitted(self, reservation: Reservation | None, tokens: int | None) -> None:
        """Count what an admitted request spent (None: unknown, its reservation counts)."""
        ...

    async def observe(self, decision: Decision, outcome: Outcome) -> None:
        """Learn from a finished request (called after the response is complete)."""
        ...


# ---------------------------------------------------------------------------------
# The bandit decider: trust region -> rollout -> policy -> budget -> send.
# ---------------------------------------------------------------------------------

dlog = logging.getLogger("thermostat.decider")

# Errors that count against the SLO: the upstream failed, not the client.
UPSTREAM_FAILURES = frozenset({"timeout", "connect", "protocol", "upstream_stream_error"})


NOMINAL_TEMPERATURE = 1.0
"""Label for an omitted temperature on a model that declares no `default_temperature` (OpenAI's default).

It only names the arm for the policy; such a temperature is never tuned or sent."""
NOMINAL_MAX_TOKENS = 1024
"""Label for an omitted max_tokens without a stand-in: names the arm and sizes the budget reservation; never sent."""
HOLDOUT_SALT = "holdout"
"""Salt of the holdout hash, so the holdout is independent of the rollout share (which uses no salt)."""

TuneMode = Literal["auto", "always", "never"]

TEMPERATURE_STATISTICS = "~temperature"
"""Suffix of the task type under which the policy keeps its temperature-only statistics (`BanditDecider.pmf`)."""


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


class Reference(NamedTuple):
    """The baseline of one request: what it sends, the arm it stands for, and what may move around it."""

    arm: Arm  # concrete values: the policy's and the budget's reference point, logged as the decision's baseline
    sent: Params  # what the baseline sends: the client's knobs plus explicit stand-ins, nothing else
    freedom: Freedom


def reference(
    ctx: RequestContext,
    stand_in: BaselineSettings,
    limits: ModelLimits,
    constraints: ConstraintsSettings,
    *,
    temperature_evidence: bool,
) -> Reference:
    """The baseline: the client's own values, else an explicit `[baseline.<task>]` stand-in, else nothing.

    A knob the client omitted keeps the provider's default: it is not sent, and it moves
    only with evidence and a declared reference (stand-in or the model's
    `default_temperature`); an omitted max_tokens without a stand-in never gets a cap.
    """
    if not limits.accepts_temperature or (ctx.endpoint == "anthropic" and ctx.client_temperature is None):
        # The model refuses a temperature, or the Messages API got none (the current anthropic SDK has
        # no such parameter): whatever the client sent is forwarded as it came, nothing is added or moved.
        low, high = temperature_range(constraints, limits)
        label = ctx.client_temperature if ctx.client_temperature is not None else NOMINAL_TEMPERATURE
        temperature, sent_t, tune_t = min(max(label, low), high), ctx.client_temperature, False
    elif limits.fixed_temperature is not None:
        # The model takes one temperature: nothing to tune; a client's value is replaced by it when optimised.
        temperature, sent_t, tune_t = limits.fixed_temperature, ctx.client_temperature, False
    elif ctx.client_temperature is not None:
        temperature, sent_t, tune_t = ctx.client_temperature, ctx.client_temperature, temperature_evidence
    elif stand_in.temperature is not None:
        temperature, sent_t, tune_t = stand_in.temperature, stand_in.temperature, temperature_evidence
    elif limits.default_temperature is not None:
        temperature, sent_t, tune_t = limits.default_temperature, None, temperature_evidence
    else:
        low, high = temperature_range(constraints, limits)  # a label inside the model's range keeps max_tokens arms valid
        temperature, sent_t, tune_t = min(max(NOMINAL_TEMPERATURE, low), high), None, False
    cap: int | None = None
    if ctx.client_max_tokens is not None:
        max_tokens, sent_m, tune_m = ctx.client_max_tokens, ctx.client_max_tokens, True
        cap = None if constraints.raise_client_max_tokens else ctx.client_max_tokens
    else:
        ceiling = min(constraints.max_tokens, limits.max_tokens or constraints.max_tokens)
        if stand_in.max_tokens is not None:
            max_tokens = min(stand_in.max_tokens, ceiling)
            sent_m, tune_m = max_tokens, True
        else:
            max_tokens, sent_m, tune_m = min(NOMINAL_MAX_TOKENS, ceiling), None, False
    effort, tune_e = reference_effort(ctx, stand_in, limits)
    t = round(float(temperature), 3)
    return Reference(
        arm=Arm(temperature=t, max_tokens=int(max_tokens), effort=effort),
        sent=Params(temperature=sent_t, max_tokens=sent_m, effort=effort),
        freedom=Freedom(temperature=tune_t, max_tokens=tune_m, max_tokens_cap=cap, effort=tune_e),
    )


# Wire formats whose body has a reasoning-effort field (legacy completions has none).
EFFORT_FORMATS = frozenset({"chat", "responses", "anthropic"})


def reference_effort(ctx: RequestContext, stand_in: BaselineSettings, limits: ModelLimits) -> tuple[str | None, bool]:
    """The baseline effort and whether it may move.

    The client's level, else a `[baseline.<task>] effort` stand-in the model accepts (on a
    format that has the field); it moves only on a model whose `models_config` lists its
    `efforts`, since an unlisted model may refuse a level it was never asked for.
    """
    if ctx.client_effort is not None:
        return ctx.client_effort, bool(limits.efforts) and ctx.client_effort in limits.efforts
    if stand_in.effort is not None and ctx.endpoint in EFFORT_FORMATS and stand_in.effort in limits.efforts:
        return stand_in.effort, True
    return None, False


def tuned_params(arm: Arm, ref: Reference) -> Params:
    """The wire parameters for `arm`: only knobs the baseline sends, or an omitted one moved off its default."""
    if ref.sent.temperature is not None or arm.temperature != ref.arm.temperature:
        temperature: float | None = arm.temperature
    else:
        temperature = None
    max_tokens = arm.max_tokens if ref.sent.max_tokens is not None else None
    effort = arm.effort if ref.sent.effort is not None else None
    return Params(temperature=temperature, max_tokens=max_tokens, effort=effort)


class Explanation(NamedTuple):
    """`BanditDecider.explain`: the decision `decide` would make, and what it was made from."""

    decision: Decision  # as `decide` would build it (mode "rejected" where `decide` raises 429/503)
    reference: Reference
    allowed: tuple[Arm, ...]  # the trust region's arms, in the policy's order
    pmf: tuple[float, ...]  # the policy's probability of each allowed arm
    limits: ModelLimits
    effective: Effective  # the rollout state it was decided under
    held_out: bool
    assigned: bool | None  # drawn into the rollout share (None: no assignment key given)
    budget: BudgetVerdict


def _never(_: str) -> bool:
    return False


class RatesSource(Protocol):
    def rates(self, upstream: str, model: str) -> Rates | None: ...


class QualitySignals:
    """Per task type, the quality signals that can see temperature (explicit feedback so far).

    Read on the request path without I/O (a few bytes per task type); the runtime's
    `proxy.learning.signal_sync.SyncedQualitySignals` persists and shares the counts. Task types are client-controlled: past `max_task_types` new ones
    are not counted, which keeps them on the safe side (temperature untouched).
    """

    def __init__(self, max_task_types: int = 4096) -> None:
        self.max_task_types = max_task_types
        self.counts: dict[str, int] = {}

    def add(self, task_type: str, n: int = 1) -> None:
        if task_type in self.counts or len(self.counts) < self.max_task_types:
            self.counts[task_type] = self.counts.get(task_type, 0) + n

    def count(self, task_type: str) -> int:
        return self.counts.get(task_type, 0)


def unoptimised_mode(eff: Effective, held_out: bool = False, task_rolled_back: bool = False) -> str:
    """Why a request is not optimised: disabled, rolled back, the holdout, shadow phase, or outside the rollout share.

    The holdout stays "holdout" in a task the conservative monitor rolled back, so the
    baseline's on-policy stream keeps its meaning.
    """
    if eff.rollback is not None:
        return "off" if eff.rollback.trigger == "disabled" else "rollback"
    if held_out:
        return "holdout"
    if task_rolled_back:
        return "rollback"
    if eff.phase == "shadow" or eff.fraction == 0.0:
        return "shadow"
    return "holdout"


def is_upstream_failure(outcome: Outcome) -> bool:
    return outcome.status >= 500 or outcome.error_class in UPSTREAM_FAILURES


class BanditDecider:
    """Composes the guards and a policy into one decision per request.

    Order matters: the trust region bounds what the policy may pick; the rollout
    decides whether this request is optimised at all (the policy still decides and is
    logged when it is not, so shadow traffic shows what it would have done); the
    budget reserves tokens for what is actually sent and may swap the arm for a
    cheaper one. Whatever happens, `enforce` is the last word before the body is
    patched, so nothing outside the trust region ever leaves.
    """

    def __init__(
        self,
        *,
        policy: Policy,
        budget: BudgetGuard,
        rollout: RolloutController,
        slo: SloMonitor,
        constraints: ConstraintsSettings,
        grid: ArmGridSettings,
        reward_settings: RewardSettings,
        baseline_for: Callable[[str], BaselineSettings],
        limits_for: Callable[[str, str], ModelLimits],
        rng: np.random.Generator,
        clock: Callable[[], float] = time.time,
        require_caws: bool = True,
        tick_interval_s: float = 0.25,
        on_events: Callable[[list[RolloutEvent]], None] | None = None,
        tune_temperature: TuneMode = "auto",
        min_quality_signals: int = 50,
        holdout_fraction: float = 0.05,
        signals: QualitySignals | None = None,
        conservative: ConservativeMonitor | None = None,
        prices: RatesSource | None = None,
    ) -> None:
        self.policy = policy
        self.budget = budget
        self.rollout = rollout
        self.slo = slo
        self.constraints = constraints
        self.grid = grid
        self.reward_settings = reward_settings
        self.baseline_for = baseline_for
        self.limits_for = limits_for
        self.rng = rng
        self.clock = clock
        self.require_caws = require_caws
        self.tick_interval_s = tick_interval_s
        self.on_events = on_events
        self.tune_temperature = tune_temperature
        self.min_quality_signals = min_quality_signals
        self.holdout_fraction = holdout_fraction
        self.signals = signals if signals is not None else QualitySignals()
        # Per task type: optimised vs holdout; a task it rolls back gets the baseline (mode "rollback").
        self.conservative = conservative
        self.prices = prices  # a dollar budget reserves at the model's price (caws.unit = "usd")
        self.costs = BaselineCosts()
        self.truncation = TruncationGuard(constraints.max_extra_truncation)
        self.reservations: dict[str, Reservation] = {}
        self._last_tick = 0.0
        self._arm_cache: dict[tuple[Arm, Freedom, str, str], list[Arm]] = {}
        self.ope_evidence: OpeEvidence | None = None  # refreshed off the hot path by the runtime
        # Task type -> is the judge muted there (`proxy.decision.judge_trust.JudgeTrust.muted`); set by the runtime.
        self.judge_muted: Callable[[str], bool] = _never
        # Policy updates and length evidence per batch of finished requests (`learn_in_batches`); None: per request.
        self.learning: OutcomeBatch | None = None

    @property
    def policy_name(self) -> str:
        return self.policy.name

    def task_rolled_back(self, task_type: str) -> bool:
        return self.conservative is not None and self.conservative.is_rolled_back(task_type)

    def temperature_evidence(self, task_type: str) -> bool:
        """May temperature move for this task type (`tune_temperature` and the explicit signals so far)?

        Not while the judge is muted for it: the signals counted so far are mostly its scores,
        which were taken back (`proxy.decision.feedback.retract_judge`).
        """
        if self.tune_temperature == "auto":
            return self.signals.count(task_type) >= self.min_quality_signals and not self.judge_muted(task_type)
        return self.tune_temperature == "always"

    def allowed_for(self, ctx: RequestContext) -> tuple[Arm, list[Arm], ModelLimits]:
        """The reference arm, the arms the policy may pick from, and the model's limits."""
        ref, allowed, limits = self.reference_for(ctx)
        return ref.arm, allowed, limits

    def reference_for(self, ctx: RequestContext) -> tuple[Reference, list[Arm], ModelLimits]:
        """Like `allowed_for`, with the whole `Reference` (what the baseline sends, what may move)."""
        limits = self.limits_for(ctx.upstream, ctx.model)
        ref = reference(
            ctx, self.baseline_for(ctx.task_type), limits, self.constraints,
            temperature_evidence=self.temperature_evidence(ctx.task_type),
        )
        base, freedom = ref.arm, ref.freedom
        key = (base, freedom, ctx.upstream, ctx.model)
        allowed = self._arm_cache.get(key)
        if allowed is None:
            grid = self.grid
            if freedom.max_tokens_cap is not None and freedom.max_tokens_cap <= base.max_tokens:
                # Only the lower half of the max_tokens axis is allowed: twice the steps keep as many arms there.
                grid = msgspec.structs.replace(grid, max_tokens_steps=2 * grid.max_tokens_steps - 1)
            cands = candidate_arms(
                base,
                max_delta_temperature=self.constraints.max_delta_temperature if freedom.temperature else 0.0,
                max_delta_max_tokens=max_tokens_delta(base.max_tokens, self.constraints) if freedom.max_tokens else 0,
                grid=grid,
                max_delta_effort_levels=self.constraints.max_delta_effort_levels if freedom.effort else 0,
                efforts=limits.efforts,
            )
            allowed = allowed_arms(cands, base, self.constraints, limits, freedom)
            if len(self._arm_cache) > 10_000:
                self._arm_cache.clear()
            self._arm_cache[key] = allowed
        return ref, allowed, limits

    def truncation_key(self, ctx: RequestContext, temperature: float, base: Arm) -> TruncationKey:
        return (ctx.upstream, ctx.model, ctx.task_type, round(float(temperature), 3), int(base.max_tokens))

    def candidates(self, ctx: RequestContext) -> tuple[Reference, list[Arm], ModelLimits]:
        """The trust region's arms (`reference_for`) less the lower caps the task's answers do not yet show safe.

        Without quality evidence the automatic score cannot price a cut answer, so a cap below
        the baseline's is offered only once `guards.truncation` has shown, anytime-valid at 95 %,
        that it cuts at most `[constraints] max_extra_truncation` more answers than the
        baseline cap does, at that arm's temperature. These are the arms `decide` plays from.
        """
        ref, allowed, limits = self.reference_for(ctx)
        base = ref.arm
        if not ref.freedom.max_tokens or self.truncation.off:
            return ref, allowed, limits
        keys: dict[float, TruncationKey] = {}
        kept = []
        for a in allowed:
            if a.max_tokens < base.max_tokens:
                key = keys.get(a.temperature)
                if key is None:
                    key = keys[a.temperature] = self.truncation_key(ctx, a.temperature, base)
                if not self.truncation.admits(key, a.max_tokens):
                    continue
            kept.append(a)
        # The trust region offers the baseline only if it could choose it itself: a client cap
        # above `[constraints] max_tokens` (4,097..4,596 with the defaults) leaves only lower caps,
        # and until one is shown safe nothing may be tuned: the request goes as the client sent it
        # (the trust region's own "[baseline] if nothing else fits", applied after this filter).
        return ref, kept or [base], limits

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

    async def decide(self, ctx: RequestContext, *, request_id: str, assignment_key: str) -> Decision:
        now = self.clock()
        ref, allowed, limits = self.candidates(ctx)
        base = ref.arm
        eff = self.rollout.effective(now)
        # The holdout is drawn first and with its own salt: its keys get the baseline in every
        # phase, and the rollout share is drawn independently among the rest.
        held_out = assign(assignment_key, self.holdout_fraction, HOLDOUT_SALT)
        task_rolled_back = self.task_rolled_back(ctx.task_type)
        optimised = eff.optimizing_allowed and not held_out and not task_rolled_back and assign(assignment_key, eff.fraction)
        choice = self.choose(ctx, base, allowed, self.rng)
        policy_arm = allowed[choice.index]
        notes: list[str] = []

        verdict = await self.budget.decide(
            allowed=allowed,
            chosen=choice.index if optimised else None,
            baseline=base,
            task_type=ctx.task_type,
            prompt_tokens=ctx.prompt_tokens_est,
            confidence=choice.propensity,
            now=now,
            rates=self.rates_for(ctx),
        )
        notes.extend(verdict.notes)
        if verdict.reservation is not None:
            self.reservations[request_id] = verdict.reservation
        refuse_if_rejected(verdict)
        caws_down = optimised and not verdict.guard_ok and self.require_caws
        if caws_down:
            notes.append("require_caws:budget_guard_unavailable")

        if optimised and not caws_down:
            sent_arm = enforce(verdict.arm, base, self.constraints, limits, ref.freedom)
            if sent_arm == policy_arm:
                mode, propensity = "optimized", choice.propensity
            else:
                # A guard swapped the arm: the behaviour propensity is no longer the
                # policy's, so these rows are marked and left out of IPS/DR.
                mode, propensity = "guard_fallback", 1.0
            sent = tuned_params(sent_arm, ref)
        elif caws_down:
            # Meant to be optimised: marked as a guard's fallback so the holdout stays a random sample.
            sent, propensity, mode = ref.sent, 1.0, "guard_fallback"
        else:
            # Holdout, shadow, rollback, off: the baseline, propensity 1 (the policy's choice is still logged).
            sent, propensity, mode = ref.sent, 1.0, unoptimised_mode(eff, held_out, task_rolled_back)

        reserved = verdict.reservation.tokens if verdict.reservation is not None else 0
        return self._decision(ctx, request_id, now, base, sent, propensity, mode, policy_arm, choice, notes, reserved)

    def _decision(
        self, ctx: RequestContext, request_id: str, now: float, base: Arm, sent: Params, propensity: float, mode: str,
        policy_arm: Arm, choice: Choice, notes: list[str], budget_reserved: int,
    ) -> Decision:
        """The record `decide` returns and `explain` shows: one construction, so the two cannot drift apart."""
        return Decision(
            request_id=request_id,
            context=ctx,
            context_fingerprint=context_fingerprint(ctx),
            sent=sent,
            baseline=Params(temperature=base.temperature, max_tokens=base.max_tokens, effort=base.effort),
            propensity=propensity,
            policy=self.policy.name,
            policy_version=self.policy.version,
            mode=mode,
            created_at=now,
            policy_choice=Params(temperature=policy_arm.temperature, max_tokens=policy_arm.max_tokens, effort=policy_arm.effort),
            policy_propensity=choice.propensity,
            arm_index=choice.index,
            guard_notes=tuple(notes),
            budget_reserved=budget_reserved,
        )

    async def explain(
        self, ctx: RequestContext, *, request_id: str, assignment_key: str | None, rng: np.random.Generator
    ) -> Explanation:
        """What `decide` would do for `ctx` now, without touching the request path's state.

        The same steps in the same order (trust region, holdout and rollout share, policy,
        budget, `enforce`), so the control API never keeps a copy of the decision logic.
        Differences, on purpose: the draw comes from `rng` (the request path's sequence
        stays as it was), the budget reservation is released at once, a budget refusal is
        reported as mode "rejected" instead of raised, and without an `assignment_key` the
        rollout share counts as drawn only when it covers all traffic.
        """
        now = self.clock()
        ref, allowed, limits = self.candidates(ctx)
        base = ref.arm
        eff = self.rollout.effective(now)
        held_out = assign(assignment_key, self.holdout_fraction, HOLDOUT_SALT) if assignment_key else False
        assigned = (not held_out and assign(assignment_key, eff.fraction)) if assignment_key else None
        task_rolled_back = self.task_rolled_back(ctx.task_type)
        optimised = eff.optimizing_allowed and not task_rolled_back and (assigned if assigned is not None else eff.fraction >= 1.0)
        pmf = self.pmf(ctx, base, allowed)
        choice = self.choose(ctx, base, allowed, rng)
        policy_arm = allowed[choice.index]
        verdict = await self.budget.decide(
            allowed=allowed,
            chosen=choice.index if optimised else None,
            baseline=base,
            task_type=ctx.task_type,
            prompt_tokens=ctx.prompt_tokens_est,
            confidence=choice.propensity,
            now=now,
            rates=self.rates_for(ctx),
        )
        if verdict.reservation is not None:
            await self.budget.release(verdict.reservation, now)
        notes = list(verdict.notes)
        caws_down = optimised and not verdict.guard_ok and self.require_caws
        if caws_down:
            notes.append("require_caws:budget_guard_unavailable")
        if verdict.action == "reject":
            sent, propensity, mode = ref.sent, 1.0, "rejected"
        elif optimised and not caws_down:
            sent_arm = enforce(verdict.arm, base, self.constraints, limits, ref.freedom)
            exact = sent_arm == policy_arm
            mode, propensity = ("optimized", choice.propensity) if exact else ("guard_fallback", 1.0)
            sent = tuned_params(sent_arm, ref)
        elif caws_down:
            sent, propensity, mode = ref.sent, 1.0, "guard_fallback"
        else:
            sent, propensity, mode = ref.sent, 1.0, unoptimised_mode(eff, held_out, task_rolled_back)
        decision = self._decision(ctx, request_id, now, base, sent, propensity, mode, policy_arm, choice, notes, 0)
        return Explanation(
            decision=decision, reference=ref, allowed=tuple(allowed), pmf=tuple(float(p) for p in pmf), limits=limits,
            effective=eff, held_out=held_out, assigned=assigned, budget=verdict,
        )

    def rates_for(self, ctx: RequestContext) -> Rates | None:
        """The model's prices when the budget counts dollars (a cached look-up); None otherwise."""
        if self.budget.settings.unit != "usd" or self.prices is None:
            return None
        return self.prices.rates(ctx.upstream, ctx.model)

    def reward_for(self, decision: Decision, outcome: Outcome, quality: float) -> float:
        tokens = (outcome.completion_tokens or 0)
        return self.costs.reward(
            task_type=decision.context.task_type,
            quality=quality,
            latency_s=outcome.latency_s,
            tokens=tokens,
            settings=self.reward_settings,
            cost_usd=outcome.cost_usd,
        )

    def score(
        self, decision: Decision, *, status: int, error_class: str | None, latency_s: float, completion_tokens: int | None, quality: float | None,
        cost_usd: float | None = None,
    ) -> float | None:
        """The reward of a finished request, computed once (proxy.decision.outcome.complete).

        Unoptimised traffic first teaches the baseline costs the reward is normalised by.
        None when the request does not teach the policy (failed, cut off, or no quality).
        """
        if not (200 <= status < 300 and error_class is None and quality is not None):
            return None
        if decision.mode not in ("optimized", "guard_fallback"):
            self.costs.observe(decision.context.task_type, latency_s, completion_tokens or 0, cost_usd)
        return self.costs.reward(
            task_type=decision.context.task_type, quality=quality, latency_s=latency_s, tokens=completion_tokens or 0,
            settings=self.reward_settings, cost_usd=cost_usd,
        )

    async def admit(self, task_type: str, prompt_tokens: int) -> Reservation | None:
        """The budget's admission for a passed-through request that spends tokens (embeddings).

        Nothing is tuned on it, so it reserves what it sends, the prompt (its output is not
        generated text), and is refused exactly as a decided request would be: spent budget
        under `on_exhausted = "reject"` raises `BudgetExceeded`, no answer in time
        `BudgetUnavailable`.
        """
        base = Arm(temperature=NOMINAL_TEMPERATURE, max_tokens=0)
        verdict = await self.budget.decide(
            allowed=[base], chosen=None, baseline=base, task_type=task_type, prompt_tokens=prompt_tokens, confidence=None, now=self.clock(),
        )
        refuse_if_rejected(verdict)
        return verdict.reservation

    async def settle_admitted(self, reservation: Reservation | None, tokens: int | None) -> None:
        if reservation is None:
            return
        try:
            await self.budget.settle(reservation, reservation.tokens if tokens is None else tokens, self.clock())
        except Exception:
            dlog.exception("budget settlement of a passed-through request failed")

    async def observe(self, decision: Decision, outcome: Outcome) -> None:
        """Settle the budget, feed the SLO monitor, and update the policy with the Outcome's reward."""
        now = self.clock()
        reservation = self.reservations.pop(decision.request_id, None)
        if reservation is not None:
            try:
                used = self.budget.spent(outcome.prompt_tokens, outcome.completion_tokens, outcome.cost_usd)
                if used is not None:
                    await self.budget.settle(reservation, used, now)
                elif outcome.error_class == "client_disconnected" or outcome.prompt_tokens is not None or outcome.completion_tokens is not None:
                    # it may still have been generated, or it was (usage without a price): the reservation is what it counts
                    await self.budget.settle(reservation, reservation.tokens, now)
                else:
                    await self.budget.release(reservation, now)
            except Exception:
                dlog.exception("budget settlement failed for %s", decision.request_id)
        failed = is_upstream_failure(outcome)
        optimised = decision.mode in ("optimized", "guard_fallback")
        if outcome.error_class != "client_disconnected" and (failed or 200 <= outcome.status < 300):
            self.slo.observe(now, optimized=optimised, latency_s=outcome.latency_s, error=failed, quality=outcome.quality)
        if 200 <= outcome.status < 300 and outcome.error_class is None:
            if self.learning is not None:
                self.learning.add(decision, outcome)
            else:
                self.learn(((decision, outcome),))
        self.maybe_tick(now)

    def learn_in_batches(self, batch: OutcomeBatch) -> None:
        """From now on `observe` queues what a request teaches (policy update, length evidence) for `learn` on `batch`."""
        self.learning = batch
        batch.steps.append(self.learn)

    def drain_learning(self) -> None:
        """Learn what is queued now: before a correction swaps a reward the policy must already hold."""
        if self.learning is not None:
            self.learning.drain()

    def learn(self, finished: Sequence[tuple[Decision, Outcome]]) -> None:
        """The batch step of answered requests: length evidence (one numpy pass per key), then the policy's updates, in order."""
        lengths: dict[TruncationKey, tuple[list[int], list[int], list[bool]]] = {}
        for decision, outcome in finished:
            sent, base = decision.sent, decision.baseline
            if sent.max_tokens is not None and outcome.completion_tokens is not None:
                key = self.truncation_key(decision.context, sent.arm(base).temperature, base.arm())
                caps, tokens, cuts = lengths.setdefault(key, ([], [], []))
                caps.append(int(sent.max_tokens))
                tokens.append(int(outcome.completion_tokens))
                cuts.append(outcome.finish_reason == "length")
        for key, (caps, tokens, cuts) in lengths.items():
            if len(caps) == 1:  # a quiet moment: the scalar path is cheaper than numpy's set-up
                self.truncation.observe(key, caps[0], tokens[0], cuts[0])
            else:
                self.truncation.observe_many(key, caps, tokens, cuts)
        update = self.policy.update
        for decision, outcome in finished:
            if outcome.reward is not None:
                base = decision.baseline
                update(decision.context, base.arm(), decision.sent.arm(base), outcome.reward)

    def observe_length(self, decision: Decision, outcome: Outcome) -> None:
        """A finished answer's length under the cap it was sent with: evidence for `candidates`' lower caps."""
        self.record_length(decision.context, decision.baseline, decision.sent, outcome.completion_tokens, outcome.finish_reason)

    def record_length(self, ctx: RequestContext, baseline: Params, sent: Params, completion_tokens: int | None, finish_reason: str | None) -> None:
        """`observe_length` from the logged fields (also replayed by `thermostat evaluate`)."""
        if sent.max_tokens is None or completion_tokens is None:
            return
        key = self.truncation_key(ctx, sent.arm(baseline).temperature, baseline.arm())
        self.truncation.observe(key, int(sent.max_tokens), int(completion_tokens), finish_reason == "length")

    def maybe_tick(self, now: float, force: bool = False) -> list[RolloutEvent]:
        if not force and now - self._last_tick < self.tick_interval_s:
            return []
        self._last_tick = now
        events = self.rollout.tick(now, self.ope_evidence)
        if events and self.on_events is not None:
            self.on_events(events)
        return events
