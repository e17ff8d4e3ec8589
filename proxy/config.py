"""Configuration: `config.toml` + environment overrides, validated once at start-up.

Everything downstream receives these frozen structs; nothing re-reads the file or
the environment on the request path. Errors are raised as `ConfigError` with one
line that names the key and what it accepts, because an operator reading a crash
loop's last log line should know what to fix.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import logging
import math
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

from guards.settings import (
    MODE_TRAFFIC,
    BaselineSettings,
    CawsSettings,
    ConstraintsSettings,
    RolloutSettings,
    SloSettings,
)
from policies.effort import ANTHROPIC_EFFORTS, EFFORT_LEVELS
from policies.registry import POLICIES
from policies.settings import (
    ArmGridSettings,
    LinUCBSettings,
    QualitySettings,
    RewardSettings,
    ThompsonSettings,
)
from proxy.common import METHODS, normalize_origin, parse_forward_path, table_providers, valid_host_entry

ModeName = Literal["shadow", "canary", "guarded", "general"]
TuneTemperature = Literal["auto", "always", "never"]
UpstreamFormat = Literal["openai", "anthropic"]


log = logging.getLogger("thermostat.config")


class ConfigError(Exception):
    """A configuration problem, described in one line.

    `key` (the dotted config key, when one is to blame) lets `build_config` name the
    environment variable that set it: the operator edits the variable, not the file.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ServerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 10 * 1024 * 1024
    data_dir: str = "./.thermostat"
    shutdown_grace_s: float = 20.0
    store_prompts: bool = False
    # Slow or idle clients: a connection must finish its request headers within
    # header_timeout_s and its body within body_timeout_s (else 408 and closed);
    # beyond max_connections open connections, requests get 503.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 2048
    # Open connections one client address may hold (0 = no cap): beyond it a new connection gets
    # the 503 at once, so one client's idle sockets cannot fill `max_connections` for everyone.
    # Peers in `forwarded_allow_ips` (reverse proxies, which carry every client) are exempt.
    max_connections_per_client: int = 256
    # Client-controlled keys are bounded (see proxy/runtime.py `KeyFolder`): distinct task
    # types and models per upstream past these caps share the bucket "other"; a longer
    # x-task-type header or model name gets a 400.
    max_task_types: int = 256
    max_models_per_upstream: int = 256
    max_task_type_bytes: int = 128
    max_model_bytes: int = 256
    # Host names (no port) this server answers to; empty = any. Against DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()
    # Peers whose X-Forwarded-For / X-Forwarded-Proto uvicorn believes; empty = nobody's.
    forwarded_allow_ips: tuple[str, ...] = ()
    # Worker processes of `serve`: "auto" is one per usable core once storage.redis_url shares the
    # budget, posterior and rollback switch between them, else 1 (see `worker_count`); a number > 1
    # needs storage.redis_url. `serve --workers` overrides it.
    workers: int | Literal["auto"] = "auto"


class ModelSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Capabilities of the models matching `pattern` (a glob) on one upstream."""

    pattern: str
    fixed_temperature: float | None = None
    min_temperature: float = 0.0
    max_temperature: float = 2.0
    max_tokens_limit: int | None = None
    # What the provider uses when no temperature is sent (OpenAI: 1.0). With evidence, an
    # omitted temperature may be tuned around it; without it, an omitted one stays omitted.
    default_temperature: float | None = None
    # Which knobs the model takes: False for models that refuse a temperature (it is then
    # never added or moved); `efforts` lists the reasoning effort levels it accepts
    # (policies/effort.py), empty = effort is not tuned on this model.
    accepts_temperature: bool = True
    efforts: tuple[str, ...] = ()
    # US dollars per million tokens; each wins over the price table (proxy/decision/prices.py).
    # Cached input without its own price is billed as input once input_price_per_mtok is set here.
    input_price_per_mtok: float | None = None
    output_price_per_mtok: float | None = None
    cached_input_price_per_mtok: float | None = None
    # Declared stand-ins: models that may serve a request for a model matching `pattern`
    # (issue 28, the model as a knob). Each must be served by an upstream of this upstream's
    # wire format (`serving_upstream`, checked at start-up); nothing undeclared is ever
    # substituted, and the stand-in's own `models_config` limits apply to what it is sent.
    substitutes: tuple[str, ...] = ()


# What a client of a model API needs (after `/v1`, each for one method): inference and the
# read-only model listing. Everything else (stored responses, batches, files, fine-tuning,
# deleting models, images, audio, organisation and admin endpoints) is refused unless an
# operator lists it, so the key from `api_key_env` cannot be spent or used to read or delete
# on anyone's behalf by whoever reaches the proxy (docs/forwarding.md).
DEFAULT_FORWARD_PATHS: tuple[str, ...] = (
    "POST /chat/completions",
    "POST /completions",
    "POST /responses",
    "POST /messages",
    "POST /embeddings",
    "POST /moderations",
    "POST /messages/count_tokens",
    "POST /responses/input_tokens",
    "GET /models",
    "GET /models/*",
)


class UpstreamSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    base_url: str
    # Wire format the upstream speaks: "anthropic" = Messages API (`/v1/messages`, the
    # operator's key goes in `x-api-key`); "openai" = chat/completions/responses.
    format: UpstreamFormat = "openai"
    models: tuple[str, ...] = ("*",)
    api_key_env: str | None = None
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    max_connections: int = 512
    retries: int = 2
    models_config: tuple[ModelSettings, ...] = ()
    forward_paths: tuple[str, ...] = DEFAULT_FORWARD_PATHS
    # With api_key_env set, the client's own credential headers are dropped unless this is true.
    forward_client_credentials: bool = False
    # Non-streaming bodies (and single SSE events) are buffered up to this size to read
    # usage; a larger one is relayed as it arrives, without a summary, and counted.
    max_response_bytes: int = 32 * 1024 * 1024
    # Which provider's prices the genai-prices table gives this upstream's models (a table provider
    # id such as "openai"); unset = the provider whose API URL matches base_url, if any.
    price_provider: str | None = None


class StorageSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    database_url: str = ""
    redis_url: str = ""
    queue_size: int = 10_000
    batch_size: int = 500
    flush_interval_s: float = 0.5
    retention_days: int = 90
    sync_interval_s: float = 1.0
    # Redis shared state (used when redis_url is set): every key starts with the prefix
    # (several deployments can share one Redis), commands give up after redis_timeout_s,
    # decisions stay findable by request id for decision_ttl_s, and policy statistics live
    # under a "family" that an operator bumps to start a fresh shared posterior.
    redis_key_prefix: str = "thermostat:"
    redis_timeout_s: float = 1.0
    decision_ttl_s: float = 86_400.0
    policy_family: str = "1"
    # Shared policy/cost statistics, their change index and version expire after this long
    # without any replica syncing (each sync pushes the expiry back).
    state_ttl_s: float = 30 * 86_400.0
    # PostgreSQL writer: pool size, per-batch write timeout before a batch is spooled instead,
    # fsync of every spooled batch (turn off only on disposable disks), and how long shutdown
    # keeps replaying the spool before leaving the rest for the next start.
    pool_max_size: int = 4
    write_timeout_s: float = 5.0
    spool_fsync: bool = True
    shutdown_flush_s: float = 5.0
    # Crash journal (proxy/store/journal.py): decisions and outcomes appended to a local file
    # before the in-memory queue, replayed at the next start after a crash; fsynced in the
    # background every journal_fsync_interval_s (power loss), never on the request path.
    journal: bool = True
    journal_fsync_interval_s: float = 0.2
    # Without redis_url: budget, waivers, rollout state and posterior kept under data_dir/state
    # (change journal + a SQLite snapshot every state_snapshot_interval_s), so a restart resumes.
    state_persist: bool = True
    state_snapshot_interval_s: float = 1.0


class OptimizationSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    enabled: bool = True
    mode: ModeName = "shadow"
    traffic_percentage: float | None = None
    policy: str = "thompson_gaussian"  # a name in policies.registry.POLICIES (checked in _validate_ranges)
    seed: int | None = None
    # Temperature moves only on evidence that can see it: under "auto", once a task type has
    # min_quality_signals explicit feedback signals; before that only max_tokens arms compete.
    tune_temperature: TuneTemperature = "auto"
    min_quality_signals: int = 50
    # Share of assignment keys served the baseline (mode "holdout") in every phase, general included.
    holdout_fraction: float = 0.05
    # Share of a task's tuned traffic each declared stand-in model (`substitutes`) may carry before
    # its judged quality is shown, anytime-valid, no worse than the requested model's (proxy/decision/model_stage.py).
    model_exploration_share: float = 0.05

    @property
    def traffic_fraction(self) -> float:
        """Share of traffic optimised: the explicit percentage, else the mode's default."""
        if self.traffic_percentage is not None:
            return self.traffic_percentage
        return MODE_TRAFFIC[self.mode]


class AdminSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    token_env: str = "THERMOSTAT_ADMIN_TOKEN"
    # Without a token anything reaching the port from this host counts as loopback (a
    # same-host forwarder, a reverse proxy, a browser tab), so serving without one is opt-in.
    allow_unauthenticated: bool = False
    # Origins (scheme://host[:port]) allowed besides the server's own, e.g. an admin UI.
    allowed_origins: tuple[str, ...] = ()


class AlertSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    webhook_urls: tuple[str, ...] = ()


class TelemetrySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """OpenTelemetry traces (proxy/observability/tracing.py): one span per proxied request.

    Spans go to `<otlp_endpoint>/v1/traces` as OTLP/HTTP protobuf, in batches of
    `batch_size` at least every `export_interval_s`; past `queue_size` waiting spans new
    ones are dropped and counted. Prompts are exported only with `capture_prompts`.
    """

    enabled: bool = False
    otlp_endpoint: str = "http://127.0.0.1:4318"
    service_name: str = "thermostat"
    capture_prompts: bool = False
    queue_size: int = 8192
    batch_size: int = 512
    export_interval_s: float = 1.0
    export_timeout_s: float = 5.0
class JudgeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """LLM-as-judge on a sample of completed, decided requests (proxy/learning/judge.py)."""

    enabled: bool = False
    model: str = "gpt-4o-mini"  # routed through [[upstreams]] like any client model
    sample_rate: float = 0.1
    # Share of holdout requests judged; None = as many judged holdout requests as judged tuned ones
    # (`holdout_rate`): the holdout is small and its judged estimate is the guards' bottleneck.
    holdout_sample_rate: float | None = None
    max_concurrency: int = 8
    queue_size: int = 1000
    timeout_s: float = 30.0
    max_input_chars: int = 16000
    max_answer_chars: int = 32000  # answer text kept per stream for judging
    rubric: str = "Rate how well the answer serves the user's request: correct, complete, clear and concise."
    rubrics: dict[str, str] = {}  # task type -> rubric
    breaker_failures: int = 5  # consecutive failures that open the circuit
    breaker_cooldown_s: float = 60.0  # first wait before a trial call; doubles while it keeps failing
    min_agreement: float = 0.3  # Spearman with explicit feedback below this (per task type) stops its signals
    min_agreement_pairs: int = 30  # (judge, explicit) pairs needed before the judge can be distrusted
    # Mute the judge for a task type whose scores surely follow answer length within arms
    # (P(concordant) > 0.5 + margin, anytime-valid at 95 %; policies/judge_bias.py).
    length_bias_check: bool = True
    length_bias_margin: float = 0.1
    # pairwise: a sampled chat request sent with a tuned arm is sent again with the baseline parameters
    # (after the client's answer, in the judge's queue) and the judge prefers one answer (proxy/learning/judge.py)
    mode: Literal["pointwise", "pairwise"] = "pointwise"

    def holdout_rate(self, holdout_fraction: float) -> float:
        """The sample rate for holdout requests: the configured one, else min(1, sample_rate·(1 − h)/h), never below sample_rate.

        For a fixed number of judge calls, the width of a difference of two means is smallest when
        both streams have as many signals; with a holdout share h, judging holdout requests
        (1 − h)/h times as often gives that (1.0 at the default h = 0.05 and sample_rate = 0.1:
        0.145 judge calls per request instead of 0.1).
        """
        if self.holdout_sample_rate is not None:
            return self.holdout_sample_rate
        if holdout_fraction <= 0.0:
            return self.sample_rate
        return max(self.sample_rate, min(1.0, self.sample_rate * (1.0 - holdout_fraction) / holdout_fraction))


class FeedbackSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Implicit signals (proxy/decision/regeneration.py)."""

    regenerate_window_s: float = 600.0
    regenerated_quality: float = 0.0
    max_fingerprints: int = 100_000


class PolicySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Statistics weigh a reward seen one half-life ago by 1/2 (policies.base.Discount); 0 = never forget.
    # On by default (one day): a model can change under its name without the change detector seeing it,
    # and a day's memory re-learns within days; the stationary cost is measured in docs/benchmarks.md.
    # (0 rather than inf: the config crosses to worker processes as JSON, which has no inf.)
    half_life_s: Annotated[float, msgspec.Meta(ge=0.0)] | None = 86400.0
    grid: ArmGridSettings = ArmGridSettings()
    thompson: ThompsonSettings = ThompsonSettings()
    linucb: LinUCBSettings = LinUCBSettings()
    reward: RewardSettings = RewardSettings()
    quality: QualitySettings = QualitySettings()


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    upstreams: tuple[UpstreamSettings, ...] = ()
    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()
    optimization: OptimizationSettings = OptimizationSettings()
    constraints: ConstraintsSettings = ConstraintsSettings()
    baseline: dict[str, BaselineSettings] = {}
    caws: CawsSettings = CawsSettings()
    slo: SloSettings = SloSettings()
    rollout: RolloutSettings = RolloutSettings()
    policy: PolicySettings = PolicySettings()
    admin: AdminSettings = AdminSettings()
    alerts: AlertSettings = AlertSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    judge: JudgeSettings = JudgeSettings()
    feedback: FeedbackSettings = FeedbackSettings()

    def baseline_for(self, task_type: str) -> BaselineSettings:
        """Per-task baseline, else `[baseline.default]`, else the built-in default."""
        return self.baseline.get(task_type) or self.baseline.get("default") or BaselineSettings()


# Environment variable -> (path in the config document, kind). Names follow the deployment guide.
ENV_OVERRIDES: dict[str, tuple[tuple[str, ...], str]] = {
    "LLM_OPTIMIZATION_ENABLED": (("optimization", "enabled"), "bool"),
    "LLM_OPTIMIZATION_MODE": (("optimization", "mode"), "str"),
    "LLM_OPTIMIZATION_TRAFFIC_PERCENTAGE": (("optimization", "traffic_percentage"), "float"),
    "DATABASE_URL": (("storage", "database_url"), "str"),
    "REDIS_URL": (("storage", "redis_url"), "str"),
    "CAWS_ENABLED": (("caws", "enabled"), "bool"),
    "CAWS_BUDGET_LIMIT": (("caws", "budget_limit"), "float"),
    "CAWS_WAIVER_THRESHOLD": (("caws", "waiver_threshold"), "float"),
    "BANDIT_POLICY": (("optimization", "policy"), "str"),
    "EXPLORATION_FACTOR": (("policy", "*", "exploration_factor"), "float"),
    "CONFIDENCE_THRESHOLD": (("caws", "confidence_threshold"), "float"),
    "SLO_LATENCY_P99_MS": (("slo", "latency_p99_ms"), "float"),
    "SLO_QUALITY_MIN": (("slo", "quality_min"), "float"),
    "SLO_ERROR_RATE_MAX": (("slo", "error_rate_max"), "float"),
    "ROLLOUT_SHADOW_DURATION_HOURS": (("rollout", "shadow_duration_hours"), "float"),
    "ROLLOUT_CANARY_DURATION_HOURS": (("rollout", "canary_duration_hours"), "float"),
    "ROLLOUT_GUARDED_DURATION_HOURS": (("rollout", "guarded_duration_hours"), "float"),
    # The OpenTelemetry SDK's own variables, so a collector set up for other services works here too.
    "OTEL_EXPORTER_OTLP_ENDPOINT": (("telemetry", "otlp_endpoint"), "str"),
    "OTEL_SERVICE_NAME": (("telemetry", "service_name"), "str"),
}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (allowed: true/false/1/0/yes/no)")


def _parse_env_value(name: str, raw: str, kind: str) -> Any:
    if kind == "bool":
        return parse_bool(name, raw)
    if kind in ("int", "float"):
        try:
            number = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if kind == "int":
            if not number.is_integer():
                raise ConfigError(f"{name}={raw!r} is not a whole number")
            return int(number)
        return number
    return raw


def _set_path(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = doc
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def apply_env_overrides(doc: dict[str, Any], environ: typing.Mapping[str, str], applied: dict[str, str] | None = None) -> dict[str, Any]:
    """Environment wins over the file (the deployment guide sets everything by env).

    `applied`, when given, receives dotted key -> `NAME='raw'` for every override used, so
    a value rejected later is reported under the variable that set it.
    """
    for name, (path, kind) in ENV_OVERRIDES.items():
        raw = environ.get(name)
        if raw is None or raw == "" and kind != "str":
            continue
        value = _parse_env_value(name, raw, kind)
        paths = [(path[0], section, path[2]) for section in ("thompson", "linucb")] if path[1] == "*" else [path]  # "*": every policy
        for target in paths:
            _set_path(doc, target, value)
            if applied is not None:
                applied[".".join(target)] = f"{name}={raw!r}"
    return doc


def _struct_type(tp: Any) -> Any:
    """The struct class inside `tp` (unwrapping Optional, tuple[...] and dict[str, ...])."""
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return _struct_type(typing.get_args(tp)[0])
    if origin is dict:
        return _struct_type(typing.get_args(tp)[1])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            found = _struct_type(arg)
            if found is not None:
                return found
        return None
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    return None


def _check_unknown_keys(value: Any, struct: type[msgspec.Struct], where: str) -> None:
    """Name a typo'd key and list the allowed ones (msgspec says only 'unknown field')."""
    if not isinstance(value, dict):
        return
    hints = typing.get_type_hints(struct)
    fields = struct.__struct_fields__
    for key, child in value.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown key '{path}' (allowed: {', '.join(fields)})")
        tp = hints[key]
        sub = _struct_type(tp)
        if sub is None:
            continue
        origin = typing.get_origin(tp)
        if origin is dict and isinstance(child, dict):
            for name, item in child.items():
                _check_unknown_keys(item, sub, f"{path}.{name}")
        elif origin in (tuple, list) and isinstance(child, list):
            for index, item in enumerate(child):
                _check_unknown_keys(item, sub, f"{path}[{index}]")
        else:
            _check_unknown_keys(child, sub, path)


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "array": "an array",
               "object": "a table", "null": "nothing"}


def _walk(doc: Any, path: str) -> tuple[bool, Any]:
    """The value at a msgspec path such as `$.upstreams[0].timeout_s` in the parsed TOML, if there."""
    value = doc
    for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path.removeprefix("$")):
        name, index = part
        if name and isinstance(value, dict) and name in value:
            value = value[name]
        elif index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        else:
            return False, None
    return True, value


def _msgspec_type_name(value: Any) -> str:
    for tp, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (list, "array"), (dict, "object")):
        if isinstance(value, tp):
            return name
    return "null"


def _name_dict_entry(doc: dict[str, Any], path: str, message: str) -> str:
    """msgspec writes a table's entry as `[...]`: name the first entry holding the refused type instead."""
    got = re.search(r"got `([^`]+)`", message)
    if "[...]" not in path or got is None:
        return path
    head, _, tail = path.partition("[...]")
    found, table = _walk(doc, head)
    for name, entry in (table.items() if found and isinstance(table, dict) else ()):
        here, value = _walk(entry, "$" + tail)
        if here and _msgspec_type_name(value) == got.group(1):
            return f"{head}.{name}{tail}"
    return path


def _type_mismatch(doc: dict[str, Any], path: str, message: str) -> str | None:
    """"8080" (allowed: an integer; in TOML a quoted value is a string), in the shape of the other errors."""
    m = re.fullmatch(r"Expected `([^`]+)`, got `([^`]+)`", message)
    if m is None:
        return None
    wanted = [_TYPE_WORDS.get(w.strip(), w.strip()) for w in m.group(1).split("|") if w.strip() != "null"]
    found, value = _walk(doc, path)
    shown = json.dumps(value) if found and isinstance(value, (str, int, float, bool)) else f"{_TYPE_WORDS.get(m.group(2), m.group(2))}"
    hint = "; in TOML a quoted value is a string" if m.group(2) == "str" else ""
    return f"{shown} (allowed: {' or '.join(wanted)}{hint})"


def _allowed_values(path: str) -> str:
    """For a failing `$.a.b` path, the allowed values when the field is a Literal."""
    parts = [p for p in path.replace("$.", "").split(".") if p]
    struct: Any = Config
    tp: Any = None
    for part in parts:
        name = part.split("[")[0]
        if struct is None or name not in getattr(struct, "__struct_fields__", ()):
            return ""
        tp = typing.get_type_hints(struct)[name]
        struct = _struct_type(tp)
    literal_args = [a for a in _flatten_union(tp) if typing.get_origin(a) is Literal]
    if literal_args:
        values = [v for lit in literal_args for v in typing.get_args(lit)]
        return " (allowed: " + ", ".join(str(v) for v in values) + ")"
    return ""


def _flatten_union(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return list(typing.get_args(tp))
    return [tp]


def _bad(key: str, msg: str) -> ConfigError:
    return ConfigError(f"invalid value for '{key}': {msg}", key=key)


def _validate_ranges(cfg: Config) -> None:
    """Every value in its allowed range, checked in a fixed order so that the first problem is the one reported."""
    _check_fractions_and_counts(cfg)
    _check_budget_and_guards(cfg)
    _check_server_and_telemetry(cfg)
    _check_upstreams(cfg)


def _check_fractions_and_counts(cfg: Config) -> None:
    """The policy name and the plain ranges: fractions in [0, 1], positive counts and durations."""
    if cfg.optimization.policy not in POLICIES:
        raise _bad("optimization.policy", f"{cfg.optimization.policy!r} (allowed: {', '.join(POLICIES)})")
    tp = cfg.optimization.traffic_percentage
    if tp is not None and not 0.0 <= tp <= 1.0:
        raise _bad("optimization.traffic_percentage", f"{tp} (allowed: a fraction in [0, 1])")
    for key, value in (
        ("caws.waiver_threshold", cfg.caws.waiver_threshold),
        ("caws.warning_threshold", cfg.caws.warning_threshold),
        ("caws.confidence_threshold", cfg.caws.confidence_threshold),
        ("slo.quality_min", cfg.slo.quality_min),
        ("slo.error_rate_max", cfg.slo.error_rate_max),
        ("judge.sample_rate", cfg.judge.sample_rate),
        ("judge.holdout_sample_rate", cfg.judge.holdout_sample_rate if cfg.judge.holdout_sample_rate is not None else 1.0),
        ("judge.min_agreement", cfg.judge.min_agreement),
        ("feedback.regenerated_quality", cfg.feedback.regenerated_quality),
        ("policy.quality.schema_invalid_score", cfg.policy.quality.schema_invalid_score),
    ):
        if not 0.0 <= value <= 1.0:
            raise _bad(key, f"{value} (allowed: a fraction in [0, 1])")
    if not 0.0 <= cfg.judge.length_bias_margin < 0.5:
        raise _bad("judge.length_bias_margin", f"{cfg.judge.length_bias_margin} (allowed: a number in [0, 0.5))")
    for key, number in (
        ("caws.budget_limit", cfg.caws.budget_limit),
        ("caws.window_s", cfg.caws.window_s),
        ("constraints.max_tokens", cfg.constraints.max_tokens),
        ("server.max_body_bytes", cfg.server.max_body_bytes),
        ("server.header_timeout_s", cfg.server.header_timeout_s),
        ("server.body_timeout_s", cfg.server.body_timeout_s),
        ("server.max_connections", cfg.server.max_connections),
        ("storage.queue_size", cfg.storage.queue_size),
        ("storage.batch_size", cfg.storage.batch_size),
        ("slo.latency_p99_ms", cfg.slo.latency_p99_ms),
        ("server.max_task_types", cfg.server.max_task_types),
        ("server.max_models_per_upstream", cfg.server.max_models_per_upstream),
        ("server.max_task_type_bytes", cfg.server.max_task_type_bytes),
        ("server.max_model_bytes", cfg.server.max_model_bytes),
        ("storage.state_ttl_s", cfg.storage.state_ttl_s),
        ("policy.thompson.max_buckets", cfg.policy.thompson.max_buckets),
        ("judge.max_concurrency", cfg.judge.max_concurrency),
        ("judge.queue_size", cfg.judge.queue_size),
        ("judge.timeout_s", cfg.judge.timeout_s),
        ("judge.max_input_chars", cfg.judge.max_input_chars),
        ("judge.max_answer_chars", cfg.judge.max_answer_chars),
        ("judge.breaker_failures", cfg.judge.breaker_failures),
        ("judge.min_agreement_pairs", cfg.judge.min_agreement_pairs),
        ("judge.breaker_cooldown_s", cfg.judge.breaker_cooldown_s),
        ("feedback.regenerate_window_s", cfg.feedback.regenerate_window_s),
        ("feedback.max_fingerprints", cfg.feedback.max_fingerprints),
    ):
        if number <= 0:
            raise _bad(key, f"{number} (allowed: a positive number)")
    if cfg.server.max_connections_per_client < 0:
        raise _bad("server.max_connections_per_client", f"{cfg.server.max_connections_per_client} (allowed: 0 = no cap, or a positive number)")
    for key, seconds in (
        ("storage.journal_fsync_interval_s", cfg.storage.journal_fsync_interval_s),
        ("storage.state_snapshot_interval_s", cfg.storage.state_snapshot_interval_s),
    ):
        if seconds <= 0:
            raise _bad(key, f"{seconds} (allowed: > 0)")


def _check_budget_and_guards(cfg: Config) -> None:
    """The budget (limits, leases), the SLO and conservative guards, the judge, the trust region and the holdout."""
    if cfg.judge.enabled and not cfg.judge.model.strip():
        raise _bad("judge.model", "empty (allowed: a model name served by one of [[upstreams]])")
    if not math.isfinite(cfg.caws.budget_limit) or not all(math.isfinite(v) and v > 0 for v in cfg.caws.per_task_limits.values()):
        raise _bad("caws.budget_limit", "limits must be finite and positive (caws.budget_limit, caws.per_task_limits)")
    if cfg.caws.unit == "tokens":
        for key, limit in (("caws.budget_limit", cfg.caws.budget_limit), *((f"caws.per_task_limits.{t}", v) for t, v in cfg.caws.per_task_limits.items())):
            if limit != int(limit):
                raise _bad(key, f"{limit} (allowed: a whole number of tokens; dollars need caws.unit = \"usd\")")
    if cfg.caws.store_timeout_s <= 0:
        raise _bad("caws.store_timeout_s", f"{cfg.caws.store_timeout_s} (allowed: > 0)")
    if cfg.caws.waiver_cache_s < 0:
        raise _bad("caws.waiver_cache_s", f"{cfg.caws.waiver_cache_s} (allowed: >= 0)")
    for key, seconds in (
        ("caws.lease_horizon_s", cfg.caws.lease_horizon_s),
        ("caws.lease_ttl_s", cfg.caws.lease_ttl_s),
        ("caws.lease_refill_s", cfg.caws.lease_refill_s),
    ):
        if seconds <= 0:
            raise _bad(key, f"{seconds} (allowed: > 0)")
    if not 0.0 < cfg.caws.lease_share <= 1.0:
        raise _bad("caws.lease_share", f"{cfg.caws.lease_share} (allowed: a fraction in (0, 1])")
    if cfg.caws.lease_refill_s >= cfg.caws.lease_ttl_s:
        raise _bad("caws.lease_refill_s", f"{cfg.caws.lease_refill_s} (allowed: < caws.lease_ttl_s)")
    if cfg.slo.max_samples < cfg.slo.min_samples or cfg.slo.check_interval_s < 0:
        raise _bad("slo.max_samples", "must be >= slo.min_samples, and slo.check_interval_s >= 0")
    for key, share in (("slo.max_quality_regression", cfg.slo.max_quality_regression), ("slo.max_latency_regression", cfg.slo.max_latency_regression)):
        if not 0.0 <= share < 1.0:
            raise _bad(key, f"{share} (allowed: a fraction in [0, 1))")
    if not 0.0 <= cfg.slo.max_cost_regression < 10.0:
        raise _bad("slo.max_cost_regression", f"{cfg.slo.max_cost_regression} (allowed: a fraction in [0, 10))")
    hsr = cfg.judge.holdout_sample_rate
    if hsr is not None and hsr < cfg.judge.sample_rate:
        raise _bad("judge.holdout_sample_rate", f"{hsr} (allowed: >= judge.sample_rate {cfg.judge.sample_rate}: holdout is judged at least as often)")
    if cfg.constraints.max_delta_temperature < 0 or cfg.constraints.max_delta_max_tokens < 0:
        raise _bad("constraints.max_delta_*", "deltas must be >= 0")
    if cfg.constraints.max_delta_effort_levels < 0:
        raise _bad("constraints.max_delta_effort_levels", f"{cfg.constraints.max_delta_effort_levels} (allowed: >= 0)")
    for task, base in cfg.baseline.items():
        if base.effort is not None and base.effort not in EFFORT_LEVELS:
            raise _bad(f"baseline.{task}.effort", f"{base.effort!r} (allowed: {', '.join(EFFORT_LEVELS)})")
    if not 0.0 <= cfg.constraints.max_relative_delta_max_tokens <= 1.0:
        raise _bad("constraints.max_relative_delta_max_tokens", f"{cfg.constraints.max_relative_delta_max_tokens} (allowed: a fraction in [0, 1])")
    if not 0.0 <= cfg.constraints.max_extra_truncation <= 1.0:
        raise _bad("constraints.max_extra_truncation", f"{cfg.constraints.max_extra_truncation} (allowed: a fraction in [0, 1]; 1 switches the check off)")
    if not 0.0 <= cfg.optimization.holdout_fraction < 1.0:
        raise _bad("optimization.holdout_fraction", f"{cfg.optimization.holdout_fraction} (allowed: a fraction in [0, 1))")
    if not 0.0 <= cfg.optimization.model_exploration_share <= 0.5:
        raise _bad("optimization.model_exploration_share", f"{cfg.optimization.model_exploration_share} (allowed: a fraction in [0, 0.5])")
    if cfg.optimization.min_quality_signals < 0:
        raise _bad("optimization.min_quality_signals", f"{cfg.optimization.min_quality_signals} (allowed: >= 0)")


def _check_server_and_telemetry(cfg: Config) -> None:
    """Listening, the hosts and origins the forgery checks accept, proxies to believe, and span export."""
    if not 0 < cfg.server.port < 65536:
        raise _bad("server.port", f"{cfg.server.port} (allowed: 1-65535)")
    for host in cfg.server.allowed_hosts:
        if not valid_host_entry(host):
            raise _bad("server.allowed_hosts", f"{host!r} (allowed: host names or IP addresses without scheme or port)")
    for peer in cfg.server.forwarded_allow_ips:
        try:
            ipaddress.ip_network(peer.strip(), strict=False)  # not "*": that would believe every client
        except ValueError:
            raise _bad("server.forwarded_allow_ips", f"{peer!r} (allowed: IP addresses or networks of your reverse proxies)") from None
    for origin in cfg.admin.allowed_origins:
        if normalize_origin(origin) is None:
            raise _bad("admin.allowed_origins", f"{origin!r} (allowed: origins such as https://admin.example.com or http://127.0.0.1:3000)")
    tel = cfg.telemetry
    if not tel.otlp_endpoint.startswith(("http://", "https://")):
        raise _bad("telemetry.otlp_endpoint", f"{tel.otlp_endpoint!r} (allowed: an http:// or https:// URL; spans go to <url>/v1/traces)")
    for key, number in (("telemetry.queue_size", tel.queue_size), ("telemetry.batch_size", tel.batch_size),
                        ("telemetry.export_interval_s", tel.export_interval_s), ("telemetry.export_timeout_s", tel.export_timeout_s)):
        if number <= 0:
            raise _bad(key, f"{number} (allowed: a positive number)")
    if not tel.service_name:
        raise _bad("telemetry.service_name", "'' (allowed: a non-empty name)")


def _check_upstreams(cfg: Config) -> None:
    """Each `[[upstreams]]`: URL, timeouts, per-model settings and prices, forward paths, price provider."""
    names = [u.name for u in cfg.upstreams]
    if len(set(names)) != len(names):
        raise _bad("upstreams.name", "upstream names must be unique")
    for up in cfg.upstreams:
        if not up.base_url.startswith(("http://", "https://")):
            raise _bad(f"upstreams[{up.name}].base_url", f"{up.base_url!r} (allowed: an http:// or https:// URL)")
        if up.timeout_s <= 0 or up.connect_timeout_s <= 0:
            raise _bad(f"upstreams[{up.name}].timeout_s", "timeouts must be > 0")
        for ms in up.models_config:
            if ms.default_temperature is not None and not ms.min_temperature <= ms.default_temperature <= ms.max_temperature:
                raise _bad(f"upstreams[{up.name}].models_config[{ms.pattern}].default_temperature", f"{ms.default_temperature} (allowed: within min_temperature..max_temperature)")
            for field in ("input_price_per_mtok", "output_price_per_mtok", "cached_input_price_per_mtok"):
                price = getattr(ms, field)
                if price is not None and not (math.isfinite(price) and price >= 0):
                    raise _bad(f"upstreams[{up.name}].models_config[{ms.pattern}].{field}", f"{price} (allowed: US dollars per million tokens, >= 0)")
            for stand_in in ms.substitutes:
                if not stand_in or serving_upstream(cfg.upstreams, stand_in, up.format) is None:
                    raise _bad(f"upstreams[{up.name}].models_config[{ms.pattern}].substitutes",
                              f"{stand_in!r} (allowed: a model an upstream of format '{up.format}' serves: its `models` globs match it)")
            known = ANTHROPIC_EFFORTS if up.format == "anthropic" else EFFORT_LEVELS
            for level in ms.efforts:
                if level not in known:
                    raise _bad(f"upstreams[{up.name}].models_config[{ms.pattern}].efforts", f"{level!r} (allowed: {', '.join(known)})")
        for glob in up.forward_paths:
            if parse_forward_path(glob) is None:
                raise _bad(f"upstreams[{up.name}].forward_paths", f"{glob!r} (allowed: a glob over the path after /v1, starting with '/', "
                          f"optionally after one method: '/files*', 'GET /models/*'; methods: {', '.join(METHODS)})")
        if up.price_provider is not None:
            providers = table_providers()  # loads the price table: only when asked
            if up.price_provider not in providers:
                raise _bad(f"upstreams[{up.name}].price_provider", f"{up.price_provider!r} (allowed: {', '.join(providers)})")
        if up.max_response_bytes <= 0:
            raise _bad(f"upstreams[{up.name}].max_response_bytes", f"{up.max_response_bytes} (allowed: a positive number)")


def validate_workers(cfg: Config) -> None:
    """`server.workers` against the storage it needs (also run on `serve --workers`, which overrides it).

    Without Redis the budget, the posterior and the rollback switch live in each process:
    two workers would each spend the whole budget and a rollback would reach one of them.
    """
    workers = cfg.server.workers
    if workers == "auto":
        return
    if workers < 1:
        raise ConfigError(f"invalid value for 'server.workers': {workers} (allowed: \"auto\" or a whole number >= 1)", key="server.workers")
    if workers > 1 and not cfg.storage.redis_url:
        raise ConfigError(
            f"invalid value for 'server.workers': {workers} needs storage.redis_url (REDIS_URL): the budget, the posterior and "
            "the rollback switch must be shared between worker processes", key="server.workers")


def worker_count(cfg: Config, cores: int) -> tuple[int, str]:
    """How many worker processes `serve` runs on `cores` usable cores, and, when "auto" had to settle
    for one of several cores, the start-up line that says why and how to get the rest ("" otherwise)."""
    workers = cfg.server.workers
    if workers != "auto":
        return workers, ""
    if cfg.storage.redis_url or cores <= 1:
        return max(1, cores), ""
    return 1, (f"1 worker process: [server] workers = \"auto\" runs one per core ({cores} here) only with storage.redis_url "
               "(REDIS_URL) set, since without it the budget, the posterior and the rollback switch are per process; set REDIS_URL "
               "to use every core (docs/deployment.md), or workers = 1 to say one is meant")


def _warn_soft_problems(cfg: Config) -> None:
    """Log what is valid but probably not meant (start-up goes on)."""
    for up in cfg.upstreams:
        if urlsplit(up.base_url).path.strip("/") == "":
            log.warning(
                "upstreams[%s].base_url %r has no path: a client's /v1/chat/completions goes to %s/chat/completions; "
                "write it as the SDK does (e.g. https://api.openai.com/v1) unless this upstream serves at its root",
                up.name, up.base_url, up.base_url.rstrip("/"),
            )


def build_config(doc: dict[str, Any], environ: typing.Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML document (plus env overrides) into a `Config`.

    Conversion is strict (`port = "8080"` is refused, not coerced): a quoted number in
    TOML is usually a mistake elsewhere too, and env overrides are parsed to their types
    before this point.
    """
    applied: dict[str, str] = {}
    doc = apply_env_overrides(dict(doc), os.environ if environ is None else environ, applied)
    try:
        _check_unknown_keys(doc, Config, "")
        try:
            cfg = msgspec.convert(doc, Config, strict=True)
        except msgspec.ValidationError as exc:
            message = str(exc)
            path = message.rsplit(" - at `", 1)[-1].rstrip("`") if " - at `" in message else ""
            path = _name_dict_entry(doc, path, message)
            key = path.replace("$.", "") if path else "config"
            detail = _type_mismatch(doc, path, message.split(" - at ")[0]) or f"{message.split(' - at ')[0]}{_allowed_values(path)}"
            raise ConfigError(f"invalid value for '{key}': {detail}", key=key) from None
        _validate_ranges(cfg)
        validate_workers(cfg)
    except ConfigError as exc:
        source = applied.get(exc.key or "")
        if source is None:
            raise
        detail = str(exc).removeprefix(f"invalid value for '{exc.key}': ")
        raise ConfigError(f"invalid value for environment variable {source} (sets '{exc.key}'): {detail}", key=exc.key) from None
    _warn_soft_problems(cfg)
    return cfg


def load_config(path: str | Path | None, environ: typing.Mapping[str, str] | None = None) -> Config:
    """Read `path` (TOML) or start from defaults when None, then apply env overrides."""
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return build_config(doc, environ)


def mask_secrets(value: Any, key: str = "") -> Any:
    """Masked copy for `check-config`: URLs lose their password, secret-looking keys their value."""
    if isinstance(value, dict):
        return {k: mask_secrets(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v, key) for v in value]
    if isinstance(value, str) and value:
        lowered = key.lower()
        if any(word in lowered for word in ("password", "secret", "api_key")) and not lowered.endswith("_env"):
            return "***"
        if key.endswith("_url") and "@" in value and "://" in value:
            scheme, rest = value.split("://", 1)
            creds, host = rest.rsplit("@", 1)
            user = creds.split(":", 1)[0]
            return f"{scheme}://{user}:***@{host}" if ":" in creds else value
    return value


def serving_upstream(upstreams: typing.Sequence[UpstreamSettings], model: str, wire: str) -> UpstreamSettings | None:
    """The upstream of wire format `wire` a body for `model` goes to: the first whose `models` globs
    match, else one of that format with `*` (the edge's `UpstreamPool.route_format`, over settings)."""
    same = [u for u in upstreams if u.format == wire]
    found = next((u for u in same if any(p != "*" and fnmatch.fnmatchcase(model, p) for p in u.models)), None)
    return found if found is not None else next((u for u in same if "*" in u.models), None)


def find_model_settings(upstream: UpstreamSettings, model: str) -> ModelSettings | None:
    for ms in upstream.models_config:
        if fnmatch.fnmatchcase(model, ms.pattern):
            return ms
    return None
