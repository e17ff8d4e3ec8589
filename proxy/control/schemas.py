"""Request and response bodies of the control API (`/api/optimization/*`), as msgspec structs.

Litestar decodes request bodies into these (a malformed body is a 400 in the OpenAI
error shape, see `proxy.control.api`) and documents them in its OpenAPI schema. Numeric
request fields carry bounds (`msgspec.Meta`) so that nonsense never reaches the
decision path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from guards.conservative import CostVerdict, KindVerdict
from guards.waivers import Waiver
from proxy.decision import FeedbackResult

NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
ShortText = Annotated[str, msgspec.Meta(max_length=2000)]
TaskType = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


# --------------------------------------------------------------------------- errors


class ApiErrorBody(msgspec.Struct):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ApiError(msgspec.Struct):
    """Every error of the control API, in the OpenAI shape."""

    error: ApiErrorBody


# --------------------------------------------------------------------------- status / health


class HealthCheck(msgspec.Struct):
    name: str  # upstreams, database, state_store, writer_queue
    ok: bool
    detail: str = ""


class Readiness(msgspec.Struct):
    ready: bool
    checks: list[HealthCheck]


class RollbackStatus(msgspec.Struct):
    active: bool
    trigger: Literal["slo", "manual", "disabled"] | None
    reason: str | None
    since: float | None
    resumes_at: float | None
    resume_phase: str | None = None


class OptimizationStatus(msgspec.Struct):
    enabled: bool
    mode: str  # configured mode
    phase: str  # current rollout phase
    effective_phase: str
    traffic_percentage: float  # the rollout share optimised now (0..1), before the holdout is taken out
    phase_traffic_percentage: float  # share the phase optimises when not rolled back
    policy: str
    policy_version: str
    rollback: RollbackStatus
    uptime_s: float
    decisions_in_registry: int
    judge_muted: dict[str, str] = {}  # task type -> why the judge's scores are muted there (length_bias, disagreement)
    holdout_fraction: float = 0.0  # the always-on holdout, drawn before the rollout share (every phase)
    optimised_share: float = 0.0  # the share of requests actually sent tuned parameters: traffic_percentage × (1 − holdout_fraction)


# --------------------------------------------------------------------------- performance


class Interval(msgspec.Struct):
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    n: int


class ArmStats(msgspec.Struct):
    task_type: str
    arm: str  # "temperature=0.7; max_tokens=600" (sent; "client" when nothing was sent)
    temperature: float | None
    max_tokens: int | None
    traffic: str  # "optimized" or "baseline"
    requests: int
    errors: int
    reward: Interval
    quality_mean: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    prompt_tokens_mean: float | None
    completion_tokens_mean: float | None
    improvement_over_baseline: Interval | None  # mean reward minus the task's baseline-served mean


class CostComparison(msgspec.Struct):
    """What tuned and holdout requests of one task type cost, and the saving per 1,000 requests (proxy.control.reports.cost_comparison)."""

    optimized_cost_usd: float | None  # mean US dollars per priced tuned request
    holdout_cost_usd: float | None
    optimized_spend_usd: float  # total over the window's priced tuned requests
    holdout_spend_usd: float
    optimized_priced: int  # requests with a cost (usage reported, price known)
    holdout_priced: int
    optimized_unpriced: int  # requests without one (left out of the means)
    holdout_unpriced: int
    saving_per_1k_usd: float | None  # (holdout − tuned mean) × 1,000: positive = saved, negative = extra spend
    ci_low: float | None
    ci_high: float | None
    interval: str  # how the interval was built
    summary: str  # in words: "code: saves $0.42 per 1,000 requests, 95 % interval [$0.10, $0.75], 1,234 priced requests"
    # share of the window's tuned requests served by each model (a declared stand-in or the requested one); the holdout is always the requested model
    tuned_models: dict[str, float] = {}


class TaskPerformance(msgspec.Struct):
    task_type: str
    optimized: ArmStats | None
    baseline: ArmStats | None
    improvement: Interval | None  # optimized minus baseline mean reward (Welch interval)
    versus_holdout: TaskComparison | None = None  # optimised vs the randomised holdout, anytime-valid intervals and verdict
    cost: CostComparison | None = None  # spend of tuned vs holdout traffic, and the saving per 1,000 requests


class JudgeSpendOut(msgspec.Struct):
    """What the judge's own calls cost (its scoring calls and pairwise baseline calls), in this process since it started."""

    since: float  # process start, unix seconds
    calls: int
    cost_usd: float  # priced calls only
    unpriced_calls: int  # calls whose model has no known price
    note: str


class MetricsReport(msgspec.Struct):
    since: float
    until: float
    rows: int  # decisions read from the log for this report
    truncated: bool  # True when `max_rows` newest rows did not cover the whole window
    arms: list[ArmStats]


class PerformanceReport(msgspec.Struct):
    since: float
    until: float
    rows: int
    truncated: bool
    tasks: list[TaskPerformance]
    judge: JudgeSpendOut | None = None  # the judge's calls, as what they cost (null: no judge)


# --------------------------------------------------------------------------- SLO / rollout


class SloEntry(msgspec.Struct):
    name: str
    traffic: str  # "optimized" or "baseline"
    threshold: float
    value: float | None
    compliant: bool
    samples: int
    judged: bool


class TaskGuarantee(msgspec.Struct):
    """Optimised vs holdout for one task type (guards/conservative.py), intervals anytime-valid at 95 %."""

    task_type: str
    verdict: str  # better | not_yet_known | worse
    quality: str
    latency: str
    rolled_back: bool
    optimised_n: int
    holdout_n: int
    optimised_quality: tuple[float, float]
    holdout_quality: tuple[float, float]
    quality_difference: tuple[float, float]  # optimised − holdout
    latency_reference_s: float | None
    optimised_exceedance: tuple[float, float]
    holdout_exceedance: tuple[float, float]
    reason: str
    optimised_mean: float | None = None  # sample mean quality of each stream
    holdout_mean: float | None = None
    quality_level: float | None = None  # coverage of quality_difference (that kind's share of α)
    summary: str = ""  # the verdict in words: "code: +0.12 judge quality, 98.75 % interval [+0.05, +0.19], 3,412 signals; better"
    quality_kind: str = "automatic"  # the signal kind the quality fields above describe (explicit, judge, else automatic)
    signals: list[KindVerdict] = []  # every kind: tuned vs holdout, interval, number of signals behind it
    cost: CostVerdict | None = None  # mean cost per request, tuned vs holdout (rolled back when costlier without a sure gain)
    relearning_since: float | None = None  # a change was detected: tuned traffic is re-learning since then


class StandInKind(msgspec.Struct):
    """One signal kind's comparison of a stand-in model with the requested model (anytime-valid bounds of each mean)."""

    kind: str  # judge | explicit
    stand_in_n: int
    requested_n: int
    stand_in_bounds: tuple[float, float]
    requested_bounds: tuple[float, float]


class StandInEvidence(msgspec.Struct):
    """A declared stand-in for one task type (proxy/decision/model_stage.py): exploring, proven (no worse) or worse."""

    task_type: str
    model: str
    status: str
    kinds: list[StandInKind]


class SloStatus(msgspec.Struct):
    compliant: bool
    window_s: float
    min_samples: int
    breached: list[str]
    slos: list[SloEntry]
    tasks: list[TaskGuarantee] = []
    stand_ins: list[StandInEvidence] = []  # the model as a knob: each stand-in's evidence per task type


class OpeEvidenceOut(msgspec.Struct):
    estimator: str
    improvement_lower_bound: float | None
    difference: float | None
    samples: int
    reason: str = ""  # why there is no bound yet


class PromotionEvidenceOut(msgspec.Struct):
    """Optimised vs holdout mean reward in this phase, anytime-valid (guards/rollout.py): what promotion decides on."""

    optimised_n: int
    holdout_n: int
    optimised_mean: float | None
    holdout_mean: float | None
    difference_lower: float  # promote only when > 0
    difference_upper: float
    alpha: float
    since: float
    signal_kind: str = "automatic"  # rewards recomputed with this signal kind's quality


class PromotionCriterion(msgspec.Struct):
    name: str
    required: str
    current: str
    met: bool


class RolloutEventOut(msgspec.Struct):
    at: float
    kind: str
    from_phase: str
    to_phase: str
    reason: str
    actor: str | None
    evidence: dict[str, Any] = {}


class EventOut(msgspec.Struct):
    """One recorded event from the log store: a rollout change (global) or a conservative-monitor one (per task type)."""

    id: str
    at: float
    kind: str  # promote, rollback, resume, set_phase, disable, enable, breach (global); rollback, change_detected, relearning_ended (per task)
    scope: str  # "global" or "task"
    task_type: str | None
    from_phase: str | None
    to_phase: str | None
    reason: str
    actor: str | None
    evidence: dict[str, Any] = {}


class EventPage(msgspec.Struct):
    limit: int
    offset: int
    next_offset: int | None  # null on the last page
    since: float | None
    items: list[EventOut]


class RolloutStatus(msgspec.Struct):
    phase: str
    phase_started_at: float
    time_in_phase_s: float
    next_phase: str | None
    traffic_percentage: float
    auto_promote: bool
    promotion_ready: bool
    blockers: list[str]
    criteria: list[PromotionCriterion]
    ope: OpeEvidenceOut  # off-policy evidence, reported only (a fixed-sample bound; promotion does not use it)
    rollback: RollbackStatus
    events: list[RolloutEventOut]
    promotion: PromotionEvidenceOut | None = None  # the anytime-valid comparison promotion decides on


# --------------------------------------------------------------------------- convergence / evolution


class ArmPosterior(msgspec.Struct):
    temperature: float
    max_tokens: int
    probability: float  # current probability the policy plays the arm (P(best) for Thompson)
    model: str | None = None  # a declared stand-in's arm; None: the requested model's
    posterior_mean: float | None = None
    posterior_sd: float | None = None
    n: float | None = None


class ConvergencePoint(msgspec.Struct):
    t: float  # bin start
    decisions: int
    mean_choice_probability: float  # mean propensity the policy gave its own choice
    distinct_arms: int


class TaskConvergence(msgspec.Struct):
    task_type: str
    bucket: str | None  # the context bucket of the latest decision (what `current` is about)
    best_arm_probability: float | None
    entropy: float | None
    current: list[ArmPosterior]
    series: list[ConvergencePoint]


class ConvergenceReport(msgspec.Struct):
    policy: str
    policy_version: str
    since: float
    until: float
    bin_s: float
    tasks: list[TaskConvergence]


class ParamPoint(msgspec.Struct):
    t: float
    decisions: int
    policy_temperature: float | None  # mean of what the policy chose
    policy_max_tokens: float | None
    sent_temperature: float | None  # mean of what was sent
    sent_max_tokens: float | None
    client_temperature: float | None = None  # mean of the client's own values (the baseline)
    client_max_tokens: float | None = None
    policy_effort_rank: float | None = None  # mean position on `policies.effort.EFFORT_LEVELS` (none = 0 … max = 6)
    client_effort_rank: float | None = None


class TaskEvolution(msgspec.Struct):
    task_type: str
    series: list[ParamPoint]


class ParameterEvolution(msgspec.Struct):
    since: float
    until: float
    bin_s: float
    tasks: list[TaskEvolution]


# --------------------------------------------------------------------------- budget


class BudgetLineOut(msgspec.Struct):
    task_type: str
    limit: int
    effective_limit: int
    used: int
    reserved: int
    overruns: int
    fill: float | None


class CawsStatus(msgspec.Struct):
    enabled: bool
    window_s: int
    window_start: float
    resets_at: float
    budget_limit: int
    effective_limit: int
    used: int
    reserved: int
    overruns: int
    fill: float | None
    warning: bool
    exhausted: bool
    waiver_threshold: float
    warning_threshold: float
    active_waivers: list[Waiver]
    tasks: list[BudgetLineOut]
    unit: str = "tokens"  # what the amounts count: "tokens", or "micro_usd" under caws.unit = "usd" (docs/cost.md)


class WaiverIn(msgspec.Struct, forbid_unknown_fields=True):
    task_type: TaskType
    extra_tokens: Annotated[int, msgspec.Meta(ge=1, le=10**12)]
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
    approver: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    expires_at: float | None = None  # unix seconds; or
    duration_s: Annotated[float, msgspec.Meta(gt=0.0, le=366 * 86400.0)] | None = None


class WaiverOut(msgspec.Struct):
    id: str
    task_type: str
    extra_tokens: int
    reason: str
    approver: str
    created_at: float
    expires_at: float
    revoked_at: float | None
    revoked_by: str | None
    status: str


class WaiverList(msgspec.Struct):
    waivers: list[WaiverOut]


# --------------------------------------------------------------------------- control actions


class RollbackIn(msgspec.Struct, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""


class ActionResult(msgspec.Struct):
    changed: bool
    message: str
    rollback: RollbackStatus
    phase: str
    event: RolloutEventOut | None = None


class BaselineParam(msgspec.Struct):
    task_type: str  # "default" for `[baseline.default]` / the built-in default
    temperature: float | None  # None: no stand-in, an omitted temperature stays omitted
    max_tokens: int | None  # None: no stand-in, no cap is added
    source: str  # "config" or "built-in"


class BaselineParameters(msgspec.Struct):
    note: str
    parameters: list[BaselineParam]
    constraints: dict[str, Any]


# --------------------------------------------------------------------------- recommend / shadow


class ContextIn(msgspec.Struct, forbid_unknown_fields=False):
    """Request-body fields the decision depends on (unknown fields are ignored)."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] = "gpt-4o-mini"
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[str] | None = None
    prompt_tokens: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] | None = None  # instead of messages/prompt
    temperature: Temperature | None = None
    max_tokens: MaxTokens | None = None
    endpoint: Literal["chat", "completions"] = "chat"
    json_mode: bool = False
    has_tools: bool = False
    stream: bool = False
    user: Annotated[str, msgspec.Meta(max_length=200)] | None = None  # assignment key for the rollout


class RecommendIn(msgspec.Struct, forbid_unknown_fields=True):
    task_type: TaskType = "default"
    context: ContextIn = msgspec.field(default_factory=ContextIn)


class ParamsOut(msgspec.Struct, omit_defaults=True):
    temperature: float | None
    max_tokens: int | None
    model: str | None = None  # a declared stand-in sent in place of the requested model (`substitutes`); None: the requested model


class GuardVerdict(msgspec.Struct):
    guard: str  # trust_region, rollout, budget, slo
    ok: bool
    verdict: str
    detail: dict[str, Any] = {}


class ArmProbability(msgspec.Struct, omit_defaults=True):
    temperature: float
    max_tokens: int
    probability: float
    model: str | None = None  # a declared stand-in's arm; None: the requested model's


class Recommendation(msgspec.Struct):
    task_type: str
    bucket: str
    policy: str
    policy_version: str
    recommended: ParamsOut  # the policy's choice now
    propensity: float
    would_send: ParamsOut  # what a request with this context would get now
    would_mode: str  # optimized / shadow / holdout / rollback / off
    baseline: ParamsOut
    arms: list[ArmProbability]
    guards: list[GuardVerdict]
    assumed: dict[str, Any] = {}  # context fields the caller left out, filled from the task's recent traffic
    learned: bool | None = None  # False: no outcome observed yet in this bucket (the answer is the prior); None: the policy cannot tell
    notes: list[str] = []  # the above, in words


class ShadowTestIn(msgspec.Struct, forbid_unknown_fields=True):
    task_type: TaskType = "default"
    context: ContextIn = msgspec.field(default_factory=ContextIn)


class ShadowTestResult(msgspec.Struct):
    request_id: str
    task_type: str
    mode: str  # the mode the decision path chose for this synthetic request
    policy: str
    policy_version: str
    policy_choice: ParamsOut | None
    policy_propensity: float | None
    sent: ParamsOut  # what would have been sent
    baseline: ParamsOut
    guard_notes: list[str]
    body: dict[str, Any]  # the request body as it would have left Thermostat
    logged: bool  # always False: synthetic requests never enter the decision log


# --------------------------------------------------------------------------- feedback


class OutcomeIn(msgspec.Struct, forbid_unknown_fields=False):
    quality: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
    comment: Annotated[str, msgspec.Meta(max_length=2000)] | None = None
    source: Annotated[str, msgspec.Meta(max_length=100)] | None = None


class RecordOutcomeIn(msgspec.Struct, forbid_unknown_fields=True):
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    outcome: OutcomeIn
    overwrite: bool = False


class RecordOutcomeResult(FeedbackResult, frozen=True):
    """The decision room's `FeedbackResult` (one definition of its fields), and what it replaced, in words."""

    replaced: str = ""  # what this feedback replaced, in words (automatic score, judge, earlier feedback)


# --------------------------------------------------------------------------- OPE


class EstimateOut(msgspec.Struct):
    estimator: str
    value: float
    ci_low: float | None  # the interval `interval` names; null: that side is unbounded (a resample pinned the value, or tiny ESS)
    ci_high: float | None
    eb_low: float | None
    eb_high: float | None
    std_error: float | None
    n: int
    ess: float
    # "betting" (IPS: valid under the adaptive logging of a learning policy), "studentised bootstrap ∪ betting"
    # (SNIPS, DR), or "studentised bootstrap" (no reward range known); policies/ope.py
    interval: str = "studentised bootstrap"


class PolicyEstimates(msgspec.Struct):
    policy: str
    ips: EstimateOut
    snips: EstimateOut
    dr: EstimateOut | None
    ess: float
    max_weight: float


class ImprovementOut(msgspec.Struct):
    estimator: str
    target: float
    baseline: float
    difference: float
    lower: float | None
    upper: float | None
    n: int


class OpeOut(msgspec.Struct):
    since: float
    until: float
    rows: int  # optimized rows used
    skipped: int  # rows without a reward or a usable propensity
    method: str  # the estimator, named for a person
    logged_mean_reward: float | None
    target: PolicyEstimates | None
    baseline: PolicyEstimates | None
    improvement: list[ImprovementOut]
    reason: str = ""  # why there are no estimates
    method_detail: str = ""  # how target probabilities for logged rows were obtained
    statement: str = ""  # the answer in one sentence, including when it cannot be trusted
    tasks: list[OpeTaskOut] = []


class OpeTaskOut(msgspec.Struct):
    """One task type's rows of the same estimate: SNIPS value of the current policy and of the baseline, and their difference."""

    task_type: str
    rows: int
    ess: float | None
    policy_value: float | None
    baseline_value: float | None
    improvement: float | None
    improvement_lower: float | None
    supported: bool
    statement: str


# --------------------------------------------------------------------------- logs / audit / status


class DecisionOut(msgspec.Struct):
    request_id: str
    timestamp: float
    task_type: str
    model: str
    upstream: str
    mode: str
    policy: str
    policy_version: str
    sent: ParamsOut
    baseline: ParamsOut
    policy_choice: ParamsOut | None
    propensity: float
    policy_propensity: float | None
    guard_notes: list[str]
    status: int
    error_class: str | None
    latency_s: float
    ttft_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    quality: float | None  # effective (feedback wins over the automatic score)
    reward: float | None
    automatic_quality: float | None
    feedback_quality: float | None
    validator_reason: str | None = None  # why the answer failed its schema check: schema paths and error kinds, never answer text
    cost_usd: float | None = None  # US dollars at the model's price (configured or genai-prices); null: no usage or no known price


class DecisionPage(msgspec.Struct):
    total: int
    limit: int
    offset: int
    items: list[DecisionOut]


class AuditOut(msgspec.Struct):
    id: str
    at: float
    actor: str
    action: str
    target: str
    before: Any = None
    after: Any = None


class AuditPage(msgspec.Struct):
    limit: int
    offset: int
    items: list[AuditOut]


class DbStatus(msgspec.Struct):
    kind: str
    connected: bool
    last_error: str | None
    rows_written: int
    spool_batches: int
    spool_entries: int
    dead_letter_batches: int
    decisions_total: int | None
    decisions_last_hour: int | None
    writer_queue_depth: int
    writer_queue_capacity: int
    writer_dropped: int
    writer_written: int
    writer_failures: int
    state_store: str


class SecurityStatus(msgspec.Struct):
    auth_required: bool
    token_env: str
    token_configured: bool
    token_id: str | None  # short id of the configured token (never the token)
    loopback_only: bool
    auth_failures: dict[str, int]  # since start: missing / malformed / wrong / not_loopback / origin / content_type
    audit_entries: int | None
    prompts_stored: bool
    upstream_keys_from_env: int  # upstreams whose API key comes from an env var


class ComplianceCheck(msgspec.Struct):
    name: str
    ok: bool
    detail: str


class ComplianceStatus(msgspec.Struct):
    compliant: bool
    checks: list[ComplianceCheck]


# --------------------------------------------------------------------------- dashboard


class RewardPoint(msgspec.Struct):
    t: float
    optimized: float | None
    baseline: float | None
    optimized_n: int
    baseline_n: int


class LatencyPoint(msgspec.Struct):
    t: float
    optimized_p99_ms: float | None
    baseline_p99_ms: float | None
    optimized_n: int
    baseline_n: int


class Dashboard(msgspec.Struct):
    generated_at: float
    status: OptimizationStatus
    slo: SloStatus
    slo_latency_p99_ms: float
    reward_series: list[RewardPoint]
    latency_series: list[LatencyPoint]
    parameters: ParameterEvolution
    budget: CawsStatus | None
    budget_error: str | None
    events: list[RolloutEventOut]
    performance: list[TaskPerformance]
    bin_s: float
    comparisons: list[TaskComparison] = []
    holdout_reward_series: list[RewardPoint] = []
    signal_sources: list[SignalSources] = []
    trust_region: TrustRegionOut | None = None
    budget_burn_rate: float | None = None  # share of the limit used / share of the window elapsed (1 = on pace to end at the limit)
    judge_spend: JudgeSpendOut | None = None  # the judge's calls, as what they cost


class MetricComparison(msgspec.Struct):
    """One metric of one task type, tuned (optimised) vs holdout traffic, with how its interval was built."""

    metric: str  # quality | reward | latency_p99 | completion_tokens
    unit: str
    optimized: float | None
    holdout: float | None
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    optimized_n: int
    holdout_n: int
    anytime_valid: bool
    interval: str
    verdict: str  # better | worse | not yet known
    summary: str


class TaskComparison(msgspec.Struct):
    task_type: str
    requests: int
    optimized_n: int
    holdout_n: int
    verdict: str  # better | worse | not yet known | rolled back
    summary: str
    metrics: list[MetricComparison]


class SignalSources(msgspec.Struct):
    """Where each request's effective quality came from (the log's `decision_feedback.source`, else the automatic score)."""

    task_type: str
    explicit: int
    judge: int
    implicit: int  # regeneration marks
    automatic: int  # the automatic score (validators included: they fold into it)
    none: int  # no quality at all (errors, requests in flight)


class TrustRegionOut(msgspec.Struct):
    max_delta_temperature: float
    max_delta_max_tokens: int
    max_delta_effort_levels: int = 0
    effort_levels: list[str] = []  # the scale the effort ranks count on
    # The band's other edges (guards/trust_region.py), so the page draws the region the guard enforces:
    max_relative_delta_max_tokens: float = 1.0  # |Δ max_tokens| <= min(max_delta_max_tokens, this × the client's)
    min_temperature: float = 0.0
    max_temperature: float = 2.0
    max_tokens: int | None = None  # the operator's ceiling
    raise_client_max_tokens: bool = True  # false: a max_tokens the client set is also the band's top
