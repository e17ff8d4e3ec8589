"""The HTTP edge for `/v1/*`: a plain ASGI handler, because it is the hot path.

Litestar serves everything else (health, metrics, the control API); `/v1/*` is
handled here directly so a request costs one body parse, two field patches, one
re-encode and a relay, with no framework layers in between. The body is parsed
once with msgspec into a dict (so unknown fields survive untouched); if the decision
changes nothing, the client's original bytes are forwarded as they came, which is
safe only because bodies whose bytes could mean something other than the parsed dict
(repeated top-level fields) are refused (proxy/edge/json_guard.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from multidict import CIMultiDict

from guards.budget import Reservation
from policies.context import estimate_prompt_tokens
from policies.records import Decision, Outcome, RequestContext
from proxy.common import COUNTED_POSTS, ProxyError, ResponseSummary, bad_request, confine_v1_path, host_name, spends_tokens
from proxy.config import Config
from proxy.decision import (
    BudgetExceeded,
    BudgetUnavailable,
    Decider,
    DecisionRegistry,
    Pricer,
    Scorer,
    Timings,
    complete,
)
from proxy.edge.formats import FORMATS, KnobView, WireFormat, adapter_for, own_error, wire_of
from proxy.edge.json_guard import INT64_MAX, MAX_JSON_DEPTH, duplicate_watched_key, first_out_of_range_int, too_deep
from proxy.edge.listeners import Finished, Listener
from proxy.edge.models import ModelCatalog
from proxy.edge.read_watch import ReadWatch
from proxy.edge.sse import StreamRelay
from proxy.edge.upstream import UPSTREAM_ERRORS, Upstream, UpstreamPool, UpstreamResponse, classify, forward_headers, response_headers
from proxy.observability import Metrics, NullTracer, Tracer
from proxy.store import Recorder, storable

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("thermostat.edge")

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

DECIDED_PATHS = frozenset(FORMATS)
# The max-tokens fields a format's adapter validates, checked against the model's limit.
_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_JSON_HEADERS = [(b"content-type", b"application/json")]


def new_request_id() -> str:
    """A UUIDv7: time-ordered, so the decision log's unique index on request_id grows at
    its end instead of at random pages (random v4 ids slowed SQLite inserts several-fold
    once the table outgrew the page cache; PostgreSQL's B-tree benefits the same way)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 62 & 0xFFF) << 64 | 0b10 << 62 | (rand & (1 << 62) - 1)
    # `str(uuid.UUID(int=value))`, formatted directly (the value is 128 bits by construction).
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class ClientGone(Exception):
    """The client closed the connection while we were relaying."""


async def read_body(receive: Receive, headers: list[tuple[bytes, bytes]], max_bytes: int) -> bytes:
    for name, value in headers:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise bad_request("invalid Content-Length header", "invalid_content_length") from None
            if declared > max_bytes:
                raise ProxyError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes} bytes", "request_too_large")
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > max_bytes:
                raise ProxyError(413, f"request body exceeds the limit of {max_bytes} bytes", "request_too_large")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_capped(response: UpstreamResponse, cap: int) -> tuple[list[bytes], bool]:
    """Buffer an upstream body up to `cap` bytes; (chunks, True) if it all fit, else the
    chunks read so far and False, with the rest still unread on the connection."""
    if response.content_length is not None and response.content_length > cap:
        return [], False
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            return chunks, False
    return chunks, True


def parse_completion_body(body: bytes) -> dict[str, Any]:
    """Decode a decided body, refusing what msgspec accepts but Thermostat cannot forward faithfully."""
    try:
        doc = _decode(body)
    except msgspec.DecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", "invalid_json") from None
    except RecursionError:  # msgspec's own limit, near 1,000 levels
        doc = None
    if doc is None or too_deep(body, doc):
        raise bad_request(f"request body nests deeper than {MAX_JSON_DEPTH} levels", "json_too_deep")
    if not isinstance(doc, dict):
        raise bad_request("request body must be a JSON object", "invalid_body")
    key = first_out_of_range_int(doc)
    if key is not None:
        raise bad_request(f"'{key}' must fit a signed 64-bit integer", "invalid_value", key)
    key = duplicate_watched_key(body, doc)
    if key is not None:
        raise bad_request(f"'{key}' appears more than once in the request body", "duplicate_key", key)
    return doc


def _budget_exceeded() -> ProxyError:
    return ProxyError(429, "the token budget for this window is exhausted (caws.on_exhausted = reject)", "budget_exceeded", "rate_limit_error")


def _budget_unavailable(unpriced: bool = False) -> ProxyError:
    if unpriced:
        return ProxyError(503, "this model has no known price, so the dollar budget (caws.unit = usd, on_exhausted = reject) cannot count it; "
                               "the operator sets input_price_per_mtok and output_price_per_mtok in its [[upstreams.models_config]]",
                          "budget_unavailable", "server_error")
    return ProxyError(503, "the token budget could not be checked in time (caws.on_exhausted = reject); retry shortly",
                      "budget_unavailable", "server_error")


# The bytes of a passed-through answer kept to read its usage, which OpenAI puts last.
_USAGE_TAIL = 512
_TOTAL_TOKENS = re.compile(rb'"total_tokens"\s*:\s*(\d{1,18})')


def usage_in_tail(tail: bytes) -> int | None:
    """`usage.total_tokens` from the end of an embeddings answer; None when it is not there."""
    found = _TOTAL_TOKENS.findall(tail)
    return int(found[-1]) if found else None


def check_token_limit(value: int, field: str, limit: int | None) -> None:
    """The client's own cap must fit the model's limit (or int64 when the model has none)."""
    bound = INT64_MAX if limit is None else limit
    if value > bound:
        raise bad_request(f"'{field}' must be at most {bound}, got {value}", "invalid_value", field)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


class ContextBuilder(Protocol):
    """`policies.context.build_context` with task types and models folded past their caps."""

    def __call__(self, body: dict[str, Any], *, task_type: str, endpoint: str, upstream: str = "", effort: str | None = None) -> RequestContext: ...


class AnswerCheck(Protocol):
    async def validated(self, decision: Decision, outcome: Outcome, summary: ResponseSummary, body: Any) -> Outcome:
        """The automatic quality once the answer is checked against the request's schemas."""
        ...


@dataclass(frozen=True, slots=True)
class EdgeServices:
    """Everything the `/v1/*` edge touches, built once by the composition root (`proxy.runtime`)."""

    config: Config
    metrics: Metrics
    tracer: Tracer | NullTracer
    pool: UpstreamPool
    build_context: ContextBuilder
    decider: Decider
    scorer: Scorer  # the reward, computed once in `complete`
    registry: DecisionRegistry
    recorder: Recorder
    read_watch: ReadWatch  # upstream silence timeouts for relayed streams (proxy/edge/read_watch.py)
    answer_check: AnswerCheck  # proxy.learning.AnswerValidator: may lower the automatic quality before any listener reads it
    listeners: tuple[Listener, ...]  # called in this order once the outcome is built (proxy.runtime.outcome_listeners)
    prices: Pricer | None = None  # each request's cost in dollars (proxy.decision.PriceBook)


class Admitted(msgspec.Struct, frozen=True):
    """A decided request once read, validated and routed (`_admit`); nothing decided yet."""

    doc: dict[str, Any]  # the parsed body; `_decide` patches the knobs into it
    view: KnobView
    upstream: Upstream
    ctx: RequestContext
    key: str  # the assignment key: x-thermostat-key, else `user`, else the request id


class Outgoing(msgspec.Struct, frozen=True):
    """What `_prepare` made ready to send."""

    body: bytes
    strip_usage: bool  # Thermostat asked for the usage chunk, so it is removed again from the relayed stream
    our_headers: list[tuple[bytes, bytes]]
    url: str
    headers: CIMultiDict[str]
    traceparent: str | None
    prompt: str | None


class Exchange(msgspec.Struct):
    """What happened on the wire, filled in by `_exchange` as it goes (also when it is cut short) and read by `_finish`."""

    overhead: float
    summary: ResponseSummary = msgspec.field(default_factory=ResponseSummary)
    status: int = 0
    error_class: str | None = None
    ttft: float | None = None


class ProxyEdge:
    """ASGI app: `/v1/*` handled here, everything else handed to `fallback` (Litestar)."""

    def __init__(self, services: EdgeServices, fallback: Callable[..., Awaitable[None]]) -> None:
        self.services = services
        self.fallback = fallback
        self.max_body = services.config.server.max_body_bytes
        self.metrics = services.metrics
        self.quality_settings = services.config.policy.quality
        # `[server] allowed_hosts`: a page on another name that resolves here (DNS rebinding) gets 400.
        self.allowed_hosts = frozenset(name for name in map(host_name, services.config.server.allowed_hosts) if name)
        # Without a `*` upstream, `GET /v1/models` is merged from every OpenAI-format upstream.
        self.catalog = ModelCatalog(services.pool)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allowed_hosts and scope["type"] in ("http", "websocket") and host_name(_header(scope["headers"], b"host")) not in self.allowed_hosts:
            if scope["type"] == "http":
                self.metrics.client_errors.labels("invalid_host").inc()
                refusal = bad_request("the Host header names no host in [server] allowed_hosts", "invalid_host")
                await self._send_error(send, 400, own_error(scope["path"], refusal), new_request_id())
            return
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            await self._handle(scope, receive, send)
            return
        await self.fallback(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        request_id = new_request_id()
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        fmt: WireFormat | None = None
        try:
            v1_path = confine_v1_path(scope.get("raw_path"), scope["path"])
            fmt = adapter_for(v1_path)
            body = await read_body(receive, headers, self.max_body)
            if fmt is not None and scope["method"] == "POST":
                await self._completion(scope, receive, send, body, request_id, t0, v1_path, fmt)
            elif fmt is not None and scope["method"] != "OPTIONS":
                raise ProxyError(405, f"method {scope['method']} is not allowed on /v1{v1_path} (allowed: POST; "
                                 "other methods are not forwarded on the paths Thermostat tunes)", "method_not_allowed")
            elif v1_path == "/models" and scope["method"] == "GET" and self.catalog.needed():
                merged = await self.catalog.body(headers)
                hdrs = [*_JSON_HEADERS, (b"content-length", str(len(merged)).encode()), (b"x-request-id", request_id.encode())]
                await send({"type": "http.response.start", "status": 200, "headers": hdrs})
                await send({"type": "http.response.body", "body": merged, "more_body": False})
            else:
                await self._passthrough(scope, send, body, request_id, t0, v1_path)
        except ProxyError as exc:
            self.metrics.client_errors.labels(exc.code).inc()
            await self._send_error(send, exc.status, own_error(scope["path"], exc, fmt), request_id, [(b"allow", b"POST")] if exc.status == 405 else None)
        except ClientGone:
            return

    def _task_type(self, headers: list[tuple[bytes, bytes]]) -> str:
        """The `x-task-type` header ("default" when absent or blank), bounded in length."""
        task_type = (_header(headers, b"x-task-type") or "default").strip() or "default"
        limit = self.services.config.server.max_task_type_bytes
        if len(task_type) > limit:  # latin-1 decoded: one character per byte
            raise bad_request(f"the x-task-type header must be at most {limit} bytes", "invalid_task_type")
        if not storable(task_type):
            raise bad_request("the x-task-type header must not contain NUL", "invalid_task_type")
        return task_type

    async def _send_error(self, send: Send, status: int, body: bytes, request_id: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        hdrs = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()), (b"x-request-id", request_id.encode())]
        if extra:
            hdrs.extend(extra)
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # ---- decided path -------------------------------------------------------------
    # One request, in named steps (after httpx's `send`): admit → decide → prepare → exchange
    # (which ends at the upstream's one-method `Transport`) → finish (outcome, then the listeners).

    async def _completion(
        self, scope: Scope, receive: Receive, send: Send, body: bytes, request_id: str, t0: float, v1_path: str, fmt: WireFormat
    ) -> None:
        req = self._admit(scope["headers"], body, request_id, v1_path, fmt)
        decision, patched = await self._decide(req, request_id, fmt)
        if decision.sent.model is not None:
            req = self._served_by(req, decision.sent.model, v1_path, fmt)
        out = self._prepare(scope, body, req, decision, patched, request_id, v1_path, fmt)
        ex = Exchange(overhead=time.perf_counter() - t0)
        try:
            await self._exchange(receive, send, req, out, ex, t0, request_id, fmt)
        finally:
            await self._finish(decision, ex, t0, req, out, body=req.doc, key=req.key if req.key != request_id else "")

    def _admit(self, headers: list[tuple[bytes, bytes]], body: bytes, request_id: str, v1_path: str, fmt: WireFormat) -> Admitted:
        """Parse and validate the body, route it to its upstream, build the context: nothing is decided yet."""
        svc = self.services
        doc = parse_completion_body(body)
        view = fmt.parse(doc)
        model = view.model
        srv = svc.config.server
        if (len(model) if model.isascii() else len(model.encode("utf-8", "surrogatepass"))) > srv.max_model_bytes:
            raise bad_request(f"'model' must be at most {srv.max_model_bytes} bytes", "invalid_model", "model")
        if not storable(model):
            raise bad_request("'model' must not contain NUL or an unpaired surrogate", "invalid_model", "model")
        upstream = svc.pool.route_format(model, fmt.upstream_format)
        if upstream is None:
            raise ProxyError(404, f"no upstream of format '{fmt.upstream_format}' is configured for model '{model}'", "model_not_found")
        if not upstream.paths.allows("POST", v1_path):
            raise upstream.paths.refusal("POST", v1_path)
        if view.tokens_field is not None:
            limits = upstream.model_settings(model)
            for name in _TOKEN_FIELDS:
                value = doc.get(name)
                if isinstance(value, int) and not isinstance(value, bool):
                    check_token_limit(value, name, limits.max_tokens_limit if limits is not None else None)
        task_type = self._task_type(headers)
        ctx = svc.build_context(doc, task_type=task_type, endpoint=fmt.name, upstream=upstream.name, effort=view.effort)
        user = doc.get("user")
        key = _header(headers, b"x-thermostat-key") or (user if isinstance(user, str) and user else request_id)
        return Admitted(doc, view, upstream, ctx, key)

    def _served_by(self, req: Admitted, model: str, v1_path: str, fmt: WireFormat) -> Admitted:
        """A stand-in goes to the upstream that serves it (validated at start-up: one of the same wire format);
        the answer's own `model` field then says who served it."""
        upstream = self.services.pool.route_format(model, fmt.upstream_format) or req.upstream
        if not upstream.paths.allows("POST", v1_path):
            raise upstream.paths.refusal("POST", v1_path)
        return msgspec.structs.replace(req, upstream=upstream)

    async def _decide(self, req: Admitted, request_id: str, fmt: WireFormat) -> tuple[Decision, bool]:
        """The decider's choice, patched into the body (True if that changed it) and journaled before anything is forwarded."""
        svc = self.services
        try:
            decision: Decision = await svc.decider.decide(req.ctx, request_id=request_id, assignment_key=req.key)
        except BudgetExceeded:
            raise _budget_exceeded() from None
        except BudgetUnavailable as exc:
            raise _budget_unavailable(exc.unpriced) from None
        doc = req.doc
        patched = fmt.patch(doc, decision.sent)
        if decision.sent.model is not None:  # a declared stand-in (the model as a knob): the body names it
            doc["model"] = decision.sent.model
            patched = True
        if req.view.thinking_budget is not None and decision.sent.max_tokens is not None and doc.get("max_tokens") != decision.sent.max_tokens:
            # The Messages API refuses max_tokens at or below thinking.budget_tokens and the adapter raised it:
            # the log says what was sent, and a guard's swap (propensity 1) stays out of IPS/DR.
            decision.sent = msgspec.structs.replace(decision.sent, max_tokens=doc["max_tokens"])
            if decision.mode == "optimized":
                decision.mode, decision.propensity = "guard_fallback", 1.0
            decision.guard_notes = (*decision.guard_notes, "thinking_budget_floor")
        svc.registry.register(decision)
        svc.recorder.note_decision(decision)  # journaled before forwarding: a crash cannot lose an answered request
        return decision, patched

    def _prepare(
        self, scope: Scope, body: bytes, req: Admitted, decision: Decision, patched: bool, request_id: str, v1_path: str, fmt: WireFormat
    ) -> Outgoing:
        """The bytes, URL and headers to send: the client's own bytes when the decision changed nothing."""
        svc = self.services
        doc, changed = req.doc, patched
        strip_usage = False
        if req.view.stream and fmt.stream_summarizer() is None:  # chat and completions: ask for the usage chunk
            opts = doc.get("stream_options")
            # An invalid `stream_options` is left for the upstream to reject as it would have.
            if (opts is None or isinstance(opts, dict)) and not (opts and opts.get("include_usage") is True):
                doc["stream_options"] = {**(opts or {}), "include_usage": True}
                strip_usage = changed = True
        out_body = _encode(doc) if changed else body
        prompt = body.decode("utf-8", "replace") if svc.config.server.store_prompts else None
        our_headers = [
            (b"x-request-id", request_id.encode()),
            (b"x-thermostat-params", decision.sent.render().encode()),
            (b"x-thermostat-mode", decision.mode.encode()),
        ]
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        url = req.upstream.url_for(v1_path, scope.get("query_string", b""))
        fwd_headers = forward_headers(headers, req.upstream)
        traceparent = _header(headers, b"traceparent") if svc.tracer.enabled else None
        if svc.tracer.enabled:  # our span becomes the upstream's parent
            outgoing = svc.tracer.outgoing_traceparent(traceparent, request_id)
            if outgoing is not None:
                fwd_headers["traceparent"] = outgoing
        return Outgoing(out_body, strip_usage, our_headers, url, fwd_headers, traceparent, prompt)

    async def _exchange(
        self, receive: Receive, send: Send, req: Admitted, out: Outgoing, ex: Exchange, t0: float, request_id: str, fmt: WireFormat
    ) -> None:
        """Send through the upstream's transport and relay what comes back; `ex` keeps what happened, for `_finish`."""
        upstream = req.upstream
        try:
            response = await upstream.send("POST", out.url, out.headers, out.body)
        except UPSTREAM_ERRORS as exc:
            self.services.recorder.commit()
            ex.error_class = classify(exc)
            ex.status = 504 if ex.error_class == "timeout" else 502
            self.metrics.upstream_errors.labels(upstream.name, ex.error_class).inc()
            msg = f"upstream '{upstream.name}' {'timed out' if ex.status == 504 else 'is unreachable'}: {type(exc).__name__}"
            code = "upstream_timeout" if ex.status == 504 else "upstream_unreachable"
            await self._send_error(send, ex.status, fmt.error_body(ex.status, msg, code), request_id, out.our_headers[1:])
            return
        # The decision's journal frame is group-committed: written by now (the reply needed an I/O callback, which runs
        # after the commit), so this only covers a transport that answered without one. Free when nothing is buffered.
        self.services.recorder.commit()
        ex.status = response.status
        t_headers = time.perf_counter()
        if req.view.stream and ex.status == 200:
            ex.ttft, ex.error_class, ex.overhead = await self._relay_stream(
                receive, send, response, out.our_headers, out.strip_usage, ex.summary, t0, t_headers, ex.overhead, upstream, fmt
            )
        else:
            await self._relay_buffered(send, response, out, ex, request_id, upstream, fmt)

    async def _relay_buffered(
        self, send: Send, response: UpstreamResponse, out: Outgoing, ex: Exchange, request_id: str, upstream: Upstream, fmt: WireFormat
    ) -> None:
        """A whole (non-streamed, or failed) answer: read up to the cap, then sent in one piece; above the cap, relayed unread."""
        cap = upstream.settings.max_response_bytes
        try:
            chunks, complete = await read_capped(response, cap)
        except UPSTREAM_ERRORS as exc:
            response.release()
            ex.error_class = classify(exc)
            ex.status = 504 if ex.error_class == "timeout" else 502
            self.metrics.upstream_errors.labels(upstream.name, ex.error_class).inc()
            await self._send_error(
                send, ex.status, fmt.error_body(ex.status, f"upstream '{upstream.name}' failed mid-response: {type(exc).__name__}",
                                                "upstream_timeout" if ex.status == 504 else "upstream_error"), request_id, out.our_headers[1:]
            )
            return
        if not complete:
            self.metrics.unsummarised.labels(upstream.name).inc()
            ex.error_class = await self._relay_oversized(send, response, chunks, out.our_headers, ex.overhead, upstream)
            if ex.status != 200:
                ex.summary.error = True
                ex.error_class = ex.error_class or f"http_{ex.status}"
            return
        response.release()
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        t_body = time.perf_counter()
        hdrs = response_headers(response.raw_headers)
        hdrs.append((b"content-length", str(len(raw)).encode()))
        hdrs.extend(out.our_headers)
        ex.overhead += time.perf_counter() - t_body
        hdrs.append((b"x-thermostat-overhead-ms", f"{ex.overhead * 1000:.3f}".encode()))
        await send({"type": "http.response.start", "status": ex.status, "headers": hdrs})
        await send({"type": "http.response.body", "body": raw, "more_body": False})
        if ex.status == 200:
            ex.summary = fmt.summarize_body(raw)
        else:
            ex.summary.error = True
            ex.error_class = ex.error_class or f"http_{ex.status}"

    async def _relay_oversized(
        self,
        send: Send,
        response: UpstreamResponse,
        head: list[bytes],
        our_headers: list[tuple[bytes, bytes]],
        overhead: float,
        upstream: Upstream,
    ) -> str | None:
        """Relay a body above `max_response_bytes` as it arrives, unread: memory stays bounded,
        and the outcome simply has no usage. Returns the error class if the upstream broke off."""
        hdrs = response_headers(response.raw_headers)
        hdrs.extend(our_headers)
        hdrs.append((b"x-thermostat-overhead-ms", f"{overhead * 1000:.3f}".encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": hdrs})
        error_class: str | None = None
        try:
            for chunk in head:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            head.clear()
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UPSTREAM_ERRORS as exc:
            error_class = classify(exc)
            self.metrics.upstream_errors.labels(upstream.name, error_class).inc()
        if error_class is None:
            response.release()
        else:
            response.close()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return error_class

    async def _relay_stream(
        self,
        receive: Receive,
        send: Send,
        response: UpstreamResponse,
        our_headers: list[tuple[bytes, bytes]],
        strip_usage: bool,
        summary_out: ResponseSummary,
        t0: float,
        t_headers: float,
        overhead: float,
        upstream: Upstream,
        fmt: WireFormat,
    ) -> tuple[float | None, str | None, float]:
        summarizer = fmt.stream_summarizer(summary_out)
        cap = upstream.settings.max_response_bytes
        relay = StreamRelay(strip_usage, cap, summarizer=summarizer, max_total_bytes=cap)
        if summarizer is None:
            relay.summary = summary_out
        hdrs = response_headers(response.raw_headers)
        hdrs.extend(our_headers)
        overhead += time.perf_counter() - t_headers
        hdrs.append((b"x-thermostat-overhead-ms", f"{overhead * 1000:.3f}".encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": hdrs})
        ttft: float | None = None
        error_class: str | None = None
        read_watch = self.services.read_watch
        body = upstream.hand_over_read_timeout(response) if read_watch.running else None
        silence = read_watch.track(body, upstream.settings.timeout_s) if body is not None else None

        delivered = False  # the [DONE] event has been handed to the client

        async def pump() -> None:
            nonlocal ttft, delivered
            async for chunk in response.content.iter_any():
                out = relay.feed(chunk)
                if ttft is None and relay.first_token:
                    ttft = time.perf_counter() - t0
                if silence is None:
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                        delivered = relay.saw_done
                    continue
                silence.mark = read_watch.ticks
                if out:
                    silence.sending = True  # a slow client is backpressure, not upstream silence
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                    delivered = relay.saw_done
                    silence.sending = False
                    silence.mark = read_watch.ticks
            rest = relay.flush()
            if rest:
                await send({"type": "http.response.body", "body": rest, "more_body": True})

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        clean = False
        pump_task = asyncio.ensure_future(pump())
        watch_task = asyncio.ensure_future(watch())
        try:
            done, _ = await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if watch_task in done:
                pump_task.cancel()
                # A client that read the whole stream ([DONE] relayed, usage before it) may close before the
                # last empty body message goes out: that answer was delivered, not cut off.
                error_class = None if delivered else "client_disconnected"
                try:
                    await pump_task
                except (asyncio.CancelledError, Exception):
                    pass
                return ttft, error_class, overhead
            watch_task.cancel()
            if relay.unsummarised:
                self.metrics.unsummarised.labels(upstream.name).inc()
            clean = pump_task.exception() is None
            exc = pump_task.exception()
            if exc is not None:
                error_class = classify(exc)
                self.metrics.upstream_errors.labels(upstream.name, error_class).inc()
                summary_out.error = True
                payload = fmt.error_body(502, f"upstream '{upstream.name}' failed mid-stream: {type(exc).__name__}", "upstream_stream_error")
                # Anthropic's SDK reads an `event: error` line; OpenAI's reads the `error` key of a data line.
                prefix = b"event: error\n" if fmt.upstream_format == "anthropic" else b""
                await send({"type": "http.response.body", "body": prefix + b"data: " + payload + b"\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return ttft, error_class, overhead
        finally:
            if silence is not None:
                read_watch.untrack(silence)
            for task in (pump_task, watch_task):
                if not task.done():
                    task.cancel()
            if clean:
                response.release()  # the connection goes back to the pool
            else:
                response.close()  # a stream cut short: close it so the upstream stops generating

    async def _finish(self, decision: Decision, ex: Exchange, t0: float, req: Admitted, out: Outgoing, *, body: Any = None, key: str = "") -> None:
        """Build the one Outcome, let the answer check lower its quality, then call the listeners in order. Never raises.

        The listeners (`EdgeServices.listeners`) are assembled once by the composition root
        (`proxy.runtime.outcome_listeners`); `body` (the parsed request) and `key` (the client's
        assignment key, "" if none) feed the judge and the regeneration check.
        """
        svc = self.services
        try:
            latency = time.perf_counter() - t0
            outcome = complete(decision, ex.summary, ex.status, ex.error_class, Timings(latency, ex.ttft),
                               quality_settings=self.quality_settings, scorer=svc.scorer, prices=svc.prices)
            outcome = await svc.answer_check.validated(decision, outcome, ex.summary, body)  # json_schema / tool parameters
            done = Finished(decision, outcome, ex.summary, ex.status, latency, ex.ttft, ex.overhead, req.ctx, out.prompt, body, key,
                            out.traceparent)
            for listener in svc.listeners:
                pending = listener(done)
                if pending is not None:
                    await pending
        except Exception:
            log.exception("recording the outcome of %s failed", decision.request_id)

    # ---- untouched passthrough ------------------------------------------------------

    async def _passthrough(self, scope: Scope, send: Send, body: bytes, request_id: str, t0: float, v1_path: str) -> None:
        svc = self.services
        method: str = scope["method"]
        model = None
        parsed: Any = None
        if body and len(body) < 1_000_000 and body[:1] == b"{":
            try:
                parsed = _decode(body)
                if isinstance(parsed, dict) and isinstance(parsed.get("model"), str):
                    model = parsed["model"]
            except (msgspec.DecodeError, RecursionError):
                pass  # not Thermostat's to judge: the upstream answers it
        if model is None and v1_path.startswith("/models/") and v1_path.count("/") == 2 and len(v1_path) > len("/models/"):
            model = v1_path[len("/models/"):]  # `GET /v1/models/{id}` goes where that model is served
        wire = wire_of(v1_path)
        upstream = svc.pool.route_format(model, wire)
        if upstream is None:
            detail = f" for model '{model}'" if model else ""
            raise ProxyError(404, f"no upstream of format '{wire}' is configured{detail}", "model_not_found")
        if not upstream.paths.allows(method, v1_path):
            raise upstream.paths.refusal(method, v1_path)
        reservation, counted = await self._admit_passthrough(scope["headers"], method, v1_path, parsed)
        url = upstream.url_for(v1_path, scope.get("query_string", b""))
        fwd_headers = forward_headers(scope["headers"], upstream)
        overhead = time.perf_counter() - t0
        tail = b""
        spent: int | None = 0  # nothing reached the upstream, or it refused: nothing spent
        try:
            try:
                response = await upstream.send(method, url, fwd_headers, body or None)
            except UPSTREAM_ERRORS as exc:
                error_class = classify(exc)
                status = 504 if error_class == "timeout" else 502
                self.metrics.upstream_errors.labels(upstream.name, error_class).inc()
                code = "upstream_timeout" if status == 504 else "upstream_unreachable"
                exc_body = ProxyError(status, f"upstream '{upstream.name}' failed: {type(exc).__name__}", code, "upstream_error")
                await self._send_error(send, status, own_error(scope["path"], exc_body), request_id)
                return
            spent, complete = None, False  # until the answer is read whole, it may all have been spent
            try:
                hdrs = response_headers(response.raw_headers)
                hdrs.append((b"x-request-id", request_id.encode()))
                hdrs.append((b"x-thermostat-overhead-ms", f"{overhead * 1000:.3f}".encode()))
                await send({"type": "http.response.start", "status": response.status, "headers": hdrs})
                try:
                    async for chunk in response.content.iter_any():
                        if counted:
                            tail = (tail + chunk)[-_USAGE_TAIL:]
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    complete = True
                    spent = usage_in_tail(tail) if response.status < 400 else 0
                except UPSTREAM_ERRORS as exc:
                    self.metrics.upstream_errors.labels(upstream.name, classify(exc)).inc()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                if complete:
                    response.release()
                else:
                    response.close()
        finally:
            if counted:
                await svc.decider.settle_admitted(reservation, spent)

    async def _admit_passthrough(
        self, headers: list[tuple[bytes, bytes]], method: str, v1_path: str, parsed: Any
    ) -> tuple[Reservation | None, bool]:
        """The budget's say on a passed-through request: (reservation, whether its usage is counted).

        While the budget is on, whatever may spend tokens is counted or not forwarded: the
        paths whose answers report usage (`COUNTED_POSTS`) reserve their prompt and settle
        what the answer says; any other spending request (batches, images, audio, ...) would
        spend the operator's tokens where no budget sees them, and is refused.
        """
        if not self.services.config.caws.enabled or not spends_tokens(method, v1_path):
            return None, False
        if v1_path not in COUNTED_POSTS:
            raise ProxyError(403, f"'{method} /v1{v1_path}' spends tokens the budget cannot count, so it is not forwarded "
                             "while [caws] is enabled", "path_not_budgeted", "permission_error")
        task_type = self._task_type(headers)
        prompt = estimate_prompt_tokens(parsed) if isinstance(parsed, dict) else 0
        try:
            return await self.services.decider.admit(task_type, prompt), True
        except BudgetExceeded:
            raise _budget_exceeded() from None
        except BudgetUnavailable as exc:
            raise _budget_unavailable(exc.unpriced) from None
