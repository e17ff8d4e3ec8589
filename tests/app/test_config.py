from __future__ import annotations

import logging

import pytest

from policies.records import Params
from policies.registry import POLICIES
from proxy.config import ConfigError, build_config, load_config, mask_secrets
from proxy.edge import CHAT


def test_defaults_match_deployment_guide() -> None:
    cfg = build_config({}, environ={})
    assert cfg.optimization.mode == "shadow" and cfg.optimization.traffic_fraction == 0.0
    assert cfg.constraints.max_delta_temperature == 0.2 and cfg.constraints.max_delta_max_tokens == 500
    assert cfg.caws.budget_limit == 1_000_000 and cfg.caws.waiver_threshold == 0.8
    assert (cfg.slo.latency_p99_ms, cfg.slo.quality_min, cfg.slo.error_rate_max) == (500, 0.7, 0.01)
    assert (cfg.rollout.shadow_duration_hours, cfg.rollout.canary_duration_hours, cfg.rollout.guarded_duration_hours) == (24, 48, 72)


def test_env_overrides_win_over_file() -> None:
    doc = {"optimization": {"mode": "shadow", "enabled": True}, "slo": {"latency_p99_ms": 900}, "storage": {"redis_url": "redis://file"}}
    env = {
        "LLM_OPTIMIZATION_MODE": "canary",
        "LLM_OPTIMIZATION_ENABLED": "no",
        "LLM_OPTIMIZATION_TRAFFIC_PERCENTAGE": "0.05",
        "SLO_LATENCY_P99_MS": "250",
        "REDIS_URL": "redis://env:6379",
        "BANDIT_POLICY": "linucb",
        "EXPLORATION_FACTOR": "0.3",
        "CAWS_BUDGET_LIMIT": "5000",
        "CONFIDENCE_THRESHOLD": "0.9",
        "ROLLOUT_CANARY_DURATION_HOURS": "1.5",
    }
    cfg = build_config(doc, environ=env)
    assert cfg.optimization.mode == "canary" and cfg.optimization.enabled is False
    assert cfg.optimization.traffic_fraction == 0.05
    assert cfg.slo.latency_p99_ms == 250
    assert cfg.storage.redis_url == "redis://env:6379"
    assert cfg.optimization.policy == "linucb"
    assert cfg.policy.thompson.exploration_factor == 0.3 and cfg.policy.linucb.exploration_factor == 0.3
    assert cfg.caws.budget_limit == 5000 and cfg.caws.confidence_threshold == 0.9
    assert cfg.rollout.canary_duration_hours == 1.5


@pytest.mark.parametrize("raw,expected", [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("no", False)])
def test_booleans(raw: str, expected: bool) -> None:
    assert build_config({}, environ={"CAWS_ENABLED": raw}).caws.enabled is expected


@pytest.mark.parametrize(
    "doc,env,fragment",
    [
        ({}, {"LLM_OPTIMIZATION_MODE": "turbo"}, "'optimization.mode'"),
        ({}, {"LLM_OPTIMIZATION_MODE": "turbo"}, "allowed: shadow, canary, guarded, general"),
        ({}, {"LLM_OPTIMIZATION_TRAFFIC_PERCENTAGE": "1.5"}, "allowed: a fraction in [0, 1]"),
        ({}, {"SLO_LATENCY_P99_MS": "fast"}, "SLO_LATENCY_P99_MS='fast' is not a number"),
        ({}, {"CAWS_ENABLED": "maybe"}, "allowed: true/false/1/0/yes/no"),
        ({"optimization": {"policy": "greedy"}}, {}, "invalid value for 'optimization.policy': 'greedy' (allowed: thompson_gaussian, linucb, baseline, uniform)"),
        ({"slo": {"latency_p99": 3}}, {}, "unknown key 'slo.latency_p99'"),
        ({"upstreams": [{"name": "a", "base_url": "http://x/v1", "timout_s": 1}]}, {}, "unknown key 'upstreams[0].timout_s'"),
        ({"baseline": {"code": {"temp": 1}}}, {}, "unknown key 'baseline.code.temp'"),
        ({"upstreams": [{"name": "a", "base_url": "ftp://x"}]}, {}, "http:// or https://"),
        ({"caws": {"budget_limit": "lots"}}, {}, "'caws.budget_limit'"),
        ({"server": {"header_timeout_s": 0}}, {}, "'server.header_timeout_s': 0.0 (allowed: a positive number)"),
        ({"server": {"body_timeout_s": -1}}, {}, "'server.body_timeout_s'"),
        ({"server": {"max_connections": 0}}, {}, "'server.max_connections'"),
        ({"upstreams": [{"name": "a", "base_url": "http://x/v1", "max_response_bytes": 0}]}, {}, "'upstreams[a].max_response_bytes'"),
        ({"storage": {"journal_fsync_interval_s": 0}}, {}, "'storage.journal_fsync_interval_s': 0.0 (allowed: > 0)"),
        ({"storage": {"state_snapshot_interval_s": -1}}, {}, "'storage.state_snapshot_interval_s': -1.0 (allowed: > 0)"),
        ({"server": {"max_task_types": 0}}, {}, "invalid value for 'server.max_task_types': 0 (allowed: a positive number)"),
        ({"server": {"max_model_bytes": -1}}, {}, "'server.max_model_bytes'"),
        ({"storage": {"state_ttl_s": 0}}, {}, "'storage.state_ttl_s'"),
        ({"policy": {"thompson": {"max_buckets": 0}}}, {}, "'policy.thompson.max_buckets'"),
        ({"telemetry": {"otlp_endpoint": "127.0.0.1:4318"}}, {}, "'telemetry.otlp_endpoint'"),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT='collector:4318' (sets 'telemetry.otlp_endpoint')"),
        ({"telemetry": {"queue_size": 0}}, {}, "'telemetry.queue_size'"),
        # A quoted number is refused, not coerced (strict conversion).
        # The key and the expected type, in the "(allowed: ...)" shape of every other error (issue 27).
        ({"server": {"port": "8080"}}, {}, "invalid value for 'server.port': \"8080\" (allowed: an integer; in TOML a quoted value is a string)"),
        ({"storage": {"journal": "true"}}, {}, "invalid value for 'storage.journal': \"true\" (allowed: true or false;"),
        ({"server": {"port": 8.5}}, {}, "invalid value for 'server.port': 8.5 (allowed: an integer)"),
        # A table's entry is named, not written `[...]`.
        ({"caws": {"per_task_limits": {"code": 5, "chat": "5"}}}, {}, "invalid value for 'caws.per_task_limits.chat': \"5\" (allowed: a number"),
        ({"baseline": {"code": {"temperature": "0.5"}}}, {}, "invalid value for 'baseline.code.temperature': \"0.5\" (allowed: a number"),
        # A value set by an environment variable is reported under the variable's name.
        ({}, {"LLM_OPTIMIZATION_MODE": "turbo"}, "environment variable LLM_OPTIMIZATION_MODE='turbo' (sets 'optimization.mode')"),
        ({}, {"LLM_OPTIMIZATION_TRAFFIC_PERCENTAGE": "1.5"}, "LLM_OPTIMIZATION_TRAFFIC_PERCENTAGE='1.5' (sets 'optimization.traffic_percentage'): 1.5 (allowed"),
        ({}, {"BANDIT_POLICY": "greedy"}, "BANDIT_POLICY='greedy'"),
        ({}, {"CONFIDENCE_THRESHOLD": "2"}, "CONFIDENCE_THRESHOLD='2' (sets 'caws.confidence_threshold')"),
        ({"judge": {"sample_rate": 1.5}}, {}, "'judge.sample_rate': 1.5 (allowed: a fraction in [0, 1])"),
        ({"judge": {"max_concurrency": 0}}, {}, "'judge.max_concurrency'"),
        ({"judge": {"enabled": True, "model": " "}}, {}, "'judge.model'"),
        ({"judge": {"rubric": "x", "temperature": 0}}, {}, "unknown key 'judge.temperature'"),
        ({"feedback": {"regenerate_window_s": 0}}, {}, "'feedback.regenerate_window_s'"),
        ({"feedback": {"regenerated_quality": -0.1}}, {}, "'feedback.regenerated_quality'"),
        ({"policy": {"quality": {"schema_invalid_score": 2}}}, {}, "'policy.quality.schema_invalid_score'"),
    ],
)
def test_invalid_config_one_clear_line(doc: dict, env: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(doc, environ=env)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_policy_names_are_the_registry_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """Config validation reads the registry: a policy registered there is accepted with no list to update."""
    with pytest.raises(ConfigError):
        build_config({"optimization": {"policy": "greedy"}}, environ={})
    monkeypatch.setitem(POLICIES, "greedy", POLICIES["baseline"])
    assert build_config({"optimization": {"policy": "greedy"}}, environ={}).optimization.policy == "greedy"


def test_file_value_is_not_blamed_on_an_unset_variable() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"optimization": {"mode": "turbo"}}, environ={"LLM_OPTIMIZATION_ENABLED": "true"})
    assert str(info.value).startswith("invalid value for 'optimization.mode'") and "environment" not in str(info.value)


def test_base_url_without_path_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="thermostat.config"):
        build_config({"upstreams": [{"name": "oa", "base_url": "https://api.openai.com/v1"}]}, environ={})
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="thermostat.config"):
        cfg = build_config({"upstreams": [{"name": "oa", "base_url": "https://api.openai.com"}]}, environ={})
    assert cfg.upstreams[0].base_url == "https://api.openai.com"  # a warning, not a refusal
    assert len(caplog.records) == 1 and "upstreams[oa].base_url 'https://api.openai.com' has no path" in caplog.records[0].getMessage()


def test_shipped_config_is_valid() -> None:
    cfg = load_config("config.toml", environ={})
    assert cfg.upstreams[0].base_url == "https://api.openai.com/v1"


def test_mask_secrets() -> None:
    masked = mask_secrets({"storage": {"database_url": "postgresql://u:pw@h/db", "redis_url": "redis://h"}, "x": {"api_key": "sk-1", "api_key_env": "K"}})
    assert masked["storage"]["database_url"] == "postgresql://u:***@h/db"
    assert masked["x"] == {"api_key": "***", "api_key_env": "K"}


def test_patch_body_clean_values_and_field_names() -> None:
    doc = {"model": "m", "max_completion_tokens": 100, "temperature": 1}
    assert CHAT.patch(doc, Params(temperature=0.8999999761581421, max_tokens=700))
    assert doc == {"model": "m", "max_completion_tokens": 700, "temperature": 0.9}
    doc2 = {"model": "m", "temperature": 1}
    assert not CHAT.patch(doc2, Params(temperature=1.0))  # 1 == 1.0: client's bytes kept
    doc3 = {"model": "m"}
    assert CHAT.patch(doc3, Params(temperature=0.5, max_tokens=64))
    assert doc3 == {"model": "m", "temperature": 0.5, "max_tokens": 64}
