"""How the control API fails: one error shape, and an OpenAPI document that says so.

Every error is `{"error": {"message", "type", "code", "param"}}` (OpenAI's shape);
`document_errors` lists on each operation exactly the statuses it can return, and the
schema plugin makes the document promise what msgspec enforces.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
from litestar import Request, Response
from litestar._openapi.schema_generation import SchemaCreator  # private, but the plugin's own signature type
from litestar._openapi.schema_generation.plugins import StructSchemaPlugin  # not exported publicly (litestar 2.25)
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Schema
from litestar.typing import FieldDefinition

from guards.state import StoreUnavailable as StateStoreUnavailable
from proxy.common import ErrorEnvelope, ProxyError
from proxy.control.auth import AuthError
from proxy.control.schemas import ApiError, ApiErrorBody
from proxy.store import StoreUnavailable as LogStoreUnavailable

log = logging.getLogger("thermostat.control")

ERR = ResponseSpec(data_container=ErrorEnvelope, description="Error in the OpenAI shape")


def error_response(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> Response[ApiError]:
    return Response(ApiError(ApiErrorBody(message=message, type=type_, code=code, param=param)), status_code=status)


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def _auth_error(_: Request, exc: AuthError) -> Response[ApiError]:
    resp = error_response(exc.status, exc.message, _TYPE_BY_STATUS.get(exc.status, "permission_error"), exc.code)
    if exc.status == 401:
        resp.headers["www-authenticate"] = "Bearer"
    return resp


UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")


def _validation_error(_: Request, exc: ValidationException) -> Response[ApiError]:
    message = exc.detail or "invalid request"
    param = None
    extra = exc.extra
    if isinstance(extra, list) and extra:
        first = extra[0]
        if isinstance(first, dict):
            param = str(first.get("key")) if first.get("key") is not None else None
            detail = first.get("message")
            if detail:
                message = f"{message}: {detail}"
    return error_response(400, message, "invalid_request_error", "invalid_body", param)


def _http_error(_: Request, exc: HTTPException) -> Response[ApiError]:
    status = exc.status_code
    codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden", 413: "request_too_large", 415: "unsupported_media_type"}
    resp = error_response(status, str(exc.detail), _TYPE_BY_STATUS.get(status, "api_error"), codes.get(status, f"http_{status}"))
    if exc.headers:  # e.g. 405's Allow, which RFC 9110 requires
        resp.headers.update(exc.headers)
    return resp


def _proxy_error(_: Request, exc: ProxyError) -> Response[ApiError]:
    return error_response(exc.status, exc.message, exc.type, exc.code, exc.param)


def _store_unavailable(request: Request, exc: Exception) -> Response[ApiError]:
    """A backing store that is down is the server's state, not a bug: 503 and a retry hint,
    so a dashboard or a script waits and tries again instead of reporting a crash."""
    log.warning("control API %s %s: %s", request.method, request.url.path, exc)
    code = "log_store_unavailable" if isinstance(exc, LogStoreUnavailable) else "state_store_unavailable"
    resp = error_response(503, f"a backing store is unreachable, try again shortly: {exc}", "service_unavailable", code)
    resp.headers["retry-after"] = "5"
    return resp


def _internal_error(request: Request, exc: Exception) -> Response[ApiError]:
    log.exception("control API %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}", "api_error", "internal_error")


_ERROR_TEXT = {
    400: "Malformed request, or a Host not in [server] allowed_hosts (OpenAI error shape)",
    401: "Missing or malformed Authorization header",
    403: "Wrong admin token; an Origin that is neither this server nor in [admin] allowed_origins; "
         "without a token, not a loopback client or a Host other than localhost",
    404: "Unknown id (or no upstream for the context's model)",
    409: "Conflict with the current state",
    415: "The body is not declared as content-type: application/json",
    422: "Well-formed but invalid values",
    503: "Not ready / a backing store is unavailable",
}


def document_errors(handler: BaseRouteHandler) -> None:
    """The error statuses a control operation really returns, so the OpenAPI document matches.

    400 everywhere (a disallowed Host is refused at the edge for any path); 401/403 where
    the admin guard runs; 415 where it checks the body type; 503 on every admin operation,
    since each reads or writes the decision log or the state store, either of which can be
    down while the proxy keeps serving; plus the handler's own.
    """
    public = bool(handler.opt.get("public"))
    codes = {400} if public else {400, 401, 403, 503}
    methods: set[str] = set(getattr(handler, "http_methods", ()))
    if not public and methods - {"GET", "HEAD"}:
        codes.add(415)
    own: dict[int, ResponseSpec] = dict(getattr(handler, "responses", None) or {})
    specs = {code: ResponseSpec(data_container=ApiError, description=_ERROR_TEXT[code]) for code in sorted(codes | own.keys())}
    specs.update({code: spec for code, spec in own.items() if spec is not ERR})  # a body other than the error shape
    handler.responses = specs  # type: ignore[attr-defined]
    if not public:
        handler.security = [{"bearer": []}]  # type: ignore[attr-defined]


EXCEPTION_HANDLERS: dict[Any, Any] = {
    AuthError: _auth_error,
    ValidationException: _validation_error,
    ProxyError: _proxy_error,
    HTTPException: _http_error,
    LogStoreUnavailable: _store_unavailable,
    StateStoreUnavailable: _store_unavailable,
    Exception: _internal_error,
}


class StrictStructSchemaPlugin(StructSchemaPlugin):
    """Litestar's struct schemas, made to say what msgspec enforces.

    `additionalProperties: false` where the struct forbids unknown fields (the document
    promised extra keys were fine; the decoder answers them with 400), and numeric bounds
    of 0 (`ge=0.0` on a quality score), which Litestar drops because it tests them for
    truthiness.
    """

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: SchemaCreator) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        info = msgspec.inspect.type_info(field_definition.type_)
        if not isinstance(info, msgspec.inspect.StructType):
            return schema
        if info.forbid_unknown_fields:
            schema.additional_properties = False
        for f in info.fields:  # Litestar drops bounds equal to 0 (it tests their truthiness): put them back
            prop = (schema.properties or {}).get(f.encode_name)
            bounds = _numeric_type(f.type)
            if not isinstance(prop, Schema) or bounds is None:
                continue
            for attr, key in (("ge", "minimum"), ("gt", "exclusive_minimum"), ("le", "maximum"), ("lt", "exclusive_maximum")):
                if getattr(bounds, attr) == 0 and getattr(prop, key) is None:
                    setattr(prop, key, 0)
        return schema


def integral_floats_as_ints(value: Any) -> Any:
    """JSON Schema counts 3.0 as an integer; msgspec's strict mode does not."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [integral_floats_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: integral_floats_as_ints(v) for k, v in value.items()}
    return value


def _numeric_type(t: Any) -> msgspec.inspect.IntType | msgspec.inspect.FloatType | None:
    if isinstance(t, msgspec.inspect.UnionType):
        inner = [x for x in t.types if not isinstance(x, msgspec.inspect.NoneType)]
        t = inner[0] if len(inner) == 1 else None
    if isinstance(t, msgspec.inspect.Metadata):
        t = t.type
    return t if isinstance(t, (msgspec.inspect.IntType, msgspec.inspect.FloatType)) else None
