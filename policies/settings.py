"""Typed settings for the decision math; `proxy.config` composes these from config.toml."""

from __future__ import annotations

from typing import Annotated

import msgspec

Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class ArmGridSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Candidate grid around the baseline: `temperature_steps` x `max_tokens_steps` deltas."""

    temperature_steps: int = 5
    max_tokens_steps: int = 5


class ThompsonSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Gaussian Thompson sampling per (context bucket, absolute arm); see policies/thompson.py.

    prior_mean / prior_precision: prior on each arm's mean reward, precision in
    pseudo-observations.  prior_alpha / prior_beta: Gamma prior on the reward noise
    precision (prior noise variance guess = prior_beta / prior_alpha).
    exploration_factor: the posterior spread is multiplied by (1 + exploration_factor).
    propensity_draws: joint posterior draws per Monte Carlo table (standard error of
    a propensity <= 0.5 / sqrt(draws); 4096 gives <= 0.0078).  seed: seeds that table.
    refresh_every: a bucket's win-probability table is rebuilt after this many updates
    (1 = after every update, ~400 µs per decision; 8 gives a ~2 µs median, see bench/policy_speed.py).
    cache_size: how many (bucket, arm set) tables are kept.
    max_buckets: distinct context buckets learned separately; rewards of newer buckets
    are pooled in the bucket "other" (a bucket key embeds client-chosen values).
    min_propensity: every allowed arm is played with at least this probability (a uniform
    share K·min_propensity is mixed in), so a converged bucket still logs support for
    every arm and importance weights stay <= 1/min_propensity.  The price is that share
    of traffic: with the 25-arm grid, 0.01 sends 25 % uniformly and the simulator
    (tests/policies/test_policies_learning.py) drops to 82-85 % of the optimum; 0.002 sends
    5 % and keeps >= 90.7 % in 4 of 4 seeds (0.004: 88-92 %), the same floor as LinUCB.
    """

    prior_mean: float = 0.0
    prior_precision: float = 1.0
    exploration_factor: float = 0.1
    propensity_draws: int = 4096
    seed: int = 0
    prior_alpha: float = 1.0
    prior_beta: float = 0.02
    cache_size: int = 4096
    refresh_every: int = 8
    max_buckets: int = 2048
    min_propensity: Fraction = 0.002


class LinUCBSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Joint LinUCB, one ridge model over context × arm features per (task type, model@upstream,
    endpoint); see policies/linucb.py.  max_models caps how many such models are kept (each is
    2·56² floats, ~50 KB); contexts past it share one model "other".

    exploration_factor is the softmax temperature (in reward units) over the UCB
    scores (0 = argmax, ties split); min_propensity is the floor every allowed arm gets.
    Defaults tuned on the simulator (bench/learning): a floor of 0.01 with 25 arms forces
    25 % uniform traffic and caps LinUCB near 88 % of the optimum; 0.002 forces 5 % and
    bounds importance weights by 500.  A softmax temperature of 0.1 spreads traffic over
    arms 0.1 reward apart (≈ 89 %); 0.02 keeps ≥ 95 %.  alpha 0.3 rather than the
    guide's 0.1: at 0.1 an arm that starts unlucky can stay unexplored (one task at 87 %
    of its optimum in 1 of 8 seeds); at 0.3 every task is ≥ 90 % in all 8.
    """

    alpha: float = 0.3
    max_models: int = 512
    regularization: float = 0.01
    exploration_factor: float = 0.02
    min_propensity: Fraction = 0.002


class RewardSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """reward = w_quality*quality - w_latency*latency/baseline_latency - w_tokens*tokens/baseline_tokens.

    max_ratio caps each ratio so one timeout cannot dominate a posterior.
    """

    w_quality: float = 1.0
    w_latency: float = 0.1
    w_tokens: float = 0.01
    max_ratio: float = 10.0


class QualitySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Automatic quality signal weights (documented in README)."""

    truncated_penalty: float = 0.4
    refusal_score: float = 0.2
    empty_score: float = 0.0
    invalid_json_score: float = 0.1
    # An answer that parses but breaks the requested `json_schema` or a tool's `parameters`
    # (policies/validators.py): the automatic score is capped at this.
    schema_invalid_score: float = 0.3
    refusal_phrases: tuple[str, ...] = (
        "i'm sorry, but i can",
        "i am sorry, but i can",
        "i'm sorry, i can",
        "i can't help with",
        "i cannot help with",
        "i can't assist with",
        "i cannot assist with",
        "i'm unable to",
        "i am unable to",
        "i won't be able to",
        "as an ai language model",
        "i can't comply",
        "i cannot comply",
    )
    refusal_window_chars: int = 200
