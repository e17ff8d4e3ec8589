"""Errors in the OpenAI shape, so SDKs raise their usual exception types."""

from __future__ import annotations

import msgspec


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    code: str | None
    param: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


class ProxyError(Exception):
    """An error Thermostat itself answers with (never an upstream's own error body)."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


_encoder = msgspec.json.Encoder()


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return _encoder.encode(ErrorEnvelope(ErrorBody(message=message, type=type_, code=code, param=param)))


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> ProxyError:
    return ProxyError(400, message, code, "invalid_request_error", param)
