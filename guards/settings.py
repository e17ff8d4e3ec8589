"""Typed settings for the safety rules; `proxy.config` composes these from config.toml."""

from __future__ import annotations

from typing import Literal

import msgspec

Mode = Literal["shadow", "canary", "guarded", "general"]
MODES: tuple[str, ...] = ("shadow", "canary", "guarded", "general")
MODE_TRAFFIC: dict[str, float] = {"shadow": 0.0, "canary": 0.05, "guarded": 0.25, "general": 1.0}


class ConstraintsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_delta_temperature: float = 0.2
    max_delta_max_tokens: int = 500
    max_tokens: int = 4096
    require_caws: bool = True
    min_temperature: float = 0.0
    max_temperature: float = 2.0
    # On top of the absolute band: |Δ max_tokens| <= this share of the baseline's max_tokens,
    # so a small cap moves a little (50 -> 25..75), not by the whole ±max_delta_max_tokens.
    max_relative_delta_max_tokens: float = 0.5
    # A max_tokens the client set is a contract: lowered within the region, raised only if true.
    raise_client_max_tokens: bool = False
    # A max_tokens below the baseline's is offered only once the task's answers show, at 95 %
    # (anytime-valid, guards/truncation.py), that it cuts at most this share more answers.
    max_extra_truncation: float = 0.005
    # Reasoning effort moves at most this many levels from the client's (policies/effort.py).
    max_delta_effort_levels: int = 1


class BaselineSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Stand-in for values the client did not send (global default or per task type).

    None (the default) means no stand-in: a knob the client omitted stays omitted, for
    holdout and tuned traffic alike, so the provider's own default is the baseline.
    """

    temperature: float | None = None
    max_tokens: int | None = None
    # Stand-in reasoning effort (a level of policies/effort.py) for requests that carry none.
    effort: str | None = None


class CawsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    enabled: bool = True
    # What the budget counts: "tokens" (prompt + completion, as the upstream reports them) or "usd"
    # (US dollars at each model's price, policies/pricing.py). With "usd", budget_limit and
    # per_task_limits are dollars per window, and the store counts micro-dollars (waivers' extra_tokens too).
    unit: Literal["tokens", "usd"] = "tokens"
    budget_limit: float = 1_000_000
    window_s: int = 86_400
    waiver_threshold: float = 0.8
    warning_threshold: float = 0.9
    on_exhausted: Literal["baseline", "reject"] = "baseline"
    confidence_threshold: float = 0.7
    per_task_limits: dict[str, float] = {}
    # Budget calls on the request path give up after this long and fail safe
    # (verdict.guard_ok = False -> baseline under require_caws). Must be > 0.
    store_timeout_s: float = 0.1
    # How long one instance reuses its copy of the waiver list before re-reading the
    # store (create/revoke through the same guard refresh it at once). >= 0.
    waiver_cache_s: float = 5.0
    # Replicas on a shared store admit requests from a local lease of budget instead of
    # one store round trip per request (guards/lease.py); a slow store then only stops
    # new leases. A lease is sized to cover `lease_horizon_s` of recent spend (and is
    # returned after that long without traffic), takes at most `lease_share` of what is
    # left near the limit, admits for `lease_ttl_s` after its last store contact (the
    # store reclaims an unrenewed one after twice that), and is topped up and reported
    # every `lease_refill_s` by a background task.
    lease_enabled: bool = True
    lease_horizon_s: float = 2.0
    lease_share: float = 0.25
    lease_ttl_s: float = 10.0
    lease_refill_s: float = 0.2


def budget_units(settings: CawsSettings, amount: float) -> int:
    """A configured limit in the integer unit the store counts: tokens, or micro-dollars under `unit = "usd"`."""
    return int(amount) if settings.unit == "tokens" else round(amount * 1_000_000)


class SloSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    latency_p99_ms: float = 500.0
    quality_min: float = 0.7
    error_rate_max: float = 0.01
    window_s: float = 300.0
    min_samples: int = 50
    cooldown_s: float = 600.0
    # Memory cap per traffic class and metric inside one window; past it the oldest
    # samples are dropped first (the window then covers less than window_s). >= min_samples.
    max_samples: int = 20_000
    # How often (at most) outcomes trigger an SLO evaluation on the request path's
    # bookkeeping; a background tick runs as well. 0 = after every outcome.
    check_interval_s: float = 0.25
    # Conservative guarantee (guards/conservative.py): a task type is rolled back once,
    # at 95 % anytime-valid confidence, optimised mean quality is more than this share
    # below holdout's, or optimised p99 latency more than this share above holdout's.
    max_quality_regression: float = 0.05
    max_latency_regression: float = 0.10
    # ... or its mean cost per request (completion tokens) surely more than this share above
    # holdout's while no quality signal shows a sure gain (the client never pays more for nothing).
    max_cost_regression: float = 0.10


class RolloutSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    shadow_duration_hours: float = 24.0
    canary_duration_hours: float = 48.0
    guarded_duration_hours: float = 72.0
    auto_promote: bool = True
    min_samples_for_promotion: int = 200
