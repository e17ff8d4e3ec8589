"""Records that cross room boundaries (proxy -> guards -> policies and back).

They are plain msgspec structs so that they can be queued, logged, sent to
Redis or PostgreSQL and compared in tests without any adapter code.
"""

from __future__ import annotations

import msgspec


class Arm(msgspec.Struct, frozen=True, omit_defaults=True):
    """A concrete candidate of sampling parameters.

    `effort` is the reasoning effort level (policies/effort.py), None when the request
    has no effort knob; arms without one compare, hash and encode as before. `model` is a
    declared stand-in (`[[upstreams.models_config]] substitutes`) the arm is served by, None
    for the requested model, so arms of the requested model also stay as they were.
    """

    temperature: float
    max_tokens: int
    effort: str | None = None
    model: str | None = None


class Params(msgspec.Struct, frozen=True, omit_defaults=True):
    """Parameters as they appear on the wire: a field is None when it is not sent."""

    temperature: float | None = None
    max_tokens: int | None = None
    effort: str | None = None
    model: str | None = None  # a declared stand-in sent in place of the requested model; None: the requested model

    def arm(self, fallback: Params | None = None) -> Arm:
        """The concrete arm these parameters serve; `fallback` (the baseline) fills fields not sent.

        The model is never filled in: a baseline is always the requested model."""
        t = self.temperature if self.temperature is not None or fallback is None else fallback.temperature
        m = self.max_tokens if self.max_tokens is not None or fallback is None else fallback.max_tokens
        e = self.effort if self.effort is not None or fallback is None else fallback.effort
        return Arm(temperature=float(t or 0.0), max_tokens=int(m or 1), effort=e, model=self.model)

    def render(self) -> str:
        """The `x-thermostat-params` header value, e.g. `temperature=0.5; max_tokens=700` (`model=...` first for a stand-in)."""
        parts = [f"model={self.model}"] if self.model is not None else []
        if self.temperature is not None:
            parts.append(f"temperature={self.temperature:g}")
        if self.max_tokens is not None:
            parts.append(f"max_tokens={self.max_tokens}")
        if self.effort is not None:
            parts.append(f"effort={self.effort}")
        return "; ".join(parts)


class RequestContext(msgspec.Struct, frozen=True):
    """What the decision may depend on, extracted once from the request body."""

    task_type: str
    model: str
    endpoint: str  # the wire format: "chat", "completions", "responses" or "anthropic"
    prompt_tokens_est: int
    message_count: int
    has_tools: bool
    json_mode: bool
    stream: bool
    client_temperature: float | None
    client_max_tokens: int | None
    upstream: str = ""
    client_effort: str | None = None  # reasoning effort the client sent (policies/effort.py)


class Decision(msgspec.Struct):
    """One decision, registered before forwarding and logged counterfactually."""

    request_id: str
    context: RequestContext
    context_fingerprint: int
    sent: Params  # what actually left Thermostat
    baseline: Params  # reference arm: client's values, else explicit stand-ins, else provider default/labels (proxy.decision.decider.reference)
    propensity: float  # behaviour propensity of `sent` (1.0 for deterministic modes)
    policy: str  # "baseline", "thompson_gaussian", "linucb", "uniform"
    policy_version: str
    mode: str  # "off", "shadow", "optimized", "holdout", "rollback"
    created_at: float  # unix seconds
    policy_choice: Params | None = None  # what the policy chose (differs from `sent` in shadow)
    policy_propensity: float | None = None  # propensity the policy gave its own choice
    arm_index: int | None = None
    guard_notes: tuple[str, ...] = ()
    budget_reserved: int = 0  # tokens reserved by the budget guard, settled on outcome
    served_upstream: str = ""  # the upstream of a stand-in (`sent.model`); "": the context's upstream

    @property
    def served_by(self) -> tuple[str, str]:
        """(upstream, model) that served the request: the stand-in sent, else the requested model."""
        if self.sent.model is None:
            return self.context.upstream, self.context.model
        return self.served_upstream or self.context.upstream, self.sent.model


class Outcome(msgspec.Struct, frozen=True):
    """What happened to one request. Frozen: built once by `proxy.decision.outcome.complete`; feedback makes a corrected copy."""

    request_id: str
    status: int
    latency_s: float
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error_class: str | None = None
    quality: float | None = None
    reward: float | None = None
    feedback: bool = False  # True once explicit (delayed) feedback replaced the automatic score
    validator_reason: str | None = None  # schema path and error kind of a failed schema check (policies.validators.Violation.reason)
    cost_usd: float | None = None  # the upstream's usage at the model's price (policies.pricing); None: no usage or no price
