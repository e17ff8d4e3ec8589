"""One `limits_for`: `thermostat evaluate` offers exactly the arms the live decider offers.

The offline replay once built its own `ModelLimits` without efforts, `accepts_temperature`
or the Messages API's 0-1 clamp, and so scored arms the live decider never plays. Both now
read `proxy.decision.arm_space.model_limits`; these pin the arms for the three cases.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guards.trust_region import ModelLimits
from policies.records import RequestContext
from proxy.config import Config, build_config
from proxy.decision import limits_for, model_limits
from proxy.learning import TrustRegion, make_candidate
from proxy.runtime import Runtime

EFFORTS = ["low", "medium", "high"]


def config(data_dir: Path) -> Config:
    return build_config(
        {
            "server": {"data_dir": str(data_dir)},
            "admin": {"allow_unauthenticated": True},
            "optimization": {"tune_temperature": "always"},
            "upstreams": [
                {"name": "claude", "base_url": "http://127.0.0.1:9/v1", "format": "anthropic", "models": ["claude-*"],
                 "models_config": [{"pattern": "claude-*", "max_tokens_limit": 8192}]},
                {"name": "openai", "base_url": "http://127.0.0.1:9/v1", "models": ["*"],
                 "models_config": [{"pattern": "o-*", "accepts_temperature": False, "efforts": EFFORTS},
                                   {"pattern": "effort-*", "efforts": EFFORTS}]},
            ],
        },
        environ={},
    )


def ctx(model: str, upstream: str, endpoint: str = "chat", effort: str | None = None) -> RequestContext:
    return RequestContext("code", model, endpoint, 100, 1, False, False, False, 0.9, 600, upstream, effort)


CASES = {
    "anthropic": ctx("claude-3", "claude", endpoint="anthropic"),
    "no temperature": ctx("o-4", "openai", effort="medium"),
    "efforts": ctx("effort-1", "openai", effort="medium"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_offline_and_live_offer_the_same_arms(case: str, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    c = CASES[case]
    live = Runtime(cfg)
    offline = TrustRegion(cfg, make_candidate(cfg))
    assert live.limits_for(c.upstream, c.model) == limits_for(cfg.upstreams, c.upstream, c.model)
    live_base, live_arms, _ = live.bandit.allowed_for(c)
    assert offline.allowed(c) == (live_base, live_arms)
    temperatures = {a.temperature for a in live_arms}
    efforts = {a.effort for a in live_arms}
    if case == "anthropic":
        assert max(temperatures) == 1.0 and len(temperatures) > 1  # clamped to the Messages API's range, still tuned
    elif case == "no temperature":
        assert temperatures == {0.9} and efforts == {"low", "medium", "high"}  # the client's value goes as sent
    else:
        assert len(temperatures) > 1 and efforts == {"low", "medium", "high"}


def test_model_limits_maps_every_field_and_clamps_anthropic_without_settings(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    o_model = cfg.upstreams[1].models_config[0]
    assert model_limits(o_model, "openai") == ModelLimits(efforts=tuple(EFFORTS), accepts_temperature=False)
    assert model_limits(None, "anthropic") == ModelLimits(max_temperature=1.0)
    assert model_limits(None, "openai") == ModelLimits()
    assert limits_for(cfg.upstreams, "nowhere", "m") == ModelLimits()
