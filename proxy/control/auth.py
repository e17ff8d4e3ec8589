"""Admin authentication for the control API.

`Authorization: Bearer <token>`, the token read once at start-up from the env var
named by `[admin] token_env`. Constant-time comparison (`hmac.compare_digest` on
bytes). 401 when the header is missing or not a Bearer token, 403 when the token is
wrong. Serving without a token needs `[admin] allow_unauthenticated = true`
(`require_token_or_opt_in`), because then anything that reaches the port from this
host counts as loopback: a same-host forwarder, a reverse proxy, a browser tab. Even
so, only loopback clients (`scope["client"]`) whose `Host` names this machine
(`localhost`, a loopback address, or `[server] allowed_hosts`) get in; the `Host`
rule is what stops DNS rebinding.

Against cross-site requests from a browser (CSRF): before the credentials, an `Origin`
header, when present, must be the server's own origin (the `Host` the request was
addressed to) or one of `[admin] allowed_origins` (403); after them, a call that sends a
body, and every POST, must say `application/json` (415): a page can send `text/plain` or
form bodies without a CORS preflight, never JSON.

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

from proxy.common import host_name, normalize_origin, same_authority
from proxy.config import AdminSettings, ConfigError

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


def configured_token(token_env: str, environ: Mapping[str, str] | None = None) -> str | None:
    raw = (os.environ if environ is None else environ).get(token_env, "").strip()
    return raw or None


MIN_TOKEN_CHARS = 16
"""Shortest admin token accepted: a short one is guessed long before the 401/403 counters tell."""


def require_token_or_opt_in(admin: AdminSettings, environ: Mapping[str, str] | None = None) -> None:
    """Refuse to build a server whose control API would be open to anything on this host, or to a guessed token."""
    token = configured_token(admin.token_env, environ)
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"the admin token in ${admin.token_env} has {len(token)} characters; at least {MIN_TOKEN_CHARS} are required "
            f"(e.g. `export {admin.token_env}=$(openssl rand -hex 24)`)"
        )
    if token is None and not admin.allow_unauthenticated:
        raise ConfigError(
            f"no admin token in ${admin.token_env}: set one (e.g. `export {admin.token_env}=$(openssl rand -hex 24)`), "
            "or set [admin] allow_unauthenticated = true to serve the control API to same-host clients without one"
        )


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class AdminAuth:
    """Checks one request's origin, credentials and body type; holds the counters for /security-status."""

    def __init__(self, token_env: str, environ: Mapping[str, str] | None = None, *,
                 allowed_origins: tuple[str, ...] = (), allowed_hosts: tuple[str, ...] = ()) -> None:
        token = configured_token(token_env, environ)
        self.token_env = token_env
        self._token: bytes | None = token.encode("utf-8") if token else None
        self.token_id = token_id(token) if token else None
        self.allowed_origins = frozenset(o for o in map(normalize_origin, allowed_origins) if o)
        # Without a token the Host must name this machine; `[server] allowed_hosts`, when set,
        # is enforced for every request at the edge and extends that set here.
        self.local_hosts = _LOOPBACK_NAMES | {name for name in map(host_name, allowed_hosts) if name}
        self.failures: Counter[str] = Counter()

    @classmethod
    def from_settings(cls, admin: AdminSettings, allowed_hosts: tuple[str, ...] = (),
                      environ: Mapping[str, str] | None = None) -> AdminAuth:
        return cls(admin.token_env, environ, allowed_origins=admin.allowed_origins, allowed_hosts=allowed_hosts)

    @property
    def configured(self) -> bool:
        return self._token is not None

    def warn_if_open(self) -> None:
        if not self.configured:
            log.warning(
                "no admin token in $%s ([admin] allow_unauthenticated): the control API (/api/optimization/*) answers "
                "every process on this host, and anything that forwards to it",
                self.token_env,
            )

    def check_origin(self, headers: Mapping[str, str]) -> None:
        """403 when a browser page from another origin sent the request."""
        origin = headers.get("origin")
        if origin is None:
            return
        normalized = normalize_origin(origin)
        if normalized is not None and (normalized in self.allowed_origins or same_authority(normalized, headers.get("host"))):
            return
        self.failures["origin"] += 1
        raise AuthError(403, f"requests from origin {origin[:100]!r} are not allowed (see [admin] allowed_origins)", "origin_not_allowed")

    def check_content_type(self, method: str, headers: Mapping[str, str]) -> None:
        """415 unless a request that can carry a body declares JSON."""
        has_body = headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in headers
        if method not in _BODY_METHODS and not has_body:
            return
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            self.failures["content_type"] += 1
            raise AuthError(415, "the control API accepts request bodies as 'content-type: application/json' only", "unsupported_media_type")

    def check(self, headers: Mapping[str, str], client_host: str | None) -> str:
        """Returns the actor id ("token:<id>" or "loopback"); raises AuthError otherwise."""
        if self._token is None:
            if not is_loopback(client_host):
                self.failures["not_loopback"] += 1
                raise AuthError(
                    403,
                    "the control API is served to loopback clients only (no admin token is configured)",
                    "loopback_only",
                )
            if host_name(headers.get("host")) not in self.local_hosts:
                self.failures["not_loopback"] += 1
                raise AuthError(
                    403,
                    "without an admin token the control API answers requests addressed to localhost only "
                    "(Host header; see [server] allowed_hosts)",
                    "loopback_only",
                )
            return "loopback"
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

    def refuses(self, headers: Mapping[str, str], client_host: str | None) -> bool:
        """Would `check` refuse this request? The counters stay as they were: a self-test is not an attack."""
        saved = self.failures.copy()
        try:
            self.check(headers, client_host)
            return False
        except AuthError:
            return True
        finally:
            self.failures = saved

    def stats(self) -> dict[str, Any]:
        return {k: self.failures.get(k, 0) for k in ("missing", "malformed", "wrong", "not_loopback", "origin", "content_type")}
