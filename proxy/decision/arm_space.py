"""The arm space: which arms one request may be sent with.

The one place in the decision room that enumerates the knobs (temperature, max_tokens,
effort): the model's limits (`model_limits`, the same live and offline), the baseline a
request stands for (`reference`), the trust region's grid around it, and the lower caps
the task's answers have shown safe (`ArmSpace.candidates`). The plan (`proxy.decision.plan`)
draws from these arms; the learning side feeds the length evidence back (`ArmSpace.observe_length`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import msgspec

from guards.settings import BaselineSettings, ConstraintsSettings
from guards.truncation import TruncationGuard, TruncationKey
from guards.trust_region import Freedom, ModelLimits, allowed_arms, max_tokens_delta, temperature_range
from policies.arms import candidate_arms
from policies.records import Arm, Params, RequestContext
from policies.settings import ArmGridSettings
from proxy.config import Config, ModelSettings, UpstreamSettings, find_model_settings, serving_upstream

ANTHROPIC_MAX_TEMPERATURE = 1.0
"""The Messages API's temperature range is 0-1, whatever a model's settings say."""


def model_limits(settings: ModelSettings | None, wire_format: str | None) -> ModelLimits:
    """What a model accepts, from its `[[upstreams.models_config]]` entry and its upstream's wire format.

    The one mapping, used by the live decider (`proxy.runtime.Runtime.limits_for`, which caches it)
    and by `thermostat evaluate`, so both offer the same arms: temperature range and fixed value,
    the token limit, the provider's default temperature, the effort levels, whether the model takes
    a temperature at all, and the Anthropic clamp (also without settings).
    """
    found = (
        ModelLimits(
            min_temperature=settings.min_temperature,
            max_temperature=settings.max_temperature,
            fixed_temperature=settings.fixed_temperature,
            max_tokens=settings.max_tokens_limit,
            default_temperature=settings.default_temperature,
            efforts=settings.efforts,
            accepts_temperature=settings.accepts_temperature,
        )
        if settings is not None
        else ModelLimits()
    )
    if wire_format == "anthropic" and found.max_temperature > ANTHROPIC_MAX_TEMPERATURE:
        found = msgspec.structs.replace(found, max_temperature=ANTHROPIC_MAX_TEMPERATURE)
    return found


def limits_for(upstreams: Sequence[UpstreamSettings], upstream: str, model: str) -> ModelLimits:
    """`model_limits` of `model` on the upstream named `upstream` (an unknown upstream: no limits)."""
    up = next((u for u in upstreams if u.name == upstream), None)
    if up is None:
        return ModelLimits()
    return model_limits(find_model_settings(up, model), up.format)


def declared_stand_ins(upstreams: Sequence[UpstreamSettings], upstream: str, model: str) -> tuple[tuple[str, str], ...]:
    """The stand-ins declared for `model` on `upstream` (`substitutes`), each with the upstream that serves it.

    Only an upstream of the same wire format (`serving_upstream`, the edge's routing rule) may
    serve one; the requested model itself is never its own stand-in. Nothing undeclared is ever offered.
    """
    up = next((u for u in upstreams if u.name == upstream), None)
    settings = find_model_settings(up, model) if up is not None else None
    if up is None or settings is None:
        return ()
    out: list[tuple[str, str]] = []
    for stand_in in settings.substitutes:
        served = serving_upstream(upstreams, stand_in, up.format)
        if served is not None and stand_in != model and all(stand_in != m for m, _ in out):
            out.append((stand_in, served.name))
    return tuple(out)


NOMINAL_TEMPERATURE = 1.0
"""Label for an omitted temperature on a model that declares no `default_temperature` (OpenAI's default).

It only names the arm for the policy; such a temperature is never tuned or sent."""
NOMINAL_MAX_TOKENS = 1024
"""Label for an omitted max_tokens without a stand-in: names the arm and sizes the budget reservation; never sent."""

TuneMode = Literal["auto", "always", "never"]

# Wire formats whose body has a reasoning-effort field (legacy completions has none).
EFFORT_FORMATS = frozenset({"chat", "responses", "anthropic"})


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
    temperature, sent_t, tune_t = reference_temperature(ctx, stand_in, limits, constraints, temperature_evidence=temperature_evidence)
    max_tokens, sent_m, tune_m, cap = reference_max_tokens(ctx, stand_in, limits, constraints)
    effort, tune_e = reference_effort(ctx, stand_in, limits)
    t = round(float(temperature), 3)
    return Reference(
        arm=Arm(temperature=t, max_tokens=int(max_tokens), effort=effort),
        sent=Params(temperature=sent_t, max_tokens=sent_m, effort=effort),
        freedom=Freedom(temperature=tune_t, max_tokens=tune_m, max_tokens_cap=cap, effort=tune_e),
    )


def reference_temperature(
    ctx: RequestContext, stand_in: BaselineSettings, limits: ModelLimits, constraints: ConstraintsSettings, *, temperature_evidence: bool
) -> tuple[float, float | None, bool]:
    """The baseline temperature (a label when none is sent), what is sent for it, and whether it may move."""
    if not limits.accepts_temperature or (ctx.endpoint == "anthropic" and ctx.client_temperature is None):
        # The model refuses a temperature, or the Messages API got none (the current anthropic SDK has
        # no such parameter): whatever the client sent is forwarded as it came, nothing is added or moved.
        low, high = temperature_range(constraints, limits)
        label = ctx.client_temperature if ctx.client_temperature is not None else NOMINAL_TEMPERATURE
        return min(max(label, low), high), ctx.client_temperature, False
    if limits.fixed_temperature is not None:
        # The model takes one temperature: nothing to tune; a client's value is replaced by it when optimised.
        return limits.fixed_temperature, ctx.client_temperature, False
    if ctx.client_temperature is not None:
        return ctx.client_temperature, ctx.client_temperature, temperature_evidence
    if stand_in.temperature is not None:
        return stand_in.temperature, stand_in.temperature, temperature_evidence
    if limits.default_temperature is not None:
        return limits.default_temperature, None, temperature_evidence
    low, high = temperature_range(constraints, limits)  # a label inside the model's range keeps max_tokens arms valid
    return min(max(NOMINAL_TEMPERATURE, low), high), None, False


def reference_max_tokens(
    ctx: RequestContext, stand_in: BaselineSettings, limits: ModelLimits, constraints: ConstraintsSettings
) -> tuple[int, int | None, bool, int | None]:
    """The baseline cap (a label when none is sent), what is sent for it, whether it may move, and the client's own cap."""
    if ctx.client_max_tokens is not None:
        cap = None if constraints.raise_client_max_tokens else ctx.client_max_tokens
        return ctx.client_max_tokens, ctx.client_max_tokens, True, cap
    ceiling = min(constraints.max_tokens, limits.max_tokens or constraints.max_tokens)
    if stand_in.max_tokens is not None:
        max_tokens = min(stand_in.max_tokens, ceiling)
        return max_tokens, max_tokens, True, None
    return min(NOMINAL_MAX_TOKENS, ceiling), None, False, None


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
    return Params(temperature=temperature, max_tokens=max_tokens, effort=effort, model=arm.model)


def grid_arms(base: Arm, freedom: Freedom, limits: ModelLimits, constraints: ConstraintsSettings, grid: ArmGridSettings) -> list[Arm]:
    """The trust region's arms around `base`: the grid over each knob that may move, inside the model's limits."""
    if freedom.max_tokens_cap is not None and freedom.max_tokens_cap <= base.max_tokens:
        # Only the lower half of the max_tokens axis is allowed: twice the steps keep as many arms there.
        grid = msgspec.structs.replace(grid, max_tokens_steps=2 * grid.max_tokens_steps - 1)
    cands = candidate_arms(
        base,
        max_delta_temperature=constraints.max_delta_temperature if freedom.temperature else 0.0,
        max_delta_max_tokens=max_tokens_delta(base.max_tokens, constraints) if freedom.max_tokens else 0,
        grid=grid,
        max_delta_effort_levels=constraints.max_delta_effort_levels if freedom.effort else 0,
        efforts=limits.efforts,
    )
    return allowed_arms(cands, base, constraints, limits, freedom)


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


class ArmSettings(msgspec.Struct, frozen=True):
    """What bounds the arms: the trust region, the grid over it, and when temperature may move."""

    constraints: ConstraintsSettings
    grid: ArmGridSettings
    tune_temperature: TuneMode = "auto"
    min_quality_signals: int = 50

    @classmethod
    def from_config(cls, config: Config) -> ArmSettings:
        opt = config.optimization
        return cls(config.constraints, config.policy.grid, opt.tune_temperature, opt.min_quality_signals)


def _never(_: str) -> bool:
    return False


def _no_stand_ins(_upstream: str, _model: str) -> tuple[tuple[str, str], ...]:
    return ()


def _all_admitted(_task: str, _model: str) -> bool:
    return True


class StandIn(NamedTuple):
    """One declared stand-in as a request may be sent to it: its upstream, its own baseline and limits."""

    model: str
    upstream: str
    reference: Reference  # the request's baseline on the stand-in (its `arm` and `sent` carry the model)
    limits: ModelLimits


class Options(NamedTuple):
    """`ArmSpace.options`: the requested model's baseline, every candidate arm, and each stand-in's own baseline."""

    reference: Reference
    allowed: list[Arm]  # the requested model's arms first, then each stand-in's (`Arm.model` set)
    limits: ModelLimits
    stand_ins: dict[str, StandIn]

    def for_model(self, model: str | None) -> tuple[Reference, ModelLimits]:
        """The baseline and limits an arm of `model` is checked against (`enforce`) and sent with (`tuned_params`)."""
        if model is None or model not in self.stand_ins:
            return self.reference, self.limits
        s = self.stand_ins[model]
        return s.reference, s.limits


def fits(ctx: RequestContext, limits: ModelLimits) -> bool:
    """May a stand-in with `limits` serve this request at all? Its own limits must take what the client sent.

    A temperature to a model that refuses one or outside its range (or other than its fixed one), a cap
    above its token limit, an effort level it does not list: the stand-in is not offered (nothing the
    client sent is dropped, moved or cut to make it fit).
    """
    t = ctx.client_temperature
    if t is not None and (not limits.accepts_temperature or not limits.min_temperature <= t <= limits.max_temperature):
        return False
    if t is not None and limits.fixed_temperature is not None and t != limits.fixed_temperature:
        return False
    if ctx.client_max_tokens is not None and limits.max_tokens is not None and ctx.client_max_tokens > limits.max_tokens:
        return False
    return not (ctx.client_effort is not None and limits.efforts and ctx.client_effort not in limits.efforts)


class ArmSpace:
    """The arms one request may be sent with, and the evidence that widens them.

    Per request: the model's limits, the baseline (`reference`), the trust region's grid
    (cached per baseline and model), then the lower caps the task's answers have shown safe
    (`candidates`). Temperature moves only with evidence that can see it (`signals`, and not
    while the judge is muted for the task). Live and offline (`thermostat evaluate`) build
    the same space from the same configuration.
    """

    def __init__(
        self,
        settings: ArmSettings,
        *,
        baseline_for: Callable[[str], BaselineSettings],
        limits_for: Callable[[str, str], ModelLimits],
        signals: QualitySignals | None = None,
        stand_ins_for: Callable[[str, str], tuple[tuple[str, str], ...]] = _no_stand_ins,
    ) -> None:
        self.settings = settings
        self.stand_ins_for = stand_ins_for  # (upstream, model) -> declared (stand-in, its upstream), `declared_stand_ins`
        # (task type, stand-in) -> may it be offered (not yet shown worse; `proxy.decision.model_stage.ModelEvidence.admits`).
        self.model_admitted: Callable[[str, str], bool] = _all_admitted
        self.constraints = settings.constraints
        self.baseline_for = baseline_for
        self.limits_for = limits_for
        self.signals = signals if signals is not None else QualitySignals()
        self.truncation = TruncationGuard(settings.constraints.max_extra_truncation)
        # Task type -> is the judge muted there (`proxy.decision.judge_trust.JudgeTrust.muted`); set by the runtime.
        self.judge_muted: Callable[[str], bool] = _never
        self._cache: dict[tuple[Arm, Freedom, str, str], list[Arm]] = {}

    def temperature_evidence(self, task_type: str) -> bool:
        """May temperature move for this task type (`tune_temperature` and the explicit signals so far)?

        Not while the judge is muted for it: the signals counted so far are mostly its scores,
        which were taken back (`proxy.decision.feedback.retract_judge`).
        """
        tune = self.settings.tune_temperature
        if tune == "auto":
            return self.signals.count(task_type) >= self.settings.min_quality_signals and not self.judge_muted(task_type)
        return tune == "always"

    def reference_for(self, ctx: RequestContext) -> tuple[Reference, list[Arm], ModelLimits]:
        """The request's `Reference`, the trust region's arms around it, and the model's limits."""
        limits = self.limits_for(ctx.upstream, ctx.model)
        ref = reference(
            ctx, self.baseline_for(ctx.task_type), limits, self.constraints,
            temperature_evidence=self.temperature_evidence(ctx.task_type),
        )
        key = (ref.arm, ref.freedom, ctx.upstream, ctx.model)
        allowed = self._cache.get(key)
        if allowed is None:
            allowed = grid_arms(ref.arm, ref.freedom, limits, self.constraints, self.settings.grid)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = allowed
        return ref, allowed, limits

    def allowed_for(self, ctx: RequestContext) -> tuple[Arm, list[Arm], ModelLimits]:
        """The reference arm, the arms the policy may pick from, and the model's limits."""
        ref, allowed, limits = self.reference_for(ctx)
        return ref.arm, allowed, limits

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
        return ref, self.safe_caps(ctx, ref, allowed), limits

    def options(self, ctx: RequestContext, *, safe_caps: bool = True) -> Options:
        """`candidates` plus the declared stand-ins' arms (the model as a knob, `Arm.model`).

        Each stand-in that fits the request (`fits`) and is not shown worse for the task
        (`model_admitted`) gets its own baseline (the client's values within its own limits:
        temperature range or none, efforts, token limit) and its own trust region and safe caps
        around it. The holdout and all unoptimised traffic never see these arms: they get the
        requested model's baseline (`proxy.decision.plan.settle`). `safe_caps=False`: the whole trust
        region of each model, lower caps included (`allowed_for`; `thermostat evaluate`'s replay).
        """
        ref, allowed, limits = self.candidates(ctx) if safe_caps else self.reference_for(ctx)
        declared = self.stand_ins_for(ctx.upstream, ctx.model)
        if not declared:
            return Options(ref, allowed, limits, {})
        arms = list(allowed)
        found: dict[str, StandIn] = {}
        for model, upstream in declared:
            if not self.model_admitted(ctx.task_type, model):
                continue
            sctx = msgspec.structs.replace(ctx, model=model, upstream=upstream)
            s_ref, s_allowed, s_limits = self.reference_for(sctx)
            if not fits(ctx, s_limits):
                continue
            s_ref = Reference(
                msgspec.structs.replace(s_ref.arm, model=model), msgspec.structs.replace(s_ref.sent, model=model), s_ref.freedom,
            )
            kept = self.safe_caps(sctx, s_ref, s_allowed) if safe_caps else s_allowed
            arms.extend(msgspec.structs.replace(a, model=model) for a in kept)
            found[model] = StandIn(model, upstream, s_ref, s_limits)
        return Options(ref, arms, limits, found)

    def safe_caps(self, ctx: RequestContext, ref: Reference, allowed: list[Arm]) -> list[Arm]:
        """`allowed` less the lower caps not yet shown safe for `ctx`'s model and task (`candidates`)."""
        base = ref.arm
        if not ref.freedom.max_tokens or self.truncation.off:
            return allowed
        keys: dict[float, TruncationKey] = {}
        kept = []
        admits = self.truncation.admits
        base_cap = base.max_tokens
        for a in allowed:
            if a.max_tokens < base_cap:
                key = keys.get(a.temperature)
                if key is None:
                    key = keys[a.temperature] = self.truncation_key(ctx, a.temperature, base)
                if not admits(key, a.max_tokens):
                    continue
            kept.append(a)
        # The trust region offers the baseline only if it could choose it itself: a client cap
        # above `[constraints] max_tokens` (4,097..4,596 with the defaults) leaves only lower caps,
        # and until one is shown safe nothing may be tuned: the request goes as the client sent it
        # (the trust region's own "[baseline] if nothing else fits", applied after this filter).
        return kept or [base]

    def record_length(self, ctx: RequestContext, baseline: Params, sent: Params, completion_tokens: int | None, finish_reason: str | None) -> None:
        """A finished answer's length under the cap it was sent with: evidence for `candidates`' lower caps.

        From the logged fields, so `thermostat evaluate` can replay it too.
        """
        if sent.max_tokens is None or completion_tokens is None or sent.model is not None:
            return  # a stand-in's lengths are not the requested model's evidence (its own caps stay at its baseline)
        key = self.truncation_key(ctx, sent.arm(baseline).temperature, baseline.arm())
        self.truncation.observe(key, int(sent.max_tokens), int(completion_tokens), finish_reason == "length")
