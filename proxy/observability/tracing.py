"""OpenTelemetry traces: one span per proxied request, exported as OTLP/HTTP protobuf.

Why hand-encoded spans instead of the OpenTelemetry SDK: a Thermostat span is fully
known only at the end of the request (decision, outcome, timings), so the SDK's live-span
machinery (contexts, processors, per-attribute validation) is pure overhead here, and so
are protobuf message objects for a fixed, flat message. `bench/tracing_cost.py`
(bench/results/tracing_cost.md) measured per span: about 4 µs on the request path and
28 µs of background encoding here, against 77 µs for `opentelemetry-proto` messages and
65 + 107 µs for the SDK and its OTLP encoder. No runtime dependency is needed; the tests
decode our bytes with the official `opentelemetry-proto` classes.

Hook (wired into the edge by the composition root; nothing here imports the edge):

    tracer = make_tracer(config.telemetry, registry=metrics_registry)  # NullTracer when disabled
    await tracer.start()                                  # lifespan start-up (starts the exporter task)
    ...
    # before forwarding, once the Decision (its request id) exists:
    value = tracer.outgoing_traceparent(request.headers.get("traceparent"), decision.request_id)
    if value is not None:
        upstream_headers["traceparent"] = value           # our span becomes the upstream's parent
    ...
    # at the end of the request (after the Outcome is known; also for errors), with the
    # header the client sent (not the one sent upstream); `prompt` (text, e.g. the messages
    # as JSON) is exported only under capture_prompts, so pass it only when that is on:
    tracer.record(decision, outcome, Timings(start_unix_ns, end_unix_ns, overhead_s),
                  request.headers.get("traceparent"), prompt=None)
    ...
    await tracer.stop()                                   # lifespan shutdown (final flush, bounded)

`record` is synchronous and O(1): it parses the incoming traceparent and appends to a
bounded deque (full -> dropped and counted, never waits). A background task takes
batches every `export_interval_s` (or as soon as `batch_size` spans wait), builds and
serialises the protobuf in a worker thread (a 512-span batch is several milliseconds of
CPU: off the event loop) and POSTs it to `<otlp_endpoint>/v1/traces`. A failed export is
dropped and counted (`thermostat_trace_spans_total{outcome="export_failed"}`), not retried:
traces are diagnostics, and a retry queue would compete with traffic for memory.

Both calls derive our span id (and, without an incoming traceparent, the trace id) from
the request id, so the header sent upstream and the span exported later agree without
any per-request state. An incoming `traceparent` that is not sampled (flags 00) is
propagated (new span id, same trace, flags kept) but no span is exported: the caller's
sampling decision wins. Spans carry no prompt or secret: only the request's shape, the
decision and its outcome; `prompt=` is exported only with `capture_prompts = true`.

Disabled (`[telemetry] enabled = false`, the default), `make_tracer` returns a
`NullTracer` whose methods return at once (0.17 µs for both calls) and no task runs.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import re
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import msgspec

from policies.records import Decision, Outcome

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("thermostat.tracing")

SCOPE_NAME = "thermostat"
# Prompts exported with capture_prompts are cut here: a span attribute is not a log store.
MAX_PROMPT_CHARS = 16_384
# Flags bits 8 and 9 of an OTLP span: the parent's remoteness is known, and it is remote.
_HAS_REMOTE_PARENT_KNOWN = 0x100
_REMOTE_PARENT = 0x200
_SAMPLED = 0x01
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_OPERATIONS = {"chat": "chat", "completions": "text_completion"}
_DOUBLE = struct.Struct("<d")
_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")


class TelemetrySettingsLike(Protocol):
    """What the tracer reads from `[telemetry]` (proxy.config.TelemetrySettings); read-only, as the frozen config is."""

    @property
    def enabled(self) -> bool: ...
    @property
    def otlp_endpoint(self) -> str: ...
    @property
    def service_name(self) -> str: ...
    @property
    def capture_prompts(self) -> bool: ...
    @property
    def queue_size(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def export_interval_s(self) -> float: ...
    @property
    def export_timeout_s(self) -> float: ...


class TraceContext(msgspec.Struct, frozen=True):
    """A parsed W3C `traceparent`: trace id, the sender's span id, trace flags."""

    trace_id: bytes
    span_id: bytes
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & _SAMPLED)


class Timings(msgspec.Struct, frozen=True):
    """Wall-clock bounds of the request as the edge saw it (`time.time_ns()`), and Thermostat's own share."""

    start_unix_ns: int
    end_unix_ns: int
    overhead_s: float | None = None


def parse_traceparent(value: str | None) -> TraceContext | None:
    """W3C Trace Context level 1; anything invalid is ignored (a new trace starts), as the spec says."""
    if not value:
        return None
    m = _TRACEPARENT.match(value.strip())
    if m is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_hex == "0" * 32 or span_hex == "0" * 16:
        return None
    return TraceContext(bytes.fromhex(trace_hex), bytes.fromhex(span_hex), int(flags_hex, 16))


def format_traceparent(trace_id: bytes, span_id: bytes, flags: int) -> str:
    return f"00-{trace_id.hex()}-{span_id.hex()}-{flags & 0xFF:02x}"


def _ids_for(request_id: str) -> tuple[bytes, bytes]:
    """(span id, fallback trace id) for a request: both sides of the hook derive the same ones."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=24).digest()
    span_id, trace_id = digest[:8], digest[8:]
    if span_id == b"\0" * 8:  # all-zero ids are invalid in W3C and OTLP
        span_id = b"\0" * 7 + b"\1"
    if trace_id == b"\0" * 16:
        trace_id = b"\0" * 15 + b"\1"
    return span_id, trace_id


def child_span_id(request_id: str) -> bytes:
    """Thermostat's span id for this request (8 bytes, never all zero)."""
    return _ids_for(request_id)[0]


def outgoing_traceparent(incoming: str | None, request_id: str) -> str:
    """The `traceparent` to send upstream: the incoming trace (or a new one) with our span as parent."""
    span_id, new_trace = _ids_for(request_id)
    parent = parse_traceparent(incoming)
    if parent is None:
        return format_traceparent(new_trace, span_id, _SAMPLED)
    return format_traceparent(parent.trace_id, span_id, parent.flags)


class _Pending(msgspec.Struct, frozen=True):
    decision: Decision
    outcome: Outcome
    timings: Timings
    parent: TraceContext | None
    prompt: str | None


def _quality_source(outcome: Outcome) -> str | None:
    if outcome.quality is None:
        return None
    return "feedback" if outcome.feedback else "automatic"


def span_attributes(decision: Decision, outcome: Outcome, timings: Timings, prompt: str | None = None) -> list[tuple[str, Any]]:
    """(name, value) pairs of one request's span; None values are left out by the encoder.

    GenAI semantic conventions where they exist (values as sent upstream, not as the
    client asked), `thermostat.*` for the decision. Nothing here is taken from message
    content: prompts appear only through `prompt`, which the tracer passes only when
    `capture_prompts` is on.
    """
    ctx = decision.context
    sent = decision.sent
    finish = [outcome.finish_reason] if outcome.finish_reason else None
    return [
        ("gen_ai.operation.name", _OPERATIONS.get(ctx.endpoint, ctx.endpoint)),
        ("gen_ai.request.model", ctx.model),
        ("gen_ai.request.temperature", sent.temperature),
        ("gen_ai.request.max_tokens", sent.max_tokens),
        ("gen_ai.usage.input_tokens", outcome.prompt_tokens),
        ("gen_ai.usage.output_tokens", outcome.completion_tokens),
        ("gen_ai.response.finish_reasons", finish),
        ("http.response.status_code", outcome.status),
        ("error.type", outcome.error_class),
        ("thermostat.request_id", decision.request_id),
        ("thermostat.upstream", ctx.upstream or None),
        ("thermostat.task_type", ctx.task_type),
        ("thermostat.stream", ctx.stream),
        ("thermostat.mode", decision.mode),
        ("thermostat.policy", decision.policy),
        ("thermostat.policy_version", decision.policy_version),
        ("thermostat.arm", sent.render() or None),
        ("thermostat.arm_index", decision.arm_index),
        ("thermostat.baseline", decision.baseline.render() or None),
        ("thermostat.propensity", decision.propensity),
        ("thermostat.guard_notes", list(decision.guard_notes) or None),
        ("thermostat.quality", outcome.quality),
        ("thermostat.quality_source", _quality_source(outcome)),
        ("thermostat.reward", outcome.reward),
        ("thermostat.ttft_s", outcome.ttft_s),
        ("thermostat.overhead_s", timings.overhead_s),
        ("gen_ai.input.messages", prompt),
    ]


# --- OTLP protobuf, encoded by hand --------------------------------------------------------
# Field numbers from opentelemetry-proto (collector/trace/v1, trace/v1, common/v1,
# resource/v1); tests decode our bytes with the official generated classes.

_SMALL = [bytes((i,)) for i in range(128)]
_U64 = (1 << 64) - 1


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    """AnyValue: string 1, bool 2, int 3, double 4, array 5."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & _U64)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    if isinstance(value, list | tuple):
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", _any_value(v)) for v in value))
    return _ld(b"\x0a", str(value).encode())


_KEYS: dict[str, bytes] = {}


def _attributes(tag: bytes, pairs: Iterable[tuple[str, Any]]) -> bytes:
    """Repeated KeyValue (key 1, value 2) under `tag`; None values are left out."""
    parts = []
    for key, value in pairs:
        if value is None:
            continue
        encoded_key = _KEYS.get(key)
        if encoded_key is None:
            encoded_key = _KEYS[key] = _ld(b"\x0a", key.encode())
        parts.append(_ld(tag, encoded_key + _ld(b"\x12", _any_value(value))))
    return b"".join(parts)


class OtlpEncoder:
    """`ExportTraceServiceRequest` bytes from pending records (runs in a worker thread).

    Encoded by hand: building the same request from `opentelemetry-proto` message objects
    costs several times more CPU per span (bench/results/tracing_cost.md).
    """

    def __init__(self, service_name: str, version: str) -> None:
        resource = _attributes(b"\x0a", [("service.name", service_name), ("telemetry.sdk.language", "python")])
        scope = _ld(b"\x0a", SCOPE_NAME.encode()) + _ld(b"\x12", version.encode())
        self._resource_field = _ld(b"\x0a", resource)  # ResourceSpans.resource = 1
        self._scope_field = _ld(b"\x0a", scope)  # ScopeSpans.scope = 1

    def span(self, p: _Pending) -> bytes:
        """One Span message (trace/v1 Span field numbers in the comments)."""
        span_id, new_trace = _ids_for(p.decision.request_id)
        flags = _SAMPLED | _HAS_REMOTE_PARENT_KNOWN
        if p.parent is not None:
            flags |= _REMOTE_PARENT
        outcome = p.outcome
        operation = _OPERATIONS.get(p.decision.context.endpoint, p.decision.context.endpoint)
        parts = [
            b"\x0a\x10" + (p.parent.trace_id if p.parent else new_trace),  # trace_id = 1
            b"\x12\x08" + span_id,  # span_id = 2
            b"\x22\x08" + p.parent.span_id if p.parent else b"",  # parent_span_id = 4
            _ld(b"\x2a", f"{operation} {p.decision.context.model}".encode()),  # name = 5
            b"\x30\x02",  # kind = 6: SPAN_KIND_SERVER
            b"\x39" + _FIXED64.pack(p.timings.start_unix_ns),  # start_time_unix_nano = 7
            b"\x41" + _FIXED64.pack(max(p.timings.end_unix_ns, p.timings.start_unix_ns)),  # end_time_unix_nano = 8
            _attributes(b"\x4a", span_attributes(p.decision, outcome, p.timings, p.prompt)),  # attributes = 9
        ]
        if outcome.status == 0 or outcome.status >= 500 or outcome.error_class is not None:
            message = outcome.error_class or f"status {outcome.status}"
            parts.append(_ld(b"\x7a", _ld(b"\x12", message.encode()) + b"\x18\x02"))  # status = 15: message 2, code 3 = ERROR
        parts.append(b"\x85\x01" + _FIXED32.pack(flags))  # flags = 16 (fixed32)
        return b"".join(parts)

    def encode(self, batch: list[_Pending]) -> bytes:
        spans = b"".join(_ld(b"\x12", self.span(p)) for p in batch)  # ScopeSpans.spans = 2
        resource_spans = self._resource_field + _ld(b"\x12", self._scope_field + spans)  # ResourceSpans.scope_spans = 2
        return _ld(b"\x0a", resource_spans)  # ExportTraceServiceRequest.resource_spans = 1


def traces_url(endpoint: str) -> str:
    """`<endpoint>/v1/traces`, the OTLP/HTTP convention for a base endpoint (and OTEL_EXPORTER_OTLP_ENDPOINT)."""
    return endpoint.rstrip("/") + "/v1/traces"


class NullTracer:
    """Tracing off: every call returns at once; the incoming traceparent goes upstream untouched."""

    enabled = False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def outgoing_traceparent(self, incoming: str | None, request_id: str) -> str | None:
        return None

    def record(self, decision: Decision, outcome: Outcome, timings: Timings, traceparent: str | None, *, prompt: str | None = None) -> None:
        return None


class Tracer:
    """Bounded queue + background OTLP/HTTP exporter; see the module docstring for the hook."""

    enabled = True

    def __init__(self, settings: TelemetrySettingsLike, *, version: str = "0", transport: httpx.AsyncBaseTransport | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.url = traces_url(settings.otlp_endpoint)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._encoder = OtlpEncoder(settings.service_name, version)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        # Counts since start; exported as thermostat_trace_spans_total{outcome} when a registry is given.
        self.counts: dict[str, int] = {"exported": 0, "dropped_queue_full": 0, "export_failed": 0, "not_sampled": 0}
        if registry is not None:
            registry.register(_TraceCollector(self.counts))

    # --- request path -------------------------------------------------------------------

    def outgoing_traceparent(self, incoming: str | None, request_id: str) -> str | None:
        return outgoing_traceparent(incoming, request_id)

    def record(self, decision: Decision, outcome: Outcome, timings: Timings, traceparent: str | None, *, prompt: str | None = None) -> None:
        """Queue one span (O(1), never waits); `traceparent` is the header the client sent, if any."""
        parent = parse_traceparent(traceparent)
        if parent is not None and not parent.sampled:
            self.counts["not_sampled"] += 1
            return
        if len(self._queue) >= self.settings.queue_size:
            self.counts["dropped_queue_full"] += 1
            return
        captured = prompt[:MAX_PROMPT_CHARS] if prompt is not None and self.settings.capture_prompts else None
        self._queue.append(_Pending(decision, outcome, timings, parent, captured))
        if self._wake is not None and len(self._queue) >= self.settings.batch_size:
            self._wake.set()

    # --- background ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._client = httpx.AsyncClient(transport=self._transport, timeout=self.settings.export_timeout_s)
        self._wake = asyncio.Event()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="thermostat-trace-export")

    async def stop(self) -> None:
        """Final flush, bounded by export_timeout_s; spans still queued after it are dropped."""
        if self._task is None:
            return
        self._stopping = True
        assert self._wake is not None
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self.settings.export_timeout_s + 1.0)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
        self._task = None
        self.counts["dropped_queue_full"] += len(self._queue)
        self._queue.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def flush(self) -> None:
        """Export everything queued now (tests, shutdown)."""
        while self._queue:
            await self._export_batch()

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.export_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()
        await self.flush()

    async def _export_batch(self) -> None:
        size = min(len(self._queue), self.settings.batch_size)
        batch = [self._queue.popleft() for _ in range(size)]
        if not batch:
            return
        assert self._client is not None
        try:
            body = await asyncio.to_thread(self._encoder.encode, batch)
            response = await self._client.post(self.url, content=body, headers={"content-type": "application/x-protobuf"})
            if response.status_code // 100 != 2:
                raise httpx.HTTPStatusError(f"collector answered {response.status_code}", request=response.request, response=response)
        except Exception as exc:  # a collector problem must never reach traffic
            self.counts["export_failed"] += len(batch)
            log.warning("trace export of %d spans to %s failed: %s", len(batch), self.url, exc.__class__.__name__)
            return
        self.counts["exported"] += len(batch)


class _TraceCollector:
    """Prometheus view of a tracer's counts (read at scrape time, nothing on the request path)."""

    def __init__(self, counts: dict[str, int]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("thermostat_trace_spans", "Spans by what became of them (exported, dropped, failed, not sampled)", labels=["outcome"])
        for outcome, count in self._counts.items():
            family.add_metric([outcome], count)
        yield family


def make_tracer(settings: TelemetrySettingsLike, *, version: str = "0", registry: CollectorRegistry | None = None) -> Tracer | NullTracer:
    """The tracer the settings ask for; `NullTracer` (no import, no task) when disabled."""
    if not settings.enabled:
        return NullTracer()
    return Tracer(settings, version=version, registry=registry)
