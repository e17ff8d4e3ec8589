"""OpenTelemetry tracing: W3C traceparent helpers, and spans received by a real OTLP/HTTP receiver.

The receiver is an aiohttp server on loopback that decodes each POST to /v1/traces with
the official `opentelemetry-proto` classes, so our hand-encoded bytes are checked by an
independent decoder. Spans come from the hook the edge calls (`outgoing_traceparent`,
`record`) with realistic Decision/Outcome records.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client import CollectorRegistry, generate_latest

from policies.records import Decision, Outcome, Params, RequestContext
from proxy.config import TelemetrySettings, build_config
from proxy.observability import NullTracer, Timings, Tracer, make_tracer
from proxy.observability.tracing import child_span_id, format_traceparent, outgoing_traceparent, parse_traceparent
from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import start_thermostat

PROMPT = "Please refactor my secret-sauce sorting function"
KEY = "sk-live-do-not-leak"
PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Receiver:
    """OTLP/HTTP trace receiver: keeps the raw bodies and the decoded requests."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []
        self.status = 200
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(body)
        self.content_types.append(request.headers.get("content-type", ""))
        decoded = ExportTraceServiceRequest()
        decoded.ParseFromString(body)
        self.requests.append(decoded)
        return web.Response(status=self.status, body=b"", content_type="application/x-protobuf")

    def spans(self) -> list[Span]:
        return [s for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


def settings(endpoint: str, **overrides: Any) -> TelemetrySettings:
    return msgspec.structs.replace(TelemetrySettings(enabled=True, otlp_endpoint=endpoint, export_interval_s=0.05), **overrides)


def records(rid: str, *, mode: str = "optimized", feedback: bool = True, status: int = 200,
            error: str | None = None) -> tuple[Decision, Outcome, Timings]:
    ctx = RequestContext(task_type="code", model="gpt-4o-mini", endpoint="chat", prompt_tokens_est=900, message_count=2, has_tools=False,
                         json_mode=False, stream=True, client_temperature=0.7, client_max_tokens=800, upstream="openai")
    decision = Decision(request_id=rid, context=ctx, context_fingerprint=987654321, sent=Params(0.5, 700), baseline=Params(0.7, 800),
                        propensity=0.31, policy="thompson_gaussian", policy_version="v42", mode=mode, created_at=1_764_400_000.0,
                        policy_choice=Params(0.5, 700), policy_propensity=0.31, arm_index=7, guard_notes=("trust_region",))
    outcome = Outcome(request_id=rid, status=status, latency_s=1.2, ttft_s=0.25, prompt_tokens=912, completion_tokens=388,
                      finish_reason="stop" if status == 200 else None, error_class=error, quality=0.9 if status == 200 else 0.0,
                      reward=0.82, feedback=feedback)
    start = 1_764_400_000_000_000_000
    return decision, outcome, Timings(start, start + 1_200_000_000, overhead_s=0.0004)


def attrs(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        which = kv.value.WhichOneof("value")
        if which == "array_value":
            out[kv.key] = [getattr(v, v.WhichOneof("value")) for v in kv.value.array_value.values]
        else:
            out[kv.key] = getattr(kv.value, which)
    return out


# --- W3C traceparent ------------------------------------------------------------------


def test_parse_traceparent_follows_w3c() -> None:
    ctx = parse_traceparent(PARENT)
    assert ctx is not None and ctx.sampled
    assert ctx.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736" and ctx.span_id.hex() == "00f067aa0ba902b7" and ctx.flags == 1
    assert format_traceparent(ctx.trace_id, ctx.span_id, ctx.flags) == PARENT
    # A future version may append fields; version 00 may not.
    assert parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra") is not None
    for bad in (
        None, "", "garbage",
        PARENT + "-extra",                                             # version 00 with extra fields
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",     # version ff is invalid
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",     # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",     # all-zero parent id
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",     # upper case is not allowed
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",      # short trace id
    ):
        assert parse_traceparent(bad) is None, bad


def test_outgoing_traceparent_continues_the_trace_with_our_span() -> None:
    out = outgoing_traceparent(PARENT, "req-1")
    version, trace, span, flags = out.split("-")
    assert (version, trace, flags) == ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
    assert span == child_span_id("req-1").hex() != "00f067aa0ba902b7"
    # Not sampled upstream of us: flags kept, so the upstream does not sample either.
    assert outgoing_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", "req-1").endswith("-00")
    # No (or an invalid) incoming header: a new sampled trace, the same one for both sides of the hook.
    fresh = parse_traceparent(outgoing_traceparent(None, "req-2"))
    assert fresh is not None and fresh.sampled and fresh.span_id == child_span_id("req-2")
    assert outgoing_traceparent("nonsense", "req-2") == outgoing_traceparent(None, "req-2")
    assert outgoing_traceparent(None, "req-3") != outgoing_traceparent(None, "req-2")


def test_disabled_is_a_null_tracer() -> None:
    tracer = make_tracer(TelemetrySettings())
    assert isinstance(tracer, NullTracer) and not tracer.enabled
    assert tracer.outgoing_traceparent(PARENT, "req-1") is None  # the edge leaves the client's header as it came
    d, o, t = records("req-1")
    assert tracer.record(d, o, t, PARENT) is None


# --- spans at a real OTLP/HTTP receiver -------------------------------------------------------


async def test_spans_reach_the_receiver_with_genai_and_thermostat_attributes(receiver: Receiver) -> None:
    registry = CollectorRegistry()
    tracer = make_tracer(settings(receiver.url, service_name="thermostat-test"), version="9.9", registry=registry)
    assert isinstance(tracer, Tracer)
    await tracer.start()
    d1, o1, t1 = records("req-parented")
    sent_header = tracer.outgoing_traceparent(PARENT, d1.request_id)
    tracer.record(d1, o1, t1, PARENT, prompt=PROMPT + " " + KEY)  # capture_prompts is off: dropped
    d2, o2, t2 = records("req-new-trace", mode="holdout", feedback=False, status=502, error="upstream_unreachable")
    own_header = tracer.outgoing_traceparent(None, d2.request_id)
    tracer.record(d2, o2, t2, None)
    d3, o3, t3 = records("req-unsampled")
    tracer.record(d3, o3, t3, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
    for _ in range(500):  # the background exporter sends within export_interval_s; bounded wait
        if len(receiver.spans()) >= 2:
            break
        await asyncio.sleep(0.01)
    await tracer.stop()

    assert receiver.content_types and all(ct == "application/x-protobuf" for ct in receiver.content_types)
    spans = {attrs(s)["thermostat.request_id"]: s for s in receiver.spans()}
    assert set(spans) == {"req-parented", "req-new-trace"}  # the unsampled one is not exported
    resource = receiver.requests[0].resource_spans[0]
    assert {kv.key: kv.value.string_value for kv in resource.resource.attributes}["service.name"] == "thermostat-test"
    assert (resource.scope_spans[0].scope.name, resource.scope_spans[0].scope.version) == ("thermostat", "9.9")

    s1 = spans["req-parented"]
    incoming = parse_traceparent(PARENT)
    sent = parse_traceparent(sent_header)
    assert incoming is not None and sent is not None
    assert s1.trace_id == incoming.trace_id and s1.parent_span_id == incoming.span_id
    assert s1.span_id == sent.span_id and sent.trace_id == incoming.trace_id  # the upstream's parent is this span
    assert s1.name == "chat gpt-4o-mini" and s1.kind == Span.SPAN_KIND_SERVER
    assert (s1.start_time_unix_nano, s1.end_time_unix_nano) == (t1.start_unix_ns, t1.end_unix_ns)
    assert s1.flags == 0x301 and s1.status.code == Status.STATUS_CODE_UNSET
    assert attrs(s1) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.request.temperature": 0.5,
        "gen_ai.request.max_tokens": 700,
        "gen_ai.usage.input_tokens": 912,
        "gen_ai.usage.output_tokens": 388,
        "gen_ai.response.finish_reasons": ["stop"],
        "http.response.status_code": 200,
        "thermostat.request_id": "req-parented",
        "thermostat.upstream": "openai",
        "thermostat.task_type": "code",
        "thermostat.stream": True,
        "thermostat.mode": "optimized",
        "thermostat.policy": "thompson_gaussian",
        "thermostat.policy_version": "v42",
        "thermostat.arm": "temperature=0.5; max_tokens=700",
        "thermostat.arm_index": 7,
        "thermostat.baseline": "temperature=0.7; max_tokens=800",
        "thermostat.propensity": 0.31,
        "thermostat.guard_notes": ["trust_region"],
        "thermostat.quality": 0.9,
        "thermostat.quality_source": "feedback",
        "thermostat.reward": 0.82,
        "thermostat.ttft_s": 0.25,
        "thermostat.overhead_s": 0.0004,
    }

    s2 = spans["req-new-trace"]
    own = parse_traceparent(own_header)
    assert own is not None and s2.trace_id == own.trace_id and s2.span_id == own.span_id and s2.parent_span_id == b""
    assert s2.flags == 0x101  # sampled, parent known to be absent (not remote)
    assert s2.status.code == Status.STATUS_CODE_ERROR and s2.status.message == "upstream_unreachable"
    a2 = attrs(s2)
    assert a2["error.type"] == "upstream_unreachable" and a2["http.response.status_code"] == 502
    assert a2["thermostat.mode"] == "holdout" and a2["thermostat.quality"] == 0.0 and a2["thermostat.quality_source"] == "automatic"
    assert "gen_ai.response.finish_reasons" not in a2

    raw = b"".join(receiver.bodies)
    assert PROMPT.encode() not in raw and KEY.encode() not in raw and b"secret-sauce" not in raw
    assert tracer.counts == {"exported": 2, "dropped_queue_full": 0, "export_failed": 0, "not_sampled": 1}
    metrics = generate_latest(registry).decode()
    assert 'thermostat_trace_spans_total{outcome="exported"} 2.0' in metrics
    assert 'thermostat_trace_spans_total{outcome="not_sampled"} 1.0' in metrics


async def test_prompts_only_when_configured(receiver: Receiver) -> None:
    tracer = Tracer(settings(receiver.url, capture_prompts=True))
    await tracer.start()
    d, o, t = records("req-prompt")
    tracer.record(d, o, t, None, prompt=PROMPT)
    await tracer.stop()
    (span,) = receiver.spans()
    assert attrs(span)["gen_ai.input.messages"] == PROMPT


async def test_full_queue_drops_and_counts_without_waiting(receiver: Receiver) -> None:
    tracer = Tracer(settings(receiver.url, queue_size=3, batch_size=2, export_interval_s=60.0))
    await tracer.start()
    for i in range(10):  # no await in between: the exporter cannot run, the queue fills
        d, o, t = records(f"req-{i}")
        tracer.record(d, o, t, PARENT)
    assert tracer.counts["dropped_queue_full"] == 7
    await tracer.stop()
    assert sorted(attrs(s)["thermostat.request_id"] for s in receiver.spans()) == ["req-0", "req-1", "req-2"]
    assert [len(r.resource_spans[0].scope_spans[0].spans) for r in receiver.requests] == [2, 1]  # batches of batch_size
    assert tracer.counts["exported"] == 3


async def test_collector_failure_is_counted_not_raised(receiver: Receiver) -> None:
    receiver.status = 503
    tracer = Tracer(settings(receiver.url))
    await tracer.start()
    d, o, t = records("req-x")
    tracer.record(d, o, t, None)
    await tracer.stop()
    assert len(receiver.requests) == 1 and tracer.counts["export_failed"] == 1 and tracer.counts["exported"] == 0
    unreachable = Tracer(settings("http://127.0.0.1:9"))  # discard port: connection refused
    await unreachable.start()
    unreachable.record(d, o, t, None)
    await unreachable.stop()
    assert unreachable.counts["export_failed"] == 1


def test_telemetry_config_and_otel_environment() -> None:
    cfg = build_config({}, environ={})
    assert (cfg.telemetry.enabled, cfg.telemetry.otlp_endpoint, cfg.telemetry.service_name) == (False, "http://127.0.0.1:4318", "thermostat")
    cfg = build_config({"telemetry": {"enabled": True}}, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/", "OTEL_SERVICE_NAME": "edge"})
    assert (cfg.telemetry.otlp_endpoint, cfg.telemetry.service_name) == ("http://collector:4318/", "edge")
    assert Tracer(cfg.telemetry).url == "http://collector:4318/v1/traces"


# --- through the proxy --------------------------------------------------------------------------


async def test_a_proxied_request_sends_our_traceparent_upstream_and_exports_its_span(
    receiver: Receiver, upstream: FakeUpstream, tmp_path: Path
) -> None:
    cfg = make_config(upstream.url, tmp_path, optimization={"mode": "general", "seed": 1},
                      telemetry={"enabled": True, "otlp_endpoint": receiver.url, "export_interval_s": 0.05})
    running = await asyncio.to_thread(start_thermostat, cfg)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(f"{running.url}/chat/completions", headers={"traceparent": PARENT, "authorization": f"Bearer {KEY}"},
                                  json={"model": "echo-1", "messages": [{"role": "user", "content": PROMPT}]})
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        sent = parse_traceparent(upstream.last().headers.get("traceparent"))
        assert sent is not None and sent.trace_id.hex() == PARENT.split("-")[1]  # the client's trace continues upstream
        assert sent.span_id == child_span_id(rid)  # with our span as the parent
        for _ in range(500):  # bounded wait for the exporter
            if receiver.spans():
                break
            await asyncio.sleep(0.01)
        (span,) = receiver.spans()
        assert span.trace_id.hex() == PARENT.split("-")[1] and span.parent_span_id.hex() == PARENT.split("-")[2]
        assert span.span_id == child_span_id(rid)
        a = attrs(span)
        assert a["thermostat.request_id"] == rid and a["thermostat.mode"] == r.headers["x-thermostat-mode"]
        raw = b"".join(receiver.bodies)
        assert PROMPT.encode() not in raw and KEY.encode() not in raw  # no prompt, no secret
    finally:
        await asyncio.to_thread(running.stop)
