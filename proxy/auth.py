"""Admin authentication for the control API.

`Authorization: Bearer <token>`, the token read once at start-up from the env var
named by `[admin] token_env`. Constant-time comparison (`hmac.compare_digest` on
bytes). 401 when the header is missing or not a Bearer token, 403 when the token is
wrong. Without a configured token the control API answers loopback clients only
(`scope["client"]`), everyone else gets 403; a warning says so at start-up.

Audit entries name the caller by a short token id (first 8 hex digits of the
token's SHA-256), never by the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("thermostat.auth")


class AuthError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def token_id(token: str) -> str:
    """Short, non-reversible id of a token for audit entries and status pages."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:8]


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host in ("localhost", "testclient"):  # Litestar's TestClient reports "testclient"
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class AdminAuth:
    """Checks one request's credentials; holds the counters for /security-status."""

    def __init__(self, token_env: str, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get(token_env, "")
        self.token_env = token_env
        self._token: bytes | None = raw.strip().encode("utf-8") if raw.strip() else None
        self.token_id = token_id(raw.strip()) if self._token else None
        self.failures: Counter[str] = Counter()

    @property
    def configured(self) -> bool:
        return self._token is not None

    def warn_if_open(self) -> None:
        if not self.configured:
            log.warning(
                "no admin token in $%s: the control API (/api/optimization/*) answers loopback clients only",
                self.token_env,
            )

    def check(self, headers: Mapping[str, str], client_host: str | None) -> str:
        """Returns the actor id ("token:<id>" or "loopback"); raises AuthError otherwise."""
        if self._token is None:
            if is_loopback(client_host):
                return "loopback"
            self.failures["not_loopback"] += 1
            raise AuthError(
                403,
                "the control API is served to loopback clients only (no admin token is configured)",
                "loopback_only",
            )
        header = headers.get("authorization")
        if header is None or not header.strip():
            self.failures["missing"] += 1
            raise AuthError(401, "missing Authorization header (expected 'Bearer <admin token>')", "missing_token")
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value or " " in value:
            self.failures["malformed"] += 1
            raise AuthError(401, "malformed Authorization header (expected 'Bearer <admin token>')", "invalid_authorization")
        if not hmac.compare_digest(value.encode("utf-8"), self._token):
            self.failures["wrong"] += 1
            raise AuthError(403, "the admin token is not valid", "invalid_token")
        return f"token:{self.token_id}"

    def stats(self) -> dict[str, Any]:
        return {k: self.failures.get(k, 0) for k in ("missing", "malformed", "wrong", "not_loopback")}
